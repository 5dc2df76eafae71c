"""The explainer on tiny models with planted ground truth: a token-specific MA made by one down-projection
weight, one large norm gain, one outlier-triggering column of W_q. It must name exactly those, and nothing
else above threshold; it must leave the model bit-identical and hook-free; its JSON keeps the contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from outlierlab.adapters import get_adapter
from outlierlab.analysis.explain import ExplainConfig, explain, profile_from_report
from outlierlab.analysis.explain_ma import cancellation
from outlierlab.analysis.layout import capture_token_rows, linear_parts
from outlierlab.analysis.records import Edit
from outlierlab.testing import (
    BOS,
    TINY_FAMILIES,
    plant_attention_ma,
    plant_bias_ma,
    plant_ffn_steps,
    plant_gain,
    plant_norm_gain_ma,
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


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
def test_causal_prefix_gives_the_rows_of_the_whole_window(model_type):
    """Every family is a causal decoder: the rows of tokens 0..5 from the window cut after token 5 equal those
    of the whole window (what capture_token_rows and attention_reads rely on), and so do the attention reads."""
    from outlierlab.analysis.attribution import attention_reads

    model = tiny_model(model_type)
    ad = get_adapter(model)
    ids = random_windows(model, 1, 24)[0]
    cut = capture_token_rows(model, ad, ids, [0, 5])
    ad.causal = False  # this instance runs whole windows
    whole = capture_token_rows(model, ad, ids, [0, 5])
    assert cut.keys() == whole.keys() and len(cut) > 10
    for key, rows in whole.items():
        torch.testing.assert_close(cut[key], rows, rtol=1e-4, atol=1e-5, msg=f"{model_type} {key}")
    ctx = whole[(1, "attn.ctx")][1] if (1, "attn.ctx") in whole else None
    if ctx is not None:
        reads_whole = attention_reads(model, ad, ids, 1, 5, ctx, [0, 1])
        ad.causal = True
        reads_cut = attention_reads(model, ad, ids, 1, 5, ctx, [0, 1])
        if reads_whole is not None:
            assert [(r.head, [k.key_position for k in r.keys]) for r in reads_cut] == [
                (r.head, [k.key_position for k in r.keys]) for r in reads_whole]


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


# -- origin steps: every mechanism on planted models (also on CUDA: pytest --device cuda -k step) -----------
def explained(model, **cfg):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp = explain(model, windows(model), ExplainConfig(**cfg), eval_windows=windows(model, 2, 32, seed=1))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every ablation restored bit-exactly
    assert hook_count(model) == 0
    return exp


def group(exp, token=0, channel=MA["d"]):
    return next(g for g in exp.massive_activations if (g["token_index"], g["channel"]) == (token, channel))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_two_ffn_steps_are_both_origins(model_type, lane_device):
    """Two FFNs write 2/3 and 1/3 of the MA, each reading the token by itself, with y6 (y4) values far below the
    MA rule: both layers are origin steps, neither ablation alone removes the MA, both together do."""
    model = tiny_model(model_type)
    plant_ffn_steps(model, ((1, 400.0), (2, 200.0)), k=MA["k"], j=MA["j"], d=MA["d"], c=6.0)
    exp = explained(model.to(lane_device), max_mas=1, max_ablations=3)
    g = group(exp)
    assert [(s.layer, s.branch, s.mechanism) for s in g["steps"]] == [(1, "mlp", "down_proj"), (2, "mlp", "down_proj")]
    assert [s.share for s in g["steps"]] == [pytest.approx(2 / 3, abs=0.05), pytest.approx(1 / 3, abs=0.05)]
    for s in g["steps"]:
        (w,) = s.weights
        assert (w.module, w.row, w.col) == (down_module(model, s.layer), MA["d"], MA["j"])
        assert w.weight == pytest.approx(stored_down_weight(model, s.layer, MA["d"], MA["j"]))
        assert [c["channel"] for c in s.channels] == [MA["j"]]
        assert s.ablation.verified is False and s.ablation.ma_after > 100  # one step alone is not enough
    assert g["steps_joint"].verified is True and g["steps_joint"].ma_after < 100
    # the y6 (y4) inputs are far below the MA rule: the threshold is not what makes an origin
    assert not any(m["position"] == "mlp.down_in" and m["token_index"] == 0 for m in exp.profile.massive_activations)
    assert {(s["layer"], s["row"], s["col"]) for s in g["super_weights"]} == {(1, MA["d"], MA["j"]), (2, MA["d"], MA["j"])}
    text = " ".join(exp.narrative())
    assert "built in 2 steps" in text and "explained (verified by ablation)" in text
    assert "made at y6 by W_down" in text if get_adapter(model).ffn_kind == "glu" else "made at y4 by W_fc2" in text


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_post_norm_gain_step(model_type, lane_device):
    """An ordinary FFN output (normalized value about 1) times a post-FFN norm gain of 2000: the step is the
    gain, named with the norm, channel, gain and median gain; setting the gain to the median removes the MA."""
    model = tiny_model(model_type)
    plant_norm_gain_ma(model, layer=1, k=MA["k"], j=MA["j"], d=MA["d"], gain=2000.0)
    exp = explained(model.to(lane_device), max_mas=1, max_ablations=2)
    g = group(exp)
    assert g["on_residual"] and abs(g["value"]) > 1000
    (s,) = g["steps"]
    assert (s.layer, s.branch, s.mechanism) == (1, "mlp", "norm_gain")
    assert s.label == "made by the post-FFN norm gain"
    n = s.norm
    assert n.module == "model.layers.1.post_feedforward_layernorm" and n.norm == "mlp.post_norm"
    assert n.channel == MA["d"] and n.gain == pytest.approx(2000.0) and n.median_gain == pytest.approx(1.0, abs=0.1)
    assert abs(n.pre_gain) < 3 and n.gain_share > 0.8
    (e,) = s.ablation.edits
    offset = 1.0  # Gemma stores gamma - 1
    assert (e.kind, e.module, e.param, e.index) == ("gain", n.module, "weight", (MA["d"],))
    assert e.to == pytest.approx(n.median_gain - offset)
    assert s.ablation.verified is True and s.ablation.ma_after < 100
    assert g["super_weights"] == []  # no weight makes it
    assert "made by the post-FFN norm gain" in " ".join(exp.narrative())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_attention_output_step(model_type, lane_device):
    """W_o[d, j] writes the MA from context channel j, which token 0 reads from itself (key position 0, p = 1);
    token 1 reads the same key with its attention probability."""
    model = tiny_model(model_type)
    j = plant_attention_ma(model, layer=1, k=MA["k"], d=MA["d"], value=1000.0)
    exp = explained(model.to(lane_device), max_mas=2, max_ablations=1)
    for token in (0, 1):
        (s,) = group(exp, token)["steps"]
        assert (s.layer, s.branch, s.mechanism) == (1, "attn", "o_proj")
        (w,) = s.weights
        assert (w.role, w.row, w.col) == ("o", MA["d"], j)
        (read,) = s.attention
        assert read.channel == j and read.head == j // 16  # head_dim 16 in the tiny configs
        assert read.keys[0].key_position == 0 and read.keys[0].share == pytest.approx(1.0, abs=0.05)
        assert s.ablation.verified is True
    assert group(exp, 0)["steps"][0].attention[0].keys[0].prob == pytest.approx(1.0)
    assert group(exp, 1)["steps"][0].attention[0].keys[0].prob < 1.0
    assert "reading key position 0" in " ".join(exp.narrative())


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_bias_step(model_type, lane_device):
    model = tiny_model(model_type)
    plant_bias_ma(model, layer=1, d=MA["d"], value=1000.0)
    exp = explained(model.to(lane_device), max_mas=2, max_ablations=1)
    g = exp.massive_activations[0]
    assert g["channel"] == MA["d"]
    (s,) = g["steps"]
    assert (s.layer, s.branch, s.mechanism) == (1, "mlp", "bias")
    assert s.bias.channel == MA["d"] and s.bias.value == pytest.approx(1000.0) and s.bias.share > 0.9
    assert [e.kind for e in s.ablation.edits] == ["bias"] and s.weights == []
    assert s.ablation.verified is True and g["super_weights"] == []
    assert "made by the bias of W_fc2" in " ".join(exp.narrative())


def test_every_edit_kind_is_restored_when_the_run_fails(monkeypatch):
    import outlierlab.analysis.explain_ma as ema

    model = tiny_model("gemma2")
    plant_norm_gain_ma(model)
    edits = (Edit("gain", 1, "model.layers.1.post_feedforward_layernorm", "weight", (7,), 0.0),
             Edit("weight", 1, "model.layers.1.mlp.down_proj", "weight", (7, 13), 0.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"), ema.edited(model, edits):
        assert float(model.model.layers[1].post_feedforward_layernorm.weight.detach()[7]) == 0.0
        raise RuntimeError("inside")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(ema, "capture_token_rows", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        explain(model, windows(model), ExplainConfig(max_mas=1), eval_windows=windows(model, 1, 32, seed=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hook_count(model) == 0


def test_attention_reads_restore_the_attention_implementation(lane_device):
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    j = plant_attention_ma(model)
    exp = explained(model.to(lane_device), max_mas=1, ablate=False)
    assert model.config._attn_implementation == "sdpa"
    (s,) = group(exp)["steps"]
    assert s.attention[0].channel == j and s.attention[0].keys[0].key_position == 0


def _documented_keys(heading: str) -> set[str]:
    """The keys of the markdown table under ``heading`` in docs/explain.md."""
    text = (Path(__file__).parents[1] / "docs" / "explain.md").read_text()
    table = text.split(heading, 1)[1].split("\n\n", 2)[1]
    keys = set()
    for line in table.splitlines()[2:]:
        cell = line.split("|")[1]
        keys.update(k.strip().strip("`").rstrip("?") for k in cell.split(","))
    return keys


def test_written_json_follows_the_documented_schema(tmp_path):
    model = tiny_model("llama")
    plant_ffn_steps(model, c=6.0)
    exp = explained(model, max_mas=1, max_ablations=3)
    js = json.loads(json.dumps(exp.to_json(), allow_nan=False))
    assert js["version"] == "1.1"
    g = js["massive_activations"][0]
    documented = _documented_keys("### `massive_activations[i]`")
    assert set(g) <= documented
    assert documented - {"decomposition", "joint_ablation"} <= set(g)  # those two only when they apply
    step_keys = _documented_keys("### `massive_activations[i].steps[k]`")
    for s in g["steps"]:
        assert set(s) == step_keys
        assert set(s["ablation"]) == _documented_keys("#### ablation records")
    assert set(g["steps_joint"]) == _documented_keys("#### ablation records")
    assert {"n_explained", "n_origin_steps"} <= set(js["summary"])


def test_report_shows_the_origin_steps():
    from outlierlab.report.html import section_explain

    model = tiny_model("llama")
    plant_ffn_steps(model)
    html = section_explain(explained(model, max_mas=1, max_ablations=1).to_json())
    assert "built by (origin steps" in html
    assert "layer 1 mlp: made at y6 by W_down (67%); layer 2 mlp: made at y6 by W_down (33%); explained" in html
