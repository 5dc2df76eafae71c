"""Weights that accelerate offloaded: read and write them where they live.

A module placed by accelerate with CPU or disk offload holds ``meta`` tensors; its ``AlignDevicesHook`` loads the
values from ``hook.weights_map`` (a host state dict, or ``.dat`` / safetensors files on disk) before each forward
and drops them after. An edit of such a weight must land in that store, or the next forward loads the old value.

- :func:`read` / :func:`write`: one tensor of one offloaded module, from / into its store. Host stores are
  written in place; disk stores get a ``.dat`` file in the offload folder (a weight read from the checkpoint's own
  safetensors file is redirected to a new ``.dat`` file: input model files are never written).
- :func:`writable`: inside the block every offloaded tensor under a module is a real tensor on the host, which
  methods read, edit in place or replace like any weight. Forwards meanwhile run each module on its execution
  device with a copy of its current host tensors made for the call (``stream=True``, the default: calibration
  inside the block sees the edits, at the speed of the accelerator; the copy is differentiable, so fine-tuning
  reaches the host tensors), or run the module on the host (``stream=False``). At the end each tensor is written
  back to its store and the module is offloaded again. Tensors of a host store are used as they are (no copy:
  edits land in the store); those of a disk store are read into host memory for the duration of the block.

A model that is not offloaded passes through all of these unchanged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator

import torch
from torch import nn


def hook_of(module: nn.Module):
    """The module's accelerate hook when it offloads the module's weights, else None."""
    hook = getattr(module, "_hf_hook", None)
    return hook if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None else None


def is_offloaded(model: nn.Module) -> bool:
    return any(hook_of(m) is not None for m in model.modules())


def execution_device(module: nn.Module) -> torch.device | None:
    """The device an offloaded module runs on (None when it is not offloaded)."""
    hook = hook_of(module)
    return None if hook is None else torch.device(_device_name(hook.execution_device))


def offloaded_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hook_of(m) is not None]


def names(module: nn.Module) -> list[str]:
    """The tensor names (``weight``, ``bias``, buffers when they are offloaded too) the hook keeps in its store."""
    from accelerate.utils.modeling import named_module_tensors

    hook = module._hf_hook
    return [n for n, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                               recurse=hook.place_submodules, remove_non_persistent=True)]


def _store(module: nn.Module, name: str):
    """(the mapping that really holds the tensor, its key there), through accelerate's prefixed views."""
    from accelerate.utils.offload import PrefixedDataset

    table, key = module._hf_hook.weights_map, name
    while isinstance(table, PrefixedDataset):
        table, key = table.dataset, table.prefix + key
    return table, key


def host_entry(module: nn.Module, name: str):
    """(table, key, tensor) when the offloaded tensor lives in a host table (the tensor object is what forwards
    load; the journal puts the very object back), None when it lives in a file."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    table, key = _store(module, name)
    if isinstance(table, OffloadedWeightsLoader):
        table = table.state_dict
    return (table, key, table[key]) if key in table else None


def file_entry(module: nn.Module, name: str):
    """(loader, key) when the offloaded tensor lives in a file (a ``.dat`` file or a safetensors file), else None."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    table, key = _store(module, name)
    if isinstance(table, OffloadedWeightsLoader) and key not in table.state_dict and key in table.index:
        return table, key
    return None


def swap(module: nn.Module, name: str, value: torch.Tensor, folder: Callable[[], str],
         host: bool = True) -> Callable[[], None] | None:
    """Put ``value`` in place of the offloaded tensor ``name`` without touching the original, and return the
    undo: an entry of a host store gets a new tensor (``host``; the original object is put back), an entry held
    in a file is pointed at a new safetensors file in ``folder()`` (the original file is never written). None
    when ``name`` has no such entry (nothing is changed then)."""
    if hook_of(module) is None:
        return None
    table, key = _store(module, name)
    if host and (entry := host_entry(module, name)) is not None:
        store, key, old = entry
        store[key] = value.to(device=old.device, dtype=old.dtype)
        return lambda: store.__setitem__(key, old)
    if file_entry(module, name) is None:
        return None
    old = table.index[key]
    dtype = getattr(torch, old["dtype"]) if "dtype" in old else value.dtype
    where = folder()
    new = {"safetensors_file": os.path.join(where, f"{len(os.listdir(where))}.safetensors"), "weight_name": "w",
           "dtype": str(dtype).replace("torch.", ""), "shape": list(value.shape), "swapped": True}
    _save_swap(new, value)
    table.index[key] = new
    return lambda: table.index.__setitem__(key, old)


def swappable(module: nn.Module, name: str, host: bool = True) -> bool:
    """Whether :func:`swap` can replace the offloaded tensor ``name`` (a host entry only when ``host``)."""
    if hook_of(module) is None or name not in names(module):
        return False
    return (host and host_entry(module, name) is not None) or file_entry(module, name) is not None


def _save_swap(entry: dict, value: torch.Tensor) -> None:
    from safetensors.torch import save_file

    dtype = getattr(torch, entry["dtype"])
    save_file({"w": value.detach().to(device="cpu", dtype=dtype).contiguous()}, entry["safetensors_file"])


def read(module: nn.Module, name: str) -> torch.Tensor:
    """The stored value of an offloaded tensor (for a host store, the stored tensor itself: do not edit it
    unless the edit is meant for the store)."""
    return module._hf_hook.weights_map[name]


def value(module: nn.Module, name: str) -> torch.Tensor | None:
    """The module's tensor ``name`` (``weight``, ``bias``) with its data: read from the store when accelerate
    offloaded it (a hook reading a weight after the forward, when the module holds meta tensors again)."""
    t = getattr(module, name, None)
    if t is not None and t.device.type == "meta" and hook_of(module) is not None and name in names(module):
        return read(module, name)
    return t


@torch.no_grad()
def write(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Store ``value`` as the offloaded tensor ``name`` of ``module`` (same dtype as stored)."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    table, key = _store(module, name)
    value = value.detach()
    if isinstance(table, OffloadedWeightsLoader):
        if key in table.state_dict:
            _put(table.state_dict, key, value)
        elif table.index.get(key, {}).get("swapped"):  # edits of a swapped entry stay in its new file
            _save_swap(table.index[key], value)
        elif not _same(table, key, value):  # a file is rewritten only when its values change
            _write_dat(table, key, value)
        return
    _put(table, key, value)


def _put(table, key: str, value: torch.Tensor) -> None:
    old = table.get(key)
    if old is not None and old.data_ptr() == value.data_ptr() and old.shape == value.shape:
        return  # the stored tensor itself was edited
    # in place, unless another key holds the same tensor (tied weights: the partner keeps its values)
    tied = old is not None and any(v.data_ptr() == old.data_ptr() for k, v in table.items() if k != key)
    if old is not None and not tied and old.shape == value.shape and old.dtype == value.dtype:
        old.copy_(value)
    else:
        table[key] = value.to(device="cpu" if old is None else old.device,
                              dtype=value.dtype if old is None else old.dtype, copy=True)


def _same(loader, key: str, value: torch.Tensor) -> bool:
    """Whether the file behind ``loader[key]`` already holds ``value`` (read back through a memory map: a scope
    or journal closing over a method that edited a few tensors leaves the others' files as they are)."""
    if key not in loader.index:
        return False
    stored = loader[key]
    return stored.shape == value.shape and stored.dtype == value.dtype and torch.equal(stored, value.cpu())


def _write_dat(loader, key: str, value: torch.Tensor) -> None:
    from accelerate.utils.offload import offload_weight

    info = loader.index.get(key, {})
    dtype = getattr(torch, info["dtype"]) if "dtype" in info else value.dtype
    if loader.save_folder is None:  # every entry points into checkpoint files: a folder of our own
        loader.save_folder = tempfile.mkdtemp(prefix="outlierlab-offload-")
    # index[key] becomes a .dat entry (a checkpoint-file entry is redirected, never written)
    offload_weight(value.to(device="cpu", dtype=dtype), key, loader.save_folder, loader.index)
    if key not in loader.all_keys:
        loader.all_keys.append(key)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, value.device, value=value)


@contextlib.contextmanager
def writable(root: nn.Module, write_back: bool = True, stream: bool = True) -> Iterator[nn.Module]:
    """Offloaded tensors under ``root`` as real host tensors inside the block (see the module docstring).
    ``write_back=False``: for readers whose edits are undone inside the block (explain's ablations); the
    stores are left as they were. ``stream=False``: forwards run the opened modules on the host."""
    mods = [m for m in root.modules() if hook_of(m) is not None]
    opened: list[tuple[nn.Module, object, list[str], object]] = []
    try:
        for m in mods:
            hook, keys = m._hf_hook, names(m)
            opened.append((m, hook.execution_device, keys, m.__dict__.get("forward")))
            for name in keys:
                value = read(m, name)
                _set(m, name, value if value.device.type == "cpu" else value.to("cpu"))
            hook.offload = False
            if stream:
                m.forward = _streamed(m, keys, torch.device(_device_name(hook.execution_device)), m.forward)
            else:
                hook.execution_device = torch.device("cpu")
        yield root
    finally:
        from accelerate.utils import set_module_tensor_to_device

        with torch.no_grad():
            for m, device, keys, forward in reversed(opened):
                hook = m._hf_hook
                hook.offload, hook.execution_device = True, device
                if stream:
                    if forward is None:
                        m.__dict__.pop("forward", None)
                    else:
                        m.forward = forward
                for name in keys:
                    t = _tensor(m, name)
                    if t is not None and t.device.type != "meta":
                        if write_back:
                            write(m, name, t)
                        set_module_tensor_to_device(m, name, "meta")


def _device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _streamed(module: nn.Module, keys: list[str], device: torch.device, forward):
    """``forward`` with the module's tensors ``keys`` replaced, for the call, by copies on ``device`` made from
    their current host values (always a copy, also on the host, so the CPU lane runs this path too)."""

    def call(*args, **kwargs):
        held = [(owner, leaf, t) for owner, leaf, t in (_slot(module, k) for k in keys) if t is not None]
        try:
            for owner, leaf, t in held:
                _place(owner, leaf, t.to(device, copy=True))
            return forward(*args, **kwargs)
        finally:
            for owner, leaf, t in held:
                _place(owner, leaf, t)

    return call


def _slot(module: nn.Module, name: str) -> tuple[nn.Module, str, torch.Tensor | None]:
    owner, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner) if owner else module
    return owner, leaf, getattr(owner, leaf, None)


def _place(owner: nn.Module, leaf: str, t: torch.Tensor) -> None:
    """Put ``t`` in the parameter or buffer slot ``leaf`` without the checks of ``setattr`` (a copy made for one
    forward is a plain, possibly non-leaf, tensor)."""
    (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = t


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf, None)


def dat_path(module: nn.Module, name: str) -> str | None:
    """The ``.dat`` file holding an offloaded tensor on disk (None for a host store): for tests and docs."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    table, key = _store(module, name)
    if isinstance(table, OffloadedWeightsLoader) and key not in table.state_dict and table.save_folder:
        return os.path.join(table.save_folder, f"{key}.dat")
    return None
