"""GPTQ weight quantization, written from the algorithm's description (Frantar et al., 2023):

For a linear layer with weight ``W [out, in]`` and calibration inputs ``X``, minimise ``||W X - Q X||^2`` column
by column. With ``H = 2 X X^T / n`` (the Hessian of that objective, damped by ``damp * mean(diag H)``), each
column ``j`` is rounded to the grid and its rounding error, divided by ``[H^-1]_jj``, is propagated onto the
columns not yet quantized through row ``j`` of the upper Cholesky factor of ``H^-1`` (which equals the
successive inverse Hessians after each elimination). Columns are processed in blocks of ``block`` ("lazy
batch"): the updates inside a block are applied at once, and the block's accumulated error is pushed to the
rest of the matrix with one matrix product. Dead inputs (``H_jj = 0``) get weight 0. ``act_order`` processes
columns by decreasing ``H_jj``; its per-group scales are then computed up front from the unquantized weight
("static groups"), otherwise each group's scale is computed when the group's first column is reached, from the
error-updated weights.

Calibration runs layer by layer: the decoder layers' inputs are recorded once, then each layer is replayed on
the recorded inputs to accumulate its Hessians, quantized, and replayed again with its quantized weights to
produce the next layer's inputs (so layer ``l`` is fitted to the errors of layers ``< l``). The model's weights
are restored at the end: the quantized tensors are returned, not written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OutlierlabError
from ..runtime import ORDER, FunctionEntry, installed, run
from ..tracing.hooks import _first_tensor
from .quantizers import fake_quant, qparams


def _params(w: torch.Tensor, bits: int, symmetric: bool, clip: float):
    """Per-row (scale, zero) of ``w [out, k]`` reduced over its columns."""
    return qparams(w, bits, symmetric, -1, clip)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, symmetric: bool = True,
                  granularity: str = "channel", group_size: int = 128, clip: float = 1.0, damp: float = 0.01,
                  block: int = 128, act_order: bool = False) -> torch.Tensor:
    """Quantize ``W [out, in]`` with the GPTQ procedure given the input Hessian ``H [in, in]``.

    Returns the dequantized weight (float32, same shape). ``granularity``: ``channel``, ``group`` or ``tensor``.
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    n_in = W.shape[1]
    if H.shape != (n_in, n_in):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight inputs {n_in}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # scales that do not depend on the order of the columns
    if granularity == "tensor":
        fixed = qparams(W, bits, symmetric, None, clip)
    elif granularity == "channel":
        fixed = _params(W, bits, symmetric, clip)
    elif granularity == "group":
        fixed = None
    else:
        raise ValueError(f"unknown weight granularity {granularity!r}")

    perm = None
    static_groups = None
    if act_order:
        if granularity == "group":
            static_groups = [_params(W[:, g:g + group_size], bits, symmetric, clip)
                             for g in range(0, n_in, group_size)]
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    mean_diag = torch.mean(torch.diag(H))
    Hinv = None
    for attempt in range(6):
        try:
            Hd = H + torch.eye(n_in, device=H.device, dtype=H.dtype) * (damp * (10 ** attempt)) * mean_diag
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
    if Hinv is None:
        raise OutlierlabError("GPTQ: the calibration Hessian is not positive definite even with strong damping; "
                              "use more calibration windows or w_method=rtn")

    Q = torch.zeros_like(W)
    current = fixed
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if granularity == "group":
                if static_groups is not None:
                    current = static_groups[int(perm[col]) // group_size]
                elif col % group_size == 0:
                    # the group's scale from the current (error-updated) weights of its columns
                    stop = min(col + group_size, n_in)
                    rest = torch.cat([W1[:, i:], W[:, i2:stop]], dim=1) if stop > i2 else W1[:, i:i + group_size]
                    current = _params(rest, bits, symmetric, clip)
            scale, zero = current
            w = W1[:, i]
            q = fake_quant(w.unsqueeze(1), scale, zero, bits).squeeze(1)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


class HessianAccumulator:
    """Running ``2 X X^T / n`` of the rows of every input it is fed (float32, on the input's device)."""

    def __init__(self, n_in: int, device) -> None:
        self.H = torch.zeros(n_in, n_in, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.t() @ x


class _Stop(Exception):
    pass


@dataclass
class _Call:
    """How a decoder layer was called for one batch: positional args after the hidden states, and kwargs."""

    args: tuple
    kwargs: dict
    positional: bool


def _record_layer_calls(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int):
    """Run the calibration windows once (stopping at the last layer); return the first layer's inputs and
    every layer's call arguments."""
    inputs: list[torch.Tensor] = []
    calls: list[list[_Call]] = []

    def make(index):
        def pre(module, args, kwargs):
            positional = bool(args)
            hidden = args[0] if positional else kwargs["hidden_states"]
            rest = dict(kwargs) if positional else {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[-1].append(_Call(tuple(args[1:]) if positional else (), rest, positional))
            if index == 0:
                inputs.append(hidden.detach())
            if index == len(layers) - 1:
                raise _Stop
        return pre

    def declare(hooks) -> None:
        hooks.pre(model, lambda m, a, k: calls.append([]), with_kwargs=True)
        for i, layer in enumerate(layers):
            hooks.pre(layer, make(i), with_kwargs=True)

    with installed(model, FunctionEntry("gptq.capture", ORDER["probe"], declare)):
        run(model, ids, batch_size, stop=_Stop, description="GPTQ inputs")
    return inputs, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: _Call) -> torch.Tensor:
    if call.positional:
        out = layer(hidden, *call.args, **call.kwargs)
    else:
        out = layer(hidden_states=hidden, **call.kwargs)
    return _first_tensor(out)


def gptq_weights(model: nn.Module, adapter, targets, ids: torch.Tensor, config, batch_size: int = 4,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """GPTQ-quantized weights ``[out, in]`` of ``targets`` (decoder-layer linears), keyed by target name.

    The model is unchanged on return (weights are swapped in during the layer-by-layer replay and restored).
    """
    from ..progress import progress_bar

    layers = adapter.layers()
    by_layer: dict[int, list] = {}
    for t in targets:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    last = max(by_layer) if by_layer else -1
    result: dict[str, torch.Tensor] = {}
    if last < 0:
        return result
    inputs, calls = _record_layer_calls(model, layers, ids, batch_size)
    swapped: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        with progress_bar(progress) as bar, torch.inference_mode():
            task = bar.add_task("GPTQ", total=last + 1)
            for index in range(last + 1):
                layer = layers[index]
                group_targets = by_layer.get(index, [])
                if group_targets:
                    # one Hessian per distinct input (q, k, v share theirs)
                    groups: dict[str, list] = {}
                    for t in group_targets:
                        groups.setdefault(t.input_position, []).append(t)
                    accs: dict[str, HessianAccumulator] = {}
                    for key, members in groups.items():
                        w = members[0].weight_view()
                        accs[key] = HessianAccumulator(w.shape[1], w.device)

                    def declare(hooks, groups=groups, accs=accs) -> None:
                        for key, members in groups.items():
                            hooks.pre(members[0].module,
                                      lambda m, args, acc=accs[key]: acc.add(args[0]) if args else None)

                    with installed(model, FunctionEntry("gptq.hessian", ORDER["probe"], declare)):
                        for hidden, call in zip(inputs, calls):
                            _run_layer(layer, hidden, call[index])
                    for key, members in groups.items():
                        for t in members:
                            with torch.inference_mode(False):  # plain tensors, usable with autograd later
                                q = gptq_quantize(t.weight_view(), accs[key].H.clone(), config.w_bits,
                                                  config.symmetric, config.w_granularity, config.group_size,
                                                  config.w_clip, config.gptq_damp, config.gptq_block,
                                                  config.gptq_act_order)
                                result[t.name] = q.to(t.module.weight.dtype)
                        del accs[key]
                    for t in group_targets:
                        original = t.module.weight.data
                        swapped.append((t.module, original))
                        t.module.weight.data = t.to_storage(result[t.name])
                if index < last:
                    inputs = [_run_layer(layer, hidden, call[index]) for hidden, call in zip(inputs, calls)]
                bar.advance(task)
    finally:
        for module, original in reversed(swapped):
            module.weight.data = original
    return result
