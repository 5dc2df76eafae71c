"""Mitigation methods on tiny models of every family: exactness through a plain-transformers reload, the TMA
hooks (modes, compensation, removal), OTC scoring/closed form/fine-tuning, prefix, export/load, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from outlierlab.adapters import get_adapter
from outlierlab.mitigation import (
    METHODS,
    GammaConfig,
    MitigationError,
    OTCConfig,
    PrefixConfig,
    RotateConfig,
    SmoothQuantConfig,
    TMAConfig,
    mitigate,
    resolve,
)
from outlierlab.mitigation.base import down_spec, linear_spec, linear_weight
from outlierlab.runtime import registry
from outlierlab.testing import TINY_FAMILIES, random_windows, tiny_model

FAMILIES = sorted(TINY_FAMILIES)
SANDWICH = {"gemma2", "gemma3_text"}
#: one family per layout the runtime hooks must handle: GLU, fused projections, sandwich norms, Conv1D,
#: OPT's flattened FFN, parallel blocks (fused qkv; shared norm)
LAYOUTS = ["llama", "phi3", "gemma2", "gpt2", "opt", "gpt_neox", "phi"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def perturbed(family: str, tiny_eps: bool = False):
    """A tiny model whose norm gains and biases are far from their init (so folding them is tested)."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name or ".ln" in name or "ln_" in name:
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    if tiny_eps:
        for m in model.modules():
            for attr in ("eps", "variance_epsilon"):
                if isinstance(getattr(m, attr, None), float):
                    setattr(m, attr, 1e-30)
    return model


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def plant_massive_token(model, layer: int, token: int = 7, channel: int = 3, row: int = 5, alpha: float = 10.0):
    """Make ``token`` produce a massive y6 at ``layer`` (channel ``channel``) written to residual dim ``row``.

    The token's embedding points along a random direction ``v`` that the gate/up (or fc1) rows of
    ``channel`` read with a large weight, so only that token gets a huge y6 there, like the first token of
    SmolLM2.
    """
    adapter = get_adapter(model)
    emb = model.get_input_embeddings().weight
    d = emb.shape[1]
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(d, generator=gen)
    v = v - v.mean()
    v = v / v.norm()
    emb[token] = v * float(emb.norm(dim=1).mean()) * 3
    roles = {s.role for s in adapter.linears()}
    if adapter.ffn_kind == "glu":
        if "gate_up" in roles:
            w = linear_weight(adapter, layer, linear_spec(adapter, "gate_up"))
            n = w.shape[0] // 2
            w[channel] = alpha * v
            w[n + channel] = alpha * v
        else:
            linear_weight(adapter, layer, linear_spec(adapter, "gate"))[channel] = alpha * v
            linear_weight(adapter, layer, linear_spec(adapter, "up"))[channel] = alpha * v
    else:
        linear_weight(adapter, layer, linear_spec(adapter, "fc1"))[channel] = 20 * alpha * v
    w_down = linear_weight(adapter, layer, down_spec(adapter))
    w_down[row, channel] = 1.0


def ma_windows(model, n: int = 4, seq_len: int = 24, token: int = 7) -> torch.Tensor:
    ids = random_windows(model, n, seq_len)
    ids[ids == token] = token + 1
    ids[:, 0] = token
    return ids


# -- registry ----------------------------------------------------------------------------------------------
def test_registry_and_composition_order():
    assert set(METHODS) == {"none", "tma", "gamma", "otc", "smoothquant", "rotate", "prefix", "paper",
                            "quarot", "spinquant"}
    for cls in METHODS.values():
        cls()  # every config has defaults
    names = [type(c).__name__ for c in resolve(["prefix,rotate", "paper", SmoothQuantConfig()])]
    assert names == ["PrefixConfig", "GammaConfig", "SmoothQuantConfig", "TMAConfig", "OTCConfig", "RotateConfig"]
    with pytest.raises(MitigationError, match="unknown mitigation method"):
        resolve(["nope"])
    with pytest.raises(MitigationError, match="gamma.target"):
        GammaConfig(target="max")


def test_configs_round_trip_through_json():
    from outlierlab.mitigation.base import config_from_json, config_to_json

    for cls in METHODS.values():
        cfg = cls()
        assert config_from_json(cls, json.loads(json.dumps(config_to_json(cfg)))) == cfg
    cfg = TMAConfig(layers=(3, 4), target=7.0)
    assert config_from_json(TMAConfig, json.loads(json.dumps(config_to_json(cfg)))) == cfg


def test_none_is_a_no_op():
    model = tiny_model("llama")
    ids = random_windows(model, 2, 16)
    ref = logits(model, ids)
    result = mitigate(model, ["none"], ids)
    assert result.exact and result.applied[0]["method"] == "none"
    assert torch.equal(logits(model, ids), ref)


# -- exactness, through a reload with plain transformers -------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gamma", "smoothquant", "rotate"])
def test_function_preserving_through_plain_reload(family, method, tmp_path):
    from transformers import AutoModelForCausalLM

    model = perturbed(family)
    ids = random_windows(model, 2, 16)
    ref = logits(model, ids)
    cfg = {"gamma": GammaConfig(k=1.2), "smoothquant": SmoothQuantConfig(alpha=0.5),
           "rotate": RotateConfig(seed=3)}[method]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if method == "rotate" and family in SANDWICH:
        with pytest.raises(MitigationError, match="sandwich"):
            mitigate(model, [cfg], ids)
        return
    result = mitigate(model, [cfg], ids)
    assert result.exact and not result.runtime
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "the transform changed no weight"
    assert rel(logits(model, ids), ref) < 1e-4
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert rel(logits(reloaded, ids), ref) < 1e-4


def test_gamma_modes_alpha_and_targets():
    model = perturbed("llama")
    adapter = get_adapter(model)
    from outlierlab.testing import plant_gain

    plant_gain(model, 1, "attn.norm", 9, 40.0)
    ids = random_windows(model, 2, 16)
    ref = logits(model, ids)
    norm = next(n for n in adapter.norms() if n.name == "attn.norm")

    def gain(m):
        return get_adapter(m).norm_gain(1, norm)

    med = float(gain(model).abs().median())
    half = copy.deepcopy(model)
    mitigate(half, [GammaConfig(k=5, alpha=0.5)], ids)
    assert gain(half)[9] == pytest.approx((40.0 * med) ** 0.5, rel=1e-4)  # geometric half-way
    nofold = copy.deepcopy(model)
    r = mitigate(nofold, [GammaConfig(k=5, mode="nofold")], ids)
    assert not r.exact and float(gain(nofold)[9]) == pytest.approx(med, rel=1e-4)
    assert rel(logits(nofold, ids), ref) > 1e-3  # the ablation changes the function
    one = copy.deepcopy(model)
    mitigate(one, [GammaConfig(k=5, target="one")], ids)
    assert float(gain(one)[9]) == pytest.approx(1.0, rel=1e-5)
    assert rel(logits(one, ids), ref) < 1e-4


def test_gamma_final_norm_unties_the_head(tmp_path):
    from transformers import AutoModelForCausalLM

    model = perturbed("gemma")  # tied embeddings, 1 + w gains
    with torch.no_grad():
        model.model.norm.weight[4] = 30.0
    ids = random_windows(model, 2, 16)
    ref = logits(model, ids)
    mitigate(model, [GammaConfig(k=5, final=True)], ids)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert rel(logits(reloaded, ids), ref) < 1e-4


def test_rotation_matrices():
    from outlierlab.mitigation.rotate import hadamard, mean_preserving, rotation

    for n in (4, 12, 20, 28, 36, 64, 576, 1536):
        h = hadamard(n)
        assert h is not None and torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))
    q, kind = rotation(576, seed=1)
    assert kind == "randomized_hadamard"
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=q.dtype), atol=1e-10)
    q, kind = rotation(10, seed=1)  # no Hadamard matrix of order 10
    assert kind == "random_orthogonal" and torch.allclose(q @ q.T, torch.eye(10, dtype=q.dtype), atol=1e-10)
    qm = mean_preserving(rotation(64, seed=2)[0])
    ones = torch.ones(64, dtype=qm.dtype)
    assert torch.allclose(qm @ ones, ones, atol=1e-10)
    # a one-hot residual MA is spread over every channel
    e = torch.zeros(576, dtype=torch.float64)
    e[507] = 24_000.0
    assert float((e @ rotation(576)[0]).abs().max()) == pytest.approx(1000.0)


def test_rotate_online_hadamard_exact_in_memory_and_after_load(tmp_path):
    from outlierlab.mitigation import export

    model = perturbed("llama")
    tok = _tokenizer()
    ids = random_windows(model, 2, 16)
    ref = logits(model, ids)
    result = mitigate(model, [RotateConfig(online_hadamard=True)], ids)
    assert result.runtime == ["rotate"]
    assert rel(logits(model, ids), ref) < 1e-4
    export.save(model, tok, result, tmp_path / "ckpt")
    man = export.read_manifest(tmp_path / "ckpt")
    assert man["runtime_required"] and "wrong" in man["plain_transformers"]
    lm = export.load(tmp_path / "ckpt")
    assert rel(logits(lm.model, ids), ref) < 1e-4
    lm.mitigation.remove()
    assert rel(logits(lm.model, ids), ref) > 1e-3  # without the runtime part the export is not the model


def test_rotate_refuses_post_norm_opt():
    model = tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(MitigationError, match="post-norm"):
        mitigate(model, [RotateConfig()], random_windows(model, 2, 8))


# -- tma ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LAYOUTS)
def test_tma_compensated_scale_is_exact_and_removable(family):
    from outlierlab.mitigation.measure import MeasureConfig, measure

    model = perturbed(family, tiny_eps=True)
    plant_massive_token(model, 1)
    ids = ma_windows(model)
    ref = logits(model, ids)
    n_hooks = hook_count(model)
    before = measure(model, ids, MeasureConfig(fast=True))
    result = mitigate(model, [TMAConfig(mode="scale", target=5.0, layers=(1,), threshold=20.0)], ids)
    assert result.runtime == ["tma"] and result.exact
    after = measure(model, ids, MeasureConfig(fast=True))
    assert rel(logits(model, ids), ref) < 1e-4
    assert after["down_in_max_per_layer"][1] < before["down_in_max_per_layer"][1] / 5
    if family not in SANDWICH:  # Gemma 2/3's post-FFN norm already caps what the branch adds
        assert after["resid_max"] < before["resid_max"] / 3
    result.remove()
    assert hook_count(model) == n_hooks
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("family", LAYOUTS)
def test_tma_scale_leaves_a_batch_without_ma_bit_identical(family):
    """Every layer rescaled where no y6 token exceeds the threshold: the outputs are the model's, bit for bit
    (no token factor of 1 is multiplied in and out of the residual)."""
    model = perturbed(family, tiny_eps=True)
    plant_massive_token(model, 1)
    ids = ma_windows(model)
    ref = logits(model, ids)
    result = mitigate(model, [TMAConfig(mode="scale", target=5.0, layers="all", threshold=1e30)], ids)
    assert torch.equal(logits(model, ids), ref)
    result.remove()


def test_tma_origin_detection_and_modes():
    from outlierlab.mitigation.measure import MeasureConfig, measure

    model = tiny_model("llama")
    plant_massive_token(model, 1)
    ids = ma_windows(model)
    ref = logits(model, ids)
    before = measure(model, ids, MeasureConfig(fast=True))
    assert before["down_in_max_per_layer"][1] > 1000 > 10 * before["down_in_max_per_layer"][0]
    seen = {}
    for mode in ("clip", "zero", "replace", "scale"):
        m = copy.deepcopy(model)
        cfg = TMAConfig(mode=mode, target=50.0, compensate=False, layers="origin")
        result = mitigate(m, [cfg], ids)
        assert result.applied[0]["info"]["origins"] == [1]
        after = measure(m, ids, MeasureConfig(fast=True))
        seen[mode] = after
        assert after["down_in_max_per_layer"][1] <= max(50.0, result.applied[0]["runtime"]["thresholds"]["1"]) + 1e-3
        assert rel(logits(m, ids), ref) > 1e-4  # uncompensated removal changes the function
        result.remove()
        assert torch.equal(logits(m, ids), ref)
    assert seen["clip"]["down_in_max_per_layer"][1] == pytest.approx(50.0, rel=1e-4)
    replace = mitigate(copy.deepcopy(model), [TMAConfig(mode="replace", layers="origin")], ids).applied[0]["runtime"]["replace"]
    assert "3" in replace["1"]  # the planted channel got a calibrated value
    with pytest.raises(MitigationError, match="tma.mode"):
        TMAConfig(mode="shrink")


def test_tma_default_needs_no_data_and_bounds_every_y6():
    from outlierlab.mitigation.measure import MeasureConfig, measure

    model = perturbed("llama", tiny_eps=True)
    plant_massive_token(model, 1)
    ids = ma_windows(model)
    ref = logits(model, ids)
    result = mitigate(model, ["tma"], None)  # no calibration windows needed
    assert result.exact and result.applied[0]["runtime"]["thresholds"]["0"] == TMAConfig().target
    after = measure(model, ids, MeasureConfig(fast=True))
    assert after["down_in_max"] <= TMAConfig().target * (1 + 1e-5)
    assert rel(logits(model, ids), ref) < 1e-4


def test_tma_generation_with_kv_cache_matches():
    model = perturbed("llama", tiny_eps=True)
    plant_massive_token(model, 1)
    ids = ma_windows(model, 1, 12)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    result = mitigate(model, [TMAConfig(mode="scale", target=5.0, threshold=20.0, layers="origin")],
                      ma_windows(model))
    assert result.applied[0]["info"]["layers"] == [1]
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), ref)


# -- otc ----------------------------------------------------------------------------------------------------
def test_otc_scoring_closed_forms_and_finetune():
    from outlierlab.testing import plant_otc_column

    model = perturbed("llama")
    plant_otc_column(model, 1, 11, 40.0)
    ids = random_windows(model, 4, 16)
    ref = logits(model, ids)
    adapter = get_adapter(model)
    q = linear_spec(adapter, "q")

    found = mitigate(copy.deepcopy(model), [OTCConfig(roles=("q",))], ids).applied[0]["info"]
    assert any(o["layer"] == 1 and 11 in o["channels"] for o in found["otcs"])

    exact = copy.deepcopy(model)
    r = mitigate(exact, [OTCConfig(roles=("q",), target_k=2.0, compensate="gain")], ids)
    assert r.exact and rel(logits(exact, ids), ref) < 1e-4
    assert float(linear_weight(adapter, 1, q)[:, 11].norm()) > float(
        linear_weight(get_adapter(exact), 1, q)[:, 11].norm()) * 5

    shrunk = copy.deepcopy(model)
    r = mitigate(shrunk, [OTCConfig(roles=("q",), target_k=2.0)], ids)
    assert not r.exact and rel(logits(shrunk, ids), ref) > 1e-4

    tuned = copy.deepcopy(model)
    state = {k: v.clone() for k, v in tuned.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tuned.named_parameters()}
    r = mitigate(tuned, [OTCConfig(roles=("q",), steps=3, lr=1e-2, seq_len=16, train_gains=False)], ids)
    ft = r.applied[0]["info"]["finetune"]
    assert ft["steps"] == 3 and len(ft["history"]) == 3
    for name, value in tuned.state_dict().items():
        if name == "model.layers.1.self_attn.q_proj.weight":
            diff = (value != state[name]).any(dim=0)
            assert diff[11]
            otc_cols = set(next(o["channels"] for o in found["otcs"] if o["layer"] == 1))
            assert set(torch.nonzero(diff).flatten().tolist()) <= otc_cols
        elif "q_proj" not in name:
            assert torch.equal(value, state[name]), name
    assert flags == {n: p.requires_grad for n, p in tuned.named_parameters()}
    assert all(p.grad is None for p in tuned.parameters())
    assert all(not p._backward_hooks for p in tuned.parameters() if getattr(p, "_backward_hooks", None) is not None)


@pytest.mark.parametrize("family", LAYOUTS)
def test_otc_scoring_moves_ahead_of_methods_that_keep_the_scores(family):
    """paper = tma + gamma + otc: scoring alone runs first, on the unmodified model, and finds what scoring
    after gamma's fold and tma's compensated scale finds (the planted column, the same ratios and medians)."""
    from outlierlab.testing import plant_otc_column

    model = perturbed(family)
    plant_massive_token(model, 1)
    plant_otc_column(model, 1, 11, 40.0)
    ids = ma_windows(model)
    first = copy.deepcopy(model)
    r = mitigate(first, ["paper"], ids)
    assert [a["method"] for a in r.applied] == ["gamma", "tma", "otc"]
    info = r.applied[2]["info"]
    assert info["scored_before"] == ["gamma", "tma"]
    assert r.applied[0]["info"]["n_channels"] > 0  # gamma folded something, so the scores were put to the test
    after = copy.deepcopy(model)
    r_after = mitigate(after, [GammaConfig(), TMAConfig()], ids)
    late = mitigate(after, [OTCConfig()], ids).applied[0]["info"]
    r_after.remove()
    r.remove()
    assert "scored_before" not in late
    assert any(o["layer"] == 1 and 11 in o["channels"] for o in info["otcs"])
    assert [(o["layer"], o["role"], o["channels"]) for o in info["otcs"]] == \
        [(o["layer"], o["role"], o["channels"]) for o in late["otcs"]]
    for a, b in zip(info["otcs"], late["otcs"], strict=True):
        assert a["median"] == pytest.approx(b["median"], rel=1e-4)
        assert a["score_ratio"] == pytest.approx(b["score_ratio"], rel=1e-3, abs=0.011)  # ratios kept to 2 digits
    # a method that changes the scores keeps otc after it
    sq = mitigate(copy.deepcopy(model), ["smoothquant", "otc"], ids)
    assert "scored_before" not in sq.applied[1]["info"]


# -- prefix -------------------------------------------------------------------------------------------------
def test_prefix_attribute_detected_and_removed():
    model = tiny_model("llama")
    plant_massive_token(model, 1)
    ids = ma_windows(model)
    result = mitigate(model, ["prefix"], ids)
    assert registry(model).fp_prefix == 1 and result.runtime == ["prefix"]
    result.remove()
    assert registry(model).fp_prefix == 0 and not registry(model).entries
    result = mitigate(model, [PrefixConfig(n=3)], ids)
    assert registry(model).fp_prefix == 3


# -- export / load ------------------------------------------------------------------------------------------
def _tokenizer():
    from conftest import word_tokenizer

    return word_tokenizer()


def test_export_then_load_restores_runtime_parts(tmp_path):
    from transformers import AutoModelForCausalLM

    from outlierlab.mitigation import export

    model = perturbed("llama")
    plant_massive_token(model, 1)
    ids = ma_windows(model)
    ref = logits(model, ids)
    result = mitigate(model, [GammaConfig(k=1.2), TMAConfig(mode="clip", target=50.0), PrefixConfig()], ids)
    mitigated = logits(model, ids)
    assert rel(mitigated, ref) > 1e-4
    folder = export.save(model, _tokenizer(), result, tmp_path / "ckpt")
    assert not list(tmp_path.glob(".ckpt.*"))  # no temp folder left behind
    man = json.loads((folder / "outlierlab.json").read_text())
    assert man["runtime_required"] and [m["method"] for m in man["methods"]] == ["prefix", "gamma", "tma"]
    assert [e["name"] for e in man["runtime_entries"]] == ["prefix", "tma"]
    lm = export.load(folder)
    assert torch.allclose(logits(lm.model, ids), mitigated, rtol=0, atol=1e-5 * float(mitigated.abs().max()))
    assert registry(lm.model).fp_prefix == 1
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert rel(logits(plain, ids), ref) < 1e-4  # the gamma fold alone is exact: plain load = original function
    with pytest.raises(Exception, match="outlierlab.json"):
        export.load(tmp_path)
    export.save(model, _tokenizer(), result, folder)  # an export is replaced
    other = tmp_path / "someone_elses_model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(MitigationError, match="not an outlierlab export"):
        export.save(model, _tokenizer(), result, other)
    assert (other / "config.json").read_text() == "{}"


# -- CLI ----------------------------------------------------------------------------------------------------
def test_cli_mitigate_writes_contract_and_export(tiny_folder, tmp_path, cache):
    from typer.testing import CliRunner

    from outlierlab.cli import app

    text = str(tiny_folder.parent / "text.txt")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [
        "mitigate", "-M", "gamma,tma", "-m", str(tiny_folder), "-d", text, "--eval-data", text, "-n", "2",
        "--seq-len", "32", "--eval-seq-len", "32", "--eval-samples", "2", "-o", str(out), "--export",
        "--set", "gamma.k=1.2", "--set", "tma.layers=0,1", "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "mitigate.json").read_text())
    assert [m["method"] for m in doc["methods"]] == ["gamma", "tma"]
    assert doc["methods"][0]["config"]["k"] == 1.2 and doc["methods"][1]["config"]["layers"] == [0, 1]
    for side in ("before", "after"):
        assert {"resid_max", "ma_count", "down_in_max", "co_ratio_max", "ppl"} <= set(doc[side])
    assert doc["seconds"] >= 0 and doc["export"]["reload_max_rel_diff"] < 1e-5
    assert (out / "model" / "model.safetensors").is_file()
    bad = CliRunner().invoke(app, ["mitigate", "-M", "gamma", "-m", str(tiny_folder), "--set", "gamma.kk=2"])
    assert bad.exit_code == 2 and "no field" in bad.output
