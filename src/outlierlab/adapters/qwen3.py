"""Qwen3: the LLaMA layout plus per-head RMSNorms on q and k (``q_norm``/``k_norm``) before RoPE."""

from __future__ import annotations

from . import register
from .base import NormSpec, Position, pos
from .llama import LlamaAdapter


class QKNormMixin:
    """Adds ``attn.q_norm``/``attn.k_norm`` positions and norms for models with per-head q/k norms."""

    def qk_norm_positions(self) -> list[Position]:
        return [
            pos("attn.q_norm", "self_attn.q_norm", doc="per-head RMSNorm of q (heads x head_dim flattened)"),
            pos("attn.k_norm", "self_attn.k_norm", doc="per-head RMSNorm of k (heads x head_dim flattened)"),
        ]

    def norms(self) -> list[NormSpec]:
        off = self.gain_offset
        return [
            *super().norms(),
            NormSpec("attn.q_norm", "self_attn.q_norm", "attn.q_norm", (), off),
            NormSpec("attn.k_norm", "self_attn.k_norm", "attn.k_norm", (), off),
        ]


@register
class Qwen3Adapter(QKNormMixin, LlamaAdapter):
    model_types = ("qwen3",)
