"""Quantizer properties: half-step round trip, idempotence, symmetric range, group handling, clipping, and
the config / preset parsing."""

from __future__ import annotations

import pytest
import torch

from outlierlab.quantization import (
    PRESETS,
    QuantConfig,
    QuantConfigError,
    get_quant,
    parse_quant_list,
)
from outlierlab.quantization.quantizers import (
    fake_quant,
    qmax_asym,
    qmax_sym,
    qparams,
    quant_dynamic,
    quant_weight,
)


def _data(seed=0, shape=(16, 96)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[3, 7] = 40.0  # an outlier, as activations have
    x[5] *= 0.001  # a nearly empty row
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dims", [-1, None, (0, 1)])
def test_round_trip_within_half_step(bits, symmetric, dims):
    x = _data(bits)
    scale, zero = qparams(x, bits, symmetric, dims)
    xq = fake_quant(x, scale, zero, bits)
    err = (xq - x).abs()
    # every value is inside the range (clip = 1): the error is at most half a step (+ float rounding)
    assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-7)
    # and the error is not trivially zero: the grid is really coarse at low bits
    if bits <= 4:
        assert err.max() > 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_idempotent(symmetric):
    x = _data(1)
    scale, zero = qparams(x, 4, symmetric, -1)
    once = fake_quant(x, scale, zero, 4)
    assert torch.equal(fake_quant(once, scale, zero, 4), once)  # same grid: exactly the identity
    # recomputing the parameters from the quantized tensor lands on the same grid (up to float rounding)
    twice = quant_dynamic(once, 4, symmetric, -1)
    assert torch.allclose(twice, once, rtol=0, atol=1e-5 * float(scale.max()))


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_range_and_oddness(bits):
    x = _data(2)
    scale, zero = qparams(x, bits, True, -1)
    assert zero is None
    q = fake_quant(x, scale, None, bits) / scale
    assert torch.allclose(q, q.round(), atol=1e-4)  # integers
    assert q.abs().max() <= qmax_sym(bits) + 1e-4  # restricted range: -Q..Q, never -Q-1
    # the abs-max of each row maps to +-Q exactly, and the grid is odd-symmetric
    assert torch.allclose(q.abs().amax(-1), torch.full((x.shape[0],), float(qmax_sym(bits))), atol=1e-4)
    assert torch.equal(fake_quant(-x, scale, None, bits), -fake_quant(x, scale, None, bits))
    assert qmax_sym(8) == 127 and qmax_sym(4) == 7


def test_asymmetric_grid_and_exact_zero():
    x = _data(3).abs() + 0.5  # all positive: the asymmetric range still includes 0
    x[0, 0] = 0.0
    scale, zero = qparams(x, 4, False, -1)
    xq = fake_quant(x, scale, zero, 4)
    assert xq[0, 0] == 0.0
    levels = torch.round(xq / scale + zero)
    assert levels.min() >= 0 and levels.max() <= qmax_asym(4)
    assert all(len(torch.unique(levels[i])) <= 16 for i in range(x.shape[0]))


def test_clip_saturates_beyond_range():
    x = torch.linspace(-10, 10, 101).unsqueeze(0)
    scale, _ = qparams(x, 8, True, -1, clip=0.5)
    assert torch.isclose(scale, torch.tensor(5.0 / 127)).all()
    xq = fake_quant(x, scale, None, 8)
    assert torch.allclose(xq.abs().max(), torch.tensor(5.0), atol=1e-5)
    inside = x.abs() <= 5
    assert torch.all((xq - x).abs()[inside] <= scale / 2 + 1e-6)


def test_all_zero_slice_stays_zero():
    x = torch.zeros(3, 8)
    for sym in (True, False):
        assert torch.equal(quant_dynamic(x, 4, sym, -1), x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_size_handling(symmetric):
    w = _data(4, (8, 100))  # 100 = 3 groups of 32 + a ragged group of 4
    out = quant_weight(w, 4, symmetric, "group", 32)
    for start in range(0, 100, 32):
        part = w[:, start:start + 32]
        assert torch.equal(out[:, start:start + 32], quant_dynamic(part, 4, symmetric, -1))
    per_channel = quant_weight(w, 4, symmetric, "channel")
    # one scale per row and group: the outlier at column 7 of row 3 only coarsens its own group
    assert (out[3, 32:] - w[3, 32:]).abs().max() < 0.25 * (per_channel[3, 32:] - w[3, 32:]).abs().max()
    assert (out - w).abs().mean() < (per_channel - w).abs().mean()
    # a group at least as wide as the row is per-channel
    assert torch.equal(quant_weight(w, 4, symmetric, "group", 100), per_channel)
    assert torch.equal(quant_weight(w, 4, symmetric, "group", 512), per_channel)
    # per-tensor: one scale for everything
    t = quant_weight(w, 8, True, "tensor")
    s = w.abs().max() / 127
    assert torch.allclose(t / s, (t / s).round(), atol=1e-3)
    with pytest.raises(ValueError):
        quant_weight(w, 4, True, "row")


def test_dtype_is_kept():
    x = _data(5).to(torch.bfloat16)
    assert quant_dynamic(x, 8, True, -1).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        quant_dynamic(x, 1)


def test_presets_and_overrides():
    assert set(PRESETS) >= {"fp", "w8a8-tensor", "w8a8-token", "w4a8", "w4a4", "w4a16", "w4a4kv4"}
    assert PRESETS["fp"].is_fp and not PRESETS["fp"].needs_calibration
    wt = get_quant("w8a8-tensor")
    assert (wt.w_bits, wt.a_bits, wt.a_granularity, wt.w_granularity) == (8, 8, "tensor-static", "channel")
    assert wt.needs_calibration
    assert get_quant("w4a16").a_bits is None and get_quant("w4a4kv4").kv_bits == 4
    cfg = get_quant("w4a8:w_method=gptq:w_granularity=group:group_size=64:roles=down/up:layers=1/2")
    assert cfg.name.startswith("w4a8:") and cfg.w_method == "gptq" and cfg.group_size == 64
    assert cfg.roles == ("down", "up") and cfg.layers == (1, 2) and cfg.needs_calibration
    assert "W4 per-group 64 sym GPTQ" in cfg.describe()
    assert get_quant("w8a8-token:a_bits=none").quantizes_activations is False
    assert [c.name for c in parse_quant_list("fp, w4a4 ,fp")] == ["fp", "w4a4"]
    hash_a, hash_b = get_quant("w4a8").key(), get_quant("w4a8:a_clip=0.9").key()
    assert hash_a != hash_b


@pytest.mark.parametrize("spec, words", [
    ("w9a9", "unknown quantization preset"),
    ("w4a8:nope=1", "bad override"),
    ("w4a8:group_size=x", "bad value"),
    ("w4a8:a_clip=1.5", "a_clip"),
    ("w4a8:w_granularity=row", "w_granularity"),
    ("", "preset name"),
])
def test_bad_specs(spec, words):
    with pytest.raises(QuantConfigError, match=words):
        get_quant(spec)
    with pytest.raises(QuantConfigError):
        QuantConfig(w_bits=1)
