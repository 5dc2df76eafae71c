"""Gemma 3: Gemma 2's sandwich norms plus Qwen3-style per-head q/k norms (gain convention 1 + w)."""

from __future__ import annotations

from . import register
from .gemma2 import Gemma2Adapter
from .qwen3 import QKNormMixin


@register
class Gemma3Adapter(QKNormMixin, Gemma2Adapter):
    model_types = ("gemma3_text", "gemma3")
    qk_norm_heads_first = True
    layers_paths = ("model.layers", "model.language_model.layers", "language_model.model.layers")
    final_norm_paths = ("model.norm", "model.language_model.norm", "language_model.model.norm")
    embed_paths = ("model.embed_tokens", "model.language_model.embed_tokens")
