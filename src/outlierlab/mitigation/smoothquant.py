"""SmoothQuant baseline: migrate activation outliers into the weights with per-channel factors.

For an activation ``X`` read by linears ``W_1..W_n``: ``s_c = max|X_c|^alpha / max_i max|W_i[:, c]|^(1 - alpha)``;
``X_c <- X_c / s_c`` and ``W_i[:, c] <- W_i[:, c] s_c``. The division is folded into the producer, so the
transform is exactly function-preserving:

- ``attn``: attention norm -> q/k/v (fused qkv included): divided out of the norm gain (and LayerNorm bias);
- ``mlp``: FFN norm -> gate/up (fc1): likewise (Phi's shared norm feeds q/k/v and fc1 together);
- ``down``: up -> down in GLU FFNs (``y6 = act(gate) * up`` is linear in ``up``): divided out of the up
  projection's rows (and bias). Not possible through a GeLU (fc1 -> fc2), which is skipped.

``max|X_c|`` comes from a calibration profile (per-channel abs-max, all tokens, the MA tokens included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..runtime import like
from .base import (
    Context,
    MitigationError,
    consumers,
    fold_norm_rescale,
    folding_norms,
    glu_up_rows,
    linear_bias,
    linear_weight,
    scale_input_columns,
)

PAIRS = ("attn", "mlp", "down")


@dataclass(frozen=True)
class SmoothQuantConfig:
    """alpha migration on norm -> q/k/v, norm -> gate/up and up -> down (see the module docstring)."""

    name: ClassVar[str] = "smoothquant"
    alpha: float = 0.5
    pairs: tuple[str, ...] = PAIRS
    #: floor of the factors and of the statistics (avoids 0 / 0 on dead channels)
    eps: float = 1e-5
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise MitigationError(f"smoothquant.alpha must be in [0, 1], not {self.alpha}")
        bad = [p for p in self.pairs if p not in PAIRS]
        if bad:
            raise MitigationError(f"smoothquant.pairs: unknown {bad}; choose among {', '.join(PAIRS)}")

    @property
    def exact(self) -> bool:
        return True


def factors(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    a = act_max.float().clamp_min(eps)
    w = w_max.float().clamp_min(eps)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(eps)


@torch.no_grad()
def apply(ctx: Context, cfg: SmoothQuantConfig) -> dict:
    adapter = ctx.adapter
    norms = [n for n in folding_norms(adapter)
             if ("attn" in cfg.pairs and n.name == "attn.norm") or ("mlp" in cfg.pairs and n.name == "mlp.norm")]
    do_down = "down" in cfg.pairs and adapter.ffn_kind == "glu"
    positions = tuple({n.output_position for n in norms} | ({"mlp.down_in"} if do_down else set()))
    if not positions:
        return {"info": {"pairs": []}}
    profile = ctx.calib_profile("smoothquant", positions, cfg.batch_size)
    done, ratio_before, ratio_after = [], {}, {}
    for layer in range(adapter.n_layers):
        for norm in norms:
            w_max = torch.stack([linear_weight(adapter, layer, s).abs().amax(dim=0).float()
                                 for s in consumers(adapter, norm)]).amax(dim=0)
            act = profile.get(layer, norm.output_position).stats["chan_absmax"].to(w_max.device)
            s = factors(act, w_max, cfg.alpha, cfg.eps)
            fold_norm_rescale(adapter, layer, norm, 1.0 / s)
            _track(ratio_before, ratio_after, norm.name, act, act / s)
        if do_down:
            up, rows = glu_up_rows(adapter, layer)
            spec = next(s for s in adapter.linears() if s.input_position == "mlp.down_in")
            w_max = linear_weight(adapter, layer, spec).abs().amax(dim=0).float()
            act = profile.get(layer, "mlp.down_in").stats["chan_absmax"].to(w_max.device)
            s = factors(act, w_max, cfg.alpha, cfg.eps)
            w = linear_weight(adapter, layer, up)
            w[rows].div_(like(s, w).unsqueeze(1))
            b = linear_bias(adapter, layer, up)
            if b is not None:
                b[rows].div_(like(s, b))
            scale_input_columns(adapter, layer, spec, s)
            _track(ratio_before, ratio_after, "down", act, act / s)
    done = [p for p in cfg.pairs if p != "down" or do_down]
    summary = ", ".join(f"{k} {ratio_before[k]:.0f} -> {ratio_after[k]:.1f}" for k in ratio_before)
    ctx.say(f"smoothquant: alpha {cfg.alpha:.2f} on {', '.join(done)}; per-channel abs-max max/median {summary}")
    return {"info": {"pairs": done, "chan_absmax_max_over_median_before": ratio_before,
                     "chan_absmax_max_over_median_after": ratio_after}}


def _track(before: dict, after: dict, key: str, act: torch.Tensor, new: torch.Tensor) -> None:
    def r(x):
        return float(x.max() / x.median().clamp_min(1e-12))

    before[key] = max(before.get(key, 0.0), r(act.cpu()))
    after[key] = max(after.get(key, 0.0), r(new.cpu()))
