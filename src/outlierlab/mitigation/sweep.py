"""The TMA sweep: target magnitude vs perplexity vs residual max, for every variant, against the clamp
reference.

Variants (``VARIANTS``):

- ``clip-all``: clamp y6 to +-target at every layer (the reference curve of the issue);
- ``clip-origin``: the same clamp at the origin layers only;
- ``scale-origin``: scale the MA tokens' y6 to the target at the origin layers, no compensation;
- ``scale-comp-origin``: the same with the residual compensation (function-preserving);
- ``scale-comp-all``: compensated scale at every layer with threshold = target: no y6 entry above the target
  anywhere, like ``clip-all``, while keeping the function;
- ``zero-origin``, ``replace-origin``: one point each (no target).

The calibration profile is computed once and shared by every point; each point then costs one pass over
the evaluation windows (perplexity and maxima together, :func:`outlierlab.mitigation.measure.measure` with
``fast=True``).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import replace
from pathlib import Path

from ..paths import atomic_write_bytes, atomic_write_json, atomic_write_text
from . import tma as _tma
from .base import Context
from .measure import MeasureConfig, measure
from .tma import TMAConfig

VARIANTS: dict[str, TMAConfig | None] = {
    "clip-all": TMAConfig(mode="clip", layers="all"),
    "clip-origin": TMAConfig(mode="clip", layers="origin"),
    "scale-origin": TMAConfig(mode="scale", layers="origin", compensate=False),
    "scale-comp-origin": TMAConfig(mode="scale", layers="origin", compensate=True),
    "scale-comp-all": TMAConfig(mode="scale", layers="all", compensate=True),
    "zero-origin": TMAConfig(mode="zero", layers="origin"),
    "replace-origin": TMAConfig(mode="replace", layers="origin"),
}
TARGETS = (1000.0, 300.0, 100.0, 30.0, 10.0)
#: the issue's reference, measured by its author (8 x 512 brown:eval, fp32): target -> (resid x, ppl change)
REFERENCE = {1000.0: (2.0, -0.004), 300.0: (6.5, 0.021), 100.0: (18.0, 0.197)}


def variant_config(variant: str, target: float | None) -> TMAConfig:
    base = VARIANTS[variant]
    if base.mode in ("zero", "replace"):
        return base
    cfg = replace(base, target=float(target))
    if variant == "scale-comp-all":
        cfg = replace(cfg, threshold=float(target))
    return cfg


def sweep(model, calib, eval_windows, variants=None, targets=TARGETS, before: dict | None = None,
          batch_size: int = 4, log=None, progress: bool = False) -> dict:
    """Run every (variant, target) point; returns {"before": ..., "rows": [...]} (rows sorted as run)."""
    variants = list(variants or VARIANTS)
    ctx = Context.for_model(model, calib, log=log)
    mcfg = MeasureConfig(batch_size=batch_size, fast=True)
    if before is None:
        before = measure(model, eval_windows, mcfg)
    t0 = time.perf_counter()
    profile = _tma.calibration_profile(model, ctx.calib_ids("tma sweep"), batch_size)
    points = []
    for v in variants:
        if VARIANTS[v].mode in ("zero", "replace"):
            points.append((v, None))
        else:
            points.extend((v, t) for t in targets)
    rows = []
    from ..progress import progress_bar

    with progress_bar(progress) as bar:
        task = bar.add_task("tma sweep", total=len(points))
        for variant, target in points:
            cfg = variant_config(variant, target)
            params = _tma.calibrate(ctx, cfg, profile)["params"]
            remove = _tma.attach(model, params)
            try:
                m = measure(model, eval_windows, mcfg)
            finally:
                remove()
            row = {"variant": variant, "target": target, "exact": cfg.exact, "layers": params["layers"],
                   "resid_max": m["resid_max"], "resid_x": before["resid_max"] / m["resid_max"],
                   "down_in_max": m["down_in_max"], "down_in_x": before["down_in_max"] / m["down_in_max"],
                   "ppl": m["ppl"], "ppl_rel": m["ppl"] / before["ppl"] - 1.0}
            rows.append(row)
            if log is not None:
                log(f"{variant:18s} target {target if target is not None else '-':>6} resid {row['resid_max']:9,.0f} "
                    f"({row['resid_x']:5.1f}x) y6 {row['down_in_max']:8,.0f} ppl {row['ppl']:.3f} "
                    f"({100 * row['ppl_rel']:+.2f}%)")
            bar.advance(task)
    return {"before": before, "rows": rows, "seconds": time.perf_counter() - t0,
            "reference_issue": {str(k): {"resid_x": v[0], "ppl_rel": v[1]} for k, v in REFERENCE.items()}}


def best(rows: list[dict], max_ppl_rel: float = 0.01) -> dict | None:
    """The row with the largest residual-max cut whose perplexity is within ``max_ppl_rel``."""
    ok = [r for r in rows if r["ppl_rel"] <= max_ppl_rel]
    return max(ok, key=lambda r: r["resid_x"]) if ok else None


def save(result: dict, out_dir: str | Path) -> list[Path]:
    """``tma_sweep.json``, ``tma_sweep.csv`` and ``tma_sweep.png`` (ppl change vs residual-max cut)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write_json(out_dir / "tma_sweep.json", result)]
    buf = io.StringIO()
    keys = ["variant", "target", "exact", "resid_max", "resid_x", "down_in_max", "down_in_x", "ppl", "ppl_rel"]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(result["rows"])
    paths.append(atomic_write_text(out_dir / "tma_sweep.csv", buf.getvalue()))
    png = plot(result)
    if png is not None:
        paths.append(atomic_write_bytes(out_dir / "tma_sweep.png", png))
    return paths


def plot(result: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by.setdefault(r["variant"], []).append(r)
    for variant, rows in by.items():
        xs = [r["resid_x"] for r in rows]
        ys = [100 * r["ppl_rel"] for r in rows]
        ax.plot(xs, ys, "o-" if len(rows) > 1 else "s", label=variant)
        for r in rows:
            if r["target"] is not None:
                ax.annotate(f"{r['target']:g}", (r["resid_x"], 100 * r["ppl_rel"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ref = result.get("reference_issue", {})
    if ref:
        ax.plot([v["resid_x"] for v in ref.values()], [100 * v["ppl_rel"] for v in ref.values()], "k--", lw=0.8,
                label="issue's clamp reference")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.xaxis.set_major_locator(FixedLocator([1, 2, 3, 5, 10, 20, 30, 50, 100, 200]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(1.0, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("residual max |h| cut (before / after, x)")
    ax.set_ylabel("perplexity change (%)")
    ax.set_title("TMA removal at y6: variants (labels: target)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
