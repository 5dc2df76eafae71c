"""Residual-growth attribution: the writes that build a massive activation, layer by layer.

For an MA at (token t, channel d) the residual value h[t, d] is followed through every layer and each layer's
change is split into its branches (attention, FFN; a parallel block's branches read the same input). Every
branch adding at least ``step_share`` of the peak, in the peak's direction, up to the peak layer, is an
**origin step**; what the size of its inputs is relative to their medians plays no part. Each step is then
read through whatever stands between the branch and the residual add:

- ``norm_gain``: a norm on the branch output (sandwich norms) whose gain at d makes the value: its log gain
  ratio is at least ``norm_gain_share`` of (log gain ratio + log ratio of the normalized value to its median);
- ``bias``: the projection's bias entry b[d] is the largest term of the projection output;
- ``down_proj`` / ``o_proj``: the largest terms W[d, j] x[j] of the down projection (x = y6, or y4 of a
  GeLU FFN) or of the attention output projection (x = the attention context; with the heads and key
  positions the context channel reads).

Each step carries the :class:`~.records.Edit` list that ablates it (weights and bias entries to 0, a gain
entry to the norm's median gain).
"""

from __future__ import annotations

import math

import torch

from ..adapters.base import Adapter, NormSpec
from ..runtime import ORDER, Entry, FunctionEntry, installed, run
from ..tracing.hooks import attach_positions
from .layout import LinearPart, RowCapture, linear_parts
from .records import BiasTerm, Edit, GainTerm, HeadRead, KeyRead, OriginStep, WeightTerm

BRANCH_NAMES = {"attn": "post-attention", "mlp": "post-FFN"}


def median_of(profile, layer: int, position: str) -> float | None:
    r = profile.results.get((layer, position))
    return None if r is None else float(r.stats["median"])


def _log_ratio(v: float | None, med: float | None) -> float:
    if v is None or not med or med <= 0:
        return 0.0
    return max(math.log10(max(abs(v), 1e-30) / med), 0.0)


# -- which layers grow the MA -----------------------------------------------------------------------------
def growth(prop: list[dict], peak_layer: int, peak: float, step_share: float) -> list[tuple[int, str, float]]:
    """(layer, branch, contribution) of every branch adding >= ``step_share`` x |peak| towards the peak's sign,
    up to the peak layer; ``prop`` is :func:`.explain_ma.propagation` (``attn`` / ``ffn`` residual changes)."""
    if not peak:
        return []
    sign = 1.0 if peak > 0 else -1.0
    out = []
    for p in prop[:peak_layer + 1]:
        for branch, key in (("attn", "attn"), ("mlp", "ffn")):
            c = p.get(key)
            if c is not None and sign * c >= step_share * abs(peak):
                out.append((p["layer"], branch, c))
    return out


# -- the projection output, term by term -----------------------------------------------------------------
class Decomposition:
    """y[d] = sum_j W[d, j] x[j] + b[d] of one projection at one token: the ``top`` terms by magnitude."""

    def __init__(self, rows, adapter: Adapter, part: LinearPart, layer: int, token: int, channel: int, top: int):
        self.part, self.layer, self.channel = part, layer, channel
        x = rows.row(layer, part.input_position, token)
        W = part.weight(adapter, layer)
        terms = W[channel].cpu() * x
        b = part.bias(adapter, layer)
        self.bias = float(b[channel]) if b is not None else None
        self.total = float(terms.sum()) + (self.bias or 0.0)
        self.n_terms = int(terms.numel())
        w_med = float(W.abs().median().clamp_min(1e-30))
        idx = terms.abs().topk(min(top, terms.numel())).indices.tolist()
        self.terms = [WeightTerm(part.module, part.role, channel, j, float(W[channel, j]), float(x[j]),
                                 float(terms[j]), self._share(float(terms[j])), abs(float(W[channel, j])) / w_med)
                      for j in idx]

    def _share(self, v: float) -> float | None:
        return v / self.total if self.total else None

    def strong(self, min_share: float) -> list[WeightTerm]:
        return [w for w in self.terms if w.share is not None and abs(w.share) >= min_share]

    def bias_term(self) -> BiasTerm | None:
        if self.bias is None:
            return None
        return BiasTerm(self.part.module, self.channel, self.bias, self._share(self.bias))

    def bias_edit(self) -> Edit:
        row = self.channel if self.part.rows is None else int(self.part.rows[self.channel])
        return Edit("bias", self.layer, self.part.module, "bias", (row,), 0.0)


def weight_edit(part: LinearPart, layer: int, row: int, col: int) -> Edit:
    """Zero W[row, col] of a projection part (``[out, in]`` indices), at its stored index."""
    stored = row if part.rows is None else int(part.rows[row])
    index = (col, stored) if part.spec.transposed else (stored, col)
    return Edit("weight", layer, part.module, "weight", index, 0.0)


def writer_part(adapter: Adapter, layer: int, branch: str) -> LinearPart | None:
    return next((p for p in linear_parts(adapter, layer) if p.output_position == f"{branch}.out"), None)


# -- a norm between the branch and the residual add ---------------------------------------------------------
def branch_norm_spec(adapter: Adapter, branch: str) -> NormSpec | None:
    path = adapter.branch_output_norms.get(branch)
    return next((n for n in adapter.norms() if n.module == path and n.output_position), None) if path else None


def gain_term(rows, adapter: Adapter, layer: int, branch: str, token: int, channel: int) -> GainTerm | None:
    """The branch output norm's gain at ``channel`` and the normalized value it scales (None without one)."""
    spec = branch_norm_spec(adapter, branch)
    y = rows.row(layer, spec.output_position, token) if spec is not None else None
    gain = adapter.norm_gain(layer, spec) if y is not None else None
    if gain is None:
        return None
    gain = gain.cpu()
    beta = getattr(adapter.layers()[layer].get_submodule(spec.module), "bias", None)
    shifted = y - (beta.detach().float().cpu() if beta is not None else 0.0)
    ok = gain.abs() > 1e-6
    pre = torch.where(ok, shifted / torch.where(ok, gain, torch.ones_like(gain)), torch.zeros_like(gain))
    med_gain = float(gain.abs().median())
    pre_med = float(pre[ok].abs().median()) if bool(ok.any()) else 0.0
    g, p = float(gain[channel]), float(pre[channel])
    ratio = abs(g) / med_gain if med_gain > 0 else math.inf
    lg, lp = _log_ratio(ratio, 1.0), _log_ratio(p, pre_med)
    return GainTerm(spec.output_position, f"{adapter.layer_name(layer)}.{spec.module}", channel, g, med_gain,
                    ratio, p, pre_med, lg / (lg + lp) if lg + lp > 0 else 0.0)


def gain_edit(adapter: Adapter, layer: int, branch: str, term: GainTerm) -> Edit:
    """Set the gain entry to the median |gain| (its sign kept), in the stored convention (weight = gain - offset)."""
    spec = branch_norm_spec(adapter, branch)
    target = math.copysign(term.median_gain, term.gain) - spec.gain_offset
    return Edit("gain", layer, term.module, "weight", (term.channel,), target)


# -- the input channels that carry the write ------------------------------------------------------------------
def rows_feeding(adapter: Adapter, parts, layer: int, j: int, rows, token: int, roles) -> list[dict]:
    """The rows of W_gate / W_up (or W_fc1) producing intermediate channel ``j``, and their alignment with the
    norm output at ``token``: cosine, rank of that cosine among all rows, and the input channels driving it."""
    out = []
    for part in parts:
        x = rows.row(layer, part.input_position, token) if part.role in roles else None
        if x is None:
            continue
        w = part.weight(adapter, layer)
        if j >= w.shape[0]:
            continue
        x = x.to(w.device)
        dots = w @ x
        norms = w.norm(dim=1)
        cos_all = dots / (norms * float(x.norm())).clamp_min(1e-30)
        cos = float(cos_all[j])
        terms, x = (w[j] * x).cpu(), x.cpu()
        dot = float(dots[j])
        bias = part.bias(adapter, layer)
        out.append({
            "role": part.role, "module": part.module, "row": j, "cosine": cos,
            "cosine_rank": int((cos_all.abs() > abs(cos)).sum()) + 1, "rows": int(w.shape[0]),
            "row_norm": float(norms[j]), "row_norm_ratio": float(norms[j] / norms.median().clamp_min(1e-30)),
            "pre_activation": dot + (float(bias[j]) if bias is not None else 0.0),
            "drivers": [{"channel": int(c), "input": float(x[c]), "weight": float(w[j, c].cpu()),
                         "share": float(terms[c] / dot) if dot else None}
                        for c in terms.abs().topk(min(3, terms.numel())).indices],
        })
    return out


def ffn_channel(rows, profile, adapter: Adapter, parts, layer: int, token: int, term: WeightTerm) -> dict:
    """A y6 (y4) channel carrying a down-projection write: its gate / act / up values, which branch makes it
    large (gate share of the log ratios to the tensor medians), and the W_gate / W_up (W_fc1) rows."""
    j = term.col
    item = {"channel": j, "value": term.input, "share": term.share}
    if adapter.ffn_kind == "glu":
        gate, up, act = (rows.at(layer, p, token, j) for p in ("mlp.gate", "mlp.up", "mlp.act"))
        lg = _log_ratio(act, median_of(profile, layer, "mlp.act"))
        lu = _log_ratio(up, median_of(profile, layer, "mlp.up"))
        share = lg / (lg + lu) if lg + lu > 0 else None
        label = None if share is None else ("gate" if share >= 0.65 else "up" if share <= 0.35 else "both")
        item.update({"gate": gate, "up": up, "act": act, "gate_log_ratio": lg, "up_log_ratio": lu,
                     "gate_share": share, "branch": label})
        roles = ("gate", "up")
    else:
        item.update({"gate": rows.at(layer, "mlp.fc1", token, j), "up": None,
                     "act": rows.at(layer, "mlp.act", token, j), "branch": "fc1"})
        roles = ("fc1",)
    item["rows"] = rows_feeding(adapter, parts, layer, j, rows, token, roles)
    return item


class _EagerAttention(Entry):
    """Attention switched to the eager implementation (the only one returning its probabilities)."""

    name, order = "explain.eager_attention", ORDER["probe"]

    def __init__(self) -> None:
        self.base: str | None = None

    def attach(self, model, hooks, reg) -> None:
        base = getattr(model.config, "_attn_implementation", None)
        if base in (None, "eager"):
            return
        try:
            model.set_attn_implementation("eager")
        except (ValueError, NotImplementedError, AttributeError):
            return  # no probabilities: the reads are reported as null
        self.base = base

    def detach(self, model) -> None:
        if self.base is not None and model.config._attn_implementation != self.base:
            model.set_attn_implementation(self.base)
        self.base = None


@torch.no_grad()
def attention_reads(model, adapter: Adapter, ids: torch.Tensor, layer: int, token: int, ctx: torch.Tensor,
                    channels: list[int], top: int = 3) -> list[HeadRead] | None:
    """For each context channel j (o_proj input) at ``token``: its head and the key positions s whose terms
    p[head, token, s] * v[s, j'] make ctx[j] (j' the value channel of j's key-value head). One forward of the
    window ``ids`` ([T]; up to ``token`` for a causal model); None when the attention returns no probabilities."""
    ids = adapter.causal_prefix(ids, token)
    cap = RowCapture(list(range(ids.shape[-1])), ids.shape[-1])
    probs: dict[str, torch.Tensor] = {}

    def keep(module, args, out):
        w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if isinstance(w, torch.Tensor):
            probs["p"] = w[0, :, token].detach().float().cpu()

    def hooks_fn(hooks):
        attach_positions(hooks, adapter, cap, layers=[layer], positions=["attn.v"])
        hooks.forward(adapter.attention(layer), keep)

    with installed(model, _EagerAttention(), FunctionEntry("explain.attention_reads", ORDER["trace"], hooks_fn)):
        run(model, ids.view(1, -1), batch_size=1, logits=False)
    v, p = cap.rows.get((layer, "attn.v")), probs.get("p")
    if v is None or p is None:
        return None
    head_dim = ctx.numel() // p.shape[0]
    group = p.shape[0] // max(v.shape[1] // head_dim, 1)
    out = []
    for j in channels:
        h = j // head_dim
        vj = v[:, (h // group) * head_dim + j % head_dim]
        terms, c = p[h] * vj, float(ctx[j])
        keys = [KeyRead(int(s), float(p[h, s]), float(vj[s]), float(terms[s]), float(terms[s]) / c if c else None)
                for s in terms.abs().topk(min(top, terms.numel())).indices if terms[s] != 0]
        out.append(HeadRead(j, h, keys))
    return out


# -- one step ------------------------------------------------------------------------------------------------
def _label(adapter: Adapter, mechanism: str, branch: str, dec: Decomposition | None,
           reads: list[HeadRead] | None, behind_norm: bool) -> str:
    role = f"W_{dec.part.role}" if dec is not None else "the projection"
    if mechanism == "norm_gain":
        return f"made by the {BRANCH_NAMES[branch]} norm gain"
    if mechanism == "bias":
        return f"made by the bias of {role}"
    if mechanism == "down_proj":
        alias = next((p.alias for p in adapter.positions() if p.name == dec.part.input_position), None)
        s = f"made at {alias or dec.part.input_position} by {role}"
    else:
        s = f"written by {role} from the attention context"
        if reads and reads[0].keys:
            s += f" (head {reads[0].head} reading key position {reads[0].keys[0].key_position})"
    return s + (f" through the {BRANCH_NAMES[branch]} norm" if behind_norm else "")


def _mechanism(dec: Decomposition | None, norm: GainTerm | None, branch: str, cfg) -> str:
    if norm is not None and norm.gain_share >= cfg.norm_gain_share:
        return "norm_gain"
    if dec is not None and dec.bias is not None and dec.terms and abs(dec.bias) > abs(dec.terms[0].contribution):
        return "bias"
    return "down_proj" if branch == "mlp" else "o_proj"


def build_step(rows, profile, adapter: Adapter, cfg, layer: int, branch: str, token: int, channel: int,
               contribution: float, share: float, residual: tuple, reader=None) -> OriginStep:
    """The origin step of ``branch`` at ``layer``: its mechanism, the terms that make it, its edits."""
    writer = f"{branch}.out"
    part = writer_part(adapter, layer, branch)
    dec = Decomposition(rows, adapter, part, layer, token, channel, cfg.top_contributors) \
        if part is not None and rows.row(layer, part.input_position, token) is not None else None
    norm = gain_term(rows, adapter, layer, branch, token, channel)
    mech = _mechanism(dec, norm, branch, cfg)
    step = OriginStep(layer, branch, mech, "", contribution, share, residual[0], residual[1], writer,
                      rows.at(layer, writer, token, channel), part.module if part else None,
                      part.input_position if part else None, norm=norm)
    edits = []
    if mech == "norm_gain":
        edits.append(gain_edit(adapter, layer, branch, norm))
    elif dec is not None:
        strong = dec.strong(cfg.min_share)
        step.weights = strong[:cfg.max_candidates] or ([] if mech == "bias" else dec.terms[:1])
        step.bias = dec.bias_term()
        edits += [weight_edit(part, layer, w.row, w.col) for w in step.weights]
        if step.bias is not None and step.bias.share is not None and abs(step.bias.share) >= cfg.min_share:
            edits.append(dec.bias_edit())
        carriers = strong[:cfg.top_channels] or dec.terms[:1]
        step.channels = _carriers(rows, profile, adapter, layer, token, carriers, branch)
        if branch == "attn" and reader is not None:
            step.attention = reader(layer, token, [c["channel"] for c in step.channels])
            for c, r in zip(step.channels, step.attention or []):
                c["head"] = r.head
    step.label = _label(adapter, mech, branch, dec, step.attention, norm is not None and mech != "norm_gain")
    step.ablation.edits = edits
    return step


def _carriers(rows, profile, adapter, layer, token, terms, branch) -> list[dict]:
    if branch == "mlp":
        parts = linear_parts(adapter, layer)
        return [ffn_channel(rows, profile, adapter, parts, layer, token, t) for t in terms]
    return [{"channel": t.col, "value": t.input, "share": t.share, "gate": None, "up": None} for t in terms]


def origin_steps(g: dict, rows, profile, adapter: Adapter, cfg, prop: list[dict], canc: dict,
                 series: list[float], reader=None) -> list[OriginStep]:
    """The origin steps of one MA group: residual growth for an MA on the residual stream; for an MA only at
    a projection output, that projection's write at the first layer reaching ``origin_fraction`` of its peak."""
    t, d = g["token_index"], g["channel"]
    if g["on_residual"] and canc.get("peak_layer") is not None:
        peak = canc["peak"]
        found = growth(prop, canc["peak_layer"], peak, cfg.step_share)
    else:
        peak = max(series) if series else 0.0
        layer = next((i for i, v in enumerate(series) if peak > 0 and v >= cfg.origin_fraction * peak), None)
        if layer is None:
            return []
        vals = {b: rows.at(layer, f"{b}.out", t, d) for b in ("attn", "mlp")}
        branch = max((b for b in vals if vals[b] is not None), key=lambda b: abs(vals[b]), default="mlp")
        found = [(layer, branch, vals.get(branch) or 0.0)]
    steps = []
    for layer, branch, c in found:
        p = prop[layer]
        before = p["attn_in"] if branch == "attn" or adapter.parallel else p["mlp_in"]
        after = p["mlp_in"] if branch == "attn" and not adapter.parallel else p["value"]
        steps.append(build_step(rows, profile, adapter, cfg, layer, branch, t, d, c, c / peak if peak else 0.0,
                                (before, after), reader))
    return steps
