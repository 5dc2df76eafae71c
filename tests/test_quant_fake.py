"""Fake quantization on models: apply/remove is bit-identical, every family runs, the KV wrapper is called
after RoPE for the main layouts, static scales are the calibrated abs-max x clip, the fp prefix is honoured,
and GPTQ beats RTN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from outlierlab.adapters import get_adapter
from outlierlab.mitigation.prefix import FPPrefix
from outlierlab.quantization import (
    ActQuantizer,
    KVQuantizer,
    QuantConfigError,
    find_targets,
    get_quant,
    prepare,
    quantize_,
    static_scales,
)
from outlierlab.quantization.gptq import HessianAccumulator, gptq_quantize
from outlierlab.quantization.quantizers import quant_weight, quant_weight_as
from outlierlab.runtime import install
from outlierlab.testing import TINY_FAMILIES, plant_gain, random_windows, tiny_model


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("spec", ["w8a8-tensor", "w8a8-dynamic", "w4a4kv4", "w4a16:w_method=gptq",
                                  "w8a8-token:lm_head=true:embeddings=true"])
def test_apply_remove_is_bit_identical(spec):
    model = tiny_model("llama")
    ids = random_windows(model, n=2, seq_len=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    ref = _logits(model, ids)
    attn = model.config._attn_implementation
    with quantize_(model, spec, calib=ids) as state:
        assert state.active and _hooks(model) > 0 or spec.startswith("w4a16")
        q = _logits(model, ids)
    assert not torch.equal(q, ref)  # it did something
    assert _hooks(model) == 0
    assert model.config._attn_implementation == attn
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(model, ids), ref)
    state.remove()  # idempotent


def test_restore_false_keeps_quantized_weights_and_drops_hooks():
    model = tiny_model("llama")
    ids = random_windows(model, n=2, seq_len=16)
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    state = quantize_(model, "w4a8", restore=False)
    q = _logits(model, ids)
    state.remove()
    assert _hooks(model) == 0
    expected = quant_weight_as(w, get_quant("w4a8"))
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, expected)
    assert not torch.equal(_logits(model, ids), q)  # activations are no longer quantized


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_every_family(family):
    model = tiny_model(family)
    ids = random_windows(model, n=2, seq_len=16)
    ref = _logits(model, ids)
    adapter = get_adapter(model)
    n_linears = len(adapter.linears()) * adapter.n_layers
    for spec in ("w8a8-tensor", "w4a4kv4"):
        with quantize_(model, spec, calib=ids) as state:
            assert state.info["n_linears"] == n_linears
            out = _logits(model, ids)
        assert torch.isfinite(out).all()
        err = (out - ref).abs().max()
        assert 0 < err < 5 * ref.abs().max()
    assert torch.equal(_logits(model, ids), ref)


def test_conv1d_weights_are_quantized_per_output_column():
    model = tiny_model("gpt2")
    w = model.transformer.h[1].mlp.c_fc.weight.detach().clone()  # [in, out]
    with quantize_(model, "w4a16"):
        got = model.transformer.h[1].mlp.c_fc.weight
        assert torch.equal(got, quant_weight_as(w.t(), get_quant("w4a16")).t())
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, w)


def test_lm_head_and_embeddings_stay_fp_unless_asked():
    model = tiny_model("llama", tie_word_embeddings=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings()
    calib = random_windows(model, n=2, seq_len=16)
    assert all(t.role != "lm_head" for t in find_targets(model, get_quant("w4a4")))
    with quantize_(model, "w4a4", calib):
        assert torch.equal(head.weight, emb) and torch.equal(model.get_input_embeddings().weight, emb)
    with quantize_(model, "w4a4:lm_head=true", calib):
        assert not torch.equal(head.weight, emb)
        assert torch.equal(model.get_input_embeddings().weight, emb)  # the tied embedding is untouched
    with quantize_(model, "w4a4:embeddings=true", calib):
        assert not torch.equal(model.get_input_embeddings().weight, emb)
        assert torch.equal(head.weight, emb)
    assert torch.equal(head.weight, emb) and head.weight is model.get_input_embeddings().weight


def test_roles_and_layers_select_targets():
    model = tiny_model("llama")
    targets = find_targets(model, get_quant("w8a8-token:roles=down:layers=1"))
    assert [(t.layer, t.role, t.alias) for t in targets] == [(1, "down", "y6")]
    with pytest.raises(QuantConfigError, match="match no linear"):
        find_targets(model, get_quant("w8a8-token:roles=fc2"))
    with pytest.raises(QuantConfigError, match="outside"):
        find_targets(model, get_quant("w8a8-token:layers=7"))


@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_static_scales_equal_calibrated_absmax_times_clip(clip):
    model = tiny_model("llama")
    plant_gain(model, 1, "mlp.norm", 5, 300.0)  # a channel outlier at the gate/up input of layer 1
    ids = random_windows(model, n=4, seq_len=16)
    seen: dict[str, float] = {}
    handles = []
    for t in find_targets(model, get_quant("w8a8-tensor")):
        def obs(m, args, name=t.name):
            seen[name] = max(seen.get(name, 0.0), float(args[0].abs().max()))
        handles.append(t.module.register_forward_pre_hook(obs))
    for start in (0, 2):  # the same windows, batched differently from the calibration
        _logits(model, ids[start:start + 2])
    for h in handles:
        h.remove()
    plan = prepare(model, get_quant(f"w8a8-tensor:a_clip={clip}"), ids, batch_size=3)
    scales = static_scales(plan)
    assert set(scales) == set(seen)
    for name, absmax in seen.items():
        assert scales[name] == pytest.approx(clip * absmax / 127, rel=1e-6)
    assert scales["model.layers.1.mlp.gate_proj"] > 50 * scales["model.layers.0.mlp.gate_proj"]


def test_static_needs_calibration():
    model = tiny_model("llama")
    with pytest.raises(QuantConfigError, match="calibration"):
        quantize_(model, "w8a8-tensor")
    assert _hooks(model) == 0


def test_fp_prefix_is_left_unquantized():
    x = torch.randn(2, 6, 8)
    x[:, 0] *= 1000  # the outlier token
    for gran in ("token", "tensor-dynamic"):
        q = ActQuantizer(4, True, gran, prefix=1)(x)
        assert torch.equal(q[:, 0], x[:, 0])
        assert not torch.equal(q[:, 1:], x[:, 1:])
        if gran == "tensor-dynamic":  # the scale ignores the prefix token: fine grid for the rest
            assert (q[:, 1:] - x[:, 1:]).abs().max() < 0.5
    k = torch.randn(1, 2, 6, 4)
    kq = KVQuantizer(2, prefix=2)(k)
    assert torch.equal(kq[..., :2, :], k[..., :2, :]) and not torch.equal(kq[..., 2:, :], k[..., 2:, :])

    model = tiny_model("llama")
    ids = random_windows(model, n=2, seq_len=16)
    q_proj = model.model.layers[0].self_attn.q_proj  # its input has nothing quantized upstream
    fp_in = []
    h = q_proj.register_forward_pre_hook(lambda m, args: fp_in.append(args[0].detach().clone()))
    _logits(model, ids)
    h.remove()
    install(model, FPPrefix({"n": 1}))
    seen = []
    with quantize_(model, "w8a8-token") as state:
        assert state.info["fp_prefix"] == 1
        # registered after the quantizer's pre-hook, so it sees the quantized input
        h = q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        _logits(model, ids)
        h.remove()
    assert torch.equal(seen[0][:, 0], fp_in[0][:, 0])
    assert not torch.equal(seen[0][:, 1:], fp_in[0][:, 1:])


def test_static_calibration_skips_the_prefix():
    model = tiny_model("llama")
    ids = random_windows(model, n=2, seq_len=16)
    plain = static_scales(prepare(model, "w8a8-tensor", ids))
    install(model, FPPrefix({"n": 4}))
    prefixed = static_scales(prepare(model, "w8a8-tensor", ids))
    assert any(prefixed[k] < plain[k] for k in plain) and all(prefixed[k] <= plain[k] for k in plain)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "qwen3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_wrapper_runs_inside_attention(family, attn):
    model = tiny_model(family)
    model.set_attn_implementation(attn)
    ids = random_windows(model, n=2, seq_len=16)
    ref = _logits(model, ids)
    adapter = get_adapter(model)
    plan = prepare(model, "fp:kv_bits=4")
    plan.kv.passthrough = True  # the wrapper alone must not change anything
    with plan.install(model):
        assert model.config._attn_implementation == f"outlierlab_kv_{attn}"
        same = _logits(model, ids)
    assert torch.allclose(same, ref, atol=1e-6)
    assert plan.kv.calls == 2 * adapter.n_layers  # k and v of every layer, once per forward
    assert model.config._attn_implementation == attn
    with quantize_(model, "fp:kv_bits=3"):
        diff = (_logits(model, ids) - ref).abs().max()
    assert diff > 1e-4


def test_kv_states_are_rotated_before_quantization():
    """The wrapper sees keys after RoPE: quantizing the k_proj output instead would give other logits."""
    model = tiny_model("llama")
    ids = random_windows(model, n=1, seq_len=16)
    seen = []
    plan = prepare(model, "fp:kv_bits=8")
    plan.kv.passthrough = True
    k_proj = []
    h = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, o: k_proj.append(o.detach()))
    orig_call = plan.kv.__class__.__call__

    def spy(self, x, layer=None, which="k"):
        if layer == 0 and which == "k":
            seen.append(x.detach().clone())
        return orig_call(self, x, layer, which)

    plan.kv.__class__.__call__ = spy
    try:
        with plan.install(model):
            _logits(model, ids)
    finally:
        plan.kv.__class__.__call__ = orig_call
        h.remove()
    heads = model.config.num_key_value_heads
    raw = k_proj[0].view(1, 16, heads, -1).transpose(1, 2)
    assert seen[0].shape == raw.shape
    assert torch.allclose(seen[0][..., 0, :], raw[..., 0, :], atol=1e-5)  # position 0: rotation by angle 0
    assert not torch.allclose(seen[0][..., 5, :], raw[..., 5, :], atol=1e-3)  # later positions are rotated


def _correlated_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g)
    scales = torch.logspace(1, -2, d)
    return torch.randn(n, d, generator=g) @ (basis * scales.unsqueeze(1))


@pytest.mark.parametrize("granularity, act_order", [("channel", False), ("group", False), ("group", True),
                                                    ("channel", True)])
def test_gptq_beats_rtn_on_one_layer(granularity, act_order):
    X = _correlated_inputs()
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(64, "cpu")
    for chunk in X.split(100):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * X.t() @ X / len(X), rtol=1e-4, atol=1e-4)
    Q = gptq_quantize(W, acc.H, 3, True, granularity, 16, block=16, act_order=act_order)
    R = quant_weight(W, 3, True, granularity, 16)
    err_gptq = ((X @ (W - Q).t()) ** 2).sum()
    err_rtn = ((X @ (W - R).t()) ** 2).sum()
    assert err_gptq < 0.7 * err_rtn
    # GPTQ's output is on the quantization grid of its rows (per channel: at most 2^3 - 1 levels)
    if granularity == "channel":
        assert all(len(torch.unique(Q[i])) <= 7 for i in range(Q.shape[0]))


def test_gptq_beats_rtn_on_a_tiny_model():
    model = tiny_model("llama")
    calib = random_windows(model, n=8, seq_len=32, seed=1)
    ids = random_windows(model, n=4, seq_len=32, seed=2)
    ref = _logits(model, ids)
    errs = {}
    for spec in ("w4a16:w_bits=3", "w4a16:w_bits=3:w_method=gptq"):
        with quantize_(model, spec, calib=calib):
            errs[spec] = float(((_logits(model, ids) - ref) ** 2).mean())
    assert errs["w4a16:w_bits=3:w_method=gptq"] < 0.8 * errs["w4a16:w_bits=3"]
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("spec", ["w8a8-token", "w8a8-tensor"])
def test_shared_inputs_are_quantized_once(spec, monkeypatch):
    """q, k and v (and gate and up) read the same tensor: it is quantized once, with the same result."""
    from outlierlab.quantization import fake

    model = tiny_model("llama")
    ids = random_windows(model, n=2, seq_len=16)
    calls = []
    real = fake.ActQuantizer.__call__

    def counting(self, x):
        calls.append(1)
        return real(self, x)

    monkeypatch.setattr(fake.ActQuantizer, "__call__", counting)
    with quantize_(model, spec, calib=ids):
        calls.clear()
        shared = _logits(model, ids)
    assert len(calls) == 4 * model.config.num_hidden_layers  # attn.norm, attn.ctx, mlp.norm, down_in
    monkeypatch.setattr(fake, "_share_key", lambda t, q: None)
    with quantize_(model, spec, calib=ids):
        calls.clear()
        separate = _logits(model, ids)
    assert len(calls) == 7 * model.config.num_hidden_layers
    assert torch.equal(shared, separate)


def test_w_grid_reaches_rtn_and_gptq_weights():
    """``w_grid=full`` is what the plan's RTN weights (and the embeddings) use, and GPTQ's weights are on that
    grid too: per row, integers in [-8, 7] times abs-max / 7.5."""
    model = tiny_model("llama")
    calib = random_windows(model, n=4, seq_len=16, seed=5)
    plan = prepare(model, "w4a16:w_grid=full:w_clip_search=false:embeddings=true")
    for t in plan.targets:
        assert torch.equal(plan.weights[t.name], quant_weight(t.weight_view().detach(), 4, grid="full"))
    emb = model.get_input_embeddings().weight.detach().clone()
    with plan.install(model):  # the plan quantizes the embedding when installed
        assert torch.equal(model.get_input_embeddings().weight, quant_weight(emb, 4, grid="full"))
    gptq = prepare(model, "w4a16:w_grid=full:w_clip_search=false:w_method=gptq", calib)
    for t in gptq.targets:
        w = gptq.weights[t.name]
        k = w / (t.weight_view().detach().abs().amax(dim=1, keepdim=True) / 7.5)
        assert torch.allclose(k, k.round(), atol=1e-4) and k.round().min() >= -8 and k.round().max() <= 7
