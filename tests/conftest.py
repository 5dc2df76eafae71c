"""Shared fixtures: an isolated cache, tiny models of every family, a small word-level tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Point OUTLIERLAB_CACHE to a temp folder (nothing leaks into the user's cache)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(folder))
    return folder


def word_tokenizer(vocab_size: int = 128):
    """A word-level fast tokenizer with ``vocab_size`` entries and a BOS token (id 1), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def word_text(n_words: int, vocab_size: int = 128, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(4, vocab_size)}" for _ in range(n_words))


@pytest.fixture
def tiny_folder(tmp_path):
    """Save a tiny llama with a word-level tokenizer to a local HF folder; returns its path."""
    from outlierlab.testing import tiny_model

    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    (tmp_path / "text.txt").write_text(word_text(4000))
    return folder
