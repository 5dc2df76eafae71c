"""Phi (1, 1.5, 2): one shared LayerNorm feeding a parallel block, ``h + attn(ln(h)) + mlp(ln(h))``, with
separate q/k/v, a ``dense`` output projection and a GeLU FFN (fc1 -> act -> fc2)."""

from __future__ import annotations

from . import register
from .base import MLP_ALIASES, Adapter, LinearSpec, NormSpec, Position, pos


@register
class PhiAdapter(Adapter):
    model_types = ("phi",)
    ffn_kind = "mlp"
    final_norm_paths = ("model.final_layernorm",)

    @property
    def parallel(self) -> bool:
        return True

    def positions(self) -> list[Position]:
        a = MLP_ALIASES
        return [
            pos("attn.in", "input_layernorm", "input", doc="residual stream into the layer"),
            pos("attn.norm", "input_layernorm", doc="the shared norm output = q/k/v and fc1 input"),
            pos("attn.q", "self_attn.q_proj"),
            pos("attn.k", "self_attn.k_proj"),
            pos("attn.v", "self_attn.v_proj"),
            pos("attn.ctx", "self_attn.dense", "input", doc="attention context = dense input"),
            pos("attn.out", "self_attn.dense"),
            pos("mlp.in", None, aliases=a, same_as="attn.in", doc="parallel block: the layer input"),
            pos("mlp.norm", None, aliases=a, same_as="attn.norm", doc="parallel block: the shared norm"),
            pos("mlp.fc1", "mlp.fc1", aliases=a),
            pos("mlp.act", "mlp.activation_fn", aliases=a, doc="act(fc1): MAs first appear here"),
            pos("mlp.down_in", None, aliases=a, same_as="mlp.act", doc="the same tensor as mlp.act"),
            pos("mlp.out", "mlp.fc2", aliases=a),
            pos("block.out", "", aliases=a, doc="residual stream after the layer"),
        ]

    def norms(self) -> list[NormSpec]:
        return [NormSpec("attn.norm", "input_layernorm", "attn.norm", ("q", "k", "v", "fc1"))]

    def linears(self) -> list[LinearSpec]:
        return [
            LinearSpec("q", "self_attn.q_proj", "attn.norm", "attn.q"),
            LinearSpec("k", "self_attn.k_proj", "attn.norm", "attn.k"),
            LinearSpec("v", "self_attn.v_proj", "attn.norm", "attn.v"),
            LinearSpec("o", "self_attn.dense", "attn.ctx", "attn.out"),
            LinearSpec("fc1", "mlp.fc1", "attn.norm", "mlp.fc1"),
            LinearSpec("fc2", "mlp.fc2", "mlp.down_in", "mlp.out"),
        ]
