"""PrefixQuant-style baseline: keep the outlier tokens in full precision.

The tokens that carry the massive activations are the first positions of every sequence (SmolLM2-135M: the
first token, whatever it is). Their keys and values are computed once in full precision and kept, so the
quantizer never sees them. Here that is a contract with the fake-quant harness through the model's registry:
the :class:`FPPrefix` entry (``fp_prefix = N``) tells it to leave the first ``N`` positions of every sequence
unquantized in the activations and in the KV cache (and to calibrate static scales without them).

``n=None`` finds ``N`` on the calibration data: one more than the largest token index holding a residual
MA (``block.out`` by the detection rule), capped by ``max_prefix``; 0 when there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..runtime import ORDER, Entry
from .base import Context, MitigationError


@dataclass(frozen=True)
class PrefixConfig:
    """Keep the first ``n`` positions (the MA tokens) in full precision (see the module docstring)."""

    name: ClassVar[str] = "prefix"
    n: int | None = None
    max_prefix: int = 4
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 0:
            raise MitigationError(f"prefix.n must be >= 0, not {self.n}")

    @property
    def exact(self) -> bool:
        return True

    @property
    def keeps_scores(self) -> bool:
        """Every OTC score is unchanged: prefix only marks positions for the quantizer."""
        return True


def detect_prefix(profile, max_prefix: int) -> tuple[int, list[int]]:
    idx = sorted({m["token_index"] for m in profile.massive_activations if m["position"] == "block.out"})
    inside = [i for i in idx if i < max_prefix]
    return (max(inside) + 1 if inside else 0), idx


class FPPrefix(Entry):
    """Registry entry ``prefix``: the first ``fp_prefix`` positions stay in full precision (no hooks)."""

    name = "prefix"
    order = ORDER["fp_prefix"]

    def __init__(self, params: dict):
        self.fp_prefix = int(params["n"])

    def describe(self) -> dict:
        return {"name": self.name, "params": {"n": self.fp_prefix}}


def apply(ctx: Context, cfg: PrefixConfig) -> dict:
    found = None
    if cfg.n is None:
        profile = ctx.calib_profile("prefix", ("block.out",), cfg.batch_size)
        n, found = detect_prefix(profile, cfg.max_prefix)
    else:
        n = cfg.n
    ctx.say(f"prefix: the first {n} position(s) stay in full precision"
            + (f"; residual MAs at token indices {found}" if found is not None else ""))
    info = {"n": n}
    if found is not None:
        info["ma_token_indices"] = found
    return {"runtime": {"n": n}, "info": info}
