"""KV-cache fake quantization: key and value states quantized per head and per token, after RoPE (and after
q/k norms where the model has them), by wrapping the model's attention function.

transformers 5.x routes every attention call of the supported families through ``AttentionInterface``: the
attention module calls ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)`` with the
query, key and value states already shaped ``[batch, heads, tokens, head_dim]`` and rotated. We register one
wrapper per base implementation (``outlierlab_kv_eager``, ``outlierlab_kv_sdpa``...) with the matching mask
builder, and switch the model to it with ``set_attn_implementation``. The wrapper looks the attention module up
in a weak map filled by the registry entry :class:`KVEntry` (so several models can be quantized differently
at once), quantizes key and value, and calls the original implementation with everything else unchanged.
Removing the entry restores the previous implementation and forgets the modules.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..runtime import ORDER, Entry
from .config import QuantConfigError
from .quantizers import fake_quant, qparams

PREFIX = "outlierlab_kv_"
_REGISTERED: set[str] = set()
#: attention module -> (quantizer, layer index), filled by KVEntry
_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class KVQuantizer:
    """Fake-quantizes ``[batch, heads, tokens, head_dim]`` states, one scale (and zero) per head and token; the
    first ``prefix`` tokens stay in full precision. With ``measure`` set it records the error (signal and
    noise power per layer) and, if ``passthrough``, returns the input unchanged. ``rotation(x, which)``, set
    by :class:`KVEntry` from an installed mitigation entry that has ``kv_rotation`` (QuaRot), gives an
    orthogonal ``[head_dim, head_dim]`` matrix ``R`` or None: the states are quantized as ``Q(x R) R^T``."""

    bits: int
    symmetric: bool = False
    clip: float = 1.0
    prefix: int = 0
    measure: dict | None = None
    passthrough: bool = False
    rotation: Callable | None = field(default=None, repr=False)
    calls: int = field(default=0, repr=False)

    def __call__(self, x: torch.Tensor, layer: int | None = None, which: str = "k") -> torch.Tensor:
        self.calls += 1
        r = self.rotation(x, which) if self.rotation is not None else None
        xr = x if r is None else x @ r
        scale, zero = qparams(xr, self.bits, self.symmetric, -1, self.clip)
        xq = fake_quant(xr, scale, zero, self.bits)
        if r is not None:
            xq = xq @ r.T
        p = min(self.prefix, x.shape[-2])
        if p:
            xq[..., :p, :] = x[..., :p, :]
        if self.measure is not None:
            diff = (xq.float() - x.float())
            sig = x.float().pow(2).sum().double()
            err = diff.pow(2).sum().double()
            key = (layer, which)
            acc = self.measure.get(key)
            if acc is None:
                self.measure[key] = torch.stack([sig, err])
            else:
                acc += torch.stack([sig, err])
        return x if self.passthrough else xq


def _base_function(module, base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_wrapper(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        state = _STATE.get(module)
        if state is not None:
            quantizer, layer = state
            key = quantizer(key, layer, "k")
            value = quantizer(value, layer, "v")
        return _base_function(module, base)(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def register(base: str) -> str:
    """Register the wrapper around ``base`` (and its mask builder) once; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    name = f"{PREFIX}{base}"
    if name not in _REGISTERED:
        AttentionInterface.register(name, _make_wrapper(base))
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
        if mask_fn is None:
            mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
        AttentionMaskInterface.register(name, mask_fn)
        _REGISTERED.add(name)
    return name


class KVEntry(Entry):
    """Registry entry ``quant.kv``: the model's attention switched to the KV-quantizing wrapper."""

    name = "quant.kv"
    order = ORDER["quant.kv"]

    def __init__(self, quantizer: KVQuantizer, layers=None) -> None:
        self.quantizer, self.layers = quantizer, layers
        self._base: str | None = None
        self._modules: list = []

    def describe(self) -> dict:
        q = self.quantizer
        return {"name": self.name, "bits": q.bits, "symmetric": q.symmetric, "clip": q.clip, "prefix": q.prefix}

    def attach(self, model, hooks, reg) -> None:
        from ..adapters import get_adapter

        adapter = get_adapter(model)
        base = getattr(model.config, "_attn_implementation", None) or "eager"
        if base.startswith(PREFIX):
            raise QuantConfigError("the model's attention is already wrapped for KV quantization")
        can = getattr(model, "_can_set_attn_implementation", None)
        if can is not None and not can():
            raise QuantConfigError(f"{type(model).__name__} does not route attention through transformers' "
                                   "AttentionInterface: KV-cache quantization is not available for it")
        chosen = [i for i in range(adapter.n_layers) if self.layers is None or i in self.layers]
        self._modules = [adapter.attention(i) for i in chosen]
        for i, m in zip(chosen, self._modules):
            _STATE[m] = (self.quantizer, i)
        rotations = [e for e in reg.entries if hasattr(e, "kv_rotation")]
        self.quantizer.rotation = rotations[0].kv_rotation if rotations else None
        name = register(base)
        self._base = base
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise QuantConfigError(f"could not switch {type(model).__name__} to a KV-quantizing attention")

    def detach(self, model) -> None:
        try:
            if self._base is not None and model.config._attn_implementation != self._base:
                model.set_attn_implementation(self._base)
        finally:
            for m in self._modules:
                _STATE.pop(m, None)
            self._modules, self._base = [], None
            self.quantizer.rotation = None
