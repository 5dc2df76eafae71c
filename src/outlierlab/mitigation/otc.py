"""OTC tuning: the outlier-triggering channels of the linears that read a norm (W_q first).

Score of input channel ``c`` of a linear ``W`` reading activation ``x``: ``E|x_c| * ||W[:, c]||_2``, the
typical contribution of that channel to the output. Channel ``c`` is an OTC when its score is at least
``k`` times the median score of that linear (``analysis.detect.otc_scores``/``otc_columns``, the rule the
explainer uses too, which adds the cause of each OTC). A fused projection (``qkv``, ``gate_up``) is scored as
a whole when ``q``/``gate`` is asked.

Closed form (``shrink``): each OTC column is scaled by ``s_c = min(1, target_k x median / score_c)``.

- ``compensate="none"``: only that column shrinks; the function changes (measured, then optionally repaired
  by the fine-tuning below);
- ``compensate="gain"``: exact. The column ``c`` of *every* linear reading the same norm shrinks by ``s_c``
  and the norm's gain at ``c`` grows by ``1 / s_c``. The algebra allows nothing else exactly: the score is
  invariant under any exact rescale, so this moves the outlier from the weight column into the activation
  (flatter weights for weight quantization, a larger activation channel). Reported, not hidden.

Selective fine-tuning (``steps > 0``): only the OTC columns (and with ``train_gains`` the gains at those
channels) are trainable, every other parameter is frozen (gradient masks). Loss = KL(original model ||
model) of the next-token distribution on the calibration windows + ``lam`` x the mean, over the outputs of
the tuned linears (and the norm outputs when gains train), of the CO channels' mean |x| over the tensor's
mean |x| (detached). The original model's log-probabilities are computed before any method runs (so runtime
hooks of earlier methods, e.g. tma, are trained around). On CPU, SmolLM2-135M: see docs/mitigation.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..adapters.base import LinearSpec
from ..analysis.detect import column_norms, otc_columns, otc_scores
from ..runtime import ORDER, FunctionEntry, call, installed, run
from ..tracing import attach_positions
from .base import (
    Context,
    MitigationError,
    check_choice,
    consumers,
    folding_norms,
    get_gain,
    layer_list,
    linear_module,
    linear_spec,
    linear_weight,
    norm_module,
    set_gain,
)

FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}
FUSED_POSITIONS = {"qkv": ("attn.q", "attn.k", "attn.v"), "gate_up": ("mlp.gate", "mlp.up")}


@dataclass(frozen=True)
class OTCConfig:
    """Closed-form shrink and selective fine-tuning of OTC columns (see the module docstring)."""

    name: ClassVar[str] = "otc"
    roles: tuple[str, ...] = ("q", "k", "v")
    #: OTC rule: score >= k x median score of the linear
    k: float = 8.0
    #: closed form: shrink OTC columns so that their score is target_k x median (0 = no closed form)
    target_k: float = 0.0
    #: none | gain (exact, see the module docstring)
    compensate: str = "none"
    #: selective fine-tuning steps (0 = none)
    steps: int = 0
    #: fine-tuning defaults = the run measured in docs/mitigation.md
    lr: float = 1e-3
    lam: float = 0.02
    train_gains: bool = True
    #: fine-tuning windows are the first seq_len tokens of the calibration windows
    seq_len: int = 256
    batch_size: int = 2
    layers: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("otc.compensate", self.compensate, ("none", "gain"))
        if self.k <= 0:
            raise MitigationError(f"otc.k must be positive, not {self.k}")
        if self.steps < 0 or self.target_k < 0:
            raise MitigationError("otc.steps and otc.target_k must be >= 0")
        if self.compensate == "gain" and self.steps:
            raise MitigationError("otc: compensate='gain' is the exact closed form; use steps=0 with it")

    @property
    def exact(self) -> bool:
        return self.steps == 0 and (self.target_k == 0 or self.compensate == "gain")

    @property
    def needs_teacher(self) -> bool:
        return self.steps > 0

    @property
    def scores_only(self) -> bool:
        """Only finds and reports the OTCs (no closed form, no fine-tuning): the model is left as it is."""
        return self.steps == 0 and self.target_k == 0


# -- scoring ---------------------------------------------------------------------------------------------
def resolve_roles(adapter, roles) -> list[LinearSpec]:
    have = {s.role: s for s in adapter.linears()}
    out = []
    for role in roles:
        spec = have.get(role) or have.get(FUSED.get(role, ""))
        if spec is None:
            raise MitigationError(f"otc: the model has no linear with role {role!r} (roles: {sorted(have)})")
        if spec not in out:
            out.append(spec)
    reading_norm = {p for n in adapter.norms() for p in n.consumers}
    bad = [s.role for s in out if s.role not in reading_norm]
    if bad:
        raise MitigationError(f"otc: {bad} do not read a norm output; OTC scoring needs q/k/v/gate/up/fc1")
    return out


def scores(adapter, profile, layer: int, spec: LinearSpec) -> torch.Tensor:
    return otc_scores(profile.get(layer, spec.input_position).stats["chan_mean"],
                      column_norms(linear_weight(adapter, layer, spec)))


def find_otcs(adapter, profile, specs, layers, k: float) -> dict[tuple[int, str], dict]:
    """{(layer, role): {"channels": [...], "score_ratio": [...], "median": m}} for linears with OTCs."""
    out = {}
    for layer in layers:
        for spec in specs:
            s = scores(adapter, profile, layer, spec)
            hit, med = otc_columns(s, k)
            if hit:
                out[(layer, spec.role)] = {"channels": hit, "median": med,
                                           "score_ratio": [round(float(s[c] / med), 2) for c in hit]}
    return out


def _norm_of(adapter, role: str):
    return next(n for n in adapter.norms() if role in n.consumers)


# -- closed form -----------------------------------------------------------------------------------------
@torch.no_grad()
def closed_form(ctx: Context, cfg: OTCConfig, profile, otcs: dict) -> dict:
    adapter = ctx.adapter
    applied = 0
    if cfg.compensate == "none":
        for (layer, role), found in otcs.items():
            spec = linear_spec(adapter, role)
            s = scores(adapter, profile, layer, spec)
            w = linear_weight(adapter, layer, spec)
            for c in found["channels"]:
                f = min(1.0, cfg.target_k * found["median"] / float(s[c]))
                w[:, c] *= f
                applied += 1
        return {"columns_shrunk": applied}
    # exact: one factor per (layer, norm, channel), applied to every consumer, inverse into the gain
    if not all(n in folding_norms(adapter) for n in {_norm_of(adapter, r) for _, r in otcs}):
        raise MitigationError("otc: compensate='gain' needs norms whose outputs only feed linears")
    per_norm: dict[tuple[int, str], dict[int, float]] = {}
    for (layer, role), found in otcs.items():
        spec = linear_spec(adapter, role)
        s = scores(adapter, profile, layer, spec)
        norm = _norm_of(adapter, role)
        slot = per_norm.setdefault((layer, norm.name), {})
        for c in found["channels"]:
            f = min(1.0, cfg.target_k * found["median"] / float(s[c]))
            slot[c] = min(slot.get(c, 1.0), f)
    for (layer, name), chans in per_norm.items():
        norm = next(n for n in adapter.norms() if n.name == name)
        gain = get_gain(adapter, layer, norm)
        ratio = torch.ones_like(gain)
        for c, f in chans.items():
            ratio[c] = f
        set_gain(adapter, layer, norm, gain / ratio)
        bias = getattr(norm_module(adapter, layer, norm), "bias", None)
        if bias is not None:
            bias.data.div_(ratio.to(bias.dtype))
        for spec in consumers(adapter, norm):
            w = linear_weight(adapter, layer, spec)
            w.mul_(ratio.to(w.dtype).unsqueeze(0))
        applied += len(chans)
    return {"channels_moved_to_gain": applied}


# -- fine-tuning -----------------------------------------------------------------------------------------
def teacher_logprobs(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Next-token log-probabilities of ``model`` on ``ids`` (fp16 to keep memory at n x T x V x 2 bytes)."""
    out = []
    run(model, ids, batch_size, lambda b, o: out.append(torch.log_softmax(o.logits.float(), dim=-1).half()),
        description="otc teacher")
    return torch.cat([t.to(out[0].device) for t in out])


def finetune_ids(ctx: Context, cfg: OTCConfig) -> torch.Tensor:
    return ctx.calib_ids("otc")[:, :cfg.seq_len]


def _co_channels(profile_full, positions, layers) -> dict[tuple[int, str], list[int]]:
    out = {}
    for layer in layers:
        for pos in positions:
            r = profile_full.results.get((layer, pos))
            if r is not None and r.channel_outliers:
                out[(layer, pos)] = [c["channel"] for c in r.channel_outliers]
    return out


def finetune(ctx: Context, cfg: OTCConfig, otcs: dict, co: dict) -> dict:
    model, adapter = ctx.model, ctx.adapter
    teacher = ctx.teacher.get("otc")
    if teacher is None:
        raise MitigationError("otc fine-tuning needs the original model's log-probabilities (run it via mitigate)")
    ids = finetune_ids(ctx, cfg)
    flags = {p: p.requires_grad for p in model.parameters()}
    params, masks, grad_hooks = [], [], []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for (layer, role), found in otcs.items():
            spec = linear_spec(adapter, role)
            param = linear_module(adapter, layer, spec).weight
            mask = torch.zeros_like(param)
            cols = torch.tensor(found["channels"], device=param.device)
            if spec.transposed:
                mask[cols, :] = 1
            else:
                mask[:, cols] = 1
            params.append(param)
            masks.append(mask)
            if cfg.train_gains:
                norm = norm_module(adapter, layer, _norm_of(adapter, role))
                gmask = torch.zeros_like(norm.weight)
                gmask[cols.to(gmask.device)] = 1
                if not any(norm.weight is p for p in params):
                    params.append(norm.weight)
                    masks.append(gmask)
                else:
                    i = next(i for i, p in enumerate(params) if p is norm.weight)
                    masks[i] = torch.maximum(masks[i], gmask)
        for p, m in zip(params, masks):
            p.requires_grad_(True)
            grad_hooks.append(p.register_hook(lambda g, m=m: g * m))
        opt = torch.optim.Adam(params, lr=cfg.lr)
        penalty_terms: list[torch.Tensor] = []

        def collect(layer, name, x):
            chans = co.get((layer, name))
            if chans:
                a = x.abs()
                penalty_terms.append(a[..., chans].mean() / a.mean().detach().clamp_min(1e-12))

        positions = sorted({pos for _, pos in co})
        layers = sorted({layer for layer, _ in co})
        gen = torch.Generator().manual_seed(cfg.seed)
        history = []
        t0 = time.perf_counter()
        model.train(False)
        probe = FunctionEntry("otc.penalty", ORDER["trace"],
                              lambda hooks: attach_positions(hooks, adapter, collect, layers, positions))
        with installed(model, *([probe] if co and cfg.lam > 0 else [])):
            for step in range(cfg.steps):
                pick = torch.randperm(len(ids), generator=gen)[:cfg.batch_size]
                batch = ids[pick]
                penalty_terms.clear()
                logits = call(model, batch).logits.float()
                logp = torch.log_softmax(logits, dim=-1)
                t = teacher[pick.to(teacher.device), :batch.shape[1]].to(logp.device).float()
                kl = (t.exp() * (t - logp)).sum(-1).mean()
                pen = (torch.stack([p.to(kl.device) for p in penalty_terms]).mean() if penalty_terms
                       else kl.new_zeros(()))
                loss = kl + cfg.lam * pen
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append({"step": step, "kl": float(kl.detach()), "penalty": float(pen.detach())})
                if step == 0 or (step + 1) % max(1, cfg.steps // 5) == 0:
                    ctx.say(f"otc: step {step + 1}/{cfg.steps} kl {history[-1]['kl']:.4f} penalty {history[-1]['penalty']:.3f} "
                            f"({time.perf_counter() - t0:.0f} s)")
        seconds = time.perf_counter() - t0
    finally:
        for h in grad_hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.eval()
    n_trainable = int(sum(float(m.sum()) for m in masks))
    ctx.say(f"otc: fine-tuned {n_trainable} weights for {cfg.steps} steps in {seconds:.0f} s")
    return {"steps": cfg.steps, "seconds": seconds, "trainable": n_trainable, "history": history,
            "kl_first": history[0]["kl"] if history else None, "kl_last": history[-1]["kl"] if history else None,
            "penalty_first": history[0]["penalty"] if history else None,
            "penalty_last": history[-1]["penalty"] if history else None}


def apply(ctx: Context, cfg: OTCConfig) -> dict:
    adapter = ctx.adapter
    specs = resolve_roles(adapter, cfg.roles)
    layers = layer_list(adapter, cfg.layers)
    inputs = tuple({s.input_position for s in specs})
    outputs = set()
    if cfg.steps > 0:  # only the fine-tuning penalizes the COs of the outputs: scoring reads the inputs
        for s in specs:
            outputs.update(FUSED_POSITIONS.get(s.role, (s.output_position,)))
        outputs.discard(None)
    positions = tuple(sorted(set(inputs) | outputs))
    profile = ctx.calib_profile("otc", positions, layers=layers)
    otcs = find_otcs(adapter, profile, specs, layers, cfg.k)
    n = sum(len(v["channels"]) for v in otcs.values())
    peak = max((max(v["score_ratio"]) for v in otcs.values()), default=0.0)
    ctx.say(f"otc: {n} OTC columns in {len(otcs)} linears (score >= {cfg.k:g} x median; largest {peak:.1f}x)")
    info = {"n_otc": n, "largest_score_ratio": peak,
            "otcs": [{"layer": layer, "role": role, **v} for (layer, role), v in sorted(otcs.items())]}
    if cfg.target_k > 0 and otcs:
        info["closed_form"] = closed_form(ctx, cfg, profile, otcs)
    if cfg.steps > 0 and otcs:
        co_positions = set(outputs) | (set(inputs) if cfg.train_gains else set())
        co = _co_channels(profile, co_positions, layers)
        info["penalized_co"] = {f"L{layer}.{pos}": ch for (layer, pos), ch in sorted(co.items())}
        info["finetune"] = finetune(ctx, cfg, otcs, co)
    return {"info": info}

