"""``outlierlab run``: the whole pipeline (profile, explain, mitigate, compare, report) on one model."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    ModelOpt,
    OutOpt,
    ProgressOpt,
    app,
    exit_on_failed_cells,
    guarded,
    out,
    split_list,
)


@app.command("run")
@guarded
def run_cmd(
    model: str = ModelOpt,
    data: str = typer.Option("brown:calib", "--data", "-d", help="calibration text (brown:calib, a file, hf:...)"),
    eval_data: str = typer.Option("brown:eval", "--eval-data", help="evaluation text (brown:eval, a file, hf:...)"),
    out_dir: Path = OutOpt,
    quick: bool = typer.Option(False, "--quick", help="few short windows and a small compare matrix"),
    methods: str = typer.Option("", "--methods", help="compare methods, comma-separated, or all (default: none,smoothquant,rotate,paper)"),
    quants: str = typer.Option("", "--quant", help="quantization presets, comma-separated, or all (default: fp,w8a8-tensor,w8a8-token)"),
    recommended: str = typer.Option("paper", "--recommended", help="the mitigation shown before/after"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_memory: str = MaxMemoryOpt,
    progress: bool = ProgressOpt,
    debug: bool = DebugOpt,
) -> None:
    """Profile -> explain -> mitigate -> compare -> report.html, every stage cached by its config hash."""
    from dataclasses import replace

    from ..pipeline import FULL_METHODS, FULL_QUANTS, RunConfig, quick_config
    from ..pipeline import run as run_pipeline

    cfg = quick_config() if quick else RunConfig()
    cfg = replace(cfg, model=model, device=device, dtype=dtype, max_memory=max_memory, recommended=recommended,
                  calib=replace(cfg.calib, source=data), eval=replace(cfg.eval, source=eval_data))
    if methods:
        picked = FULL_METHODS if methods == "all" else tuple(split_list(methods))
        cfg = replace(cfg, methods=picked)
    if quants:
        picked = FULL_QUANTS if quants == "all" else tuple(split_list(quants))
        cfg = replace(cfg, quants=picked)
    result = run_pipeline(cfg, out_dir, console=out, progress=progress)
    exit_on_failed_cells(result["failed_cells"])
