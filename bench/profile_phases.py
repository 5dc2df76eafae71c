"""Where one profile's time goes: its phases, each ended by a device synchronization, against the bare forward.

    python bench/profile_phases.py --synthetic 7b --device cuda --batch-sizes 4,1     # bf16, 16 x 2048
    python bench/profile_phases.py --synthetic tiny --device cpu --dtype float32 --seq-len 64 --n-samples 4

Per batch size and repeat: the bare forwards and a whole ``profile()`` (their ratio, as in profile_overhead.py),
then the same profile taken apart: installing the tracer, every traced forward, removing it, ``Tracer.results()``
(merge, finalize, copy to the host) and the detection (``build_profile``). The syncs between phases cost the
overlap of host and device work, so the phases sum to a little more than the whole profile. The first repeat
includes compilation and captures.
"""

from __future__ import annotations

import argparse
import time

import torch
from profile_overhead import synthetic_setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=16)
    args, model, info, device, sync = synthetic_setup(ap, batch_sizes="4,1", repeats=3)

    from outlierlab.adapters import get_adapter
    from outlierlab.runtime import installed, run
    from outlierlab.runtime.forward import call
    from outlierlab.tracing import ProfileConfig, profile
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
          f"torch {torch.__version__}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cfg = ProfileConfig(batch_size=batch, weights=False)
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
                for s in range(0, len(ids), batch):
                    forwards.append(timed(lambda s=s, b=batch: call(model, ids[s:s + b], s, logits=False)))
                t = time.perf_counter()
            sync()
            phases["uninstall"] = time.perf_counter() - t
            raw: dict = {}
            phases["results"] = timed(lambda r=raw, tr=tracer: r.update(tr.results()))
            phases["detect"] = timed(lambda r=raw, tr=tracer, c=cfg: build_profile(tr.adapter, r, c, ids, None, None, {}, {},
                                                                                   {}))
            print(f"batch {batch} repeat {rep}: bare {bare:.3f} s, profile {whole:.3f} s ({whole / bare:.3f}x) | "
                  f"traced forwards {' '.join(f'{f * 1e3:.1f}' for f in forwards)} ms | "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()), flush=True)
        bare_each = []
        with torch.inference_mode():
            for s in range(0, len(ids), batch):
                bare_each.append(timed(lambda s=s, b=batch: call(model, ids[s:s + b], s, logits=False)))
        print(f"batch {batch}: bare forwards {' '.join(f'{f * 1e3:.1f}' for f in bare_each)} ms")


if __name__ == "__main__":
    main()
