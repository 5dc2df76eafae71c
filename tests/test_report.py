"""The report: landscape capture, figures and the self-contained HTML, on a tiny model with planted outliers
(a super weight that makes a massive activation, a large norm gain that makes a channel-wise outlier)."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch

from outlierlab.errors import OutlierlabError
from outlierlab.paths import atomic_write_json
from outlierlab.report import figures as F
from outlierlab.report import landscape as L
from outlierlab.report.html import build, build_report, collect
from outlierlab.testing import (
    plant_gain,
    plant_super_weight,
    random_windows,
    tiny_model,
)
from outlierlab.tracing import ProfileConfig, profile

MA_LAYER, MA_ROW, MA_COL = 1, 7, 13        # the planted super weight: W_down[7, 13] of layer 1
CO_LAYER, CO_CHANNEL = 0, 21               # the planted gain: attn.norm of layer 0, channel 21
NASTY = "<script>alert('x')</script> & \"quoted\""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _planted():
    model = tiny_model("llama")
    plant_super_weight(model, layer=MA_LAYER, row=MA_ROW, col=MA_COL, value=1e5)
    plant_gain(model, layer=CO_LAYER, norm="attn.norm", channel=CO_CHANNEL, gain=60.0)
    return model


def _explain_section(prof, before: dict, after: dict) -> dict:
    """A schema-valid ``explain`` section whose numbers come from this model's own profile and landscapes."""
    resid = prof.curve("block.out")
    y6 = before[L.key(MA_LAYER, "mlp.down_in")].float()
    ma = max((m for m in prof.massive_activations if m["position"] == "block.out"), key=lambda m: abs(m["value"]))
    cos = [c for c in prof.channel_outliers if c["position"] == "attn.norm" and c["layer"] == CO_LAYER]
    after_max = float(after[L.key(MA_LAYER, "block.out")].float()[:, MA_ROW].max())
    return {
        "version": "1.0",
        "summary": {"n_massive": 1, "n_super_weights_verified": 1, "n_channel_outliers": len(cos)},
        "narrative": [f"MA {ma['value']:.0f} at token {ma['token_index']} channel {MA_ROW} {NASTY}."],
        "massive_activations": [{
            "token_index": ma["token_index"], "token": NASTY, "channel": MA_ROW, "value": ma["value"],
            "origin": {"layer": MA_LAYER, "position": "mlp.down_in", "alias": "y6"},
            "down_in_channels": [{"channel": MA_COL, "value": float(y6[ma["token_index"], MA_COL]), "gate": 0.5,
                                  "up": 0.25}],
            "super_weights": [{"module": f"model.layers.{MA_LAYER}.mlp.down_proj", "row": MA_ROW, "col": MA_COL,
                               "value": 1e5, "verified": True, "ma_after": after_max, "ppl_before": 130.0,
                               "ppl_after": 128.5}],
            "propagation": [{"layer": i, "value": v} for i, v in enumerate(resid)],
        }],
        "channel_outliers": [{"layer": c["layer"], "position": c["position"], "channel": c["channel"],
                              "ratio": c["ratio"], "gamma": 60.0, "gamma_share": 0.97,
                              "otc": [{"module": f"model.layers.{CO_LAYER}.self_attn.q_proj", "col": CO_CHANNEL,
                                       "score": 42.0}]} for c in cos],
    }


def make_run(folder):
    """A run folder as the pipeline leaves it: profile, explain section, landscapes, mitigate.json,
    compare.json; every number measured on the tiny model except the fake perplexities."""
    model = _planted()
    ids = random_windows(model, n=4, seq_len=32)
    prof = profile(model, ids, ProfileConfig(batch_size=2))
    prof.save(folder)
    layers = L.default_layers(prof)
    before = L.capture(model, ids[:1], layers)
    L.save(folder / L.BEFORE_FILE, before, ids=ids[:1], tokens=[f"w{i}" for i in ids[0].tolist()])
    # "mitigation": remove the super weight, measure again
    plant_super_weight(model, layer=MA_LAYER, row=MA_ROW, col=MA_COL, value=0.0)
    after = L.capture(model, ids[:1], layers)
    L.save(folder / L.AFTER_FILE, after, ids=ids[:1])
    prof_after = profile(model, ids, ProfileConfig(batch_size=2, weights=False))

    report = json.loads((folder / "report.json").read_text())
    report["explain"] = _explain_section(prof, before, after)
    atomic_write_json(folder / "report.json", report)

    def summary(p, ppl):
        return {"resid_max": max(p.curve("block.out")), "ma_count": len(p.massive_activations),
                "down_in_max": max(p.curve("mlp.down_in")), "co_ratio_max": 30.0, "ppl": ppl,
                "resid_max_per_layer": p.curve("block.out"), "down_in_max_per_layer": p.curve("mlp.down_in")}

    atomic_write_json(folder / "mitigate.json", {
        "methods": [{"method": "tma", "config": {"mode": "zero"}}, {"method": NASTY, "config": {}}],
        "before": summary(prof, 130.0), "after": summary(prof_after, 128.5), "seconds": 0.5})
    cells = []
    for method in ("none", "paper"):
        for quant, ppl in (("fp", 130.0), ("w8a8-tensor", 140.0 if method == "none" else 131.0)):
            cells.append({"method": method, "quant": quant, "status": "ok", "ppl": ppl, "delta_ppl": ppl - 130.0,
                          "rel_delta_pct": 100 * (ppl / 130.0 - 1)})
    cells.append({"method": "paper", "quant": "w4a4", "status": "error", "ppl": None, "delta_ppl": None,
                  "rel_delta_pct": None, "error": NASTY})
    atomic_write_json(folder / "compare.json", {"reference": {"method": "none", "quant": "fp", "ppl": 130.0},
                                                 "protocol": {"source": "random", "n_samples": 4, "seq_len": 32},
                                                 "cells": cells, "timings": {"total_s": 1.0}})
    return {"profile": prof, "layers": layers, "before": before, "after": after, "ids": ids}


_SHARED: dict = {}


def shared_run(tmp_path_factory) -> dict:
    """One run folder with its report for the whole session (test_report_browser opens the same report).
    Tests must not change it (copy it first)."""
    if "run" not in _SHARED:
        folder = tmp_path_factory.mktemp("run")
        info = make_run(folder)
        path, figs = build(folder, timings={"pipeline": 1.5})
        info.update(folder=folder, path=path, figs=figs, html=path.read_text())
        _SHARED["run"] = info
    return _SHARED["run"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)


# -- landscape ---------------------------------------------------------------------------------------------------
def test_default_layers_follow_the_residual_ma(run):
    # the MA first appears at layer 1 (planted) and is carried to the last layer
    assert run["layers"] == [0, 1, 2]
    assert L.default_layers([1.0, 2.0, 500.0, 900.0, 880.0, 3.0]) == [1, 2, 4]
    assert L.default_layers([1.0, 2.0, 500.0, 900.0, 880.0, 3.0], late="last") == [1, 2, 5]


def test_capture_keeps_abs_values_of_one_window(run):
    before, after = run["before"], run["after"]
    assert sorted(before) == sorted(f"L{l}.{p}" for l in (0, 1, 2) for p in ("block.out", "mlp.down_in"))
    for k, t in before.items():
        assert t.dtype == torch.float16 and t.shape[0] == 32 and bool((t >= 0).all()), k
    assert before["L1.block.out"].shape[1] == 64 and before["L1.mlp.down_in"].shape[1] == 128
    # the planted MA: residual channel 7 dominates from layer 1 on, and is gone after the "mitigation"
    for layer in (1, 2):
        res = before[f"L{layer}.block.out"].float()
        assert int(res.max(dim=0).values.argmax()) == MA_ROW
        assert float(res.max()) > 1000 * float(res.median())
        assert float(after[f"L{layer}.block.out"].float().max()) < float(res.max()) / 100
    # the tensor the profile saw for window 0 is the same one: the profile's max is at least the landscape's
    prof = run["profile"]
    assert float(before["L1.block.out"].float().max()) <= prof.get(1, "block.out").stats["absmax"] * 1.001


def test_capture_removes_hooks_and_handles_same_as_positions():
    model = tiny_model("gpt2")  # GeLU FFN: mlp.down_in is the same tensor as mlp.act
    ids = random_windows(model, n=1, seq_len=8)
    out = L.capture(model, ids, [0, 2], positions=("mlp.down_in", "mlp.act", "block.out"))
    assert sorted(out) == ["L0.block.out", "L0.mlp.act", "L0.mlp.down_in", "L2.block.out", "L2.mlp.act",
                           "L2.mlp.down_in"]
    assert torch.equal(out["L0.mlp.act"], out["L0.mlp.down_in"])
    assert out["L0.mlp.act"].shape == (8, 256)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(OutlierlabError, match="out of range"):
        L.capture(model, ids, [3])
    with pytest.raises(OutlierlabError, match="unknown position"):
        L.capture(model, ids, [0], positions=("mlp.nope",))


def test_capture_keeps_float32_where_float16_would_overflow():
    model = tiny_model("llama")
    plant_super_weight(model, layer=0, row=3, col=5, value=1e8)
    out = L.capture(model, random_windows(model, n=1, seq_len=8), [0])
    assert out["L0.block.out"].dtype == torch.float32 and float(out["L0.block.out"].max()) > 65504
    assert out["L0.mlp.down_in"].dtype == torch.float16


def test_landscape_file_round_trip(run, tmp_path):
    path = run["folder"] / L.BEFORE_FILE
    back = L.load(path)
    assert sorted(back) == sorted(run["before"]) and all(torch.equal(back[k], run["before"][k]) for k in back)
    meta = L.load_meta(path)
    assert meta["input_ids"] == run["ids"][0].tolist() and meta["tokens"][0] == f"w{run['ids'][0, 0]}"
    with pytest.raises(OutlierlabError, match="cannot read"):
        (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
        L.load(tmp_path / "bad.safetensors")


# -- figures -----------------------------------------------------------------------------------------------------
EXPECTED_FIGURES = (
    [f"landscape_L{l}_{p}" for l in (0, 1, 2) for p in ("block_out", "mlp_down_in")]
    + ["topk_curves", "heatmap_attn_norm", "heatmap_mlp_norm", "heatmap_block_out", "heatmap_mlp_down_in",
       "heatmap_attn_q", "gamma_attn_norm", "gamma_mlp_norm", "mitigation", "compare"]
)


def test_every_figure_is_a_valid_png_file(run):
    from PIL import Image

    names = [f.name for f in run["figs"]]
    assert names == EXPECTED_FIGURES
    for f in run["figs"]:
        data = (run["folder"] / "figures" / f"{f.name}.png").read_bytes()
        assert data == f.png and data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            assert im.size[0] >= 400 and im.size[1] >= 200
            gray = im.convert("L")
            lo, hi = gray.getextrema()
            assert hi - lo > 100, f"{f.name} looks blank"


def test_topk_series_match_the_profile(run):
    prof = run["profile"]
    s = F.topk_series(json.loads((run["folder"] / "report.json").read_text()), "block.out")
    assert s["layer"] == [0, 1, 2]
    for i, layer in enumerate(s["layer"]):
        st = prof.get(layer, "block.out").stats
        assert s["top1"][i] == pytest.approx(abs(float(st["top_value"][0])), rel=1e-6)
        assert s["top1"][i] >= s["top2"][i] >= s["top3"][i]
        assert s["median"][i] == pytest.approx(st["median"], rel=1e-6)
    assert s["top1_where"][1][1] == MA_ROW


def test_figures_are_deterministic(run):
    from outlierlab.tracing import load_report

    report, arrays = load_report(run["folder"])
    built = {f.name: f.png for f in run["figs"]}
    assert F.heatmap_figure(report, arrays, "attn.norm").png == built["heatmap_attn_norm"]
    assert F.topk_figure(report).png == built["topk_curves"]
    land = F.landscape_figure(run["before"]["L1.block.out"], run["after"]["L1.block.out"], 1, "block.out",
                              tokens=[f"w{i}" for i in run["ids"][0].tolist()])
    assert land.png == built["landscape_L1_block_out"]


def test_gamma_and_heatmap_data_show_the_planted_outliers(run):
    from outlierlab.tracing import load_report

    report, arrays = load_report(run["folder"])
    layers, g = F.gain_matrix(arrays, "attn.norm")
    assert layers == [0, 1, 2] and int(g[0].argmax()) == CO_CHANNEL and g[0, CO_CHANNEL] == pytest.approx(60.0)
    layers, m = F.heatmap_matrix(report, arrays, "attn.norm")
    assert int(m[0].argmax()) == CO_CHANNEL
    layers, m = F.heatmap_matrix(report, arrays, "block.out")
    assert [int(r.argmax()) for r in m[1:]] == [MA_ROW, MA_ROW]


# -- HTML --------------------------------------------------------------------------------------------------------
SECTIONS = ("summary", "found", "explain", "mitigation", "compare", "figures", "run")


def test_report_has_every_section_in_order(run):
    html = run["html"]
    pos = [html.index(f"<section id='{s}'>") for s in SECTIONS]
    assert pos == sorted(pos)
    for text in ("Massive activations (MAs)", "Channel-wise outliers (COs)", "Library versions", "Time taken",
                 "pipeline", "Super weights", "gamma share", "Mitigation: before and after", "perplexity"):
        assert text in html, text


def test_report_states_the_numbers(run):
    html = run["html"]
    prof = run["profile"]
    found = html[html.index("<section id='found'>"):html.index("<section id='explain'>")]
    ma = max(prof.massive_activations, key=lambda m: abs(m["value"]))
    assert f"<td>{MA_ROW}</td>" in found and f"{abs(ma['value']):,.0f}" in found
    explain = html[html.index("<section id='explain'>"):html.index("<section id='mitigation'>")]
    assert f"[{MA_ROW}, {MA_COL}]" in explain and "<td>yes</td>" in explain and "97%" in explain
    assert f"layer {MA_LAYER}, mlp.down_in (y6)" in explain
    mit = html[html.index("<section id='mitigation'>"):html.index("<section id='compare'>")]
    m = json.loads((run["folder"] / "mitigate.json").read_text())
    ratio = m["before"]["resid_max"] / m["after"]["resid_max"]
    assert ratio > 100 and f"{ratio:.3g}x smaller" in mit
    comp = html[html.index("<section id='compare'>"):html.index("<section id='figures'>")]
    assert "140" in comp and "+7.7%" in comp and "class='best'" in comp


def test_summary_opens_the_report_with_the_numbers_of_the_files(run):
    from outlierlab.fmt import num

    html = run["html"]
    assert html.index("<section id='summary'>") < html.index("What this report is about")
    summ = html[html.index("<section id='summary'>"):html.index("<section id='found'>")]
    ma = json.loads((run["folder"] / "report.json").read_text())["explain"]["massive_activations"][0]
    assert f"{num(ma['value'])} at token {ma['token_index']}" in summ and f"channel {MA_ROW}," in summ
    assert f"born at layer {MA_LAYER}, mlp.down_in (y6); verified cause: zeroing " in summ
    assert f"[{MA_ROW}, {MA_COL}] (= 100,000)" in summ
    m = json.loads((run["folder"] / "mitigate.json").read_text())
    assert f"{m['before']['resid_max'] / m['after']['resid_max']:.3g}x smaller" in summ
    assert "perplexity 130 -&gt; 128 (-1.15%)" in summ
    assert "w8a8-tensor none 140 (+7.7%) -&gt; paper 131 (+0.8%); 1 cell(s) failed" in summ
    for anchor in ("found", "explain", "mitigation", "compare"):
        assert f"href='#{anchor}'" in summ
    run_part = html[html.index("<section id='run'>"):]
    assert "<details><summary>model, data, configuration" in run_part and "Library versions" in run_part


def test_summary_of_hand_made_files():
    """Every line of the summary comes from the data: a joint ablation, the best of several mitigation runs,
    a setting where no method beats the unmitigated model; no line for what is missing."""
    from outlierlab.report.summary import summarize

    rec = {"layer": 2, "position": "block.out", "token_index": 0, "token": "A", "channel": 5}
    report = {"massive_activations": [{**rec, "value": 900.0}, {**rec, "layer": 3, "value": -950.0},
                                      {**rec, "layer": 6, "value": 800.0}],
              "channel_outliers": [{"layer": i, "position": "mlp.norm", "channel": ch, "ratio": 10.0 + i}
                                   for i in range(3) for ch in (5, 9)]}
    w = [{"module": "m.down", "row": 5, "col": 1}, {"module": "m.down", "row": 5, "col": 2}]
    explain = {"summary": {"n_channel_outliers_at_norms": 6, "n_gamma_dominated": 2},
               "massive_activations": [{"token_index": 0, "token": "A", "channel": 5, "value": -950.0,
                                        "cancelled_at": 7, "origin": {"layer": 2, "position": "mlp.down_in"},
                                        "super_weights": [{**w[0], "verified": False}, {**w[1], "verified": False}],
                                        "joint_ablation": {"weights": w, "verified": True, "ma_after": 3.0}}]}
    runs = [{"label": label, "before": {"resid_max": 950.0, "ppl": 20.0}, "after": {"resid_max": a, "ppl": p}}
            for label, a, p in (("small", 95.0, 20.0), ("big", 9.5, 22.0))]
    cells = [{"method": m, "quant": q, "status": "ok", "ppl": p, "rel_delta_pct": 100 * (p / 20 - 1)}
             for m, q, p in (("none", "fp", 20.0), ("none", "w8", 21.0), ("x", "w8", 21.5))]
    lines = [f.line() for f in summarize({"report": report, "explain": explain, "mitigate": {"runs": runs},
                                          "compare": {"reference": {"method": "none", "quant": "fp", "ppl": 20.0},
                                                      "cells": cells}})]
    assert lines == [
        ("largest massive activation: -950 at token 0 'A', channel 5, layers 2-3, 6 (cancelled at layer 7); born at "
         "layer 2, mlp.down_in; verified cause: zeroing m.down[5, 1] and [5, 2] together removes it (max left "
         "3.00); no single one does"),
        ("channel-wise outliers: 6 records (layer, position, channel) at 1 position; most frequent channels 5 (3), "
         "9 (3); largest 12.0x (layer 2, mlp.norm, channel 5); gamma explains at least half of 2 of the 6 at norm "
         "outputs"),
        "best mitigation (of 2): big: residual max 950 -> 9.50 (100x smaller), perplexity 20.0 -> 22.0 (+10.00%)",
        "quantization: perplexity vs none / fp 20.0: w8 none 21.0 (+5.0%), no method better",
    ]
    assert summarize({"report": None, "explain": None, "mitigate": None, "compare": None}) == []


def test_summary_names_the_origin_steps():
    """explain 1.1: the cause is the origin steps, verified when ablating them all together removes the MA."""
    from outlierlab.report.summary import summarize

    w = [{"module": "m.down", "row": 5, "col": 1}, {"module": "m.down", "row": 5, "col": 2}]
    ma = {"token_index": 0, "channel": 5, "value": 600.0, "layers_detected": [1, 2, 3],
          "origin": {"layer": 1, "position": "mlp.down_in", "alias": "y6"},
          "steps": [{"layer": 1, "branch": "mlp", "label": "made at y6 by W_down", "share": 0.67, "weights": w[:1]},
                    {"layer": 2, "branch": "mlp", "label": "made at y6 by W_down", "share": 0.33, "weights": w[1:]}],
          "steps_joint": {"verified": True, "ma_after": 0.0316}}
    (line,) = [f.line() for f in summarize({"report": None, "explain": {"massive_activations": [ma]}})]
    assert line == ("largest massive activation: 600 at token 0, channel 5, layers 1-3; born at layer 1, mlp.down_in "
                    "(y6); built by layer 1 mlp: made at y6 by W_down (67%); layer 2 mlp: made at y6 by W_down (33%), "
                    "through m.down[5, 1] and [5, 2]; verified: ablating all steps leaves 0.0316")


def test_report_is_self_contained(run):
    html = run["html"]
    assert not re.search(r"""(src|href|action|poster|data)\s*=\s*["']?\s*(https?:|//|file:|ftp:)""", html, re.IGNORECASE)
    assert not re.search(r"https?://", html)
    assert not re.search(r"<\s*(script|link|iframe|object|embed|base)\b", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    for m in re.finditer(r"""\b(src|href)\s*=\s*["']([^"']*)""", html):
        assert m.group(2).startswith(("data:image/png;base64,", "#")), m.group(0)[:80]
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == len(EXPECTED_FIGURES)
    embedded = {base64.b64decode(u) for u in uris}
    assert embedded == {f.png for f in run["figs"]}


def test_text_is_escaped(run):
    html = run["html"]
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in html


def test_sections_only_when_their_data_exists(tmp_path):
    model = _planted()
    profile(model, random_windows(model, n=2, seq_len=16), ProfileConfig(batch_size=2)).save(tmp_path)
    path, figs = build(tmp_path)
    html = path.read_text()
    assert "<section id='found'>" in html and "<section id='figures'>" in html
    for absent in ("explain", "mitigation", "compare"):
        assert f"<section id='{absent}'>" not in html
    assert not any(f.name.startswith(("landscape", "mitigation", "compare")) for f in figs)
    # compare alone (as compare.csv) still gives a report
    only = tmp_path / "only"
    only.mkdir()
    (only / "compare.csv").write_text("method,quant,status,ppl,delta_ppl,rel_delta_pct\nnone,fp,ok,39.49,0,0\n"
                                      "tma,fp,ok,39.7,0.21,0.53\n")
    html = build_report(only).read_text()
    assert "<section id='compare'>" in html and "39.7" in html and "<section id='found'>" not in html


def test_errors_are_one_clear_line(tmp_path):
    with pytest.raises(OutlierlabError, match="nothing to report"):
        collect(tmp_path)
    with pytest.raises(OutlierlabError, match="not a folder"):
        collect(tmp_path / "missing")
    (tmp_path / "mitigate.json").write_text("{broken")
    with pytest.raises(OutlierlabError, match="cannot read"):
        collect(tmp_path)


def test_cli_rebuilds_the_report(run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from outlierlab.cli import app

    folder = tmp_path / "copy"
    shutil.copytree(run["folder"], folder)
    (folder / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(folder), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (folder / "report.html").is_file()
    html = (folder / "report.html").read_text()
    assert "<section id='explain'>" in html and "data:image/png" not in html
    result = CliRunner().invoke(app, ["report", str(folder / "nope")])
    assert result.exit_code == 2 and result.output.strip().startswith("error:")


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Results are written through a temp file, but end with the permissions of any new file (umask), not
    mkstemp's 0600, so a shared folder or a web server can read the report."""
    import os
    import stat

    from outlierlab.paths import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left


def test_report_shows_the_per_linear_quantization_error(tmp_path, cache):
    """`quant-error --out DIR` then `report DIR`: a planted channel-wise outlier at layer 1's FFN input (a norm
    gain of 400) breaks layer 1's FFN under W8A8 per-tensor; the section, the figure and the summary name it and
    blame the activations."""
    from conftest import word_text, word_tokenizer
    from typer.testing import CliRunner

    from outlierlab.cli import app
    from outlierlab.report.summary import summary_lines

    model = tiny_model("llama")
    plant_gain(model, 1, "mlp.norm", 5, 400.0)
    folder = tmp_path / "planted"
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    (tmp_path / "text.txt").write_text(word_text(4000))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["quant-error", "--model", str(folder), "--data", str(tmp_path / "text.txt"),
                                   "--seq-len", "16", "--calib-samples", "4", "-n", "2", "--out", str(out),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "quant_error.json").read_text())
    roles, layers, err, share = F.quant_error_matrix(doc)
    i, j = np.unravel_index(int(np.nanargmax(err)), err.shape)
    assert layers[j] == 1 and roles[i] in ("gate", "up", "down") and share[i, j] > 0.9
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    section = html.split("<section id='quant_error'>")[1].split("</section>")[0]
    worst = doc["summary"]["worst_rel_mse"]
    assert worst["operator"].startswith("L1 ") and worst["cause"] == "activation"
    assert f"The worst is <b>{worst['operator']}</b>" in section and "activation-dominated" in section
    assert "<a href='#quant_error'>" in html and (out / "figures" / "quant_error.png").is_file()
    line = next(s for s in summary_lines(out) if s.startswith("quantization error:"))
    assert "w8a8-tensor after none: worst linear L1 " in line and "(activation-dominated" in line


def test_compare_cells_name_their_worst_linear_when_measured(tmp_path):
    """compare --sqnr stores each cell's worst linear; the folded cell list shows it (and only then)."""
    worst = {"operator": "L11 down (mlp.down_in = y6)", "rel_mse": 0.997, "cause": "activation"}
    cells = [{"method": "none", "quant": "fp", "status": "ok", "ppl": 39.49, "rel_delta_pct": 0.0},
             {"method": "none", "quant": "w8a8-tensor", "status": "ok", "ppl": 77.6, "rel_delta_pct": 96.5,
              "sqnr": {"worst_rel_mse": worst}}]
    doc = {"reference": {"method": "none", "quant": "fp", "ppl": 39.49}, "cells": cells}
    atomic_write_json(tmp_path / "compare.json", doc)
    html = build_report(tmp_path, figures=False).read_text()
    assert "<th>worst linear</th>" in html and "L11 down (mlp.down_in = y6) (rel MSE 0.997, activation)" in html
    for c in cells:
        c.pop("sqnr", None)
    atomic_write_json(tmp_path / "compare.json", doc)
    assert "worst linear" not in build_report(tmp_path, figures=False).read_text()
