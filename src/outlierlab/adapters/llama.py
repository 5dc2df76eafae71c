"""LLaMA layout: pre-norm RMSNorm, separate q/k/v/o, SwiGLU FFN (gate, up, act, down).

Also serves Mistral and Qwen2, which share the module names. Families that only add pieces (Qwen3's q/k norms,
Gemma's gain convention) subclass :class:`LlamaAdapter` in their own file.
"""

from __future__ import annotations

from . import register
from .base import GLU_ALIASES, Adapter, LinearSpec, NormSpec, Position, pos


@register
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    ffn_kind = "glu"
    #: the FFN's norm module (LLaMA calls it post_attention_layernorm; Gemma 2/3 pre_feedforward_layernorm).
    ffn_norm = "post_attention_layernorm"
    gain_offset = 0.0
    act_module = "mlp.act_fn"

    def attention_positions(self) -> list[Position]:
        return [
            pos("attn.in", "input_layernorm", "input", doc="residual stream into the layer"),
            pos("attn.norm", "input_layernorm", doc="norm output = q/k/v input"),
            pos("attn.q", "self_attn.q_proj"),
            pos("attn.k", "self_attn.k_proj"),
            pos("attn.v", "self_attn.v_proj"),
            *self.qk_norm_positions(),
            pos("attn.ctx", "self_attn.o_proj", "input", doc="attention context = o_proj input"),
            pos("attn.out", "self_attn.o_proj"),
        ]

    def qk_norm_positions(self) -> list[Position]:
        return []

    def post_attention_positions(self) -> list[Position]:
        """Positions between the attention output and the FFN norm (Gemma 2/3 post-attention norm)."""
        return []

    def ffn_positions(self) -> list[Position]:
        a = GLU_ALIASES
        return [
            pos("mlp.in", self.ffn_norm, "input", aliases=a, doc="residual stream into the FFN"),
            pos("mlp.norm", self.ffn_norm, aliases=a),
            pos("mlp.gate", "mlp.gate_proj", aliases=a),
            pos("mlp.up", "mlp.up_proj", aliases=a),
            pos("mlp.act", self.act_module, aliases=a, doc="act(gate)"),
            pos("mlp.down_in", "mlp.down_proj", "input", aliases=a, doc="act(gate) * up: MAs first appear here"),
            pos("mlp.out", "mlp.down_proj", aliases=a),
            *self.post_ffn_positions(),
            pos("block.out", "", aliases=a, doc="residual stream after the layer"),
        ]

    def post_ffn_positions(self) -> list[Position]:
        return []

    def positions(self) -> list[Position]:
        return [*self.attention_positions(), *self.post_attention_positions(), *self.ffn_positions()]

    def norms(self) -> list[NormSpec]:
        off = self.gain_offset
        return [
            NormSpec("attn.norm", "input_layernorm", "attn.norm", ("q", "k", "v"), off),
            NormSpec("mlp.norm", self.ffn_norm, "mlp.norm", ("gate", "up"), off),
        ]

    def linears(self) -> list[LinearSpec]:
        return [
            LinearSpec("q", "self_attn.q_proj", "attn.norm", "attn.q"),
            LinearSpec("k", "self_attn.k_proj", "attn.norm", "attn.k"),
            LinearSpec("v", "self_attn.v_proj", "attn.norm", "attn.v"),
            LinearSpec("o", "self_attn.o_proj", "attn.ctx", "attn.out"),
            LinearSpec("gate", "mlp.gate_proj", "mlp.norm", "mlp.gate"),
            LinearSpec("up", "mlp.up_proj", "mlp.norm", "mlp.up"),
            LinearSpec("down", "mlp.down_proj", "mlp.down_in", "mlp.out"),
        ]
