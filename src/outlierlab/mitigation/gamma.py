"""gamma equalization: flatten the outlier entries of the norms' per-channel gains.

A channel ``c`` of a norm is an outlier when ``|g_c| > k x median|g|`` (``g`` = effective gain, Gemma's
``1 + w`` included). Its gain moves to the target magnitude ``t`` (``median`` or ``mean`` of ``|g|``, or
``1``), keeping its sign; ``alpha`` moves it part way on a log scale: ``|g'_c| = |g_c|^(1-alpha) t^alpha``.

- ``fold``: the ratio ``r_c = g'_c / g_c`` is divided out of the input column ``c`` of every linear that
  reads the norm (``NormSpec.consumers``): exactly function-preserving, the outlier moves from the activation
  into the weights. LayerNorm biases are rescaled with the gain.
- ``nofold``: only the gain changes (the study's ablation); the function changes and the cost is measured.

Norms without consumers (Gemma 2/3's post-norms, Qwen3's q/k norms) are left alone; ``final=True`` also
treats the final norm, folded into the LM head (untied first when it shares the embedding matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..runtime import like
from .base import (
    Context,
    MitigationError,
    check_choice,
    fold_norm_rescale,
    folding_norms,
    get_gain,
    layer_list,
    scale_norm_output,
)


@dataclass(frozen=True)
class GammaConfig:
    """Equalize outlier norm gains (see the module docstring)."""

    name: ClassVar[str] = "gamma"
    #: outlier rule: |gain| > k x median |gain| of that norm. On SmolLM2-135M k = 1.5 (756 gains) cuts the
    #: norm-output CO ratio 1.61x; k = 1 (every gain above the median, 16,910) 1.90x, at the price of
    #: factors up to 14x pushed into the weights (docs/mitigation.md)
    k: float = 1.5
    #: median | mean | one
    target: str = "median"
    #: fold (function-preserving) | nofold (the study's ablation)
    mode: str = "fold"
    #: 1 = all the way to the target, 0 = unchanged; geometric interpolation in between
    alpha: float = 1.0
    #: norm names (``attn.norm``, ``mlp.norm``...); None = every norm whose output only feeds linears
    norms: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    #: also equalize the final norm, folded into the LM head (unties a tied embedding)
    final: bool = False

    def __post_init__(self) -> None:
        check_choice("gamma.target", self.target, ("median", "mean", "one"))
        check_choice("gamma.mode", self.mode, ("fold", "nofold"))
        if not 0.0 <= self.alpha <= 1.0:
            raise MitigationError(f"gamma.alpha must be in [0, 1], not {self.alpha}")
        if self.k <= 0:
            raise MitigationError(f"gamma.k must be positive, not {self.k}")

    @property
    def exact(self) -> bool:
        return self.mode == "fold"

    @property
    def keeps_scores(self) -> bool:
        """Every OTC score is unchanged: the fold scales a norm-output channel and its readers' columns inversely."""
        return self.exact


def target_ratio(gain: torch.Tensor, cfg: GammaConfig) -> torch.Tensor:
    """Per-channel multiplier ``g' / g`` (1 where the channel is not an outlier)."""
    a = gain.abs()
    med = a.median()
    t = {"median": med, "mean": a.mean(), "one": a.new_tensor(1.0)}[cfg.target]
    hit = a > cfg.k * med
    new = a.clamp_min(1e-12).pow(1.0 - cfg.alpha) * t.pow(cfg.alpha)
    ratio = torch.where(hit, new / a.clamp_min(1e-12), torch.ones_like(a))
    return ratio


@torch.no_grad()
def apply(ctx: Context, cfg: GammaConfig) -> dict:
    adapter = ctx.adapter
    norms = folding_norms(adapter) if cfg.mode == "fold" else [n for n in adapter.norms() if n.consumers]
    if cfg.norms is not None:
        known = {n.name for n in norms}
        missing = [n for n in cfg.norms if n not in known]
        if missing:
            raise MitigationError(f"gamma: norms {missing} are not foldable norms of this model ({sorted(known)})")
        norms = [n for n in norms if n.name in cfg.norms]
    changed, peak_before, peak_after = [], 0.0, 0.0
    for layer in layer_list(adapter, cfg.layers):
        for norm in norms:
            gain = get_gain(adapter, layer, norm)
            ratio = target_ratio(gain, cfg)
            med = float(gain.abs().median())
            peak_before = max(peak_before, float(gain.abs().max()) / med)
            peak_after = max(peak_after, float((gain * ratio).abs().max()) / float((gain * ratio).abs().median()))
            idx = torch.nonzero(ratio != 1).flatten().tolist()
            if not idx:
                continue
            if cfg.mode == "fold":
                fold_norm_rescale(adapter, layer, norm, ratio)
            else:
                scale_norm_output(adapter, layer, norm, ratio)
            changed.append({"layer": layer, "norm": norm.name, "channels": idx,
                            "ratio": [round(float(ratio[i]), 6) for i in idx]})
    if cfg.final:
        _final(ctx, cfg, changed)
    n = sum(len(c["channels"]) for c in changed)
    ctx.say(f"gamma: {n} outlier gains in {len(changed)} norms; max/median gain {peak_before:.2f} -> {peak_after:.2f}")
    return {"info": {"n_channels": n, "gain_max_over_median_before": peak_before,
                     "gain_max_over_median_after": peak_after, "changed": changed}}


def _final(ctx: Context, cfg: GammaConfig, changed: list) -> None:
    from .rotate import lm_head_weight, untie_lm_head

    adapter = ctx.adapter
    norm = adapter.final_norm()
    if norm is None or getattr(norm, "weight", None) is None:
        raise MitigationError("gamma.final: the model has no final norm with a gain")
    offset = adapter.final_norm_offset()
    gain = norm.weight.data.float() + offset
    ratio = target_ratio(gain, cfg)
    idx = torch.nonzero(ratio != 1).flatten().tolist()
    if not idx:
        return
    norm.weight.data.copy_(like(gain * ratio - offset, norm.weight))
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.mul_(like(ratio, norm.bias))
    if cfg.mode == "fold":
        untie_lm_head(ctx.model)
        w = lm_head_weight(ctx.model)
        w.mul_(like(1.0 / ratio, w).unsqueeze(0))
    changed.append({"layer": "final", "norm": "final", "channels": idx,
                    "ratio": [round(float(ratio[i]), 6) for i in idx]})
