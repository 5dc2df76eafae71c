"""The report's figures, drawn with matplotlib's Agg renderer (no display, no pyplot global state).

Every function builds one figure from saved results (``report.json`` + ``profile.safetensors`` as returned by
``outlierlab.tracing.load_report``, landscape tensors, ``mitigate.json``, ``compare.json``) and returns a
:class:`Figure` record holding the PNG bytes; ``write(fig, out_dir)`` writes ``out_dir/figures/NAME.png``
atomically. Output is deterministic: the matplotlib default style is applied to each figure (a user's
matplotlibrc does not leak in) and no timestamp or software tag is written into the PNGs.

- :func:`landscape_figure` - the 3D activation landscape (tokens x channels, |x| as height) of one window at
  one layer and position, before and after mitigation side by side when both exist;
- :func:`topk_figure` - per-layer top-1/2/3 and median |x| at ``block.out`` and ``mlp.down_in`` (log y);
- :func:`heatmap_figure` - layers x channels heatmap of the channel abs-max at one position (log colour),
  channel-wise outliers marked above it;
- :func:`gamma_figure` - the effective norm gains |gamma| per layer and channel, CO channels marked;
- :func:`mitigation_figure` - residual / down-input max per layer and the summary numbers, before vs after;
- :func:`compare_figure` - the perplexity change of every (method, quantization) cell.

:func:`all_figures` makes every figure whose data exists.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fmt import num
from ..paths import atomic_write_bytes

DPI = 100
RESIDUAL = "block.out"
DOWN_IN = "mlp.down_in"
HEATMAP_POSITIONS = ("attn.norm", "mlp.norm", "block.out", "mlp.down_in", "attn.q")
_BEFORE, _AFTER = "#1f4e9c", "#d1495b"


@dataclass
class Figure:
    """One rendered figure: ``name`` (file stem), ``title`` and ``caption`` (plain text), PNG ``png`` bytes."""

    name: str
    title: str
    caption: str
    png: bytes
    section: str = "figures"

    def write(self, out_dir: str | Path) -> Path:
        return write(self, out_dir)


def write(fig: Figure, out_dir: str | Path) -> Path:
    """Write ``out_dir/figures/<name>.png`` atomically; returns the path."""
    return atomic_write_bytes(Path(out_dir) / "figures" / f"{fig.name}.png", fig.png)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


# -- plumbing --------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=DPI)


@contextlib.contextmanager
def _style():
    """matplotlib's default style (a user's matplotlibrc does not leak in) with the report's few overrides."""
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(
            {"font.size": 9, "axes.titlesize": 10, "savefig.dpi": DPI, "path.simplify": True,
             "agg.path.chunksize": 20000}):
        yield


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _tex(text: str) -> str:
    """Plain text safe for matplotlib (a ``$`` would start mathtext)."""
    return str(text).replace("$", r"\$")


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def layer_ids(report: Mapping, arrays: Mapping | None = None) -> list[int]:
    """The layer index of each entry of ``report["layers"]`` (a profile of a layer subset has gaps)."""
    n = len(report.get("layers", []))
    ids = sorted({int(k.split(".", 1)[0][1:]) for k in (arrays or {}) if re.match(r"^L\d+\.", k)})
    if len(ids) == n:
        return ids
    cfg_layers = (report.get("config") or {}).get("layers")
    if cfg_layers and len(cfg_layers) == n:
        return sorted(int(i) for i in cfg_layers)
    return list(range(n))


def _entry(report: Mapping, index: int, position: str) -> dict | None:
    layers = report.get("layers", [])
    if index >= len(layers):
        return None
    e = layers[index].get(position)
    if e is not None and not e.get("top") and e.get("same_as"):
        e = {**layers[index].get(e["same_as"], {}), **{k: v for k, v in e.items() if k != "top"}} or e
    return e


def positions_in(report: Mapping) -> list[str]:
    seen: dict[str, None] = {}
    for entry in report.get("layers", []):
        for p in entry:
            seen.setdefault(p, None)
    return list(seen)


def _array(arrays: Mapping, report: Mapping, index: int, layer: int, position: str, stat: str):
    t = arrays.get(f"L{layer}.{position}.{stat}")
    if t is None:
        e = (report.get("layers") or [{}] * (index + 1))[index].get(position) or {}
        if e.get("same_as"):
            t = arrays.get(f"L{layer}.{e['same_as']}.{stat}")
    return t


def _co_by_position(report: Mapping) -> dict[str, list[tuple[int, int, float]]]:
    out: dict[str, list] = {}
    for c in report.get("channel_outliers") or []:
        out.setdefault(c["position"], []).append((int(c["layer"]), int(c["channel"]), float(c.get("ratio") or 0)))
    return out


def _maxpool(z: np.ndarray, max_cols: int) -> tuple[np.ndarray, int]:
    """Max-pool the columns of ``z`` into at most ``max_cols`` bins (spikes survive); returns (z, factor)."""
    c = z.shape[1]
    if c <= max_cols:
        return z, 1
    f = math.ceil(c / max_cols)
    pad = (-c) % f
    if pad:
        z = np.concatenate([z, np.zeros((z.shape[0], pad))], axis=1)
    return z.reshape(z.shape[0], -1, f).max(axis=2), f


# -- (a) the 3D activation landscape ---------------------------------------------------------------------------
def _landscape_axes(fig, spec, z: np.ndarray, zscale: str, max_channels: int):
    """One 3D panel: a line per token across the channels (max-pooled above ``max_channels``)."""
    ax = fig.add_subplot(spec, projection="3d", proj_type="ortho")
    zp, factor = _maxpool(z, max_channels)
    t, c = zp.shape
    xx, yy = np.meshgrid(np.arange(c) * factor, np.arange(t))
    tr = (lambda v: np.log10(np.maximum(v, 1e-3))) if zscale == "log" else (lambda v: v)
    ax.plot_wireframe(xx, yy, tr(zp), rstride=1, cstride=0, color=_BEFORE, linewidth=0.8)
    ax.set_xlabel("channel", labelpad=6)
    ax.set_ylabel("token", labelpad=4)
    ax.set_zlabel("log10 |x|" if zscale == "log" else "|x|", labelpad=8)
    ax.set_xlim(0, max(z.shape[1] - 1, 1))
    ax.set_ylim(max(t - 1, 1), 0)  # token 0 at the back, level with the |x| axis: spike heights read true
    ax.view_init(elev=22, azim=-62)
    ax.set_box_aspect((1.7, 1.0, 0.85), zoom=1.2)
    # label the largest entries (up to 3, at least a fifth of the largest), with their true channel
    order = np.argsort(z, axis=None)[::-1][:3]
    top = float(z.flat[order[0]]) if z.size else 0.0
    for idx in order:
        ti, ci = np.unravel_index(int(idx), z.shape)
        if top <= 0 or z[ti, ci] < 0.2 * top:
            break
        ax.text(ci, ti, float(tr(z[ti, ci])), f"t{ti} c{ci}: {num(float(z[ti, ci]))}", fontsize=7,
                color="#222222")
    return ax


def landscape_figure(before, after=None, layer: int | None = None, position: str = "", *,
                     tokens: list[str] | None = None, max_tokens: int = 64, max_channels: int = 2048,
                     zscale: str = "linear", name: str | None = None) -> Figure:
    """The 3D landscape of |x| ([tokens, channels] tensors) of one window; ``after`` drawn beside ``before``.

    The first ``max_tokens`` tokens are drawn; more than ``max_channels`` channels are max-pooled into bins
    for drawing (a spike keeps its height; labels give the true token and channel). Each panel has its own
    height scale; its title gives the max |x| and where it is.
    """
    panels = [("before mitigation" if after is not None else "", before)]
    if after is not None:
        panels.append(("after mitigation", after))
    where = f"layer {layer}, {position}" if layer is not None else position
    with _style():
        fig = _new_figure(7.0 * len(panels), 4.8)
        gs = fig.add_gridspec(1, len(panels), left=0.0, right=0.97, bottom=0.0,
                              top=0.84 if len(panels) == 1 else 0.88, wspace=0.02)
        shape = (0, 0)
        for i, (label, tensor) in enumerate(panels):
            z = np.abs(_np(tensor))
            z = z.reshape(z.shape[0], -1)[:max_tokens]
            shape = z.shape
            ti, ci = np.unravel_index(int(np.argmax(z)), z.shape) if z.size else (0, 0)
            tok = f" ({tokens[ti]!r})" if tokens and ti < len(tokens) else ""
            title = (f"{label}: " if label else "") + \
                f"max |x| {num(float(z.max()) if z.size else 0)} at token {ti}{tok}, channel {ci}"
            _landscape_axes(fig, gs[0, i], z, zscale, max_channels)
            fig.text((i + 0.5) / len(panels), 0.86 if len(panels) == 1 else 0.9, _tex(title), ha="center",
                     va="bottom", fontsize=9)
        head = f"Activation landscape, {where}: |x| of one window ({shape[0]} tokens x {shape[1]} channels)"
        fig.text(0.5, 0.975, head if len(panels) > 1 else head.replace(": |x|", ":\n|x|"), ha="center", va="top",
                 fontsize=10, weight="bold")
        png = _png(fig)
    layer_s = f"L{layer}_" if layer is not None else ""
    caption = (f"|x| at {where} for the first {shape[0]} tokens of one evaluation window; each line is one token "
               "across all channels. Massive activations stand out as isolated spikes on a few tokens (often the "
               "first) and a few channels; labels give the token (t) and channel (c) of the largest entries."
               + (" Left: the original model; right: after mitigation, on its own height scale (compare the "
                  "maxima in the titles)." if after is not None else ""))
    return Figure(name or f"landscape_{safe_name(layer_s + position)}", f"Activation landscape, {where}",
                  caption, png, "landscape")


# -- (b) top-k curves -------------------------------------------------------------------------------------------
def topk_series(report: Mapping, position: str) -> dict[str, list]:
    """Per layer: top-1/2/3 |x| (one per (token, channel), from the profile's top entries) and the median."""
    ids = layer_ids(report)
    out = {"layer": [], "top1": [], "top2": [], "top3": [], "median": [], "top1_where": []}
    for i, layer in enumerate(ids):
        e = _entry(report, i, position)
        if e is None:
            continue
        vals = sorted((abs(float(t[0])) for t in e.get("top") or []), reverse=True)
        out["layer"].append(layer)
        for k in range(3):
            out[f"top{k + 1}"].append(vals[k] if len(vals) > k else float("nan"))
        out["median"].append(float(e.get("median") or float("nan")))
        top = e.get("top") or []
        out["top1_where"].append((int(top[0][1]), int(top[0][2])) if top else None)
    return out


def topk_figure(report: Mapping, positions: Iterable[str] = (RESIDUAL, DOWN_IN), name: str = "topk_curves"
                ) -> Figure | None:
    """Top-1, top-2, top-3 and median |x| per layer at each position (log y); None without data."""
    series = [(p, topk_series(report, p)) for p in positions]
    series = [(p, s) for p, s in series if s["layer"]]
    if not series:
        return None
    aliases = _aliases(report)
    detect = ((report.get("config") or {}).get("detect") or {})
    with _style():
        fig = _new_figure(5.6 * len(series), 4.2)
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.18)
        axes = fig.subplots(1, len(series), squeeze=False)[0]
        for ax, (pos, s) in zip(axes, series):
            x = s["layer"]
            for k, style in (("top1", "-o"), ("top2", "-s"), ("top3", "-^")):
                ax.plot(x, s[k], style, markersize=3, linewidth=1.4, label=k.replace("top", "top-"))
            ax.plot(x, s["median"], "--", color="0.35", linewidth=1.2, label="median")
            if detect.get("ma_abs"):
                ax.axhline(detect["ma_abs"], color="0.6", linewidth=0.8, linestyle=":")
            ax.set_yscale("log")
            ax.set_xlabel("layer")
            ax.set_ylabel("|x|")
            alias = f" ({aliases[pos]})" if aliases.get(pos) else ""
            ax.set_title(f"{pos}{alias}")
            peak = int(np.nanargmax(s["top1"])) if any(np.isfinite(s["top1"])) else None
            if peak is not None and s["top1_where"][peak]:
                t, c = s["top1_where"][peak]
                ax.annotate(f"{num(s['top1'][peak])}\ntoken {t}, channel {c}", (x[peak], s["top1"][peak]),
                            textcoords="offset points", xytext=(6, -22), fontsize=7)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
        png = _png(fig)
    caption = ("The three largest magnitudes (distinct token/channel entries over all windows) and the median |x| "
               "at each layer. A gap of several decades between the top entries and the median is the signature "
               "of massive activations; the dotted line is the absolute MA threshold.")
    return Figure(name, "Top-1/2/3 and median |x| per layer", caption, png, "curves")


def _aliases(report: Mapping) -> dict[str, str]:
    return {p["name"]: p["alias"] for p in (report.get("adapter") or {}).get("positions", []) if p.get("alias")}


# -- (c) heatmaps -----------------------------------------------------------------------------------------------
def heatmap_matrix(report: Mapping, arrays: Mapping, position: str, stat: str = "chan_absmax"
                   ) -> tuple[list[int], np.ndarray] | None:
    ids = layer_ids(report, arrays)
    rows, layers = [], []
    for i, layer in enumerate(ids):
        t = _array(arrays, report, i, layer, position, stat)
        if t is not None:
            rows.append(_np(t))
            layers.append(layer)
    if not rows or len({r.shape[0] for r in rows}) != 1:
        return None
    return layers, np.stack(rows)


def _positive(m: np.ndarray) -> tuple[np.ndarray, float, float]:
    pos = m[m > 0]
    lo = float(pos.min()) if pos.size else 1e-6
    hi = float(m.max()) if m.size else 1.0
    return np.where(m > 0, m, lo), lo, max(hi, lo * 10)


def _rug(ax, channels: list[int], color: str = _AFTER) -> None:
    """Short marks above the axes at ``channels`` (x in data coordinates, y in axes coordinates)."""
    if not channels:
        return
    ax.vlines(sorted(set(channels)), 1.005, 1.04, colors=color, linewidth=1.0, transform=ax.get_xaxis_transform(),
              clip_on=False)


def heatmap_figure(report: Mapping, arrays: Mapping, position: str, stat: str = "chan_absmax",
                   name: str | None = None) -> Figure | None:
    """Layers x channels heatmap of ``stat`` at ``position`` with a log colour scale; None without data."""
    from matplotlib.colors import LogNorm

    got = heatmap_matrix(report, arrays, position, stat)
    if got is None:
        return None
    layers, m = got
    m, lo, hi = _positive(np.abs(m))
    cos = [(l, c) for l, c, _ in _co_by_position(report).get(position, [])]
    alias = _aliases(report).get(position)
    with _style():
        height = 2.2 + 0.12 * len(layers)
        fig = _new_figure(11, height)
        fig.subplots_adjust(left=0.06, right=0.955, bottom=0.55 / height, top=1 - 0.62 / height)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="magma",
                       norm=LogNorm(vmin=max(lo, hi * 1e-6), vmax=hi), origin="lower",
                       extent=(-0.5, m.shape[1] - 0.5, layers[0] - 0.5, layers[-1] + 0.5))
        ax.set_xlabel("channel")
        ax.set_ylabel("layer")
        _rug(ax, [c for _, c in cos])
        what = {"chan_absmax": "channel abs-max", "chan_median": "channel median |x|",
                "chan_mean": "channel mean |x|"}.get(stat, stat)
        ax.set_title(f"{position}" + (f" ({alias})" if alias else "") + f": {what} per layer"
                     + (f"; {len({c for _, c in cos})} CO channel(s) marked above" if cos else ""), pad=16)
        cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04)
        cb.set_label("|x|")
        png = _png(fig)
    caption = (f"The {what} of every channel (x) at every layer (y) at {position}, on a log colour scale. A "
               "channel-wise outlier is a vertical stripe: the same channel is large in many layers and for most "
               "tokens; an isolated bright spot is usually a massive activation on a single token. Red marks "
               "above the map: the channels detected as channel-wise outliers at this position.")
    return Figure(name or f"heatmap_{safe_name(position)}", f"Channel heatmap, {position}", caption, png, "heatmaps")


# -- (d) norm gains ---------------------------------------------------------------------------------------------
def gain_matrix(arrays: Mapping, norm: str) -> tuple[list[int], np.ndarray] | None:
    pat = re.compile(rf"^weights\.L(\d+)\.gain\.{re.escape(norm)}$")
    found = sorted((int(m.group(1)), k) for k in arrays if (m := pat.match(k)))
    if not found:
        return None
    rows = [np.abs(_np(arrays[k])) for _, k in found]
    if len({r.shape[0] for r in rows}) != 1:
        return None
    return [l for l, _ in found], np.stack(rows)


def norms_in(arrays: Mapping) -> list[str]:
    seen: dict[str, None] = {}
    for k in arrays:
        m = re.match(r"^weights\.L\d+\.gain\.(.+)$", k)
        if m:
            seen.setdefault(m.group(1), None)
    return list(seen)


def gamma_figure(report: Mapping, arrays: Mapping, norm: str, name: str | None = None) -> Figure | None:
    """|gamma| of ``norm`` per layer: a layers x channels map and all layers overlaid, CO channels marked."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    got = gain_matrix(arrays, norm)
    if got is None:
        return None
    layers, g = got
    gp = _positive(g)[0]
    ratio = gp / np.maximum(np.median(gp, axis=1, keepdims=True), 1e-12)
    # the norm's output position carries the norm's name in every adapter
    cos = [(l, c) for l, c, _ in _co_by_position(report).get(norm, [])]
    row_of = {l: i for i, l in enumerate(layers)}
    with _style():
        fig = _new_figure(12, 4.4)
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.89, wspace=0.22)
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
        rmax = float(ratio.max())
        im = ax1.imshow(ratio, aspect="auto", interpolation="nearest", cmap="viridis",
                        norm=LogNorm(vmin=max(float(ratio.min()), 1e-3), vmax=max(rmax, 10.0)), origin="lower",
                        extent=(-0.5, g.shape[1] - 0.5, layers[0] - 0.5, layers[-1] + 0.5))
        ax1.set_xlabel("channel")
        ax1.set_ylabel("layer")
        _rug(ax1, [c for _, c in cos])
        ax1.set_title(f"{norm}: |gamma| / median |gamma| of its layer", pad=12)
        fig.colorbar(im, ax=ax1, pad=0.01, fraction=0.04)
        cmap = colormaps["viridis"]
        x = np.arange(g.shape[1])
        for i, l in enumerate(layers):
            ax2.plot(x, gp[i], color=cmap(i / max(len(layers) - 1, 1)), linewidth=0.6, alpha=0.7)
        pts = [(c, gp[row_of[l], c]) for l, c in cos if l in row_of and c < g.shape[1]]
        if pts:
            ax2.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, facecolors="none", edgecolors=_AFTER,
                        linewidths=1.0, label="CO at this norm output", zorder=3)
            ax2.legend(fontsize=7, loc="upper right")
        ax2.set_yscale("log")
        ax2.set_xlabel("channel")
        ax2.set_ylabel("|gamma|")
        ax2.set_title(f"|gamma| vs channel, all {len(layers)} layers (colour = layer)")
        ax2.grid(True, alpha=0.3)
        png = _png(fig)
    caption = (f"The effective gain |gamma| of {norm} (the per-channel rescaling applied after normalization). "
               "Left: each gain relative to the median gain of its layer (bright = an outlier gain; a vertical "
               "stripe = the same channel in many layers). Right: |gamma| of every layer overlaid. A few very "
               "large gains make the same channels large for every token, i.e. channel-wise outliers at the norm "
               "output; red marks and circles show the channels detected as COs there.")
    return Figure(name or f"gamma_{safe_name(norm)}", f"Norm gains, {norm}", caption, png, "gamma")


# -- (e) mitigation before/after --------------------------------------------------------------------------------
def method_label(methods) -> str:
    if methods is None:
        return "mitigation"
    if isinstance(methods, str):
        return methods
    names = []
    for m in methods:
        names.append(m.get("method", "?") if isinstance(m, Mapping) else str(m))
    return "+".join(names) or "none"


def mitigation_runs(doc: Mapping | list | None) -> list[dict]:
    """``mitigate.json`` as a list of runs {label, methods, before, after, seconds, ...}.

    Accepts one run (``methods``, ``before``, ``after``, ``seconds``), ``{"runs": [...]}`` or a list of runs.
    """
    if not doc:
        return []
    runs = doc if isinstance(doc, list) else doc.get("runs") if isinstance(doc.get("runs"), list) else [doc]
    out = []
    for r in runs:
        if not isinstance(r, Mapping) or not isinstance(r.get("before"), Mapping) \
                or not isinstance(r.get("after"), Mapping):
            continue
        out.append({**r, "label": r.get("label") or method_label(r.get("methods"))})
    return out


SUMMARY_KEYS = (("resid_max", "residual max |h|"), ("down_in_max", "down-proj input max"),
                ("co_ratio_max", "CO ratio max"), ("ppl", "perplexity"))


def mitigation_figure(doc, name: str = "mitigation") -> Figure | None:
    """Residual max per layer before vs after (when per-layer data exists) and grouped summary bars."""
    runs = mitigation_runs(doc)
    if not runs:
        return None
    per_layer = [r for r in runs if r["before"].get("resid_max_per_layer") and r["after"].get("resid_max_per_layer")]
    with _style():
        n = 2 if per_layer else 1
        fig = _new_figure(6.0 * n, 4.2)
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
        axes = fig.subplots(1, n, squeeze=False)[0]
        if per_layer:
            ax = axes[0]
            b = per_layer[0]["before"]
            ax.plot(b["resid_max_per_layer"], "-o", color=_BEFORE, markersize=3, label="before: block.out max")
            if b.get("down_in_max_per_layer"):
                ax.plot(b["down_in_max_per_layer"], ":", color=_BEFORE, label="before: down-proj input max")
            colors = ["#d1495b", "#edae49", "#00798c", "#66a182", "#8d96a3", "#2e4057"]
            for i, r in enumerate(per_layer):
                col = colors[i % len(colors)]
                ax.plot(r["after"]["resid_max_per_layer"], "-o", color=col, markersize=3,
                        label=f"after {_tex(r['label'])}: block.out max")
                if r["after"].get("down_in_max_per_layer") and len(per_layer) == 1:
                    ax.plot(r["after"]["down_in_max_per_layer"], ":", color=col,
                            label=f"after {_tex(r['label'])}: down-proj input max")
            ax.set_yscale("log")
            ax.set_xlabel("layer")
            ax.set_ylabel("max |x|")
            ax.set_title("max |x| per layer, before vs after")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        ax = axes[-1]
        keys = [(k, lab) for k, lab in SUMMARY_KEYS if runs[0]["before"].get(k) is not None]
        width = 0.8 / (1 + len(runs))
        xs = np.arange(len(keys))
        bvals = [float(runs[0]["before"][k]) for k, _ in keys]
        ax.bar(xs - 0.4 + width / 2, bvals, width, color=_BEFORE, label="before")
        colors = ["#d1495b", "#edae49", "#00798c", "#66a182", "#8d96a3", "#2e4057"]
        for j, r in enumerate(runs):
            avals = [float(r["after"].get(k) or np.nan) for k, _ in keys]
            bars = ax.bar(xs - 0.4 + width * (j + 1.5), avals, width, color=colors[j % len(colors)],
                          label=f"after {_tex(r['label'])}")
            for bar, bv, av in zip(bars, bvals, avals):
                if np.isfinite(av) and av > 0:
                    ax.annotate(f"/{bv / av:.3g}" if bv / av >= 1.01 else f"x{av / bv:.3g}",
                                (bar.get_x() + bar.get_width() / 2, av), textcoords="offset points",
                                xytext=(0, 2), ha="center", fontsize=7)
        ax.set_xticks(xs, [lab for _, lab in keys], fontsize=8)
        ax.set_yscale("log")
        ax.set_title("summary, before vs after (/n: n times smaller, xn: n times larger)")
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        png = _png(fig)
    caption = ("What the mitigation changed, measured on the evaluation windows. Left: the largest |x| of the "
               "residual stream (solid) and of the down-projection input (dotted) at every layer. Right: the "
               "headline numbers; the label on each bar says how many times smaller (/n) or larger (xn) the "
               "value became.")
    return Figure(name, "Mitigation: before vs after", caption, png, "mitigation")


# -- comparison table as a picture ------------------------------------------------------------------------------
def compare_figure(doc: Mapping | None, name: str = "compare") -> Figure | None:
    """Perplexity change (%) vs the unmitigated full-precision model for every (method, quantization) cell."""
    cells = (doc or {}).get("cells") or []
    if not cells:
        return None
    methods = list(dict.fromkeys(c["method"] for c in cells))
    quants = list(dict.fromkeys(c["quant"] for c in cells))
    m = np.full((len(methods), len(quants)), np.nan)
    txt = [["" for _ in quants] for _ in methods]
    for c in cells:
        i, j = methods.index(c["method"]), quants.index(c["quant"])
        if c.get("status") == "ok" and c.get("ppl") is not None:
            m[i, j] = c.get("rel_delta_pct") if c.get("rel_delta_pct") is not None else np.nan
            txt[i][j] = f"{c['ppl']:.2f}" + (f"\n{c['rel_delta_pct']:+.1f}%" if c.get("rel_delta_pct") is not None
                                             else "")
        else:
            txt[i][j] = c.get("status") or "n/a"
    from matplotlib import colormaps
    from matplotlib.colors import SymLogNorm

    with _style():
        fig = _new_figure(1.8 + 1.3 * len(quants), 1.2 + 0.55 * len(methods))
        ax = fig.add_subplot(1, 1, 1)
        finite = np.abs(m[np.isfinite(m)])
        vmax = float(finite.max()) if finite.size else 1.0
        cmap = colormaps["RdYlGn_r"].with_extremes(bad="#e3e3e3")
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, aspect="auto",
                       norm=SymLogNorm(linthresh=1.0, vmin=-max(vmax, 1.0), vmax=max(vmax, 1.0)))
        for i in range(len(methods)):
            for j in range(len(quants)):
                ax.text(j, i, txt[i][j], ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(quants)), [_tex(q) for q in quants], fontsize=8)
        ax.set_yticks(range(len(methods)), [_tex(x) for x in methods], fontsize=8)
        ax.set_title("perplexity and change vs none / fp")
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04).set_label("change %")
        fig.tight_layout()
        png = _png(fig)
    caption = ("Perplexity of every mitigation (rows) under every quantization setting (columns), with its change "
               "relative to the unmitigated full-precision model; green is better, red worse.")
    return Figure(name, "Comparison: mitigation x quantization", caption, png, "compare")


# -- quantization error per linear ------------------------------------------------------------------------------
def quant_error_matrix(doc: Mapping | None) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """(roles, layers, rel MSE [role, layer], activation share [role, layer]) of a quant_error.json; NaN where a
    layer has no linear of that role. The share is act / (act + weight) of the one-sided errors."""
    from ..evaluation.sqnr import QuantErrorReport

    rows = [r for r in QuantErrorReport.from_json(doc or {}).rows if r.layer is not None]
    roles = list(dict.fromkeys(r.role for r in rows))
    layers = sorted({int(r.layer) for r in rows})
    err = np.full((len(roles), len(layers)), np.nan)
    share = np.full_like(err, np.nan)
    for r in rows:
        i, j = roles.index(r.role), layers.index(int(r.layer))
        err[i, j] = r.rel_mse
        a, w = r.rel_mse_act, r.rel_mse_weight
        share[i, j] = a / (a + w) if a + w > 0 else np.nan
    return roles, layers, err, share


def quant_error_figure(doc: Mapping | None, name: str = "quant_error") -> Figure | None:
    """Relative output error of every linear (layers x roles, log colour) and which quantization causes it."""
    roles, layers, err, share = quant_error_matrix(doc)
    if not roles:
        return None
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    setting = f"{doc.get('quant')} after {'+'.join(doc.get('methods') or ['none'])}"
    with _style():
        fig = _new_figure(min(3.0 + 0.28 * len(layers), 16.0), 1.6 + 0.62 * len(roles))
        axes = fig.subplots(2, 1, sharex=True)
        finite = err[np.isfinite(err) & (err > 0)]
        lo = float(finite.min()) if finite.size else 1e-6
        hi = float(finite.max()) if finite.size else 1.0
        im = axes[0].imshow(np.ma.masked_invalid(np.where(err > 0, err, np.nan)), aspect="auto",
                            cmap=colormaps["magma_r"].with_extremes(bad="#e3e3e3"),
                            norm=LogNorm(vmin=lo, vmax=max(hi, lo * 10)))
        fig.colorbar(im, ax=axes[0], pad=0.01, fraction=0.04).set_label("relative MSE")
        axes[0].set_title(_tex(f"relative output error per linear, {setting}"))
        im2 = axes[1].imshow(np.ma.masked_invalid(share), aspect="auto", vmin=0.0, vmax=1.0,
                             cmap=colormaps["coolwarm"].with_extremes(bad="#e3e3e3"))
        fig.colorbar(im2, ax=axes[1], pad=0.01, fraction=0.04).set_label("activation share")
        axes[1].set_title("cause: activation (red) or weight (blue) quantization")
        for ax in axes:
            ax.set_yticks(range(len(roles)), [_tex(r) for r in roles], fontsize=8)
        step = max(1, len(layers) // 30)
        axes[1].set_xticks(range(0, len(layers), step), [str(x) for x in layers[::step]], fontsize=8)
        axes[1].set_xlabel("layer")
        worst = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(err), err, -1.0))), err.shape)
        for ax in axes:
            ax.add_patch(_worst_box(worst[1], worst[0]))
        fig.tight_layout()
        png = _png(fig)
    caption = (f"Each linear's output error under {setting}: the mean over tokens of |y_q - y|^2 / |y|^2 (top, "
               "log scale; the box marks the worst), and the share of it that quantizing the activations alone "
               "gives against quantizing the weights alone (bottom). Activation-dominated linears sit where the "
               "outliers are: their input's abs-max sets the quantization scale.")
    return Figure(name, f"Quantization error per linear ({setting})", caption, png, "quant_error")


def _worst_box(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#00a36c", linewidth=2)


# -- everything -------------------------------------------------------------------------------------------------
def landscape_figures(before: Mapping | None, after: Mapping | None = None, tokens: list[str] | None = None,
                      **kwargs) -> list[Figure]:
    from .landscape import parse_key

    out = []
    for k in sorted(before or {}, key=lambda k: (parse_key(k) or (0, k))):
        parsed = parse_key(k)
        if parsed is None:
            continue
        layer, pos = parsed
        a = (after or {}).get(k)
        out.append(landscape_figure(before[k], a, layer, pos, tokens=tokens, **kwargs))
    return out


def all_figures(report: Mapping | None, arrays: Mapping | None, landscapes_before: Mapping | None = None,
                landscapes_after: Mapping | None = None, mitigate: Mapping | list | None = None,
                compare: Mapping | None = None, tokens: list[str] | None = None,
                quant_error: Mapping | None = None,
                heatmap_positions: Iterable[str] = HEATMAP_POSITIONS) -> list[Figure]:
    """Every figure whose data exists, in the report's order."""
    figs: list[Figure] = []
    arrays = arrays or {}
    if landscapes_before:
        figs += landscape_figures(landscapes_before, landscapes_after, tokens)
    elif landscapes_after:
        figs += landscape_figures(landscapes_after, None, tokens)
    if report:
        f = topk_figure(report)
        if f:
            figs.append(f)
        present = positions_in(report)
        for pos in heatmap_positions:
            if pos in present:
                f = heatmap_figure(report, arrays, pos)
                if f:
                    figs.append(f)
        for norm in norms_in(arrays):
            f = gamma_figure(report, arrays, norm)
            if f:
                figs.append(f)
    f = mitigation_figure(mitigate)
    if f:
        figs.append(f)
    f = compare_figure(compare)
    if f:
        figs.append(f)
    f = quant_error_figure(quant_error)
    if f:
        figs.append(f)
    return figs


__all__ = ["Figure", "all_figures", "compare_figure", "gamma_figure", "heatmap_figure", "landscape_figure",
           "landscape_figures", "mitigation_figure", "mitigation_runs", "quant_error_figure", "quant_error_matrix",
           "topk_figure", "topk_series", "write"]
