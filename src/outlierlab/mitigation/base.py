"""Helpers every mitigation method shares: weight access through the adapter, norm gains, calibration
statistics, the per-call context and the JSON form of configs.

All weight edits go through :func:`linear_weight` (a ``[out, in]`` view whatever the storage layout), so a
method written once works for ``nn.Linear`` and GPT-2's ``Conv1D`` alike. Methods run inside
:func:`weights_writable` (``mitigate`` opens it around each method): on a model that accelerate offloaded to the
CPU or to disk, every weight is then a real host tensor that reads and edits like any other, and the edits are
written back to accelerate's store when the method returns (:mod:`outlierlab.runtime.offload`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..adapters.base import LinearSpec, NormSpec
from ..errors import OutlierlabError
from ..jsonsafe import jsonable
from ..runtime import like
from ..runtime import window_ids as _window_ids
from ..runtime.offload import writable as weights_writable  # noqa: F401 - the one edit scope of methods


class MitigationError(OutlierlabError):
    """A mitigation cannot be applied as configured (bad option, unsupported layout, missing data)."""


# -- configs ---------------------------------------------------------------------------------------------
def config_to_json(cfg: Any) -> Any:
    """A frozen dataclass config as plain JSON (nested configs and tuples included)."""
    return jsonable(cfg)


def config_from_json(cls: type, data: dict) -> Any:
    """Rebuild a config of ``cls`` from :func:`config_to_json` output (lists back to tuples, nested configs
    back to their classes); unknown keys are ignored."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.default is not dataclasses.MISSING:
            proto = f.default
        elif f.default_factory is not dataclasses.MISSING:
            proto = f.default_factory()
        else:
            proto = None
        if isinstance(value, dict) and dataclasses.is_dataclass(proto):
            value = config_from_json(type(proto), value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise MitigationError(f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}")


# -- structure -------------------------------------------------------------------------------------------
def linear_spec(adapter: Adapter, role: str) -> LinearSpec | None:
    return next((s for s in adapter.linears() if s.role == role), None)


def linear_module(adapter: Adapter, layer: int, spec: LinearSpec) -> nn.Module:
    return adapter.layers()[layer].get_submodule(spec.module)


def linear_weight(adapter: Adapter, layer: int, spec: LinearSpec) -> torch.Tensor:
    """The weight as ``[out, in]``: a view of the parameter's data, edited in place by the methods."""
    w = linear_module(adapter, layer, spec).weight.data
    return w.t() if spec.transposed else w


def linear_bias(adapter: Adapter, layer: int, spec: LinearSpec) -> torch.Tensor | None:
    b = getattr(linear_module(adapter, layer, spec), "bias", None)
    return None if b is None else b.data


def down_spec(adapter: Adapter) -> LinearSpec:
    """The linear reading y6 (``down``) or y4 (``fc2``): the one whose input is ``mlp.down_in``."""
    spec = next((s for s in adapter.linears() if s.input_position == "mlp.down_in"), None)
    if spec is None:
        raise MitigationError(f"{type(adapter).__name__} declares no linear reading mlp.down_in")
    return spec


def out_spec(adapter: Adapter) -> LinearSpec:
    """The attention output projection (reads ``attn.ctx``)."""
    spec = next((s for s in adapter.linears() if s.input_position == "attn.ctx"), None)
    if spec is None:
        raise MitigationError(f"{type(adapter).__name__} declares no attention output projection")
    return spec


def folding_norms(adapter: Adapter) -> list[NormSpec]:
    """Norms whose output only feeds linear layers (so a per-channel rescale can be folded into them)."""
    if not adapter.pre_norm:
        raise MitigationError(
            f"{type(adapter).__name__}: post-norm layout (the norm output is the residual stream itself); "
            "gain folding is not function-preserving there"
        )
    roles = {s.role for s in adapter.linears()}
    return [n for n in adapter.norms() if n.consumers and all(c in roles for c in n.consumers)]


def consumers(adapter: Adapter, norm: NormSpec) -> list[LinearSpec]:
    return [linear_spec(adapter, role) for role in norm.consumers]


def norm_module(adapter: Adapter, layer: int, norm: NormSpec) -> nn.Module:
    return adapter.layers()[layer].get_submodule(norm.module)


def get_gain(adapter: Adapter, layer: int, norm: NormSpec) -> torch.Tensor:
    """The effective per-channel gain (``weight + gain_offset``), fp32; ones for a norm without weight."""
    module = norm_module(adapter, layer, norm)
    w = getattr(module, "weight", None)
    if w is None:
        raise MitigationError(f"layer {layer} {norm.name}: the norm has no learnable gain to edit")
    return w.data.float() + norm.gain_offset


def set_gain(adapter: Adapter, layer: int, norm: NormSpec, gain: torch.Tensor) -> None:
    w = norm_module(adapter, layer, norm).weight
    w.data.copy_(like(gain - norm.gain_offset, w))


def norm_bias(adapter: Adapter, layer: int, norm: NormSpec) -> torch.Tensor | None:
    b = getattr(norm_module(adapter, layer, norm), "bias", None)
    return None if b is None else b.data


@torch.no_grad()
def scale_norm_output(adapter: Adapter, layer: int, norm: NormSpec, ratio: torch.Tensor) -> None:
    """Multiply the norm's output channels by ``ratio`` (gain and bias), no compensation."""
    gain = get_gain(adapter, layer, norm)
    set_gain(adapter, layer, norm, gain * ratio.to(gain.device))
    bias = norm_bias(adapter, layer, norm)
    if bias is not None:
        bias.mul_(like(ratio, bias))


@torch.no_grad()
def scale_input_columns(adapter: Adapter, layer: int, spec: LinearSpec, factor: torch.Tensor) -> None:
    """``W[:, c] *= factor[c]``: compensates an input rescaled by ``1 / factor``."""
    w = linear_weight(adapter, layer, spec)
    w.mul_(like(factor, w).unsqueeze(0))


@torch.no_grad()
def fold_norm_rescale(adapter: Adapter, layer: int, norm: NormSpec, ratio: torch.Tensor) -> None:
    """Multiply the norm's output channels by ``ratio`` and divide its consumers' input columns by it:
    exactly function-preserving (up to rounding)."""
    ratio = ratio.float()
    if bool((ratio == 0).any()) or not bool(torch.isfinite(ratio).all()):
        raise MitigationError(f"layer {layer} {norm.name}: a rescale ratio is zero or not finite")
    scale_norm_output(adapter, layer, norm, ratio)
    for spec in consumers(adapter, norm):
        scale_input_columns(adapter, layer, spec, 1.0 / ratio)


def layer_list(adapter: Adapter, layers) -> list[int]:
    if layers is None or layers == "all":
        return list(range(adapter.n_layers))
    out = sorted({int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < adapter.n_layers]
    if bad:
        raise MitigationError(f"layers {bad} out of range (the model has {adapter.n_layers})")
    return out


def glu_up_rows(adapter: Adapter, layer: int) -> tuple[LinearSpec, slice] | None:
    """The linear and row range producing y4 (``up``) in a GLU FFN (fused ``gate_up``: its second half)."""
    if adapter.ffn_kind != "glu":
        return None
    up = linear_spec(adapter, "up")
    if up is not None:
        return up, slice(None)
    fused = linear_spec(adapter, "gate_up")
    if fused is not None:
        n = linear_weight(adapter, layer, fused).shape[0] // 2
        return fused, slice(n, 2 * n)
    return None


# -- calibration -----------------------------------------------------------------------------------------
def window_ids(windows) -> torch.Tensor:
    try:
        return _window_ids(windows)
    except TypeError:
        raise MitigationError("calibration data must be Windows or a [n, seq_len] LongTensor of token ids") from None


def calib_profile(model: nn.Module, windows, positions: tuple[str, ...], batch_size: int = 4,
                  layers=None):
    """A profile of ``positions`` on the calibration windows (no weight statistics)."""
    from ..tracing import ProfileConfig, profile

    cfg = ProfileConfig(batch_size=batch_size, positions=positions, weights=False,
                        layers=None if layers is None else tuple(layers))
    return profile(model, window_ids(windows), cfg)


def profile_covers(profile, windows) -> bool:
    """True when ``profile`` was traced on exactly these calibration windows (same start offsets, same shape)."""
    data = getattr(profile, "data_info", None) or {}
    starts = getattr(windows, "starts", None)
    ids = getattr(windows, "input_ids", None)
    if starts is None or ids is None or data.get("starts") is None:
        return False
    return (list(map(int, data["starts"])) == list(map(int, starts)) and int(data.get("seq_len", -1)) == ids.shape[1]
            and data.get("source") == getattr(getattr(windows, "config", None), "source", data.get("source")))


@dataclass
class Context:
    """What one :func:`outlierlab.mitigation.mitigate` call hands to each method."""

    model: nn.Module
    adapter: Adapter
    calib: Any = None
    tokenizer: Any = None
    #: teacher next-token log-probabilities of the unmodified model, keyed by a name (see otc)
    teacher: dict = field(default_factory=dict)
    log: Any = None
    #: a profile of the unmodified model on ``calib`` (the profile stage's), served to calibrations while the
    #: model is still unmodified instead of a new pass over the calibration windows
    profile: Any = None
    #: no method has changed what the model computes yet (``mitigate`` clears it after each such method)
    pristine: bool = True

    @classmethod
    def for_model(cls, model, calib=None, tokenizer=None, log=None, profile=None) -> Context:
        ctx = cls(model, get_adapter(model), calib, tokenizer, log=log)
        if profile is not None and calib is not None and profile_covers(profile, calib):
            ctx.profile = profile
        return ctx

    def calib_profile(self, what: str, positions: tuple[str, ...], batch_size: int = 4, layers=None):
        """A profile of ``positions`` on the calibration windows: the given one while the model is unmodified
        and it holds every (layer, position) asked for, else a new pass."""
        p = self.profile
        wanted = range(self.adapter.n_layers) if layers is None else layers
        if self.pristine and p is not None and all((i, pos) in p.results for i in wanted for pos in positions):
            self.say(f"{what}: calibration statistics from the profile of the unmodified model (no new pass)")
            return p
        return calib_profile(self.model, self.calib_ids(what), positions, batch_size, layers)

    def calib_ids(self, what: str) -> torch.Tensor:
        if self.calib is None:
            if self.tokenizer is None:
                raise MitigationError(f"{what} needs calibration windows (pass calib=Windows or a tokenizer)")
            from ..data import DataConfig, make_windows
            from ..models.loader import max_positions

            self.calib = make_windows(self.tokenizer, DataConfig(n_samples=8), max_positions=max_positions(self.model))
        return window_ids(self.calib)

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)
