"""Fake quantization of weights, activations (every linear input) and the KV cache; RTN or GPTQ weights.

Entry points: :class:`QuantConfig` and the named :data:`PRESETS` (``get_quant("w8a8-tensor")``),
:func:`quantize_` (in place, undone by the returned state's ``remove()``), :func:`prepare` + ``install``.
The arithmetic lives in :mod:`.quantizers`; docs/quantization.md documents every convention.
"""

from .config import PRESETS, QuantConfig, QuantConfigError, get_quant, parse_quant_list
from .fake import (
    ActQuantizer,
    QuantPlan,
    QuantState,
    Target,
    find_targets,
    prepare,
    quantize_,
    static_scales,
)
from .kv import KVQuantizer

__all__ = [
    "PRESETS",
    "ActQuantizer",
    "KVQuantizer",
    "QuantConfig",
    "QuantConfigError",
    "QuantPlan",
    "QuantState",
    "Target",
    "find_targets",
    "get_quant",
    "parse_quant_list",
    "prepare",
    "quantize_",
    "static_scales",
]
