"""Check docs/scale.md's time model on this machine: a forward of a model with part of its layers offloaded to
disk costs the in-memory forward plus the offloaded bytes read at the disk-store read rate.

    python bench/offload_time.py --spec synthetic:llama-tiny:hidden_size=1024,intermediate_size=4096,layers=8 \
        --fraction 0.5 --repeats 3

Prints the in-memory forward time, the offloaded forward time, the bytes offloaded, the measured read rate of
the offload store (every offloaded tensor read once) and the model's prediction.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from outlierlab.adapters import get_adapter
    from outlierlab.models import load_model
    from outlierlab.runtime import call, offload

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="synthetic:llama-tiny:hidden_size=1024,intermediate_size=4096,layers=8")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of the decoder layers left off the budget")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load_model(args.spec)
    size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    layers = sum(p.numel() * p.element_size() for p in get_adapter(lm.model).layers().parameters())
    ids = torch.randint(0, len(lm.tokenizer), (args.batch, args.seq_len))

    def timed(model) -> float:
        best = float("inf")
        with torch.inference_mode():
            call(model, ids)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                call(model, ids)
                best = min(best, time.perf_counter() - t0)
        return best

    t_mem = timed(lm.model)
    del lm
    off = load_model(args.spec, max_memory={"cpu": int(size - args.fraction * layers)})
    mods = offload.offloaded_modules(off.model)
    n_bytes = sum(offload.read(m, n).numel() * offload.read(m, n).element_size() for _, m in mods
                  for n in offload.names(m))
    t0 = time.perf_counter()
    for _, m in mods:
        for n in offload.names(m):
            offload.read(m, n)
    rate = n_bytes / (time.perf_counter() - t0)
    t_off = timed(off.model)
    print(f"model {size / 1e6:.0f} MB, offloaded {n_bytes / 1e6:.0f} MB ({len(mods)} modules)")
    print(f"forward in memory {t_mem:.3f} s; offloaded {t_off:.3f} s; store read rate {rate / 1e9:.2f} GB/s")
    print(f"model: {t_mem:.3f} + {n_bytes / 1e6:.0f} MB / {rate / 1e9:.2f} GB/s = {t_mem + n_bytes / rate:.3f} s "
          f"(measured / model = {t_off / (t_mem + n_bytes / rate):.2f})")


if __name__ == "__main__":
    main()
