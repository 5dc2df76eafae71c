"""Streaming statistics of one traced tensor position, reduced on its own device.

Memory is O(channels + seq_len + bins + top_k) per position, whatever the number of tokens seen, and an
update launches only device kernels (no ``.item()``, no host synchronisation), so tracing a GPU run never
stalls it. Statistics of two runs (or two ranks) merge exactly with :meth:`PositionStats.merge_` and
:meth:`PositionStats.all_reduce_`.

What is kept for a tensor ``x`` seen as ``[rows = batch x tokens, channels]``:

- ``chan_absmax``, ``chan_abssum``: per channel max |x| and sum |x| (mean = sum / rows);
- ``chan_median_sum``: sum over updates of the per-channel median |x| over a fixed random subset of rows;
  divided by ``n_updates`` it estimates each channel's typical magnitude, robust to a few massive tokens;
- ``tok_absmax``, ``tok_absmax_sum``: per token index (position in the window) max |x| over channels,
  max and sum over windows;
- ``hist``: a log2 histogram of |x| over a fixed random sample of elements per update, which gives the tensor
  median of the nonzero entries (exact zeros, e.g. after ReLU, would make it 0) with a value error under half a bin (``2 ** (0.5 / bins_per_octave) - 1``) and a rank error bounded
  by the Dvoretzky-Kiefer-Wolfowitz inequality for the number of samples;
- ``top_*``: the ``top_k`` largest |x| entries, deduplicated by (token index, channel) across windows,
  with signed value, window index, token index and channel.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import kernels

EMPTY = -1.0  # marks an unused top-k slot (|x| is never negative)


@dataclass(frozen=True)
class StatsConfig:
    """Knobs of the streaming statistics."""

    top_k: int = 32
    median_samples: int = 8192
    channel_median_rows: int = 16
    bins_per_octave: int = 32
    log2_min: int = -32
    log2_max: int = 24
    seed: int = 0
    merge_every: int = 16
    #: how an update runs: "triton" (two hand-written Triton kernels, see tracing/kernels.py; on a CPU tensor
    #: Triton's interpreter runs them, for tests), "graphs" (the same kernels captured once per tensor layout
    #: as a CUDA graph and replayed, CUDA only), "never" (eager torch ops), "fused" (torch.compile), "auto"
    #: (graphs on CUDA where Triton is installed, else fused; the eager host path on a CPU; profile() runs
    #: small GPU profiles eagerly, see profiler.EAGER_BELOW). On a GPU ~40
    #: small eager ops per position per forward make tracing launch-bound, and the compiled graph still
    #: costs ~0.7 ms of host time per update (bench/RESULTS.md).
    compile: str = "auto"
    #: graphed updates of a layer run on a side CUDA stream beside the next layer's model kernels
    #: (tracing/overlap.py) in GPU profiles of >= 4 forwards; positions the model writes in place stay on the
    #: model's stream
    overlap: bool = True

    @property
    def n_bins(self) -> int:
        return (self.log2_max - self.log2_min) * self.bins_per_octave


_SAMPLE_CACHE: dict[tuple, torch.Tensor] = {}


def _fixed_sample(n: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """The same ``k`` random indices in ``[0, n)`` every time for the same (n, k, seed): deterministic runs."""
    key = (n, k, seed, str(device))
    idx = _SAMPLE_CACHE.get(key)
    if idx is None:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
        if k >= n:
            idx = torch.arange(n)
        else:  # iid draws (with replacement): what the DKW bound assumes, and O(k) for any n
            idx = torch.randint(0, n, (k,), generator=gen).sort().values
        idx = idx.to(device)
        if len(_SAMPLE_CACHE) > 256:
            _SAMPLE_CACHE.clear()
        _SAMPLE_CACHE[key] = idx
    return idx


def _update_math(x, max_state, sum_state, rows_idx, elem_idx, batch: int, seq_len: int, k_rows: int, kk: int,
                 top: int, log2_min: float, log2_max: float, n_bins: int, floor: float | None = None,
                 work: torch.Tensor | None = None):
    """Everything one update computes, as one pure function of ``x`` [rows, channels] and the packed states.

    Returns the new packed max and sum states and the top-k candidates. With ``floor=None`` (the device path)
    it is pure and free of host syncs, so torch.compile turns it into a handful of fused kernels launched by
    one call (the per-op launch cost of ~40 eager ops per position otherwise dominates tracing on a GPU).

    With a ``floor`` (the eager CPU path, where host syncs are free) it gives the same statistics with less
    work: the top-k search is narrowed to entries at or above both the ``kk``-th largest row max and
    ``floor`` (the smallest |x| of a full running top-k, which no smaller entry can enter; -1 when unknown),
    the channel medians come from numpy's introselect (~5x faster than torch.kthvalue there), and ``work``,
    an fp32 buffer shaped like ``x``, receives |x| instead of a fresh allocation.
    """
    channels = x.shape[1]
    # |x| in fp32, computed once and reused by every statistic below
    if work is None:
        a = x.abs() if x.dtype == torch.float32 else x.float().abs_()
    elif x.dtype == torch.float32:
        a = torch.abs(x, out=work)
    else:
        a = work.copy_(x).abs_()
    if floor is None:
        chan_max = a.amax(0)
    else:  # |x| >= 0 orders like its int32 bits (NaN above inf), and integer max is cheaper on a CPU
        chan_max = a.view(torch.int32).amax(0).view(torch.float32)
    chan_sum, row_max = a.sum(0), a.amax(1)
    tok = row_max.view(batch, seq_len)

    def abs_rows(idx):  # |x| of some rows: from the host path's buffer, or gathered from x (on a GPU this
        # keeps inductor from writing a full fp32 copy of |x| for the gathers)
        return a.index_select(0, idx) if floor is not None else x.index_select(0, idx).abs().float()

    # channel medians over a fixed random subset of rows (the lower median, as torch.median gives)
    sub = abs_rows(rows_idx)
    if floor is None:
        med = sub.kthvalue((k_rows + 1) // 2, 0).values
    else:
        part = np.partition(sub.t().contiguous().numpy(), (k_rows - 1) // 2, axis=1)
        med = torch.from_numpy(part[:, (k_rows - 1) // 2].copy())
    # tensor-median histogram over a fixed random sample of elements
    if floor is not None:
        sample = a.reshape(-1).index_select(0, elem_idx)
    else:
        sample = x.reshape(-1).index_select(0, elem_idx).abs().float()
    logs = sample.clamp(min=2.0 ** log2_min, max=2.0 ** log2_max * 0.999).log2()
    hist = torch.histc(logs, bins=n_bins, min=log2_min, max=log2_max)
    # Exact top-k distinct (token, channel) keys of this update. A key occurs at most `batch` times, so the
    # k * batch largest elements hold the k best keys, and they lie in the k * batch rows with the largest max.
    if floor is None:
        cand_rows = row_max.topk(kk, sorted=False).indices
        vals, flat = abs_rows(cand_rows).view(-1).topk(top, sorted=False)
    else:  # the kk rows hold kk entries >= their smallest max: the kk largest entries are >= it (and >= floor)
        tau = max(float(row_max.topk(kk, sorted=False).values.min()), floor)
        cand_rows = (row_max >= tau).nonzero().squeeze(1)
        cand = abs_rows(cand_rows).view(-1)
        idx = (cand >= tau).nonzero().squeeze(1)
        vals, sub_idx = cand.index_select(0, idx).topk(min(top, idx.numel()), sorted=False)
        flat = idx.index_select(0, sub_idx)
    rows, cols = cand_rows[flat // channels], flat % channels
    new_max = torch.maximum(max_state, torch.cat([chan_max, tok.amax(0)]))
    new_sum = sum_state + torch.cat([chan_sum, tok.sum(0), med, hist]).double()
    return new_max, new_sum, vals, x[rows, cols].float(), rows, cols


_COMPILED: dict[str, object] = {}


def resolve_mode(device: torch.device, mode: str) -> str:
    """The update path that ``mode`` (:attr:`StatsConfig.compile`) means on ``device``."""
    if mode == "auto":
        if device.type != "cuda":
            return "never"
        return "graphs" if kernels.available() else "fused"
    return mode


def update_fn(device: torch.device, mode: str):
    """The update math, compiled as ``mode`` asks (see :attr:`StatsConfig.compile`)."""
    mode = resolve_mode(device, mode)
    if mode in ("never", "triton", "graphs"):
        return _update_math
    fn = _COMPILED.get("fused")
    if fn is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        fn = _COMPILED["fused"] = torch.compile(_update_math, dynamic=False)
    return fn


def median_error(config: StatsConfig, samples: float, confidence: float = 0.95) -> tuple[float, float]:
    """(relative value error, rank error at ``confidence``) of the histogram median from ``samples`` draws.

    The value error is half a histogram bin; the rank error is the Dvoretzky-Kiefer-Wolfowitz bound
    ``sqrt(ln(2 / (1 - confidence)) / (2 n))`` on the sample's empirical distribution.
    """
    value_err = 2.0 ** (0.5 / config.bins_per_octave) - 1.0
    rank_err = math.sqrt(math.log(2.0 / (1.0 - confidence)) / (2.0 * max(samples, 1.0)))
    return value_err, rank_err


class FastReplay(NamedTuple):
    """A position's last graphed update: the given tensor's layout, the graph and the update's counts. The next
    update of the same layout replays the graph without the checks of a first update (the host cost of a small
    update)."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    graph: object
    rows: int
    samples: int
    batch: int


class PositionStats:
    """Running statistics of one (layer, position). Buffers are allocated at the first update.

    The state lives in two packed device vectors (``max_state`` = [chan_absmax | tok_absmax] and
    ``sum_state`` = [chan_abssum | tok_absmax_sum | chan_median_sum | hist]) so that one update is one call
    of :func:`_update_math`; the named statistics are views into them. Counts are plain Python numbers.
    """

    def __init__(self, config: StatsConfig):
        self.config = config
        self.channels: int | None = None
        self.seq_len: int | None = None
        self.rows = self.n_updates = self.samples = self.tok_windows = 0.0
        self._fast: FastReplay | None = None
        # where graphed updates go instead of the model's stream (tracing/overlap.py), and this position's key
        self.overlap = None
        self.key: tuple = ()

    # -- streaming -------------------------------------------------------------------------------------
    def _allocate(self, channels: int, seq_len: int, device: torch.device) -> None:
        c = self.config
        self.channels, self.seq_len = channels, seq_len
        # one allocation per position, at its first update in the first forward: the states, the top-k and the
        # graph path's rings are views of it (a 7B profile creates ~450 positions; their four allocations each
        # took ~67 ms of host time in all under cProfile on the H200 machine, but one instead measured no gain
        # in whole profiles, bench/RESULTS.md); the top-k tensors are replaced by new ones at every merge
        n, k = channels + seq_len, c.top_k
        graphs = device.type == "cuda" and resolve_mode(device, c.compile) == "graphs"
        ring = kernels.ring_numel(c.merge_every, seq_len, k) if graphs else 0
        sum_state, longs, f32_buf = zeroed_views(device, (2 * channels + seq_len + c.n_bins, torch.float64),
                                                 (3 * k + ring, torch.long), (n + 2 * k, torch.float32))
        f32_buf[n:n + k] = EMPTY
        self.max_state, self.top_abs, self.top_val = f32_buf.split([n, k, k])
        self.sum_state = sum_state
        self.top_window, self.top_token, self.top_channel = longs[:3 * k].split([k, k, k])
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._pending_keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # the Triton path's candidates
        # the graph path's device rings (keys, slots, counter), made here for every position of that path
        self._ring: tuple[torch.Tensor, ...] | None = (
            kernels.new_ring(c.merge_every, seq_len, k, device, longs[3 * k:]) if graphs else None)
        self._ring_n = 0  # rows of the rings written since the last flush, from row _ring_start on
        self._ring_start = 0
        self._n_pending = 0  # updates whose candidates are not merged into the top-k yet
        self._floor = EMPTY  # smallest |x| in the running top-k once it is full (host path only)

    # named views into the packed states
    @property
    def chan_absmax(self) -> torch.Tensor:
        return self.max_state[layout(self.channels, self.seq_len)["chan_absmax"]]

    @property
    def tok_absmax(self) -> torch.Tensor:
        return self.max_state[layout(self.channels, self.seq_len)["tok_absmax"]]

    @property
    def chan_abssum(self) -> torch.Tensor:
        return self.sum_state[layout(self.channels, self.seq_len)["chan_abssum"]]

    @property
    def tok_absmax_sum(self) -> torch.Tensor:
        return self.sum_state[layout(self.channels, self.seq_len)["tok_absmax_sum"]]

    @property
    def chan_median_sum(self) -> torch.Tensor:
        return self.sum_state[layout(self.channels, self.seq_len)["chan_median_sum"]]

    @property
    def hist(self) -> torch.Tensor:
        return self.sum_state[layout(self.channels, self.seq_len)["hist"]]

    def update(self, x: torch.Tensor, window0: int = 0) -> None:
        """Fold in a tensor shaped ``[batch, tokens, *channel_dims]`` whose batch row b is window ``window0 + b``."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.update(x, window0)
        fast = self._fast
        if (fast is not None and x.shape == fast.shape and x.stride() == fast.stride and x.dtype == fast.dtype
                and x.device == fast.device and x.data_ptr() % kernels.ALIGN == 0
                and self._n_pending < self.config.merge_every):
            self._count(fast.rows, fast.samples, fast.batch)
            return self._replay(x, window0, fast.graph)
        if x.dim() < 2:
            return
        given = x
        if x.dim() == 2:  # [tokens, channels] without batch
            x = x.unsqueeze(0)
        batch, seq_len = x.shape[0], x.shape[1]
        x = x.reshape(batch * seq_len, -1)
        if self.channels is None:
            self._allocate(x.shape[1], seq_len, x.device)
        elif x.shape[1] != self.channels or seq_len != self.seq_len:
            raise ValueError(
                f"tensor shape changed between updates: {self.channels} channels x {self.seq_len} tokens, "
                f"now {x.shape[1]} x {seq_len}"
            )
        c = self.config
        if self.due():  # the rings hold merge_every updates: merge them before the next one is written
            self._flush()
        rows, channels = x.shape
        k_rows = min(c.channel_median_rows, rows)
        k = min(c.median_samples, rows * channels)
        kk = min(c.top_k * batch, rows)
        rows_idx = _fixed_sample(rows, k_rows, c.seed, x.device)
        elem_idx = _fixed_sample(rows * channels, k, c.seed + 1, x.device)
        self._count(rows, k, batch)
        mode = resolve_mode(x.device, c.compile)
        if mode in ("triton", "graphs") and kernels.fits(batch, seq_len, channels, c.top_k):
            args = (batch, seq_len, rows_idx, elem_idx, c.top_k, c.log2_min, c.log2_max, c.bins_per_octave)
            if mode == "graphs" and x.device.type == "cuda" and x.data_ptr() % kernels.ALIGN == 0:
                graph = kernels.graphed(x, *args, ring=c.merge_every, before_capture=self._join)
                if x.data_ptr() == given.data_ptr():  # a view of the given tensor: the next update of the same
                    # layout replays the graph without the checks above (the host cost of a small update)
                    self._fast = FastReplay(given.shape, given.stride(), given.dtype, given.device, graph, rows, k,
                                            batch)
                return self._replay(x, window0, graph)
            self._join()
            keys, tokw = kernels.update(x, batch, seq_len, window0, self.max_state, self.sum_state, *args[2:])
            self._pending_keys.append((keys[None], tokw[None]))
            self._n_pending += 1
            return
        self._join()
        fn = update_fn(x.device, "fused" if mode in ("triton", "graphs") else mode)
        host = fn is _update_math and x.device.type == "cpu"  # eager CPU: the faster host path of _update_math
        # |x| into a buffer shared by the eager updates of one thread (they never overlap)
        eager = (self._floor, kernels.scratch(tuple(x.shape), x.device, ("abs", threading.get_ident()))) if host else ()
        self.max_state, self.sum_state, vals, signed, r, ch = fn(
            x, self.max_state, self.sum_state, rows_idx, elem_idx, batch, seq_len, k_rows, kk,
            min(c.top_k * batch, kk * channels), float(c.log2_min), float(c.log2_max), c.n_bins, *eager)
        self._pending.append((vals, signed, r + window0 * seq_len, ch))
        self._n_pending += 1
        if host and self._floor < 0 and len(vals) == kk == c.top_k * batch:
            # kk entries, a key at most `batch` times among them: top_k distinct keys are >= the smallest
            self._floor = float(vals.min())

    def _join(self) -> None:
        """The overlap's replays waited for on the model's stream, before work there that shares their buffers
        (a capture, a direct launch, the eager math). A first update that replays an already captured graph does
        not join: at 449 positions, joining at each held back the first forward of every profile."""
        if self.overlap is not None:
            self.overlap.join()

    def _count(self, rows: int, samples: int, batch: int) -> None:
        self.rows += rows
        self.n_updates += 1
        self.samples += samples
        self.tok_windows += batch

    def _replay(self, x: torch.Tensor, window0: int, graph) -> None:
        """One graphed update of ``x`` (the layout ``graph`` was captured for); its candidates go to the rings."""
        args = (x, window0, self.max_state, self.sum_state, *self._ring)
        if self.overlap is None:
            graph.replay(*args)
        else:
            self.overlap.replay(self.key, x, lambda: graph.replay(*args))
        self._ring_n += 1
        self._n_pending += 1

    def due(self) -> bool:
        """Whether ``merge_every`` updates' candidates are pending (the next update merges them first; a driver
        of many positions merges them all at once with :func:`merge_pending` before that)."""
        return self.channels is not None and self._n_pending >= self.config.merge_every

    def _drain_ring(self) -> None:
        """The graph path's candidates, appended to the pending ones (views of the rings: read them before the
        next replay, which the stream order of the flush guarantees)."""
        if self._ring_n:
            keys, slots, _ = self._ring  # the device counter runs on: row n % rows is written by update n
            lo, n, rows = self._ring_start, self._ring_n, len(keys)
            if lo + n <= rows:
                self._pending_keys.append((keys[lo:lo + n], slots[lo:lo + n]))
            else:  # wrapped around (only a partial ring, at the end, can start elsewhere than row 0)
                self._pending_keys.append((torch.cat([keys[lo:], keys[:lo + n - rows]]),
                                           torch.cat([slots[lo:], slots[:lo + n - rows]])))
            self._ring_start, self._ring_n = (lo + n) % rows, 0

    def _flush(self) -> None:
        merge_pending([self])

    def _merge_top(self, abs_v, val, window, token, channel) -> None:
        """Merge candidates into the running top-k (see :func:`merge_rows`)."""
        cand = (abs_v, val, window.to(self.top_window.dtype), token, channel)
        merged = merge_rows(*(torch.cat([t, c])[None] for t, c in zip(self._top(), cand)),
                            channels=self.channels, top_k=self.config.top_k)
        self._set_top(*(t[0] for t in merged))

    def _top(self) -> tuple[torch.Tensor, ...]:
        return self.top_abs, self.top_val, self.top_window, self.top_token, self.top_channel

    def _set_top(self, abs_v, val, window, token, channel) -> None:
        self.top_abs, self.top_val, self.top_window, self.top_token, self.top_channel = abs_v, val, window, token, channel
        if abs_v.device.type == "cpu":
            self._floor = max(self._floor, float(abs_v.min()))  # EMPTY while a slot is unused

    def _blocks(self, keys: tuple[torch.Tensor, torch.Tensor] | None) -> list[tuple[torch.Tensor, ...]]:
        """The pending candidates as (|x|, x, window, token, channel) blocks, taken out of the state, with the
        device paths' keys already taken out (:meth:`_take_keys`)."""
        out = []
        if keys is not None:
            out.append(tuple(t.flatten() for t in kernels.decode_keys(*keys, self.channels, self.seq_len)))
        if self._pending:
            vals, signed, grow, ch = (torch.cat(t) for t in zip(*self._pending))
            self._pending.clear()
            self._n_pending = 0
            out.append((vals, signed, grow // self.seq_len, grow % self.seq_len, ch))
        return out

    def _take_keys(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The device paths' pending candidate keys [updates, TOP] and token slots [updates, KT], taken out."""
        self._drain_ring()
        if not self._pending_keys:
            return None
        if len(self._pending_keys) == 1:  # no copy (a profile's finalize took ~900 one-tensor cats)
            keys, tokw = self._pending_keys[0]
        else:
            keys, tokw = (torch.cat(t) for t in zip(*self._pending_keys))
        self._pending_keys.clear()
        self._n_pending = 0
        return keys, tokw

    # -- merging ---------------------------------------------------------------------------------------
    _COUNTS = ("rows", "n_updates", "samples", "tok_windows")

    def merge_(self, other: PositionStats) -> PositionStats:
        """Fold another run's statistics of the same position into this one (in place)."""
        if other.channels is None:
            return self
        other._flush()
        if self.channels is None:
            self._allocate(other.channels, other.seq_len, other.max_state.device)
        self._flush()
        dev = self.max_state.device
        self.max_state = torch.maximum(self.max_state, other.max_state.to(dev))
        self.sum_state = self.sum_state + other.sum_state.to(dev)
        for name in self._COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._merge_top(other.top_abs.to(dev), other.top_val.to(dev), other.top_window.to(dev),
                        other.top_token.to(dev), other.top_channel.to(dev))
        return self

    def all_reduce_(self, group=None) -> PositionStats:
        """Merge this position's statistics across the ranks of a torch.distributed group (every rank
        ends with the global result). Window indices stay rank-local; combine with the rank's offset."""
        import torch.distributed as dist

        self._flush()
        dist.all_reduce(self.sum_state, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self.max_state, op=dist.ReduceOp.MAX, group=group)
        counts = torch.tensor([getattr(self, n) for n in self._COUNTS], dtype=torch.float64,
                              device=self.sum_state.device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        for name, value in zip(self._COUNTS, counts.tolist()):
            setattr(self, name, value)
        world = dist.get_world_size(group)
        fields = ("top_abs", "top_val", "top_window", "top_token", "top_channel")
        gathered = {}
        for name in fields:
            t = getattr(self, name)
            out = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(out, t, group=group)
            gathered[name] = torch.cat(out)
        self.top_abs = torch.full_like(self.top_abs, EMPTY)
        self._merge_top(*(gathered[n] for n in fields))
        return self

    # -- results ---------------------------------------------------------------------------------------
    def finalize(self) -> dict[str, torch.Tensor | float]:
        """The results on the host (see :func:`finalize_all`); the state stays where it is."""
        return finalize_all([self])[0]


@functools.cache
def layout(channels: int, seq_len: int) -> dict[str, slice]:
    """Where each named statistic lies in the packed states: ``chan_absmax`` and ``tok_absmax`` in
    ``max_state``, the others in ``sum_state`` (the order the Triton kernels write them in)."""
    c0, c1 = channels + seq_len, 2 * channels + seq_len
    return {"chan_absmax": slice(0, channels), "tok_absmax": slice(channels, None),
            "chan_abssum": slice(0, channels), "tok_absmax_sum": slice(channels, c0),
            "chan_median_sum": slice(c0, c1), "hist": slice(c1, None)}


def merge_rows(abs_v, val, window, token, channel, *, channels: int, top_k: int) -> tuple[torch.Tensor, ...]:
    """Per row of ``[positions, candidates]`` tensors, the ``top_k`` best entries with one per (token, channel)
    key: its largest |x|. Unused slots have |x| = EMPTY and sort last.

    Deterministic whatever the order the candidates come in (batch sizes, ranks): equal |values| go to the
    smaller window, and equal scores of different keys to the smaller (token, channel)."""
    key_all = token * channels + channel
    order = window.argsort(dim=1, stable=True)
    order = order.gather(1, abs_v.gather(1, order).argsort(dim=1, descending=True, stable=True))
    order = order.gather(1, key_all.gather(1, order).argsort(dim=1, stable=True))  # by key, best first in each
    key = key_all.gather(1, order)
    dup = torch.zeros_like(key, dtype=torch.bool)
    dup[:, 1:] = key[:, 1:] == key[:, :-1]
    score = abs_v.gather(1, order)
    score = torch.where(dup | (score < 0), torch.full_like(score, EMPTY), score)
    sel = score.argsort(dim=1, descending=True, stable=True)[:, :top_k]
    keep = order.gather(1, sel)
    return (score.gather(1, sel), val.gather(1, keep), window.gather(1, keep), token.gather(1, keep),
            channel.gather(1, keep))


def zeroed_views(device: torch.device, *parts: tuple[int, torch.dtype]) -> list[torch.Tensor]:
    """Zeroed 1-D tensors of ``(numel, dtype)`` each, views of one allocation, each starting 64-byte aligned."""
    starts, at = [], 0
    for numel, dtype in parts:
        starts.append(at)
        at += -(-numel * dtype.itemsize // 64) * 64
    buf = torch.zeros(at, dtype=torch.uint8, device=device)
    return [buf[s:s + numel * dtype.itemsize].view(dtype) for s, (numel, dtype) in zip(starts, parts)]


def _padded(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    n = max(len(r) for r in rows)
    if all(len(r) == n for r in rows):
        return torch.stack(rows)
    out = torch.full((len(rows), n), fill, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def merge_pending(stats: list[PositionStats]) -> None:
    """Merge the pending candidates of many positions into their running top-k, the positions of one shape
    together (on their device: a few batched kernels, where one merge per position costs ~20 small ones)."""
    for overlap in {id(st.overlap): st.overlap for st in stats if st.overlap is not None}.values():
        overlap.join()  # the rings and states are read on the model's stream
    groups: dict[tuple, list[PositionStats]] = {}
    for st in stats:
        if st.channels is not None:
            groups.setdefault((st.channels, st.seq_len, st.config.top_k, st.max_state.device), []).append(st)
    for (channels, seq_len, top_k, _), members in groups.items():
        # the running top-k and every pending candidate, one row per position (padded with empty slots); the
        # device paths' keys are decoded for all positions together where they hold as many updates
        n_pos = len(members)
        top = [torch.stack(t) for t in zip(*(st._top() for st in members))]
        keyed = [st._take_keys() for st in members]
        if all(k is not None for k in keyed) and len({k[0].shape for k in keyed}) == 1:
            decoded = kernels.decode_keys(torch.cat([k for k, _ in keyed]), torch.cat([t for _, t in keyed]),
                                          channels, seq_len)
            top = [torch.cat([t, d.reshape(n_pos, -1).to(t.dtype)], 1) for t, d in zip(top, decoded)]
            keyed = [None] * n_pos
        if any(k is not None for k in keyed) or any(st._pending for st in members):
            rows = [[t[i] for t in top] for i in range(n_pos)]  # each position decodes its own keys
            for row, st, k in zip(rows, members, keyed):
                for block in st._blocks(k):
                    for j, t in enumerate(block):
                        row[j] = torch.cat([row[j], t.to(row[j].dtype)])
            fills = (EMPTY, 0.0, 0, 0, 0)
            top = [_padded([r[j] for r in rows], fills[j]) for j in range(5)]
        top = [t.unbind(0) for t in merge_rows(*top, channels=channels, top_k=top_k)]
        for i, st in enumerate(members):
            st._set_top(*(t[i] for t in top))


def finalize_all(stats: list[PositionStats]) -> list[dict[str, torch.Tensor | float]]:
    """The results of many positions on the host, computed together where the states live: the pending
    candidates are merged into each position's top-k (:func:`merge_pending`), every statistic is computed for
    all positions of one shape at once, and the results (not the states) come to the host in one copy per
    dtype. A profile of a 7B model has ~450 positions of a few shapes: one position at a time this took ~0.5 s
    of host time on the H200 machine, and moving the states first and computing on the host ~0.25 s.

    A position's result tensors are views of one host block per shape (no storage shared with a state)."""
    for st in stats:
        if st.channels is None:
            raise ValueError("no data was traced at this position")
    merge_pending(stats)
    groups: dict[tuple, list[int]] = {}
    for i, st in enumerate(stats):
        groups.setdefault((st.channels, st.seq_len, st.config, st.max_state.device), []).append(i)
    blocks: dict[torch.dtype, list[torch.Tensor]] = {torch.float32: [], torch.float64: [], torch.int64: []}
    widths: list[dict] = []  # per group: {dtype: {column: width}}
    for (channels, seq_len, c, dev), idx in groups.items():
        members = [stats[i] for i in idx]
        max_state = torch.stack([st.max_state for st in members])
        sum_state = torch.stack([st.sum_state for st in members])
        counts = _to_device([[float(st.rows), float(st.n_updates), float(st.tok_windows)] for st in members],
                            torch.float64, dev)
        at = layout(channels, seq_len)
        hist = sum_state[:, at["hist"]]
        cdf = hist[:, 1:].cumsum(1)  # bin 0 is the underflow bin: entries below 2 ** log2_min, i.e. zeros
        half_bin = torch.searchsorted(cdf, cdf[:, -1:] / 2)
        top = [torch.stack(t) for t in zip(*(st._top() for st in members))]
        chan_median = (sum_state[:, at["chan_median_sum"]] / counts[:, 1:2]).float()
        # named columns [positions, width] per dtype, one block each. float32: per-channel and per-token
        # statistics and the top values; float64: per-position scalars (sums of counts, exact); int64: where
        # the top entries are, how many, and the histogram's median bin
        columns = {
            torch.float32: {
                "chan_absmax": max_state[:, at["chan_absmax"]],
                "chan_mean": (sum_state[:, at["chan_abssum"]] / counts[:, :1]).float(),
                "chan_median": chan_median,
                "tok_absmax": max_state[:, at["tok_absmax"]],
                "tok_absmax_mean": (sum_state[:, at["tok_absmax_sum"]] / counts[:, 2:].clamp(min=1.0)).float(),
                "top_value": top[1]},
            torch.float64: {
                "absmax": max_state[:, at["chan_absmax"]].amax(1, keepdim=True).double(),
                "zero_fraction": hist[:, :1] / hist.sum(1, keepdim=True).clamp(min=1.0),
                "total": cdf[:, -1:],
                "chan_median_max": chan_median.amax(1, keepdim=True).double()},
            torch.int64: {
                "top_window": top[2], "top_token": top[3], "top_channel": top[4],
                "n_valid": (top[0] >= 0).sum(1, keepdim=True), "median_bin": 1 + half_bin}}
        for dtype, cols in columns.items():
            blocks[dtype].append(torch.cat(list(cols.values()), 1).reshape(-1))
        widths.append({dtype: {name: t.shape[1] for name, t in cols.items()} for dtype, cols in columns.items()})
    # the host blocks and every position's views of them are made before the copy that waits for the device:
    # on a GPU this host work (~6,000 views for a 7B profile) runs while the last forward ends
    host, fill = _host_views(blocks)
    out: list = [None] * len(stats)
    scalars: list[dict] = []  # per group: the per-position scalar columns, read once the copy is done
    for g, ((_, _, c, _), idx) in enumerate(groups.items()):
        n = len(idx)
        # every column of the group as per-position views (split/unbind: a few calls per group, not a dozen
        # per position: ~450 positions on a slow host)
        col: dict = {}
        for dtype, width in widths[g].items():
            for name, t in zip(width, host[dtype][g].view(n, -1).split(list(width.values()), 1)):
                col[name] = t[:, 0] if name in _SCALARS else t.unbind(0)
        scalars.append({name: col.pop(name) for name in _SCALARS})
        for i, j in enumerate(idx):
            st = stats[j]
            res = out[j] = dict.fromkeys(_RESULT)  # the scalars are filled in once the copy is done
            res["rows"], res["samples"] = float(st.rows), float(st.samples)
            for name, views in col.items():
                res[name] = views[i]
    fill()
    for g, ((_, _, c, _), idx) in enumerate(groups.items()):
        col = {name: t.tolist() for name, t in scalars[g].items()}
        for i, j in enumerate(idx):
            res = out[j]
            res["absmax"] = col["absmax"][i]
            res["median"] = (2.0 ** (c.log2_min + (col["median_bin"][i] + 0.5) / c.bins_per_octave)
                             if col["total"][i] > 0 else 0.0)
            res["zero_fraction"], res["chan_median_max"] = col["zero_fraction"][i], col["chan_median_max"][i]
            n_valid = col["n_valid"][i]  # the merged top-k is sorted by score: its used slots come first
            if n_valid != c.top_k:
                for name in ("top_value", "top_window", "top_token", "top_channel"):
                    res[name] = res[name][:n_valid]
    return out


def _to_device(rows: list, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """Host numbers as a tensor on ``dev`` without waiting for the device: a plain copy to a GPU waits for its
    stream, i.e. for every kernel queued before it (the last forward's, in a finalize); a pinned source copies
    asynchronously, so the host goes on with the finalize while the device finishes."""
    t = torch.tensor(rows, dtype=dtype)
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


#: finalize_all's per-position scalar columns (read as Python numbers; the others stay tensors)
_SCALARS = frozenset({"absmax", "zero_fraction", "total", "chan_median_max", "n_valid", "median_bin"})
#: a position's results, in order
_RESULT = ("rows", "samples", "absmax", "median", "zero_fraction", "chan_absmax", "chan_mean", "chan_median",
           "chan_median_max", "tok_absmax", "tok_absmax_mean", "top_value", "top_window", "top_token", "top_channel")


def _host_views(blocks: dict) -> tuple[dict, Callable[[], None]]:
    """Host tensors for ``blocks`` ({dtype: flat tensors, possibly on several devices}), made now and filled by
    the returned ``fill()``: one copy per (dtype, device). From a GPU the copy goes straight into pinned host
    blocks (torch's caching host allocator: the results of a 7B profile hold ~40 MB of it, back in the
    allocator's cache for the next profile once they are freed). Through a pinned stage into pageable blocks, as
    before, the moves out of the stage ran at ~1.3 GB/s in some profiles on the H200 machine (finalize_s 30-45 ms
    against 3-5 ms; bench/finalize_probe.py). CPU parts need no copy (each is a new tensor, no storage shared
    with a state)."""
    views: dict = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for dtype, parts in blocks.items():
        out: list = [None] * len(parts)
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(parts):
            by_device.setdefault(t.device, []).append(i)
        for dev, idx in by_device.items():
            flat = torch.cat([parts[i] for i in idx]) if len(idx) > 1 else parts[idx[0]]
            host = flat
            if dev.type != "cpu":
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=dev.type == "cuda")
                copies.append((flat, host))
            for i, h in zip(idx, host.split([parts[i].numel() for i in idx])):
                out[i] = h
        views[dtype] = out

    def fill() -> None:
        done = []
        for flat, host in copies:
            if flat.device.type != "cuda":
                host.copy_(flat)
                continue
            with torch.cuda.device(flat.device):
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                done.append(event)
        for event in done:  # the copies from several GPUs run at once
            event.synchronize()

    return views, fill
