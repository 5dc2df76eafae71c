"""The command line: one-line errors with a non-zero status, and a profile of a local model folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from outlierlab.cli import app

runner = CliRunner()


def run(*args, env=None):
    return runner.invoke(app, list(args), env=env)


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_model_path(tmp_path, cache):
    line = one_line_error(run("profile", "--model", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "o")))
    assert "no such GGUF file" in line
    line = one_line_error(run("profile", "--model", "./missing-folder", "-o", str(tmp_path / "o")))
    assert "no such model" in line


def test_hub_id_offline(tmp_path, cache):
    result = run("profile", "--model", "some-org/some-model", "-o", str(tmp_path / "o"),
                 env={"HF_HUB_OFFLINE": "1"})
    line = one_line_error(result)
    assert "Hugging Face Hub" in line and "offline" in line


def test_unsupported_architecture(tmp_path, cache):
    from transformers import AutoConfig

    folder = tmp_path / "mamba"
    AutoConfig.for_model("mamba", hidden_size=16, num_hidden_layers=1, vocab_size=32).save_pretrained(folder)
    line = one_line_error(run("profile", "--model", str(folder), "-o", str(tmp_path / "o")))
    assert "unsupported architecture 'mamba'" in line and "llama" in line and "adding-a-model.md" in line


def test_profile_local_folder(tiny_folder, tmp_path, cache):
    out = tmp_path / "out"
    result = run("profile", "--model", str(tiny_folder), "--data", str(tmp_path / "text.txt"), "--seq-len", "32",
                 "-n", "3", "-o", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "max |x| per layer" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["model_type"] == "llama" and report["data"]["n_samples"] == 3
    assert report["massive_activations"] == []
    assert report["config"]["stats"]["overlap"] is True  # the default; --no-overlap below


def test_profile_without_the_overlap(tiny_folder, tmp_path, cache):
    out = tmp_path / "out"
    result = run("profile", "--model", str(tiny_folder), "--data", str(tmp_path / "text.txt"), "--seq-len", "32",
                 "-n", "2", "-o", str(out), "--no-progress", "--no-overlap")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["config"]["stats"]["overlap"] is False


def test_empty_text_is_one_line_error(tiny_folder, tmp_path, cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    out = tmp_path / "out"
    line = one_line_error(run("profile", "--model", str(tiny_folder), "--data", str(empty), "--seq-len", "32",
                              "-o", str(out)))
    assert "empty" in line
    assert not (out / "report.json").exists()


def test_sequence_longer_than_model_allows(tiny_folder, tmp_path, cache):
    line = one_line_error(run("profile", "--model", str(tiny_folder), "--data", str(tmp_path / "text.txt"),
                              "--seq-len", "4096", "-n", "1", "-o", str(tmp_path / "o")))
    assert "4096" in line and "256" in line


@pytest.mark.parametrize("args", [["--help"], ["profile", "--help"]])
def test_help(args):
    assert run(*args).exit_code == 0


STUDY_ORDER = ["run", "profile", "explain", "mitigate", "compare", "quant-error", "lm-eval", "export", "report",
               "models"]


def test_help_lists_commands_in_the_order_of_the_study():
    import re

    result = run("--help")
    assert result.exit_code == 0, result.output
    # the first word of each row of the commands panel, in the order shown
    listed = re.findall(r"^\W*([a-z][a-z-]*) {2,}\S", result.output.split("Commands")[1], re.MULTILINE)
    assert listed == STUDY_ORDER, listed


def _profile_args(tiny_folder, tmp_path, out):
    return ("profile", "--model", str(tiny_folder), "--data", str(tmp_path / "text.txt"), "--seq-len", "32",
            "-n", "3", "-o", str(out), "--no-progress")


def test_full_disk_is_one_line_error_and_leaves_no_partial_file(tiny_folder, tmp_path, cache, monkeypatch):
    import errno
    import os

    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the report is written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "out"
    line = one_line_error(run(*_profile_args(tiny_folder, tmp_path, out)), code=1)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "No space left on device" in line
    assert not out.exists() or not any(out.iterdir())  # neither a half-written file nor a temp file


def test_ctrl_c_stops_cleanly_with_no_output_and_no_hook(tiny_folder, tmp_path, cache, monkeypatch):
    from outlierlab.tracing import stats

    calls = []
    real = stats.PositionStats.update

    def interrupted(self, x, window0=0):
        calls.append(1)
        if len(calls) == 20:  # Ctrl-C in the middle of tracing
            raise KeyboardInterrupt
        return real(self, x, window0)

    monkeypatch.setattr(stats.PositionStats, "update", interrupted)
    hooks_left = []
    from outlierlab.tracing import profiler

    real_profile = profiler.profile

    def watched(model, *a, **k):
        try:
            return real_profile(model, *a, **k)
        finally:
            hooks_left.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))

    monkeypatch.setattr("outlierlab.tracing.profile", watched)
    out = tmp_path / "out"
    result = run(*_profile_args(tiny_folder, tmp_path, out))
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    assert hooks_left == [0]
    assert not (out / "report.json").exists() and not (out / "profile.safetensors").exists()
