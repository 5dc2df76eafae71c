"""Model resolution and loading."""

from .loader import (
    ALIASES,
    DEFAULT_MODEL,
    LoadedModel,
    ModelSource,
    load_model,
    max_positions,
    resolve,
)

__all__ = ["ALIASES", "DEFAULT_MODEL", "LoadedModel", "ModelSource", "load_model", "max_positions", "resolve"]
