"""The first traced forward of a profile against the ones after it: host and device time of each.

    python bench/first_forward.py --synthetic 7b --device cuda --batch-sizes 1,4

Per batch size: three bare forwards in inference mode and outside it (``no_grad``, as the overlap's watched
first forward runs the model), then four tracers, each installed for four forwards: the first forward watched
(tracing/overlap.py), unwatched, watched, watched. Each forward is printed as (host ms, total ms): the host time
to issue it, and the time until the device finished it. The first tracer's first forward includes the graph
captures and kernel compilation of the process; the others show what every profile pays.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from profile_overhead import synthetic_setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, model, _, _, sync = synthetic_setup(ap, batch_sizes="1,4", repeats=3)

    from outlierlab.adapters import get_adapter
    from outlierlab.runtime import installed
    from outlierlab.runtime.forward import call
    from outlierlab.tracing import ProfileConfig
    from outlierlab.tracing.profiler import Tracer

    def timed(fn) -> tuple[float, float]:
        sync()
        t = time.perf_counter()
        fn()
        host = time.perf_counter() - t
        sync()
        return host * 1e3, (time.perf_counter() - t) * 1e3

    for batch in (int(b) for b in args.batch_sizes.split(",")):
        print(f"=== batch {batch}")
        ids = torch.randint(0, model.config.vocab_size, (4 * batch, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
        forwards = [functools.partial(call, model, ids[s:s + batch], s, logits=False)
                    for s in range(0, len(ids), batch)]
        with torch.inference_mode():
            forwards[0](), forwards[0]()  # warm-up
        for _ in range(args.repeats):
            with torch.inference_mode():
                a = timed(forwards[0])
            with torch.inference_mode(False), torch.no_grad():
                b = timed(forwards[0])
            print(f"bare (host, total ms): inference {a[0]:.1f} {a[1]:.1f} | no_grad {b[0]:.1f} {b[1]:.1f}", flush=True)
        cfg = ProfileConfig(batch_size=batch, weights=False)
        for mode in ("watched", "unwatched", "watched", "watched"):
            tracer = Tracer(get_adapter(model), cfg)
            with installed(model, tracer), torch.inference_mode():
                first = timed(lambda t=tracer, m=mode, f=forwards[0]: t.watched(f) if m == "watched" else f())
                rest = [timed(f) for f in forwards[1:]]
                tracer.join()
            print(f"{mode}: first (host, total) {first[0]:.1f} {first[1]:.1f} | next "
                  + " ".join(f"{h:.1f}/{t:.1f}" for h, t in rest) + f" | {len(tracer.stats)} positions", flush=True)


if __name__ == "__main__":
    main()
