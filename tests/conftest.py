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


# -- the device lane (tests/test_lane.py) ---------------------------------------------------------------
def pytest_configure(config):
    # On the CPU the Triton statistics kernels run under Triton's interpreter (tests/test_stats_triton.py),
    # which must be chosen before triton is first imported; the CUDA lane compiles them.
    if config.getoption("--device") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the lane tests (tests/test_lane.py): cpu (CI) or cuda (make test-gpu)")
    parser.addoption("--lane-dtypes", default=None,
                     help="comma-separated dtypes of the lane (default: float32 on cpu, float32,bfloat16 on cuda)")


def pytest_generate_tests(metafunc):
    if "lane_dtype" in metafunc.fixturenames:
        device = metafunc.config.getoption("--device")
        default = "float32" if device == "cpu" else "float32,bfloat16"
        dtypes = (metafunc.config.getoption("--lane-dtypes") or default).split(",")
        metafunc.parametrize("lane_dtype", dtypes, scope="module")


@pytest.fixture(scope="session")
def lane_device(request) -> str:
    device = request.config.getoption("--device")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device cuda: no CUDA device here")
    return device
