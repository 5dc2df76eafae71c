"""The result of a profiling run: per-position statistics, detected outliers, weight statistics, and the
report files (``report.json`` + ``profile.safetensors``) they are written to and read back from."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..jsonsafe import jsonable
from ..paths import atomic_write_bytes, atomic_write_json
from .weights import summarize

SCHEMA_VERSION = "1.0"
ARRAYS_FILE = "profile.safetensors"
REPORT_FILE = "report.json"
ARRAY_KEYS = ("chan_absmax", "chan_mean", "chan_median", "tok_absmax", "tok_absmax_mean")


@dataclass
class PositionResult:
    layer: int
    position: str
    alias: str | None
    stats: dict
    massive: list[dict]
    channel_outliers: list[dict]
    same_as: str | None = None

    def to_json(self, top: int) -> dict:
        s = self.stats
        entries = list(zip(s["top_value"].tolist(), s["top_token"].tolist(), s["top_channel"].tolist()))[:top]
        out = {
            "alias": self.alias,
            "absmax": s["absmax"],
            "median": s["median"],
            "top": [[v, t, c] for v, t, c in entries],
            "n_ma": len(self.massive),
            "co_channels": [c["channel"] for c in self.channel_outliers],
        }
        if self.same_as:
            out["same_as"] = self.same_as
        return out


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("outlierlab", "torch", "transformers", "accelerate", "safetensors", "gguf", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Profile:
    model_info: dict
    data_info: dict
    config: Any
    adapter: dict
    results: dict[tuple[int, str], PositionResult]
    massive_activations: list[dict]
    channel_outliers: list[dict]
    weights: dict[str, torch.Tensor] | None
    timings: dict
    median_error: dict
    extra: dict = field(default_factory=dict)

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.results})

    def get(self, layer: int, position: str) -> PositionResult:
        return self.results[(layer, position)]

    def curve(self, position: str, key: str = "absmax") -> list[float]:
        """One statistic of ``position`` for every profiled layer (e.g. the residual max per layer)."""
        return [self.results[(layer, position)].stats[key] for layer in self.layers
                if (layer, position) in self.results]

    # -- serialization ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        cfg = self.config
        top = getattr(getattr(cfg, "stats", None), "top_k", 32)
        layers = []
        for layer in self.layers:
            layers.append({p: r.to_json(top) for (l, p), r in self.results.items() if l == layer})
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "profile",
            "model": self.model_info,
            "data": self.data_info,
            "config": jsonable(cfg),
            "versions": library_versions(),
            "seed": getattr(getattr(cfg, "stats", None), "seed", None),
            "timings": self.timings,
            "adapter": self.adapter,
            "median_error": self.median_error,
            "massive_activations": self.massive_activations,
            "channel_outliers": self.channel_outliers,
            "layers": layers,
            "weights": self._weights_json(),
            "arrays": ARRAYS_FILE,
            **self.extra,
        }

    def _weights_json(self) -> dict | None:
        if not self.weights:
            return None
        return {key: summarize(t) for key, t in self.weights.items() if not key.endswith(".row_norm")}

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {}
        for (layer, pos), r in self.results.items():
            if r.same_as:
                continue
            for key in ARRAY_KEYS:
                out[f"L{layer}.{pos}.{key}"] = _alone(r.stats[key])
        for key, t in (self.weights or {}).items():
            out[f"weights.{key}"] = t.contiguous()
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write ``report.json`` and ``profile.safetensors`` atomically; returns the report path."""
        from safetensors.torch import save

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / ARRAYS_FILE, save(self.arrays(), metadata={"schema_version": SCHEMA_VERSION}))
        return atomic_write_json(out_dir / REPORT_FILE, self.to_json())


def load_report(out_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read back a saved profile: the JSON document and the per-channel arrays."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    report = json.loads((out_dir / REPORT_FILE).read_text())
    arrays = load_file(out_dir / ARRAYS_FILE) if (out_dir / ARRAYS_FILE).is_file() else {}
    return report, arrays


def _alone(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a storage of its own (safetensors refuses tensors that share one, and finalized statistics
    are views of one block per shape)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)
