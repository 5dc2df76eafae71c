"""Qwen3: the LLaMA layout plus per-head RMSNorms on q and k (``q_norm``/``k_norm``) before RoPE."""

from __future__ import annotations

import torch

from . import register
from .base import NormSpec, Position, pos
from .llama import LlamaAdapter


def _heads_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, head_dim] -> [batch, tokens, heads, head_dim]."""
    return x.transpose(1, 2)


class QKNormMixin:
    """Adds ``attn.q_norm``/``attn.k_norm`` positions and norms for models with per-head q/k norms.

    ``qk_norm_heads_first`` says whether the norm sees ``[batch, heads, tokens, head_dim]`` (Gemma 3) rather
    than ``[batch, tokens, heads, head_dim]`` (Qwen3); positions are always read token-major.
    """

    qk_norm_heads_first = False

    def qk_norm_positions(self) -> list[Position]:
        select = _heads_to_tokens if self.qk_norm_heads_first else None
        return [
            pos("attn.q_norm", "self_attn.q_norm", select=select, doc="per-head norm of q (heads x head_dim)"),
            pos("attn.k_norm", "self_attn.k_norm", select=select, doc="per-head norm of k (heads x head_dim)"),
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
