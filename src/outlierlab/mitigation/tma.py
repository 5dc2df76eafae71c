"""TMA removal: act on the triggering massive activations at y6, the down-projection input (``mlp.down_in``;
``mlp.act`` = y4 for GeLU FFNs), with forward pre-hooks on the down projection.

Modes (``TMAConfig.mode``), applied at the origin layers (found on the calibration data: layers whose y6
holds an MA by the detection rule and whose block at least doubles the residual max) or at every layer:

- ``clip``: clamp every entry of y6 to ``[-target, target]`` (the reference curve of the issue);
- ``zero``: set the MA entries (``|x| > threshold``) to 0;
- ``replace``: set the MA entries to a calibrated value (the channel's mean over the non-MA calibration
  entries);
- ``scale``: multiply the y6 vector of each MA token by ``target / max|y6_t|`` (or by ``factor``).

``scale`` with ``compensate=True`` (the default) keeps what the MA does while removing its magnitude. Every
norm reading the residual stream is invariant to a per-token scale, so the MA token's whole residual stream
is rescaled by the same factor ``c_t``: at the origin layer the rest of the layer output is scaled with the
branch (``out <- c (out - m) + m``), and every later layer scales that token's attention-output and
down-projection inputs by ``c_t`` (bias corrected; on the post-norm outputs for sandwich-norm families).
The sink token then has exactly the same normalized direction, keys and values as before, at a residual
magnitude ``c_t`` times smaller: function-preserving up to the norms' epsilon, for pre-norm models.

The default (``scale``, compensated, every layer, threshold = target = 10) needs no calibration data: every
token whose y6 exceeds 10 anywhere is rescaled, so no down-projection input entry is above 10 and the
function is unchanged (on SmolLM2-135M: residual max 38x and y6 max 296x smaller, perplexity identical; the
sweep in docs/mitigation.md compares every variant with the clamp reference).

The hooks live on the model until ``MitigationResult.remove()``; their parameters are JSON
(``outlierlab.json`` of an export) and :func:`attach` rebuilds them without calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..adapters import get_adapter
from ..analysis.detect import DetectConfig
from ..runtime import ORDER, BatchInfo, Entry, FunctionEntry, installed, offload, run
from .base import (
    Context,
    MitigationError,
    calib_profile,
    check_choice,
    down_spec,
    layer_list,
    linear_module,
    out_spec,
)

MODES = ("zero", "clip", "scale", "replace")


@dataclass(frozen=True)
class TMAConfig:
    """Removal of the triggering massive activations at y6 (see the module docstring)."""

    name: ClassVar[str] = "tma"
    mode: str = "scale"
    #: clip: the bound; scale: the largest |y6| a token keeps (the sweep on SmolLM2-135M: 10, docs/mitigation.md)
    target: float = 10.0
    #: scale: a fixed factor for the MA tokens instead of ``target``
    factor: float | None = None
    #: "origin" (found on the calibration data) | "all" | explicit layer indices
    layers: str | tuple[int, ...] = "all"
    #: scale: rescale the MA token's residual stream consistently (function-preserving)
    compensate: bool = True
    #: |y6| above which an entry is an MA; None = the target for the compensated scale (no y6 entry above
    #: the target anywhere, exactly), else calibrated per layer by the detection rule
    threshold: float | None = None
    detect: DetectConfig = field(default_factory=DetectConfig)
    #: origin rule: the block multiplies the residual max by at least this
    growth: float = 2.0
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_choice("tma.mode", self.mode, MODES)
        if isinstance(self.layers, str):
            check_choice("tma.layers", self.layers, ("origin", "all"))
        if self.mode in ("clip", "scale") and self.factor is None and not self.target > 0:
            raise MitigationError(f"tma.target must be positive, not {self.target}")
        if self.factor is not None and not 0 < self.factor <= 1:
            raise MitigationError(f"tma.factor must be in (0, 1], not {self.factor}")

    @property
    def exact(self) -> bool:
        return self.mode == "scale" and self.compensate

    @property
    def keeps_scores(self) -> bool:
        """Every OTC score is unchanged (up to the norms' epsilon): the compensated scale rescales a token's
        whole residual stream, which every norm cancels, so no norm output changes."""
        return self.exact


# -- calibration -----------------------------------------------------------------------------------------
def find_origins(profile, growth: float = 2.0) -> list[int]:
    """Layers whose y6 holds an MA (by the profile's rule) and whose block multiplies the residual max by
    ``growth`` or more: where a residual MA is written. The first layer with a y6 MA when none grows."""
    with_ma = [layer for layer in profile.layers
               if (layer, "mlp.down_in") in profile.results and profile.get(layer, "mlp.down_in").massive]
    origins = []
    for layer in with_ma:
        before = profile.get(layer, "attn.in").stats["absmax"]
        after = profile.get(layer, "block.out").stats["absmax"]
        if after >= growth * max(before, 1e-12):
            origins.append(layer)
    return origins or with_ma[:1]


def _thresholds(profile, layers: list[int], cfg: TMAConfig) -> dict[int, float]:
    out = {}
    for layer in layers:
        if cfg.threshold is not None:
            out[layer] = float(cfg.threshold)
        elif cfg.exact and cfg.factor is None:
            out[layer] = float(cfg.target)
        else:
            med = profile.get(layer, "mlp.down_in").stats["median"]
            out[layer] = float(max(cfg.detect.ma_abs, cfg.detect.ma_rel * med))
    return out


def _replace_values(model, ids, layers: list[int], thresholds: dict[int, float], batch_size: int) -> dict:
    """Per active layer: {channel: mean of that channel over non-MA entries} for the channels that hold MAs."""
    adapter = get_adapter(model)
    spec = down_spec(adapter)
    sums, counts, seen = {}, {}, {}

    def make(layer):
        def hook(module, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            big = x.abs() > thresholds[layer]
            keep = (~big).float()
            seen[layer] = seen.get(layer, 0) + big.sum(0)
            sums[layer] = sums.get(layer, 0) + (x * keep).sum(0)
            counts[layer] = counts.get(layer, 0) + keep.sum(0)
        return hook

    def declare(hooks) -> None:
        for layer in layers:
            hooks.pre(linear_module(adapter, layer, spec), make(layer))

    with installed(model, FunctionEntry("tma.replace-calibration", ORDER["probe"], declare)):
        run(model, ids, batch_size, description="tma replace values", logits=False)
    out = {}
    for layer in layers:
        mean = (sums[layer] / counts[layer].clamp_min(1)).cpu()
        channels = torch.nonzero(seen[layer] > 0).flatten().tolist()
        out[str(layer)] = {str(c): float(mean[c]) for c in sorted(channels)}
    return out


CALIB_POSITIONS = ("attn.in", "mlp.act", "mlp.down_in", "block.out")


def calibration_profile(model, ids, batch_size: int = 4):
    """The profile :func:`calibrate` reads (residual and y6 positions); reusable across configs (the sweep)."""
    return calib_profile(model, ids, CALIB_POSITIONS, batch_size)


def calibrate(ctx: Context, cfg: TMAConfig, profile=None) -> dict:
    """The runtime parameters of ``cfg`` for ``ctx.model``: active layers, thresholds, replace values."""
    adapter = ctx.adapter
    if cfg.compensate and cfg.mode == "scale" and not adapter.pre_norm:
        raise MitigationError("tma: the compensated scale needs a pre-norm model; use compensate=False")
    known_layers = cfg.layers != "origin"
    needs_threshold = cfg.mode != "clip" and cfg.threshold is None and not (cfg.exact and cfg.factor is None)
    if known_layers and not needs_threshold and cfg.mode != "replace" and profile is None:
        # nothing to calibrate (no data pass): the layers are given and the threshold is given or unused
        layers = layer_list(adapter, cfg.layers)
        thr = float(cfg.threshold if cfg.threshold is not None else cfg.target)
        params = {
            "mode": cfg.mode, "target": cfg.target, "factor": cfg.factor, "compensate": bool(cfg.compensate),
            "layers": layers, "thresholds": {str(k): thr for k in layers}, "origins": None,
        }
        return {"params": params, "y6_absmax": {}}
    ids = ctx.calib_ids("tma")
    if profile is None:
        profile = ctx.calib_profile("tma", CALIB_POSITIONS, cfg.batch_size)
    origins = find_origins(profile, cfg.growth)
    if cfg.layers == "origin":
        layers = origins
    elif cfg.layers == "all":
        layers = list(range(adapter.n_layers))
    else:
        layers = layer_list(adapter, cfg.layers)
    thresholds = _thresholds(profile, layers, cfg)
    params = {
        "mode": cfg.mode, "target": cfg.target, "factor": cfg.factor, "compensate": bool(cfg.compensate),
        "layers": layers, "thresholds": {str(k): v for k, v in thresholds.items()}, "origins": origins,
    }
    if cfg.mode == "replace" and layers:
        params["replace"] = _replace_values(ctx.model, ids, layers, thresholds, cfg.batch_size)
    y6 = {str(layer): profile.get(layer, "mlp.down_in").stats["absmax"] for layer in layers}
    return {"params": params, "y6_absmax": y6}


# -- runtime ---------------------------------------------------------------------------------------------
class TMAEntry(Entry):
    """The tma hooks on a model (registry entry ``tma``, before every other runtime piece at y6).

    Per forward, ``c`` holds the [batch, tokens, 1] residual factors of the tokens rescaled so far (None: all
    ones)."""

    name = "tma"
    order = ORDER["mitigation"]

    def __init__(self, params: dict):
        self.p = params
        self.layers = {int(i) for i in params["layers"]}
        self.thr = {int(k): float(v) for k, v in params["thresholds"].items()}
        self.replace = {int(k): {int(c): float(v) for c, v in d.items()} for k, d in params.get("replace", {}).items()}
        self.comp = params["mode"] == "scale" and params["compensate"]
        self.c: torch.Tensor | None = None
        self.c_new: torch.Tensor | None = None
        self.down_factor: torch.Tensor | None = None
        self.o_factor: torch.Tensor | None = None
        self.m: torch.Tensor | None = None
        self.batch = BatchInfo()
        self._values: dict = {}

    def describe(self) -> dict:
        return {"name": self.name, "params": self.p}

    # -- helpers
    def _replace_vector(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        key = (layer, x.dtype, x.device)
        values = self._values.get(key)
        if values is None:
            values = torch.zeros(x.shape[-1], dtype=x.dtype)
            for ch, v in self.replace.get(layer, {}).items():
                values[ch] = v
            values = self._values[key] = values.to(x.device)
        return values

    def _mode(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p, thr = self.p, self.thr[layer]
        mode = p["mode"]
        if mode == "clip":
            return x.clamp(-p["target"], p["target"]), None
        if mode == "zero":
            return x.masked_fill(x.abs() > thr, 0.0), None
        if mode == "replace":
            return torch.where(x.abs() > thr, self._replace_vector(layer, x).expand_as(x), x), None
        # scale: whole token vectors
        peak = x.abs().amax(dim=-1, keepdim=True)
        hit = peak > thr
        if x.device.type == "cpu" and not bool(hit.any()):
            return x, None  # no token to rescale (the check is a free host read on a CPU, a sync on a GPU)
        if p["factor"] is not None:
            f = torch.full_like(peak, float(p["factor"]))
        else:
            f = (p["target"] / peak.clamp_min(1e-30)).clamp(max=1.0)
        f = torch.where(hit, f, torch.ones_like(f))
        return x * f, f

    def _as_bt1(self, f: torch.Tensor) -> torch.Tensor:
        return f.reshape(self.batch.batch, self.batch.tokens, 1) if f.dim() == 2 else f

    # -- hooks
    def reset(self, module, args, kwargs):
        self.c = None

    def down_pre(self, layer: int):
        def hook(module, args):
            x = args[0]
            factor = None
            if self.comp and self.c is not None and not self.post_mlp:
                # (behind a post-FFN norm the branch needs no rescale: the norm's output is rescaled instead,
                # and a tiny branch output scaled further down would meet the norm's epsilon)
                factor = self.batch.fit(self.c, x)
                x = x * factor
            self.c_new = None
            if layer in self.layers:
                x, f = self._mode(layer, x)
                if f is not None:
                    self.c_new = self._as_bt1(f)
                    factor = f if factor is None else factor * f
            self.down_factor = factor if self.comp else None
            return (x, *args[1:])
        return hook

    def bias_fix(self, which: str):
        def hook(module, args, out):
            factor = self.down_factor if which == "down" else self.o_factor
            b = offload.value(module, "bias")
            if factor is None or b is None:
                return None
            return out + (factor - 1.0) * b.to(out.device)
        return hook

    def capture_m(self, module, args, out):
        self.m = out

    def o_pre(self, module, args):
        self.o_factor = None
        if self.c is None:
            return None
        x = args[0]
        self.o_factor = self.batch.fit(self.c, x)
        return (x * self.o_factor, *args[1:])

    def post_norm_scale(self, module, args, out):
        if self.c is None:
            return None
        return out * self.batch.fit(self.c, out)

    def layer_out(self, module, args, out):
        c_new = self.c_new
        if c_new is None or not self.comp:
            return None
        hidden = out[0] if isinstance(out, tuple) else out
        c_new = c_new.to(device=hidden.device, dtype=hidden.dtype)
        if self.c is not None:
            self.c = self.c.to(hidden.device)
        if self.post_mlp:
            new = hidden * c_new
        else:
            m = self.m.reshape(hidden.shape)
            new = c_new * (hidden - m) + m
        self.c = c_new if self.c is None else self.c * c_new
        self.c_new = None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    def attach(self, model: nn.Module, hooks, reg) -> None:
        a = get_adapter(model)
        self.batch = reg.batch
        layers = a.layers()
        dspec, ospec = down_spec(a), out_spec(a)
        self.post_mlp = a.branch_norm(0, "mlp") is not None
        hooks.pre(layers[0], self.reset, with_kwargs=True)
        for i in range(a.n_layers):
            down = linear_module(a, i, dspec)
            if i in self.layers or self.comp:
                hooks.pre(down, self.down_pre(i))
                hooks.forward(down, self.bias_fix("down"))
            if not self.comp:
                continue
            post_attn, post_mlp = a.branch_norm(i, "attn"), a.branch_norm(i, "mlp")
            if post_attn is not None:
                hooks.forward(post_attn, self.post_norm_scale)
            else:
                o = linear_module(a, i, ospec)
                hooks.pre(o, self.o_pre)
                hooks.forward(o, self.bias_fix("o"))
            if post_mlp is not None:
                hooks.forward(post_mlp, self.post_norm_scale)
            if i in self.layers:
                if post_mlp is None:
                    hooks.forward(down, self.capture_m)
                hooks.forward(layers[i], self.layer_out)


def apply(ctx: Context, cfg: TMAConfig) -> dict:
    cal = calibrate(ctx, cfg)
    params = cal["params"]
    if not params["layers"]:
        ctx.say("tma: no massive activation at y6 on the calibration data; nothing to do")
    else:
        y6 = f", y6 max there {max(cal['y6_absmax'].values()):,.0f}" if cal["y6_absmax"] else ""
        ctx.say(f"tma: {cfg.mode} at layers {params['layers']} (origins {params['origins']}){y6}")
    return {"runtime": params, "info": {"layers": params["layers"], "origins": params["origins"],
                                        "y6_absmax_before": cal["y6_absmax"]}}
