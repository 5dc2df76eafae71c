"""``outlierlab export``: a servable compressed-tensors checkpoint of the mitigated, quantized model, checked by
reloading it with plain transformers in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from .common import (
    BatchOpt,
    BosOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    SeedOpt,
    SeqOpt,
    app,
    err,
    guarded,
    out,
)

#: the reloaded checkpoint's perplexity must be within this of the harness' number
TOLERANCE = 0.005

_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from outlierlab.evaluation import perplexity
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3])).to(sys.argv[6])
print(json.dumps({"ppl": perplexity(model, torch.load(sys.argv[2]), int(sys.argv[4])),
                  "linear": type(model.get_submodule(sys.argv[5])).__name__}))
"""


def reload_perplexity(folder: Path, ids, dtype: str, batch_size: int, linear: str, device: str) -> dict:
    """Perplexity of the checkpoint loaded by ``AutoModelForCausalLM.from_pretrained`` in a fresh process, on
    ``device`` (the harness' device: CPU and GPU rounding differ by more than the tolerance at 4 bits)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ids.pt"
        torch.save(ids.cpu(), path)
        res = subprocess.run([sys.executable, "-c", _RELOAD, str(folder), str(path), dtype, str(batch_size),
                              linear, device], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"reloading {folder} with transformers failed: {tail}")
    return json.loads(res.stdout.strip().splitlines()[-1])


@app.command("export")
@guarded
def export_cmd(
    quant: str = typer.Option(..., "--quant", "-q", help="w4a16 | w8a8-token | w4a8 | w8a8-tensor, with "
                                                        ":key=value overrides (e.g. w4a16:w_method=gptq)"),
    method: str = typer.Option("none", "--method", "-M", help="weight-only mitigation folded first: gamma, "
                                                             "smoothquant, rotate, otc (comma-separated)"),
    model: str = ModelOpt,
    data: str = DataOpt,
    out_dir: Path = OutOpt,
    n_samples: int = typer.Option(16, "--n-samples", "-n", help="calibration windows (methods, GPTQ, static "
                                                              "scales)"),
    seq_len: int = SeqOpt,
    seed: int = SeedOpt,
    bos: str = BosOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = BatchOpt,
    check: bool = typer.Option(True, "--check/--no-check", help="reload with transformers in a fresh process and "
                                                              "compare its perplexity with the harness'"),
    eval_data: str = typer.Option("brown:eval", "--eval-data", help="evaluation text of the check"),
    eval_samples: int = typer.Option(8, "--eval-samples", help="evaluation windows of the check"),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="evaluation window length of the check"),
    debug: bool = DebugOpt,
) -> None:
    """Fold weight-only mitigation, quantize as `compare` measures it, write DIR/model as a compressed-tensors
    checkpoint (transformers and vLLM load it), and check the reloaded perplexity (within 0.5%)."""
    from ..api import as_windows
    from ..data import DataConfig
    from ..evaluation import EvalConfig, eval_windows, perplexity
    from ..mitigation import mitigate
    from ..models.loader import load_model, max_positions
    from ..quantization import get_quant
    from ..quantization.export import check_exportable, export_compressed
    from ..quantization.fake import prepare
    from ..runtime import input_device

    t0 = time.perf_counter()
    config = get_quant(quant)
    with err.status("loading model and data"):
        lm = load_model(model, device, dtype)
        calib = as_windows(DataConfig(source=data, seq_len=seq_len, n_samples=n_samples, seed=seed, bos=bos), lm)
        ecfg = EvalConfig(source=eval_data, n_samples=eval_samples, seq_len=eval_seq_len)
        ev = eval_windows(lm.tokenizer, ecfg, max_positions=max_positions(lm.model))
    result = mitigate(lm.model, [method], calib, lm.tokenizer, log=lambda s: err.print(f"  {s}", highlight=False))
    check_exportable(lm.model, config)
    with err.status(f"quantizing ({config.describe()})"):
        plan = prepare(lm.model, config, calib, batch_size=batch_size)
    extra = {"model": lm.info}
    if check:
        with err.status("perplexity of the fake-quantized model"), plan.install(lm.model):
            extra["harness_ppl"] = perplexity(lm.model, ev, batch_size)
    folder = export_compressed(lm.model, lm.tokenizer, config, out_dir / "model", plan=plan,
                               methods=result.methods_json(), extra=extra)
    out.print(f"wrote {folder} ({config.describe()}; methods: {method})")
    if not check:
        return
    with err.status("reloading with transformers in a fresh process"):
        got = reload_perplexity(folder, ev.input_ids, dtype, batch_size, plan.targets[0].name,
                                str(input_device(lm.model)))
    rel = got["ppl"] / extra["harness_ppl"] - 1.0
    doc = {"harness_ppl": extra["harness_ppl"], "reloaded_ppl": got["ppl"], "rel_diff": rel,
           "tolerance": TOLERANCE, "reloaded_linear_type": got["linear"], "eval": ecfg.protocol(),
           "seconds": time.perf_counter() - t0}
    (out_dir / "export_check.json").write_text(json.dumps(doc, indent=2))
    out.print(f"reload check: perplexity {extra['harness_ppl']:.3f} (harness) vs {got['ppl']:.3f} (transformers "
              f"+ compressed-tensors), {100 * rel:+.3f}%")
    if abs(rel) > TOLERANCE:
        out.print(f"[red]the reloaded checkpoint is {100 * rel:+.2f}% off (tolerance {100 * TOLERANCE:.1f}%)[/]")
        raise typer.Exit(1)
