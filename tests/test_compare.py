"""The mitigation x quantization table on a tiny model folder: cells, files, caching and resume, methods that
are missing or land later, and the CLI."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

import outlierlab.evaluation.compare as cmp
from outlierlab import mitigation
from outlierlab.cli import app
from outlierlab.data import DataConfig
from outlierlab.evaluation import EvalConfig
from outlierlab.evaluation.compare import CompareConfig, compare


@pytest.fixture
def tiny_lm(tiny_folder, cache):
    from outlierlab.models import load_model

    return load_model(str(tiny_folder))


def _config(tiny_folder, methods=("none",), quants=("fp", "w8a8-tensor"), **kw):
    text = str(tiny_folder.parent / "text.txt")
    return CompareConfig(methods=methods, quants=quants,
                         eval=EvalConfig(source=text, seq_len=32, n_samples=3, batch_size=2),
                         calib=DataConfig(source=text, seq_len=32, n_samples=2), batch_size=2, **kw)


@pytest.fixture
def counted(monkeypatch):
    """Count perplexity evaluations (each computed cell runs exactly one)."""
    calls = []
    real = cmp.perplexity

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cmp, "perplexity", wrapper)
    return calls


def test_table_files_and_resume(tiny_folder, tiny_lm, tmp_path, counted):
    out = tmp_path / "cmp"
    cfg = _config(tiny_folder, methods=("none", "no-such-method"), quants=("fp", "w8a8-tensor", "w4a4kv4"),
                  sqnr=True, sqnr_samples=1)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    res = compare(tiny_lm, cfg, out)
    assert len(counted) == 3
    assert [(c.method, c.quant) for c in res.cells] == [(m, q) for m in cfg.methods for q in cfg.quants]
    fp = res.get("none", "fp")
    assert fp.status == "ok" and fp.delta_ppl == 0 and res.reference is fp
    for q in ("w8a8-tensor", "w4a4kv4"):
        c = res.get("none", q)
        assert c.status == "ok" and c.ppl > 0 and c.delta_ppl == pytest.approx(c.ppl - fp.ppl)
        assert c.sqnr["worst_rel_mse"]["operator"] and len(c.sqnr["linears"]) == 7 * 3
    assert res.get("none", "w4a4kv4").delta_ppl > 0
    assert all(c.status == "not available" for c in res.cells if c.method == "no-such-method")
    assert all(v.equal(before[k]) for k, v in tiny_lm.model.state_dict().items())  # caller's model unchanged

    doc = json.loads((out / "compare.json").read_text())
    assert doc["schema"] == "outlierlab.compare/1"
    assert doc["protocol"]["seq_len"] == 32 and doc["protocol"]["n_samples"] == 3
    assert {"torch", "transformers", "outlierlab"} <= set(doc["versions"])
    assert doc["quant_presets"]["w8a8-tensor"]["a_granularity"] == "tensor-static"
    assert len(doc["cells"]) == 6 and "linears" not in doc["cells"][1]["sqnr"]
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {"method", "quant", "ppl", "delta_ppl"} <= set(rows[0])
    assert float(rows[1]["delta_ppl"]) == pytest.approx(res.get("none", "w8a8-tensor").delta_ppl, rel=1e-5)
    cell_files = sorted((out / "cells").glob("*.json"))
    assert len(cell_files) == 3

    # a rerun computes nothing; a lost cell is recomputed alone
    res2 = compare(tiny_lm, cfg, out)
    assert len(counted) == 3 and all(c.cached for c in res2.cells if c.status == "ok")
    assert res2.get("none", "w4a4kv4").ppl == res.get("none", "w4a4kv4").ppl
    lost = next(p for p in cell_files if p.stem == res.get("none", "w8a8-tensor").key)
    lost.unlink()
    res3 = compare(tiny_lm, cfg, out)
    assert len(counted) == 4 and not res3.get("none", "w8a8-tensor").cached
    assert res3.get("none", "w8a8-tensor").ppl == pytest.approx(res.get("none", "w8a8-tensor").ppl, rel=1e-9)
    # another setting is another cell
    compare(tiny_lm, _config(tiny_folder, quants=("fp", "w8a8-tensor:a_clip=0.9")), out)
    assert len(counted) == 5


def test_interrupted_compare_resumes(tiny_folder, tiny_lm, tmp_path, counted):
    out = tmp_path / "cmp"
    cfg = _config(tiny_folder, quants=("fp", "w8a8-token", "w4a8"))

    def stop_after_second(cell):
        if len(counted) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compare(tiny_lm, cfg, out, on_cell=stop_after_second)
    assert len(list((out / "cells").glob("*.json"))) == 2
    assert not (out / "compare.json").exists()
    assert sum(len(m._forward_pre_hooks) for m in tiny_lm.model.modules()) == 0  # nothing left on the model
    res = compare(tiny_lm, cfg, out)
    assert len(counted) == 3
    assert [c.cached for c in res.cells] == [True, True, False]


@dataclass(frozen=True)
class ShiftConfig:
    """A stand-in for a method that lands later: scales every down projection by (1 + eps)."""

    eps: float = 0.05


def test_methods_that_land_later_are_picked_up(tiny_folder, tiny_lm, tmp_path, monkeypatch):
    real = mitigation.mitigate

    def fake_mitigate(model, methods, calib=None, tokenizer=None, **kwargs):
        cfgs = [m for m in methods if isinstance(m, ShiftConfig)]
        if not cfgs:
            return real(model, methods, calib, tokenizer, **kwargs)
        from outlierlab.adapters import get_adapter

        assert calib is not None and calib.input_ids.shape == (2, 32)
        for layer in get_adapter(model).layers():
            layer.mlp.down_proj.weight.data *= 1 + cfgs[0].eps
        result = mitigation.MitigationResult(model)
        result.applied.append({"method": "shift", "exact": False, "config": {"eps": cfgs[0].eps}})
        return result

    monkeypatch.setitem(mitigation.METHODS, "shift", ShiftConfig)
    monkeypatch.setattr(mitigation, "mitigate", fake_mitigate)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    res = compare(tiny_lm, _config(tiny_folder, methods=("none", "shift")), tmp_path / "o")
    shift = res.get("shift", "fp")
    assert shift.status == "ok" and shift.ppl != res.get("none", "fp").ppl
    assert shift.mitigation["applied"][0]["method"] == "shift" and shift.method_config == {"eps": 0.05}
    assert all(v.equal(before[k]) for k, v in tiny_lm.model.state_dict().items())  # worked on a copy


def test_a_failing_method_is_reported_not_fatal(tiny_folder, tiny_lm, tmp_path, monkeypatch):
    @dataclass(frozen=True)
    class Broken:
        pass

    monkeypatch.setitem(mitigation.METHODS, "broken", Broken)
    res = compare(tiny_lm, _config(tiny_folder, methods=("broken", "none"), quants=("fp",)), tmp_path / "o")
    broken = res.get("broken", "fp")
    assert broken.status == "error" and "mitigation failed" in broken.error
    assert res.get("none", "fp").status == "ok"


def test_cli_compare(tiny_folder, tmp_path, cache):
    text = str(tiny_folder.parent / "text.txt")
    out = tmp_path / "cli"
    args = ["compare", "--model", str(tiny_folder), "--methods", "none,not-yet", "--quant", "fp,w8a8-token",
            "--eval-data", text, "--calib-data", text, "--seq-len", "32", "-n", "2", "--calib-samples", "2",
            "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "w8a8-token" in result.output and "not available" in result.output
    assert (out / "compare.json").is_file() and (out / "compare.csv").is_file()
    again = CliRunner().invoke(app, args)
    assert "2 from cache" in " ".join(again.output.split())  # the console wraps long lines
    bad = CliRunner().invoke(app, args[:5] + ["--quant", "w9a9"] + args[7:])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error:") and "w9a9" in bad.output


def test_cli_quant_error(tiny_folder, tmp_path, cache):
    text = str(tiny_folder.parent / "text.txt")
    out = tmp_path / "qe"
    result = CliRunner().invoke(app, ["quant-error", "--model", str(tiny_folder), "--quant", "w4a4kv4", "--data",
                                      text, "--seq-len", "32", "--calib-samples", "2", "-n", "1", "--out",
                                      str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "quant_error.json").read_text())
    assert doc["quant"] == "w4a4kv4" and len(doc["linears"]) == 21 and len(doc["kv"]) == 6
    assert "KV cache" in result.output


def test_cli_compare_exits_non_zero_after_a_failed_cell(tiny_folder, tmp_path, cache, monkeypatch):
    """A method that raises: its cells are errors, the others are written, and the command exits 1 naming it."""
    from outlierlab.mitigation import GammaConfig, Method, MitigationError

    def boom(ctx, cfg):
        raise MitigationError("planted failure")

    monkeypatch.setitem(mitigation._BY_NAME, "gamma", Method("gamma", GammaConfig, boom))
    text = str(tiny_folder.parent / "text.txt")
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["compare", "--model", str(tiny_folder), "--methods", "none,gamma", "--quant",
                                      "fp,w8a8-token", "--eval-data", text, "--calib-data", text, "--seq-len", "32",
                                      "-n", "2", "--calib-samples", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output
    text_out = " ".join(result.output.split())
    assert "failed: gamma x fp" in text_out and "planted failure" in text_out and "2 cell(s) failed" in text_out
    cells = {(c["method"], c["quant"]): c["status"] for c in json.loads((out / "compare.json").read_text())["cells"]}
    assert cells == {("none", "fp"): "ok", ("none", "w8a8-token"): "ok", ("gamma", "fp"): "error",
                     ("gamma", "w8a8-token"): "error"}
