"""Weight statistics: effective norm gains and per-column / per-row L2 norms of every linear weight."""

from __future__ import annotations

import torch

from ..adapters import Adapter
from ..models.loader import onloaded


@torch.no_grad()
def weight_stats(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Flat dict of CPU float tensors, keyed ``L{layer}.gain.{norm}`` and ``L{layer}.{role}.col_norm`` /
    ``.row_norm`` (columns are input channels, rows output channels, whatever the storage layout)."""
    out: dict[str, torch.Tensor] = {}
    for layer in range(adapter.n_layers):
        with onloaded(adapter.layers()[layer]):  # weights offloaded by accelerate, if any, read in place
            out.update(_layer_stats(adapter, layer))
    return out


def _layer_stats(adapter: Adapter, layer: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for norm in adapter.norms():
        gain = adapter.norm_gain(layer, norm)
        if gain is not None:
            out[f"L{layer}.gain.{norm.name}"] = gain.float().cpu()
    for spec in adapter.linears():
        w = adapter.linear_weight(layer, spec).float()
        out[f"L{layer}.{spec.role}.col_norm"] = w.norm(dim=0).cpu()
        out[f"L{layer}.{spec.role}.row_norm"] = w.norm(dim=1).cpu()
    return out


def summarize(values: torch.Tensor, top: int = 5) -> dict:
    """Max, median and the ``top`` largest entries (by |value|) of a 1-D tensor."""
    a = values.abs()
    k = min(top, a.numel())
    idx = a.topk(k).indices
    med = float(a.median())
    return {
        "max": float(a.max()),
        "median": med,
        "max_over_median": float(a.max() / med) if med > 0 else None,
        "top": [[int(i), float(values[i])] for i in idx],
    }
