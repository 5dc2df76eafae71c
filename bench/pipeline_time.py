"""Wall time of every stage of ``outlierlab run`` (profile, explain, mitigate, compare, report) and the peak
accelerator memory, for one model on one device.

    python bench/pipeline_time.py --model synthetic:llama-7b --device cuda --dtype bfloat16 --quick
    python bench/pipeline_time.py --model synthetic:llama-13b --device cuda --dtype bfloat16 --quick \
        --memory-fraction-gib 15 --max-memory 0=12GiB,cpu=100GiB

Prints a line as each stage starts (elapsed time, the stages done so far: what a run killed by a time limit
leaves), one line per stage and a summary line at the end (JSON with ``--json``). The time before the first
stage is the model's build / load and the data. ``--stacks FILE`` samples the main thread's Python stack every
0.2 s and keeps FILE updated with the most frequent stacks (innermost last), so a run stopped by a time limit
still says where its time went.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch


def sample_stacks(path: str, every: float = 0.2, write_every: float = 5.0) -> None:
    """Start a daemon thread that counts the main thread's stacks and rewrites ``path`` with the top ones."""
    main_id = threading.main_thread().ident
    counts: collections.Counter = collections.Counter()  # whole stacks
    inclusive: collections.Counter = collections.Counter()  # outlierlab functions anywhere on the stack

    def sample() -> None:
        frame = sys._current_frames().get(main_id)
        stack = traceback.extract_stack(frame) if frame is not None else []
        keep = [f for f in stack if any(k in f.filename for k in ("outlierlab", "/torch/", "accelerate",
                                                                  "transformers", "safetensors"))]
        counts[" <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(keep[-10:]))] += 1
        inclusive.update({f"{Path(f.filename).name}:{f.name}" for f in stack if "outlierlab" in f.filename})

    def loop() -> None:
        last = time.monotonic()
        while True:
            time.sleep(every)
            sample()
            if time.monotonic() - last > write_every:
                last = time.monotonic()
                total = sum(counts.values())
                lines = [f"{total} samples every {every} s", "-- outlierlab functions, inclusive:"]
                lines += [f"{n:6d} {100 * n / total:5.1f}%  {s}" for s, n in inclusive.most_common(60)]
                lines += ["-- stacks (innermost first):"]
                lines += [f"{n:6d} {100 * n / total:5.1f}%  {s}" for s, n in counts.most_common(40)]
                Path(path).write_text("\n".join(lines) + "\n")

    threading.Thread(target=loop, daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="the --quick configuration of outlierlab run")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the timings here")
    ap.add_argument("--max-memory", default=None, help="accelerate placement budget, e.g. 0=12GiB,cpu=100GiB")
    ap.add_argument("--memory-fraction-gib", type=float, default=None,
                    help="cap this process's GPU allocations (torch.cuda.set_per_process_memory_fraction)")
    ap.add_argument("--stacks", default=None, help="sample the main thread's stacks into this file")
    args = ap.parse_args()
    if args.stacks:
        sample_stacks(args.stacks)

    from dataclasses import replace

    from rich.console import Console

    from outlierlab.pipeline import RunConfig, quick_config, run

    cfg = quick_config() if args.quick else RunConfig()
    cfg = replace(cfg, model=args.model, device=args.device, dtype=args.dtype, max_memory=args.max_memory)
    out = args.out or tempfile.mkdtemp(prefix="outlierlab-bench-")
    cuda = args.device.startswith("cuda")
    if cuda:
        if args.memory_fraction_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.memory_fraction_gib * 2**30 / total)
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()

    def started(stage: str, state: str) -> None:
        done = json.loads(Path(out, "stages.json").read_text()) if Path(out, "stages.json").is_file() else {}
        mem = f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
        print(f"[{time.perf_counter() - t0:7.1f} s] {stage} starts; done: "
              f"{ {k: v['seconds'] for k, v in done.items()} }{mem}", flush=True)

    result = run(cfg, out, console=Console(quiet=True), progress=False, on_stage=started)
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    for stage, seconds in result["stages"].items():
        print(f"{stage:10s} {seconds:8.1f} s")
    line = {"model": args.model, "device": args.device, "dtype": args.dtype, "quick": args.quick,
            "total_s": round(total, 1), "stages_s": {k: round(v, 1) for k, v in result["stages"].items()},
            "peak_gpu_gib": None if peak is None else round(peak, 2),
            "peak_host_rss_gib": round(host_peak, 2), "max_memory": args.max_memory,
            "memory_fraction_gib": args.memory_fraction_gib, "failed_cells": len(result["failed_cells"])}
    print(json.dumps(line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(line, f, indent=1)


if __name__ == "__main__":
    main()
