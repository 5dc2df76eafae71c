"""Synthetic models (``synthetic:FAMILY-SIZE``): shapes of real models, random weights, planted outliers that
the profiler finds; the same results in memory and dispatched by accelerate with most layers offloaded."""

from __future__ import annotations

import pytest

from outlierlab.errors import OutlierlabError
from outlierlab.models import synthetic


def test_spec_parsing_and_shapes():
    assert synthetic.parse("synthetic:llama-7b") == ("llama", "7b", {}, 0)
    assert synthetic.parse("synthetic:gpt_neox-13b:layers=2,seed=3") == ("gpt_neox", "13b",
                                                                        {"num_hidden_layers": 2}, 3)
    cfg = synthetic.config("synthetic:llama-70b:layers=2", vocab_size=1000)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (
        8192, 28672, 2, 8)
    cfg = synthetic.config("synthetic:gpt2-7b", vocab_size=1000)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_inner) == (4096, 32, 11008)
    for bad in ("synthetic:llama", "synthetic:llama-8b", "synthetic:llama-7b:layers"):
        with pytest.raises(OutlierlabError):
            synthetic.parse(bad)
    with pytest.raises(Exception, match="unsupported architecture"):
        synthetic.config("synthetic:nosuch-7b", vocab_size=10)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt"])
def test_planted_outliers_are_found_and_offload_changes_nothing(family):
    from outlierlab.adapters import get_adapter
    from outlierlab.data import DataConfig, make_windows
    from outlierlab.models import load_model
    from outlierlab.tracing import ProfileConfig, profile

    spec = f"synthetic:{family}-tiny:layers=6"
    lm = load_model(spec)
    assert lm.info["source"] == "synthetic" and lm.info["sha256"] == synthetic.identity(spec)
    windows = make_windows(lm.tokenizer, DataConfig(n_samples=2, seq_len=128), max_positions=4096)
    prof = profile(lm.model, windows, ProfileConfig(batch_size=2), tokenizer=lm.tokenizer)
    ma, gain = synthetic.PLANTED["ma"], synthetic.PLANTED["gain"]
    found = {(m["layer"], m["position"], m["token"], m["channel"]) for m in prof.massive_activations}
    assert (ma["layer"], "mlp.down_in", ".", ma["j"]) in found or (ma["layer"], "block.out", ".", ma["d"]) in found
    cos = {(c["layer"], c["position"], c["channel"]) for c in prof.channel_outliers}
    assert (gain["layer"], gain["norm"], gain["channel"]) in cos
    # the same model dispatched with a budget that leaves about half of the layers on disk
    size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    layers = sum(p.numel() * p.element_size() for p in get_adapter(lm.model).layers().parameters())
    off = load_model(spec, max_memory={"cpu": int(size - 0.5 * layers)})
    assert getattr(off.model, "hf_device_map", None) and "disk" in off.model.hf_device_map.values()
    prof2 = profile(off.model, windows, ProfileConfig(batch_size=2), tokenizer=off.tokenizer)
    assert prof2.massive_activations == prof.massive_activations
    assert prof2.channel_outliers == prof.channel_outliers


def test_random_draws_do_not_depend_on_threads_or_placement(monkeypatch):
    """Every chunk has its own seeded generator: the CPU's threaded draw equals a serial one, chunk by chunk, and
    a model built twice (as in memory and before offloading) has the same weights; nothing is left uninitialized."""
    import torch

    from outlierlab.testing import tiny_config

    monkeypatch.setattr(synthetic, "_CHUNK", 1000)
    t = torch.empty(2, 1250)
    synthetic.draw_normal(t, 0.02, "0:w", torch.device("cpu"))
    base = int.from_bytes(__import__("hashlib").sha256(b"0:w").digest()[:8], "little") >> 2
    serial = torch.cat([torch.randn(n, generator=torch.Generator().manual_seed(base + i)) * 0.02
                        for i, n in enumerate((1000, 1000, 500))])
    assert torch.equal(t.view(-1), serial)
    from transformers import AutoModelForCausalLM

    models = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_config(tiny_config("gemma2", vocab_size=300))
        for p in model.parameters():
            p.data.fill_(float("nan"))  # what an uninitialized allocation may hold
        synthetic.random_init(model, 0, "cpu")
        models.append(model.state_dict())
    assert all(torch.isfinite(v).all() and torch.equal(v, models[1][k]) for k, v in models[0].items())
