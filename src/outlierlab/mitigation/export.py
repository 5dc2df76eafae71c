"""Save a mitigated model as a standard Hugging Face checkpoint, and load it back with its runtime parts.

:func:`save` writes ``DIR/`` with ``model.safetensors`` + ``config.json`` (+ generation config) + the tokenizer
files, exactly what ``AutoModelForCausalLM.from_pretrained(DIR)`` reads with no outlierlab code, and
``outlierlab.json``: the methods applied (configs, whether each is exact), and for runtime methods (tma,
prefix, rotate's online Hadamard) the parameters that :func:`load` uses to re-install their hooks or
attributes. ``runtime_required`` in that file says whether plain ``transformers`` alone computes the
mitigated function (weight-only transforms: gamma fold, smoothquant, rotate, closed-form otc) or whether the
runtime parts must be restored with ``outlierlab.load(DIR)`` (for tma and prefix the plain load is the
weight-transformed model without them; with an online Hadamard the plain load is wrong, since the down
projections expect a rotated input).

Writing goes to a temporary folder beside ``DIR`` and is renamed into place: a crash or Ctrl-C leaves no
half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ModelNotFound
from ..paths import atomic_folder, atomic_write_json
from .base import MitigationError

MANIFEST = "outlierlab.json"
SCHEMA_VERSION = "1.0"


def _version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("outlierlab")
    except md.PackageNotFoundError:
        return None


def manifest(result) -> dict:
    runtime = [a for a in result.applied if "runtime" in a]
    online = any(a["method"] == "rotate" and "online_hadamard" in (a.get("runtime") or {}) for a in runtime)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "mitigated_checkpoint",
        "outlierlab_version": _version(),
        "methods": [{"method": a["method"], "config": a["config"], "exact": a["exact"],
                     **({"runtime": a["runtime"]} if "runtime" in a else {})} for a in result.applied],
        "exact": result.exact,
        "runtime_entries": [e.describe() for e in result.entries],
        "runtime_required": bool(runtime),
        "plain_transformers": (
            "wrong without outlierlab.load: the down projections expect an online-Hadamard-rotated input" if online
            else "the weight transforms only; runtime parts need outlierlab.load" if runtime
            else "complete: this is the mitigated model"
        ),
        "load_with": "outlierlab.load(DIR)" if runtime else "AutoModelForCausalLM.from_pretrained(DIR)",
    }


def save(model, tokenizer, result, out_dir: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write the checkpoint folder ``out_dir`` (see the module docstring); returns its path."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists")
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file()):
            raise MitigationError(f"{out_dir} exists and is not an outlierlab export; refusing to replace it")
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST, manifest(result))
    return out_dir


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def restore_runtime(model, man: dict):
    """Re-install the runtime parts listed in a manifest on ``model``; returns a :class:`MitigationResult`."""
    from . import MitigationResult, runtime_entry

    result = MitigationResult(model)
    try:
        for entry in man.get("methods", []):
            result.applied.append(dict(entry))
            if "runtime" in entry:
                result.install(entry["method"], runtime_entry(entry["method"], entry["runtime"]))
    except BaseException:
        result.remove()
        raise
    return result


def load(folder: str | os.PathLike, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """Load a checkpoint written by :func:`save` with its runtime parts restored.

    Returns a :class:`~outlierlab.models.loader.LoadedModel`; the restored parts are ``lm.mitigation`` (a
    ``MitigationResult`` whose ``.remove()`` takes them off the model's registry again).
    """
    from ..models.loader import load_model

    folder = Path(folder)
    man = read_manifest(folder)
    if man is None:
        raise ModelNotFound(f"{folder} has no {MANIFEST}: not a checkpoint written by outlierlab mitigate --export")
    lm = load_model(str(folder), device, dtype)
    result = restore_runtime(lm.model, man)
    lm.mitigation = result
    lm.info["mitigation"] = [m["method"] for m in man.get("methods", [])]
    return lm
