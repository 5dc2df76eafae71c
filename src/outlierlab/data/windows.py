"""Token windows: non-overlapping, seeded (or sequential) fixed-length slices of a tokenized text."""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch

from outlierlab.data.sources import describe_text, load_text
from outlierlab.errors import DataError

BOS_POLICIES = ("auto", "always", "never")
ORDERS = ("random", "sequential")
#: Texts are tokenized in pieces of at most this many characters, cut at paragraph / line / space
#: boundaries (few cuts, so the result is close to tokenizing the whole text at once).
CHUNK_CHARS = 50_000
_HUGE = 1_000_000_000  # tokenizers use 1e30 as "no limit"


@dataclass(frozen=True)
class DataConfig:
    source: str = "brown:calib"
    seq_len: int = 512
    n_samples: int = 16
    seed: int = 0
    bos: str = "auto"  # "auto" (what the tokenizer does), "always", "never"
    order: str = "random"  # "random" (seeded choice of windows) or "sequential" (the first n windows)

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise DataError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise DataError(f"n_samples must be an integer >= 1, got {self.n_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"seed must be an integer, got {self.seed!r}")
        if self.bos not in BOS_POLICIES:
            raise DataError(f"bos must be one of {', '.join(BOS_POLICIES)}, got {self.bos!r}")
        if self.order not in ORDERS:
            raise DataError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


@dataclass(frozen=True)
class Windows:
    input_ids: torch.Tensor  # LongTensor [n_samples, seq_len]
    starts: tuple[int, ...]  # token offset of each window's first text token in the tokenized stream
    bos: bool  # whether each window starts with the BOS token
    config: DataConfig
    text_info: dict
    n_tokens: int = 0  # tokens in the whole tokenized text (without BOS)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: config fields, bos, starts, text_info, n_tokens."""
        return {
            **asdict(self.config),
            "bos": self.bos,
            "bos_policy": self.config.bos,
            "starts": list(self.starts),
            "text_info": dict(self.text_info),
            "n_tokens": self.n_tokens,
        }


def _cut_point(piece: str, limit: int) -> int:
    """Where to cut ``piece`` (at most ``limit`` chars): before the last whitespace char of a blank line,
    else of a newline, else of a space, so the next piece starts with the whitespace that precedes its
    first word (as in the whole-text tokenization of byte-level BPE tokenizers)."""
    for sep in ("\n\n", "\n", " "):
        pos = piece.rfind(sep, 1, limit)
        if pos > 0:
            return pos + len(sep) - 1
    return limit


def text_chunks(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Consecutive pieces of ``text`` of at most ``limit`` chars; concatenating them gives ``text``."""
    chunks: list[str] = []
    while len(text) > limit:
        cut = _cut_point(text, limit)
        chunks.append(text[:cut])
        text = text[cut:]
    if text:
        chunks.append(text)
    return chunks


#: per tokenizer object, the token streams of the texts it tokenized (a run cuts calibration and evaluation
#: windows of the same corpus several times; the corpus is tokenized once)
_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids (int64) of ``text`` without special tokens, tokenized chunk by chunk and concatenated;
    remembered per tokenizer object and text."""
    try:
        memo = _STREAMS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        memo = {}
    key = (len(tokenizer), hashlib.sha256(text.encode()).hexdigest())
    if key not in memo:
        chunks = text_chunks(text)
        # verbose=False: pieces are longer than the model's context on purpose; no "too long" warning
        parts = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"] if chunks else []
        if len(memo) >= 4:  # a few texts per tokenizer (calibration and evaluation splits)
            memo.pop(next(iter(memo)))
        memo[key] = torch.tensor([i for part in parts for i in part], dtype=torch.long)
    return memo[key]


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(..., add_special_tokens=True)`` puts the BOS token first."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = "Hello world"
    with_sp = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    return bool(with_sp) and with_sp[0] == bos and (not without or without[0] != bos)


def _limit(tokenizer, max_positions: int | None) -> int | None:
    if max_positions is not None:
        return int(max_positions)
    mml = getattr(tokenizer, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < _HUGE:
        return mml
    return None


def make_windows(tokenizer, config: DataConfig, text: str | None = None, max_positions: int | None = None) -> Windows:
    """Cut the tokenized text into non-overlapping windows of ``config.seq_len`` tokens.

    The text (``config.source`` unless ``text`` is given) is tokenized once without special tokens and
    cut into consecutive chunks of ``seq_len`` tokens (``seq_len - 1`` when a BOS token is prepended).
    ``order="random"`` picks ``n_samples`` chunks with ``torch.Generator().manual_seed(seed)`` (sorted
    by start); ``order="sequential"`` takes the first ``n_samples``.
    """
    limit = _limit(tokenizer, max_positions)
    if limit is not None and config.seq_len > limit:
        raise DataError(f"sequence length {config.seq_len} exceeds the model's limit {limit}; lower seq_len")

    if text is None:
        text, info = load_text(config.source)
    else:
        info = describe_text("<text>", text)

    bos_id = getattr(tokenizer, "bos_token_id", None)
    if config.bos == "always":
        if bos_id is None:
            raise DataError("bos='always' but the tokenizer has no BOS token; use bos='auto' or 'never'")
        use_bos = True
    elif config.bos == "never":
        use_bos = False
    else:
        use_bos = tokenizer_adds_bos(tokenizer)

    stream = tokenize_text(tokenizer, text)
    n_tokens = len(stream)
    body = config.seq_len - 1 if use_bos else config.seq_len
    if n_tokens < body:
        raise DataError(
            f"text has {n_tokens} tokens, a window needs {body}; use a longer text or a smaller seq_len"
        )
    n_chunks = n_tokens // body
    if n_chunks < config.n_samples:
        raise DataError(
            f"the text gives only {n_chunks} non-overlapping windows of {config.seq_len} tokens, "
            f"{config.n_samples} requested; lower n_samples or seq_len, or use a longer text"
        )
    if config.order == "random":
        gen = torch.Generator().manual_seed(config.seed)
        picked = sorted(torch.randperm(n_chunks, generator=gen)[: config.n_samples].tolist())
    else:
        picked = list(range(config.n_samples))
    starts = tuple(i * body for i in picked)
    data = torch.stack([stream[s : s + body] for s in starts])
    if use_bos:
        data = torch.cat([torch.full((len(starts), 1), int(bos_id), dtype=torch.long), data], dim=1)
    return Windows(
        input_ids=data, starts=starts, bos=use_bos, config=config, text_info=info, n_tokens=n_tokens
    )
