"""Short sentences with the numbers of an :class:`~.explain.Explanation`: per MA the steps that build it
(how many, which mechanisms, whether ablating them removes it), then the legacy detail (origin position,
super weights, precursor, propagation), then the channel-wise outliers and OTCs."""

from __future__ import annotations

from ..fmt import num, pct


def _ppl(a) -> str:
    """', perplexity x -> y' of an ablation record (dict or :class:`~.records.Ablation`), or ''."""
    get = a.get if isinstance(a, dict) else lambda k: getattr(a, k)
    before, after = get("ppl_before"), get("ppl_after")
    return "" if before is None or after is None else f", perplexity {before:.2f} -> {after:.2f}"


# -- origin steps ------------------------------------------------------------------------------------------
BRANCH = {"attn": "attention", "mlp": "FFN"}


def _what(step) -> str:
    """The entries a step's ablation changes, named as weights, gains or biases."""
    if step.mechanism == "norm_gain":
        g = step.norm
        return (f"{g.module} gain[{g.channel}] = {num(g.gain)}, {num(g.gain_ratio)}x the median gain, on a "
                f"normalized value of {num(g.pre_gain)}")
    names = [f"W_{w.role}[{w.row}, {w.col}]" for w in step.weights]
    if any(e.kind == "bias" for e in step.ablation.edits):
        names.append(f"b[{step.bias.channel}] = {num(step.bias.value)}")
    return ", ".join(names)


def steps_sentence(g: dict) -> str | None:
    """'MA ...: built in N step(s): ...; <verdict>.' for one MA group (None without steps)."""
    steps = g.get("steps") or []
    if not steps:
        return None
    parts = [f"layer {s.layer} {BRANCH[s.branch]} ({'+' if s.contribution >= 0 else ''}{num(s.contribution)}, "
             f"{pct(s.share)} of the peak) {s.label} ({_what(s)})" for s in steps]
    s = f"{_head(g)}: built in {len(steps)} step{'s' if len(steps) > 1 else ''}: " + "; ".join(parts)
    if len(steps) > 1 and all(st.ablation.verified is not None for st in steps):
        s += "; ablating each step alone leaves " + ", ".join(num(st.ablation.ma_after) for st in steps)
    j = g["steps_joint"]
    if j.verified is None:
        return s + "; not ablated" + (f" ({j.skipped})" if j.skipped else "") + "."
    what = "all steps together leave" if len(steps) > 1 else "ablating it leaves"
    return (f"{s}; {what} {num(j.ma_after)}{_ppl(j)}: "
            + ("explained (verified by ablation)." if j.verified else "not explained (the MA stays).")
            )


# -- one MA ----------------------------------------------------------------------------------------------
def _head(g: dict) -> str:
    tok = f" ({g['token']!r})" if g.get("token") else ""
    where = "" if g["on_residual"] else " (at a projection output only, not on the residual stream)"
    return f"MA {num(g['value'])} at token {g['token_index']}{tok} channel {g['channel']}{where}"


def _signature(g: dict) -> tuple:
    o = g.get("origin") or {}
    return (g["channel"], g["on_residual"], o.get("layer"), o.get("position"),
            tuple((s.layer, s.branch, s.mechanism) for s in g.get("steps") or []),
            tuple((s["row"], s["col"]) for s in g.get("super_weights", [])))


def _origin_line(g: dict) -> str:
    o = g["origin"]
    chans = []
    for c in g.get("down_in_channels", []):
        if c.get("up") is not None:
            chans.append(f"channel {c['channel']} = {num(c['value'])} (gate {num(c['gate'])}, "
                         f"act {num(c['act'])}, up {num(c['up'])})")
        elif c.get("act") is not None:
            chans.append(f"channel {c['channel']} = {num(c['value'])} (fc1 {num(c['gate'])})")
        else:
            chans.append(f"channel {c['channel']} = {num(c['value'])}")
    branch = {c.get("branch") for c in g.get("down_in_channels", [])} - {None, "fc1"}
    branch_s = ""
    if len(branch) == 1:
        b = branch.pop()
        branch_s = "; both the gate and the up branch are large" if b == "both" else \
            f"; the {b} branch makes it large"
    inp = g.get("decomposition", {}).get("input_position", "")
    return (f"First MA-rule hit in that branch: layer {o['layer']}, {o['position']}"
            + (f" ({o['alias']})" if o["alias"] else "")
            + (f"; written through {inp} " + ", ".join(chans) if chans else "") + branch_s + ".")


def _weight_lines(g: dict) -> list[str]:
    lines = []
    for c in g.get("down_in_channels", [])[:1]:
        rows = c.get("rows") or []
        if rows:
            lines.append(f"The rows {c['channel']} of " + " and ".join(f"W_{r['role']}" for r in rows)
                         + " align with the normalized input of that token (cosine "
                         + ", ".join(f"{r['cosine']:.2f}, rank {r['cosine_rank']}/{r['rows']}" for r in rows)
                         + ").")
    for sw in g.get("super_weights", []):
        head = (f"W_{sw['role']}[{sw['row']}, {sw['col']}] = {num(sw['value'])} ({sw['module']}, "
                f"{num(sw['weight_ratio'])}x the median |w|) carries {pct(sw['share'])} of the output")
        ppl = _ppl(sw).replace(", perplexity", " and perplexity from").replace(" -> ", " to ")
        if sw.get("verified") is None:
            lines.append(head + ": not ablated" + (f" ({sw['skipped']})" if sw.get("skipped") else "") + ".")
        elif sw["verified"]:
            lines.append(f"{head} and is a super weight: zeroing it drops the MA to {num(sw['ma_after'])}{ppl}.")
        else:
            lines.append(f"{head} but is not verified: zeroing it leaves {num(sw['ma_after'])}{ppl}.")
    j = g.get("joint_ablation")
    if j and j.get("verified") is not None:
        lines.append(f"Zeroing the {len(j['weights'])} candidates together leaves {num(j['ma_after'])}{_ppl(j)}: "
                     + ("the MA is removed (verified jointly)." if j["verified"] else "not removed."))
    return lines


def _carry_lines(g: dict, cfg) -> list[str]:
    o, lines = g["origin"], []
    fd, pre = g.get("first_detected"), g.get("precursor", {})
    if fd and fd["layer"] < o["layer"]:
        lines.append(f"A precursor ({num(pre.get('max_before_origin'))} at most) already meets the MA rule "
                     f"at layer {fd['layer']} {fd['position']}, before the first origin step.")
    cl = g.get("cancel_layers", [])
    if g.get("peak_layer") is not None and g["on_residual"]:
        s = f"The residual stream carries it from layer {o['layer']} (peak {num(g.get('peak'))} at layer " \
            f"{g['peak_layer']})"
        if cl:
            s += "; cancelled in layer" + ("s " if len(cl) > 1 else " ") + ", ".join(
                f"{c['layer']} ({c['by'] or '?'}, -{pct(c['drop_fraction'])})" for c in cl)
        if g.get("cancelled_at") is not None:
            s += f"; below {pct(cfg.cancel_fraction)} of the peak from layer {g['cancelled_at']}"
        else:
            s += f"; {pct(g.get('final_fraction'))} of the peak is left after the last layer"
        lines.append(s + ".")
    return lines


def _ma_lines(g: dict, index: int, seen: dict, cfg) -> list[str]:
    o = g.get("origin")
    if not o:
        return [f"{_head(g)}: no origin step found."]
    key = _signature(g)
    if key in seen:  # the same mechanism at another token: one line
        j = g["steps_joint"]
        after = f"; ablating its steps leaves {num(j.ma_after)}" if j.ma_after is not None else ""
        return [(f"{_head(g)}: same steps (first at layer {o['layer']}, {o['position']}) and weights as MA "
                f"#{seen[key] + 1}{after}.")]
    seen[key] = index
    return [steps_sentence(g), _origin_line(g), *_weight_lines(g), *_carry_lines(g, cfg)]


# -- channel-wise outliers -----------------------------------------------------------------------------------
def _co_lines(exp, max_cos: int) -> list[str]:
    lines = []
    cos = exp.channel_outliers
    at_norm = [c for c in cos if c["gamma"] is not None]
    if cos:
        lines.append(f"{len(cos)} channel-wise outliers (layer, position, channel); {len(at_norm)} at norm outputs, "
                     f"of which gamma explains at least half for "
                     f"{sum(1 for c in at_norm if (c['gamma_share'] or 0) >= 0.5)}.")
        for c in sorted(at_norm, key=lambda c: -c["ratio"])[:max_cos]:
            lines.append(f"Layer {c['layer']} {c['position']} channel {c['channel']}: {num(c['ratio'])}x the median, "
                         f"gamma {num(c['gamma'])} ({num(c['gain_ratio'])}x the median gain), ratio "
                         f"{num(c['ratio_before'])} before the gain vs {num(c['ratio_after'])} after: gamma share "
                         f"{pct(c['gamma_share'])}; {c['persistence']}, {c['kind'] or '?'} "
                         f"({pct(c['token_fraction'])} of tokens), CO in {len(c['layers'])} layer(s).")
        dom = sorted((c for c in at_norm if (c["gamma_share"] or 0) >= 0.5), key=lambda c: -c["ratio"])
        if dom:
            lines.append("Gamma-dominated: " + "; ".join(
                f"layer {c['layer']} {c['position']} channel {c['channel']} ({num(c['ratio'])}x, gamma "
                f"{num(c['gamma'])} = {num(c['gain_ratio'])}x the median gain, share {pct(c['gamma_share'])})"
                for c in dom[:max_cos]) + ".")
    else:
        lines.append("No channel-wise outliers.")
    return lines


def _otc_lines(exp, max_cos: int) -> list[str]:
    w = [o for o in exp.otcs if o["cause"] == "weight"]
    lines = [(f"{len(exp.otcs)} outlier-triggering columns ({len(w)} caused by the weight column, "
             f"{len(exp.otcs) - len(w)} by the activation it reads).")]
    for o in w[:max_cos]:
        lines.append(f"OTC {o['module']} column {o['col']} ({o['role']}): score {num(o['ratio'])}x the median, "
                     f"||W[:, c]|| {num(o['weight_ratio'])}x, E|x_c| {num(o['act_ratio'])}x.")
    if exp.qk_outliers:
        q = exp.qk_outliers[0]
        lines.append(f"{len(exp.qk_outliers)} q/k output channels stand out in their head; the largest: layer "
                     f"{q['layer']} {q['role']} head {q['head']} channel {q['index']} ({num(q['ratio_head'])}x the "
                     f"head median), driven by input column(s) "
                     + ", ".join(f"{d['col']} ({pct(d['share'])})" for d in q["drivers"]) + ".")
    return lines


def narrative(exp, max_cos: int = 3) -> list[str]:
    """The sentences of ``exp`` (an :class:`~.explain.Explanation`), MAs first."""
    lines: list[str] = []
    seen: dict[tuple, int] = {}
    for i, g in enumerate(exp.massive_activations):
        lines += _ma_lines(g, i, seen, exp.config)
    lines += _co_lines(exp, max_cos) + _otc_lines(exp, max_cos)
    return lines + [f"Note: {note}." for note in exp.notes]
