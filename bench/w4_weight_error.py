"""Rounding error of the 4-bit weight quantizers on every decoder linear of a model: the grid (restricted
[-7, 7] or full [-8, 7]) crossed with min-max or searched clip ratios, per output channel (RTN). Prints, per
setting, the mean over linears of ||W - Q(W)||^2 / ||W||^2 and the seconds the whole model took, measured in one
run. This is what the W4 presets' defaults (full grid + clip search) were chosen on.

    PYTHONPATH=src python bench/w4_weight_error.py [--model smollm2-135m] [--bits 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from outlierlab import load_model
from outlierlab.quantization import get_quant
from outlierlab.quantization.fake import find_targets
from outlierlab.quantization.quantizers import quant_weight


def main(args) -> None:
    lm = load_model(args.model, args.device, "float32")
    weights = [t.weight_view().detach().float() for t in find_targets(lm.model, get_quant("w4a16"))]
    print(f"{lm.info['id']}: {len(weights)} decoder linears, W{args.bits} per output channel, RTN")
    print(f"{'grid':<11} {'clip':<8} {'mean rel. error':>15} {'seconds':>8}")
    for grid in ("restricted", "full"):
        for search in (False, True):
            t0 = time.perf_counter()
            errs = []
            for w in weights:
                q = quant_weight(w, args.bits, True, "channel", grid=grid, search=search)
                errs.append(float((q - w).pow(2).sum() / w.pow(2).sum()))
            if weights[0].is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            print(f"{grid:<11} {'search' if search else 'min-max':<8} {sum(errs) / len(errs):>15.5f} {seconds:>8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    main(parser.parse_args())
