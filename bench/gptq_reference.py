"""Our GPTQ against a reference implementation (llm-compressor), on the same model, calibration windows, grid and
perplexity protocol: only the quantized weights differ.

The reference runs in a subprocess of a separate virtual environment (its pinned transformers would not fit
ours): that process loads the model from outlierlab's safetensors cache, quantizes it with llm-compressor's
``GPTQModifier`` (w4a16 per output channel, symmetric, min-max scales, sequential pipeline), and writes the
dequantized weights of every decoder-layer linear. This process loads them into the model and measures the
perplexity with outlierlab's protocol, next to outlierlab's own RTN and GPTQ on the same grid.

Grids: ``full`` is compressed-tensors' own INT convention ([-2^(b-1), 2^(b-1)-1], scale = absmax / ((2^b-1)/2));
for ``restricted`` ([-Q, Q], scale = absmax / Q) the worker narrows compressed-tensors' integer range to
[-Q, Q], which makes its scale absmax / Q as well. Both sides' weights are checked to lie on the grid.

    # once: python3 -m venv /work/refvenv && /work/refvenv/bin/pip install torch==2.13.0 llmcompressor
    PYTHONPATH=src .venv/bin/python bench/gptq_reference.py --ref-python /work/refvenv/bin/python \
        --calib-samples 16 --out bench/out/gptq_reference.json

The worker mode (``--worker``) imports only torch, transformers and llm-compressor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BITS = 4


# -- the reference side (runs in the other environment) ------------------------------------------------------


def _narrow_ct_range(bits: int) -> None:
    """Make compressed-tensors' INT range [-Q, Q] (Q = 2^(b-1)-1): scale = absmax / Q and clamp to +-Q."""
    import torch
    from compressed_tensors.quantization import QuantizationType
    from compressed_tensors.quantization.utils import helpers

    original = helpers._calculate_range

    def narrowed(quant_type, num_bits, device):
        if quant_type == QuantizationType.INT:
            q = 2 ** (num_bits - 1) - 1
            return torch.tensor(-q, device=device), torch.tensor(q, device=device)
        return original(quant_type, num_bits, device)

    helpers._calculate_range = narrowed


def worker(args) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    if args.grid == "restricted":
        _narrow_ct_range(BITS)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    ids = torch.load(args.ids)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=BITS, type="int", strategy="channel", symmetric=True, dynamic=False, observer="minmax"))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=args.block,
                          dampening_frac=args.damp, actorder=None if args.actorder == "none" else args.actorder)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - t0
    weights = {name: m.weight.detach().float().contiguous() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name}
    save_file(weights, args.out, metadata={"seconds": f"{seconds:.1f}", "grid": args.grid,
                                            "actorder": args.actorder, "damp": str(args.damp),
                                            "block": str(args.block), "ids": _digest(ids)})


def _digest(ids) -> str:
    import hashlib

    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]


# -- our side -------------------------------------------------------------------------------------------------


def _grid_levels(w, grid: str) -> tuple[int, int]:
    """(most distinct levels in a row, rows off the grid) of a per-channel quantized ``[out, in]`` weight: a
    row is on the grid when it is integers times its step (the smallest gap between its values) within the
    grid's range, [-Q, Q] or [-2^(b-1), 2^(b-1) - 1]."""
    import torch

    lo, hi = (-(2 ** (BITS - 1) - 1) if grid == "restricted" else -(2 ** (BITS - 1))), 2 ** (BITS - 1) - 1
    levels, off = 0, 0
    for row in w.float():
        values = torch.unique(row)
        levels = max(levels, len(values))
        if len(values) < 2:
            continue
        k = row / (values[1:] - values[:-1]).min()
        off += not (torch.allclose(k, k.round(), atol=1e-3) and lo <= int(k.round().min())
                    and int(k.round().max()) <= hi)
    return levels, off


def _reference_weights(args, grid: str, ids, model_dir: str, workdir: str) -> tuple[dict, float]:
    """The reference's weights for ``grid``: from ``workdir`` when a run with the same settings and windows
    is there (``--ref-cache``), else computed by the worker."""
    import torch
    from safetensors import safe_open

    out = os.path.join(workdir, f"ref-{grid}-{args.ref_actorder}.safetensors")
    want = {"grid": grid, "actorder": args.ref_actorder, "damp": str(args.damp), "block": str(args.block),
            "ids": _digest(ids)}
    if os.path.exists(out):
        with safe_open(out, framework="pt") as f:
            meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in want.items()):
                print(f"  (reference weights reused from {out})", flush=True)
                return {k: f.get_tensor(k) for k in f.keys()}, float(meta["seconds"])  # noqa: SIM118
    ids_path = os.path.join(workdir, "calib.pt")
    torch.save(ids.clone(), ids_path)
    cmd = [args.ref_python, os.path.abspath(__file__), "--worker", "--grid", grid, "--ids", ids_path,
           "--model-dir", model_dir, "--out", out, "--damp", str(args.damp), "--block", str(args.block),
           "--actorder", args.ref_actorder, "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    quiet = None if args.verbose else subprocess.DEVNULL
    subprocess.run(cmd, check=True, env=env, stdout=quiet, stderr=quiet)
    with safe_open(out, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, float(f.metadata()["seconds"])  # noqa: SIM118


def _ppl_with(model, targets, weights: dict, ev) -> float:
    """Perplexity with ``weights`` ([out, in] by target name) swapped in, the originals put back after."""
    from outlierlab.evaluation import perplexity

    originals = []
    try:
        for t in targets:
            originals.append((t.module, t.module.weight.data))
            t.module.weight.data = t.to_storage(weights[t.name].to(t.module.weight.dtype))
        return perplexity(model, ev)
    finally:
        for module, data in originals:
            module.weight.data = data


def main(args) -> None:
    import torch

    from outlierlab import load_model
    from outlierlab.api import as_windows
    from outlierlab.data import DataConfig
    from outlierlab.evaluation import eval_windows, perplexity
    from outlierlab.models.loader import gguf_cache_folder
    from outlierlab.quantization import find_targets, get_quant, prepare

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    model_dir = str(gguf_cache_folder(lm.source.location, lm.source.sha256)) if lm.source.kind == "gguf" \
        else lm.source.location
    calib = as_windows(DataConfig("brown:calib", n_samples=args.calib_samples), lm)
    ev = eval_windows(lm.tokenizer)
    rows: list[dict] = []
    if not args.skip_fp:
        fp = perplexity(lm.model, ev)
        rows.append({"side": "fp", "grid": "-", "method": "fp", "ppl": fp, "seconds": 0.0})
        print(f"fp: {fp:.2f}", flush=True)
    workdir = args.ref_cache or tempfile.mkdtemp(prefix="gptq-ref-")
    os.makedirs(workdir, exist_ok=True)
    targets = find_targets(lm.model, get_quant("w4a16"))
    for grid in args.grids:
        specs = ([] if args.skip_rtn else [("rtn", f"w4a16:w_grid={grid}")]) + [
            (f"gptq {extra or 'default'}", f"w4a16:w_grid={grid}:w_method=gptq" + (f":{extra}" if extra else ""))
            for extra in args.ours]
        for method, spec in specs:
            cfg = get_quant(spec).with_(gptq_damp=args.damp, gptq_block=args.block)
            t0 = time.perf_counter()
            plan = prepare(lm.model, cfg, calib)
            seconds = time.perf_counter() - t0
            ppl = _ppl_with(lm.model, targets, plan.weights, ev)
            levels, off = _grid_levels(next(iter(plan.weights.values())), grid)
            rows.append({"side": "outlierlab", "grid": grid, "method": method, "spec": cfg.name, "ppl": ppl,
                         "seconds": seconds, "levels_row0": levels, "rows_off_grid_l0": off})
            print(f"ours {grid:10s} {method:28s} {ppl:8.2f}  ({seconds:.0f} s)", flush=True)
        if args.ref_python:
            weights, wall = _reference_weights(args, grid, calib.input_ids, model_dir, workdir)
            missing = [t.name for t in targets if t.name not in weights]
            if missing:
                raise SystemExit(f"the reference wrote no weight for {missing[:3]}...")
            ppl = _ppl_with(lm.model, targets, weights, ev)
            levels, off = _grid_levels(weights[targets[0].name], grid)
            rows.append({"side": "llm-compressor", "grid": grid, "method": f"gptq actorder={args.ref_actorder}",
                         "ppl": ppl, "seconds": wall, "levels_row0": levels, "rows_off_grid_l0": off})
            print(f"ref  {grid:10s} gptq actorder={args.ref_actorder:14s} {ppl:8.2f}  ({wall:.0f} s, "
                  f"off-grid rows {off})", flush=True)
    result = {"model": lm.info["id"], "calib_windows": list(calib.input_ids.shape), "bits": BITS,
              "granularity": "channel", "damp": args.damp, "block": args.block, "rows": rows,
              "versions": _versions(args.ref_python)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


def _versions(ref_python: str | None) -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    if ref_python:
        code = ("import importlib.metadata as m;print(m.version('llmcompressor'), m.version('compressed-tensors'), "
                "m.version('transformers'))")
        got = subprocess.run([ref_python, "-c", code], capture_output=True, text=True, check=False).stdout.split()
        if len(got) == 3:
            out.update({"llmcompressor": got[0], "compressed_tensors": got[1], "ref_transformers": got[2]})
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--model-dir")
    p.add_argument("--ids")
    p.add_argument("--grid", choices=("restricted", "full"))
    p.add_argument("--grids", nargs="+", default=["restricted", "full"])
    p.add_argument("--ours", nargs="*", default=[""],
                   help="extra overrides of our GPTQ runs, e.g. gptq_act_order=true ('' = our defaults)")
    p.add_argument("--ref-python", help="python of the reference environment (omit: ours only)")
    p.add_argument("--ref-actorder", default="static", choices=("static", "weight", "none"))
    p.add_argument("--ref-cache", help="folder that keeps the reference's weights between runs")
    p.add_argument("--actorder", default="static", help=argparse.SUPPRESS)  # the worker's
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-fp", action="store_true", help="do not measure the fp perplexity")
    p.add_argument("--skip-rtn", action="store_true", help="do not measure our RTN")
    p.add_argument("--out")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse()
    if ARGS.worker:
        worker(ARGS)
    else:
        sys.exit(main(ARGS))
