"""The explainer on tiny models with planted ground truth: a token-specific MA made by one down-projection
weight, one large norm gain, one outlier-triggering column of W_q. It must name exactly those, and nothing
else above threshold; it must leave the model bit-identical and hook-free; its JSON keeps the contract."""

from __future__ import annotations

import json
import math

import pytest
import torch

from outlierlab.adapters import get_adapter
from outlierlab.analysis.explain import ExplainConfig, explain, profile_from_report
from outlierlab.analysis.explain_ma import cancellation
from outlierlab.analysis.layout import capture_token_rows, linear_parts
from outlierlab.testing import (
    BOS,
    TINY_FAMILIES,
    plant_gain,
    plant_otc_column,
    plant_token_ma,
    random_windows,
    tiny_model,
)
from outlierlab.tracing import ProfileConfig, profile

FAMILIES = ["llama", "gemma3_text", "gpt2", "opt", "gpt_neox"]
GAMMA = {"layer": 0, "norm": "attn.norm", "channel": 21, "gain": 60.0}
MA = {"layer": 1, "k": 5, "j": 13, "d": 7}
OTC = {"layer": 2, "col": 40, "scale": 50.0}
RESIDUAL = {"attn.in", "mlp.in", "block.out"}
NORM_OUT = {"attn.norm", "mlp.norm", "attn.post_norm", "mlp.post_norm"}


def windows(model, n=4, seq_len=32, seed=0):
    """Random windows that all start with the same token (as real text starts with BOS or a delimiter)."""
    ids = random_windows(model, n, seq_len, seed=seed)
    ids[:, 0] = BOS
    return ids


def planted(model_type: str, **ma):
    model = tiny_model(model_type)
    plant_gain(model, **GAMMA)
    plant_token_ma(model, **{**MA, **ma})
    plant_otc_column(model, OTC["layer"], OTC["col"], OTC["scale"])
    return model


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def down_module(model, layer: int) -> str:
    ad = get_adapter(model)
    part = next(p for p in linear_parts(ad, layer) if p.role in ("down", "fc2"))
    return part.module


def stored_down_weight(model, layer: int, row: int, col: int) -> float:
    ad = get_adapter(model)
    part = next(p for p in linear_parts(ad, layer) if p.role in ("down", "fc2"))
    return float(ad.linear_weight(layer, part.spec).detach()[row, col])


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    model = planted(request.param)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp = explain(model, windows(model), ExplainConfig(), eval_windows=windows(model, 2, 32, seed=1))
    return request.param, model, before, exp


def test_names_exactly_the_planted_super_weight(case):
    _, model, _, exp = case
    js = exp.to_json()
    mas = js["massive_activations"]
    assert [(g["token_index"], g["channel"]) for g in mas] == [(0, MA["d"])]
    g = mas[0]
    assert abs(g["value"]) > 200  # the MA rule threshold is 100 here
    assert g["origin"]["layer"] == MA["layer"] and g["origin"]["writer"] == "mlp.out"
    assert g["origin"]["position"].startswith("mlp.")
    assert [c["channel"] for c in g["down_in_channels"]] == [MA["j"]]
    assert abs(g["down_in_channels"][0]["share"] - 1.0) < 0.01
    (sw,) = g["super_weights"]
    assert (sw["module"], sw["row"], sw["col"]) == (down_module(model, MA["layer"]), MA["d"], MA["j"])
    assert sw["value"] == pytest.approx(stored_down_weight(model, MA["layer"], MA["d"], MA["j"]))
    assert sw["verified"] is True
    assert sw["ma_after"] < 100 < abs(g["value"])
    assert math.isfinite(sw["ppl_before"]) and math.isfinite(sw["ppl_after"]) and sw["ppl_before"] > 1
    # the MA's rows of W_gate/W_up (or W_fc1) are the ones most aligned with the token's normalized input
    rows = g["down_in_channels"][0]["rows"]
    assert rows and all(r["cosine_rank"] == 1 and r["cosine"] > 0.3 for r in rows)
    if get_adapter(model).ffn_kind == "glu":
        c = g["down_in_channels"][0]
        assert c["gate"] > 5 and c["up"] > 5 and c["value"] == pytest.approx(c["act"] * c["up"], rel=1e-3)


def test_propagation_covers_every_layer(case):
    model_type, model, _, exp = case
    g = exp.to_json()["massive_activations"][0]
    n = get_adapter(model).n_layers
    prop = g["propagation"]
    assert [p["layer"] for p in prop] == list(range(n))
    peak = max(abs(p["mlp_out"]) for p in prop)
    assert abs(prop[MA["layer"]]["mlp_out"]) == peak
    if g["on_residual"]:
        assert abs(prop[0]["value"]) < 10 and abs(prop[MA["layer"]]["value"]) > 500
        assert abs(prop[MA["layer"]]["ffn"]) > 500 and abs(prop[MA["layer"]]["attn"]) < 10
        assert g["cancel_layers"] == [] and g["cancelled_at"] is None  # nothing cancels it in 3 layers
    else:  # Gemma 3's post-FFN norm squashes the FFN output before the residual add
        assert model_type == "gemma3_text"


def test_names_exactly_the_planted_gamma_channel(case):
    _, _, _, exp = case
    cos = exp.to_json()["channel_outliers"]
    upstream = [c for c in cos if c["position"] in NORM_OUT | RESIDUAL]
    assert [(c["layer"], c["position"], c["channel"]) for c in upstream] == [
        (GAMMA["layer"], GAMMA["norm"], GAMMA["channel"])]
    (c,) = upstream
    assert c["gamma"] == pytest.approx(GAMMA["gain"])
    assert c["gain_ratio"] > 30 and c["ratio_after"] > 10 and c["ratio_before"] < 3
    assert c["gamma_share"] > 0.7
    assert c["persistence"] == "single-layer" and c["layers"] == [GAMMA["layer"]]
    assert c["kind"] == "channel-wise" and c["token_fraction"] >= 0.5
    # the q/k/v columns reading it are OTCs caused by the activation, and listed on the CO
    assert c["otc"] and {o["col"] for o in c["otc"]} == {GAMMA["channel"]}
    assert all(o["cause"] == "activation" for o in c["otc"])
    # downstream of the gain only projection outputs/inputs may inherit a CO, never a norm or the residual
    assert all(c["gamma"] is None for c in cos if c is not upstream[0])


def test_names_exactly_the_planted_otc_column(case):
    _, model, _, exp = case
    otcs = exp.to_json()["otcs"]
    ad = get_adapter(model)
    attn_module = next(p.module for p in linear_parts(ad, OTC["layer"]) if p.role in ("q", "qkv") or
                       p.output_position == "attn.q")
    weight = {(o["layer"], o["module"], o["col"]) for o in otcs if o["cause"] == "weight"}
    assert weight == {(OTC["layer"], attn_module, OTC["col"])}
    roles = {o["role"] for o in otcs if o["cause"] == "weight"}
    fused = any(p.rows is not None for p in linear_parts(ad, OTC["layer"]) if p.role == "q")
    assert roles == ({"q", "k", "v"} if fused else {"q"})  # plant_otc_column scales the whole fused column
    for o in otcs:
        if o["cause"] == "weight":
            assert o["weight_ratio"] > 30 and o["ratio"] >= 10
        else:  # every other flagged column reads the planted gamma channel
            assert (o["layer"], o["col"]) == (GAMMA["layer"], GAMMA["channel"])


def test_model_untouched_and_no_hooks(case):
    _, model, before, _ = case
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hook_count(model) == 0


def test_json_contract_and_narrative(case):
    _, model, _, exp = case
    js = json.loads(json.dumps(exp.to_json(), allow_nan=False))
    g = js["massive_activations"][0]
    assert {"token_index", "channel", "value", "origin", "down_in_channels", "super_weights",
            "propagation"} <= set(g)
    assert {"layer", "position"} <= set(g["origin"])
    assert {"channel", "value", "gate", "up"} <= set(g["down_in_channels"][0])
    assert {"module", "row", "col", "value", "verified", "ma_after", "ppl_before", "ppl_after"} <= set(
        g["super_weights"][0])
    assert {"layer", "value"} <= set(g["propagation"][0])
    for c in js["channel_outliers"]:
        assert {"layer", "position", "channel", "ratio", "gamma", "gamma_share", "otc"} <= set(c)
        for o in c["otc"]:
            assert {"module", "col", "score"} <= set(o)
    text = " ".join(exp.narrative())
    name = "W_down" if get_adapter(model).ffn_kind == "glu" else "W_fc2"
    assert f"{name}[{MA['d']}, {MA['j']}]" in text and "is a super weight" in text
    assert f"layer {MA['layer']}" in text and f"channel {GAMMA['channel']}" in text


def test_origin_is_the_down_projection_input_of_a_glu_ffn():
    model = planted("llama")
    exp = explain(model, windows(model), ExplainConfig(ablate=False))
    g = exp.massive_activations[0]
    assert g["origin"]["position"] == "mlp.down_in" and g["origin"]["alias"] == "y6"
    chain = {c["position"]: c for c in g["chain"]}
    assert not chain["mlp.gate"]["is_ma"] and not chain["mlp.up"]["is_ma"] and chain["mlp.down_in"]["is_ma"]
    # values agree with an independent capture of the same window
    rows = capture_token_rows(model, get_adapter(model), windows(model)[g["window"]], [0])
    c = g["down_in_channels"][0]
    for pos, key in (("mlp.gate", "gate"), ("mlp.up", "up"), ("mlp.down_in", "value")):
        assert c[key] == pytest.approx(float(rows[(MA["layer"], pos)][0, MA["j"]]))
    assert all(s["verified"] is None for s in g["super_weights"])  # ablate=False


def test_origin_observed_not_assumed_in_a_gelu_ffn():
    """With a stronger trigger the GPT-2 fc1 output (y3) already breaks the MA rule: that is what is reported."""
    model = planted("gpt2", a=30.0)
    exp = explain(model, windows(model), ExplainConfig(ablate=False))
    g = exp.massive_activations[0]
    first = next(c for c in g["chain"] if c["position"].startswith("mlp.") and c["position"] != "mlp.in"
                 and c["is_ma"])
    assert g["origin"]["position"] == first["position"] == "mlp.fc1"
    assert {(o["layer"], o["position"]) for o in exp.other_massive if o["in_origin_of"] == 0} >= {
        (MA["layer"], "mlp.fc1"), (MA["layer"], "mlp.act")}


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
def test_linear_parts_reproduce_the_traced_projections(model_type):
    """Fused q/k/v and gate/up are cut exactly as their positions are: W_part x + b == the traced output."""
    model = tiny_model(model_type)
    ad = get_adapter(model)
    ids = random_windows(model, 1, 16)[0]
    rows = capture_token_rows(model, ad, ids, [3])
    smap = {p.name: p.same_as or p.name for p in ad.positions()}
    checked = 0
    for part in linear_parts(ad, 1):
        if part.output_position is None or (1, part.output_position) not in rows:
            continue
        x = rows[(1, smap[part.input_position])][0]
        y = part.weight(ad, 1) @ x
        b = part.bias(ad, 1)
        if b is not None:
            y = y + b
        assert torch.allclose(y, rows[(1, part.output_position)][0], atol=1e-4), (model_type, part.role)
        checked += 1
    assert checked >= 4


def test_otc_in_fused_qkv_and_gemma_gain_convention():
    model = tiny_model("phi3")
    plant_otc_column(model, 2, 40, 50.0)
    exp = explain(model, windows(model), ExplainConfig(ablate=False))
    weight = {(o["layer"], o["module"], o["col"], o["role"]) for o in exp.otcs if o["cause"] == "weight"}
    assert weight == {(2, "model.layers.2.self_attn.qkv_proj", 40, r) for r in ("q", "k", "v")}
    assert exp.channel_outliers == [] and exp.massive_activations == []

    gemma = tiny_model("gemma")
    plant_gain(gemma, 1, "mlp.norm", 9, 40.0)  # stored weight 39: effective gain 1 + w
    exp = explain(gemma, windows(gemma), ExplainConfig(ablate=False))
    (c,) = [c for c in exp.channel_outliers if c["position"] == "mlp.norm"]
    assert (c["layer"], c["channel"]) == (1, 9) and c["gamma"] == pytest.approx(40.0)
    assert c["gamma_share"] > 0.7
    assert {(o["role"], o["col"]) for o in c["otc"]} == {("gate", 9), ("up", 9)}


def test_saved_profile_gives_the_same_explanation(tmp_path):
    model = planted("llama")
    ids = windows(model)
    p = profile(model, ids, ProfileConfig(batch_size=2))
    p.save(tmp_path / "prof")
    loaded = profile_from_report(tmp_path / "prof")
    cfg = ExplainConfig(ablate=False)
    a = explain(model, ids, cfg, profile=p).to_json()
    b = explain(model, ids, cfg, profile=loaded).to_json()
    for key in ("massive_activations", "channel_outliers", "otcs", "qk_outliers"):
        assert a[key] == b[key], key


def test_ablation_restores_the_weight_when_the_run_fails(monkeypatch):
    import outlierlab.analysis.explain_ma as ema

    model = planted("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(ema, "capture_token_rows", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        explain(model, windows(model), ExplainConfig(), eval_windows=windows(model, 1, 32, seed=1))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hook_count(model) == 0


def test_cancellation_rule():
    vals = [1, 100, 1000, 1000, 950, 400, 50]
    prop = [{"value": v, "attn": 0.0, "ffn": (v - (vals[i - 1] if i else 0))} for i, v in enumerate(vals)]
    c = cancellation(prop, cancel_step=0.2, cancel_fraction=0.1)
    assert c["peak_layer"] == 2 and c["peak"] == 1000
    assert [x["layer"] for x in c["cancel_layers"]] == [5, 6]
    assert all(x["by"] == "ffn" for x in c["cancel_layers"])
    assert c["cancelled_at"] == 6 and c["final_fraction"] == pytest.approx(0.05)


def test_cli_explain_and_profile_reuse(tiny_folder, tmp_path, cache):
    from typer.testing import CliRunner

    from outlierlab.cli import app

    runner = CliRunner()
    text = str(tmp_path / "text.txt")
    common = ["--model", str(tiny_folder), "--seq-len", "32", "-n", "3", "--eval-data", text,
              "--eval-seq-len", "32", "--eval-samples", "2", "--no-progress"]
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", "--data", text, "-o", str(out), *common])
    assert result.exit_code == 0, result.output
    assert "explain took" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "profile" and {"massive_activations", "channel_outliers", "otcs"} <= set(
        report["explain"])
    # reuse the saved profile: same windows rebuilt from its data section
    out2 = tmp_path / "out2"
    result = runner.invoke(app, ["explain", "--profile", str(out), "-o", str(out2), *common])
    assert result.exit_code == 0, result.output
    assert "profile reused" in result.output
    again = json.loads((out2 / "report.json").read_text())
    assert again["explain"]["channel_outliers"] == report["explain"]["channel_outliers"]
    # a folder without a profile is one clear line
    result = runner.invoke(app, ["explain", "--profile", str(tmp_path / "nothing"), "-o", str(out2), *common])
    assert result.exit_code == 2 and result.output.strip().startswith("error:")
    assert len(result.output.strip().splitlines()) == 1
