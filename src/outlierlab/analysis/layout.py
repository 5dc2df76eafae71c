"""Layout helpers shared by the explainer: fused linears cut into their parts, same-as positions resolved,
and token rows of every traced position captured from a single forward pass.

Everything here reads the adapter's declarations; nothing is specific to one model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.base import Adapter, LinearSpec
from ..runtime import BatchInfo
from ..tracing.hooks import observe

#: the residual stream, read at the three places every block exposes it
RESIDUAL_POSITIONS = ("attn.in", "mlp.in", "block.out")
#: positions whose channels index the hidden (residual) dimension
HIDDEN_POSITIONS = ("attn.in", "attn.norm", "attn.out", "attn.post_norm", "mlp.in", "mlp.norm", "mlp.out",
                    "mlp.post_norm", "block.out")
#: the writers: outputs of the projections that add into the residual stream (raw, before any post-norm)
WRITER_POSITIONS = ("attn.out", "mlp.out")


@dataclass(frozen=True)
class LinearPart:
    """One logical projection of a layer: a whole linear, or the q / k / v (gate / up) part of a fused one.

    ``rows`` are the output rows of the stored ``[out, in]`` weight that form this part, in the order of the
    part's own output position (``None``: all rows). ``module`` is the full module path in the model.
    """

    role: str
    spec: LinearSpec
    module: str
    rows: torch.Tensor | None
    input_position: str
    output_position: str | None

    def weight(self, adapter: Adapter, layer: int) -> torch.Tensor:
        """The part's weight as a float ``[out_part, in]`` tensor (a copy, never written back)."""
        w = adapter.linear_weight(layer, self.spec).detach()
        if self.rows is not None:
            w = w.index_select(0, self.rows.to(w.device))
        return w.float()

    def bias(self, adapter: Adapter, layer: int) -> torch.Tensor | None:
        b = getattr(adapter.layers()[layer].get_submodule(self.spec.module), "bias", None)
        if b is None:
            return None
        b = b.detach().float()
        return b.index_select(0, self.rows.to(b.device)) if self.rows is not None else b


def _out_features(adapter: Adapter, spec: LinearSpec) -> int:
    return adapter.linear_weight(0, spec).shape[0]


def linear_parts(adapter: Adapter, layer: int = 0) -> list[LinearPart]:
    """Every linear of the layer as logical parts. Fused linears (``qkv``, ``gate_up``) are cut with the very
    ``select`` functions their positions use, applied to the row indices, so the part's rows line up with
    the channels of ``attn.q`` / ``mlp.gate``... whatever the fused layout (concatenated or per head)."""
    prefix = adapter.layer_name(layer)
    parts: list[LinearPart] = []
    positions = adapter.positions()
    for spec in adapter.linears():
        module = f"{prefix}.{spec.module}"
        if spec.output_position is not None:
            parts.append(LinearPart(spec.role, spec, module, None, spec.input_position, spec.output_position))
            continue
        n_out = _out_features(adapter, spec)
        index = torch.arange(n_out).view(1, 1, n_out)
        for p in positions:
            cap = p.capture
            if cap is None or cap.module != spec.module or cap.kind != "output" or cap.select is None:
                continue
            rows = cap.select(index).reshape(-1).clone()
            role = p.name.split(".", 1)[1]
            parts.append(LinearPart(role, spec, module, rows, spec.input_position, p.name))
    return parts


def same_as_map(adapter: Adapter) -> dict[str, str]:
    """position -> the traced position holding its tensor (itself when it is traced)."""
    out = {}
    for p in adapter.positions():
        out[p.name] = p.same_as or p.name
    return out


def as_rows(x: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """A captured tensor as ``[batch, tokens, channels]`` (OPT flattens tokens; q/k norms add a head dim)."""
    return BatchInfo(batch, tokens).as_3d(x)


class RowCapture:
    """Callback for :func:`attach_positions` keeping, for chosen token indices, the row of every position."""

    def __init__(self, tokens: list[int], seq_len: int):
        self.tokens = list(tokens)
        self.index = torch.tensor(self.tokens, dtype=torch.long)
        self.seq_len = seq_len
        self.rows: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, layer: int, name: str, x: torch.Tensor) -> None:
        x = as_rows(x, 1, self.seq_len)
        self.rows[(layer, name)] = x[0].index_select(0, self.index.to(x.device)).detach().float().cpu()


def capture_token_rows(model: nn.Module, adapter: Adapter, ids: torch.Tensor, tokens: list[int],
                       layers=None, positions=None) -> dict[tuple[int, str], torch.Tensor]:
    """Forward one window ``ids`` ([seq_len]) and return ``{(layer, position): [len(tokens), C]}`` (a causal
    model runs the window only up to the last of ``tokens``)."""
    if tokens:
        ids = adapter.causal_prefix(ids, max(tokens))
    cap = RowCapture(tokens, ids.shape[-1])
    observe(model, adapter, cap, ids.view(1, -1), layers=layers, positions=positions)
    return cap.rows
