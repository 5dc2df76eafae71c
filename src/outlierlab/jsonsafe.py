"""The one JSON sanitizer of the package: one policy for what JSON cannot hold."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: dataclasses become dicts, tuples lists, keys strings, and non-finite floats None
    (strict JSON has no inf or NaN; every writer uses ``allow_nan=False``). Other objects pass unchanged."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj
