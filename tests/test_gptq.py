"""GPTQ: the full weight grid, static groups, the true-sequential order (each sublayer's Hessian computed from
inputs of the already-quantized earlier sublayers, checked against an independent forward), and layer-by-layer
calibration with host-kept inputs on a model dispatched by accelerate with disk offload (same weights as in
memory)."""

from __future__ import annotations

import pytest
import torch

from outlierlab.adapters import get_adapter
from outlierlab.quantization import find_targets, get_quant
from outlierlab.quantization import gptq as gptq_mod
from outlierlab.quantization.gptq import HessianAccumulator, gptq_quantize, gptq_weights
from outlierlab.quantization.quantizers import quant_weight
from outlierlab.testing import (
    plant_gain,
    plant_super_weight,
    random_windows,
    tiny_model,
)


def _correlated(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g)
    return torch.randn(n, d, generator=g) @ (basis * torch.logspace(1, -2, d).unsqueeze(1))


def _hessian(X):
    acc = HessianAccumulator(X.shape[1], "cpu")
    acc.add(X)
    return acc.H


@pytest.mark.parametrize("act_order", [False, True])
def test_full_grid_gptq_is_on_the_grid_and_beats_rtn(act_order):
    X = _correlated()
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    Q = gptq_quantize(W, _hessian(X), 4, act_order=act_order, grid="full")
    R = quant_weight(W, 4, grid="full")
    # per channel, the scale is the unquantized row's abs-max / 7.5 and every value an integer in [-8, 7]
    k = Q / (W.abs().amax(dim=1, keepdim=True) / 7.5)
    assert torch.allclose(k, k.round(), atol=1e-4) and k.round().min() >= -8 and k.round().max() <= 7
    assert (k.round() == -8).any()  # the extra level is used
    assert ((X @ (W - Q).t()) ** 2).sum() < 0.7 * ((X @ (W - R).t()) ** 2).sum()
    restricted = gptq_quantize(W, _hessian(X), 4, act_order=act_order)
    assert not torch.equal(Q, restricted)


def test_static_groups_use_the_unquantized_group_scales():
    X = _correlated()
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    for act_order in (False, True):
        Q = gptq_quantize(W, _hessian(X), 3, granularity="group", group_size=16, act_order=act_order,
                          static_groups=True)
        for g in range(0, 64, 16):
            scale = W[:, g:g + 16].abs().amax(dim=1, keepdim=True) / 3
            k = Q[:, g:g + 16] / scale
            assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 3 + 1e-4
    # without static groups and with act_order, groups are runs of the processing order: other scales
    dynamic = gptq_quantize(W, _hessian(X), 3, granularity="group", group_size=16, act_order=True)
    assert not torch.equal(dynamic, Q)
    assert ((X @ (W - dynamic).t()) ** 2).sum() < ((X @ (W - quant_weight(W, 3, True, "group", 16)).t()) ** 2).sum()


def _input_hessian(model, module, ids):
    acc = HessianAccumulator(module.weight.shape[1], "cpu")
    handle = module.register_forward_pre_hook(lambda m, args: acc.add(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return acc.H


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_hessians(true_sequential, monkeypatch):
    """Layer 0 of a tiny llama: the Hessian GPTQ uses for o / gate+up / down is that of the model whose earlier
    sublayers of layer 0 carry the returned quantized weights (true sequential) or are fp (not)."""
    model = tiny_model("llama")
    plant_gain(model, 0, "mlp.norm", 5, 8.0)
    ids = random_windows(model, n=4, seq_len=16, seed=3)
    cfg = get_quant(f"w4a16:w_bits=3:w_method=gptq:layers=0:gptq_true_sequential={true_sequential}")
    seen = []
    real = gptq_mod.gptq_quantize

    def recording(W, H, *a, **k):
        seen.append(H.clone())
        return real(W, H, *a, **k)

    monkeypatch.setattr(gptq_mod, "gptq_quantize", recording)
    targets = find_targets(model, cfg)
    out = gptq_weights(model, get_adapter(model), targets, ids, cfg, batch_size=2)
    names = [t.role for t in targets]
    assert names == ["q", "k", "v", "o", "gate", "up", "down"] and len(seen) == 7
    by_role = {t.role: t for t in targets}
    fp = {t.role: t.module.weight.data.clone() for t in targets}
    for role in ("o", "gate", "down"):
        earlier = names[:names.index(role)]
        if true_sequential:
            for r in earlier:
                by_role[r].module.weight.data = out[by_role[r].name].clone()
        expected = _input_hessian(model, by_role[role].module, ids)
        for r in earlier:
            by_role[r].module.weight.data = fp[r]
        got = seen[names.index(role)]
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # q, k, v always see the layer's fp input; with true sequential the later Hessians differ from fp
    assert torch.allclose(seen[0], _input_hessian(model, by_role["q"].module, ids), rtol=1e-4, atol=1e-6)
    fp_down = _input_hessian(model, by_role["down"].module, ids)
    assert torch.allclose(seen[6], fp_down, rtol=1e-4, atol=1e-6) != true_sequential
    assert all(torch.equal(t.module.weight.data, fp[t.role]) for t in targets)  # the model is unchanged


def _dispatch(model, tmp_path, disk_layers):
    from accelerate import dispatch_model

    adapter = get_adapter(model)
    names = [adapter.layer_name(i) for i in range(adapter.n_layers)]
    device_map = {name: ("disk" if i in disk_layers else "cpu") for i, name in enumerate(names)}
    device_map.update({"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                       "lm_head": "cpu"})
    return dispatch_model(model, device_map, main_device="cpu", offload_dir=str(tmp_path),
                          offload_buffers=False)


@pytest.mark.parametrize("spec", [
    "w4a16:w_bits=3:w_method=gptq",
    "w4a16:w_bits=3:w_method=gptq:w_grid=full:gptq_act_order=true:gptq_true_sequential=false",
])
def test_offloaded_model_gives_the_same_weights_as_in_memory(spec, tmp_path):
    """A planted tiny llama dispatched by accelerate with layers 1 and 2 on disk (and the recorded inputs
    kept on the host): the same GPTQ weights as in memory, and the dispatched model is unchanged."""
    ids = random_windows(tiny_model("llama"), n=6, seq_len=16, seed=4)

    def planted():
        model = tiny_model("llama")
        plant_super_weight(model, 1, 3, 7, 30.0)
        plant_gain(model, 2, "attn.norm", 9, 6.0)
        return model

    ref_model = planted()
    cfg = get_quant(spec)
    ref = gptq_weights(ref_model, get_adapter(ref_model), find_targets(ref_model, cfg), ids, cfg, batch_size=4)
    host = gptq_weights(ref_model, get_adapter(ref_model), find_targets(ref_model, cfg), ids,
                        cfg.with_(gptq_offload_inputs="always"), batch_size=4)
    assert all(torch.equal(host[k], ref[k]) for k in ref)
    with torch.no_grad():
        logits = ref_model(input_ids=ids, use_cache=False).logits

    model = _dispatch(planted(), tmp_path, disk_layers={1, 2})
    layer1 = get_adapter(model).layers()[1]
    assert layer1.self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    out = gptq_weights(model, get_adapter(model), find_targets(model, cfg), ids, cfg, batch_size=4)
    assert sorted(out) == sorted(ref)
    for name in ref:
        assert out[name].device.type == "cpu"
        assert torch.allclose(out[name], ref[name], rtol=0, atol=1e-6), name
    assert layer1.self_attn.q_proj.weight.device.type == "meta"  # offloaded again
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, use_cache=False).logits, logits, atol=1e-5)
