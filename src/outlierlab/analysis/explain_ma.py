"""Massive activations: where each one is born, which channels and weights make it, whether ablating the
weight removes it, and how the residual stream carries it until it is cancelled.

Definitions (all measured, none assumed):

- **Group**: the MA records of a profile at the *tracked* positions (residual stream ``attn.in`` / ``mlp.in`` /
  ``block.out`` and the raw writer outputs ``attn.out`` / ``mlp.out``, plus post-norms where a family has them)
  that share (token index, channel). Its ``value`` is the largest |x| on the residual stream (on the tracked
  positions when the residual never holds it, e.g. an FFN output a post-norm squashes).
- **Origin layer**: the first layer at which |x[token, channel]| on a tracked position reaches
  ``origin_fraction`` (0.5) of the group's peak, read from one forward of the window where the MA is largest.
  Earlier hits of the MA rule in the same channel are reported as ``first_detected`` / ``precursor``.
- **Writer**: the projection (FFN down projection or attention output projection) whose raw output at
  (token, channel) is larger in the origin layer.
- **Origin position**: the first position of the writer's branch, in execution order, where the token holds
  an MA by the profile's rule (|x| > max(ma_abs, ma_rel x the tensor's median)); the writer output if none.
- **Super-weight candidates**: the entries W[channel, j] of the writer whose term W[channel, j] * x_in[j]
  carries at least ``min_share`` of the writer output, at most ``max_candidates`` per MA.
- **Span**: the layers from the origin on whose residual output (``block.out``) still holds at least
  ``origin_fraction`` of the MA's residual peak (for an MA that never reaches the residual stream: the layers
  whose tracked positions do); late layers that cancel it write large values of their own and are left out.
- **Verified**: after zeroing the candidate, |x[token, channel]| is at or below the MA rule's threshold at
  every tracked position of every layer of the span (thresholds from the unablated profile's medians).
  Each candidate is ablated alone, then all candidates of the MA together (``joint_ablation``).
- **Cancellation**: layers after the peak where the residual value loses at least ``cancel_step`` of the peak
  magnitude; ``cancelled_at`` is the first layer where it falls below ``cancel_fraction`` of the peak.
"""

from __future__ import annotations

import math

import torch

from ..adapters.base import Adapter
from .layout import (
    HIDDEN_POSITIONS,
    RESIDUAL_POSITIONS,
    WRITER_POSITIONS,
    capture_token_rows,
    linear_parts,
    same_as_map,
)

TRACK_POSITIONS = ("attn.in", "attn.out", "attn.post_norm", "mlp.in", "mlp.out", "mlp.post_norm", "block.out")


def _f(x) -> float | None:
    return None if x is None else float(x)


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


def _median_of(profile, layer: int, position: str) -> float | None:
    r = profile.results.get((layer, position))
    return None if r is None else float(r.stats["median"])


def _chain(rows: _Rows, profile, adapter: Adapter, layer: int, token: int, channel: int, detect) -> list[dict]:
    chain = []
    for p in adapter.positions():
        row = rows.row(layer, p.name, token)
        if row is None:
            continue
        a = row.abs()
        top = int(a.argmax())
        med = _median_of(profile, layer, p.name)
        thr = threshold(profile, layer, p.name, detect)
        entry = {"position": p.name, "alias": p.alias, "token_absmax": float(a[top]), "top_channel": top,
                 "top_value": float(row[top]), "median": med, "threshold": thr,
                 "is_ma": thr is not None and float(a[top]) > thr}
        if p.name in HIDDEN_POSITIONS and channel < row.numel():
            entry["value"] = float(row[channel])
        chain.append(entry)
    return chain


def _log_ratio(v: float | None, med: float | None) -> float:
    if v is None or not med or med <= 0:
        return 0.0
    return max(math.log10(max(abs(v), 1e-30) / med), 0.0)


def _rows_feeding(adapter: Adapter, parts, layer: int, j: int, rows: _Rows, token: int, roles) -> list[dict]:
    """The rows of W_gate / W_up (or W_fc1) producing intermediate channel ``j``, and their alignment with the
    norm output at ``token``: cosine, rank of that cosine among all rows, and the input channels driving it."""
    out = []
    for part in parts:
        if part.role not in roles:
            continue
        x = rows.row(layer, part.input_position, token)
        if x is None:
            continue
        w = part.weight(adapter, layer)
        if j >= w.shape[0]:
            continue
        x = x.to(w.device)
        dots = w @ x
        norms = w.norm(dim=1)
        xn = float(x.norm())
        cos_all = dots / (norms * xn).clamp_min(1e-30)
        cos = float(cos_all[j])
        rank = int((cos_all.abs() > abs(cos)).sum()) + 1
        terms = (w[j] * x).cpu()
        x = x.cpu()
        k = min(3, terms.numel())
        idx = terms.abs().topk(k).indices
        dot = float(dots[j])
        bias = part.bias(adapter, layer)
        out.append({
            "role": part.role, "module": part.module, "row": j, "cosine": cos, "cosine_rank": rank,
            "rows": int(w.shape[0]), "row_norm": float(norms[j]),
            "row_norm_ratio": float(norms[j] / norms.median().clamp_min(1e-30)),
            "pre_activation": dot + (float(bias[j]) if bias is not None else 0.0),
            "drivers": [{"channel": int(c), "input": float(x[c]), "weight": float(w[j, c].cpu()),
                         "share": float(terms[c] / dot) if dot else None} for c in idx],
        })
    return out


def explain_group(g: dict, rows: _Rows, profile, adapter: Adapter, cfg) -> dict:
    """Origin, operator chain, writer decomposition and candidates of one MA group (no ablation yet)."""
    det = cfg.detect
    t, d = g["token_index"], g["channel"]
    series = _track_series(rows, adapter, t, d)
    peak = max(series) if series else 0.0
    origin_layer = next((i for i, v in enumerate(series) if peak > 0 and v >= cfg.origin_fraction * peak), None)
    prop = propagation(rows, adapter, t, d)
    res = {**g, "peak_tracked": peak, "propagation": prop,
           **cancellation(prop, cfg.cancel_step, cfg.cancel_fraction)}
    if origin_layer is None:
        res.update({"origin": None, "down_in_channels": [], "super_weights": [], "contributors": []})
        return res
    L = origin_layer
    pre = [abs(p["value"]) for p in prop[:L] if p["value"] is not None]
    res["precursor"] = {"max_before_origin": max(pre) if pre else 0.0,
                        "value_entering_origin": prop[L]["attn_in"]}
    names = set(adapter.position_names())
    writer_vals = {p: rows.at(L, p, t, d) for p in WRITER_POSITIONS if p in names}
    writer_vals = {p: v for p, v in writer_vals.items() if v is not None}
    writer = max(writer_vals, key=lambda p: abs(writer_vals[p])) if writer_vals else "mlp.out"
    chain = _chain(rows, profile, adapter, L, t, d, det)
    branch = writer.split(".")[0] + "."
    entry_pos = {"mlp.": "mlp.in", "attn.": "attn.in"}[branch]
    origin_pos = next((c["position"] for c in chain
                       if c["position"].startswith(branch) and c["position"] != entry_pos and c["is_ma"]), writer)
    alias = next((p.alias for p in adapter.positions() if p.name == origin_pos), None)
    if g["on_residual"]:  # the layers whose output still carries the MA (not the late writes that cancel it)
        resid = [abs(p["value"]) if p["value"] is not None else 0.0 for p in prop]
        top = max(resid) if resid else 0.0
        span = [i for i in range(L, len(resid)) if top > 0 and resid[i] >= cfg.origin_fraction * top] or [L]
    else:
        span = [i for i in range(L, len(series)) if series[i] >= cfg.origin_fraction * peak]
    res["origin"] = {"layer": L, "position": origin_pos, "alias": alias, "writer": writer,
                     "writer_value": writer_vals.get(writer), "span": span}
    res["chain"] = chain

    parts = linear_parts(adapter, L)
    wpart = next((p for p in parts if p.output_position == writer), None)
    if wpart is None:
        res.update({"down_in_channels": [], "super_weights": [], "contributors": []})
        return res
    x_in = rows.row(L, wpart.input_position, t)
    W = wpart.weight(adapter, L)
    terms = W[d].cpu() * x_in
    bias = wpart.bias(adapter, L)
    b = float(bias[d]) if bias is not None else 0.0
    total = float(terms.sum()) + b
    k = min(cfg.top_contributors, terms.numel())
    idx = terms.abs().topk(k).indices.tolist()
    w_med = float(W.abs().median().clamp_min(1e-30))
    contributors = [{"channel": j, "input": float(x_in[j]), "weight": float(W[d, j]),
                     "contribution": float(terms[j]), "share": float(terms[j]) / total if total else None}
                    for j in idx]
    res["decomposition"] = {"module": wpart.module, "input_position": wpart.input_position,
                            "output": total, "bias": b, "captured": writer_vals.get(writer),
                            "n_terms": int(terms.numel())}
    res["contributors"] = contributors

    strong = [c for c in contributors if c["share"] is not None and abs(c["share"]) >= cfg.min_share]
    carriers = strong[:cfg.top_channels] or contributors[:1]
    glu = adapter.ffn_kind == "glu"
    channels = []
    for c in carriers:
        j = c["channel"]
        item = {"channel": j, "value": c["input"], "share": c["share"]}
        if branch == "mlp.":
            if glu:
                gate, up, act = (rows.at(L, p, t, j) for p in ("mlp.gate", "mlp.up", "mlp.act"))
                lg = _log_ratio(act, _median_of(profile, L, "mlp.act"))
                lu = _log_ratio(up, _median_of(profile, L, "mlp.up"))
                share = lg / (lg + lu) if lg + lu > 0 else None
                label = None if share is None else ("gate" if share >= 0.65 else "up" if share <= 0.35 else "both")
                item.update({"gate": gate, "up": up, "act": act, "gate_log_ratio": lg, "up_log_ratio": lu,
                             "gate_share": share, "branch": label})
                roles = ("gate", "up")
            else:
                item.update({"gate": rows.at(L, "mlp.fc1", t, j), "up": None, "act": rows.at(L, "mlp.act", t, j),
                             "branch": "fc1"})
                roles = ("fc1",)
            item["rows"] = _rows_feeding(adapter, parts, L, j, rows, t, roles)
        else:
            item.update({"gate": None, "up": None})
        channels.append(item)
    res["down_in_channels"] = channels

    cands = strong[:cfg.max_candidates] or contributors[:1]
    sws = []
    for c in cands:
        j = c["channel"]
        sw = {"module": wpart.module, "role": wpart.role, "layer": L, "row": d, "col": j,
              "value": c["weight"], "weight_ratio": abs(c["weight"]) / w_med,
              "contribution": c["contribution"], "share": c["share"],
              "verified": None, "ma_after": None, "ppl_before": None, "ppl_after": None}
        if wpart.spec.transposed:
            sw["storage_index"] = [j, d]
        sws.append(sw)
    res["super_weights"] = sws
    if len(sws) > 1:
        res["joint_ablation"] = {"weights": [{"module": s["module"], "row": s["row"], "col": s["col"]}
                                             for s in sws],
                                 "verified": None, "ma_after": None, "ppl_before": None, "ppl_after": None}
    return res


def _weight_param(adapter: Adapter, key: tuple):
    layer, module, row, col = key
    part = next(p for p in linear_parts(adapter, layer) if p.module == module)
    param = adapter.layers()[layer].get_submodule(part.spec.module).weight
    idx = (col, row) if part.spec.transposed else (row, col)
    return param, idx


def _key(sw: dict) -> tuple:
    return (sw["layer"], sw["module"], sw["row"], sw["col"])


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
            if p not in names:
                continue
            v = rows.at(layer, p, t, d)
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


@torch.no_grad()
def ablate(model, adapter: Adapter, groups: list[dict], ids: torch.Tensor, profile, cfg, eval_ids,
           ppl_fn, progress=None) -> dict:
    """Zero each distinct super-weight candidate in turn, then each MA's candidates together (restored
    exactly in a ``finally``), re-run the windows of the MAs concerned and the evaluation windows, and fill
    the ablation fields. At most ``cfg.max_ablations`` ablation runs, in MA order."""
    smap = same_as_map(adapter)
    names = set(adapter.position_names())
    track = [p for p in TRACK_POSITIONS if p in names]
    jobs: dict[tuple, list[tuple[dict, dict]]] = {}
    for g in groups:
        targets = [((_key(sw),), sw) for sw in g.get("super_weights", [])]
        if g.get("joint_ablation"):
            targets.append((tuple(_key(sw) for sw in g["super_weights"]), g["joint_ablation"]))
        for key, target in targets:
            if key not in jobs and len(jobs) >= cfg.max_ablations:
                target["skipped"] = "max_ablations reached"
                continue
            jobs.setdefault(key, []).append((g, target))
    base = ppl_fn() if (ppl_fn is not None and jobs) else None
    for key, users in jobs.items():
        params = [_weight_param(adapter, k) for k in key]
        originals = [param[idx].clone() for param, idx in params]
        try:
            for param, idx in params:
                param[idx] = 0.0
            by_window: dict[int, list[int]] = {}
            for g, _ in users:
                toks = by_window.setdefault(g["window"], [])
                if g["token_index"] not in toks:
                    toks.append(g["token_index"])
            caps = {w: _Rows(capture_token_rows(model, adapter, ids[w], toks, positions=track), toks, smap)
                    for w, toks in by_window.items()}
            after_ppl = ppl_fn() if ppl_fn is not None else None
        finally:
            for (param, idx), orig in zip(reversed(params), reversed(originals)):
                param[idx] = orig
        for g, target in users:
            target.update(ma_after_ablation(caps[g["window"]], profile, adapter, g, cfg.detect))
            target["ppl_before"], target["ppl_after"] = base, after_ppl
        if progress is not None:
            progress()
    return {"ppl_baseline": base, "ablations": len(jobs)}
