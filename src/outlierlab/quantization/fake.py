"""Applying fake quantization to a model: weights replaced, linear inputs quantized by forward pre-hooks, the KV
cache by an attention wrapper; everything owned by one :class:`QuantState` that removes it.

Two steps, as in torchao's prepare/convert:

- :func:`prepare` computes, without changing the model, what will be installed: the quantized weight of every
  target linear (RTN, or GPTQ from calibration windows), the activation quantizer of its input (with the scale
  calibrated on the calibration windows for ``tensor-static``), and the KV quantizer.
- :meth:`QuantPlan.install` puts it on a model and returns a :class:`QuantState`; ``state.remove()`` (or leaving
  its ``with`` block) restores the original weights, removes the hooks and the attention wrapper, so the model is
  bit-identical to before. ``restore=False`` keeps no originals (the weights stay quantized).

Memory: a cell holds one model. The plan keeps no RTN weights (they are computed from the module's weight when
installed or read, one linear at a time, on the device the module runs on) and keeps GPTQ's results on the host.
Installing *swaps* a target's weight for a new tensor of quantized values and keeps the original object, to be put
back as it is (no copy either way), where the original may stay: a weight on the host, an offloaded weight in a
host store, and (``store="auto"``, the default) a weight on an accelerator that has room for the new tensor
(:class:`~outlierlab.runtime.journal.DeviceRoom`). Every other target gets the quantized values written *into*
its weight after a :class:`~outlierlab.runtime.journal.WeightJournal` took its original to the host
(``"auto"``, ``"cpu"``) or to disk (``"disk"``); offloaded weights are written into accelerate's store
(:mod:`outlierlab.runtime.offload`). A weight tied to another module (an lm_head sharing the embedding) is always
swapped, so the tie partner keeps its values.

:func:`quantize_` does both. Targets: the linears that the architecture adapter declares (``linears()``) in every
decoder layer; GPT-2's ``Conv1D`` weights (stored ``[in, out]``) are quantized per output column, like the
others per output row. The registry's ``fp_prefix`` (N, set by prefix-style mitigations through
:mod:`outlierlab.runtime`) is read when the plan is made: activations and KV at the first N positions of every
sequence stay in full precision and are left out of the static calibration. The installed state is a registry
entry (``quant``, after every mitigation hook) and the KV wrapper another (``quant.kv``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from typing_extensions import Self  # typing.Self needs Python 3.11

from ..adapters import get_adapter
from ..adapters.base import Adapter, LinearSpec
from ..runtime import (
    ORDER,
    BatchInfo,
    Entry,
    FunctionEntry,
    installed,
    offload,
    registry,
    run,
)
from ..runtime.journal import STORES, DeviceRoom, WeightJournal
from . import kv as kvmod
from .config import QuantConfig, QuantConfigError, get_quant
from .quantizers import (
    asym_params,
    fake_quant,
    qparams,
    quant_dynamic,
    quant_weight_as,
    sym_scale,
)


@dataclass
class Target:
    """One quantized linear: its full module name, layer (None for lm_head), role and input position."""

    name: str
    layer: int | None
    role: str
    module: nn.Module
    input_position: str
    transposed: bool = False
    alias: str | None = None

    def weight_view(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view of the module's current weight; read from accelerate's store when
        the module is offloaded)."""
        w = offload.value(self.module, "weight")
        return w.t() if self.transposed else w

    def to_storage(self, w_out_in: torch.Tensor) -> torch.Tensor:
        """A ``[out, in]`` tensor in the module's storage layout (contiguous)."""
        return (w_out_in.t() if self.transposed else w_out_in).contiguous()


def reads_logits(targets: list[Target]) -> bool:
    """Whether a pass observing ``targets`` needs the output layer on every position (it is one of them)."""
    return any(t.layer is None for t in targets)


def find_targets(model: nn.Module, config: QuantConfig, adapter: Adapter | None = None) -> list[Target]:
    """The linears ``config`` quantizes, in layer order (then lm_head when asked)."""
    adapter = adapter or get_adapter(model)
    aliases = {p.name: p.alias for p in adapter.positions()}
    specs: list[LinearSpec] = adapter.linears()
    known = {s.role for s in specs}
    if config.roles is not None:
        unknown = set(config.roles) - known
        if unknown == set(config.roles):
            raise QuantConfigError(f"roles {sorted(unknown)} match no linear of this model (it has "
                                   f"{', '.join(sorted(known))})")
        specs = [s for s in specs if s.role in config.roles]
    n = adapter.n_layers
    layers = range(n) if config.layers is None else [i for i in config.layers if 0 <= i < n]
    if config.layers is not None and not layers:
        raise QuantConfigError(f"layers {list(config.layers)} are outside 0..{n - 1}")
    out: list[Target] = []
    for i in layers:
        layer = adapter.layers()[i]
        for s in specs:
            out.append(Target(f"{adapter.layer_name(i)}.{s.module}", i, s.role, layer.get_submodule(s.module),
                              s.input_position, s.transposed, aliases.get(s.input_position)))
    if config.lm_head:
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise QuantConfigError("lm_head=True but the model has no output embedding layer")
        name = next((n for n, m in model.named_modules() if m is head), "lm_head")
        out.append(Target(name, None, "lm_head", head, "final_norm", False, None))
    return out


# -- activations ---------------------------------------------------------------------------------------------


@dataclass
class ActQuantizer:
    """Fake-quantizes the input of one linear: per token, per sequence (``tensor-dynamic``) or with a frozen
    scale (``tensor-static``). The first ``prefix`` tokens of every sequence stay in full precision."""

    bits: int
    symmetric: bool
    granularity: str
    clip: float = 1.0
    prefix: int = 0
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    shape: BatchInfo | None = field(default=None, repr=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() != 3
        x3 = (self.shape or BatchInfo()).as_3d(x)
        p = min(self.prefix, x3.shape[1])
        if self.granularity == "token":
            xq = quant_dynamic(x3, self.bits, self.symmetric, -1, self.clip)
        elif self.granularity == "tensor-dynamic" and not p:
            xq = quant_dynamic(x3, self.bits, self.symmetric, (1, 2), self.clip)
        elif self.granularity == "tensor-dynamic":
            rest = x3[:, p:]
            if rest.shape[1] == 0:
                return x
            scale, zero = qparams(rest, self.bits, self.symmetric, (1, 2), self.clip)
            xq = fake_quant(x3, scale, zero, self.bits)
        else:
            if self.scale is None:
                raise QuantConfigError("static activation scale used before calibration")
            xq = fake_quant(x3, self.scale, self.zero, self.bits)
        if p:
            xq[:, :p] = x3[:, :p]
        return xq.view(x.shape) if flat else xq

    def describe(self) -> dict:
        d = {"bits": self.bits, "symmetric": self.symmetric, "granularity": self.granularity, "clip": self.clip,
             "prefix": self.prefix}
        if self.scale is not None:
            d["scale"] = float(self.scale.reshape(-1)[0])
            if self.zero is not None:
                d["zero"] = float(self.zero.reshape(-1)[0])
        return d


class _SharedInput:
    """Linears that read the very same tensor (q, k and v; gate and up) with the same quantizer settings
    get the same quantized tensor: it is computed once, for the first of them, and reused."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.group: object = None
        self.out: torch.Tensor | None = None

    def clear(self) -> None:
        self.x = self.out = self.group = None


def _pre_hook(quantizer: ActQuantizer, group: object = None, shared: _SharedInput | None = None) -> Callable:
    def hook(module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if shared is not None and group is not None and shared.x is x and shared.group == group:
            return (shared.out, *args[1:])
        out = quantizer(x)
        if shared is not None:
            shared.x, shared.group, shared.out = x, group, out
        return (out, *args[1:])

    return hook


def _share_key(t: Target, q: ActQuantizer) -> object:
    """Targets with equal keys see the same tensor and quantize it identically (static scales of one input
    position are equal: they are the abs-max of the same tensors)."""
    if t.layer is None:
        return None
    return (t.layer, t.input_position, q.bits, q.symmetric, q.granularity, q.clip, q.prefix)


class _RangeObserver:
    """Running abs-max (or min and max) of a linear's input over calibration, prefix tokens excluded; kept on
    the device (no host sync per call)."""

    def __init__(self, prefix: int, shape: BatchInfo) -> None:
        self.prefix, self.shape = prefix, shape
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def __call__(self, module, args) -> None:
        if not args:
            return
        x3 = self.shape.as_3d(args[0].detach())
        if self.prefix:
            x3 = x3[:, self.prefix:]
        if x3.numel() == 0:
            return
        lo, hi = x3.amin().float(), x3.amax().float()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


def calibrate_static(model: nn.Module, targets: list[Target], ids: torch.Tensor, config: QuantConfig,
                     prefix: int, batch_size: int = 4, progress: bool = False) -> dict[str, ActQuantizer]:
    """Static per-tensor activation quantizers: ``scale = a_clip x abs-max`` over the calibration windows (or
    the clipped min/max, asymmetric), observed on the model as it is (its weights are not changed here)."""
    shape = registry(model).batch
    observers = {t.name: _RangeObserver(prefix, shape) for t in targets}

    def declare(hooks) -> None:
        for t in targets:
            hooks.pre(t.module, observers[t.name])

    with installed(model, FunctionEntry("quant.calibration", ORDER["probe"], declare)):
        run(model, ids, batch_size, progress=progress, description="calibrating activations", logits=reads_logits(targets))
    out = {}
    for t in targets:
        obs = observers[t.name]
        if obs.hi is None:
            raise QuantConfigError(f"{t.name} saw no input during calibration (are the windows longer than the "
                                   f"fp prefix of {prefix} tokens?)")
        if config.symmetric:
            scale, zero = sym_scale(torch.maximum(obs.hi, -obs.lo), config.a_bits, config.a_clip), None
        else:
            scale, zero = asym_params(obs.lo, obs.hi, config.a_bits, config.a_clip)
        out[t.name] = ActQuantizer(config.a_bits, config.symmetric, "tensor-static", config.a_clip, prefix,
                                   scale, zero)
    return out


#: candidate ratios of the activation clip search, times ``a_clip``
A_SEARCH_RATIOS = tuple(1 - 0.05 * i for i in range(9))


class _ClipObserver:
    """For one linear input, the output error of each candidate clip ratio: ``sum ||(x - Q_r(x)) W^T||^2`` over
    the calibration tokens (prefix tokens excluded), ``W`` the weights of the linears reading it stacked (read
    at each call, so that no copy outlives the hook); the sums stay on the device."""

    def __init__(self, group: list[Target], config: QuantConfig, prefix: int, shape: BatchInfo) -> None:
        self.group, self.prefix, self.shape = group, prefix, shape
        self.bits, self.symmetric = config.a_bits, config.symmetric
        self.dims = -1 if config.a_granularity == "token" else (1, 2)
        self.ratios = [config.a_clip * r for r in A_SEARCH_RATIOS]
        self.err: torch.Tensor | None = None

    def __call__(self, module, args) -> None:
        if not args:
            return
        x3 = self.shape.as_3d(args[0].detach()).float()[:, self.prefix:]
        if x3.numel() == 0:
            return
        w = torch.cat([t.weight_view().detach().to(x3.device, torch.float32) for t in self.group])
        gram = w.t() @ w if w.shape[0] > w.shape[1] else None  # the cheaper of e G e^T and ||e W^T||^2
        errs = []
        for r in self.ratios:
            e = (x3 - quant_dynamic(x3, self.bits, self.symmetric, self.dims, r)).flatten(0, 1)
            errs.append(((e @ gram) * e).sum() if gram is not None else (e @ w.t()).pow(2).sum())
        errs = torch.stack(errs).double()
        self.err = errs if self.err is None else self.err + errs

    def best(self) -> float:
        return self.ratios[int(torch.argmin(self.err))]


def search_act_clips(model: nn.Module, targets: list[Target], ids: torch.Tensor, config: QuantConfig,
                     prefix: int, batch_size: int = 4, progress: bool = False) -> dict[str, float]:
    """Name -> clip ratio of each target's (dynamic) activation quantizer: among ``a_clip x`` the
    :data:`A_SEARCH_RATIOS`, the one of least output error of the linears reading that input (one ratio per
    layer and input position, so q/k/v and gate/up share it), on ``ids``, observed on the model as it is."""
    groups: dict[object, list[Target]] = {}
    for t in targets:
        groups.setdefault((t.layer, t.input_position) if t.layer is not None else t.name, []).append(t)
    shape = registry(model).batch
    observers = {key: _ClipObserver(group, config, prefix, shape) for key, group in groups.items()}

    def declare(hooks) -> None:
        for key, group in groups.items():
            hooks.pre(group[0].module, observers[key])

    with installed(model, FunctionEntry("quant.clip_search", ORDER["probe"], declare)):
        run(model, ids, batch_size, progress=progress, description="searching activation clips",
            logits=reads_logits(targets))
    out = {}
    for key, group in groups.items():
        if observers[key].err is None:
            raise QuantConfigError(f"{group[0].name} saw no input during the activation clip search")
        out.update({t.name: observers[key].best() for t in group})
    return out


# -- the plan and the installed state ------------------------------------------------------------------------


class PlanWeights(Mapping):
    """Name -> quantized weight ``[out, in]`` of the plan's targets: GPTQ's results held on the host
    (``store="auto"`` or ``"cpu"``) or in temporary files, one per tensor, read back one at a time (``"disk"``);
    RTN computed from the target's current weight when read, on the device the module runs on (nothing held)."""

    def __init__(self, config: QuantConfig, targets: list[Target], store: str = "auto") -> None:
        if store not in STORES:
            raise ValueError(f"store must be one of {', '.join(STORES)}, not {store!r}")
        self.config, self.store = config, store
        self._targets = {t.name: t for t in targets}
        self._held: dict[str, torch.Tensor | str] = {}
        self._folder: str | None = None

    def hold(self, name: str, w: torch.Tensor) -> None:
        w = w.detach().to("cpu")
        if self.store != "disk":
            self._held[name] = w
            return
        import weakref

        from safetensors.torch import save_file

        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="outlierlab-plan-")
            weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        path = os.path.join(self._folder, f"{len(self._held)}.safetensors")
        save_file({"w": w.contiguous()}, path)
        self._held[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._held:
            held = self._held[name]
            if isinstance(held, str):
                from safetensors.torch import load_file

                return load_file(held)["w"]
            return held
        c, target = self.config, self._targets[name]
        w = target.weight_view().detach()
        w = w.to(offload.execution_device(target.module) or w.device)  # an offloaded weight: on its GPU
        return quant_weight_as(w, c)

    def __contains__(self, name) -> bool:
        return name in self._targets

    def __iter__(self):
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


@dataclass
class QuantPlan:
    """What :meth:`install` puts on a model: quantized weights (``[out, in]``, :class:`PlanWeights`), activation
    quantizers, the KV quantizer, the embedding module to quantize."""

    config: QuantConfig
    targets: list[Target]
    weights: Mapping = field(default_factory=dict)
    acts: dict[str, ActQuantizer] = field(default_factory=dict)
    kv: kvmod.KVQuantizer | None = None
    embedding: nn.Module | None = None
    prefix: int = 0
    info: dict = field(default_factory=dict)

    def install(self, model: nn.Module, restore: bool = True, store: str = "auto") -> QuantState:
        """Put the plan on ``model`` (the model it was prepared on), as registry entries. ``restore=False``
        keeps no originals (the state then cannot give them back); ``store``: where the originals wait (see the
        module docstring): ``auto``, ``cpu`` or ``disk``."""
        state = QuantState(model, self.config, self, restore, store)
        reg = registry(model)
        try:
            reg.add(state)
            if self.kv is not None:
                state.kv_entry = reg.add(kvmod.KVEntry(self.kv, self.config.layers))
        except BaseException:
            state.remove()
            raise
        return state


def _shared(model: nn.Module, modules: list[nn.Module]) -> set[int]:
    """ids of the modules among ``modules`` whose weight object another module also holds (tied weights)."""
    holders: dict[int, int] = {}
    for m in model.modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None:
            holders[id(w)] = holders.get(id(w), 0) + 1
    return {id(m) for m in modules if holders.get(id(m._parameters.get("weight")), 0) > 1}


class QuantState(Entry):
    """The fake quantization installed on a model (registry entry ``quant``; the KV wrapper is the entry
    ``quant.kv``); ``remove()`` (idempotent) or the ``with`` block's end undoes it all. ``restore=False`` states
    only remove hooks and the attention wrapper (weights stay quantized)."""

    name = "quant"
    order = ORDER["quant.acts"]

    def __init__(self, model: nn.Module, config: QuantConfig, plan: QuantPlan, restore: bool,
                 store: str = "auto") -> None:
        self.model, self.config, self.plan, self.restore, self.store = model, config, plan, restore, store
        self._undo: list[Callable[[], None]] = []  # one per swapped weight, run in reverse by detach
        self._folder: str | None = None  # the quantized values of swapped offload files
        self._journal: WeightJournal | None = None
        self.kv_entry: Entry | None = None
        self.active = True

    def _weights(self) -> list[tuple[nn.Module, Callable[[], torch.Tensor]]]:
        """(module, storage-layout quantized weight, computed when called) of every weight the plan replaces."""
        plan, out = self.plan, []
        for t in plan.targets:
            if t.name in plan.weights:
                out.append((t.module, lambda t=t: t.to_storage(plan.weights[t.name])))
        if plan.embedding is not None:
            c, emb = self.config, plan.embedding
            out.append((emb, lambda: quant_weight_as(offload.value(emb, "weight").detach(), c, "channel")))
        return out

    def attach(self, model: nn.Module, hooks, reg) -> None:
        plan = self.plan
        edits = self._weights()
        swap = self._swapped(model, [m for m, _ in edits])
        if self.restore:
            self._journal = WeightJournal(model, "cpu" if self.store == "auto" else self.store,
                                          modules=[m for m, _ in edits if id(m) not in swap])
            self._journal.snapshot()
        with torch.no_grad():
            for module, quantized in edits:
                q = quantized()
                how = swap.get(id(module))
                if how == "param":  # a new Parameter; the original object waits where it is
                    old = module.weight
                    module.weight = nn.Parameter(q.to(device=old.device, dtype=old.dtype), requires_grad=False)
                    self._undo.append(lambda module=module, old=old: setattr(module, "weight", old))
                elif how == "offload":  # a new host-store tensor or file; the original stays as it is
                    undo = offload.swap(module, "weight", q, self._swap_folder, self.store != "disk")
                    if undo is None:
                        raise RuntimeError(f"offloaded weight of {type(module).__name__} could not be swapped")
                    self._undo.append(undo)
                elif offload.hook_of(module) is not None and module.weight.device.type == "meta":
                    offload.write(module, "weight", q)
                else:
                    module.weight.data.copy_(q.to(device=module.weight.device, dtype=module.weight.dtype))
        if plan.acts:
            shared = _SharedInput()
            hooks.pre(model, lambda m, a, k: shared.clear(), with_kwargs=True)
            hooks.forward(model, lambda m, a, o: shared.clear())
            for t in plan.targets:
                q = plan.acts.get(t.name)
                if q is not None:
                    q.shape = reg.batch
                    hooks.pre(t.module, _pre_hook(q, _share_key(t, q), shared))

    def _swap_folder(self) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="outlierlab-quant-")
        return self._folder

    def _swapped(self, model: nn.Module, modules: list[nn.Module]) -> dict[int, str]:
        """Which weights are swapped rather than journaled: ``{id(module): "param" | "offload"}``."""
        tied = _shared(model, modules)
        if not self.restore:
            return dict.fromkeys(tied, "param")
        room = DeviceRoom() if self.store == "auto" else None
        out: dict[int, str] = {}
        for m in modules:
            w = m._parameters.get("weight")
            if id(m) in tied:
                out[id(m)] = "param"
            elif offload.hook_of(m) is not None and w is not None and w.device.type == "meta":
                if offload.swappable(m, "weight", host=self.store != "disk"):
                    out[id(m)] = "offload"
            elif w is not None and self.store != "disk" and (w.device.type == "cpu" or (room and room.take(w))):
                out[id(m)] = "param"
        return out

    def detach(self, model: nn.Module) -> None:
        while self._undo:
            self._undo.pop()()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        if self._journal is not None:
            self._journal.restore()
            self._journal.close()
            self._journal = None

    def remove(self) -> None:
        reg = registry(self.model)
        if self.kv_entry is not None:
            reg.remove(self.kv_entry)
            self.kv_entry = None
        reg.remove(self)
        self.detach(self.model)
        self.active = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def info(self) -> dict:
        return self.plan.info

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.to_dict(), "summary": self.config.describe(),
                **self.plan.info}


def _calib_ids(calib, config: QuantConfig) -> torch.Tensor:
    if calib is None:
        raise QuantConfigError(f"quantization {config.name!r} needs calibration windows (static activation "
                               "scales, the activation clip search or GPTQ): pass calib=")
    ids = getattr(calib, "input_ids", calib)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise QuantConfigError("calibration windows must be Windows or a [n, T] LongTensor of token ids")
    return ids[: config.calib_samples] if config.calib_samples else ids


@torch.no_grad()
def prepare(model: nn.Module, config: QuantConfig | str, calib=None, *, batch_size: int = 4,
            progress: bool = False, store: str = "cpu") -> QuantPlan:
    """Compute what fake quantization installs (see module docstring); the model is left as it was. ``store``:
    where GPTQ's results wait until installed, ``cpu`` (host memory, 1x the target linears) or ``disk``."""
    config = get_quant(config)
    adapter = get_adapter(model)
    prefix = registry(model).fp_prefix
    targets = find_targets(model, config, adapter) if (config.quantizes_weights or
                                                        config.quantizes_activations) else []
    plan = QuantPlan(config, targets, prefix=prefix)
    t0 = time.perf_counter()
    if config.quantizes_weights:
        plan.weights = PlanWeights(config, targets, store)
        if config.w_method == "gptq":
            from .gptq import gptq_weights

            ids = _calib_ids(calib, config)
            # gptq swaps weights during its replay: offloaded ones are opened on the host for it, and it runs
            # them there (its Hessians and weights then share a device; a no-op on a model in memory)
            with offload.writable(model, stream=False):
                gptq_weights(model, adapter, [t for t in targets if t.layer is not None], ids, config,
                             batch_size, progress, keep=plan.weights.hold)
        if config.embeddings:
            plan.embedding = model.get_input_embeddings()
    plan.info["weights_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if config.quantizes_activations:
        if config.a_granularity == "tensor-static":
            ids = _calib_ids(calib, config)[: config.a_calib_samples]
            plan.acts = calibrate_static(model, targets, ids, config, prefix, batch_size, progress)
        else:
            clips = {}
            if config.a_clip_search:
                ids = _calib_ids(calib, config)[: config.a_calib_samples]
                clips = search_act_clips(model, targets, ids, config, prefix, batch_size, progress)
                plan.info["a_clips"] = {"min": min(clips.values()), "max": max(clips.values()),
                                        "mean": sum(clips.values()) / len(clips)}
            plan.acts = {t.name: ActQuantizer(config.a_bits, config.symmetric, config.a_granularity,
                                              clips.get(t.name, config.a_clip), prefix) for t in targets}
    plan.info["activations_s"] = time.perf_counter() - t1
    if config.quantizes_kv:
        plan.kv = kvmod.KVQuantizer(config.kv_bits, config.kv_symmetric, config.kv_clip, prefix)
    plan.info.update({"n_linears": len(targets), "fp_prefix": prefix})
    return plan


def quantize_(model: nn.Module, config: QuantConfig | str, calib=None, *, restore: bool = True,
              batch_size: int = 4, progress: bool = False, store: str = "cpu") -> QuantState:
    """Fake-quantize ``model`` in place; returns the :class:`QuantState` that undoes it (``remove()`` or
    ``with quantize_(...):``). ``calib`` (Windows or ids) is needed for static scales and GPTQ; ``store``: where
    the original weights wait (``cpu`` or ``disk``)."""
    return prepare(model, config, calib, batch_size=batch_size, progress=progress).install(model, restore, store)


def static_scales(state_or_plan) -> dict[str, float]:
    """Name -> calibrated static activation scale (for reports and tests)."""
    plan = getattr(state_or_plan, "plan", state_or_plan)
    return {name: float(q.scale.reshape(-1)[0]) for name, q in plan.acts.items() if q.scale is not None}
