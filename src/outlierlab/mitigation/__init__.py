"""Mitigation methods: transforms that remove activation outliers, each configured by a frozen dataclass.

Contract shared with the compare stage (issue 5) and the pipeline (issue 6):

- ``METHODS``: method name -> its config class (a frozen dataclass with defaults). ``"none"`` is always there.
- ``mitigate(model, methods, calib, tokenizer=None) -> MitigationResult``: applies the methods, in the
  documented composition order, to ``model`` **in place** (callers that need the original deep-copy it first)
  and returns what was done. ``methods`` is a list of names or config instances; ``calib`` is a
  ``Windows`` (calibration windows, brown:calib by default).
- Runtime-only methods (tma, prefix) leave hooks or attributes on the model; they are listed in
  ``MitigationResult.runtime`` and removed by ``MitigationResult.remove()``.
- Prefix-style methods mark tokens that later quantization must leave in full precision by setting the
  model attribute ``outlierlab_fp_prefix`` (int: the first N positions of every sequence); the fake-quant
  harness honours it for activations and the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class NoneConfig:
    """The unmitigated model."""


@dataclass
class MitigationResult:
    model: Any
    applied: list[dict] = field(default_factory=list)
    runtime: list[str] = field(default_factory=list)
    _removers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Undo runtime-only parts (hooks, attributes); weight changes stay."""
        while self._removers:
            self._removers.pop()()


METHODS: dict[str, type] = {"none": NoneConfig}


def mitigate(model, methods, calib=None, tokenizer=None) -> MitigationResult:
    """Apply ``methods`` (names or config instances) to ``model`` in place."""
    result = MitigationResult(model)
    for m in methods or []:
        cfg = METHODS[m]() if isinstance(m, str) else m
        if isinstance(cfg, NoneConfig):
            result.applied.append({"method": "none"})
            continue
        raise NotImplementedError(f"mitigation method {type(cfg).__name__} is not implemented yet")
    return result
