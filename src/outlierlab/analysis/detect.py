"""The outlier rules: massive activations (MAs) and channel-wise outliers (COs), both configurable.

- MA (Sun et al. 2024): an entry with ``|x| > ma_abs`` and ``|x| > ma_rel x median|x|`` of its tensor.
- CO: a channel whose typical magnitude (its median |x| over tokens) is at least ``co_k`` times the tensor's
  median |x|. The median over tokens, not the mean, so that a channel holding one massive token is not a CO.
  ``co_k = 10`` by default: an order of magnitude above the typical entry, the lower end of the 10-100x that
  the literature reports for CO channels. The same median-based rule serves every position; at positions whose
  typical entry is near zero (e.g. products after a gate) read the ratios with that in mind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DetectConfig:
    ma_abs: float = 100.0
    ma_rel: float = 1000.0
    co_k: float = 10.0
    #: ignore channels whose typical magnitude is below this (avoids ratios of two tiny numbers)
    co_min: float = 1e-6


def massive_activations(stats: dict, cfg: DetectConfig) -> list[dict]:
    """MAs among the retained top entries of one finalized position, largest first."""
    threshold = max(cfg.ma_abs, cfg.ma_rel * stats["median"])
    if stats.get("absmax", math.inf) <= threshold:  # no entry of the tensor passes (a profile's usual case)
        return []
    out = []
    for value, window, token, channel in zip(
        stats["top_value"].tolist(), stats["top_window"].tolist(), stats["top_token"].tolist(),
        stats["top_channel"].tolist(),
    ):
        if abs(value) > threshold:
            out.append({"value": value, "window": window, "token_index": token, "channel": channel})
    return out


def channel_outliers(stats: dict, cfg: DetectConfig) -> list[dict]:
    """CO channels of one finalized position, by decreasing ratio."""
    med = stats["median"]
    if med <= 0:
        return []
    # no channel passes when the largest one does not: the same float32 division as below, monotonic in chan
    top = stats.get("chan_median_max")
    if top is not None and np.float32(top) / np.float32(med) < np.float32(cfg.co_k):
        return []
    chan = stats["chan_median"]
    ratio = chan / med
    hits = torch.nonzero((ratio >= cfg.co_k) & (chan > cfg.co_min)).flatten()
    rows = [
        {"channel": c, "ratio": r, "median": m, "absmax": a}
        for c, r, m, a in zip(hits.tolist(), ratio[hits].tolist(), chan[hits].tolist(),
                              stats["chan_absmax"][hits].tolist())
    ]
    return sorted(rows, key=lambda r: -r["ratio"])


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, c]||_2 of every input column of a linear weight [out, in], as a CPU float tensor."""
    return weight.detach().float().norm(dim=0).cpu()


def otc_scores(chan_mean: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """Score of every input column c of a linear: E|x_c| * ||W[:, c]||_2, the column's typical contribution
    to the output (``chan_mean`` from the profile of the linear's input, ``col_norm`` from
    :func:`column_norms`)."""
    return chan_mean.detach().float().cpu() * col_norm


def otc_columns(scores: torch.Tensor, k: float) -> tuple[list[int], float]:
    """The outlier-triggering columns (score at least ``k`` x the median score) and that median; none when
    the median is 0."""
    med = float(scores.median())
    if med <= 0:
        return [], med
    return torch.nonzero(scores >= k * med).flatten().tolist(), med
