"""GPT-NeoX / Pythia: LayerNorm, fused per-head ``query_key_value``, GeLU FFN, and (by default) a parallel
residual: ``h + attn(ln1(h)) + mlp(ln2(h))``, where the FFN input is the layer input itself."""

from __future__ import annotations

import torch

from . import register
from .base import MLP_ALIASES, Adapter, LinearSpec, NormSpec, Position, pos


def _neox_part(heads: int, head_dim: int, part: int):
    """Select q (0), k (1) or v (2) from the fused output laid out as [heads, 3 * head_dim]."""

    def select(x: torch.Tensor) -> torch.Tensor:
        y = x.view(*x.shape[:-1], heads, 3 * head_dim)[..., part * head_dim:(part + 1) * head_dim]
        return y.reshape(*x.shape[:-1], heads * head_dim)

    return select


@register
class GPTNeoXAdapter(Adapter):
    model_types = ("gpt_neox",)
    ffn_kind = "mlp"
    layers_paths = ("gpt_neox.layers",)
    final_norm_paths = ("gpt_neox.final_layer_norm",)
    embed_paths = ("gpt_neox.embed_in",)
    attention_module = "attention"

    @property
    def parallel(self) -> bool:
        return bool(getattr(self.config, "use_parallel_residual", True))

    def positions(self) -> list[Position]:
        c, a = self.config, MLP_ALIASES
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        if self.parallel:
            mlp_in = pos("mlp.in", None, aliases=a, same_as="attn.in", doc="parallel block: the layer input")
        else:
            mlp_in = pos("mlp.in", "post_attention_layernorm", "input", aliases=a, doc="residual into the FFN")
        return [
            pos("attn.in", "input_layernorm", "input", doc="residual stream into the layer"),
            pos("attn.norm", "input_layernorm", doc="norm output = query_key_value input"),
            pos("attn.q", "attention.query_key_value", select=_neox_part(heads, head_dim, 0)),
            pos("attn.k", "attention.query_key_value", select=_neox_part(heads, head_dim, 1)),
            pos("attn.v", "attention.query_key_value", select=_neox_part(heads, head_dim, 2)),
            pos("attn.ctx", "attention.dense", "input", doc="attention context = dense input"),
            pos("attn.out", "attention.dense"),
            mlp_in,
            pos("mlp.norm", "post_attention_layernorm", aliases=a),
            pos("mlp.fc1", "mlp.dense_h_to_4h", aliases=a),
            pos("mlp.act", "mlp.act", aliases=a, doc="act(fc1): MAs first appear here"),
            pos("mlp.down_in", None, aliases=a, same_as="mlp.act", doc="the same tensor as mlp.act"),
            pos("mlp.out", "mlp.dense_4h_to_h", aliases=a),
            pos("block.out", "", aliases=a, doc="residual stream after the layer"),
        ]

    def norms(self) -> list[NormSpec]:
        return [
            NormSpec("attn.norm", "input_layernorm", "attn.norm", ("qkv",)),
            NormSpec("mlp.norm", "post_attention_layernorm", "mlp.norm", ("fc1",)),
        ]

    def linears(self) -> list[LinearSpec]:
        return [
            LinearSpec("qkv", "attention.query_key_value", "attn.norm"),
            LinearSpec("o", "attention.dense", "attn.ctx", "attn.out"),
            LinearSpec("fc1", "mlp.dense_h_to_4h", "mlp.norm", "mlp.fc1"),
            LinearSpec("fc2", "mlp.dense_4h_to_h", "mlp.down_in", "mlp.out"),
        ]
