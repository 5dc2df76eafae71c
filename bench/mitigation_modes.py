"""Every mitigation method in every documented mode on one model and device: does it run, how long, what it
does to the residual max and the perplexity, and (function-preserving modes) how far the logits move.

    python bench/mitigation_modes.py --device cuda [--model smollm2-135m] [--dtype float32]

One table per run, printed and written as JSON (``--out``); each mode is applied to a fresh copy of the model.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", default="", help="comma-separated subset of the mode names (default: all)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    from outlierlab.data import DataConfig, make_windows
    from outlierlab.evaluation import EvalConfig, eval_windows
    from outlierlab.mitigation import MitigationError, mitigate
    from outlierlab.mitigation.measure import MeasureConfig, measure
    from outlierlab.models.loader import load_model, max_positions
    from outlierlab.runtime import call, registry
    from outlierlab.testing import mitigation_modes

    lm = load_model(args.model, args.device, args.dtype)
    maxpos = max_positions(lm.model)
    calib = make_windows(lm.tokenizer, DataConfig(n_samples=8), max_positions=maxpos)
    ev = eval_windows(lm.tokenizer, EvalConfig(n_samples=4), max_positions=maxpos)
    probe = ev.input_ids[:1, :128]
    with torch.inference_mode():
        ref = call(lm.model, probe).logits.float()
    fast = MeasureConfig(fast=True)
    base = measure(lm.model, ev, fast)
    modes = mitigation_modes()
    if args.modes:
        modes = {k: v for k, v in modes.items() if k in args.modes.split(",")}
    rows = []
    print(f"{args.model} on {args.device} ({args.dtype}): residual max {base['resid_max']:,.0f}, "
          f"perplexity {base['ppl']:.3f} (4 x 512 tokens of brown:eval)")
    print(f"{'mode':26s} {'status':8s} {'exact':5s} {'logits rel':>10s} {'resid max':>10s} {'ppl':>9s} {'s':>6s}")
    for name, cfg in modes.items():
        work = copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        row = {"mode": name}
        try:
            result = mitigate(work, [cfg], calib, lm.tokenizer)
        except MitigationError as exc:
            row.update(status="refused", error=str(exc).splitlines()[0])
        else:
            with torch.inference_mode():
                out = call(work, probe).logits.float()
            m = measure(work, ev, fast)
            row.update(status="ok", exact=result.exact,
                       logits_rel=float((out - ref).abs().max() / ref.abs().max()),
                       resid_max=m["resid_max"], ppl=m["ppl"])
            result.remove()
            assert not registry(work).entries
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if row["status"] == "ok":
            print(f"{name:26s} {'ok':8s} {row['exact']!s:5s} {row['logits_rel']:10.2e} {row['resid_max']:10,.0f} "
                  f"{row['ppl']:9.3f} {row['seconds']:6.1f}")
        else:
            print(f"{name:26s} {'refused':8s} {row['error']}")
        del work
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": lm.info, "device": args.device, "dtype": args.dtype, "base": base, "rows": rows},
                      f, indent=1, default=str)


if __name__ == "__main__":
    main()
