"""Phi-3: the LLaMA layout with fused projections: ``qkv_proj`` ([q | k | v] along the output) and
``gate_up_proj`` ([gate | up]); the positions cut the fused outputs apart."""

from __future__ import annotations

from dataclasses import replace

from . import register
from .base import GLU_ALIASES, LinearSpec, NormSpec, Position, pos, split_last
from .llama import LlamaAdapter


@register
class Phi3Adapter(LlamaAdapter):
    model_types = ("phi3",)
    act_module = "mlp.activation_fn"

    def _qkv_sizes(self) -> tuple[int, int]:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return c.num_attention_heads * head_dim, kv_heads * head_dim

    def attention_positions(self) -> list[Position]:
        q, kv = self._qkv_sizes()
        return [
            pos("attn.in", "input_layernorm", "input", doc="residual stream into the layer"),
            pos("attn.norm", "input_layernorm", doc="norm output = qkv input"),
            pos("attn.q", "self_attn.qkv_proj", select=split_last(0, q)),
            pos("attn.k", "self_attn.qkv_proj", select=split_last(q, q + kv)),
            pos("attn.v", "self_attn.qkv_proj", select=split_last(q + kv, q + 2 * kv)),
            pos("attn.ctx", "self_attn.o_proj", "input", doc="attention context = o_proj input"),
            pos("attn.out", "self_attn.o_proj"),
        ]

    def ffn_positions(self) -> list[Position]:
        a, inter = GLU_ALIASES, self.config.intermediate_size
        positions = super().ffn_positions()
        fused = {
            "mlp.gate": pos("mlp.gate", "mlp.gate_up_proj", select=split_last(0, inter), aliases=a),
            "mlp.up": pos("mlp.up", "mlp.gate_up_proj", select=split_last(inter, 2 * inter), aliases=a),
        }
        return [fused.get(p.name, p) for p in positions]

    def linears(self) -> list[LinearSpec]:
        return [
            LinearSpec("qkv", "self_attn.qkv_proj", "attn.norm"),
            LinearSpec("o", "self_attn.o_proj", "attn.ctx", "attn.out"),
            LinearSpec("gate_up", "mlp.gate_up_proj", "mlp.norm"),
            LinearSpec("down", "mlp.down_proj", "mlp.down_in", "mlp.out"),
        ]

    def norms(self) -> list[NormSpec]:
        consumers = {"attn.norm": ("qkv",), "mlp.norm": ("gate_up",)}
        return [replace(n, consumers=consumers[n.name]) for n in super().norms()]
