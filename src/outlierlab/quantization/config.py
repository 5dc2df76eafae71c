"""``QuantConfig``: one frozen description of a fake-quantization setting, and the named presets.

A config string on the command line is a preset name, optionally followed by ``:key=value`` overrides, e.g.
``w4a8``, ``w4a8:w_method=gptq``, ``w8a8-tensor:a_clip=0.9``, ``w4a16:w_granularity=group:group_size=64``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from ..errors import OutlierlabError

W_GRANULARITIES = ("channel", "group", "tensor")
A_GRANULARITIES = ("tensor-static", "tensor-dynamic", "token")
W_METHODS = ("rtn", "gptq")
W_GRIDS = ("restricted", "full")
GPTQ_OFFLOAD = ("auto", "always", "never")


class QuantConfigError(OutlierlabError):
    """A quantization config or preset string that cannot be used."""


@dataclass(frozen=True)
class QuantConfig:
    """What to fake-quantize and how.

    Bits of ``None`` (or 16 and more) leave that part in full precision. ``symmetric`` applies to weights and
    activations; the KV cache has its own flag (asymmetric by default, per head and token).

    Weights (``w_*``): ``channel`` (one scale per output row), ``group`` (per row and per ``group_size`` input
    columns) or ``tensor``; ``w_clip`` multiplies the abs-max (or min/max); ``w_grid`` the symmetric integer
    grid, ``restricted`` ([-Q, Q], scale absmax / Q) or ``full`` ([-2^(b-1), 2^(b-1) - 1], scale
    absmax / ((2^b - 1) / 2), compressed-tensors' convention); ``w_clip_search``: each row's (group's) clip
    ratio, at most ``w_clip``, searched to minimise its rounding error (:mod:`.quantizers`); ``w_method``
    ``rtn`` (round to nearest) or ``gptq`` (error-compensating, from calibration inputs; ``gptq_*`` knobs,
    see :mod:`.gptq`).

    Activations (``a_*``, the input of every quantized linear): ``tensor-static`` (one scale per linear,
    calibrated as ``a_clip x`` the abs-max over the calibration windows, then frozen), ``tensor-dynamic`` (one
    scale per sequence, computed at run time) or ``token`` (one scale per token, at run time). ``a_clip_search``
    (dynamic granularities): each linear input's clip ratio, at most ``a_clip``, chosen on the calibration windows
    to minimise the output error of the linears that read it (:func:`.fake.search_act_clips`).

    Which modules: every linear of every decoder block (``roles``/``layers`` restrict it); ``lm_head`` (weight
    and input) and ``embeddings`` (weight, per row) stay in full precision unless set.

    ``calib_samples`` caps the calibration windows used for static scales and GPTQ (None: all given);
    ``a_calib_samples`` caps, within those, the windows whose abs-max gives the static activation scales (4 by
    default: the abs-max is set by the massive activations, which every window holds at its first tokens).
    """

    name: str = "custom"
    w_bits: int | None = None
    a_bits: int | None = None
    kv_bits: int | None = None
    symmetric: bool = True
    w_granularity: str = "channel"
    group_size: int = 128
    w_clip: float = 1.0
    w_clip_search: bool = False
    w_grid: str = "restricted"
    w_method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = True
    gptq_static_groups: bool = False
    gptq_true_sequential: bool = True
    gptq_offload_inputs: str = "auto"
    a_granularity: str = "token"
    a_clip: float = 1.0
    a_clip_search: bool = False
    a_calib_samples: int | None = 4
    kv_symmetric: bool = False
    kv_clip: float = 1.0
    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    lm_head: bool = False
    embeddings: bool = False
    calib_samples: int | None = None

    def __post_init__(self) -> None:
        for key in ("w_bits", "a_bits", "kv_bits"):
            bits = getattr(self, key)
            if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits < 2):
                raise QuantConfigError(f"{key} must be an integer >= 2 or None (full precision), not {bits!r}")
        if self.w_granularity not in W_GRANULARITIES:
            raise QuantConfigError(f"w_granularity must be one of {', '.join(W_GRANULARITIES)}, "
                                   f"not {self.w_granularity!r}")
        if self.a_granularity not in A_GRANULARITIES:
            raise QuantConfigError(f"a_granularity must be one of {', '.join(A_GRANULARITIES)}, "
                                   f"not {self.a_granularity!r}")
        if self.w_grid not in W_GRIDS:
            raise QuantConfigError(f"w_grid must be one of {', '.join(W_GRIDS)}, not {self.w_grid!r}")
        if self.w_grid == "full" and not self.symmetric:
            raise QuantConfigError("w_grid=full is a symmetric grid; the asymmetric grid already uses all 2^b "
                                   "levels (drop w_grid or set symmetric=true)")
        if self.a_clip_search and self.a_granularity == "tensor-static":
            raise QuantConfigError("a_clip_search is for the dynamic activation granularities (token, "
                                   "tensor-dynamic); tensor-static scales come from a_clip x the abs-max")
        if self.gptq_offload_inputs not in GPTQ_OFFLOAD:
            raise QuantConfigError(f"gptq_offload_inputs must be one of {', '.join(GPTQ_OFFLOAD)}, "
                                   f"not {self.gptq_offload_inputs!r}")
        if self.w_method not in W_METHODS:
            raise QuantConfigError(f"w_method must be one of {', '.join(W_METHODS)}, not {self.w_method!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise QuantConfigError(f"group_size must be a positive integer, not {self.group_size!r}")
        for key in ("w_clip", "a_clip", "kv_clip"):
            clip = getattr(self, key)
            if not 0 < clip <= 1:
                raise QuantConfigError(f"{key} must be in (0, 1], not {clip!r}")
        if not 0 <= self.gptq_damp < 1:
            raise QuantConfigError(f"gptq_damp must be in [0, 1), not {self.gptq_damp!r}")
        if self.gptq_block < 1:
            raise QuantConfigError("gptq_block must be positive")
        for key in ("calib_samples", "a_calib_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise QuantConfigError(f"{key} must be positive or None")
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    # -- what it does ----------------------------------------------------------------------------------------
    @staticmethod
    def _active(bits: int | None) -> bool:
        return bits is not None and bits < 16

    @property
    def quantizes_weights(self) -> bool:
        return self._active(self.w_bits)

    @property
    def quantizes_activations(self) -> bool:
        return self._active(self.a_bits)

    @property
    def quantizes_kv(self) -> bool:
        return self._active(self.kv_bits)

    @property
    def is_fp(self) -> bool:
        return not (self.quantizes_weights or self.quantizes_activations or self.quantizes_kv)

    @property
    def needs_calibration(self) -> bool:
        """True when calibration windows are used (static activation scales, the activation clip search or
        GPTQ)."""
        return (self.quantizes_activations and (self.a_granularity == "tensor-static" or self.a_clip_search)) or (
            self.quantizes_weights and self.w_method == "gptq")

    def describe(self) -> str:
        """One line for humans, e.g. ``W4 per-channel sym RTN | A8 per-token sym | KV fp``."""
        sym = "sym" if self.symmetric else "asym"
        if self.quantizes_weights:
            gran = f"per-group {self.group_size}" if self.w_granularity == "group" else f"per-{self.w_granularity}"
            clip = f" clip {self.w_clip:g}" if self.w_clip != 1 else ""
            clip += " clip-search" if self.w_clip_search else ""
            grid = " full-grid" if self.w_grid == "full" else ""
            w = f"W{self.w_bits} {gran} {sym}{grid} {self.w_method.upper()}{clip}"
        else:
            w = "W fp"
        if self.quantizes_activations:
            gran = {"tensor-static": "per-tensor static", "tensor-dynamic": "per-tensor dynamic",
                    "token": "per-token"}[self.a_granularity]
            clip = f" clip {self.a_clip:g}" if self.a_clip != 1 else ""
            clip += " clip-search" if self.a_clip_search else ""
            a = f"A{self.a_bits} {gran} {sym}{clip}"
        else:
            a = "A fp"
        kv = (f"KV{self.kv_bits} per-head-token {'sym' if self.kv_symmetric else 'asym'}"
              if self.quantizes_kv else "KV fp")
        extra = [k for k, on in (("lm_head", self.lm_head), ("embeddings", self.embeddings)) if on]
        return " | ".join([w, a, kv] + ([f"+{'+'.join(extra)}"] if extra else []))

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("roles", "layers"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    def key(self) -> str:
        """A canonical JSON string of every field (for hashing)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_(self, **changes) -> QuantConfig:
        return replace(self, **changes)


#: The named presets. Weights are symmetric per output channel at both 8 and 4 bits (the setting of the
#: outlier-mitigation literature: per-channel leaves activation outliers as the thing that breaks), RTN with min-max
#: ranges on the restricted grid; activations symmetric; the KV cache (w4a4kv4) asymmetric per head and token. The
#: 4-bit activation presets choose each linear input's clip ratio on the calibration windows. See
#: docs/quantization.md.
PRESETS: dict[str, QuantConfig] = {
    "fp": QuantConfig(name="fp"),
    "w8a8-tensor": QuantConfig(name="w8a8-tensor", w_bits=8, a_bits=8, a_granularity="tensor-static"),
    "w8a8-dynamic": QuantConfig(name="w8a8-dynamic", w_bits=8, a_bits=8, a_granularity="tensor-dynamic"),
    "w8a8-token": QuantConfig(name="w8a8-token", w_bits=8, a_bits=8, a_granularity="token"),
    "w4a16": QuantConfig(name="w4a16", w_bits=4),
    "w4a8": QuantConfig(name="w4a8", w_bits=4, a_bits=8, a_granularity="token"),
    "w4a4": QuantConfig(name="w4a4", w_bits=4, a_bits=4, a_granularity="token", a_clip_search=True),
    "w4a4kv4": QuantConfig(name="w4a4kv4", w_bits=4, a_bits=4, a_granularity="token", a_clip_search=True, kv_bits=4),
}

#: what ``w_method=gptq`` brings to a 4-bit weight preset unless given: the full grid and each row's clip ratio
#: searched. GPTQ keeps the error of a clipped weight in the row's other columns; RTN does not, and on SmolLM2-135M
#: the row search clips the super weights of layer 11's down projection from 6.07 to 3.85 (docs/quantization.md)
W4_GPTQ_DEFAULTS = {"w_grid": "full", "w_clip_search": True}


def _parse_value(field_type: str, key: str, text: str):
    low = text.strip().lower()
    if key in ("roles", "layers"):
        if low in ("", "none", "all"):
            return None
        items = [t for t in low.replace("+", "/").split("/") if t]
        return tuple(int(t) for t in items) if key == "layers" else tuple(items)
    if low in ("none", "fp", "null") and key.endswith("bits"):
        return None
    if "bool" in field_type:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if "int" in field_type:
        return int(low)
    if "float" in field_type:
        return float(low)
    return text.strip()


def get_quant(spec: str | QuantConfig) -> QuantConfig:
    """A :class:`QuantConfig` from a preset name with optional ``:key=value`` overrides (or a config)."""
    if isinstance(spec, QuantConfig):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise QuantConfigError("a quantization spec must be a preset name such as w8a8-tensor")
    head, *overrides = [part.strip() for part in spec.strip().split(":")]
    if head not in PRESETS:
        raise QuantConfigError(f"unknown quantization preset {head!r}; presets: {', '.join(PRESETS)}")
    config = PRESETS[head]
    if not overrides:
        return config
    types = {f.name: str(f.type) for f in fields(QuantConfig)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types or key == "name":
            raise QuantConfigError(f"bad override {item!r} in {spec!r}: use key=value with a QuantConfig field "
                                   f"({', '.join(k for k in types if k != 'name')})")
        try:
            changes[key] = _parse_value(types[key], key, value)
        except ValueError:
            raise QuantConfigError(f"bad value in {spec!r}: {item!r}") from None
    given = set(changes)
    if config.w_bits == 4 and changes.get("w_method") == "gptq":
        changes.update({k: v for k, v in W4_GPTQ_DEFAULTS.items() if k not in given})
    # a preset's own defaults give way to the overrides they cannot go with: the full grid to an asymmetric
    # grid (which uses every level anyway), the activation clip search to static scales
    if changes.get("symmetric") is False and "w_grid" not in given:
        changes["w_grid"] = "restricted"
    if changes.get("a_granularity") == "tensor-static" and "a_clip_search" not in given:
        changes["a_clip_search"] = False
    return replace(config, name=spec.strip(), **changes)


def parse_quant_list(text: str) -> list[QuantConfig]:
    """Comma-separated specs (``fp,w8a8-tensor,w4a8:w_method=gptq``) -> configs, in order, without repeats."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise QuantConfigError("no quantization setting given")
    out: list[QuantConfig] = []
    for s in specs:
        cfg = get_quant(s)
        if cfg.name not in [c.name for c in out]:
            out.append(cfg)
    return out
