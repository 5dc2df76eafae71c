"""Before/after measurements of a mitigation, in one pass over the evaluation windows.

One forward per batch gives both the perplexity (the fixed protocol of :mod:`outlierlab.evaluation`) and the
operator statistics (the profiler's :class:`~outlierlab.tracing.Tracer`, hooks registered *after* any
mitigation hook, so they see what the model computes now):

- ``resid_max``: the residual-stream max |h| = max over layers of ``block.out`` abs-max;
- ``ma_count``: MA records by the detection rule over every position (``ma_count_resid``: on ``block.out``);
- ``down_in_max``: max |x| of the tensor the down projection (fc2) actually receives, read by a pre-hook on
  that linear (so runtime hooks at y6, tma's or an online Hadamard, are seen);
- ``co_ratio``: per position, the largest CO ratio (channel median |x| / tensor median |x|, the detector's
  ratio) over layers; ``co_ratio_max``: its max over the norm outputs that feed linears (``attn.norm``,
  ``mlp.norm``: where the study locates the COs, and the inputs that per-token activation quantization
  sees); ``co_ratio_linear_inputs`` adds ``attn.ctx`` and ``mlp.down_in``;
- ``ppl``: exp(mean NLL) of next-token prediction.

``fast=True`` skips the tracer (only residual and down-input maxima plus perplexity): used by the sweep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import get_adapter
from ..analysis.detect import DetectConfig
from ..runtime import ORDER, FunctionEntry, NextTokenLoss, installed, run
from ..tracing import ProfileConfig
from ..tracing.hooks import _first_tensor
from ..tracing.profiler import Tracer, build_profile
from .base import down_spec, linear_module, window_ids

CONTRACT_KEYS = ("resid_max", "ma_count", "down_in_max", "co_ratio_max", "ppl")


@dataclass(frozen=True)
class MeasureConfig:
    detect: DetectConfig = field(default_factory=DetectConfig)
    batch_size: int = 4
    fast: bool = False


def co_ratio(stats: dict, detect: DetectConfig) -> float:
    med = stats["median"]
    if med <= 0:
        return 0.0
    chan = stats["chan_median"]
    chan = torch.where(chan > detect.co_min, chan, torch.zeros_like(chan))
    return float(chan.max() / med)


def measure(model: nn.Module, windows, config: MeasureConfig | None = None, tokenizer=None) -> dict:
    """Residual max, MA count, down-input max, CO ratios and perplexity of ``model`` on ``windows``."""
    cfg = config or MeasureConfig()
    adapter = get_adapter(model)
    ids = window_ids(windows)
    t0 = time.perf_counter()
    pconf = ProfileConfig(detect=cfg.detect, batch_size=cfg.batch_size, weights=False)
    tracer = None if cfg.fast else Tracer(adapter, pconf)
    n_layers = adapter.n_layers
    down: dict[int, torch.Tensor] = {}
    resid: dict[int, torch.Tensor] = {}
    spec = down_spec(adapter)
    loss = NextTokenLoss()

    def keep_max(store: dict, i: int, x: torch.Tensor) -> None:
        m = x.detach().abs().amax().float()
        store[i] = m if i not in store else torch.maximum(store[i], m.to(store[i].device))

    def maxima(hooks) -> None:
        for i in range(n_layers):
            hooks.pre(linear_module(adapter, i, spec), lambda m, args, i=i: keep_max(down, i, args[0]))
            hooks.forward(adapter.layers()[i], lambda m, a, out, i=i: keep_max(resid, i, _first_tensor(out)))

    entries = [FunctionEntry("measure", ORDER["trace"], maxima)] + ([tracer] if tracer is not None else [])
    with installed(model, *entries):
        run(model, ids, cfg.batch_size, loss, description="measuring",
            first_batch=tracer.first_forward(model, len(ids), cfg.batch_size) if tracer is not None else None)
    resid_l = torch.tensor([float(resid[i]) if i in resid else 0.0 for i in range(n_layers)])
    down_l = torch.tensor([float(down[i]) if i in down else 0.0 for i in range(n_layers)])
    out = {
        "resid_max": float(resid_l.max()),
        "down_in_max": float(down_l.max()),
        "ppl": loss.perplexity(),
        "resid_max_per_layer": [round(float(v), 3) for v in resid_l],
        "down_in_max_per_layer": [round(float(v), 3) for v in down_l],
    }
    if tracer is not None:
        prof = build_profile(adapter, tracer.results(), pconf, ids, tokenizer, None, {}, {}, {})
        ratios: dict[str, float] = {}
        for (layer, pos), r in prof.results.items():
            ratios[pos] = max(ratios.get(pos, 0.0), co_ratio(r.stats, cfg.detect))
        norm_outputs = {n.output_position for n in adapter.norms() if n.consumers}
        linear_inputs = norm_outputs | {"attn.ctx", "mlp.down_in"}
        out.update({
            "ma_count": len(prof.massive_activations),
            "ma_count_resid": sum(1 for m in prof.massive_activations if m["position"] == "block.out"),
            "co_ratio_max": max((v for p, v in ratios.items() if p in norm_outputs), default=0.0),
            "co_ratio_linear_inputs": max((v for p, v in ratios.items() if p in linear_inputs), default=0.0),
            "co_ratio": {p: round(v, 3) for p, v in sorted(ratios.items())},
            "co_channels": len(prof.channel_outliers),
        })
    out["seconds"] = time.perf_counter() - t0
    return out


def reduction(before: dict, after: dict) -> dict:
    """Ratios before / after (x times less) and the relative perplexity change."""
    def times(key):
        a, b = before.get(key), after.get(key)
        if a is None or b is None or b <= 0:
            return None
        return a / b

    out = {f"{k}_x": times(k) for k in ("resid_max", "down_in_max", "co_ratio_max", "co_ratio_linear_inputs")}
    if before.get("ppl") and after.get("ppl"):
        out["ppl_rel"] = after["ppl"] / before["ppl"] - 1.0
    return out
