"""The routine that attaches one callback per adapter position (to a registry entry's hooks, or to a
:class:`HookSet`: a context manager that removes its handles on any exit, for hooks on a bare module), and
:func:`observe`, which runs windows with such a callback installed on the model's registry."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..adapters.base import Adapter, Position
from ..runtime import ORDER, FunctionEntry, installed, run

PositionCallback = Callable[[int, str, torch.Tensor], None]


class HookSet:
    """A context manager owning forward hooks; ``with HookSet() as hooks: ...`` removes them on any exit."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def forward(self, module: nn.Module, fn: Callable, **kwargs) -> None:
        self._handles.append(module.register_forward_hook(fn, **kwargs))

    def pre(self, module: nn.Module, fn: Callable, **kwargs) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, **kwargs))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    return None


def attach_positions(
    hooks: HookSet,
    adapter: Adapter,
    callback: PositionCallback,
    layers: Iterable[int] | None = None,
    positions: Iterable[str] | None = None,
) -> list[Position]:
    """Register hooks so that ``callback(layer, position_name, tensor)`` runs for every traced tensor.

    Positions with ``same_as`` are not hooked (they share the other position's tensor). Positions reading
    the same module and side share one hook. Returns the positions that are traced.
    """
    wanted = None if positions is None else set(positions)
    traced = [
        p for p in adapter.positions() if p.capture is not None and (wanted is None or p.name in wanted)
    ]
    groups: dict[tuple[str, str], list[Position]] = defaultdict(list)
    for p in traced:
        groups[(p.capture.module, p.capture.kind)].append(p)

    all_layers = adapter.layers()
    for index in range(len(all_layers)) if layers is None else layers:
        layer = all_layers[index]
        for (module_path, kind), group in groups.items():
            module = layer.get_submodule(module_path) if module_path else layer
            plan = [(p.name, p.capture.select) for p in group]

            def emit(x, index=index, plan=plan):
                if x is None:
                    return
                for name, select in plan:
                    callback(index, name, select(x) if select is not None else x)

            if kind == "output":
                hooks.forward(module, lambda m, args, out, emit=emit: emit(_first_tensor(out)))
            else:
                hooks.pre(
                    module,
                    lambda m, args, kwargs, emit=emit: emit(
                        _first_tensor(args) if args else kwargs.get("hidden_states")
                    ),
                    with_kwargs=True,
                )
    return traced


def observe(model: nn.Module, adapter: Adapter, callback: PositionCallback, windows, *,
            layers: Iterable[int] | None = None, positions: Iterable[str] | None = None, batch_size: int = 4) -> None:
    """Run ``windows`` through ``model`` (the runtime's loop) with ``callback(layer, position, tensor)`` on
    every traced tensor, as a registry entry after every other one (it sees what the model now computes)."""
    entry = FunctionEntry("observe", ORDER["trace"],
                          lambda hooks: attach_positions(hooks, adapter, callback, layers, positions))
    with installed(model, entry):
        run(model, windows, batch_size, logits=False)
