"""The one number and text formatting of the package: reports, the run summary, the terminal and the explain
narrative (plain text: HTML escapes it)."""

from __future__ import annotations

import math
from typing import Any


def num(v: Any, digits: int = 3) -> str:
    """A number as a reader wants it: thousands separators, few decimals, ``n/a`` for missing or non-finite."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(v):
        return "n/a"
    a = abs(v)
    if a >= 1e6:
        return f"{v:.3g}"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    return f"{v:.{digits}g}"


def pct(v: Any) -> str:
    """A fraction as a whole percentage (0.5 -> 50%)."""
    return "n/a" if v is None else f"{100 * float(v):.0f}%"


def signed_pct(v: Any) -> str:
    """A change already in percent, signed (7.69 -> +7.7%)."""
    return "n/a" if v is None else f"{float(v):+.1f}%"


def change(before: Any, after: Any, kind: str) -> str:
    """How a metric moved: ``ppl`` as a relative change, ``n`` as a count difference, else ``Nx smaller``."""
    try:
        b, a = float(before), float(after)
    except (TypeError, ValueError):
        return "n/a"
    if kind == "ppl":
        return f"{100 * (a / b - 1):+.2f}%" if b else "n/a"
    if kind == "n":
        return f"{a - b:+.0f}"
    if a <= 0:
        return "removed" if b > 0 else "="
    r = b / a
    return f"{r:.3g}x smaller" if r >= 1 else f"{1 / r:.3g}x larger"


def quoted(token: Any) -> str:
    """A token's text, quoted so that spaces and control characters show."""
    return "" if token is None else repr(str(token))


def site(layer: Any, position: Any, alias: Any = None) -> str:
    """An operator site: ``layer 11, mlp.down_in (y6)``."""
    return f"layer {layer}, {position}" + (f" ({alias})" if alias else "")


def duration(seconds: float) -> str:
    """Seconds as ``45 s`` or ``3 min 05 s``."""
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"
