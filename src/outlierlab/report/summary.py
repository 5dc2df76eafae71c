"""The answer in a few lines: the largest MA and its cause, the COs, the best mitigation, the quantization headline.

:func:`summarize` builds it from what :func:`outlierlab.report.html.collect` read (report.json with its
``explain`` section, mitigate.json, compare.json); the HTML report opens with it and ``outlierlab run`` prints it.
Every number comes from those files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.compare import best_per_quant
from ..fmt import change, num, pct, quoted, signed_pct, site
from . import figures as F
from .terminal import group_massive


@dataclass(frozen=True)
class Finding:
    """One line of the summary: its topic, the sentence, and the id of the report section with the details."""

    topic: str
    text: str
    anchor: str

    def line(self) -> str:
        return f"{self.topic}: {self.text}"


def summarize(data: Mapping) -> list[Finding]:
    """The summary of one run folder's data (the dict of :func:`~outlierlab.report.html.collect`)."""
    report, ex = data.get("report"), data.get("explain")
    found = [_ma_finding(report, ex), _co_finding(report, ex), _mitigation_finding(data.get("mitigate")),
             _compare_finding(data.get("compare")), _quant_error_finding(data.get("quant_error"))]
    return [f for f in found if f is not None]


def summary_lines(out_dir: str | Path) -> list[str]:
    """:func:`summarize` of a run folder as plain lines (``topic: sentence``)."""
    from .html import collect

    return [f.line() for f in summarize(collect(out_dir))]


# -- massive activation ------------------------------------------------------------------------------------------
def _ranges(layers: Iterable[int]) -> str:
    """Layers as runs: [2, 3, 4, 11, 12] -> ``2-4, 11-12``."""
    runs: list[list[int]] = []
    for n in sorted({int(x) for x in layers}):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _weights(ws: list[Mapping]) -> str:
    """``module[r, c]`` entries, the module named once per run of equal modules."""
    parts, last = [], None
    for w in ws:
        cell = f"[{w.get('row')}, {w.get('col')}]"
        parts.append(cell if w.get("module") == last else f"{w.get('module')}{cell}")
        last = w.get("module")
    return " and ".join(parts)


def steps_text(steps: list[Mapping]) -> str:
    """An MA's origin steps (explain 1.1): ``layer 11 mlp: made at y6 by W_down (100%)``, joined by ``; ``."""
    return "; ".join(f"layer {s.get('layer')} {s.get('branch')}: {s.get('label')} ({pct(s.get('share'))})"
                     for s in steps)


def _steps_cause(steps: list[Mapping], joint: Mapping) -> str:
    """The origin steps and whether ablating them all together removed the MA."""
    weights = [w for s in steps for w in s.get("weights") or []]
    built = steps_text(steps) + (f", through {_weights(weights)}" if weights else "")
    verified = joint.get("verified")
    if verified is None:
        return f"built by {built}; not ablated"
    state = "verified" if verified else "not verified"
    return f"built by {built}; {state}: ablating {'the step' if len(steps) == 1 else 'all steps'} leaves " \
           f"{num(joint.get('ma_after'))}"


def _cause(g: Mapping) -> str:
    """The origin steps and their ablation (explain 1.1), else what ablation verified among the super-weight
    candidates (explain 1.0), or the unverified candidates."""
    if g.get("steps"):
        return _steps_cause(g["steps"], g.get("steps_joint") or {})
    single = [sw for sw in g.get("super_weights") or [] if sw.get("verified")]
    joint = g.get("joint_ablation") or {}
    if single:
        sw = single[0]
        return (f"verified cause: zeroing {_weights([sw])} (= {num(sw.get('value'))}) removes it "
                f"(max left {num(sw.get('ma_after'))})")
    if joint.get("verified"):
        return (f"verified cause: zeroing {_weights(joint.get('weights') or [])} together removes it "
                f"(max left {num(joint.get('ma_after'))}); no single one does")
    cands = g.get("super_weights") or []
    if cands:
        return f"candidate writer {_weights(cands[:2])}, not verified by ablation"
    return "no writer found"


def _ma_finding(report: Mapping | None, ex: Mapping | None) -> Finding | None:
    groups = group_massive((report or {}).get("massive_activations") or [])
    explained = (ex or {}).get("massive_activations") or []
    if explained:
        g = max(explained, key=lambda m: abs(float(m.get("value") or 0)))
        key = (g.get("token_index"), g.get("channel"))
        seen = next((p for p in groups if (p["token_index"], p["channel"]) == key), None)
        layers = g.get("layers_detected") or (seen or {}).get("layers") or []
        o = g.get("origin") or {}
        born = f"born at {site(o.get('layer'), o.get('position'), o.get('alias'))}" if o else "origin not found"
        tail = f"{born}; {_cause(g)}"
        anchor = "explain"
    elif groups:
        g = groups[0]
        layers = g["layers"]
        why = "run explain for its cause" if ex is None else "the explain stage gave it no origin"
        tail = f"first seen at layer {g['first_layer']}, {g['first_position']} ({why})"
        anchor = "found"
    else:
        return None if report is None else Finding("massive activation", "none by the MA rule", "found")
    span = f"layers {_ranges(layers)}" if layers else "no layer recorded"
    if g.get("cancelled_at") is not None:
        span += f" (cancelled at layer {g['cancelled_at']})"
    token = f" {quoted(g.get('token'))}" if g.get("token") is not None else ""
    text = (f"{num(g.get('value'))} at token {g.get('token_index')}{token}, channel {g.get('channel')}, "
            f"{span}; {tail}")
    return Finding("largest massive activation", text, anchor)


# -- channel-wise outliers ---------------------------------------------------------------------------------------
def _co_finding(report: Mapping | None, ex: Mapping | None) -> Finding | None:
    if report is None:
        return None
    cos = report.get("channel_outliers") or []
    if not cos:
        return Finding("channel-wise outliers", "none by the CO rule", "found")
    counts = Counter(int(c["channel"]) for c in cos)
    top = max(cos, key=lambda c: c.get("ratio") or 0)
    n_pos = len({c["position"] for c in cos})
    text = (f"{num(len(cos))} records (layer, position, channel) at {n_pos} position{'s' * (n_pos != 1)}; "
            "most frequent channels " + ", ".join(f"{ch} ({n})" for ch, n in counts.most_common(3))
            + f"; largest {num(top.get('ratio'))}x (layer {top['layer']}, {top['position']}, channel "
            f"{top['channel']})")
    s = (ex or {}).get("summary") or {}
    if s.get("n_channel_outliers_at_norms") is not None and s.get("n_gamma_dominated") is not None:
        text += (f"; gamma explains at least half of {s['n_gamma_dominated']} of the "
                 f"{s['n_channel_outliers_at_norms']} at norm outputs")
    return Finding("channel-wise outliers", text, "found")


# -- mitigation and quantization ---------------------------------------------------------------------------------
def _cut(r: Mapping, key: str) -> float:
    """How many times smaller ``key`` got in run ``r`` (0 when unknown)."""
    b, a = r["before"].get(key), r["after"].get(key)
    return float(b) / float(a) if b is not None and a else 0.0


def _mitigation_finding(doc: Any) -> Finding | None:
    runs = F.mitigation_runs(doc)
    if not runs:
        return None
    r = max(runs, key=lambda r: _cut(r, "resid_max"))
    b, a = r["before"], r["after"]
    parts = [f"{label} {num(b.get(k))} -> {num(a.get(k))} ({change(b.get(k), a.get(k), kind)})"
             for k, label, kind in (("resid_max", "residual max", "x"), ("co_ratio_max", "CO ratio", "x"),
                                    ("ppl", "perplexity", "ppl")) if b.get(k) is not None and a.get(k) is not None]
    topic = f"best mitigation (of {len(runs)})" if len(runs) > 1 else "mitigation"
    return Finding(topic, f"{r['label']}: " + ", ".join(parts), "mitigation")


def _quant_part(q: str, best: Mapping, base: Mapping | None, ref_method: Any) -> str:
    """One setting: the unmitigated perplexity, then the method that recovers most of it."""
    won = f"{best['method']} {num(best['ppl'])} ({signed_pct(best.get('rel_delta_pct'))})"
    if base is None:
        return f"{q} best {won}"
    plain = f"{ref_method} {num(base.get('ppl'))} ({signed_pct(base.get('rel_delta_pct'))})"
    return f"{q} {plain}, no method better" if best["method"] == ref_method else f"{q} {plain} -> {won}"


def _compare_finding(doc: Mapping | None) -> Finding | None:
    cells = (doc or {}).get("cells") or []
    ref = (doc or {}).get("reference") or {}
    by = {(c["method"], c["quant"]): c for c in cells}
    parts = [_quant_part(q, c, by.get((ref.get("method"), q)), ref.get("method"))
             for q, c in best_per_quant(cells).items() if q != ref.get("quant")]
    if not parts:
        return None
    failed = sum(1 for c in cells if c.get("status") == "error")
    text = (f"perplexity vs {ref.get('method')} / {ref.get('quant')} {num(ref.get('ppl'))}: " + "; ".join(parts)
            + (f"; {failed} cell(s) failed" if failed else ""))
    return Finding("quantization", text, "compare")


# -- per-linear quantization error -------------------------------------------------------------------------------
def _quant_error_finding(doc: Mapping | None) -> Finding | None:
    worst = ((doc or {}).get("summary") or {}).get("worst_rel_mse")
    if not worst:
        return None
    med = doc["summary"].get("median_sqnr_db")
    text = (f"{doc.get('quant')} after {'+'.join(doc.get('methods') or ['none'])}: worst linear "
            f"{worst.get('operator')}, relative MSE {num(worst.get('rel_mse'))} ({worst.get('cause')}-dominated, "
            f"input abs-max {num(worst.get('input_absmax'))})" + (f"; median SQNR {num(med)} dB" if med is not None
                                                                  else ""))
    return Finding("quantization error", text, "quant_error")
