"""The one JSON sanitizer of the package: one policy for what JSON cannot hold."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


def jsonable(obj: Any, fallback: Callable[[Any], Any] | None = None) -> Any:
    """A JSON-safe copy: dataclasses become dicts, tuples lists, keys strings, scalars of numpy or torch (0-d)
    plain numbers, and non-finite floats None (strict JSON has no inf or NaN; every writer uses
    ``allow_nan=False``). Other objects pass unchanged, or through ``fallback`` (e.g. ``repr``) when given."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), fallback) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, fallback) for v in obj]
    if isinstance(obj, dict):
        return {str(k): jsonable(v, fallback) for k, v in obj.items()}
    if getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None)):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if fallback is None or obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return fallback(obj)
