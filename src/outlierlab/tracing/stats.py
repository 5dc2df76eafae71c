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

import math
from dataclasses import dataclass

import torch

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
    #: fuse the full-tensor reductions with torch.compile: "auto" (on CUDA only), "always" or "never"
    compile: str = "auto"

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


def _full_reductions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel max |x| and sum |x| (fp32) and per-row max |x| of a [rows, channels] tensor: the only
    passes over the whole tensor. Compiled, they become two fused kernels that read ``x`` once each."""
    a = x.abs().float()
    return a.amax(0), a.sum(0), a.amax(1)


_COMPILED: dict[str, object] = {}


def full_reductions(x: torch.Tensor, mode: str):
    if mode == "never" or (mode == "auto" and x.device.type != "cuda"):
        return _full_reductions(x)
    fn = _COMPILED.get("fn")
    if fn is None:
        fn = _COMPILED["fn"] = torch.compile(_full_reductions, dynamic=True, fullgraph=True)
    return fn(x)


def median_error(config: StatsConfig, samples: float, confidence: float = 0.95) -> tuple[float, float]:
    """(relative value error, rank error at ``confidence``) of the histogram median from ``samples`` draws.

    The value error is half a histogram bin; the rank error is the Dvoretzky-Kiefer-Wolfowitz bound
    ``sqrt(ln(2 / (1 - confidence)) / (2 n))`` on the sample's empirical distribution.
    """
    value_err = 2.0 ** (0.5 / config.bins_per_octave) - 1.0
    rank_err = math.sqrt(math.log(2.0 / (1.0 - confidence)) / (2.0 * max(samples, 1.0)))
    return value_err, rank_err


class PositionStats:
    """Running statistics of one (layer, position). Buffers are allocated at the first update."""

    def __init__(self, config: StatsConfig):
        self.config = config
        self.channels: int | None = None
        self.seq_len: int | None = None

    # -- streaming -------------------------------------------------------------------------------------
    def _allocate(self, channels: int, seq_len: int, device: torch.device) -> None:
        c = self.config
        f32 = dict(device=device, dtype=torch.float32)
        self.channels, self.seq_len = channels, seq_len
        self.rows = torch.zeros((), device=device, dtype=torch.float64)
        self.n_updates = torch.zeros((), device=device, dtype=torch.float64)
        self.samples = torch.zeros((), device=device, dtype=torch.float64)
        self.chan_absmax = torch.zeros(channels, **f32)
        self.chan_abssum = torch.zeros(channels, device=device, dtype=torch.float64)
        self.chan_median_sum = torch.zeros(channels, **f32)
        self.tok_absmax = torch.zeros(seq_len, **f32)
        self.tok_absmax_sum = torch.zeros(seq_len, device=device, dtype=torch.float64)
        self.tok_windows = torch.zeros((), device=device, dtype=torch.float64)
        self.hist = torch.zeros(c.n_bins, device=device, dtype=torch.float32)
        self.top_abs = torch.full((c.top_k,), EMPTY, **f32)
        self.top_val = torch.zeros(c.top_k, **f32)
        self.top_window = torch.zeros(c.top_k, device=device, dtype=torch.long)
        self.top_token = torch.zeros(c.top_k, device=device, dtype=torch.long)
        self.top_channel = torch.zeros(c.top_k, device=device, dtype=torch.long)
        self._pending: list[tuple[torch.Tensor, ...]] = []

    def update(self, x: torch.Tensor, window0: int = 0) -> None:
        """Fold in a tensor shaped ``[batch, tokens, *channel_dims]`` whose batch row b is window ``window0 + b``."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.update(x, window0)
        if x.dim() < 2:
            return
        if x.dim() == 2:  # [tokens, channels] without batch
            x = x.unsqueeze(0)
        batch, seq_len = x.shape[0], x.shape[1]
        x = x.reshape(batch * seq_len, -1)
        if self.channels is None:
            self._allocate(x.shape[1], seq_len, x.device)
        elif x.shape[1] != self.channels or seq_len > self.seq_len:
            raise ValueError(
                f"tensor shape changed between updates: {self.channels} channels x {self.seq_len} tokens, "
                f"now {x.shape[1]} x {seq_len}"
            )
        c = self.config
        rows, channels = x.shape
        self.rows += rows
        self.n_updates += 1

        chan_max, chan_sum, row_max = full_reductions(x, c.compile)
        torch.maximum(self.chan_absmax, chan_max, out=self.chan_absmax)
        self.chan_abssum += chan_sum  # fp32 within one update, fp64 across updates

        tok = row_max.view(batch, seq_len)
        if batch > 1:
            torch.maximum(self.tok_absmax[:seq_len], tok.amax(0), out=self.tok_absmax[:seq_len])
        else:
            torch.maximum(self.tok_absmax[:seq_len], tok[0], out=self.tok_absmax[:seq_len])
        self.tok_absmax_sum[:seq_len] += tok.sum(0)
        self.tok_windows += batch

        # channel medians over a fixed random subset of rows (kthvalue = torch.median's lower median)
        k_rows = min(c.channel_median_rows, rows)
        sub = x.index_select(0, _fixed_sample(rows, k_rows, c.seed, x.device)).abs().float()
        self.chan_median_sum += sub.kthvalue((k_rows + 1) // 2, 0).values

        # tensor-median histogram over a fixed random sample of elements
        n = rows * channels
        k = min(c.median_samples, n)
        sample = x.reshape(-1).index_select(0, _fixed_sample(n, k, c.seed + 1, x.device)).abs().float()
        logs = sample.clamp_(min=2.0 ** c.log2_min, max=2.0 ** c.log2_max * 0.999).log2_()
        self.hist += torch.histc(logs, bins=c.n_bins, min=c.log2_min, max=c.log2_max)
        self.samples += k

        # Exact top-k distinct (token, channel) keys of this update. A key occurs at most `batch` times, so the
        # k * batch largest elements hold the k best keys, and they lie in the k * batch rows with the largest
        # max. Candidates are buffered and merged into the running top-k every ``merge_every`` updates.
        kk = min(c.top_k * batch, rows)
        top_rows = row_max.topk(kk, sorted=False).indices
        cand = x.index_select(0, top_rows).float()
        vals, flat = cand.abs().view(-1).topk(min(kk, kk * channels), sorted=False)
        r = top_rows[flat // channels]
        ch = flat % channels
        self._pending.append((vals, cand.view(-1)[flat], r + window0 * seq_len, ch))
        if len(self._pending) >= c.merge_every:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        vals, signed, grow, ch = (torch.cat(t) for t in zip(*self._pending))
        self._pending.clear()
        self._merge_top(vals, signed, grow // self.seq_len, grow % self.seq_len, ch)

    def _merge_top(self, abs_v, val, window, token, channel) -> None:
        """Merge candidates into the running top-k, keeping one entry per (token, channel): the largest."""
        abs_v = torch.cat([self.top_abs, abs_v])
        val = torch.cat([self.top_val, val])
        window = torch.cat([self.top_window, window.to(self.top_window.dtype)])
        token = torch.cat([self.top_token, token])
        channel = torch.cat([self.top_channel, channel])
        key_all = token * self.channels + channel
        order = abs_v.argsort(descending=True, stable=True)
        order = order[key_all[order].argsort(stable=True)]  # grouped by key, largest first in each group
        key = key_all[order]
        dup = torch.zeros_like(key, dtype=torch.bool)
        dup[1:] = key[1:] == key[:-1]
        score = abs_v[order]
        score = torch.where(dup | (score < 0), torch.full_like(score, EMPTY), score)
        sel = score.topk(self.config.top_k)
        keep = order[sel.indices]
        self.top_abs = sel.values
        self.top_val = val[keep]
        self.top_window = window[keep]
        self.top_token = token[keep]
        self.top_channel = channel[keep]

    # -- merging ---------------------------------------------------------------------------------------
    _SUMS = ("rows", "n_updates", "samples", "chan_abssum", "chan_median_sum", "tok_absmax_sum", "tok_windows",
             "hist")
    _MAXES = ("chan_absmax", "tok_absmax")

    def merge_(self, other: "PositionStats") -> "PositionStats":
        """Fold another run's statistics of the same position into this one (in place)."""
        if other.channels is None:
            return self
        other._flush()
        self._flush()
        if self.channels is None:
            self._allocate(other.channels, other.seq_len, other.chan_absmax.device)
        for name in self._SUMS:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        for name in self._MAXES:
            torch.maximum(getattr(self, name), getattr(other, name).to(getattr(self, name).device),
                          out=getattr(self, name))
        dev = self.top_abs.device
        self._merge_top(other.top_abs.to(dev), other.top_val.to(dev), other.top_window.to(dev),
                        other.top_token.to(dev), other.top_channel.to(dev))
        return self

    def all_reduce_(self, group=None) -> "PositionStats":
        """Merge this position's statistics across the ranks of a torch.distributed group (every rank
        ends with the global result). Window indices stay rank-local; combine with the rank's offset."""
        import torch.distributed as dist

        self._flush()
        for name in self._SUMS:
            dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM, group=group)
        for name in self._MAXES:
            dist.all_reduce(getattr(self, name), op=dist.ReduceOp.MAX, group=group)
        world = dist.get_world_size(group)
        fields = ("top_abs", "top_val", "top_window", "top_token", "top_channel")
        gathered = {}
        for name in fields:
            t = getattr(self, name)
            out = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(out, t, group=group)
            gathered[name] = torch.cat(out)
        self.top_abs.fill_(EMPTY)
        self._merge_top(*(gathered[n] for n in fields))
        return self

    # -- results ---------------------------------------------------------------------------------------
    def finalize(self) -> dict[str, torch.Tensor | float]:
        """Copy the results to the host (one synchronisation per position, at the end)."""
        if self.channels is None:
            raise ValueError("no data was traced at this position")
        self._flush()
        c = self.config
        rows = float(self.rows)
        hist = self.hist.cpu().double()
        zeros = float(hist[0])  # the underflow bin: entries below 2 ** log2_min, i.e. (numerically) zero
        nonzero = hist[1:]
        median = 0.0
        if float(nonzero.sum()) > 0:
            cdf = nonzero.cumsum(0)
            bin_idx = 1 + int(torch.searchsorted(cdf, cdf[-1] / 2))
            median = 2.0 ** (c.log2_min + (bin_idx + 0.5) / c.bins_per_octave)
        valid = self.top_abs.cpu() >= 0
        return {
            "rows": rows,
            "samples": float(self.samples),
            "absmax": float(self.chan_absmax.max()),
            "median": median,
            "zero_fraction": zeros / max(float(hist.sum()), 1.0),
            "chan_absmax": self.chan_absmax.cpu(),
            "chan_mean": (self.chan_abssum / rows).float().cpu(),
            "chan_median": (self.chan_median_sum / self.n_updates).float().cpu(),
            "tok_absmax": self.tok_absmax.cpu(),
            "tok_absmax_mean": (self.tok_absmax_sum / self.tok_windows.clamp_min(1)).float().cpu(),
            "top_value": self.top_val.cpu()[valid],
            "top_window": self.top_window.cpu()[valid],
            "top_token": self.top_token.cpu()[valid],
            "top_channel": self.top_channel.cpu()[valid],
        }
