"""Undo for weight transforms without a second model in accelerator memory.

:class:`WeightJournal` keeps the originals of a model's parameters and buffers (their values, the Parameter
objects themselves, and the config) on the host or on disk while a transform edits the model in place, and
puts them back bit for bit: ``with WeightJournal(model): mitigate(...); evaluate(...)``. Compare uses it
instead of a deep copy per method, so the accelerator holds one model whatever the number of methods; fake
quantization uses one on just its target linears (``modules=``).

``store="auto"`` (the default) keeps the originals of tensors on an accelerator beside them, on that device, while
it has room for them (:class:`DeviceRoom`: a copy within the device is hundreds of times faster than one to the
host; on a 13B model in bf16 on an H200 the host journal of one quantized cell took 14 s) and the rest on the
host; ``store="cpu"`` keeps one host copy of everything; ``store="disk"`` writes them to temporary safetensors
files, one tensor at a time, and reads them back one at a time (host memory stays at one tensor). Weights that
accelerate offloaded (meta tensors whose values live in the hook's store, on the host or on disk) are read from
that store and written back into it (:mod:`outlierlab.runtime.offload`).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from typing_extensions import Self

from . import offload

STORES = ("auto", "cpu", "disk")


class DeviceRoom:
    """How many more bytes an accelerator may take for kept originals: what the allocator can still give
    (the driver's free memory plus the allocator's unused cache, within a per-process memory fraction) less a
    reserve for activations (``reserve`` of the device's memory, at least 2 GiB). The CPU never has room here:
    a host tensor's original is a host copy anyway."""

    def __init__(self, reserve: float = 0.15) -> None:
        self.reserve = reserve
        self._left: dict[torch.device, int] = {}

    def take(self, t: torch.Tensor) -> bool:
        dev = t.device
        if dev.type != "cuda":
            return False
        if dev not in self._left:
            free, total = torch.cuda.mem_get_info(dev)
            cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
            limit = total * torch.cuda.get_per_process_memory_fraction(dev) - torch.cuda.memory_allocated(dev)
            self._left[dev] = int(min(free + cached, limit) - max(2 * 2**30, self.reserve * total))
        n = t.numel() * t.element_size()
        if n > self._left[dev]:
            return False
        self._left[dev] -= n
        return True


class WeightJournal:
    """Snapshot of every parameter and buffer of ``model`` (or only the direct ones of ``modules``; see the
    module docstring); ``restore()`` or the end of the ``with`` block puts them back, on every exit path."""

    def __init__(self, model: nn.Module, store: str = "auto", modules=None) -> None:
        if store not in STORES:
            raise ValueError(f"store must be one of {', '.join(STORES)}, not {store!r}")
        self.model, self.store = model, store
        self.modules = None if modules is None else list(modules)
        self._slots: list[tuple[nn.Module, str, str, torch.Tensor | None, str]] = []  # module, name, kind, obj, key
        self._values: dict[str, torch.Tensor] = {}
        self._files: dict[str, str] = {}
        self._held: dict = {}  # key -> (table, key there, tensor) of offloaded tensors kept in host tables
        self._room = DeviceRoom() if store == "auto" else None
        self._folder: Path | None = None
        self._config = None
        self._taken = False

    def __enter__(self) -> Self:
        self.snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
        self.close()

    def _named(self):
        if self.modules is None:
            yield from self.model.named_modules()
            return
        names = {id(m): n for n, m in self.model.named_modules()}
        for m in self.modules:
            yield names.get(id(m), f"<{id(m)}>"), m

    def _entries(self):
        """(key, module, name, kind, tensor): kind ``param``/``buffer`` for resident tensors, ``offload`` for
        those accelerate keeps in a store (tensor None: read on demand)."""
        for mod_name, module in self._named():
            stored = set(offload.names(module)) if offload.hook_of(module) is not None else set()
            for name in sorted(stored):
                yield f"{mod_name}.{name}" if mod_name else name, module, name, "offload", None
            for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
                for name, t in table.items():
                    if t is not None and t.device.type != "meta" and name not in stored:
                        yield f"{mod_name}.{name}" if mod_name else name, module, name, kind, t

    @torch.no_grad()
    def snapshot(self) -> None:
        if self.modules is None:
            self._config = copy.deepcopy(self.model.config)
        self._taken = True
        if self.store == "disk":
            self._folder = Path(tempfile.mkdtemp(prefix="outlierlab-journal-"))
        seen: dict[int, str] = {}
        for key, module, name, kind, t in self._entries():
            if t is not None and id(t) in seen:  # tied weights: one copy
                self._slots.append((module, name, kind, t, seen[id(t)]))
                continue
            if t is not None:
                seen[id(t)] = key
            else:  # offloaded: a host store's tensor object is put back like a Parameter (ties in the store)
                self._held[key] = offload.host_entry(module, name)
            self._slots.append((module, name, kind, t, key))
            value = offload.read(module, name) if t is None else t
            beside = self._room is not None and self._room.take(value)
            self._keep(key, value.detach().to("cpu" if not beside else value.device, copy=True).contiguous())

    def _keep(self, key: str, value: torch.Tensor) -> None:
        if self.store != "disk":
            self._values[key] = value
            return
        from safetensors.torch import save_file

        path = str(self._folder / f"{len(self._files)}.safetensors")
        save_file({"t": value}, path)
        self._files[key] = path

    def _read(self, key: str) -> torch.Tensor:
        if self.store != "disk":
            return self._values[key]
        from safetensors.torch import load_file

        return load_file(self._files[key])["t"]

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original Parameter/buffer object back in its place and its values back into it."""
        if not self._taken:
            return
        for module, name, kind, t, _ in self._slots:
            if t is None:
                continue
            table = module._parameters if kind == "param" else module._buffers
            if table.get(name) is not t:
                table[name] = t
        for table, key, t in filter(None, self._held.values()):
            if table.get(key) is not t:
                table[key] = t
        done = set()
        for module, name, kind, t, key in self._slots:
            if key in done:
                continue
            done.add(key)
            value = self._read(key)
            if t is not None:
                t.data.copy_(value.to(device=t.device, dtype=t.dtype))
                continue
            held = self._held.get(key)
            if held is not None:  # in place: a tie partner holding the same tensor gets its original too
                held[2].copy_(value.to(dtype=held[2].dtype))
            else:
                offload.write(module, name, value)
            live = getattr(module, name, None)
            if live is not None and live.device.type != "meta":  # the module is materialized right now
                live.data.copy_(value.to(device=live.device, dtype=live.dtype))
        if self._config is not None:
            for key, value in vars(self._config).items():
                if getattr(self.model.config, key, None) != value:
                    setattr(self.model.config, key, copy.deepcopy(value))

    def close(self) -> None:
        """Drop the originals (after the last :meth:`restore`)."""
        self._values = {}
        self._files = {}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
