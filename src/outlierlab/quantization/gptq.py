"""GPTQ weight quantization, written from the algorithm's description (Frantar et al., 2023).

**Per linear.** For a weight ``W [out, in]`` and calibration inputs ``X``, minimise ``||W X - Q X||^2`` column by
column. With ``H = 2 X X^T / n`` (the Hessian of that objective, damped by ``damp * mean(diag H)``), each column
``j`` is rounded to the grid and its rounding error, divided by ``[H^-1]_jj``, is propagated onto the columns not
yet quantized through row ``j`` of the upper Cholesky factor of ``H^-1`` (which equals the successive inverse
Hessians after each elimination). Columns are processed in blocks of ``block`` ("lazy batch"): the updates
inside a block are applied at once, and the block's accumulated error is pushed to the rest of the matrix with
one matrix product. Dead inputs (``H_jj = 0``) get weight 0.

- ``act_order``: columns in decreasing ``H_jj`` order (the inputs with the most energy first).
- Scales: per channel / per tensor they come from the unquantized weight. Per group, ``static_groups`` computes
  every group's scale up front from the unquantized weight (contiguous groups of the original columns, as a
  checkpoint stores them); otherwise a group's scale is computed when its first column is reached, from the
  error-updated weights, and with ``act_order`` a group is ``group_size`` consecutive columns *in processing
  order* (an exported checkpoint would then need a column -> group index).

**Per model** (:func:`gptq_weights`), layer by layer. One forward records the first decoder layer's inputs and
every layer's call arguments (masks, position embeddings). Then, for each layer: its Hessians are accumulated by
replaying it on the recorded inputs, its linears are quantized, and it is replayed with its quantized weights to
produce the next layer's inputs, so layer ``l`` is fitted to the errors of the layers below it. With
``true_sequential`` (the default) the sublayers of a layer are quantized in execution order, one group of
linears that read the same input at a time (q/k/v, then o, then gate/up, then down): each group's Hessian comes
from inputs computed with the already-quantized earlier groups (each such replay stops at the group's input).
The model's weights are restored at the end: the quantized tensors are returned, not written.

**Memory.** Accelerator: one decoder layer's weights (an offloaded layer is brought to its execution device once
for its whole turn, not per batch), one batch's activations inside it, and the Hessians of one group of linears
(``in x in`` float32 each): O(one layer + one layer's activations). The recorded layer inputs (``n_windows x
seq_len x hidden`` in the model's dtype) and call arguments stay on the host when ``offload`` is on (config
``gptq_offload_inputs``: ``auto`` turns it on for models placed by accelerate over several devices, or when the
inputs would take more than half of the accelerator's free memory); one batch at a time is moved to the layer.
The quantized weights are returned on the weight's device (on the host for offloaded weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OutlierlabError
from ..runtime import ORDER, FunctionEntry, input_device, installed, registry, run
from ..tracing.hooks import _first_tensor
from .quantizers import fake_quant, weight_qparams


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, symmetric: bool = True,
                  granularity: str = "channel", group_size: int = 128, clip: float = 1.0, damp: float = 0.01,
                  block: int = 128, act_order: bool = False, static_groups: bool = False,
                  grid: str = "restricted", clip_search: bool = False) -> torch.Tensor:
    """Quantize ``W [out, in]`` with the GPTQ procedure given the input Hessian ``H [in, in]``.

    Returns the dequantized weight (float32, same shape). ``granularity``: ``channel``, ``group`` or ``tensor``;
    ``grid``: the symmetric grid (``restricted`` or ``full``); ``clip_search``: each scale's clip ratio searched
    (:func:`.quantizers.searched_qparams`) on the weights it is computed from.
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()  # the caller's H is left as it is (one Hessian serves q, k and v)
    n_in = W.shape[1]
    if H.shape != (n_in, n_in):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight inputs {n_in}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    def params(w, dims=-1):
        return weight_qparams(w, bits, symmetric, dims, clip, grid, clip_search)

    # scales that do not depend on the order of the columns
    if granularity == "tensor":
        fixed = params(W, None)
    elif granularity == "channel":
        fixed = params(W)
    elif granularity == "group":
        fixed = None
    else:
        raise ValueError(f"unknown weight granularity {granularity!r}")
    groups = None
    if granularity == "group" and static_groups:
        groups = [params(W[:, g:g + group_size]) for g in range(0, n_in, group_size)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = _inverse_factor(H, damp)
    del H

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
            if groups is not None:
                current = groups[(int(perm[col]) if perm is not None else col) // group_size]
            elif granularity == "group" and col % group_size == 0:
                # the group's scale from the current (error-updated) weights of its columns
                stop = min(col + group_size, n_in)
                rest = torch.cat([W1[:, i:], W[:, i2:stop]], dim=1) if stop > i2 else W1[:, i:i + group_size]
                current = params(rest)
            scale, zero = current
            w = W1[:, i]
            q = fake_quant(w.unsqueeze(1), scale, zero, bits, grid).squeeze(1)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, damping x10 up to 5 times if needed."""
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(6):
        try:
            # the damping added on the diagonal in place: one n x n temporary, not three (n = 28672 on a 70B
            # shape: 3.3 GB each); the same float32 values as H + I * (damp * 10^attempt) * mean_diag
            A = H.clone()
            A.diagonal().add_(torch.tensor(damp * (10 ** attempt), dtype=H.dtype, device=H.device) * mean_diag)
            L = torch.linalg.cholesky(A)
            del A
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
    raise OutlierlabError("GPTQ: the calibration Hessian is not positive definite even with strong damping; "
                          "use more calibration windows or w_method=rtn")


class HessianAccumulator:
    """Running ``2 X X^T / n`` of the rows of every input it is fed (float32, on ``device``)."""

    def __init__(self, n_in: int, device) -> None:
        self.H = torch.zeros(n_in, n_in, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.H.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.t() @ x


# -- layer-by-layer calibration ------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@dataclass
class _Call:
    """How a decoder layer was called for one batch: positional args after the hidden states, and kwargs."""

    args: tuple
    kwargs: dict
    positional: bool


def _move(value, device: torch.device | None, memo: dict | None = None):
    """``value`` (tensors inside tuples, lists, dicts) on ``device``; ``memo`` stores a tensor shared by several
    calls once (keyed by id, the original kept alive so that the id is not reused)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        hit = memo.get(id(value))
        if hit is None:
            hit = memo[id(value)] = (value, value.detach().to(device))
        return hit[1]
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, memo) for k, v in value.items()}
    return value


def _record_layer_calls(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                        store: torch.device | None, last: int):
    """Run the calibration windows once, stopping at layer ``last``; return the first layer's inputs and the
    call arguments of layers ``0..last``, per batch, kept on ``store`` (None: where they are)."""
    inputs: list[torch.Tensor] = []
    calls: list[list[_Call]] = []
    memo: dict = {}

    def start(module, args, kwargs) -> None:
        calls.append([])
        memo.clear()

    def make(index):
        def pre(module, args, kwargs):
            positional = bool(args)
            hidden = args[0] if positional else kwargs["hidden_states"]
            rest = dict(kwargs) if positional else {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[-1].append(_Call(_move(tuple(args[1:]), store, memo) if positional else (),
                                   _move(rest, store, memo), positional))
            if index == 0:
                inputs.append(_move(hidden.detach(), store))
            if index == last:
                raise _Stop
        return pre

    def declare(hooks) -> None:
        hooks.pre(model, start, with_kwargs=True)
        for i, layer in enumerate(layers[:last + 1]):
            hooks.pre(layer, make(i), with_kwargs=True)

    with installed(model, FunctionEntry("gptq.capture", ORDER["probe"], declare)):
        run(model, ids, batch_size, stop=_Stop, description="GPTQ inputs", logits=False)
    memo.clear()
    return inputs, calls


def _execution_device(layer: nn.Module, model: nn.Module) -> torch.device:
    """Where ``layer`` runs: its accelerate hook's execution device, else where its weights are."""
    for m in layer.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in layer.parameters():
        if p.device.type != "meta":
            return p.device
    return input_device(model)


@contextlib.contextmanager
def _resident(layer: nn.Module):
    """Inside the block, the weights that accelerate offloaded from ``layer`` are real tensors on its execution
    device, and forwards do not reload them (so swapped-in weights are used); offloaded again at the end."""
    from accelerate.utils import has_offloaded_params

    hooked = [m for m in layer.modules() if has_offloaded_params(m)]
    done = []
    try:
        with torch.inference_mode(False):  # plain parameters, whose data the quantized weights can replace
            for m in hooked:
                m._hf_hook.pre_forward(m)
                m._hf_hook.offload = False
                done.append(m)
        yield
    finally:
        with torch.inference_mode(False):
            for m in reversed(done):
                m._hf_hook.offload = True
                m._hf_hook.post_forward(m, None)


def _store_device(model: nn.Module, config, ids: torch.Tensor) -> torch.device | None:
    """Where the recorded layer inputs are kept: the host (``cpu``) or where they are produced (None)."""
    mode = config.gptq_offload_inputs
    if mode == "never":
        return None
    if mode == "always":
        return torch.device("cpu")
    device = input_device(model)
    if device.type == "cpu":
        return None
    placed = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(placed) > 1:
        return torch.device("cpu")
    if device.type == "cuda":
        cfg = model.config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
        dtype = next(model.parameters()).dtype
        need = 2 * ids.numel() * hidden * torch.empty((), dtype=dtype).element_size()  # inputs and outputs
        free, _ = torch.cuda.mem_get_info(device)
        if need > free / 2:
            return torch.device("cpu")
    return None


class _Replay:
    """Runs one decoder layer on every recorded batch, on the layer's execution device."""

    def __init__(self, model: nn.Module, layer: nn.Module, index: int, inputs, calls, batch_size: int) -> None:
        self.model, self.layer, self.index = model, layer, index
        self.inputs, self.calls, self.batch_size = inputs, calls, batch_size
        self.device = _execution_device(layer, model)

    def _one(self, b: int) -> torch.Tensor:
        hidden = self.inputs[b].to(self.device)
        call = self.calls[b][self.index]
        args, kwargs = _move(call.args, self.device), _move(call.kwargs, self.device)
        info = registry(self.model).batch
        info.batch, info.tokens, info.window0 = int(hidden.shape[0]), int(hidden.shape[1]), b * self.batch_size
        out = self.layer(hidden, *args, **kwargs) if call.positional else \
            self.layer(hidden_states=hidden, **kwargs)
        return _first_tensor(out)

    def observe(self, stop: bool) -> None:
        """Every batch through the layer for the installed observers (``stop``: they end it early)."""
        for b in range(len(self.inputs)):
            try:
                self._one(b)
            except _Stop:
                if not stop:
                    raise

    def propagate(self) -> None:
        """Replace each batch's input by the layer's output (kept where the input was)."""
        for b in range(len(self.inputs)):
            self.inputs[b] = self._one(b).to(self.inputs[b].device)


def _groups(targets) -> list[list]:
    """The layer's targets grouped by input (q/k/v share one), in execution order."""
    groups: dict[str, list] = {}
    for t in targets:
        groups.setdefault(t.input_position, []).append(t)
    return list(groups.values())


def _hessians(model: nn.Module, replay: _Replay, groups: list[list], stop: bool) -> list[HessianAccumulator]:
    """One Hessian per group, accumulated on the replayed layer (``stop``: end each forward at the input)."""
    accs = [HessianAccumulator(g[0].weight_view().shape[1], replay.device) for g in groups]

    def observe(acc):
        def pre(module, args):
            if args:
                acc.add(args[0])
            if stop:
                raise _Stop
        return pre

    def declare(hooks) -> None:
        for g, acc in zip(groups, accs):
            hooks.pre(g[0].module, observe(acc))

    with installed(model, FunctionEntry("gptq.hessian", ORDER["probe"], declare)):
        replay.observe(stop)
    for g, acc in zip(groups, accs):
        if acc.n == 0:
            raise OutlierlabError(f"GPTQ: {g[0].name} received no input when its layer was replayed")
    return accs


def _offloaded(layer: nn.Module) -> bool:
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(m) for m in layer.modules())


def _quantize_group(group, acc: HessianAccumulator, config, keep, swapped: list, host: bool) -> None:
    """GPTQ every linear of ``group`` with its Hessian; hand the result (on the host: ``host``) to ``keep`` and
    swap it into the module."""
    for t in group:
        weight = t.weight_view()
        with torch.inference_mode(False):  # plain tensors, usable with autograd later
            q = gptq_quantize(weight, acc.H, config.w_bits, config.symmetric, config.w_granularity,
                              config.group_size, config.w_clip, config.gptq_damp, config.gptq_block,
                              config.gptq_act_order, config.gptq_static_groups, config.w_grid,
                              config.w_clip_search)
        q = q.to(t.module.weight.dtype)
        swapped.append((t.module, t.module.weight.data))
        t.module.weight.data = t.to_storage(q)
        keep(t.name, q.cpu() if host else q)


def gptq_weights(model: nn.Module, adapter, targets, ids: torch.Tensor, config, batch_size: int = 4,
                 progress: bool = False, keep=None) -> dict[str, torch.Tensor]:
    """GPTQ-quantized weights ``[out, in]`` of ``targets`` (decoder-layer linears), keyed by target name.

    Layer by layer, sublayer by sublayer with ``config.gptq_true_sequential`` (see the module docstring); the
    model is unchanged on return (weights are swapped in during a layer's turn and restored after it).
    ``keep(name, weight)``: called with each result as soon as it is computed, instead of collecting them (the
    caller can store them away: then nothing beyond one layer is held here, and the dict returned is empty).
    """
    from ..progress import progress_bar

    layers = adapter.layers()
    by_layer: dict[int, list] = {}
    for t in targets:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    result: dict[str, torch.Tensor] = {}
    if not by_layer:
        return result
    keep = keep or result.__setitem__
    last = max(by_layer)
    store = _store_device(model, config, ids)
    inputs, calls = _record_layer_calls(model, layers, ids, batch_size, store, last)
    with progress_bar(progress) as bar, torch.inference_mode():
        task = bar.add_task("GPTQ", total=last + 1)
        for index in range(last + 1):
            layer = layers[index]
            replay = _Replay(model, layer, index, inputs, calls, batch_size)
            swapped: list[tuple[nn.Module, torch.Tensor]] = []
            host = _offloaded(layer)
            with _resident(layer):
                try:
                    groups = _groups(by_layer.get(index, []))
                    if groups and config.gptq_true_sequential:
                        for group in groups:
                            acc, = _hessians(model, replay, [group], stop=True)
                            _quantize_group(group, acc, config, keep, swapped, host)
                    elif groups:
                        for group, acc in zip(groups, _hessians(model, replay, groups, stop=False)):
                            _quantize_group(group, acc, config, keep, swapped, host)
                    if index < last:
                        replay.propagate()
                finally:
                    for module, original in reversed(swapped):
                        module.weight.data = original
            bar.advance(task)
    return result
