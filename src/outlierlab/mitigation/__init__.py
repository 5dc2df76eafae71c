"""Mitigation methods: transforms that remove activation outliers, each configured by a frozen dataclass.

Contract shared with the compare stage (issue 5) and the pipeline (issue 6):

- ``METHODS``: method name -> its config class (a frozen dataclass with defaults). ``"none"`` is always there.
- ``mitigate(model, methods, calib, tokenizer=None) -> MitigationResult``: applies the methods, in the
  documented composition order, to ``model`` **in place** (callers that need the original wrap it in a ``WeightJournal``)
  and returns what was done. ``methods`` is a list of names (``"tma"``, or ``"tma,gamma"``) or config
  instances; ``calib`` is a ``Windows`` (calibration windows, brown:calib by default).
- Runtime-only methods (tma, prefix, rotate's online Hadamard) install entries in the model's registry
  (:mod:`outlierlab.runtime`); they are listed in ``MitigationResult.runtime`` and removed by
  ``MitigationResult.remove()``.
- Prefix-style methods mark tokens that later quantization must leave in full precision with a registry entry
  whose ``fp_prefix`` is N (the first N positions of every sequence); the fake-quant harness reads
  ``registry(model).fp_prefix`` for activations and the KV cache.

One table (``TABLE``) declares every method: its name, config class, ``apply`` and, for runtime methods, the
registry entry that rebuilds its runtime part from JSON parameters (used by ``export.load`` too). Its row
order is the composition order (``ORDER``), whatever order the methods are given in:

1. ``prefix`` - only marks positions for the quantizer; it finds the MA tokens on the model as it is, before
   any other method removes (tma) or spreads (rotate) them;
2. ``gamma``, 3. ``smoothquant`` - per-channel rescales folded into the weights, calibrated on the model as
   it is (exact ones leave every later statistic unchanged);
4. ``tma`` - runtime hooks at y6, calibrated after any weight rescale that changes y6 (smoothquant's
   up -> down migration does), so its thresholds see the y6 the hooks will see;
5. ``otc`` - its fine-tuning runs with the tma hooks live, so it learns around them; its teacher is the
   model before *any* method (computed first). Scoring alone (``OTCConfig.scores_only``) runs first instead
   when every method before it keeps the scores (``keeps_scores``: gamma's fold, tma's compensated scale,
   prefix): the scores are the same there, and the profile of the unmodified model serves them with no
   calibration pass;
6. ``rotate`` - exact on anything before it; its online Hadamard hook sits after tma's on the down input;
7. ``quarot`` - rotate plus online Hadamards (down and o_proj inputs) and the per-head K/V rotation before
   the KV quantizer; exact on anything before it, its hooks after tma's;
8. ``spinquant`` - quarot with a learned R1 (trained with every earlier method in place).

``paper`` expands to tma + gamma + otc. Each method module documents its config; docs/mitigation.md has the
measurements behind the defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..runtime import Entry, install, uninstall
from . import gamma as _gamma
from . import otc as _otc
from . import prefix as _prefix
from . import quarot as _quarot
from . import rotate as _rotate
from . import smoothquant as _smoothquant
from . import spinquant as _spinquant
from . import tma as _tma
from .base import Context, MitigationError, config_to_json, weights_writable
from .gamma import GammaConfig
from .otc import OTCConfig
from .paper import PaperConfig
from .prefix import PrefixConfig
from .quarot import QuaRotConfig
from .rotate import RotateConfig
from .smoothquant import SmoothQuantConfig
from .spinquant import SpinQuantConfig
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
    entries: list[Entry] = field(default_factory=list, repr=False)

    def install(self, name: str, entry: Entry) -> None:
        install(self.model, entry)
        self.entries.append(entry)
        self.runtime.append(name)

    def remove(self) -> None:
        """Take the runtime parts off the model's registry; weight changes stay."""
        while self.entries:
            uninstall(self.model, self.entries.pop())
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


@dataclass(frozen=True)
class Method:
    """One mitigation method: ``apply(ctx, cfg) -> {"info": ..., "runtime": params}`` and, for runtime
    methods, ``entry(params)``: the registry entry that installs the runtime part."""

    name: str
    config: type
    apply: Callable | None = None
    entry: Callable[[dict], Entry] | None = None
    #: False for methods that leave what the model computes unchanged (later calibrations may still use a
    #: profile of the unmodified model)
    alters_model: bool = True


#: every method, in the composition order (``paper`` expands to its parts and has no row of its own)
TABLE: tuple[Method, ...] = (
    Method("none", NoneConfig, alters_model=False),
    Method("prefix", PrefixConfig, _prefix.apply, _prefix.FPPrefix, alters_model=False),
    Method("gamma", GammaConfig, _gamma.apply),
    Method("smoothquant", SmoothQuantConfig, _smoothquant.apply),
    Method("tma", TMAConfig, _tma.apply, _tma.TMAEntry),
    Method("otc", OTCConfig, _otc.apply),
    Method("rotate", RotateConfig, _rotate.apply, _rotate.OnlineHadamard),
    Method("quarot", QuaRotConfig, _quarot.apply, _quarot.QuaRotEntry),
    Method("spinquant", SpinQuantConfig, _spinquant.apply, _quarot.QuaRotEntry),
)
_BY_NAME = {m.name: m for m in TABLE}
_BY_CONFIG = {m.config: m for m in TABLE}

#: method name -> config class (``paper`` included), the names users type
METHODS: dict[str, type] = {**{m.name: m.config for m in TABLE}, "paper": PaperConfig}
ORDER: tuple[str, ...] = tuple(m.name for m in TABLE)


def runtime_entry(name: str, params: dict) -> Entry:
    """The registry entry of method ``name``'s runtime part, rebuilt from its JSON parameters."""
    method = _BY_NAME.get(name)
    if method is None or method.entry is None:
        raise MitigationError(f"{name!r} has no runtime part")
    return method.entry(params)


def method_name(cfg) -> str:
    if type(cfg) is PaperConfig:
        return "paper"
    method = _BY_CONFIG.get(type(cfg))
    if method is not None:
        return method.name
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


def mitigate(model, methods, calib=None, tokenizer=None, log: Callable[[str], None] | None = None,
             profile=None) -> MitigationResult:
    """Apply ``methods`` (names or config instances) to ``model`` in place, in the composition order.

    ``calib``: calibration ``Windows`` (or a [n, T] LongTensor); when None and a method needs data, 8
    windows of brown:calib are made with ``tokenizer``. ``log`` receives one line per step. ``profile``: a
    profile of this (unmodified) model on ``calib`` (e.g. the profile stage's); calibrations that run before
    any method has changed the model read it instead of tracing the calibration windows again.
    """
    configs, passed = _scores_first(resolve(methods))
    result = MitigationResult(model)
    if not configs:
        return result
    ctx = Context.for_model(model, calib, tokenizer, log, profile)
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
            method = _BY_NAME[name]
            with weights_writable(model):  # offloaded weights: edits land in accelerate's store
                out = method.apply(ctx, cfg) if method.apply is not None else {}
            record["info"] = out.get("info", {})
            if passed and cfg is configs[0]:
                record["info"]["scored_before"] = passed  # same scores as after them (they keep every score)
            params = out.get("runtime")
            if params is not None:
                record["runtime"] = params
                result.install(name, method.entry(params))
            record["seconds"] = time.perf_counter() - t0
            result.applied.append(record)
            alters = method.alters_model and not getattr(cfg, "scores_only", False)
            ctx.pristine = ctx.pristine and not alters
    except BaseException:
        result.remove()
        raise
    result.applied.sort(key=lambda a: ORDER.index(a["method"]))  # records in the composition order
    return result


def _scores_first(configs: list) -> tuple[list, list[str]]:
    """Move a scoring-only otc ahead of the methods before it when all of them keep every OTC score; returns
    the configs and the names of the methods it moved ahead of."""
    for i, cfg in enumerate(configs):
        if getattr(cfg, "scores_only", False) and i and all(getattr(c, "keeps_scores", False) for c in configs[:i]):
            return [cfg, *configs[:i], *configs[i + 1:]], [method_name(c) for c in configs[:i]]
    return configs, []


__all__ = [
    "METHODS",
    "ORDER",
    "TABLE",
    "GammaConfig",
    "Method",
    "MitigationError",
    "MitigationResult",
    "NoneConfig",
    "OTCConfig",
    "PaperConfig",
    "PrefixConfig",
    "QuaRotConfig",
    "RotateConfig",
    "SmoothQuantConfig",
    "SpinQuantConfig",
    "TMAConfig",
    "mitigate",
    "resolve",
    "runtime_entry",
]
