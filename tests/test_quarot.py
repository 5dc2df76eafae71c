"""QuaRot and the learned rotation (spinquant) on tiny models: exact in fp32 in every family that allows a
rotation, the fake quantizer sees the rotated activations (down and o_proj inputs, K/V), runtime parts
removed and rebuilt by export/load, Cayley steps stay orthogonal and lower the quantized loss; combined
methods and the best method per setting in compare."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_mitigation import (
    SANDWICH,
    _tokenizer,
    logits,
    perturbed,
    plant_massive_token,
    rel,
)

from outlierlab.adapters import get_adapter
from outlierlab.mitigation import (
    METHODS,
    MitigationError,
    QuaRotConfig,
    SpinQuantConfig,
    TMAConfig,
    mitigate,
    resolve,
)
from outlierlab.mitigation.base import down_spec, linear_module, out_spec
from outlierlab.mitigation.quarot import matrix
from outlierlab.mitigation.spinquant import cayley_step, learn_rotation
from outlierlab.quantization import QuantConfig, quantize_
from outlierlab.quantization.kv import KVQuantizer
from outlierlab.quantization.quantizers import fake_quant, qparams, quant_dynamic
from outlierlab.runtime import ORDER, FunctionEntry, installed, next_token_nll, registry
from outlierlab.testing import TINY_FAMILIES, plant_gain, random_windows, tiny_model

FAMILIES = sorted(TINY_FAMILIES)
RMS = ["llama", "qwen2", "qwen3", "gemma", "phi3"]


def test_table_order():
    assert {"quarot", "spinquant"} <= set(METHODS)
    names = [type(c).__name__ for c in resolve(["spinquant,quarot", "tma"])]
    assert names == ["TMAConfig", "QuaRotConfig", "SpinQuantConfig"]


@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_exact_in_fp32(family):
    model = perturbed(family)
    ids = random_windows(model, 2, 16)
    ref = logits(model, ids)
    if family in SANDWICH:
        with pytest.raises(MitigationError, match="quarot.*sandwich"):
            mitigate(model, [QuaRotConfig()], ids)
        return
    result = mitigate(model, [QuaRotConfig(seed=2)], ids)
    assert result.exact and result.runtime == ["quarot"]
    params = result.applied[0]["runtime"]
    assert {"down", "o", "kv"} <= set(params)
    has_v = any(s.role == "v" for s in get_adapter(model).linears())
    assert ("head" in params) == has_v and params["kv"]["which"] == (["k"] if has_v else ["k", "v"])
    assert rel(logits(model, ids), ref) < 1e-4
    result.remove()
    assert not registry(model).entries
    assert rel(logits(model, ids), ref) > 1e-3  # the folded weights need the online part


def test_quarot_refuses_post_norm_opt():
    model = tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(MitigationError, match="quarot.*post-norm"):
        mitigate(model, [QuaRotConfig()], random_windows(model, 2, 8))


def _inputs(model, ids, specs) -> dict:
    """The inputs of layer 1's linears ``specs`` as the quantizer would see them (a probe after every hook)."""
    ad, seen = get_adapter(model), {}

    def declare(hooks):
        for name, spec in specs.items():
            hooks.pre(linear_module(ad, 1, spec), lambda m, a, name=name: seen.__setitem__(name, a[0].detach()))

    with installed(model, FunctionEntry("probe", ORDER["probe"], declare)):
        logits(model, ids)
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantizer_sees_hadamard_inputs(family):
    model = perturbed(family)
    ad = get_adapter(model)
    ids = random_windows(model, 2, 16)
    specs = {"down": down_spec(ad), "o": out_spec(ad)}
    before = _inputs(model, ids, specs)
    params = mitigate(model, [QuaRotConfig(seed=1)], ids).applied[0]["runtime"]
    after = _inputs(model, ids, specs)
    assert rel(after["down"], before["down"].double().matmul(matrix(params["down"])).float()) < 1e-4
    ctx = before["o"].double()
    if "head" in params:  # per-head Hadamard folded into v / o
        h = matrix(params["head"])
        ctx = ctx @ torch.block_diag(*[h] * (ctx.shape[-1] // h.shape[0]))
    assert rel(after["o"], (ctx @ matrix(params["o"])).float()) < 1e-4
    # the fake quantizer (installed later) quantizes the rotated tensor: it runs after the quarot hooks
    with quantize_(model, QuantConfig(a_bits=4, roles=(specs["down"].role,), layers=(1,)), ids):
        seen = _inputs(model, ids, {"down": specs["down"]})["down"]
    assert torch.allclose(seen, quant_dynamic(after["down"], 4, True, -1, 1.0), atol=1e-5)


def test_kv_quantizer_rotates_k_and_v_per_head():
    x = torch.randn(2, 3, 5, 16)
    x[..., 4] *= 50
    r = matrix({"size": 16, "seed": 3, "kind": "hadamard"}).float()
    q = KVQuantizer(bits=4, rotation=lambda t, which: r if which == "k" else None)
    s, z = qparams(x @ r, 4, False, -1, 1.0)
    assert torch.allclose(q(x, 0, "k"), fake_quant(x @ r, s, z, 4) @ r.T, atol=1e-5)
    s, z = qparams(x, 4, False, -1, 1.0)
    assert torch.equal(q(x, 0, "v"), fake_quant(x, s, z, 4))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_entry_takes_the_rotation_of_the_installed_quarot(family):
    model = perturbed(family)
    ids = random_windows(model, 2, 16)
    result = mitigate(model, [QuaRotConfig()], ids)
    entry = registry(model).get("quarot")
    with quantize_(model, QuantConfig(kv_bits=16), ids) as state:  # 16 bits: nothing quantized, no KV entry
        assert state.kv_entry is None
    ref = logits(model, ids)
    with quantize_(model, QuantConfig(kv_bits=8), ids) as state:
        kvq = state.plan.kv
        assert kvq.rotation is not None and kvq.rotation.__self__ is entry
        k = torch.randn(1, 2, 4, 16)
        assert kvq.rotation(k, "k") is not None
        assert (kvq.rotation(k, "v") is None) == (family == "llama")  # llama: V folded into v_proj already
        assert rel(logits(model, ids), ref) < 0.05
    assert kvq.rotation is None
    result.remove()


def test_quarot_export_then_load(tmp_path):
    from outlierlab.mitigation import export

    model = perturbed("qwen2")
    ids = random_windows(model, 2, 16)
    ref = logits(model, ids)
    result = mitigate(model, [QuaRotConfig()], ids)
    export.save(model, _tokenizer(), result, tmp_path / "ckpt")
    lm = export.load(tmp_path / "ckpt")
    assert rel(logits(lm.model, ids), ref) < 1e-4
    assert [e.name for e in registry(lm.model).entries] == ["quarot"]
    lm.mitigation.remove()


def test_tma_then_quarot_exact():
    model = perturbed("llama")
    plant_massive_token(model, 1)
    ids = random_windows(model, 2, 16)
    ids[:, 3] = 7
    ref = logits(model, ids)
    result = mitigate(model, ["quarot", TMAConfig()], ids)
    assert [a["method"] for a in result.applied] == ["tma", "quarot"]
    assert rel(logits(model, ids), ref) < 1e-4
    result.remove()


# -- spinquant ----------------------------------------------------------------------------------------------------
def test_cayley_step_keeps_orthogonality():
    gen = torch.Generator().manual_seed(0)
    r = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))[0]
    for _ in range(50):
        r = cayley_step(r, torch.randn(32, 32, generator=gen, dtype=torch.float64), 0.5)
    assert float((r.T @ r - torch.eye(32, dtype=torch.float64)).abs().max()) < 1e-10


@pytest.mark.parametrize("family", RMS)
def test_spinquant_exact_in_fp32(family):
    model = perturbed(family)
    ids = random_windows(model, 2, 16)
    ref = logits(model, ids)
    result = mitigate(model, [SpinQuantConfig(steps=2, samples=2, seq_len=16)], ids)
    assert result.exact and result.runtime == ["spinquant"]
    assert rel(logits(model, ids), ref) < 1e-4


def test_spinquant_refuses_layernorm():
    model = tiny_model("gpt2")
    with pytest.raises(MitigationError, match="spinquant.*LayerNorm"):
        mitigate(model, [SpinQuantConfig(steps=1)], random_windows(model, 2, 8))


def _confident_model():
    """A tiny llama with peaked predictions and large norm gains (channels that 4-bit per-token quantization
    of the norm outputs crushes), and windows it predicts (greedy continuations): planted data."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for i in range(3):
            plant_gain(model, i, "attn.norm", 5, 20.0)
            plant_gain(model, i, "mlp.norm", 9, 20.0)
        ids = model.generate(random_windows(model, 8, 4), max_new_tokens=28, do_sample=False, pad_token_id=0)
    return model, ids


def test_learned_rotation_is_orthogonal_and_lowers_the_quantized_loss():
    model, ids = _confident_model()
    from outlierlab.mitigation.rotate import RotateConfig, rotate_model

    rotate_model(model, RotateConfig(), torch.eye(64, dtype=torch.float64))  # fuse the gains, as apply does
    with torch.no_grad():
        nll, count = next_token_nll(model(input_ids=ids).logits, ids)
    fp = float(nll) / count
    cfg = SpinQuantConfig(steps=20, lr=0.2, bits=4, samples=8, seq_len=32, batch_size=8)
    r, info = learn_rotation(model, get_adapter(model), ids, cfg)
    assert float((r.T @ r - torch.eye(64, dtype=torch.float64)).abs().max()) < 1e-5
    # the random Hadamard start loses about 0.1 nats to 4-bit activations; the learned R wins back half or more
    assert info["loss_start"] > fp + 0.05
    assert info["loss_end"] < info["loss_start"] - 0.5 * (info["loss_start"] - fp)
    assert len(info["losses"]) == 20 and all(p.requires_grad for p in model.parameters())


# -- compare: combined methods, best per setting ------------------------------------------------------------------
def test_compare_combined_method_and_best(tiny_folder, cache, tmp_path):
    from test_compare import _config

    from outlierlab.evaluation.compare import compare
    from outlierlab.models import load_model

    lm = load_model(str(tiny_folder))
    before = copy.deepcopy(lm.model.state_dict())
    cfg = _config(tiny_folder, methods=("none", "tma+quarot", "quarot+nope"), quants=("fp", "w4a4kv4"))
    res = compare(lm, cfg, tmp_path / "cmp")
    cell = res.get("tma+quarot", "fp")
    assert cell.status == "ok" and [a["method"] for a in cell.mitigation["applied"]] == ["tma", "quarot"]
    assert cell.rel_delta_pct == pytest.approx(0.0, abs=1e-3)
    assert res.get("tma+quarot", "w4a4kv4").status == "ok"
    bad = res.get("quarot+nope", "fp")
    assert bad.status == "not available" and "'nope'" in bad.error
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    ok = [c for c in res.cells if c.status == "ok" and c.quant == "w4a4kv4"]
    best = min(ok, key=lambda c: c.ppl)
    assert doc["best"]["w4a4kv4"] == {"method": best.method, "ppl": best.ppl, "rel_delta_pct": best.rel_delta_pct}
    assert all(v.equal(before[k]) for k, v in lm.model.state_dict().items())


# -- the real default model ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quarot_and_spinquant_exact_on_smollm2():
    from outlierlab.models import load_model

    lm = load_model("smollm2-135m")
    ids = lm.tokenizer("The committee said that the new school would open in the fall, and the board agreed "
                       "to pay for it out of the general fund.", return_tensors="pt").input_ids
    ref = logits(lm.model, ids)
    for cfg in (QuaRotConfig(), SpinQuantConfig(steps=2, samples=1, seq_len=32)):
        model = copy.deepcopy(lm.model)
        result = mitigate(model, [cfg], ids.repeat(2, 1))
        assert rel(logits(model, ids), ref) < 1e-3
        result.remove()
