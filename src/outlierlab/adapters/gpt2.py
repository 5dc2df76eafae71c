"""GPT-2: pre-norm LayerNorm, fused ``c_attn`` (q | k | v), GeLU FFN (``c_fc`` -> act -> ``c_proj``).

Its linears are ``Conv1D`` modules whose weight is stored ``[in, out]``.
"""

from __future__ import annotations

from . import register
from .base import MLP_ALIASES, Adapter, LinearSpec, NormSpec, Position, pos, split_last


@register
class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    ffn_kind = "mlp"
    layers_paths = ("transformer.h",)
    final_norm_paths = ("transformer.ln_f",)
    embed_paths = ("transformer.wte",)
    attention_module = "attn"
    position_embedding_paths = ("transformer.wpe",)

    def positions(self) -> list[Position]:
        d, a = self.config.n_embd, MLP_ALIASES
        return [
            pos("attn.in", "ln_1", "input", doc="residual stream into the layer"),
            pos("attn.norm", "ln_1", doc="norm output = c_attn input"),
            pos("attn.q", "attn.c_attn", select=split_last(0, d)),
            pos("attn.k", "attn.c_attn", select=split_last(d, 2 * d)),
            pos("attn.v", "attn.c_attn", select=split_last(2 * d, 3 * d)),
            pos("attn.ctx", "attn.c_proj", "input", doc="attention context = c_proj input"),
            pos("attn.out", "attn.c_proj"),
            pos("mlp.in", "ln_2", "input", aliases=a, doc="residual stream into the FFN"),
            pos("mlp.norm", "ln_2", aliases=a),
            pos("mlp.fc1", "mlp.c_fc", aliases=a),
            pos("mlp.act", "mlp.act", aliases=a, doc="act(fc1): MAs first appear here"),
            pos("mlp.down_in", None, aliases=a, same_as="mlp.act", doc="the same tensor as mlp.act"),
            pos("mlp.out", "mlp.c_proj", aliases=a),
            pos("block.out", "", aliases=a, doc="residual stream after the layer"),
        ]

    def norms(self) -> list[NormSpec]:
        return [
            NormSpec("attn.norm", "ln_1", "attn.norm", ("qkv",)),
            NormSpec("mlp.norm", "ln_2", "mlp.norm", ("fc1",)),
        ]

    def linears(self) -> list[LinearSpec]:
        return [
            LinearSpec("qkv", "attn.c_attn", "attn.norm", None, transposed=True),
            LinearSpec("o", "attn.c_proj", "attn.ctx", "attn.out", transposed=True),
            LinearSpec("fc1", "mlp.c_fc", "mlp.norm", "mlp.fc1", transposed=True),
            LinearSpec("fc2", "mlp.c_proj", "mlp.down_in", "mlp.out", transposed=True),
        ]
