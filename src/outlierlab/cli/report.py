"""``outlierlab report DIR``: (re)build the self-contained HTML report and its PNG figures from a run folder."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import DebugOpt, app, err, guarded, out


@app.command("report")
@guarded
def report_cmd(
    out_dir: Path = typer.Argument(..., help="run folder: report.json (+ profile.safetensors), and any of "
                                             "mitigate.json, compare.json, landscape_*.safetensors"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="draw the figures (PNG, embedded)"),
    landscape: bool = typer.Option(False, "--landscape", help="when DIR has no landscape_before.safetensors, "
                                   "load the profiled model and capture one (3D landscape figure)"),
    model: str = typer.Option(None, "--model", "-m", help="with --landscape: the model to load (default: the "
                              "one named in report.json)"),
    debug: bool = DebugOpt,
) -> None:
    """Build DIR/report.html (offline, figures embedded) and DIR/figures/*.png from what the stages left in DIR."""
    from ..report import landscape as L
    from ..report.html import build

    t0 = time.perf_counter()
    if landscape and not (Path(out_dir) / L.BEFORE_FILE).is_file():
        with err.status("capturing the activation landscape"):
            path = L.capture_for_report(out_dir, model=model)
        out.print(f"wrote {path} (layers {', '.join(map(str, L.load_meta(path).get('layers', [])))})")
    with err.status("building the report"):
        path, figs = build(out_dir, figures=figures)
    out.print(f"wrote {path}" + (f" and {len(figs)} figures in {Path(out_dir) / 'figures'}" if figs else "")
              + f" in {time.perf_counter() - t0:.1f} s")
