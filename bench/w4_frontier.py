"""W4A4KV4 cells of one mitigation on the default protocol (outlierlab compare's: 16 x 512 brown:calib windows,
8 x 512 brown:eval), with GPTQ run once per weight setting: settings that differ only in their activation or KV
fields reuse the same GPTQ weights (GPTQ calibrates on the model without activation quantization, so they are
the weights compare would compute for each cell). Prints and writes one row per setting.

    PYTHONPATH=src python bench/w4_frontier.py --method quarot \\
        --quant "w4a4kv4:w_method=gptq,w4a4kv4:w_method=gptq:a_clip_search=true" --out bench/out/w4.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from outlierlab import load_model
from outlierlab.api import as_windows
from outlierlab.data import DataConfig
from outlierlab.evaluation import eval_windows, perplexity
from outlierlab.mitigation import mitigate
from outlierlab.quantization import get_quant, prepare


def weight_key(cfg) -> str:
    """The config with every activation and KV field at its default: equal keys, equal weights."""
    base = get_quant("fp")
    return replace(cfg, name="", a_bits=None, a_granularity=base.a_granularity, a_clip=1.0, a_clip_search=False,
                   a_calib_samples=base.a_calib_samples, kv_bits=None, kv_symmetric=False, kv_clip=1.0).key()


def main(args) -> None:
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    calib = as_windows(DataConfig("brown:calib", n_samples=args.calib_samples), lm)
    ev = eval_windows(lm.tokenizer)
    t0 = time.perf_counter()
    methods = [m for m in args.method.split("+") if m != "none"]
    mitigate(lm.model, methods, calib, lm.tokenizer)
    mitigation_s = time.perf_counter() - t0
    weights: dict[str, object] = {}
    rows = []
    for spec in args.quant.split(","):
        cfg = get_quant(spec)
        key = weight_key(cfg)
        t0 = time.perf_counter()
        plan = prepare(lm.model, replace(cfg, w_bits=None) if key in weights else cfg, calib)
        if key in weights:  # the same GPTQ weights, the activation/KV part of this setting
            plan.weights, plan.config = weights[key], cfg
        weights[key] = plan.weights
        quantize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with plan.install(lm.model):
            ppl = perplexity(lm.model, ev)
        rows.append({"method": args.method, "quant": spec, "ppl": ppl, "mitigation_s": mitigation_s,
                     "quantize_s": quantize_s, "eval_s": time.perf_counter() - t0, "info": plan.info})
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="quarot", help="a method or +-joined methods (none: no method)")
    p.add_argument("--quant", required=True, help="comma-separated quantization settings")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    main(p.parse_args())
