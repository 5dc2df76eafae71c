"""Could the whole traced forward be one CUDA graph, and what would it save? A feasibility bench for the next
step of GPU tracing (nothing in the library captures whole forwards yet).

    python bench/forward_graph.py --synthetic 7b --batch-sizes 1,4       # a GPU: bf16, 2048 tokens per window
    python bench/forward_graph.py --synthetic tiny --device cpu --dtype float32 --seq-len 64   # eager rows only

Per forward of one batch (median of ``--repeats`` after a warm-up), the forward a profile runs (no logits):

- ``bare eager``: the model alone;
- ``bare graphed``: the same forward captured once as a CUDA graph on a static ids buffer and replayed;
- ``traced eager``: with the profiler's tracer installed, its statistics kernels launched directly
  (``compile="triton"``, the launches a whole-forward graph would hold);
- ``traced graphed``: that forward, hooks and kernels, captured once and replayed.

The traced graph is a bound, not a profile: its statistics are not read (no merge runs: ``merge_every`` is set
above the number of forwards), and a replay repeats the captured window offset. A capture that fails prints its
exception (a host read inside the model or the tracer) instead of a time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from profile_overhead import synthetic_setup


def _timed(fn, repeats: int, sync) -> float:
    """Median seconds of one call of ``fn`` over ``repeats`` calls (after two warm-up calls)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _captured(fn, device: torch.device):
    """``fn`` captured as a CUDA graph after a warm-up on a side stream; returns the graph's replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    args, model, info, device, sync = synthetic_setup(
        argparse.ArgumentParser(description=__doc__.splitlines()[0]), batch_sizes="1,4", repeats=10)

    from outlierlab.adapters import get_adapter
    from outlierlab.runtime import installed
    from outlierlab.runtime.forward import call
    from outlierlab.tracing import ProfileConfig, StatsConfig
    from outlierlab.tracing.profiler import Tracer

    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else str(device)
    print(f"model {info['id']} | {args.seq_len} tokens per window, {args.dtype} | {where} | torch {torch.__version__}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, model.config.vocab_size, (batch, args.seq_len), generator=gen).to(device)
        forward = lambda ids=ids: call(model, ids, 0, logits=False)
        # no merge inside the measured forwards: a merge reads the pending candidates back on the host
        stats = StatsConfig(compile="triton" if cuda else "auto", merge_every=10 ** 9)
        rows: dict[str, float | str] = {}
        with torch.inference_mode():
            rows["bare eager"] = _timed(forward, args.repeats, sync)
            if cuda:
                try:
                    rows["bare graphed"] = _timed(_captured(forward, device), args.repeats, sync)
                except Exception as exc:  # noqa: BLE001 - the point is to see what stops a capture
                    rows["bare graphed"] = f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
            tracer = Tracer(get_adapter(model), ProfileConfig(stats=stats, batch_size=batch, weights=False))
            with installed(model, tracer):
                rows["traced eager"] = _timed(forward, args.repeats, sync)
                if cuda:
                    try:
                        rows["traced graphed"] = _timed(_captured(forward, device), args.repeats, sync)
                    except Exception as exc:  # noqa: BLE001
                        rows["traced graphed"] = f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
        base = rows["bare eager"]
        for name, value in rows.items():
            if isinstance(value, float):
                print(f"batch {batch}: {name:15s} {value * 1e3:9.2f} ms per forward   {value / base:6.3f}x bare eager")
            else:
                print(f"batch {batch}: {name:15s} {value}")


if __name__ == "__main__":
    main()
