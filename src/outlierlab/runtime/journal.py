"""Undo for weight transforms without a second model in accelerator memory.

:class:`WeightJournal` keeps the originals of a model's parameters and buffers (their values, the Parameter
objects themselves, and the config) on the host or on disk while a transform edits the model in place, and
puts them back bit for bit: ``with WeightJournal(model): mitigate(...); evaluate(...)``. Compare uses it
instead of a deep copy per method, so the accelerator holds one model whatever the number of methods.

``store="cpu"`` keeps one host copy of the weights; ``store="disk"`` writes them to a temporary safetensors
file and reads them back one tensor at a time (host memory stays at one model). Offloaded weights (on the meta
device, kept by accelerate on the CPU or on disk) are skipped: transforms do not edit them here.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from typing_extensions import Self


class WeightJournal:
    """Snapshot of every parameter and buffer of ``model`` (see the module docstring); ``restore()`` or the
    end of the ``with`` block puts them back, on every exit path."""

    def __init__(self, model: nn.Module, store: str = "cpu") -> None:
        if store not in ("cpu", "disk"):
            raise ValueError(f"store must be 'cpu' or 'disk', not {store!r}")
        self.model, self.store = model, store
        self._slots: list[tuple[nn.Module, str, str, torch.Tensor]] = []  # (module, name, kind, original object)
        self._values: dict[str, torch.Tensor] = {}
        self._folder: Path | None = None
        self._config = None

    def __enter__(self) -> Self:
        self.snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
        self.close()

    def _entries(self):
        for mod_name, module in self.model.named_modules():
            for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
                for name, t in table.items():
                    if t is not None and t.device.type != "meta":
                        yield f"{mod_name}.{name}" if mod_name else name, module, name, kind, t

    @torch.no_grad()
    def snapshot(self) -> None:
        self._config = copy.deepcopy(self.model.config)
        values, seen = {}, {}
        for key, module, name, kind, t in self._entries():
            self._slots.append((module, name, kind, t))
            if id(t) in seen:  # tied weights: one copy
                continue
            seen[id(t)] = key
            values[key] = t.detach().to("cpu", copy=True).contiguous()
        self._keys = seen
        if self.store == "cpu":
            self._values = values
            return
        from safetensors.torch import save_file

        self._folder = Path(tempfile.mkdtemp(prefix="outlierlab-journal-"))
        save_file(values, str(self._folder / "originals.safetensors"))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original Parameter/buffer object back in its place and its values back into it."""
        if self._config is None:
            return
        for module, name, kind, t in self._slots:
            table = module._parameters if kind == "param" else module._buffers
            if table.get(name) is not t:
                table[name] = t
        if self.store == "cpu":
            self._copy_back(lambda key: self._values[key])
        else:
            from safetensors import safe_open

            with safe_open(str(self._folder / "originals.safetensors"), framework="pt") as f:
                self._copy_back(f.get_tensor)
        for key, value in vars(self._config).items():
            if getattr(self.model.config, key, None) != value:
                setattr(self.model.config, key, copy.deepcopy(value))

    def _copy_back(self, read) -> None:
        done = set()
        for _, _, _, t in self._slots:
            if id(t) in done:
                continue
            done.add(id(t))
            t.data.copy_(read(self._keys[id(t)]).to(device=t.device, dtype=t.dtype))

    def close(self) -> None:
        """Drop the originals (after the last :meth:`restore`)."""
        self._values = {}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
