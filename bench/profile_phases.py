"""Where one profile's time goes: its phases, each ended by a device synchronization, against the bare forward.

    python bench/profile_phases.py --synthetic 7b --device cuda --batch-sizes 4,1     # bf16, 16 x 2048
    python bench/profile_phases.py --synthetic tiny --device cpu --dtype float32 --seq-len 64 --n-samples 4
    python bench/profile_phases.py --synthetic 7b --device cuda --batch-sizes 4 --repeats 2 --timeline

Per batch size and repeat: the bare forwards and a whole ``profile()`` (their ratio, as in profile_overhead.py),
then the same profile taken apart: installing the tracer, every traced forward, removing it, ``Tracer.results()``
(merge, finalize, copy to the host) and the detection (``build_profile``). The syncs between phases cost the
overlap of host and device work, so the phases sum to a little more than the whole profile. The first repeat
includes compilation and captures.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from profile_overhead import synthetic_setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--timeline", action="store_true",
                    help="then, per batch size, the device's time in one traced and one bare forward (CUDA): busy "
                         "in the model's kernels, in the statistics kernels, in copies, and idle")
    ap.add_argument("--results-ops", action="store_true",
                    help="then, per batch size, the ops of one Tracer.results() (torch.profiler, host and device "
                         "time per op; the profiler's own cost included)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="graphed statistics on the model's stream (StatsConfig.overlap=False)")
    args, model, info, device, sync = synthetic_setup(ap, batch_sizes="4,1", repeats=3)

    from outlierlab.adapters import get_adapter
    from outlierlab.runtime import installed, run
    from outlierlab.runtime.forward import call
    from outlierlab.tracing import ProfileConfig, StatsConfig, profile
    from outlierlab.tracing.profiler import Tracer, build_profile

    ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    print(f"model {info['id']} | {args.n_samples} x {args.seq_len} tokens, {args.dtype} | {device} | "
          f"torch {torch.__version__}{' | no overlap' if args.no_overlap else ''}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cfg = ProfileConfig(stats=StatsConfig(overlap=not args.no_overlap), batch_size=batch, weights=False)
        for rep in range(args.repeats):
            bare = timed(lambda b=batch: run(model, ids, b, logits=False))
            whole = timed(lambda c=cfg: profile(model, ids, c))
            tracer = Tracer(get_adapter(model), cfg)
            phases: dict[str, float] = {}
            forwards = []
            sync()
            t = time.perf_counter()
            with installed(model, tracer), torch.inference_mode():
                sync()
                phases["install"] = time.perf_counter() - t
                first = tracer.first_forward(model, len(ids), batch)  # the watch where profile() has it
                for s in range(0, len(ids), batch):
                    forward = functools.partial(call, model, ids[s:s + batch], s, logits=False)
                    forwards.append(timed(lambda f=forward, s=s, w=first: w(f) if s == 0 and w else f()))
                tracer.join()
                t = time.perf_counter()
            sync()
            phases["uninstall"] = time.perf_counter() - t
            raw: dict = {}
            if args.results_ops and rep == args.repeats - 1:
                phases["results (profiled)"] = timed(lambda r=raw, tr=tracer, b=batch: r.update(ops_table(tr.results, b)))
            else:
                phases["results"] = timed(lambda r=raw, tr=tracer: r.update(tr.results()))
            phases["detect"] = timed(lambda r=raw, tr=tracer, c=cfg: build_profile(
                tr.adapter, r, c, ids, None, None, {}, {}, {}))
            print(f"batch {batch} repeat {rep}: bare {bare:.3f} s, profile {whole:.3f} s ({whole / bare:.3f}x) | "
                  f"traced forwards {' '.join(f'{f * 1e3:.1f}' for f in forwards)} ms | "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()), flush=True)
        bare_each = []
        with torch.inference_mode():
            for s in range(0, len(ids), batch):
                bare_each.append(timed(lambda s=s, b=batch: call(model, ids[s:s + b], s, logits=False)))
        print(f"batch {batch}: bare forwards {' '.join(f'{f * 1e3:.1f}' for f in bare_each)} ms")
        if args.timeline and device.type == "cuda":
            tracer = Tracer(get_adapter(model), cfg)
            with installed(model, tracer), torch.inference_mode():
                # a first forward, not timed: the positions it sees may be deferred
                first = functools.partial(call, model, ids[:batch], 0, logits=False)
                tracer.watched(first) if tracer.overlap else first()
                on_traced = timeline(lambda b=batch, tr=tracer: (call(model, ids[:b], 0, logits=False), tr.join()))
            with torch.inference_mode():
                on_bare = timeline(lambda b=batch: call(model, ids[:b], 0, logits=False))
            print(f"batch {batch}: traced forward: {on_traced}\nbatch {batch}: bare forward:   {on_bare}")


def ops_table(fn, batch: int, rows: int = 20):
    """``fn()`` under torch.profiler; prints its ops with the most host time, and on a GPU those with the most
    device time, then returns what ``fn`` returned."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        out = fn()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages()
    print(f"batch {batch}: results() ops by host time\n{table.table(sort_by='self_cpu_time_total', row_limit=rows)}")
    if cuda:
        print(f"batch {batch}: results() ops by device time\n"
              f"{table.table(sort_by='self_device_time_total', row_limit=rows)}")
    return out


#: kernels of the statistics update (tracing/kernels.py), as the profiler names them
STATS_KERNELS = ("stats_pass", "candidates", "fetch")


def timeline(fn) -> str:
    """Where the device's time goes in one call of ``fn`` (torch.profiler, CUDA activity): the wall time from the
    first device activity to the last, split into the model's kernels, the statistics kernels, copies and
    idle (no activity; overlapping activities count once, in the order of that list)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans: dict[str, list[tuple[float, float]]] = {"model": [], "stats": [], "copies": []}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = ("copies" if "memcpy" in e.name.lower() or "memset" in e.name.lower()
                else "stats" if any(k in e.name for k in STATS_KERNELS) else "model")
        spans[kind].append((e.time_range.start, e.time_range.end))
    every = [s for v in spans.values() for s in v]
    if not every:
        return "no device activity recorded"
    t0, t1 = min(s for s, _ in every), max(e for _, e in every)
    covered: list[tuple[float, float]] = []
    parts = {}
    for kind, intervals in spans.items():  # time of this kind not already covered by an earlier kind
        new = _union(covered + intervals)
        parts[kind] = _length(new) - _length(_union(covered))
        covered = new
    parts["idle"] = (t1 - t0) - _length(covered)
    counts = {k: len(v) for k, v in spans.items()}
    return f"{(t1 - t0) / 1e3:.1f} ms: " + ", ".join(
        f"{k} {v / 1e3:.1f} ms" + (f" ({counts[k]})" if k in counts else "") for k, v in parts.items())


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


if __name__ == "__main__":
    main()
