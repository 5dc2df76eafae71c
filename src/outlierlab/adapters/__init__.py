"""Architecture adapters, one module per model family, registered by HF ``model_type``.

Every module in this package is imported on first use; a class decorated with :func:`register` becomes the
adapter of the ``model_type`` values it lists. Adding a family is adding one file (docs/adding-a-model.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from ..errors import UnsupportedArchitecture
from .base import Adapter, Capture, LinearSpec, NormSpec, Position

_REGISTRY: dict[str, type[Adapter]] = {}
_LOADED = False


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter of each of its ``model_types``."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def supported_model_types() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def adapter_class(model_type: str) -> type[Adapter]:
    _load_all()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())} "
            "(docs/adding-a-model.md says how to add one)"
        ) from None


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded Hugging Face causal LM, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedArchitecture(f"{type(model).__name__} has no config.model_type; is it a HF model?")
    return adapter_class(model_type)(model)


__all__ = [
    "Adapter",
    "Capture",
    "LinearSpec",
    "NormSpec",
    "Position",
    "adapter_class",
    "get_adapter",
    "register",
    "supported_model_types",
]
