"""The self-contained HTML report: ``build_report(out_dir)`` reads what the stages left in ``out_dir`` and writes
``out_dir/report.html`` (plus every figure as ``out_dir/figures/NAME.png``).

Inputs, each optional except that at least one must exist:

- ``report.json`` + ``profile.safetensors`` (profile; ``report["explain"]`` from the explain stage, or an
  ``explain.json`` next to it);
- ``landscape_before.safetensors`` / ``landscape_after.safetensors`` (:mod:`outlierlab.report.landscape`);
- ``mitigate.json`` (one run ``{methods, before, after, seconds}``, or ``{"runs": [...]}``);
- ``compare.json`` (or ``compare.csv``).

The page is offline by construction: CSS inline, PNGs embedded as base64 data URIs, no script, no font, no
link to any other resource. Every text that comes from the data is escaped. Sections appear only when their
data exists. The file is written atomically.

The page opens with the answer (:mod:`outlierlab.report.summary`) and ends with the run's model, data,
configuration, protocol, versions and timings, collapsed.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import OutlierlabError
from ..evaluation.sqnr import QUANT_ERROR_FILE, QuantErrorReport
from ..fmt import change, num, pct, quoted, signed_pct, site
from ..paths import atomic_write_text
from . import figures as F
from . import landscape as L
from .summary import Finding, best_per_quant, steps_text, summarize

REPORT_FILE = "report.html"
MAX_ROWS = 25


# -- loading -----------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutlierlabError(f"cannot read {path}: {exc}") from exc


def _read_compare_csv(path: Path) -> dict:
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    except (OSError, csv.Error) as exc:
        raise OutlierlabError(f"cannot read {path}: {exc}") from exc
    cells = []
    for r in rows:
        cell: dict[str, Any] = dict(r)
        for k in ("ppl", "delta_ppl", "rel_delta_pct"):
            try:
                cell[k] = float(r[k]) if r.get(k) not in (None, "") else None
            except ValueError:
                cell[k] = None
        cells.append(cell)
    return {"cells": cells, "source": "compare.csv"}


def collect(out_dir: str | Path) -> dict:
    """Everything the report can show from ``out_dir``: {report, arrays, explain, mitigate, compare,
    landscape_before, landscape_after, tokens}; missing parts are None."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise OutlierlabError(f"{out_dir} is not a folder")
    data: dict[str, Any] = dict.fromkeys(("report", "arrays", "explain", "mitigate", "compare", "landscape_before",
                                          "landscape_after", "tokens", "landscape_meta", "quant_error"))
    if (out_dir / "report.json").is_file():
        from ..tracing import load_report

        try:
            data["report"], data["arrays"] = load_report(out_dir)
        except Exception as exc:
            raise OutlierlabError(f"cannot read the profile in {out_dir}: {exc}") from exc
        data["explain"] = data["report"].get("explain")
    if data["explain"] is None and (out_dir / "explain.json").is_file():
        doc = _read_json(out_dir / "explain.json")
        data["explain"] = doc.get("explain", doc) if isinstance(doc, dict) else None
    if (out_dir / "mitigate.json").is_file():
        data["mitigate"] = _read_json(out_dir / "mitigate.json")
    if (out_dir / "compare.json").is_file():
        data["compare"] = _read_json(out_dir / "compare.json")
    elif (out_dir / "compare.csv").is_file():
        data["compare"] = _read_compare_csv(out_dir / "compare.csv")
    if (out_dir / QUANT_ERROR_FILE).is_file():  # written by `outlierlab quant-error --out` into the same folder
        data["quant_error"] = _read_json(out_dir / QUANT_ERROR_FILE)
    for key, name in (("landscape_before", L.BEFORE_FILE), ("landscape_after", L.AFTER_FILE)):
        if (out_dir / name).is_file():
            data[key] = L.load(out_dir / name)
            if data["landscape_meta"] is None:
                data["landscape_meta"] = L.load_meta(out_dir / name)
    if data["landscape_meta"]:
        data["tokens"] = data["landscape_meta"].get("tokens")
    if not any(data[k] for k in ("report", "mitigate", "compare", "landscape_before", "landscape_after",
                                 "quant_error")):
        raise OutlierlabError(f"nothing to report in {out_dir}: no report.json, mitigate.json, compare.json, "
                              f"{QUANT_ERROR_FILE} or landscape file (run `outlierlab profile --out DIR` first)")
    return data


# -- formatting --------------------------------------------------------------------------------------------------
def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "", raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (callers then escape themselves)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        body.append("<tr>" + "".join(f"<td>{c if raw else esc(c)}</td>" for c in r) + "</tr>")
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs if v not in (None, ""))
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def details(summary: str, obj: Any, limit: int = 20000) -> str:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if len(text) > limit:
        text = text[:limit] + "\n... (cut; the full text is in the JSON file)"
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>"


# -- sections ----------------------------------------------------------------------------------------------------
INTRO = """
<p><b>What this report is about.</b> Inside a language model every token is represented, at every layer, by a
vector of a few hundred to a few thousand numbers (the <i>hidden state</i> or <i>activations</i>). Most of these
numbers are small, around 1. Two kinds of <i>outliers</i> break that pattern, and they are what makes low-bit
quantization (storing and computing with 8, 4 or fewer bits) hard:</p>
<ul>
<li><b>Massive activations (MAs)</b>: a handful of single numbers that are hundreds to tens of thousands of times
larger than the typical value. They sit on very few tokens (usually the first one) and in one to three fixed
channels, and they hardly depend on the input: the model uses them like a fixed bias (they create the
"attention sink"). The rule used here: |x| &gt; an absolute threshold and &gt; a multiple of the median |x| of
the tensor.</li>
<li><b>Channel-wise outliers (COs)</b>: a few channels that are 10 to 100 times larger than the others for almost
<i>every</i> token. They appear right after the normalization layers, whose learned per-channel gain
(<i>gamma</i>) multiplies the same channels for every token, and at the inputs of the linear layers.</li>
</ul>
<p>Inside each decoder layer the report uses the operator names of the study it implements: for a gated FFN,
y1 = FFN input (the residual stream), y2 = Norm(y1), y3 = W_gate y2, y4 = W_up y2, y5 = act(y3),
<b>y6 = y5 &middot; y4</b> (the input of the down projection, where MAs first appear), y7 = W_down y6 and
y8 = y1 + y7 (the residual stream after the layer, position <code>block.out</code>). A <i>super weight</i> is a
single entry of W_down that writes an MA; it is <i>verified</i> when setting it to zero removes the MA.</p>
"""


def section_run(report: Mapping | None, data: Mapping, timings: Mapping | None) -> str:
    parts = []
    if report:
        m = report.get("model") or {}
        parts.append("<h3>Model</h3>" + kv([
            ("model", m.get("id")), ("architecture", m.get("model_type")), ("layers", m.get("n_layers")),
            ("hidden size", m.get("hidden_size")),
            ("parameters", f"{m['n_params']:,}" if isinstance(m.get("n_params"), int) else m.get("n_params")),
            ("source", m.get("source")), ("location", m.get("location")), ("sha256", m.get("sha256")),
            ("dtype / device", f"{m.get('dtype', '?')} / {m.get('device', '?')}"),
            ("adapter", (report.get("adapter") or {}).get("adapter")),
        ]))
        d = report.get("data") or {}
        parts.append("<h3>Data</h3>" + kv([
            ("text", d.get("source")), ("windows", f"{d.get('n_samples', '?')} x {d.get('seq_len', '?')} tokens"),
            ("tokens traced", d.get("n_tokens")), ("window seed / order", f"{d.get('seed')} / {d.get('order')}"),
            ("BOS", d.get("bos_policy") or d.get("bos")),
        ]))
        cfg = report.get("config") or {}
        det = cfg.get("detect") or {}
        st = cfg.get("stats") or {}
        parts.append("<h3>Configuration</h3>" + kv([
            ("MA rule", f"|x| > {det.get('ma_abs')} and > {det.get('ma_rel')} x tensor median" if det else None),
            ("CO rule", f"channel median |x| >= {det.get('co_k')} x tensor median" if det else None),
            ("top entries kept per position", st.get("top_k")), ("statistics seed", report.get("seed")),
            ("median error", (f"value within {pct(report['median_error'].get('value_rel'))}"
                              if (report.get("median_error") or {}).get("value_rel") is not None else None)),
        ]) + details("full configuration (report.json)", cfg))
    mit = F.mitigation_runs(data.get("mitigate"))
    comp = data.get("compare") or {}
    if comp.get("protocol"):
        p = comp["protocol"]
        parts.append("<h3>Evaluation protocol</h3>" + kv([(k, v if not isinstance(v, (dict, list)) else
                                                           json.dumps(v)) for k, v in p.items()][:12]))
    versions = (report or {}).get("versions") or comp.get("versions") or {}
    if versions:
        parts.append("<h3>Library versions</h3>" + kv(sorted(versions.items())))
    times: list[tuple[str, Any]] = []
    for k, v in ((report or {}).get("timings") or {}).items():
        times.append((f"profile: {k}", f"{float(v):.1f} s"))
    ex = data.get("explain") or {}
    if isinstance(ex.get("timings"), Mapping):
        tot = ex["timings"].get("total_s")
        if tot is not None:
            times.append(("explain: total_s", f"{float(tot):.1f} s"))
    for r in mit:
        if r.get("seconds") is not None:
            times.append((f"mitigate ({r['label']})", f"{float(r['seconds']):.1f} s"))
    if (comp.get("timings") or {}).get("total_s") is not None:
        times.append(("compare: total_s", f"{float(comp['timings']['total_s']):.1f} s"))
    for k, v in (timings or {}).items():
        times.append((k, f"{float(v):.1f} s" if isinstance(v, (int, float)) else v))
    if times:
        parts.append("<h3>Time taken</h3>" + kv(times))
    if not parts:
        return ""
    return _section("run", "Model, data, configuration", "<details><summary>model, data, configuration, "
                    "protocol, library versions, time taken</summary>" + "".join(parts) + "</details>")


def section_summary(findings: list[Finding]) -> str:
    """The answer first: one item per finding, each linking to the section with its details."""
    if not findings:
        return ""
    items = "".join(f"<li><b>{esc(f.topic)}</b>: {esc(f.text)} <a href='#{esc(f.anchor)}'>details</a></li>"
                    for f in findings)
    return _section("summary", "Summary", f"<ul class='summary'>{items}</ul>")


def section_found(report: Mapping | None) -> str:
    if not report:
        return ""
    from .terminal import group_massive

    mas = report.get("massive_activations") or []
    groups = group_massive(mas)
    det = ((report.get("config") or {}).get("detect") or {})
    parts = []
    curve = L.residual_curve(report)
    if curve:
        peak = max(curve)
        lay = curve.index(peak)
        parts.append(f"<p>Largest residual-stream value (<code>block.out</code>): <b>{esc(num(peak))}</b> at layer "
                     f"{lay}; the median |x| there is {esc(num(report['layers'][lay]['block.out'].get('median')))}.</p>")
    if groups:
        parts.append(f"<p><b>{len(groups)}</b> distinct massive activation(s) (token, channel) from "
                     f"{len(mas)} records (a record is one layer and position), by the rule |x| &gt; "
                     f"{esc(det.get('ma_abs', '?'))} and &gt; {esc(det.get('ma_rel', '?'))} x the tensor median."
                     "</p>")
        rows = []
        for g in groups[:MAX_ROWS]:
            layers = g["layers"]
            span = f"{layers[0]}-{layers[-1]} ({len(layers)} layers)" if len(layers) > 1 else str(layers[0])
            rows.append([g["token_index"], quoted(g.get("token")), g["channel"], num(g["value"]),
                         f"layer {g['first_layer']}, {g['first_position']}", span])
        parts.append(table(["token index", "token", "channel", "max value", "first seen", "layers"], rows))
        if len(groups) > MAX_ROWS:
            parts.append(f"<p class='note'>{len(groups) - MAX_ROWS} more in report.json.</p>")
    else:
        parts.append("<p>No massive activation by the rule |x| &gt; "
                     f"{esc(det.get('ma_abs', '?'))} and &gt; {esc(det.get('ma_rel', '?'))} x the tensor median.</p>")
    cos = report.get("channel_outliers") or []
    if cos:
        by_pos: dict[str, dict[int, list]] = {}
        for c in cos:
            by_pos.setdefault(c["position"], {}).setdefault(int(c["channel"]), []).append(c)
        order = [p["name"] for p in (report.get("adapter") or {}).get("positions", [])]
        rows = []
        for pos in sorted(by_pos, key=lambda p: order.index(p) if p in order else len(order)):
            chans = sorted(by_pos[pos].items(), key=lambda kv_: (-len(kv_[1]), kv_[0]))
            layers = {int(c["layer"]) for v in by_pos[pos].values() for c in v}
            best = max((c for v in by_pos[pos].values() for c in v), key=lambda c: c.get("ratio") or 0)
            rows.append([pos, len(layers), ", ".join(f"{ch} ({len(v)})" for ch, v in chans[:6]),
                         f"{num(best.get('ratio'))}x (layer {best['layer']}, channel {best['channel']})"])
        parts.append(f"<p><b>{len(cos)}</b> channel-wise outlier records (layer, position, channel): channels "
                     f"whose median |x| is at least {esc(det.get('co_k', '?'))} x the tensor median.</p>")
        parts.append(table(["position", "layers with COs", "most frequent channels (layers)", "largest ratio"],
                           rows))
    else:
        parts.append("<p>No channel-wise outlier.</p>")
    return _section("found", "Outliers found", "".join(parts))


def auto_narrative(ex: Mapping) -> list[str]:
    """Short sentences from the ``explain`` section when it carries no ``narrative``."""
    lines = []
    said: set = set()
    for g in ex.get("massive_activations") or []:
        o = g.get("origin") or {}
        s = f"MA {num(g.get('value'))} at token {g.get('token_index')} {quoted(g.get('token'))} channel " \
            f"{g.get('channel')}"
        if o:
            s += f" first appears at {site(o.get('layer'), o.get('position'), o.get('alias'))}"
        chans = g.get("down_in_channels") or []
        if chans:
            s += "; the down-projection input carries it in channel(s) " + ", ".join(
                f"{c.get('channel')} ({num(c.get('value'))})" for c in chans[:3])
        lines.append(s + ".")
        for sw in g.get("super_weights") or []:
            k = (sw.get("module"), sw.get("row"), sw.get("col"))
            if k in said:
                continue
            said.add(k)
            v = sw.get("verified")
            state = "verified super weight" if v else ("not verified" if v is False else "not ablated")
            ppl = (f", perplexity {num(sw['ppl_before'])} -> {num(sw['ppl_after'])}"
                   if sw.get("ppl_before") is not None and sw.get("ppl_after") is not None else "")
            lines.append(f"{sw.get('module')}[{sw.get('row')}, {sw.get('col')}] = {num(sw.get('value'))}: {state}"
                         + (f" (MA after zeroing it: {num(sw.get('ma_after'))}{ppl})"
                            if sw.get("ma_after") is not None else "") + ".")
    cos = ex.get("channel_outliers") or []
    at_norm = [c for c in cos if c.get("gamma") is not None]
    if cos:
        lines.append(f"{len(cos)} channel-wise outliers; {len(at_norm)} at norm outputs, of which gamma explains "
                     f"at least half for {sum(1 for c in at_norm if (c.get('gamma_share') or 0) >= 0.5)}.")
    return lines


def _ablation_windows(ex: dict) -> str:
    """' on N of the M evaluation windows' when the ablations used a subset of the protocol's windows."""
    p = (ex.get("perplexity") or {}).get("protocol") or {}
    used, total = p.get("n_windows_used"), p.get("n_windows_protocol")
    return f" on the first {used} of the {total} evaluation windows" if used and total and used < total else ""


def super_weight_rows(mas: list[dict]) -> list[list]:
    """One row per (weight, MA channel), tokens merged; then one row per joint ablation (merged the same way)."""
    groups: dict[tuple, dict] = {}
    for g in mas:
        entries = [(sw.get("module"), f"[{sw.get('row')}, {sw.get('col')}]", sw) for sw in g.get("super_weights") or []]
        j = g.get("joint_ablation")
        if j and j.get("weights") and len(j["weights"]) > 1:
            cols = ", ".join(f"[{w.get('row')}, {w.get('col')}]" for w in j["weights"])
            mods = sorted({str(w.get("module")) for w in j["weights"]})
            entries.append(("joint: " + ", ".join(mods), cols, {**j, "value": None}))
        for module, where, sw in entries:
            k = (module, where, g.get("channel"))
            e = groups.setdefault(k, {"value": sw.get("value"), "tokens": [], "verified": [], "ma_after": [],
                                      "ppl_before": sw.get("ppl_before"), "ppl_after": sw.get("ppl_after")})
            e["tokens"].append(g.get("token_index"))
            e["verified"].append(sw.get("verified"))
            if sw.get("ma_after") is not None:
                e["ma_after"].append(float(sw["ma_after"]))
    rows = []
    for (module, where, channel), e in groups.items():
        ver = set(e["verified"])
        if len(ver) == 1:
            v = ver.pop()
            verified = "yes" if v else ("no" if v is False else "not ablated")
        else:
            yes = [t for t, v in zip(e["tokens"], e["verified"]) if v]
            verified = "for token(s) " + ", ".join(map(str, yes)) + " only"
        toks = ", ".join(map(str, e["tokens"]))
        rows.append([module, where, num(e["value"]) if e["value"] is not None else "-",
                     f"channel {channel}, token(s) {toks}", verified,
                     num(max(e["ma_after"])) if e["ma_after"] else "n/a",
                     f"{num(e['ppl_before'])} -> {num(e['ppl_after'])}" if e["ppl_before"] is not None else "n/a"])
    return rows


def _sorted_cos(cos: list[dict]) -> list[dict]:
    """Norm-output COs (gamma known) first, then by ratio."""
    return sorted(cos, key=lambda c: (c.get("gamma") is None, -(c.get("ratio") or 0)))


def steps_cell(g: Mapping) -> str:
    """'layer 11 FFN: made at y6 by W_down (100%); explained' from an MA's origin steps (explain 1.1)."""
    steps = g.get("steps") or []
    if not steps:
        return "-"
    cell = steps_text(steps)
    verified = (g.get("steps_joint") or {}).get("verified")
    return cell + "; " + {True: "explained", False: "not explained"}.get(verified, "not ablated")


def section_explain(ex: Mapping | None) -> str:
    if not ex:
        return ""
    parts = []
    summ = ex.get("summary") or {}
    if summ:
        parts.append(kv([(k.replace("_", " "), v) for k, v in summ.items()]))
    narrative = ex.get("narrative") or auto_narrative(ex)
    if narrative:
        parts.append("<h3>In words</h3><ul class='narrative'>" + "".join(f"<li>{esc(s)}</li>" for s in narrative)
                     + "</ul>")
    mas = ex.get("massive_activations") or []
    if mas:
        rows = []
        for g in mas[:MAX_ROWS]:
            o = g.get("origin") or {}
            chans = "; ".join(
                f"{c.get('channel')} = {num(c.get('value'))}"
                + (f" (gate {num(c.get('gate'))}, up {num(c.get('up'))})" if c.get("up") is not None
                   else (f" (gate/fc1 {num(c.get('gate'))})" if c.get("gate") is not None else ""))
                for c in (g.get("down_in_channels") or [])[:3])
            prop = g.get("propagation") or []
            vals = [(p.get("layer"), abs(float(p.get("value") or 0))) for p in prop]
            span = ""
            if vals:
                peak = max(v for _, v in vals)
                carried = [l for l, v in vals if v >= 0.5 * peak]
                span = f"peak {num(peak)}; >= half of it in layers {carried[0]}-{carried[-1]}" if carried else ""
            cancel = ", ".join(str(c.get("layer")) for c in (g.get("cancel_layers") or []))
            rows.append([g.get("token_index"), quoted(g.get("token")), g.get("channel"), num(g.get("value")),
                         site(o.get("layer"), o.get("position"), o.get("alias")) if o else "not found",
                         steps_cell(g), chans or "-", span or "-", cancel or "-"])
        parts.append("<h3>Massive activations: origin and propagation</h3>" + table(
            ["token", "text", "channel", "value", "origin", "built by (origin steps; all ablated together)",
             "down-proj input channels (y6)", "along the residual stream", "cancelled in layers"], rows))
    sw_rows = super_weight_rows(mas)
    if sw_rows:
        parts.append("<h3>Super weights (ablation)</h3><p>Each candidate weight of the down projection is set to "
                     "zero, one at a time (and the candidates of one MA together: <i>joint</i>); it is verified when "
                     "the MA then falls below the MA rule everywhere it was. Perplexity is measured with the weight "
                     "zeroed" + _ablation_windows(ex) + ".</p>"
                     + table(["weight(s)", "[row, col]", "value", "writes the MA", "verified",
                              "MA after zeroing", "perplexity before -> after"], sw_rows[:MAX_ROWS]))
    cos = ex.get("channel_outliers") or []
    if cos:
        shown = _sorted_cos(cos)[:MAX_ROWS]
        rows = []
        for c in shown:
            otc = ", ".join(f"{o.get('module', '?').split('.')[-1]} col {o.get('col')} ({num(o.get('score'))})"
                            for o in (c.get("otc") or [])[:3])
            rows.append([c.get("layer"), c.get("position"), c.get("channel"), f"{num(c.get('ratio'))}x",
                         num(c.get("gamma")), pct(c.get("gamma_share")) if c.get("gamma_share") is not None
                         else "n/a", otc or "-"])
        parts.append("<h3>Channel-wise outliers and the share gamma explains</h3><p>gamma share: how much of the "
                     "channel's excess over the other channels the norm gain accounts for (100% = all of it; "
                     "compare the channel before and after the gain). OTC: the weight columns of the projections "
                     "reading this norm output that turn the channel into output outliers (score).</p>"
                     + table(["layer", "position", "channel", "ratio to median", "gamma", "gamma share",
                              "outlier-triggering columns (score)"], rows)
                     + (f"<p class='note'>{len(shown)} of {len(cos)} shown (norm outputs first, largest ratio "
                        "first); all in report.json.</p>" if len(cos) > len(shown) else ""))
    if ex.get("notes"):
        parts.append("<p class='note'>" + "<br>".join(esc(n) for n in ex["notes"]) + "</p>")
    return _section("explain", "Where the outliers come from", "".join(parts))


_METRICS = (("resid_max", "residual-stream max |h|", "x"), ("down_in_max", "down-projection input max |x|", "x"),
            ("ma_count", "massive-activation records (all positions)", "n"),
            ("ma_count_resid", "massive-activation records on the residual stream", "n"),
            ("co_ratio_max", "CO ratio max (norm outputs)", "x"),
            ("co_ratio_linear_inputs", "CO ratio max (all linear inputs)", "x"),
            ("co_channels", "channel-wise outlier records", "n"), ("ppl", "perplexity", "ppl"))


def section_mitigation(doc: Any) -> str:
    runs = F.mitigation_runs(doc)
    if not runs:
        return ""
    parts = []
    for r in runs:
        b, a = r["before"], r["after"]
        rows = [[label, num(b.get(k)), num(a.get(k)), change(b.get(k), a.get(k), kind)]
                for k, label, kind in _METRICS if b.get(k) is not None or a.get(k) is not None]
        exact = r.get("exact")
        listed = [m for m in (r.get("methods") or []) if isinstance(m, Mapping)]
        if exact is None and listed and all("exact" in m for m in listed):
            exact = all(bool(m["exact"]) for m in listed)
        head = f"<h3>{esc(r['label'])}</h3>"
        meta = []
        if exact is not None:
            meta.append("function-preserving" if exact else "changes the function (its cost is the perplexity row)")
        if r.get("seconds") is not None:
            meta.append(f"applied in {float(r['seconds']):.1f} s")
        per_pos = ""
        cb, ca = b.get("co_ratio"), a.get("co_ratio")
        if isinstance(cb, Mapping) and isinstance(ca, Mapping):
            pos_rows = [[p, num(cb.get(p)), num(ca.get(p)), change(cb.get(p), ca.get(p), "x")]
                        for p in dict.fromkeys([*cb, *ca])]
            per_pos = ("<details><summary>CO ratio per position (largest channel median / tensor median over "
                       "layers)</summary>" + table(["position", "before", "after", "change"], pos_rows)
                       + "</details>")
        shown = [{k: m.get(k) for k in ("method", "config", "exact", "seconds", "info") if k in m}
                 if isinstance(m, Mapping) else m for m in (r.get("methods") or [])]
        parts.append(head + (f"<p>{esc('; '.join(meta))}.</p>" if meta else "")
                     + table(["measured on the evaluation windows", "before", "after", "change"], rows)
                     + per_pos + (details("methods and their configuration", shown) if shown else ""))
    return _section("mitigation", "Mitigation: before and after", "".join(parts))


def section_compare(doc: Mapping | None) -> str:
    cells = (doc or {}).get("cells") or []
    if not cells:
        return ""
    quants = list(dict.fromkeys(c["quant"] for c in cells))
    methods = list(dict.fromkeys(c["method"] for c in cells))
    by = {(c["method"], c["quant"]): c for c in cells}
    ref = (doc or {}).get("reference") or {}
    best = {q: c["method"] for q, c in best_per_quant(cells).items()}
    rows = []
    for m in methods:
        row = [f"<b>{esc(m)}</b>"]
        for q in quants:
            c = by.get((m, q))
            if c is None:
                row.append("")
            elif c.get("status") != "ok" or c.get("ppl") is None:
                row.append(f"<span class='bad' title='{esc(c.get('error') or '')}'>{esc(c.get('status') or 'n/a')}"
                           "</span>")
            else:
                rel = c.get("rel_delta_pct")
                cls = " class='best'" if best.get(q) == m and len(methods) > 1 else ""
                row.append(f"<span{cls}>{esc(num(c['ppl']))}</span>"
                           + (f" <small>({signed_pct(rel)})</small>" if rel is not None else ""))
        rows.append(row)
    parts = []
    failed = [c for c in cells if c.get("status") == "error"]
    if failed:
        items = "".join(f"<li>{esc(c.get('method'))} x {esc(c.get('quant'))}: {esc(c.get('error') or '')}</li>"
                        for c in failed)
        parts.append(f"<p class='bad'><b>{len(failed)} cell(s) failed</b> (the command exited non-zero):</p>"
                     f"<ul class='failures'>{items}</ul>")
    p = (doc or {}).get("protocol") or {}
    if ref.get("ppl") is not None:
        parts.append(f"<p>Perplexity{' on ' + esc(p.get('source')) if p.get('source') else ''} of every mitigation "
                     f"(rows) under every quantization setting (columns); in brackets the change relative to "
                     f"{esc(ref.get('method'))} / {esc(ref.get('quant'))} ({esc(num(ref['ppl']))}). Bold: the "
                     "best method in each column.</p>")
    parts.append(table(["method"] + quants, rows, cls="matrix", raw=True))
    presets = (doc or {}).get("quant_presets") or {}
    if presets:
        parts.append(table(["setting", "what it quantizes"], [[k, v.get("summary", "")] for k, v in presets.items()]))
    def worst(c: Mapping) -> str:  # the cell's worst linear when compare ran with --sqnr
        w = (c.get("sqnr") or {}).get("worst_rel_mse") or {}
        return f"{w['operator']} (rel MSE {num(w.get('rel_mse'))}, {w.get('cause')})" if w.get("operator") else ""

    sqnr = any(worst(c) for c in cells)
    detail_rows = [[c.get("method"), c.get("quant"), c.get("status"), num(c.get("ppl")), num(c.get("delta_ppl")),
                    num(c.get("rel_delta_pct"))] + ([worst(c)] if sqnr else []) + [c.get("error") or ""]
                   for c in cells]
    head = ["method", "quant", "status", "ppl", "delta ppl", "change %"] + (["worst linear"] if sqnr else []) + \
        ["error"]
    parts.append("<details><summary>every cell</summary>" + table(head, detail_rows) + "</details>")
    return _section("compare", "Comparison: mitigation x quantization", "".join(parts))


def section_quant_error(doc: Mapping | None, worst: int = 10) -> str:
    """``outlierlab quant-error``'s result: the setting, the worst linears and what causes their error, the KV
    cache, every linear in a fold-out."""
    rep = QuantErrorReport.from_json(doc or {})
    if not rep.rows:
        return ""
    ranked = rep.worst(len(rep.rows))
    methods = "+".join(doc.get("methods") or ["none"])
    win = rep.windows
    med = (doc.get("summary") or {}).get("median_sqnr_db")
    top = ranked[0]
    causes = Counter(r.cause for r in ranked[:worst])
    parts = [f"<p>{esc(doc.get('quant'))} ({esc(doc.get('quant_summary'))}) after {esc(methods)}: each linear's "
             f"output error against the unquantized model on {esc(win.get('n_windows', '?'))} calibration windows"
             + (f"; median SQNR {esc(num(med))} dB" if med is not None else "")
             + f". The worst is <b>{esc(top.operator)}</b>: relative MSE {esc(num(top.rel_mse))}, "
             f"{esc(top.cause)}-dominated (activations alone {esc(num(top.rel_mse_act))}, weights alone "
             f"{esc(num(top.rel_mse_weight))}), input abs-max {esc(num(top.input_absmax))}. Of the {len(ranked[:worst])} "
             "worst: " + ", ".join(f"{n} {esc(c)}" for c, n in causes.most_common()) + ".</p>"]

    def line(r) -> list:
        return [r.operator, num(r.rel_mse), num(r.rel_mse_act), num(r.rel_mse_weight), num(r.sqnr_db),
                num(r.input_absmax), r.cause]

    head = ["linear (input)", "rel MSE", "activations only", "weights only", "SQNR dB", "input |x| max", "cause"]
    parts.append(table(head, [line(r) for r in ranked[:worst]]))
    low = rep.lowest_kv()
    if low is not None:
        parts.append(f"<p>KV cache: lowest SQNR {esc(num(low.get('sqnr_db')))} dB at layer {esc(low.get('layer'))} "
                     f"({esc(low.get('state'))}).</p>")
    parts.append("<details><summary>every linear</summary>" + table(head, [line(r) for r in ranked]) + "</details>")
    parts.append("<p class='note'>From quant_error.json (`outlierlab quant-error --quant SETTING --method METHODS "
                 "--out DIR`, then `outlierlab report DIR`).</p>")
    return _section("quant_error", "Quantization error per linear", "".join(parts))


def section_figures(figs: list[F.Figure]) -> str:
    if not figs:
        return ""
    groups = [("landscape", "3D activation landscapes"), ("curves", "Top-k magnitudes per layer"),
              ("heatmaps", "Channel heatmaps per position"), ("gamma", "Norm gains"),
              ("mitigation", "Mitigation"), ("compare", "Comparison"), ("quant_error", "Quantization error")]
    parts = []
    for key, title in groups:
        fs = [f for f in figs if f.section == key]
        if not fs:
            continue
        parts.append(f"<h3 id='fig-{esc(key)}'>{esc(title)}</h3>")
        for f in fs:
            b64 = base64.b64encode(f.png).decode("ascii")
            parts.append(f"<figure id='{esc(f.name)}'><img src=\"data:image/png;base64,{b64}\" alt=\"{esc(f.title)}\">"
                         f"<figcaption><b>{esc(f.title)}.</b> {esc(f.caption)} <span class='file'>"
                         f"figures/{esc(f.name)}.png</span></figcaption></figure>")
    return _section("figures", "Figures", "".join(parts))


def _section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{esc(anchor)}'><h2>{esc(title)}</h2>{body}</section>"


CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dde5; --accent:#1f4e9c; --bg:#ffffff; --alt:#f5f7fa; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 21px; margin-top: 36px; border-bottom: 2px solid var(--line);
padding-bottom: 4px; } h3 { font-size: 16px; margin: 22px 0 8px; }
.sub { color: var(--muted); margin: 0 0 16px; }
nav { background: var(--alt); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; margin: 16px 0; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; white-space: nowrap; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: var(--alt); }
table.kv th { background: var(--alt); font-weight: 600; width: 220px; }
table.matrix td { text-align: right; white-space: nowrap; }
.best { font-weight: 700; color: #136f3a; } .bad { color: #a61b1b; }
code { background: var(--alt); padding: 0 3px; border-radius: 3px; }
pre { background: var(--alt); padding: 10px; overflow: auto; max-height: 420px; font-size: 12px; }
details { margin: 6px 0 12px; } summary { cursor: pointer; color: var(--accent); }
figure { margin: 18px 0 28px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 4px; }
.file { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; color: #8a93a3; }
.note { color: var(--muted); font-size: 13px; }
ul.narrative li { margin: 3px 0; }
ul.summary li { margin: 5px 0; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 40px; border-top: 1px solid var(--line); padding-top: 8px; }
"""


def render(data: Mapping, figs: list[F.Figure], timings: Mapping | None = None, title: str | None = None,
           build_s: float | None = None) -> str:
    report = data.get("report")
    model = ((report or {}).get("model") or (data.get("compare") or {}).get("model") or {}).get("id")
    title = title or f"outlierlab report{': ' + str(model) if model else ''}"
    sections = [
        section_summary(summarize(data)),
        section_found(report),
        section_explain(data.get("explain")),
        section_mitigation(data.get("mitigate")),
        section_compare(data.get("compare")),
        section_quant_error(data.get("quant_error")),
        section_figures(figs),
        section_run(report, data, timings),
    ]
    names = {"summary": "Summary", "found": "Outliers found", "explain": "Explanation", "mitigation": "Mitigation",
             "compare": "Comparison", "quant_error": "Quantization error", "figures": "Figures",
             "run": "Run details"}
    nav = "".join(f"<a href='#{k}'>{esc(v)}</a>" for k, v in names.items() if f"<section id='{k}'>" in
                  "".join(sections))
    from .. import __version__ as version

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    foot = f"Generated by outlierlab {esc(version)} on {esc(stamp)}" + \
        (f" in {build_s:.1f} s" if build_s is not None else "") + \
        ". Self-contained: the figures are embedded; the same figures are in the figures/ folder next to this file."
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><p class='sub'>Activation outliers: what they are, where they come from, what "
            f"removing them does.</p><nav>{nav}</nav>{sections[0]}{INTRO}{''.join(sections[1:])}<footer>{foot}</footer>"
            "</main></body></html>\n")


def build(out_dir: str | Path, *, figures: bool = True, timings: Mapping | None = None,
          title: str | None = None) -> tuple[Path, list[F.Figure]]:
    """:func:`build_report` returning also the figures drawn (each written to ``out_dir/figures/NAME.png``)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    data = collect(out_dir)
    figs: list[F.Figure] = []
    if figures:
        figs = F.all_figures(data["report"], data["arrays"], data["landscape_before"], data["landscape_after"],
                             data["mitigate"], data["compare"], tokens=data["tokens"],
                             quant_error=data["quant_error"])
        for f in figs:
            F.write(f, out_dir)
    text = render(data, figs, timings, title, time.perf_counter() - t0)
    return atomic_write_text(out_dir / REPORT_FILE, text), figs


def build_report(out_dir: str | Path, *, figures: bool = True, timings: Mapping | None = None,
                 title: str | None = None) -> Path:
    """Write ``out_dir/report.html`` (and ``out_dir/figures/*.png``) from what the stages left in ``out_dir``.

    ``timings``: extra "stage -> seconds" lines for the "Time taken" table (the pipeline's per-stage times).
    ``figures=False`` skips the figures (text and tables only). Returns the path of report.html.
    """
    return build(out_dir, figures=figures, timings=timings, title=title)[0]


__all__ = ["build", "build_report", "collect", "render"]
