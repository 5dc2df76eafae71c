"""Time each phase of building a synthetic model (``--model synthetic:...``) and of loading it with a placement
budget: tokenizer, allocation without initialization, random draws, planting, ``load_model`` (build + dispatch).

    python bench/synthetic_build.py --model synthetic:llama-13b:layers=2 --dtype bfloat16 --max-memory cpu=1GiB
    python bench/synthetic_build.py --model synthetic:llama-13b --device cuda --dtype bfloat16 \
        --max-memory 0=12GiB,cpu=100GiB

Prints one line per phase and a JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:llama-13b:layers=2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-memory", default=None, help="accelerate placement budget for the load_model phase")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from outlierlab.models import synthetic
    from outlierlab.models.loader import load_model, resolve_dtype

    dev, dt = torch.device(args.device), resolve_dtype(args.dtype)
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        if dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times[name] = round(now - t, 2)
        print(f"{name:12s} {now - t:8.2f} s", flush=True)
        t = now

    tok = synthetic.tokenizer_for(args.model)
    lap("tokenizer")
    with torch.device(dev), no_init_weights():
        model = AutoModelForCausalLM.from_config(synthetic.config(args.model, len(tok)), dtype=dt)
    lap("allocate")
    synthetic.random_init(model, synthetic.parse(args.model)[3], dev)
    lap("draw")
    synthetic.plant(model, synthetic._delimiter(tok))
    lap("plant")
    n = sum(p.numel() for p in model.parameters())
    del model
    if args.max_memory:
        load_model(args.model, args.device, args.dtype, max_memory=args.max_memory)
        lap("load_model")
    print(json.dumps({"model": args.model, "device": args.device, "dtype": args.dtype, "params": n,
                      "max_memory": args.max_memory, "seconds": times,
                      "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == "__main__":
    main()
