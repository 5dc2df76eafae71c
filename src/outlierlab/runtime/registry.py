"""One registry of what is installed on a model.

Everything outlierlab puts on a model (tracing hooks, tma scaling, an online Hadamard, the fp prefix, fake
quantization of weights, activations and the KV cache) is an :class:`Entry` added to the model's
:class:`Registry`. An entry declares its hooks through the :class:`Hooks` it is handed and may change other
state (swap weights, switch the attention implementation) that its ``detach`` undoes. The registry:

- registers the hooks of all entries in an explicit order (``Entry.order``, then the order of addition),
  re-registering them whenever an entry comes or goes, so a hook never depends on when it was added: at a
  module, a mitigation hook always runs before the fake quantizer, which runs before the tracing hooks that
  observe what the model now computes;
- keeps, for every forward in flight, the batch shape and window offset (:class:`BatchInfo`), read by hooks of
  families that flatten tokens to ``[batch * tokens, C]`` and by the statistics;
- removes entries on every exit path (``with installed(model, entry):``), and describes them for a manifest.

The registry of a model is found with :func:`registry` (a weak map, not an attribute of the model): a model
with nothing installed has no hooks at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: the standard stages, in the order their hooks run at a shared module
ORDER = {
    "mitigation": 20,  # tma scaling
    "rotation": 30,  # online Hadamard (after tma at y6)
    "fp_prefix": 35,  # state only
    "quant.weights": 40,
    "quant.acts": 50,
    "quant.kv": 60,
    "probe": 80,  # short-lived calibration observers (see what the installed model computes)
    "trace": 90,  # tracing and measurement observe the final tensors
}


@dataclass
class BatchInfo:
    """The forward in flight: its batch and token counts and the index of its first window in the window set."""

    batch: int = 0
    tokens: int = 0
    window0: int = 0

    def as_3d(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[batch, tokens, C]``: views a flattened ``[batch * tokens, C]`` tensor (OPT's FFN) back;
        merges trailing dimensions (per-head q/k norms: ``[B, T, heads, head_dim]``)."""
        if x.dim() == 3:
            return x
        if x.dim() == 2:
            if self.batch and x.shape[0] == self.batch * self.tokens:
                return x.view(self.batch, self.tokens, x.shape[1])
            return x.unsqueeze(0)
        return x.reshape(x.shape[0], x.shape[1], -1)

    def fit(self, factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-token ``[batch, tokens, 1]`` factors broadcast onto ``x`` (``[B, T, C]`` or flattened ``[B*T, C]``)."""
        factor = factor.to(dtype=x.dtype, device=x.device)
        return factor.reshape(-1, 1) if x.dim() == 2 else factor


class Hooks:
    """What an entry hands the registry: the hooks it wants, in the order it wants them at each module."""

    def __init__(self) -> None:
        self.decls: list[tuple[nn.Module, str, Callable]] = []

    def pre(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self.decls.append((module, "pre_kw" if with_kwargs else "pre", fn))

    def forward(self, module: nn.Module, fn: Callable) -> None:
        self.decls.append((module, "forward", fn))


class Entry:
    """Something installed on a model. Subclasses set ``name`` and ``order`` and override :meth:`attach`
    (declare hooks, change state) and :meth:`detach` (undo what is not a hook)."""

    name: str = "entry"
    order: int = 50

    def attach(self, model: nn.Module, hooks: Hooks, reg: Registry) -> None:
        """Declare hooks on ``hooks`` and apply other changes (called once, by :meth:`Registry.add`)."""

    def detach(self, model: nn.Module) -> None:
        """Undo the non-hook changes of :meth:`attach` (the registry removes the hooks)."""

    def describe(self) -> dict:
        """JSON-able description (for manifests and reports)."""
        return {"name": self.name}


@dataclass
class _Slot:
    entry: Entry
    seq: int
    hooks: Hooks


class Registry:
    """The entries installed on one model (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self._slots: list[_Slot] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seq = 0
        self.batch = BatchInfo()

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this registry no longer exists")
        return model

    # -- entries -------------------------------------------------------------------------------------------
    @property
    def entries(self) -> list[Entry]:
        return [s.entry for s in self._sorted()]

    def get(self, name: str) -> Entry | None:
        return next((s.entry for s in self._slots if s.entry.name == name), None)

    def find(self, cls: type) -> list[Entry]:
        return [s.entry for s in self._sorted() if isinstance(s.entry, cls)]

    def __contains__(self, entry: Entry) -> bool:
        return any(s.entry is entry for s in self._slots)

    def add(self, entry: Entry) -> Entry:
        """Attach ``entry`` and re-register every hook in order; on failure nothing of it stays."""
        if entry in self:
            raise ValueError(f"{entry.name} is already installed on this model")
        hooks = Hooks()
        try:
            entry.attach(self.model, hooks, self)
        except BaseException:
            entry.detach(self.model)
            raise
        self._seq += 1
        self._slots.append(_Slot(entry, self._seq, hooks))
        try:
            self._rewire()
        except BaseException:
            self.remove(entry)
            raise
        return entry

    def remove(self, entry: Entry) -> None:
        """Take ``entry`` off (idempotent): its hooks go, then its :meth:`Entry.detach` runs."""
        slot = next((s for s in self._slots if s.entry is entry), None)
        if slot is None:
            return
        self._slots.remove(slot)
        try:
            self._rewire()
        finally:
            entry.detach(self.model)

    def clear(self) -> None:
        """Remove every entry, the last added first."""
        while self._slots:
            self.remove(max(self._slots, key=lambda s: s.seq).entry)

    def describe(self) -> list[dict]:
        return [s.entry.describe() for s in self._sorted()]

    # -- state that several entries read ----------------------------------------------------------------------
    @property
    def fp_prefix(self) -> int:
        """Tokens at the start of every sequence that quantization leaves in full precision (0: none)."""
        return max((int(getattr(s.entry, "fp_prefix", 0) or 0) for s in self._slots), default=0)

    # -- hooks ---------------------------------------------------------------------------------------------
    def _sorted(self) -> list[_Slot]:
        return sorted(self._slots, key=lambda s: (s.entry.order, s.seq))

    def _record_shape(self, module, args, kwargs) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            self.batch.batch, self.batch.tokens = int(x.shape[0]), int(x.shape[1])

    def _rewire(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        if not self._slots:
            return
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._record_shape, with_kwargs=True))
        for slot in self._sorted():
            for module, kind, fn in slot.hooks.decls:
                if kind == "forward":
                    handle = module.register_forward_hook(fn)
                else:
                    handle = module.register_forward_pre_hook(fn, with_kwargs=kind == "pre_kw")
                self._handles.append(handle)


_REGISTRIES: weakref.WeakKeyDictionary[nn.Module, Registry] = weakref.WeakKeyDictionary()


def registry(model: nn.Module) -> Registry:
    """The registry of ``model`` (created empty on first use)."""
    reg = _REGISTRIES.get(model)
    if reg is None:
        reg = _REGISTRIES[model] = Registry(model)
    return reg


def install(model: nn.Module, entry: Entry) -> Entry:
    """Add ``entry`` to ``model``'s registry (remove it with :func:`uninstall` or use :func:`installed`)."""
    return registry(model).add(entry)


def uninstall(model: nn.Module, entry: Entry) -> None:
    registry(model).remove(entry)


@contextmanager
def installed(model: nn.Module, *entries: Entry) -> Iterator[Any]:
    """``with installed(model, a, b) as (a, b):`` the entries are on the model inside the block only."""
    reg = registry(model)
    done: list[Entry] = []
    try:
        for e in entries:
            done.append(reg.add(e))
        yield entries[0] if len(entries) == 1 else entries
    finally:
        for e in reversed(done):
            reg.remove(e)


class FunctionEntry(Entry):
    """An entry made of plain callbacks: ``hooks_fn(hooks)`` declares the hooks; for short-lived observers."""

    def __init__(self, name: str, order: int, hooks_fn: Callable[[Hooks], None],
                 detach_fn: Callable[[], None] | None = None, info: dict | None = None) -> None:
        self.name, self.order = name, order
        self._hooks_fn, self._detach_fn, self._info = hooks_fn, detach_fn, info or {}

    def attach(self, model, hooks, reg) -> None:
        self._hooks_fn(hooks)

    def detach(self, model) -> None:
        if self._detach_fn is not None:
            self._detach_fn()

    def describe(self) -> dict:
        return {"name": self.name, **self._info}
