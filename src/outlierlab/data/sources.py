"""Text sources: ``brown:calib``, ``brown:eval``, a local UTF-8 text file, or ``hf:NAME[:CONFIG[:SPLIT]]``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from outlierlab.errors import DataError

ACCEPTED = "brown:calib, brown:eval, a path to a UTF-8 text file, or hf:NAME[:CONFIG[:SPLIT]]"

_OFFLINE_HINTS = (
    "connect",
    "offline",
    "resolve",
    "max retries",
    "timed out",
    "timeout",
    "network",
    "unreachable",
    "name or service not known",
    "temporary failure",
)


def describe_text(source: str, text: str, **extra: object) -> dict:
    """``{"source", "sha256", "chars", **extra}`` for ``text``; DataError if it is empty or whitespace."""
    if not text.strip():
        raise DataError(f"the text source {source!r} is empty; use a source with text in it")
    info = {
        "source": source,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "chars": len(text),
    }
    info.update(extra)
    return info


def _looks_like_path(source: str) -> bool:
    return (
        os.sep in source
        or "/" in source
        or "\\" in source
        or source.startswith((".", "~"))
        or bool(Path(source).suffix)
        or Path(source).exists()
    )


def _load_file(source: str) -> tuple[str, dict]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"text file not found: {path}")
    if not path.is_file():
        raise DataError(f"not a file: {path} (give a UTF-8 text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return text, describe_text(source, text, path=str(path.resolve()))


def _load_hf(source: str) -> tuple[str, dict]:
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise DataError(f"bad hf source {source!r}; use hf:NAME[:CONFIG[:SPLIT]], e.g. hf:wikitext:wikitext-2-raw-v1:test")
    name = parts[0]
    config = parts[1] if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hf: sources need the datasets library: pip install outlierlab[hf]") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many kinds (connection, not found, bad config...)
        msg = f"{type(exc).__name__}: {exc}".lower()
        if any(h in msg for h in _OFFLINE_HINTS):
            raise DataError(
                f"the Hugging Face hub is unreachable for {source!r}; use brown:calib/brown:eval or a local text file"
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load {source!r}: {first}") from exc
    columns = list(getattr(ds, "column_names", []) or [])
    if "text" not in columns:
        raise DataError(f"{source!r} has no 'text' column (columns: {', '.join(columns) or 'none'})")
    text = "\n".join(t for t in ds["text"] if t)
    return text, describe_text(source, text, rows=len(ds))


def load_text(source: str) -> tuple[str, dict]:
    """The text of ``source`` and a JSON-able description ``{"source", "sha256", "chars", ...}``.

    Accepted: ``brown:calib``, ``brown:eval``, a local UTF-8 text file path, ``hf:NAME[:CONFIG[:SPLIT]]``
    (needs ``pip install outlierlab[hf]``; SPLIT defaults to ``train``; the ``text`` column is joined
    with newlines).  Raises :class:`DataError` for anything else, and for empty text.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"no text source given; accepted: {ACCEPTED}")
    source = source.strip()
    if source.startswith("brown:"):
        from outlierlab.data.brown import SPLITS, brown_text

        split = source[len("brown:") :]
        if split not in SPLITS:
            raise DataError(f"unknown Brown split {split!r}; use brown:calib (genres A-J) or brown:eval (genres K-R)")
        text = brown_text(split)
        return text, describe_text(source, text)
    if source.startswith("hf:"):
        return _load_hf(source)
    if _looks_like_path(source):
        return _load_file(source)
    raise DataError(f"unknown text source {source!r}; accepted: {ACCEPTED}")
