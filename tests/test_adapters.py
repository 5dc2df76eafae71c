"""Every family's adapter: positions traced with the right shapes, aliases, shared tensors, registry errors."""

from __future__ import annotations

import pytest
import torch

from outlierlab.adapters import adapter_class, get_adapter, supported_model_types
from outlierlab.errors import UnsupportedArchitecture
from outlierlab.testing import TINY_FAMILIES, random_windows, tiny_model
from outlierlab.tracing import HookSet, attach_positions

FAMILIES = sorted(TINY_FAMILIES)
CANONICAL = {"attn.in", "attn.norm", "attn.q", "attn.k", "attn.v", "attn.ctx", "attn.out", "mlp.in", "mlp.norm",
             "mlp.act", "mlp.down_in", "mlp.out", "block.out"}


def captured(model, ids):
    seen = {}

    def cb(layer, name, x):
        if x.dim() == 2:  # OPT's FFN runs on [batch * tokens, channels]
            x = x.view(*ids.shape, -1)
        seen[(layer, name)] = x.detach().clone()

    with HookSet() as hooks:
        attach_positions(hooks, get_adapter(model), cb)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    return seen


def test_registry_lists_all_families():
    types = set(supported_model_types())
    assert set(FAMILIES) <= types


def test_unsupported_architecture_message():
    with pytest.raises(UnsupportedArchitecture) as info:
        adapter_class("mamba")
    msg = str(info.value)
    assert "mamba" in msg and "llama" in msg and "docs/adding-a-model.md" in msg


@pytest.mark.parametrize("model_type", FAMILIES)
def test_positions_traced_with_expected_shapes(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    cfg = model.config
    ids = random_windows(model, n=2, seq_len=16)
    seen = captured(model, ids)
    names = {p.name for p in adapter.positions()}
    assert CANONICAL <= names
    glu = adapter.ffn_kind == "glu"
    assert ({"mlp.gate", "mlp.up"} <= names) == glu
    assert ("mlp.fc1" in names) == (not glu)
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or getattr(cfg, "n_inner", None) \
        or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for layer in range(adapter.n_layers):
        for p in adapter.positions():
            key = (layer, p.same_as or p.name)
            assert key in seen, f"{model_type}: {p.name} not traced at layer {layer}"
            x = seen[key]
            assert x.shape[:2] == (2, 16), (p.name, x.shape)
        width = {n: seen[(layer, n)].reshape(2, 16, -1).shape[-1] for n in names if (layer, n) in seen}
        assert width["block.out"] == hidden and width["attn.in"] == hidden and width["attn.norm"] == hidden
        assert width["attn.q"] == heads * head_dim
        assert width["attn.k"] == width["attn.v"] == kv_heads * head_dim
        act = "mlp.act"
        assert seen[(layer, act)].shape[-1] == inter
        if glu:
            assert width["mlp.gate"] == width["mlp.up"] == width["mlp.down_in"] == inter
            # y6 = act(y3) * y4, exactly
            torch.testing.assert_close(seen[(layer, "mlp.down_in")], seen[(layer, "mlp.act")] * seen[(layer, "mlp.up")])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_residual_positions_chain(model_type):
    """block.out of layer L is the residual stream entering layer L + 1."""
    model = tiny_model(model_type)
    seen = captured(model, random_windows(model, n=1, seq_len=8))
    adapter = get_adapter(model)
    for layer in range(adapter.n_layers - 1):
        torch.testing.assert_close(seen[(layer, "block.out")], seen[(layer + 1, "attn.in")])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_paper_aliases(model_type):
    adapter = get_adapter(tiny_model(model_type))
    alias = {p.name: p.alias for p in adapter.positions()}
    if adapter.ffn_kind == "glu":
        assert [alias[n] for n in ("mlp.in", "mlp.norm", "mlp.gate", "mlp.up", "mlp.act", "mlp.down_in", "mlp.out",
                                   "block.out")] == ["y1", "y2", "y3", "y4", "y5", "y6", "y7", "y8"]
    else:
        assert [alias[n] for n in ("mlp.in", "mlp.norm", "mlp.fc1", "mlp.act", "mlp.out", "block.out")] == \
            ["y1", "y2", "y3", "y4", "y5", "y6"]
        assert alias["mlp.down_in"] == "y4"


def test_extra_norms_have_positions():
    g3 = {p.name for p in get_adapter(tiny_model("gemma3_text")).positions()}
    assert {"attn.post_norm", "mlp.post_norm", "attn.q_norm", "attn.k_norm"} <= g3
    q3 = {p.name for p in get_adapter(tiny_model("qwen3")).positions()}
    assert {"attn.q_norm", "attn.k_norm"} <= q3
    assert get_adapter(tiny_model("gpt_neox")).parallel and get_adapter(tiny_model("phi")).parallel
    assert not get_adapter(tiny_model("llama")).parallel


def test_gemma_gain_convention():
    model = tiny_model("gemma")
    adapter = get_adapter(model)
    spec = adapter.norms()[0]
    assert spec.gain_offset == 1.0
    w = adapter.layers()[0].get_submodule(spec.module).weight
    torch.testing.assert_close(adapter.norm_gain(0, spec), w.detach() + 1.0)


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "gpt_neox"])
def test_fused_projection_slices_match_unfused_math(model_type):
    """q/k/v cut out of a fused projection equal the projection computed from its weight rows."""
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    seen = captured(model, random_windows(model, n=1, seq_len=8))
    spec = next(s for s in adapter.linears() if s.role == "qkv")
    w = adapter.linear_weight(0, spec)
    module = adapter.layers()[0].get_submodule(spec.module)
    full = seen[(0, "attn.norm")] @ w.t() + (module.bias if module.bias is not None else 0)
    parts = torch.cat([seen[(0, n)].reshape(1, 8, -1) for n in ("attn.q", "attn.k", "attn.v")], -1)
    assert parts.shape == full.shape
    # the same multiset of values per token (fused layouts interleave differently)
    torch.testing.assert_close(parts.sort(-1).values, full.sort(-1).values, rtol=1e-5, atol=1e-5)
