"""Activation landscapes: |x| of one window as a [tokens, channels] map at a few (layer, position) pairs.

The profile keeps only statistics; the 3D landscape figure of the massive-activation literature needs the
activations of one window themselves. ``capture`` runs one forward pass with hooks restricted to the wanted
layers and positions and keeps |x| on the CPU (float16 unless a value would overflow it, then float32), keyed
``L{layer}.{position}``. ``save`` / ``load`` write and read them as safetensors (atomically), with the token
ids and texts in the file's metadata. Memory: tokens x channels per captured tensor, for one window only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..adapters import get_adapter
from ..errors import OutlierlabError
from ..paths import atomic_write_bytes
from ..tracing.hooks import observe

DEFAULT_POSITIONS: tuple[str, ...] = ("block.out", "mlp.down_in")
BEFORE_FILE = "landscape_before.safetensors"
AFTER_FILE = "landscape_after.safetensors"
_FP16_MAX = 65000.0


def key(layer: int, position: str) -> str:
    return f"L{layer}.{position}"


def parse_key(name: str) -> tuple[int, str] | None:
    """``"L11.block.out"`` -> ``(11, "block.out")``; None for other keys."""
    if not name.startswith("L") or "." not in name:
        return None
    head, pos = name.split(".", 1)
    try:
        return int(head[1:]), pos
    except ValueError:
        return None


def _as_ids(ids) -> torch.Tensor:
    if hasattr(ids, "input_ids"):
        ids = ids.input_ids
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise OutlierlabError(f"landscape: expected token ids of shape [1, T], got {tuple(ids.shape)}")
    return ids[:1].long()


@torch.inference_mode()
def capture(model: nn.Module, ids, layers: Iterable[int], positions: Iterable[str] = DEFAULT_POSITIONS,
            dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """|x| of one window at every (layer, position): ``{"L{layer}.{position}": [tokens, channels]}`` on the CPU.

    ``ids``: a [1, T] (or [T]) LongTensor, or a ``Windows`` (its first window). Positions that share another
    position's tensor (``same_as``) are stored under their own name too. ``dtype`` float16 halves the size;
    a tensor whose max would overflow float16 is kept in float32.
    """
    adapter = get_adapter(model)
    ids = _as_ids(ids)
    layers = sorted({int(i) for i in layers})
    n = adapter.n_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise OutlierlabError(f"landscape: layer(s) {bad} out of range (the model has {n} layers)")
    wanted = list(dict.fromkeys(positions))
    known = {p.name: p for p in adapter.positions()}
    missing = [p for p in wanted if p not in known]
    if missing:
        raise OutlierlabError(f"landscape: unknown position(s) {missing} for {type(adapter).__name__} "
                              f"(known: {', '.join(known)})")
    # same_as positions are captured through the position they alias
    source = {p: (known[p].same_as or p) for p in wanted}
    out: dict[str, torch.Tensor] = {}

    def keep(layer: int, name: str, x: torch.Tensor) -> None:
        a = x.detach()[0] if x.dim() == 3 else x.detach()
        a = a.reshape(a.shape[0], -1).abs().float().cpu()
        stored = a.to(dtype) if dtype == torch.float32 or float(a.max()) < _FP16_MAX else a
        for p, src in source.items():
            if src == name:
                out[key(layer, p)] = stored.clone()

    observe(model, adapter, keep, ids, layers=layers, positions=set(source.values()))
    return dict(sorted(out.items(), key=lambda kv: (parse_key(kv[0]) or (0, kv[0]))))


def default_layers(source, late: str = "carried") -> list[int]:
    """The layers to show: the one before the largest residual MA first appears, that layer, and a late one.

    ``source``: a ``Profile``, a report.json dict, or a list of the residual (``block.out``) max per layer.
    The MA's first layer is the first one whose residual max reaches half of the peak. ``late="carried"``: the
    last layer still carrying at least half of the peak (the MA is usually cancelled in the final layers;
    falls back to the last layer); ``late="last"``: the last layer.
    """
    curve = residual_curve(source)
    if not curve:
        raise OutlierlabError("landscape: no block.out statistics to choose the layers from")
    n = len(curve)
    peak = max(curve)
    first = next(i for i, v in enumerate(curve) if v >= 0.5 * peak)
    if late == "last":
        end = n - 1
    else:
        carried = [i for i, v in enumerate(curve) if v >= 0.5 * peak]
        end = carried[-1] if carried and carried[-1] > first else n - 1
    return sorted({max(first - 1, 0), first, end})


def residual_curve(source) -> list[float]:
    """Residual-stream (``block.out``) max |x| per layer from a Profile, a report dict or a list."""
    if hasattr(source, "curve"):
        return [float(v) for v in source.curve("block.out")]
    if isinstance(source, Mapping):
        out = []
        for entry in source.get("layers", []):
            e = entry.get("block.out")
            if e is None:
                continue
            out.append(float(e["absmax"]))
        return out
    return [float(v) for v in source]


def save(path: str | Path, tensors: Mapping[str, torch.Tensor], ids=None, tokens: list[str] | None = None,
         meta: Mapping[str, object] | None = None) -> Path:
    """Write captured landscapes as safetensors, atomically; token ids/texts and ``meta`` go to the metadata."""
    from safetensors.torch import save as st_save

    if not tensors:
        raise OutlierlabError("landscape: nothing to save (no tensor was captured)")
    values: dict[str, object] = {"format": "outlierlab.landscape/1"}
    if ids is not None:
        values["input_ids"] = [int(i) for i in _as_ids(ids)[0].tolist()]
    if tokens is not None:
        values["tokens"] = [str(t) for t in tokens]
    values.update({str(k): v for k, v in (meta or {}).items()})
    metadata = {k: json.dumps(v) for k, v in values.items()}  # every value JSON-encoded, decoded by load_meta
    data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """Read landscapes written by :func:`save`: ``{"L{layer}.{position}": [tokens, channels]}``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise OutlierlabError(f"cannot read the landscape file {path}: {exc}") from exc


def load_meta(path: str | Path) -> dict:
    """The metadata of a landscape file, values decoded (``input_ids``, ``tokens``, ``format`` and the ``meta``
    given to :func:`save`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise OutlierlabError(f"cannot read the landscape file {path}: {exc}") from exc
    for k, v in meta.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            pass
    return meta


def token_texts(tokenizer, ids) -> list[str] | None:
    """One display string per token id (None when there is no tokenizer)."""
    if tokenizer is None:
        return None
    ids = _as_ids(ids)[0].tolist()
    try:
        return [tokenizer.decode([i]) for i in ids]
    except Exception:  # noqa: BLE001 - display only
        return None


def capture_to_file(model: nn.Module, ids, path: str | Path, layers: Iterable[int],
                    positions: Iterable[str] = DEFAULT_POSITIONS, tokenizer=None, max_tokens: int | None = 128,
                    meta: Mapping[str, object] | None = None) -> Path:
    """:func:`capture` then :func:`save`; ``max_tokens`` keeps the first tokens of the window only (the
    landscape shows the first few dozen tokens: the MAs sit on the first ones)."""
    ids = _as_ids(ids)
    if max_tokens is not None and ids.shape[1] > max_tokens:
        ids = ids[:, :max_tokens]
    tensors = capture(model, ids, layers, positions)
    if any(not math.isfinite(float(t.float().max())) for t in tensors.values()):
        raise OutlierlabError("landscape: NaN/inf in the captured activations")
    return save(path, tensors, ids=ids, tokens=token_texts(tokenizer, ids), meta=meta)


def capture_for_report(out_dir: str | Path, lm=None, model: str | None = None, file: str = BEFORE_FILE,
                       layers: Iterable[int] | None = None, positions: Iterable[str] = DEFAULT_POSITIONS,
                       max_tokens: int = 128, device: str = "cpu") -> Path:
    """Capture the landscape of a profiled model into ``out_dir/file`` (``landscape_before.safetensors``).

    Layers: ``layers`` or :func:`default_layers` of ``out_dir/report.json``. The model: ``lm`` (a
    ``LoadedModel``), else ``model`` or the report's ``model.id``, loaded in float32 on ``device``. The window:
    the first window (``order="sequential"``) of the report's text source and sequence length, cut to
    ``max_tokens`` tokens.
    """
    from ..api import as_windows
    from ..data import DataConfig

    out_dir = Path(out_dir)
    path = out_dir / "report.json"
    if not path.is_file():
        raise OutlierlabError(f"no report.json in {out_dir}: run `outlierlab profile --out {out_dir}` first")
    report = json.loads(path.read_text())
    if lm is None:
        from ..models import load_model

        name = model or (report.get("model") or {}).get("id")
        if not name:
            raise OutlierlabError(f"{path} names no model; pass one")
        lm = load_model(name, device, "float32")
    d = report.get("data") or {}
    cfg = DataConfig(source=d.get("source", "brown:calib"), seq_len=int(d.get("seq_len", 512)), n_samples=1,
                     seed=int(d.get("seed", 0)), bos=d.get("bos_policy") or "auto", order="sequential")
    windows = as_windows(cfg, lm)
    chosen = list(layers) if layers is not None else default_layers(report)
    meta = {"model": (report.get("model") or {}).get("id"), "data": d.get("source"), "window": "first",
            "layers": chosen}
    return capture_to_file(lm.model, windows.input_ids[:1], out_dir / file, chosen, positions, lm.tokenizer,
                           max_tokens, meta)


__all__ = ["AFTER_FILE", "BEFORE_FILE", "DEFAULT_POSITIONS", "capture", "capture_for_report", "capture_to_file",
           "default_layers",
           "key", "load", "load_meta", "parse_key", "residual_curve", "save", "token_texts"]
