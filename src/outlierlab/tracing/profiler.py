"""Operator-level profiling: run windows through the model with hooks on every adapter position and fold
each traced tensor into streaming :class:`PositionStats`, then detect MAs and COs and read weight statistics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..analysis.detect import DetectConfig, channel_outliers, massive_activations
from ..errors import NonFiniteActivation
from ..runtime import (
    ORDER,
    BatchInfo,
    Entry,
    frozen_gc,
    input_device,
    installed,
    run,
    window_ids,
)
from .distributed import rank_world, shard
from .hooks import attach_positions
from .overlap import Overlap
from .result import PositionResult, Profile
from .stats import PositionStats, StatsConfig, finalize_all, median_error, merge_pending
from .weights import weight_stats


@dataclass(frozen=True)
class ProfileConfig:
    """What to trace and how: statistics knobs, outlier rules, batch size, an optional subset."""

    stats: StatsConfig = field(default_factory=StatsConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    batch_size: int = 1
    layers: tuple[int, ...] | None = None
    positions: tuple[str, ...] | None = None
    weights: bool = True


#: GPU profiles smaller than this (tokens x hidden size x layers: about 1/20 of the elements they trace) run the
#: eager statistics where ``StatsConfig.compile`` is "auto": the Triton kernels compile on a machine's first GPU
#: profile, which costs more than eager updates over so few tokens. Default model on the H200 machine (session
#: 21, bench/RESULTS.md): a first 2 x 128 profile traced in 25.9 s with the kernels, 1.4 s eager (CPU 1.2 s); in
#: the steady state eager costs +0.18 s over the kernels at 4 x 128 and +0.86 s at 16 x 512 (1.4e8), where a
#: first profile's compile took 13 s. At 1e8 eager costs the default model ~0.6 s over the kernels; the line
#: holds up to 11 windows of 512 tokens of the default model, 762 tokens of a 7B model
EAGER_BELOW = 10 ** 8


def stats_for(stats: StatsConfig, device: torch.device, tokens: int, hidden: int, layers: int) -> StatsConfig:
    """``stats`` with "auto" resolved for a profile of ``tokens`` tokens on ``device`` of a model of ``layers``
    layers of width ``hidden``: eager ("never") for a small GPU profile (see :data:`EAGER_BELOW`), else as given."""
    if stats.compile == "auto" and device.type == "cuda" and tokens * hidden * layers < EAGER_BELOW:
        return replace(stats, compile="never")
    return stats


class Tracer(Entry):
    """Owns the per-position statistics of one profiling run; installed on a model (registry entry
    ``trace``, after every other entry, so it sees what the model computes now), its hooks feed it,
    :meth:`results` reads it.

    Separate from the loop that drives the model so that other drivers (layer-by-layer execution, several
    ranks) can feed the same statistics.
    """

    name = "trace"
    order = ORDER["trace"]

    def __init__(self, adapter: Adapter, config: ProfileConfig):
        self.adapter = adapter
        self.config = config
        self.stats: dict[tuple[int, str], PositionStats] = {}
        self.batch = BatchInfo()
        self.overlap = Overlap() if config.stats.overlap else None
        self._only: set | None = None  # while the first batch is traced again: the only positions traced

    def __call__(self, layer: int, name: str, x: torch.Tensor) -> None:
        if self.overlap is not None and self.overlap.watching_now and not torch.is_inference_mode_enabled():
            # the watch takes the model's tensors out of inference mode for their version counters; the
            # statistics' own (states, views, scratch) are made as in any other forward (ops on normal tensors
            # cost more, e.g. in the finalize)
            with torch.inference_mode():
                return self._trace(layer, name, x)
        self._trace(layer, name, x)

    def _trace(self, layer: int, name: str, x: torch.Tensor) -> None:
        if name in self.adapter.flat_positions:
            x = self.batch.as_3d(x)
        if name == "attn.in" and self.adapter.residual_chain and (layer - 1, "block.out") in self.stats:
            return  # the very tensor traced as block.out of the previous layer: not traced twice
        key = (layer, name)
        if self._only is not None and key not in self._only:
            return
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = PositionStats(self.config.stats)
            st.overlap, st.key = self.overlap, key
        elif st.due():  # every position has merge_every updates pending: merge them all at once
            merge_pending(list(self.stats.values()))
        st.update(x, self.batch.window0)

    def attach(self, model: nn.Module, hooks, reg) -> None:
        self.batch = reg.batch
        attach_positions(hooks, self.adapter, self, self.config.layers, self.config.positions)

    def describe(self) -> dict:
        return {"name": self.name, "positions": len(self.stats)}

    def first_forward(self, model: nn.Module, n_windows: int, batch_size: int):
        """How the first forward of ``n_windows`` windows of ``model`` in batches of ``batch_size`` runs
        (``run(first_batch=...)``): under the overlap's watch (tracing/overlap.py) where the overlap pays, i.e.
        on a GPU and for at least ``Overlap.MIN_FORWARDS`` forwards; else None (every update on the model's
        stream)."""
        if (self.overlap is None or input_device(model).type != "cuda"
                or -(-n_windows // batch_size) < self.overlap.MIN_FORWARDS):
            return None
        return self.watched

    def watched(self, forward: Callable[[], object]):
        """``forward()`` (the first batch's) under the overlap's watch; returns its output. The positions the
        model wrote in place while their statistics were deferred (tainted) start afresh and are traced again by
        a second ``forward()`` that traces them alone, on the model's stream."""
        with self.overlap.watching():
            out = forward()
        tainted = self.overlap.take_tainted()
        if tainted:
            for key in tainted:
                del self.stats[key]
            self._only = tainted
            try:
                forward()
            finally:
                self._only = None
        return out

    def join(self) -> None:
        """The statistics issued so far are on the model's streams (they are waited for there)."""
        if self.overlap is not None:
            self.overlap.join()

    def all_reduce_(self, group=None) -> None:
        """Merge statistics across torch.distributed ranks (call on every rank, same positions)."""
        merge_pending(list(self.stats.values()))
        for key in sorted(self.stats):
            self.stats[key].all_reduce_(group)

    def results(self) -> dict[tuple[int, str], dict]:
        keys = sorted(self.stats)
        out = {}
        for (layer, name), res in zip(keys, finalize_all([self.stats[k] for k in keys])):
            if not math.isfinite(res["absmax"]):
                raise NonFiniteActivation(
                    f"NaN/inf in activations at layer {layer} position {name}; try --dtype float32"
                )
            out[(layer, name)] = res
        return out


class TraceClock:
    """The seconds a profile's tracing took, without a host sync at its end: on the GPUs the model uses, CUDA
    events read once the results are on the host (the device time from the start to the last statistics
    kernel); on a CPU the wall time."""

    def __init__(self, model: nn.Module):
        devices = {p.device for p in model.parameters()} | {input_device(model)}
        self.events = {d: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                       for d in devices if d.type == "cuda"}
        self.t0 = time.perf_counter()
        self.host_s = 0.0
        for d, (start, _) in self.events.items():
            start.record(torch.cuda.current_stream(d))

    def stop(self) -> None:
        self.host_s = time.perf_counter() - self.t0
        for d, (_, end) in self.events.items():
            end.record(torch.cuda.current_stream(d))

    def seconds(self) -> float:
        """Waits for the devices (after the results came to the host, they are done)."""
        if not self.events:
            return self.host_s
        for _, end in self.events.values():
            end.synchronize()
        return max(start.elapsed_time(end) for start, end in self.events.values()) / 1e3


def profile(model: nn.Module, windows, config: ProfileConfig | None = None, tokenizer=None,
            progress: bool = False, model_info: dict | None = None, distributed: bool = False,
            group=None) -> Profile:
    """Trace ``windows`` through ``model`` and return a :class:`Profile` (statistics, MAs, COs, weights).

    The model is only read: hooks are removed on every exit path and no weight is touched. With
    ``distributed``, call it on every rank of ``group`` (torch.distributed initialized) with the same
    windows: each rank traces its contiguous shard, and every rank returns the merged profile of all windows.
    """
    config = config or ProfileConfig()
    adapter = get_adapter(model)
    ids = window_ids(windows)
    rank, world = rank_world(group) if distributed else (0, 1)
    lo, hi = shard(len(ids), rank, world)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden:
        config = replace(config, stats=stats_for(config.stats, input_device(model), ids.numel(), hidden,
                                                 adapter.n_layers))  # every rank decides alike
    with frozen_gc():  # the collector walks only what the profile creates
        tracer = Tracer(adapter, config)
        clock = TraceClock(model)
        with installed(model, tracer):
            run(model, ids[lo:hi], config.batch_size, progress=progress and rank == 0, description="profiling",
                first_window=lo, logits=False,
                first_batch=tracer.first_forward(model, hi - lo, config.batch_size))
            tracer.join()
        if world > 1:
            tracer.all_reduce_(group)
        clock.stop()
        raw = tracer.results()  # no sync before: on a GPU its host work runs while the device ends the forwards
        t_trace = clock.seconds()
        t_final = time.perf_counter() - clock.t0 - t_trace
        t2 = time.perf_counter()
        weights = weight_stats(adapter) if config.weights else None
        t_weights = time.perf_counter() - t2
        data_info = getattr(windows, "describe", dict)()
        if world > 1:
            data_info = {**data_info, "ranks": world}  # windows traced in `ranks` contiguous shards, merged
        timings = {"trace_s": t_trace, "finalize_s": t_final, "weights_s": t_weights}
        t3 = time.perf_counter()
        prof = build_profile(adapter, raw, config, ids, tokenizer, weights, model_info or {}, data_info, timings)
        timings["detect_s"] = time.perf_counter() - t3
        return prof


def _token_text(tokenizer, ids: torch.Tensor, window: int, token: int) -> str | None:
    if tokenizer is None or window >= len(ids):
        return None
    return tokenizer.decode([int(ids[window, token])])


def build_profile(adapter: Adapter, raw: dict, config: ProfileConfig, ids: torch.Tensor, tokenizer,
                  weights, model_info: dict, data_info: dict, timings: dict) -> Profile:
    """Apply the detection rules to finalized statistics and assemble the :class:`Profile`."""
    positions = adapter.positions()
    aliases = {p.name: p.alias for p in positions}
    same_as = {p.name: p.same_as for p in positions if p.same_as}
    results: dict[tuple[int, str], PositionResult] = {}
    mas, cos = [], []
    layers = sorted({layer for layer, _ in raw})
    for layer in layers:
        for p in positions:
            src = same_as.get(p.name, p.name)
            stats = raw.get((layer, src))
            shared = p.same_as
            if stats is None and src == "attn.in" and adapter.residual_chain:
                stats, shared = raw.get((layer - 1, "block.out")), f"L{layer - 1}.block.out"
            if stats is None:
                continue
            found_ma = massive_activations(stats, config.detect)
            found_co = channel_outliers(stats, config.detect)
            results[(layer, p.name)] = PositionResult(layer, p.name, p.alias, stats, found_ma, found_co, shared)
            for m in found_ma:
                mas.append({"layer": layer, "position": p.name, "alias": aliases[p.name],
                            "token_index": m["token_index"],
                            "token": _token_text(tokenizer, ids, m["window"], m["token_index"]),
                            "channel": m["channel"], "value": m["value"], "window": m["window"]})
            for c in found_co:
                cos.append({"layer": layer, "position": p.name, "alias": aliases[p.name], **c})
    min_samples = min(r["samples"] for r in raw.values())
    value_err, rank_err = median_error(config.stats, min_samples)
    return Profile(
        model_info=model_info, data_info=data_info, config=config, adapter=adapter.describe(),
        results=results, massive_activations=mas, channel_outliers=cos, weights=weights, timings=timings,
        median_error={"value_rel": value_err, "rank_95": rank_err, "min_samples": min_samples},
    )
