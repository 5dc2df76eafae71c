"""Gemma 2: Gemma plus sandwich norms: a post-attention norm on the attention output, and pre/post
feed-forward norms around the FFN. Each extra norm gets a position of its own."""

from __future__ import annotations

from typing import ClassVar

from . import register
from .base import NormSpec, Position, pos
from .gemma import GemmaAdapter


@register
class Gemma2Adapter(GemmaAdapter):
    model_types = ("gemma2",)
    ffn_norm = "pre_feedforward_layernorm"
    branch_output_norms: ClassVar[dict[str, str]] = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}

    def post_attention_positions(self) -> list[Position]:
        return [pos("attn.post_norm", "post_attention_layernorm", doc="norm of the attention output")]

    def post_ffn_positions(self) -> list[Position]:
        return [pos("mlp.post_norm", "post_feedforward_layernorm", doc="norm of the FFN output")]

    def norms(self) -> list[NormSpec]:
        off = self.gain_offset
        return [
            *super().norms(),
            NormSpec("attn.post_norm", "post_attention_layernorm", "attn.post_norm", (), off),
            NormSpec("mlp.post_norm", "post_feedforward_layernorm", "mlp.post_norm", (), off),
        ]
