"""``outlierlab run`` end to end on a tiny local model: every stage's output, the stage headers and the final
summary on the terminal, then a resumed re-run."""

from __future__ import annotations

import io
import json

from rich.console import Console

from outlierlab.data import DataConfig
from outlierlab.evaluation import EvalConfig
from outlierlab.pipeline import RunConfig, logits_cost, planned_tokens, run
from outlierlab.report.summary import summary_lines


def test_run_writes_every_stage_and_resumes(tiny_folder, tmp_path, cache):
    text = str(tmp_path / "text.txt")
    cfg = RunConfig(model=str(tiny_folder), calib=DataConfig(source=text, seq_len=32, n_samples=3),
                    eval=EvalConfig(source=text, seq_len=32, n_samples=2), recommended="smoothquant",
                    methods=("none", "smoothquant"), quants=("fp", "w8a8-token"), explain_ablations=1)
    out = tmp_path / "run"
    states = []
    term = io.StringIO()
    result = run(cfg, out, console=Console(file=term, width=1000), progress=False,
                 on_stage=lambda stage, state: states.append((stage, state)))
    for name in ("report.json", "profile.safetensors", "mitigate.json", "compare.json", "compare.csv",
                 "report.html", "stages.json", "landscape_before.safetensors", "landscape_after.safetensors"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert "explain" in report and report["kind"] == "profile"
    mit = json.loads((out / "mitigate.json").read_text())
    assert set(mit["before"]) >= {"resid_max", "ma_count", "down_in_max", "co_ratio_max", "ppl"}
    assert [m["method"] for m in mit["methods"]] == ["smoothquant"]
    html = (out / "report.html").read_text()
    assert "Comparison" in html and "http://" not in html
    assert [s for s, _ in states] == ["profile", "explain", "mitigate", "compare", "report"]
    assert not any("cached" in st for _, st in states)
    assert set(result["stages"]) == {"profile", "explain", "mitigate", "compare", "report"}
    printed = term.getvalue()
    assert "stage 1/5 profile" in printed and "stage 2/5 explain" in printed and "stage 5/5 report" in printed
    # a first run: no estimate before the profile, then one at the speed of the last stage that ran (not at
    # the report, which runs no forward)
    flat = " ".join(printed.split())
    assert "elapsed, no estimate (no previous run's timings)" in flat.split("stage 2/5")[0]
    assert "left (first run: the remaining forwards at the profile stage's speed)" in flat.split("stage 2/5")[1]
    assert "left (first run: the remaining forwards at the explain stage's speed)" in flat.split("stage 3/5")[1]
    # the summary of report.html, at the end, with the report's path
    summary = summary_lines(out)
    lines = printed.splitlines()
    tail = lines[max(i for i, ln in enumerate(lines) if ln.strip("─ ") == "summary"):]
    assert [ln.strip() for ln in tail[1:-1]] == summary
    assert any(ln.startswith("mitigation: smoothquant: residual max ") for ln in summary), summary
    assert any(ln.startswith("quantization: perplexity vs none / fp ") for ln in summary), summary
    assert f"wrote {out / 'report.html'}" in tail[-1]
    # work shared between stages: the profile serves smoothquant's calibration, the before/after measurement
    # gives the fp cells, and the recommended method's cells come from the mitigate stage (cached in compare)
    assert "smoothquant: calibration statistics from the profile of the unmodified model" in printed
    cells = {(c["method"], c["quant"]): c for c in json.loads((out / "compare.json").read_text())["cells"]}
    assert cells[("none", "fp")]["ppl"] == mit["before"]["ppl"]
    assert cells[("smoothquant", "fp")]["ppl"] == mit["after"]["ppl"]
    assert cells[("none", "fp")]["note"] == cells[("smoothquant", "fp")]["note"] == "measured by the caller"
    assert cells[("smoothquant", "w8a8-token")]["cached"] and not cells[("none", "w8a8-token")]["cached"]

    states.clear()
    term = io.StringIO()
    run(cfg, out, console=Console(file=term, width=1000), progress=False,
        on_stage=lambda s, st: states.append((s, st)))
    assert "stage 1/5 profile (cached)" in term.getvalue() and " left" in term.getvalue()
    cached = {s for s, st in states if "cached" in st}
    assert cached == {"profile", "explain", "mitigate"}
    cells = json.loads((out / "compare.json").read_text())["cells"]
    assert len(cells) == 4 and all(c["cached"] for c in cells)  # every cell reused from the per-cell cache


def test_cli_run_exits_non_zero_and_the_report_names_a_failed_cell(tiny_folder, tmp_path, cache, monkeypatch):
    """A compare method that raises: run finishes every stage, report.html lists the failed cells, exit 1."""
    from typer.testing import CliRunner

    from outlierlab import mitigation
    from outlierlab.cli import app
    from outlierlab.mitigation import Method, MitigationError, SmoothQuantConfig

    def boom(ctx, cfg):
        raise MitigationError("planted failure")

    monkeypatch.setitem(mitigation._BY_NAME, "smoothquant", Method("smoothquant", SmoothQuantConfig, boom))
    text = str(tmp_path / "text.txt")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--quick", "--model", str(tiny_folder), "--data", text, "--eval-data",
                                   text, "--methods", "none,smoothquant", "--quant", "fp,w8a8-token",
                                   "--recommended", "tma", "--out", str(out), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "failed: smoothquant x fp" in " ".join(res.output.split())
    html = (out / "report.html").read_text()
    assert "2 cell(s) failed" in html and "planted failure" in html


def test_the_first_runs_plan_counts_the_forwards_of_each_stage():
    """Default matrix (4 methods x 3 settings, the recommended one among them): explain's 6 ablations and its
    baseline on 2 windows, mitigate's before/after and the recommended row's 2 quantized cells (its
    calibration reads the profile), compare's 12 - 1 - 3 = 8 other cells; logits weigh as the output layer's
    share."""
    from outlierlab.testing import tiny_model

    cfg = RunConfig()
    ev, cal = cfg.eval.n_samples * cfg.eval.seq_len, cfg.calib.n_samples * cfg.calib.seq_len
    plan = planned_tokens(cfg, 1.5, 2)
    assert plan == {"profile": cal, "explain": 7 * 2 * cfg.eval.seq_len * 1.5, "mitigate": 4 * ev * 1.5,
                    "compare": 8 * ev * 1.5, "report": 0.0}
    model = tiny_model("llama")
    head = model.get_output_embeddings().weight.numel()
    layers = sum(p.numel() for p in model.model.layers.parameters())
    assert logits_cost(model) == 1.0 + head / layers
