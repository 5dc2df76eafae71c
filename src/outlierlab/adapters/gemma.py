"""Gemma (1): the LLaMA layout with GeGLU and RMSNorm gains stored as ``gamma - 1`` (effective gain 1 + w)."""

from __future__ import annotations

from . import register
from .llama import LlamaAdapter


@register
class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma",)
    gain_offset = 1.0
