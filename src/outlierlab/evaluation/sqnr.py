"""Per-layer quantization error: for every quantized linear, how far its quantized output is from the full
precision one, on calibration windows, and whether the activation or the weight quantization causes it.

Method (one pass over the windows, on the full-precision model; nothing is stored per token):

- A forward hook on every target linear sees its full-precision input ``x`` and output ``y``. With the plan's
  quantized weight ``W_q`` and input quantizer ``Q_a`` it computes ``y_q = Q_a(x) W_q^T + b`` (both
  quantized), ``y_a = Q_a(x) W^T + b`` (activations only) and ``y_w = x W_q^T + b`` (weights only).
  Each operator is thus measured on the exact full-precision input: its *own* error, not the error carried in
  from the layers below, which is what points at the operator that breaks.
- ``sqnr_db = 10 log10(sum ||y||^2 / sum ||y - y_q||^2)`` over every token of every window (dominated by the
  tokens with the largest outputs, e.g. a massive-activation token); ``rel_mse`` = the mean over tokens of
  ``||y - y_q||^2 / ||y||^2`` (every token counts the same, so the damage done to ordinary tokens by a scale
  stretched by one outlier shows here). The ``_act`` / ``_weight`` variants isolate each source.
- KV cache (when quantized): the same two numbers for the key and value states of every layer, measured by
  the KV wrapper in pass-through mode.

Sums are accumulated on the device in float64; memory is O(layers x linears).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ..jsonsafe import jsonable
from ..runtime import ORDER, FunctionEntry, installed, registry, run

#: what ``outlierlab quant-error --out DIR`` writes, and ``outlierlab report DIR`` shows
QUANT_ERROR_FILE = "quant_error.json"

#: accumulator slots
_SIG, _EQ, _EA, _EW, _RQ, _RA, _RW, _NTOK, _AMAX = range(9)


@dataclass
class LinearError:
    name: str
    layer: int | None
    role: str
    input_position: str
    alias: str | None
    sqnr_db: float
    sqnr_act_db: float
    sqnr_weight_db: float
    rel_mse: float
    rel_mse_act: float
    rel_mse_weight: float
    input_absmax: float
    tokens: int

    @classmethod
    def from_json(cls, row: dict) -> LinearError:
        """A row of quant_error.json back (JSON has no inf: a missing SQNR is an error-free linear's)."""
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in row.items() if k in names}
        for k in ("sqnr_db", "sqnr_act_db", "sqnr_weight_db"):
            data[k] = math.inf if data.get(k) is None else float(data[k])
        for k in ("rel_mse", "rel_mse_act", "rel_mse_weight", "input_absmax"):
            data[k] = math.nan if data.get(k) is None else float(data[k])
        return cls(**data)

    @property
    def operator(self) -> str:
        """``L11 down (mlp.down_in = y6)``."""
        where = f"L{self.layer}" if self.layer is not None else "head"
        pos = f"{self.input_position} = {self.alias}" if self.alias else self.input_position
        return f"{where} {self.role} ({pos})"

    @property
    def cause(self) -> str:
        """Which quantization dominates this linear's error: ``activation``, ``weight`` or ``both``."""
        a, w = self.rel_mse_act, self.rel_mse_weight
        if a > 2 * w:
            return "activation"
        if w > 2 * a:
            return "weight"
        return "both"


@dataclass
class QuantErrorReport:
    """Per-linear (and per-layer KV) quantization error of one config on one model."""

    config: dict
    rows: list[LinearError]
    kv: list[dict] = field(default_factory=list)
    windows: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: dict) -> QuantErrorReport:
        """A report back from quant_error.json (or compare's ``sqnr`` section)."""
        return cls(doc.get("config") or {}, [LinearError.from_json(r) for r in doc.get("linears") or []],
                   doc.get("kv") or [], doc.get("windows") or {})

    def worst(self, n: int = 10, key: str = "rel_mse") -> list[LinearError]:
        """The ``n`` linears with the largest error by ``key`` (``rel_mse``; ``sqnr_db``: the lowest SQNR);
        rows without a number (NaN, as read back from JSON) come last."""
        known = [r for r in self.rows if not math.isnan(getattr(r, key))]
        unknown = [r for r in self.rows if math.isnan(getattr(r, key))]
        return (sorted(known, key=lambda r: getattr(r, key), reverse=not key.startswith("sqnr")) + unknown)[:n]

    def lowest_kv(self) -> dict | None:
        """The KV cache entry (layer, state) with the lowest SQNR (one without a number, as read back from JSON,
        counts as error-free); None without a KV quantizer."""
        def sqnr(d: dict) -> float:
            return math.inf if d.get("sqnr_db") is None else float(d["sqnr_db"])

        return min(self.kv, key=sqnr) if self.kv else None

    def get(self, layer: int, role: str) -> LinearError:
        return next(r for r in self.rows if r.layer == layer and r.role == role)

    def summary(self) -> dict:
        worst = self.worst(1, "rel_mse")
        lowest = self.worst(1, "sqnr_db")
        return {
            "worst_rel_mse": _row_brief(worst[0]) if worst else None,
            "lowest_sqnr": _row_brief(lowest[0]) if lowest else None,
            "median_sqnr_db": _median([r.sqnr_db for r in self.rows]),
        }

    def to_json(self) -> dict:
        return {"config": self.config, "windows": self.windows, "summary": self.summary(),
                "linears": [jsonable(asdict(r)) for r in self.rows], "kv": [jsonable(d) for d in self.kv]}

    def csv_rows(self) -> list[dict]:
        return [jsonable(asdict(r)) for r in self.rows]

    def save_csv(self, path) -> None:
        import csv
        import io

        from ..paths import atomic_write_text

        buf = io.StringIO()
        fields = list(LinearError.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for row in self.csv_rows():
            writer.writerow(row)
        atomic_write_text(path, buf.getvalue())


def _median(values: list[float]) -> float | None:
    vals = sorted(v for v in values if math.isfinite(v))
    return vals[len(vals) // 2] if vals else None


def _row_brief(r: LinearError) -> dict:
    return jsonable({"operator": r.operator, "name": r.name, "sqnr_db": r.sqnr_db, "rel_mse": r.rel_mse,
                     "cause": r.cause, "input_absmax": r.input_absmax})


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _token_rel(y: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||diff||^2 / ||y||^2 (tokens with an all-zero output are skipped)."""
    num = diff.pow(2).sum(-1)
    den = y.pow(2).sum(-1)
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den)).sum()


class _Measure:
    """One linear's error accumulator; its quantized weight is read from the plan's weights when the linear
    runs (RTN computed then, GPTQ's brought from the host) and dropped after: one linear's copy at a time."""

    def __init__(self, target, weights, act) -> None:
        self.target = target
        self.weights = weights if weights is not None and target.name in weights else None
        self.act = act
        self.acc: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args, output) -> None:
        if not args or not isinstance(output, torch.Tensor):
            return
        x = args[0]
        y = output.float()
        w = self.target.weight_view()
        bias = getattr(module, "bias", None)
        xa = self.act(x) if self.act is not None else x
        quantized = self.weights is not None
        wq = self.weights[self.target.name].to(device=w.device, dtype=w.dtype) if quantized else w
        y_q = nn.functional.linear(xa, wq, bias).float() if (self.act is not None or quantized) else y
        y_a = nn.functional.linear(xa, w, bias).float() if self.act is not None else y
        y_w = nn.functional.linear(x, wq, bias).float() if quantized else y
        flat = y.reshape(-1, y.shape[-1])
        dq = (y_q - y).reshape_as(flat)
        da = (y_a - y).reshape_as(flat)
        dw = (y_w - y).reshape_as(flat)
        vals = torch.stack([
            flat.pow(2).sum(), dq.pow(2).sum(), da.pow(2).sum(), dw.pow(2).sum(),
            _token_rel(flat, dq), _token_rel(flat, da), _token_rel(flat, dw),
            torch.tensor(float(flat.shape[0]), device=flat.device), x.detach().abs().amax().float(),
        ]).double()
        if self.acc is None:
            self.acc = vals
        else:
            amax = torch.maximum(self.acc[_AMAX], vals[_AMAX])
            self.acc += vals
            self.acc[_AMAX] = amax

    def result(self) -> LinearError:
        t = self.target
        a = self.acc.tolist() if self.acc is not None else [0.0] * 9
        n = max(a[_NTOK], 1.0)
        return LinearError(
            name=t.name, layer=t.layer, role=t.role, input_position=t.input_position, alias=t.alias,
            sqnr_db=_db(a[_SIG], a[_EQ]), sqnr_act_db=_db(a[_SIG], a[_EA]), sqnr_weight_db=_db(a[_SIG], a[_EW]),
            rel_mse=a[_RQ] / n, rel_mse_act=a[_RA] / n, rel_mse_weight=a[_RW] / n, input_absmax=a[_AMAX],
            tokens=int(a[_NTOK]),
        )


@torch.no_grad()
def quant_error(model: nn.Module, config, calib=None, windows=None, *, batch_size: int = 4,
                progress: bool = False, plan=None) -> QuantErrorReport:
    """Per-linear SQNR and relative MSE of ``config`` on ``model`` (left unchanged), measured on ``windows``
    (default: the calibration windows ``calib``, which also calibrate static scales and GPTQ)."""
    from ..quantization import kv as kvmod
    from ..quantization.fake import prepare, reads_logits

    plan = plan or prepare(model, config, calib, batch_size=batch_size, progress=progress)
    data = windows if windows is not None else calib
    if data is None:
        raise ValueError("quant_error needs windows (or calib) to measure on")
    ids = getattr(data, "input_ids", data)
    shape = registry(model).batch
    measures = []
    kv_measure: dict = {}
    for t in plan.targets:
        act = plan.acts.get(t.name)
        if act is not None:
            act.shape = shape
        measures.append(_Measure(t, plan.weights, act))

    def declare(hooks) -> None:
        for m in measures:
            hooks.forward(m.target.module, m)

    entries = [FunctionEntry("quant-error", ORDER["trace"], declare)]
    if plan.kv is not None:
        probe = kvmod.KVQuantizer(plan.kv.bits, plan.kv.symmetric, plan.kv.clip, plan.kv.prefix,
                                  measure=kv_measure, passthrough=True)
        entries.append(kvmod.KVEntry(probe, plan.config.layers))
    with installed(model, *entries):
        run(model, ids, batch_size, progress=progress, description="quantization error",
            logits=reads_logits([m.target for m in measures]))
    kv_rows = []
    for (layer, which), acc in sorted(kv_measure.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        sig, err = acc.tolist()
        kv_rows.append({"layer": layer, "state": which, "sqnr_db": _db(sig, err)})
    desc = getattr(data, "describe", None)
    return QuantErrorReport(plan.config.to_dict(), [m.result() for m in measures], kv_rows,
                            desc() if callable(desc) else {"n_windows": int(ids.shape[0]),
                                                           "seq_len": int(ids.shape[1])})
