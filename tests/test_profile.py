"""The profiler on tiny models of every family: planted ground truth found exactly, nothing else; the model
left untouched; no hook left behind; the report's contract; determinism."""

from __future__ import annotations

import json
import time

import pytest
import torch

from outlierlab.adapters import get_adapter
from outlierlab.testing import (
    TINY_FAMILIES,
    plant_gain,
    plant_super_weight,
    random_windows,
    tiny_model,
)
from outlierlab.tracing import ProfileConfig, profile
from outlierlab.tracing.stats import PositionStats

FAMILIES = sorted(TINY_FAMILIES)
POST_NORM_FFN = {"gemma2", "gemma3_text"}
UPSTREAM = {"attn.in", "attn.norm", "mlp.in", "mlp.norm", "block.out"}  # residual stream and norm outputs  # the FFN output is normalized before the residual add


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_random_model_has_no_outliers(model_type):
    model = tiny_model(model_type)
    p = profile(model, random_windows(model), ProfileConfig(batch_size=2))
    assert p.massive_activations == []
    # no CO on the residual stream or at norm outputs (products such as y6 = act(gate) * up are heavy-tailed
    # even with random weights, so a chance 10x channel there is not a false positive of the rule)
    assert [c for c in p.channel_outliers if c["position"] in UPSTREAM] == []
    assert len(p.results) == get_adapter(model).n_layers * len(get_adapter(model).positions())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_planted_super_weight_gives_ma_at_planted_channel(model_type):
    model = tiny_model(model_type)
    plant_super_weight(model, layer=1, row=7, col=13, value=1e5)
    p = profile(model, random_windows(model), ProfileConfig(batch_size=2))
    mas = p.massive_activations
    assert mas, "the planted super weight produced no MA"
    assert {m["channel"] for m in mas} == {7}
    assert min(m["layer"] for m in mas) == 1
    where = {(m["layer"], m["position"]) for m in mas}
    assert (1, "mlp.out") in where
    if model_type not in POST_NORM_FFN:
        assert (1, "block.out") in where
    for m in mas:
        assert abs(m["value"]) > 100 and set(m) >= {"layer", "position", "alias", "token_index", "token",
                                                    "channel", "value"}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_planted_gain_gives_co_at_norm_output(model_type):
    model = tiny_model(model_type)
    plant_gain(model, layer=0, norm="attn.norm", channel=21, gain=60.0)
    p = profile(model, random_windows(model), ProfileConfig(batch_size=2))
    at_norm = [c for c in p.channel_outliers if c["layer"] == 0 and c["position"] == "attn.norm"]
    assert [c["channel"] for c in at_norm] == [21]
    assert at_norm[0]["ratio"] > 20
    # No other CO at any norm output or on the residual stream. (Downstream linear outputs may inherit one:
    # a 60x channel dominates v = W_v y2 for every token, so large entries of W_v[:, 21] can show up as a CO
    # in the attention context - a real consequence, not a false positive.)
    found = {(c["layer"], c["position"], c["channel"]) for c in p.channel_outliers if c["position"] in UPSTREAM}
    assert found <= {(0, "attn.norm", 21), (0, "mlp.norm", 21)}
    assert (0, "attn.norm", 21) in found


def test_weights_bit_identical_and_no_hooks_left():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert hook_count(model) == 0
    profile(model, random_windows(model), ProfileConfig())
    assert hook_count(model) == 0
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_timings_split_the_profile():
    model = tiny_model("llama")
    t0 = time.perf_counter()
    p = profile(model, random_windows(model), ProfileConfig(batch_size=2))
    wall = time.perf_counter() - t0
    assert set(p.timings) == {"trace_s", "finalize_s", "weights_s", "detect_s"}
    assert 0 < p.timings["trace_s"] and 0 <= p.timings["finalize_s"] and sum(p.timings.values()) <= wall


def test_hooks_removed_when_tracing_fails(monkeypatch):
    model = tiny_model("gpt2")

    def boom(self, x, window0=0):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(PositionStats, "update", boom)
    with pytest.raises(RuntimeError, match="planted failure"):
        profile(model, random_windows(model), ProfileConfig())
    assert hook_count(model) == 0


def test_nan_activation_is_a_clear_error():
    from outlierlab.errors import NonFiniteActivation

    model = tiny_model("llama")
    with torch.no_grad():
        get_adapter(model).layers()[1].mlp.down_proj.weight[3, 3] = float("nan")
    with pytest.raises(NonFiniteActivation, match="layer 1"):
        profile(model, random_windows(model), ProfileConfig())


def test_report_contract_and_determinism(tmp_path):
    model = tiny_model("llama")
    plant_super_weight(model, 1, 7, 13, 1e5)
    ids = random_windows(model)
    reports = []
    for run in range(2):
        p = profile(model, ids, ProfileConfig(batch_size=2))
        path = p.save(tmp_path / f"run{run}")
        reports.append(json.loads(path.read_text()))
        assert (tmp_path / f"run{run}" / "profile.safetensors").is_file()
        assert not [f for f in (tmp_path / f"run{run}").iterdir() if f.name.startswith(".")]
    r = reports[0]
    for key in ("schema_version", "model", "config", "versions", "seed", "timings", "massive_activations",
                "channel_outliers", "layers"):
        assert key in r
    assert len(r["layers"]) == 3
    block = r["layers"][1]["block.out"]
    assert {"absmax", "median", "top"} <= set(block) and block["alias"] == "y8"
    assert block["top"][0][2] == 7
    for run in reports:
        run.pop("timings")
    assert reports[0] == reports[1]


def test_same_as_positions_share_statistics():
    model = tiny_model("phi")
    p = profile(model, random_windows(model), ProfileConfig())
    a, b = p.get(0, "attn.in"), p.get(0, "mlp.in")
    assert b.same_as == "attn.in" and a.stats is b.stats
    assert p.get(0, "mlp.down_in").same_as == "mlp.act"


def test_subset_of_layers_and_positions():
    model = tiny_model("llama")
    p = profile(model, random_windows(model), ProfileConfig(layers=(2,), positions=("block.out", "mlp.down_in")))
    assert set(p.results) == {(2, "block.out"), (2, "mlp.down_in")}


def test_detection_shortcuts_give_the_full_rules_answer():
    """massive_activations returns early when absmax is under the threshold and channel_outliers when the
    largest channel median is under co_k x median (float32, as the per-channel rule divides): at the float32
    boundary, and without the precomputed maximum (a profile read back from disk), the answer is the rule's."""
    import numpy as np

    from outlierlab.analysis.detect import (
        DetectConfig,
        channel_outliers,
        massive_activations,
    )

    cfg = DetectConfig(co_k=10.0)
    med = 0.3  # not a power of two: the division rounds
    f32 = np.float32
    at_k = f32(10.0) * f32(med)  # the smallest float32 whose ratio to med is >= 10 in float32
    while at_k / f32(med) >= f32(10.0):
        at_k = np.nextafter(at_k, f32(0.0))
    while at_k / f32(med) < f32(10.0):
        at_k = np.nextafter(at_k, f32(np.inf))
    at_k, below = float(at_k), float(np.nextafter(at_k, f32(0.0)))
    for top, hit in ((at_k, True), (below, False)):
        chan = torch.tensor([0.1, top, 0.2], dtype=torch.float32)
        stats = {"median": med, "chan_median": chan, "chan_absmax": chan * 2, "chan_median_max": float(chan.max())}
        with_max = channel_outliers(stats, cfg)
        del stats["chan_median_max"]
        assert with_max == channel_outliers(stats, cfg)
        assert [c["channel"] for c in with_max] == ([1] if hit else [])
    top = {"top_value": torch.tensor([150.0, -90.0]), "top_window": torch.tensor([0, 1]),
           "top_token": torch.tensor([3, 4]), "top_channel": torch.tensor([5, 6])}
    ma_cfg = DetectConfig(ma_abs=100.0, ma_rel=1000.0)
    assert [m["channel"] for m in massive_activations({**top, "median": 0.01, "absmax": 150.0}, ma_cfg)] == [5]
    assert massive_activations({**top, "median": 0.01, "absmax": 100.0}, ma_cfg) == []  # absmax at the threshold
    assert [m["channel"] for m in massive_activations({**top, "median": 0.01}, ma_cfg)] == [5]


def test_small_gpu_profiles_trace_with_eager_statistics():
    """"auto" on CUDA: eager statistics below EAGER_BELOW (tokens x hidden x layers), where compiling the Triton
    kernels on a fresh machine would cost more than they save; the kernels above it; a mode the user set, and
    every CPU profile, as given."""
    from outlierlab.tracing.profiler import EAGER_BELOW, stats_for
    from outlierlab.tracing.stats import StatsConfig

    cuda, cpu, auto = torch.device("cuda"), torch.device("cpu"), StatsConfig()
    assert stats_for(auto, cuda, 2 * 128, 576, 30).compile == "never"  # the default model, 2 x 128 tokens
    assert stats_for(auto, cuda, 16 * 2048, 4096, 32) == auto  # a 7B profile of 16 x 2048
    tokens = EAGER_BELOW // (576 * 30)
    assert stats_for(auto, cuda, tokens, 576, 30).compile == "never"
    assert stats_for(auto, cuda, tokens + 1, 576, 30) == auto
    assert stats_for(StatsConfig(compile="graphs"), cuda, 256, 576, 30).compile == "graphs"
    assert stats_for(auto, cpu, 256, 576, 30) == auto


def test_the_profile_runs_and_records_the_statistics_path_chosen(monkeypatch):
    """profile() asks stats_for with the whole profile's tokens (every rank alike), traces with its answer and
    records it in the report; a CPU profile keeps "auto" (resolved per update)."""
    from dataclasses import replace

    from outlierlab.tracing import profiler

    model = tiny_model("llama")
    windows = random_windows(model)
    assert profile(model, windows, ProfileConfig(batch_size=2)).to_json()["config"]["stats"]["compile"] == "auto"
    asked = []

    def eager(stats, device, tokens, hidden, layers):
        asked.append((device.type, tokens, hidden, layers))
        return replace(stats, compile="never")

    monkeypatch.setattr(profiler, "stats_for", eager)
    used = []
    real_init = PositionStats.__init__
    monkeypatch.setattr(PositionStats, "__init__", lambda self, config: used.append(config.compile)
                        or real_init(self, config))
    prof = profile(model, windows, ProfileConfig(batch_size=2))
    assert asked == [("cpu", windows.numel(), model.config.hidden_size, get_adapter(model).n_layers)]
    assert set(used) == {"never"} and prof.to_json()["config"]["stats"]["compile"] == "never"
