"""Typed records of the MA attribution (origin steps, the terms they are made of, ablations); they are
serialized by the package's one sanitizer, :func:`outlierlab.jsonsafe.jsonable` (re-exported here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..jsonsafe import jsonable  # noqa: F401 - the serializer of these records


@dataclass(frozen=True)
class Edit:
    """One parameter entry an ablation changes: ``param`` (``weight`` / ``bias``) of ``module`` (a path in
    the model) at the *stored* ``index``, set to ``to`` while the ablation runs."""

    kind: str  # "weight" | "bias" | "gain"
    layer: int
    module: str
    param: str
    index: tuple[int, ...]
    to: float

    def sort_key(self) -> tuple:
        return (self.layer, self.module, self.param, self.index)


@dataclass
class Ablation:
    """What one ablation run left (shared by every record that asks for the same edits)."""

    edits: list[Edit] = field(default_factory=list)
    verified: bool | None = None
    ma_after: float | None = None
    ma_after_at: dict | None = None
    ma_after_any_layer: float | None = None
    ma_after_any_layer_at: dict | None = None
    ppl_before: float | None = None
    ppl_after: float | None = None
    skipped: str | None = None


@dataclass
class WeightTerm:
    """A term W[row, col] * x[col] of a projection output (``row``/``col`` index W as ``[out, in]``)."""

    module: str
    role: str
    row: int
    col: int
    weight: float
    input: float
    contribution: float
    share: float | None  # of the projection output at (token, channel)
    weight_ratio: float  # |w| / median |w| of the projection


@dataclass
class BiasTerm:
    module: str
    channel: int
    value: float
    share: float | None


@dataclass
class GainTerm:
    """A norm between a branch and the residual add: its gain at the channel and the value it scales."""

    norm: str  # the norm's output position (mlp.post_norm, attn.post_norm)
    module: str
    channel: int
    gain: float  # effective gain (weight + gain_offset)
    median_gain: float  # median |gain| of the norm
    gain_ratio: float
    pre_gain: float  # (output - bias) / gain at (token, channel): the normalized branch output
    pre_gain_median: float  # median |pre_gain| over the token's channels
    gain_share: float  # log(gain_ratio) / (log(gain_ratio) + log(|pre_gain| / pre_gain_median))


@dataclass
class KeyRead:
    key_position: int
    prob: float  # attention probability of the MA token's query on this key
    value: float  # the value state entry read
    contribution: float  # prob * value
    share: float | None  # of the context channel


@dataclass
class HeadRead:
    """Which key positions a head's context channel reads at the MA token."""

    channel: int  # context channel (o_proj input)
    head: int
    keys: list[KeyRead]


@dataclass
class OriginStep:
    """One layer's branch that grows the MA by at least ``step_share`` of its peak, with its mechanism."""

    layer: int
    branch: str  # "attn" | "mlp"
    mechanism: str  # "down_proj" | "o_proj" | "norm_gain" | "bias"
    label: str  # e.g. "made at y6 by W_down", "made by the post-FFN norm gain"
    contribution: float  # what the branch adds to the residual at (token, channel)
    share: float  # contribution / peak (residual MAs; of the tracked peak otherwise)
    residual_before: float | None
    residual_after: float | None
    writer: str  # position of the raw projection output (attn.out, mlp.out)
    writer_value: float | None
    module: str | None  # the projection
    input_position: str | None
    channels: list[dict] = field(default_factory=list)  # input channels carrying it (y6 / context)
    weights: list[WeightTerm] = field(default_factory=list)
    bias: BiasTerm | None = None
    norm: GainTerm | None = None
    attention: list[HeadRead] | None = None
    ablation: Ablation = field(default_factory=Ablation)
