"""Where a profile's host time after its last forward goes (its ``finalize_s``), profile by profile.

    python bench/finalize_probe.py --synthetic 7b --device cuda --batch-sizes 4,1 --repeats 5 --interleave
    python bench/finalize_probe.py --synthetic tiny --device cpu --dtype float32 --seq-len 64 --n-samples 4

Each ``profile()`` runs as in profile_overhead.py, with checkpoints wrapped around its finalize (host clock, ms
from the finalize's start): the merge of the pending candidates done, the host blocks and views made (the copy to
the host begins), the device done with everything queued (a stream sync put before the copy, which waits for it
anyway; ``--no-sync`` leaves it out), the copy done, the finalize done. One line per profile with its own
``finalize_s`` and, on a GPU, ``dev_finalize``: the device time from the trace's end (the profile's clock) to the
copy's start, the finalize's own kernels (more where the device waited for the host). On a GPU also
``pinned_allocs`` and ``pinned_alloc``: the pinned blocks torch's caching host allocator created during the profile
and the ms that took (a profile's results live in pinned blocks; each profile is freed before the next, as in
profile_overhead.py). ``--interleave`` runs a bare and a full forward before each profile, as profile_overhead.py
does (``--chunks``, which timed each step of the staged copy that pinned results replaced, is in the history of
this file). The first profile per batch size (compiles, captures) is left out of the lines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from profile_overhead import synthetic_setup

STEPS = ("merged", "views", "device_done", "copied", "end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--interleave", action="store_true",
                    help="a bare and a full forward (logits at every position) before each profile, as "
                         "profile_overhead.py times them")
    ap.add_argument("--no-sync", action="store_true",
                    help="no stream sync before the copy (no device_done mark; the finalize as it runs)")
    args, model, info, device, sync = synthetic_setup(ap, batch_sizes="4,1", repeats=8)

    from outlierlab.runtime import run
    from outlierlab.tracing import ProfileConfig, profile, profiler, stats

    marks: dict[str, float] = {}
    clocks: list = []  # the profile's TraceClock and the event recorded where the copy begins
    real_stop = profiler.TraceClock.stop

    def stop(self):
        real_stop(self)
        clocks[:] = [self]

    real_finalize, real_merge, real_views = stats.finalize_all, stats.merge_pending, stats._host_views

    def finalize_all(sts):
        marks.clear()
        marks["start"] = time.perf_counter()
        out = real_finalize(sts)
        marks["end"] = time.perf_counter()
        return out

    def merge_pending(sts):
        real_merge(sts)
        marks["merged"] = time.perf_counter()

    def host_views(blocks):
        views, fill = real_views(blocks)
        gpu = any(t.is_cuda for parts in blocks.values() for t in parts)

        def timed_fill():
            marks["views"] = time.perf_counter()
            if gpu and not args.no_sync:
                begin = torch.cuda.Event(enable_timing=True)
                begin.record()
                clocks.append(begin)
                torch.cuda.synchronize()
            marks["device_done"] = time.perf_counter()
            fill()
            marks["copied"] = time.perf_counter()

        return views, timed_fill

    def host_allocs() -> tuple[float, float]:
        """Pinned blocks created so far by torch's caching host allocator, and the ms spent creating them."""
        if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
            return 0.0, 0.0
        st = torch.cuda.host_memory_stats()
        return float(st.get("num_host_alloc", 0)), st.get("host_alloc_time.total", 0) / 1e3

    profiler.finalize_all, stats.merge_pending, stats._host_views = finalize_all, merge_pending, host_views
    profiler.TraceClock.stop = stop
    ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    print(f"model {info['id']} | {args.n_samples} x {args.seq_len} tokens, {args.dtype} | {device} | "
          f"torch {torch.__version__}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cfg = ProfileConfig(batch_size=batch, weights=False)
        rows = []
        for rep in range(args.repeats + 1):
            if args.interleave:
                run(model, ids, batch, logits=False)
                sync()
                run(model, ids, batch)
            sync()
            pinned = host_allocs()
            t = time.perf_counter()
            prof = profile(model, ids, cfg)
            sync()
            wall = time.perf_counter() - t
            pinned = [b - a for a, b in zip(pinned, host_allocs())]
            timings = prof.timings
            del prof  # its pinned results back in the allocator's cache, as in profile_overhead.py
            if rep == 0:
                continue
            at = {k: (marks[k] - marks["start"]) * 1e3 for k in STEPS if k in marks}
            rows.append({"wall": wall * 1e3, "trace_s": timings["trace_s"] * 1e3,
                         "finalize_s": timings["finalize_s"] * 1e3, **at})
            if device.type == "cuda":
                rows[-1].update(pinned_allocs=pinned[0], pinned_alloc=pinned[1])
            if len(clocks) == 2 and clocks[0].events:
                end = next(iter(clocks[0].events.values()))[1]
                rows[-1]["dev_finalize"] = end.elapsed_time(clocks[1])
            print(f"batch {batch} profile {rep}: " + ", ".join(shown(k, v) for k, v in rows[-1].items()))
        print(f"batch {batch} median: " + ", ".join(shown(k, statistics.median(r[k] for r in rows)) for k in rows[0]))


def shown(key: str, value: float) -> str:
    """A column of the probe: the pinned allocator's counters as numbers (blocks, bytes), every other in ms."""
    return f"{key} {value:.0f}" if key.startswith("pinned") else f"{key} {value:.1f} ms"


if __name__ == "__main__":
    main()
