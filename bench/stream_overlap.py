"""Would the statistics kernels hide behind the model's if graph replays ran on a second CUDA stream?

    python bench/stream_overlap.py --synthetic 7b --batch-sizes 4,1

Per batch size: the bare forward, the traced forward as the tracer runs it, the traced forward with every graphed
update replayed on a side stream (it waits for the main stream at each hook; the traced tensor is marked used there
by ``record_stream``; merges and the end of the forward wait for the side stream), and the same with the replays
issued in groups of ``--group`` (no ``record_stream``: the tensors are held until the main stream has waited for
their group), the medians of ``--repeats`` forwards each. Then, for one traced forward, the kernels by name that
the bare forward does not launch (count, device time).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from profile_overhead import synthetic_setup
from stats_update import device_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=14, help="updates per group in the grouped mode (about a "
                    "7B layer's traced tensors)")
    args, model, info, device, sync = synthetic_setup(ap, batch_sizes="4,1", repeats=6)

    from outlierlab.adapters import get_adapter
    from outlierlab.runtime import installed
    from outlierlab.runtime.forward import call
    from outlierlab.tracing import ProfileConfig, kernels, profiler
    from outlierlab.tracing.profiler import Tracer

    ids = torch.randint(0, model.config.vocab_size, (16, args.seq_len), generator=torch.Generator().manual_seed(0))
    side = torch.cuda.Stream(device)
    replay, merge = kernels.GraphedUpdate.replay, profiler.merge_pending

    def side_replay(self, x, *rest):
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            replay(self, x, *rest)
        x.record_stream(side)

    # "grouped": the replays of --group updates are issued together on the side stream after one wait for the
    # main stream; the main stream waits for the side stream at the next group, and only then are the previous
    # group's tensors let go (no record_stream, two stream waits per group instead of one per update)
    queued: list = []
    held: list = []

    def grouped_replay(self, x, *rest):
        queued.append((self, x, rest))
        if len(queued) >= args.group:
            flush_group()

    def flush_group():
        main = torch.cuda.current_stream(device)
        main.wait_stream(side)  # the previous group's reads come before anything main does from here on
        held.clear()
        if queued:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for graph, x, rest in queued:
                    replay(graph, x, *rest)
            held.extend(x for _, x, _ in queued)
            queued.clear()

    def side_merge(stats):
        flush_group()
        torch.cuda.current_stream(device).wait_stream(side)
        return merge(stats)

    @contextlib.contextmanager
    def on_side(mode: str):
        kernels.GraphedUpdate.replay = side_replay if mode == "side" else grouped_replay
        profiler.merge_pending = side_merge
        try:
            yield
        finally:
            kernels.GraphedUpdate.replay, profiler.merge_pending = replay, merge

    def forwards(batch: int, n: int) -> list[float]:
        out = []
        with torch.inference_mode():
            for i in range(n):
                s = (i * batch) % len(ids)
                sync()
                t = time.perf_counter()
                call(model, ids[s:s + batch], s, logits=False)
                flush_group()  # a no-op but in the grouped mode: the forward's last group, then its wait
                torch.cuda.current_stream(device).wait_stream(side)
                sync()
                out.append(time.perf_counter() - t)
        return out

    print(f"model {info['id']} | {args.seq_len} tokens per window, {args.dtype} | torch {torch.__version__}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cfg = ProfileConfig(batch_size=batch, weights=False)
        rows = {}
        for rep in range(2):  # the first round warms up (compilation, captures)
            for mode in ("bare", "traced", "side", "grouped"):
                if mode == "bare":
                    ts = forwards(batch, args.repeats)
                else:
                    with installed(model, Tracer(get_adapter(model), cfg)), (
                            on_side(mode) if mode in ("side", "grouped") else contextlib.nullcontext()):
                        ts = forwards(batch, args.repeats)
                rows[mode] = ts
        bare = statistics.median(rows["bare"])
        for mode, ts in rows.items():
            m = statistics.median(ts)
            print(f"batch {batch}: {mode:6s} forward median {m * 1e3:7.1f} ms ({m / bare:.3f}x)  runs "
                  f"{' '.join(f'{t * 1e3:.1f}' for t in ts)}", flush=True)
        print(f"batch {batch}: new kernels in a traced forward (count, device ms):")
        with installed(model, Tracer(get_adapter(model), cfg)):
            forwards(batch, 1)
            traced = device_times(lambda b=batch: forwards(b, 1), 1)  # {name: (device us, launches)}
        bare_k = device_times(lambda b=batch: forwards(b, 1), 1)
        extra = {k: (round(n - bare_k.get(k, (0, 0))[1]), (us - bare_k.get(k, (0, 0))[0]) / 1e3)
                 for k, (us, n) in traced.items()}
        for k, (n, t) in sorted(extra.items(), key=lambda kv: -kv[1][0])[:12]:
            if n:
                print(f"  {n:6d} {t:8.2f}  {k[:110]}")


if __name__ == "__main__":
    main()
