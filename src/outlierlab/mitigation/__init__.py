"""Mitigation methods: transforms that remove activation outliers, each configured by a frozen dataclass.

Contract shared with the compare stage (issue 5) and the pipeline (issue 6):

- ``METHODS``: method name -> its config class (a frozen dataclass with defaults). ``"none"`` is always there.
- ``mitigate(model, methods, calib, tokenizer=None) -> MitigationResult``: applies the methods, in the
  documented composition order, to ``model`` **in place** (callers that need the original deep-copy it first)
  and returns what was done. ``methods`` is a list of names (``"tma"``, or ``"tma,gamma"``) or config
  instances; ``calib`` is a ``Windows`` (calibration windows, brown:calib by default).
- Runtime-only methods (tma, prefix, rotate's online Hadamard) leave hooks or attributes on the model; they
  are listed in ``MitigationResult.runtime`` and removed by ``MitigationResult.remove()``.
- Prefix-style methods mark tokens that later quantization must leave in full precision by setting the
  model attribute ``outlierlab_fp_prefix`` (int: the first N positions of every sequence); the fake-quant
  harness honours it for activations and the KV cache.

Composition order (``ORDER``), whatever order the methods are given in:

1. ``prefix`` - only marks positions for the quantizer; it finds the MA tokens on the model as it is, before
   any other method removes (tma) or spreads (rotate) them;
2. ``gamma``, 3. ``smoothquant`` - per-channel rescales folded into the weights, calibrated on the model as
   it is (exact ones leave every later statistic unchanged);
4. ``tma`` - runtime hooks at y6, calibrated after any weight rescale that changes y6 (smoothquant's
   up -> down migration does), so its thresholds see the y6 the hooks will see;
5. ``otc`` - its fine-tuning runs with the tma hooks live, so it learns around them; its teacher is the
   model before *any* method (computed first);
6. ``rotate`` - exact on anything before it; its online Hadamard hook sits after tma's on the down input.

``paper`` expands to tma + gamma + otc. Each method module documents its config; docs/mitigation.md has the
measurements behind the defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import gamma as _gamma
from . import otc as _otc
from . import prefix as _prefix
from . import rotate as _rotate
from . import smoothquant as _smoothquant
from . import tma as _tma
from .base import Context, MitigationError, config_to_json
from .gamma import GammaConfig
from .otc import OTCConfig
from .paper import PaperConfig
from .prefix import PrefixConfig
from .rotate import RotateConfig
from .smoothquant import SmoothQuantConfig
from .tma import TMAConfig


@dataclass(frozen=True)
class NoneConfig:
    """The unmitigated model."""

    @property
    def exact(self) -> bool:
        return True


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
        self.runtime.clear()

    @property
    def exact(self) -> bool:
        """True when every applied method is function-preserving (up to rounding and norm epsilons)."""
        return all(a["exact"] for a in self.applied)

    @property
    def seconds(self) -> float:
        return sum(a.get("seconds", 0.0) for a in self.applied)

    def methods_json(self) -> list[dict]:
        """``[{"method": name, "config": {...}}]``: what ``mitigate.json`` lists under ``methods``."""
        return [{"method": a["method"], "config": a["config"]} for a in self.applied]


METHODS: dict[str, type] = {
    "none": NoneConfig,
    "tma": TMAConfig,
    "gamma": GammaConfig,
    "otc": OTCConfig,
    "smoothquant": SmoothQuantConfig,
    "rotate": RotateConfig,
    "prefix": PrefixConfig,
    "paper": PaperConfig,
}

ORDER: tuple[str, ...] = ("none", "prefix", "gamma", "smoothquant", "tma", "otc", "rotate")

#: config class -> apply(ctx, cfg) -> {"info": ..., "runtime": params (runtime methods only)}
_APPLY = {
    GammaConfig: _gamma.apply,
    SmoothQuantConfig: _smoothquant.apply,
    TMAConfig: _tma.apply,
    OTCConfig: _otc.apply,
    RotateConfig: _rotate.apply,
    PrefixConfig: _prefix.apply,
}

#: method name -> attach(model, params) -> remover: rebuilds the runtime part (used by export.load too)
RUNTIME: dict[str, Callable] = {"tma": _tma.attach, "rotate": _rotate.attach, "prefix": _prefix.attach}


def method_name(cfg) -> str:
    for name, cls in METHODS.items():
        if type(cfg) is cls:
            return name
    raise MitigationError(f"{type(cfg).__name__} is not a mitigation config ({', '.join(METHODS)})")


def resolve(methods) -> list:
    """Names (``"tma"``, ``"tma,gamma"``) or config instances -> configs in the composition order."""
    if isinstance(methods, str):
        methods = [methods]
    configs = []
    for m in methods or []:
        if isinstance(m, str):
            for name in (s.strip() for s in m.split(",")):
                if not name:
                    continue
                if name not in METHODS:
                    raise MitigationError(f"unknown mitigation method {name!r}; choose among {', '.join(METHODS)}")
                configs.append(METHODS[name]())
        else:
            method_name(m)
            configs.append(m)
    expanded = []
    for cfg in configs:
        expanded.extend(cfg.expand() if isinstance(cfg, PaperConfig) else [cfg])
    return sorted(expanded, key=lambda c: ORDER.index(method_name(c)))


def mitigate(model, methods, calib=None, tokenizer=None, log: Callable[[str], None] | None = None
             ) -> MitigationResult:
    """Apply ``methods`` (names or config instances) to ``model`` in place, in the composition order.

    ``calib``: calibration ``Windows`` (or a [n, T] LongTensor); when None and a method needs data, 8
    windows of brown:calib are made with ``tokenizer``. ``log`` receives one line per step.
    """
    configs = resolve(methods)
    result = MitigationResult(model)
    if not configs:
        return result
    ctx = Context.for_model(model, calib, tokenizer, log)
    teachers = [c for c in configs if getattr(c, "needs_teacher", False)]
    if teachers:
        t0 = time.perf_counter()
        cfg = teachers[0]
        ctx.teacher["otc"] = _otc.teacher_logprobs(model, _otc.finetune_ids(ctx, cfg), cfg.batch_size)
        ctx.say(f"teacher log-probabilities of the original model in {time.perf_counter() - t0:.0f} s")
    try:
        for cfg in configs:
            name = method_name(cfg)
            record = {"method": name, "config": config_to_json(cfg), "exact": bool(cfg.exact)}
            t0 = time.perf_counter()
            if isinstance(cfg, NoneConfig):
                out = {}
            else:
                out = _APPLY[type(cfg)](ctx, cfg)
            record["info"] = out.get("info", {})
            params = out.get("runtime")
            if params is not None:
                record["runtime"] = params
                result._removers.append(RUNTIME[name](model, params))
                result.runtime.append(name)
            record["seconds"] = time.perf_counter() - t0
            result.applied.append(record)
    except BaseException:
        result.remove()
        raise
    return result


__all__ = [
    "METHODS",
    "ORDER",
    "RUNTIME",
    "GammaConfig",
    "MitigationError",
    "MitigationResult",
    "NoneConfig",
    "OTCConfig",
    "PaperConfig",
    "PrefixConfig",
    "RotateConfig",
    "SmoothQuantConfig",
    "TMAConfig",
    "mitigate",
    "resolve",
]
