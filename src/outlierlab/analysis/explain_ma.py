"""Massive activations: the writes that build each one (origin steps, :mod:`.attribution`), the weights,
gains or biases whose ablation removes it, and how the residual stream carries it until it is cancelled.

Definitions (all measured, none assumed):

- **Group**: the MA records of a profile at the *tracked* positions (residual stream ``attn.in`` / ``mlp.in`` /
  ``block.out`` and the raw writer outputs ``attn.out`` / ``mlp.out``, plus post-norms where a family has them)
  that share (token index, channel). Its ``value`` is the largest |x| on the residual stream (on the tracked
  positions when the residual never holds it, e.g. an FFN output a post-norm squashes).
- **Origin steps**: the branches whose residual write is at least ``step_share`` of the peak, in order
  (:func:`.attribution.origin_steps`); the first one is the group's ``origin`` (layer, the first MA-rule hit of
  its branch as ``position``, ``writer``). Earlier MA-rule hits are ``first_detected`` / ``precursor``.
- **Super-weight candidates**: the weight entries W[channel, j] of the ``down_proj`` / ``o_proj`` steps whose
  term carries at least ``min_share`` of the projection output, at most ``max_candidates`` per step.
- **Span**: the layers from the origin on whose residual output (``block.out``) still holds at least
  ``origin_fraction`` of the MA's residual peak (for an MA that never reaches the residual stream: the layers
  whose tracked positions do); late layers that cancel it write large values of their own and are left out.
- **Verified**: after the ablation, |x[token, channel]| is at or below the MA rule's threshold at every
  tracked position of every layer of the span (thresholds from the unablated profile's medians). Ablated: all
  steps together (``steps_joint``: the MA is *explained* when it is verified), each step, each candidate alone,
  the candidates together (``joint_ablation``).
- **Cancellation**: layers after the peak where the residual value loses at least ``cancel_step`` of the peak
  magnitude; ``cancelled_at`` is the first layer where it falls below ``cancel_fraction`` of the peak.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..adapters.base import Adapter
from .attribution import (
    Decomposition,
    median_of,
    origin_steps,
    weight_edit,
    writer_part,
)
from .layout import (
    HIDDEN_POSITIONS,
    RESIDUAL_POSITIONS,
    capture_token_rows,
    linear_parts,
    same_as_map,
)
from .records import Ablation, Edit

TRACK_POSITIONS = ("attn.in", "attn.out", "attn.post_norm", "mlp.in", "mlp.out", "mlp.post_norm", "block.out")


def threshold(profile, layer: int, position: str, detect) -> float | None:
    r = profile.results.get((layer, position))
    if r is None:
        return None
    return max(detect.ma_abs, detect.ma_rel * float(r.stats["median"]))


def group_massive(profile, adapter: Adapter) -> list[dict]:
    """MA records at tracked positions grouped by (token index, channel), residual groups first, then by |value|."""
    names = set(adapter.position_names())
    tracked = [p for p in TRACK_POSITIONS if p in names]
    order = {p: i for i, p in enumerate(adapter.position_names())}
    groups: dict[tuple[int, int], dict] = {}
    for m in profile.massive_activations:
        if m["position"] not in tracked:
            continue
        key = (m["token_index"], m["channel"])
        g = groups.setdefault(key, {"token_index": key[0], "channel": key[1], "records": []})
        g["records"].append(m)
    out = []
    for g in groups.values():
        recs = g.pop("records")
        resid = [m for m in recs if m["position"] in RESIDUAL_POSITIONS]
        best = max(resid or recs, key=lambda m: abs(m["value"]))
        first = min(recs, key=lambda m: (m["layer"], order.get(m["position"], 99)))
        g.update({
            "value": float(best["value"]),
            "on_residual": bool(resid),
            "token": best.get("token"),
            "window": int(best["window"]) if best.get("window") is not None else 0,
            "first_detected": {"layer": first["layer"], "position": first["position"],
                               "value": float(first["value"])},
            "layers_detected": sorted({m["layer"] for m in recs}),
        })
        out.append(g)
    out.sort(key=lambda g: (not g["on_residual"], -abs(g["value"])))
    return out


class _Rows:
    """Token rows of one window, read through same-as aliases."""

    def __init__(self, rows: dict, tokens: list[int], smap: dict[str, str]):
        self.rows, self.tokens, self.smap = rows, tokens, smap

    def row(self, layer: int, position: str, token: int) -> torch.Tensor | None:
        t = self.rows.get((layer, self.smap.get(position, position)))
        if t is None or token not in self.tokens:
            return None
        return t[self.tokens.index(token)]

    def at(self, layer: int, position: str, token: int, channel: int) -> float | None:
        r = self.row(layer, position, token)
        if r is None or channel >= r.numel():
            return None
        return float(r[channel])


def propagation(rows: _Rows, adapter: Adapter, token: int, channel: int) -> list[dict]:
    """Per layer: residual values at (token, channel) and the attention / FFN contributions."""
    out = []
    for layer in range(adapter.n_layers):
        ai = rows.at(layer, "attn.in", token, channel)
        mi = rows.at(layer, "mlp.in", token, channel)
        bo = rows.at(layer, "block.out", token, channel)
        ao = rows.at(layer, "attn.out", token, channel)
        mo = rows.at(layer, "mlp.out", token, channel)
        if adapter.parallel:
            attn = ao
            ffn = None if None in (bo, ai, ao) else bo - ai - ao
        else:
            attn = None if None in (mi, ai) else mi - ai
            ffn = None if None in (bo, mi) else bo - mi
        entry = {"layer": layer, "value": bo, "attn_in": ai, "mlp_in": mi, "attn": attn, "ffn": ffn,
                 "attn_out": ao, "mlp_out": mo}
        for extra in ("attn.post_norm", "mlp.post_norm"):
            v = rows.at(layer, extra, token, channel)
            if v is not None:
                entry[extra.replace(".", "_")] = v
        out.append(entry)
    return out


def _track_series(rows: _Rows, adapter: Adapter, token: int, channel: int) -> list[float]:
    names = set(adapter.position_names())
    series = []
    for layer in range(adapter.n_layers):
        vals = [rows.at(layer, p, token, channel) for p in TRACK_POSITIONS if p in names]
        vals = [abs(v) for v in vals if v is not None]
        series.append(max(vals) if vals else 0.0)
    return series


def cancellation(prop: list[dict], cancel_step: float, cancel_fraction: float) -> dict:
    vals = [p["value"] for p in prop]
    if not vals or any(v is None for v in vals):
        return {"peak_layer": None, "cancel_layers": [], "cancelled_at": None, "final_fraction": None}
    mags = [abs(v) for v in vals]
    peak_layer = max(range(len(mags)), key=lambda i: mags[i])
    peak = mags[peak_layer]
    layers, cancelled_at = [], None
    for layer in range(peak_layer + 1, len(vals)):
        drop = mags[layer - 1] - mags[layer]
        if peak > 0 and drop >= cancel_step * peak:
            p = prop[layer]
            parts = {k: p[k] for k in ("attn", "ffn") if p[k] is not None}
            sign = 1.0 if vals[layer - 1] >= 0 else -1.0
            by = min(parts, key=lambda k: sign * parts[k]) if parts else None
            layers.append({"layer": layer, "value": vals[layer], "drop": drop, "drop_fraction": drop / peak,
                           "by": by, "attn": p["attn"], "ffn": p["ffn"]})
        if cancelled_at is None and peak > 0 and mags[layer] < cancel_fraction * peak:
            cancelled_at = layer
    return {"peak_layer": peak_layer, "peak": vals[peak_layer], "cancel_layers": layers,
            "cancelled_at": cancelled_at, "final_fraction": mags[-1] / peak if peak > 0 else None}


def _chain(rows: _Rows, profile, adapter: Adapter, layer: int, token: int, channel: int, detect) -> list[dict]:
    chain = []
    for p in adapter.positions():
        row = rows.row(layer, p.name, token)
        if row is None:
            continue
        a = row.abs()
        top = int(a.argmax())
        med = median_of(profile, layer, p.name)
        thr = threshold(profile, layer, p.name, detect)
        entry = {"position": p.name, "alias": p.alias, "token_absmax": float(a[top]), "top_channel": top,
                 "top_value": float(row[top]), "median": med, "threshold": thr,
                 "is_ma": thr is not None and float(a[top]) > thr}
        if p.name in HIDDEN_POSITIONS and channel < row.numel():
            entry["value"] = float(row[channel])
        chain.append(entry)
    return chain


def _legacy_origin(g: dict, rows: _Rows, profile, adapter: Adapter, cfg, step, prop, series) -> dict:
    """``origin``, ``precursor`` and ``chain`` of the first origin step (the fields of explain 1.0)."""
    t, d, L = g["token_index"], g["channel"], step.layer
    pre = [abs(p["value"]) for p in prop[:L] if p["value"] is not None]
    chain = _chain(rows, profile, adapter, L, t, d, cfg.detect)
    branch = step.branch + "."
    origin_pos = next((c["position"] for c in chain if c["position"].startswith(branch)
                       and c["position"] != f"{step.branch}.in" and c["is_ma"]), step.writer)
    alias = next((p.alias for p in adapter.positions() if p.name == origin_pos), None)
    if g["on_residual"]:  # the layers whose output still carries the MA (not the late writes that cancel it)
        resid = [abs(p["value"]) if p["value"] is not None else 0.0 for p in prop]
        top = max(resid) if resid else 0.0
        span = [i for i in range(L, len(resid)) if top > 0 and resid[i] >= cfg.origin_fraction * top] or [L]
    else:
        peak = max(series) if series else 0.0
        span = [i for i in range(L, len(series)) if series[i] >= cfg.origin_fraction * peak] or [L]
    return {"origin": {"layer": L, "position": origin_pos, "alias": alias, "writer": step.writer,
                       "writer_value": step.writer_value, "span": span},
            "precursor": {"max_before_origin": max(pre) if pre else 0.0, "value_entering_origin": prop[L]["attn_in"]},
            "chain": chain}


def _legacy_writes(g: dict, rows: _Rows, adapter: Adapter, cfg, steps) -> dict:
    """``decomposition``, ``contributors``, ``down_in_channels``, ``super_weights`` and ``joint_ablation``:
    the first step's projection, and the weight entries of every step, each ablated alone."""
    out = {"down_in_channels": steps[0].channels, "contributors": [], "super_weights": []}
    first = steps[0]
    part = writer_part(adapter, first.layer, first.branch)
    if part is not None and rows.row(first.layer, part.input_position, g["token_index"]) is not None:
        dec = Decomposition(rows, adapter, part, first.layer, g["token_index"], g["channel"], cfg.top_contributors)
        out["decomposition"] = {"module": part.module, "input_position": part.input_position, "output": dec.total,
                                "bias": dec.bias or 0.0, "captured": first.writer_value, "n_terms": dec.n_terms}
        out["contributors"] = [{"channel": w.col, "input": w.input, "weight": w.weight,
                                "contribution": w.contribution, "share": w.share} for w in dec.terms]
    for step in steps:
        transposed = step.module is not None and writer_part(adapter, step.layer, step.branch).spec.transposed
        for w in step.weights if step.mechanism in ("down_proj", "o_proj") else []:
            sw = {"module": w.module, "role": w.role, "layer": step.layer, "row": w.row, "col": w.col,
                  "value": w.weight, "weight_ratio": w.weight_ratio, "contribution": w.contribution,
                  "share": w.share, "verified": None, "ma_after": None, "ppl_before": None, "ppl_after": None}
            if transposed:
                sw["storage_index"] = [w.col, w.row]
            out["super_weights"].append(sw)
    if len(out["super_weights"]) > 1:
        out["joint_ablation"] = {"weights": [{"module": s["module"], "row": s["row"], "col": s["col"]}
                                             for s in out["super_weights"]],
                                 "verified": None, "ma_after": None, "ppl_before": None, "ppl_after": None}
    return out


def explain_group(g: dict, rows: _Rows, profile, adapter: Adapter, cfg, reader=None) -> dict:
    """Origin steps (residual-growth attribution), operator chain, writer decomposition and super-weight
    candidates of one MA group (no ablation yet). ``reader(layer, token, channels)`` gives attention reads."""
    t, d = g["token_index"], g["channel"]
    series = _track_series(rows, adapter, t, d)
    prop = propagation(rows, adapter, t, d)
    canc = cancellation(prop, cfg.cancel_step, cfg.cancel_fraction)
    res = {**g, "peak_tracked": max(series) if series else 0.0, "propagation": prop, **canc}
    steps = origin_steps(g, rows, profile, adapter, cfg, prop, canc, series, reader)
    res["steps"] = steps
    res["steps_joint"] = Ablation(edits=list(key(e for s in steps for e in s.ablation.edits)))
    if not steps:
        res.update({"origin": None, "down_in_channels": [], "super_weights": [], "contributors": []})
        return res
    res.update(_legacy_origin(g, rows, profile, adapter, cfg, steps[0], prop, series))
    res.update(_legacy_writes(g, rows, adapter, cfg, steps))
    return res


def ma_after_ablation(rows: _Rows, profile, adapter: Adapter, g: dict, detect) -> dict:
    """Largest |x[token, channel]| on the tracked positions of the layers that carry the MA (``origin.span``),
    and whether it stays at or below the MA rule threshold there; also the largest from the origin on."""
    t, d = g["token_index"], g["channel"]
    span = set(g["origin"]["span"])
    names = set(adapter.position_names())
    worst, where, ok = 0.0, None, True
    worst_all, where_all = 0.0, None
    for layer in range(g["origin"]["layer"], adapter.n_layers):
        for p in TRACK_POSITIONS:
            v = rows.at(layer, p, t, d) if p in names else None
            if v is None:
                continue
            if abs(v) > worst_all:
                worst_all, where_all = abs(v), {"layer": layer, "position": p}
            if layer not in span:
                continue
            thr = threshold(profile, layer, p, detect)
            if abs(v) > worst:
                worst, where = abs(v), {"layer": layer, "position": p}
            if thr is not None and abs(v) > thr:
                ok = False
    resid = [rows.at(layer, "block.out", t, d) for layer in range(adapter.n_layers)]
    return {"ma_after": worst, "ma_after_at": where, "verified": ok, "ma_after_any_layer": worst_all,
            "ma_after_any_layer_at": where_all, "propagation_after": resid}


def key(edits) -> tuple[Edit, ...]:
    """The distinct edits, in a fixed order: one ablation run per key."""
    return tuple(sorted(set(edits), key=Edit.sort_key))


def ablation_targets(g: dict, adapter: Adapter) -> list[tuple[tuple[Edit, ...], object]]:
    """What one MA asks to ablate, most telling first: all its origin steps together (``steps_joint``), each
    step, each super-weight candidate alone, the candidates together (same keys share one run)."""
    steps = g.get("steps") or []
    out = [(key(g["steps_joint"].edits), g["steps_joint"])] if steps and g["steps_joint"].edits else []
    out += [(key(s.ablation.edits), s.ablation) for s in steps if s.ablation.edits]  # one step: the joint
    sws = [(sw, _sw_edit(adapter, sw)) for sw in g.get("super_weights", [])]
    out += [((e,), sw) for sw, e in sws]
    if g.get("joint_ablation"):
        out.append((key(e for _, e in sws), g["joint_ablation"]))
    return out


def _sw_edit(adapter: Adapter, sw: dict) -> Edit:
    part = next(p for p in linear_parts(adapter, sw["layer"]) if p.module == sw["module"] and p.role == sw["role"])
    return weight_edit(part, sw["layer"], sw["row"], sw["col"])


def _record(target, fields: dict) -> None:
    """Fill an ablation result into a legacy dict (super_weights, joint_ablation) or an :class:`Ablation`."""
    if isinstance(target, dict):
        target.update(fields)
        return
    for k, v in fields.items():
        if hasattr(target, k) and k != "edits":
            setattr(target, k, v)


@contextmanager
def edited(model, edits: tuple[Edit, ...]):
    """The model with ``edits`` applied; every entry restored bit-exactly on any exit."""
    params = [(model.get_submodule(e.module).get_parameter(e.param), e.index, e.to) for e in edits]
    originals = []
    try:
        with torch.no_grad():
            for param, idx, to in params:
                originals.append(param[idx].clone())
                param[idx] = to
        yield model
    finally:
        with torch.no_grad():
            for (param, idx, _), orig in zip(reversed(params[:len(originals)]), reversed(originals)):
                param[idx] = orig


@torch.no_grad()
def ablate(model, adapter: Adapter, groups: list[dict], ids: torch.Tensor, profile, cfg, eval_ids,
           ppl_fn, progress=None) -> dict:
    """Run each distinct ablation of :func:`ablation_targets` once (edits restored in a ``finally``): the MA
    windows concerned are re-run and the evaluation windows give the perplexity. At most ``cfg.max_ablations``
    runs, in MA order; the rest are marked skipped."""
    smap = same_as_map(adapter)
    track = [p for p in TRACK_POSITIONS if p in set(adapter.position_names())]
    jobs: dict[tuple, list[tuple[dict, object]]] = {}
    for g in groups:
        for key, target in ablation_targets(g, adapter):
            if key not in jobs and len(jobs) >= cfg.max_ablations:
                _record(target, {"skipped": "max_ablations reached"})
                continue
            jobs.setdefault(key, []).append((g, target))
    base = ppl_fn() if (ppl_fn is not None and jobs) else None
    for key, users in jobs.items():
        by_window: dict[int, list[int]] = {}
        for g, _ in users:
            toks = by_window.setdefault(g["window"], [])
            if g["token_index"] not in toks:
                toks.append(g["token_index"])
        with edited(model, key):
            caps = {w: _Rows(capture_token_rows(model, adapter, ids[w], toks, positions=track), toks, smap)
                    for w, toks in by_window.items()}
            after_ppl = ppl_fn() if ppl_fn is not None else None
        for g, target in users:
            _record(target, {**ma_after_ablation(caps[g["window"]], profile, adapter, g, cfg.detect),
                             "ppl_before": base, "ppl_after": after_ppl})
        if progress is not None:
            progress()
    return {"ppl_baseline": base, "ablations": len(jobs)}
