"""The small Python API: each stage takes a model (or a model string), data (or a data string) and a config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .data import DataConfig, Windows, make_windows
from .models.loader import LoadedModel, load_model, max_positions
from .tracing import Profile, ProfileConfig
from .tracing import profile as _profile


def as_loaded(model, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Accept a model string (alias, path, hub id), a :class:`LoadedModel`, or a HF model object."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), device, dtype)
    raise TypeError("pass a model string or a LoadedModel (outlierlab.load_model); for a bare HF model use "
                    "outlierlab.tracing.profile(model, windows)")


def as_windows(data, lm: LoadedModel, default: DataConfig | None = None) -> Windows:
    """Accept :class:`Windows`, a :class:`DataConfig`, a source string (``brown:calib``, a file...) or None."""
    if isinstance(data, Windows):
        return data
    if isinstance(data, DataConfig):
        cfg = data
    elif isinstance(data, str):
        cfg = replace(default or DataConfig(), source=data)
    elif data is None:
        cfg = default or DataConfig()
    else:
        raise TypeError("data must be Windows, DataConfig, a source string or None")
    return make_windows(lm.tokenizer, cfg, max_positions=max_positions(lm.model))


def profile(model="smollm2-135m", data=None, config: ProfileConfig | None = None, *, device: str = "cpu",
            dtype: str = "float32", progress: bool = False) -> Profile:
    """Profile every operator position of every layer; see :func:`outlierlab.tracing.profile`."""
    lm = as_loaded(model, device, dtype)
    windows = as_windows(data, lm)
    result = _profile(lm.model, windows, config, tokenizer=lm.tokenizer, progress=progress,
                      model_info=lm.info)
    return result


__all__ = ["as_loaded", "as_windows", "profile"]
