"""``outlierlab quant-error``: which layer and operator a quantization setting breaks (per-linear SQNR)."""

from __future__ import annotations

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
    MaxMemoryOpt,
    ModelOpt,
    OutOpt,
    ProgressOpt,
    SeedOpt,
    SeqOpt,
    app,
    err,
    guarded,
    out,
    split_list,
)


@app.command("quant-error")
@guarded
def quant_error_cmd(
    quant: str = typer.Option("w8a8-tensor", "--quant", "-q", help="one quantization preset (with optional "
                              ":key=value overrides)"),
    method: str = typer.Option("none", "--method", help="mitigation method(s) applied first (comma-separated)"),
    model: str = ModelOpt,
    data: str = DataOpt,
    out_dir: Path = OutOpt,
    seq_len: int = SeqOpt,
    calib_samples: int = typer.Option(16, "--calib-samples", help="calibration windows (methods, static "
                                      "scales, GPTQ)"),
    n_samples: int = typer.Option(4, "--n-samples", "-n", help="of those, the windows the error is measured on"),
    top: int = typer.Option(10, "--top", help="worst linears shown"),
    seed: int = SeedOpt,
    bos: str = BosOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_memory: str = MaxMemoryOpt,
    progress: bool = ProgressOpt,
    debug: bool = DebugOpt,
) -> None:
    """Per-linear SQNR / relative MSE of a quantization setting (activation vs weight share) -> quant_error.json/csv."""
    from rich.table import Table

    from ..api import as_windows
    from ..data import DataConfig
    from ..errors import OutlierlabError
    from ..evaluation.sqnr import QUANT_ERROR_FILE, quant_error
    from ..mitigation import METHODS, mitigate
    from ..models.loader import load_model
    from ..paths import atomic_write_json
    from ..quantization import get_quant

    t0 = time.perf_counter()
    config = get_quant(quant)
    names = split_list(method) or ["none"]
    missing = [m for m in names if m not in METHODS]
    if missing:
        raise OutlierlabError(f"mitigation method(s) {', '.join(missing)} not available; have {', '.join(METHODS)}")
    with err.status("loading model and data"):
        lm = load_model(model, device, dtype, max_memory=max_memory)
        calib = as_windows(DataConfig(source=data, seq_len=seq_len, n_samples=calib_samples, seed=seed, bos=bos),
                           lm)
    mitigation = mitigate(lm.model, names, calib, lm.tokenizer)
    try:
        report = quant_error(lm.model, config, calib, calib.input_ids[:n_samples], batch_size=batch_size,
                             progress=progress)
    finally:
        mitigation.remove()
    doc = {"schema": "outlierlab.quant_error/1", "model": lm.info, "methods": names, "quant": config.name,
           "quant_summary": config.describe(), "calibration": calib.describe(), **report.to_json(),
           "timings": {"total_s": time.perf_counter() - t0}}
    atomic_write_json(out_dir / QUANT_ERROR_FILE, doc)
    report.save_csv(out_dir / "quant_error.csv")

    table = Table(title=f"{config.name} ({config.describe()}) after {'+'.join(names)}: worst {top} linears "
                        "by mean per-token relative error")
    for col in ("operator", "rel MSE", "act only", "weight only", "SQNR dB", "input |x|max", "cause"):
        table.add_column(col, justify="left" if col in ("operator", "cause") else "right")
    for r in report.worst(top):
        table.add_row(r.operator, f"{r.rel_mse:.4f}", f"{r.rel_mse_act:.4f}", f"{r.rel_mse_weight:.4f}",
                      f"{r.sqnr_db:.1f}", f"{r.input_absmax:,.1f}", r.cause)
    out.print(table)
    worst_kv = report.lowest_kv()
    if worst_kv is not None:
        out.print(f"KV cache: lowest SQNR {worst_kv['sqnr_db']:.1f} dB at layer {worst_kv['layer']} "
                  f"({worst_kv['state']})")
    out.print(f"wrote {out_dir / QUANT_ERROR_FILE} and {out_dir / 'quant_error.csv'} in "
              f"{time.perf_counter() - t0:.1f} s")


IncludeOpt = typer.Option(None, "--include-path", help="folder of task YAML files (local data)")


@app.command("lm-eval")
@guarded
def lm_eval_cmd(
    tasks: str = typer.Option(..., "--tasks", help="comma-separated lm_eval task names"),
    include_path: Path | None = IncludeOpt,
    method: str = typer.Option("none", "--method", help="mitigation method(s) applied first (comma-separated)"),
    quant: str = typer.Option("fp", "--quant", "-q", help="quantization preset (with :key=value overrides)"),
    model: str = ModelOpt,
    out_dir: Path = OutOpt,
    builtin: bool = typer.Option(True, "--builtin-tasks/--no-builtin-tasks", help="also index lm_eval's own "
                                 "tasks (slow to scan; their data usually needs the network)"),
    limit: int = typer.Option(None, "--limit", help="at most this many documents per task"),
    num_fewshot: int = typer.Option(None, "--num-fewshot", help="few-shot examples (task default if unset)"),
    calib_samples: int = typer.Option(16, "--calib-samples", help="calibration windows (methods, static "
                                      "scales, GPTQ)"),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_memory: str = MaxMemoryOpt,
    debug: bool = DebugOpt,
) -> None:
    """Score a mitigated, fake-quantized model on lm-evaluation-harness tasks -> lm_eval.json (needs the eval extra: lm_eval)."""
    from ..errors import OutlierlabError
    from ..evaluation.lm_eval import HAVE_LM_EVAL, INSTALL_HINT
    from ..jsonsafe import jsonable
    from ..paths import atomic_write_json

    if not HAVE_LM_EVAL:
        raise OutlierlabError(INSTALL_HINT)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ..evaluation.lm_eval import OutlierlabLM

    t0 = time.perf_counter()
    names = split_list(tasks)
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=builtin or include_path is None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise OutlierlabError(f"unknown lm_eval task(s) {', '.join(unknown)}; pass --include-path with their YAML")
    with err.status("loading, mitigating and quantizing the model"):
        lm = OutlierlabLM(model=model, methods=method, quant=quant, calib_samples=calib_samples,
                          batch_size=batch_size, device=device, dtype=dtype, max_memory=max_memory)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    results = res["results"] if res else {}
    doc = {"schema": "outlierlab.lm_eval/1", **lm.describe(), "tasks": names, "limit": limit,
           "num_fewshot": num_fewshot, "results": results, "timings": {"total_s": time.perf_counter() - t0}}
    atomic_write_json(out_dir / "lm_eval.json", jsonable(doc, fallback=repr))  # numpy numbers, "N/A"
    for task, metrics in results.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        out.print(f"{task}: {shown}", highlight=False)
    out.print(f"wrote {out_dir / 'lm_eval.json'} in {time.perf_counter() - t0:.1f} s")
