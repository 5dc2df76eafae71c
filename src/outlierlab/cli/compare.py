"""``outlierlab compare``: the mitigation x quantization perplexity table."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import (
    BatchOpt,
    BosOpt,
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
    exit_on_failed_cells,
    guarded,
    out,
    split_list,
)

DEFAULT_QUANT = "fp,w8a8-tensor,w8a8-token,w4a8,w4a4"


def _methods(text: str) -> tuple[str, ...]:
    from ..errors import OutlierlabError
    from ..evaluation.compare import available_methods

    names = split_list(text)
    if not names:
        raise OutlierlabError("--methods is empty; give names such as none,smoothquant")
    if names == ["all"]:
        names = list(available_methods())
    return tuple(dict.fromkeys(names))


@app.command("compare")
@guarded
def compare_cmd(
    methods: str = typer.Option("none", "--methods", help="comma-separated mitigation methods, or 'all' "
                                "(methods not available yet are reported as such)"),
    quant: str = typer.Option(DEFAULT_QUANT, "--quant", "-q",
                              help="comma-separated quantization presets (fp, w8a8-tensor, w8a8-dynamic, "
                                   "w8a8-token, w4a16, w4a8, w4a4, w4a4kv4), each with optional :key=value "
                                   "overrides, e.g. w4a8:w_method=gptq"),
    model: str = ModelOpt,
    out_dir: Path = OutOpt,
    seq_len: int = SeqOpt,
    n_samples: int = typer.Option(8, "--n-samples", "-n", help="evaluation windows"),
    eval_data: str = typer.Option("brown:eval", "--eval-data", help="evaluation text (brown:eval by default)"),
    calib_data: str = typer.Option("brown:calib", "--calib-data", help="calibration text"),
    calib_samples: int = typer.Option(16, "--calib-samples", help="calibration windows (methods, static "
                                      "scales, GPTQ)"),
    seed: int = SeedOpt,
    bos: str = BosOpt,
    batch_size: int = BatchOpt,
    sqnr: bool = typer.Option(False, "--sqnr/--no-sqnr", help="per-linear quantization error of every cell"),
    sqnr_samples: int = typer.Option(4, "--sqnr-samples", help="calibration windows for --sqnr"),
    force: bool = typer.Option(False, "--force", help="recompute cells found in OUT/cells"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_memory: str = MaxMemoryOpt,
    progress: bool = ProgressOpt,
    debug: bool = DebugOpt,
) -> None:
    """Perplexity of every mitigation method x quantization setting -> compare.json, compare.csv, a table."""
    from ..data import DataConfig
    from ..evaluation import EvalConfig
    from ..evaluation.compare import CompareConfig, compare, render_table
    from ..models.loader import load_model
    from ..quantization import parse_quant_list

    t0 = time.perf_counter()
    quants = tuple(q.name for q in parse_quant_list(quant))
    config = CompareConfig(
        methods=_methods(methods), quants=quants,
        eval=EvalConfig(source=eval_data, seq_len=seq_len, n_samples=n_samples, bos=bos, batch_size=batch_size),
        calib=DataConfig(source=calib_data, seq_len=seq_len, n_samples=calib_samples, seed=seed, bos=bos),
        batch_size=batch_size, sqnr=sqnr, sqnr_samples=sqnr_samples,
    )
    with err.status("loading model"):
        lm = load_model(model, device, dtype, max_memory=max_memory)

    def report(cell) -> None:
        if not progress:
            return
        what = f"{cell.ppl:.3f}" if cell.status == "ok" else f"{cell.status}: {cell.error}"
        err.print(f"  {cell.method} x {cell.quant}: {what}", highlight=False)

    result = compare(lm, config, out_dir, progress=progress, force=force, on_cell=report)
    render_table(result, out)
    n_cached = sum(c.cached for c in result.cells)
    out.print(f"wrote {out_dir / 'compare.json'} and {out_dir / 'compare.csv'} "
              f"({len(result.cells)} cells, {n_cached} from cache) in {time.perf_counter() - t0:.1f} s")
    exit_on_failed_cells(result.failures)
