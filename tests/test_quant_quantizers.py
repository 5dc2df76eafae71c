"""Quantizer properties: half-step round trip, idempotence, symmetric range, the restricted and full weight
grids (exact values), group handling, clipping, and the config / preset parsing."""

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
    sym_range,
    sym_scale,
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
    assert "W4 per-group 64 sym full-grid GPTQ clip-search" in cfg.describe()  # GPTQ's W4 defaults
    assert get_quant("w8a8-token:a_bits=none").quantizes_activations is False
    assert [c.name for c in parse_quant_list("fp, w4a4 ,fp")] == ["fp", "w4a4"]
    hash_a, hash_b = get_quant("w4a8").key(), get_quant("w4a8:a_clip=0.9").key()
    assert hash_a != hash_b
    full = get_quant("w4a16:w_grid=full:w_method=gptq:gptq_act_order=true:gptq_static_groups=1"
                     ":gptq_true_sequential=false:gptq_offload_inputs=always")
    assert (full.w_grid, full.gptq_act_order, full.gptq_static_groups, full.gptq_true_sequential,
            full.gptq_offload_inputs) == ("full", True, True, False, "always")
    assert "W4 per-channel sym full-grid GPTQ" in full.describe()
    plain = get_quant("w4a16:w_grid=restricted:w_clip_search=false")
    assert plain.w_grid == "restricted" and "full" not in plain.describe() and "clip-search" not in plain.describe()
    assert full.key() != get_quant("w4a16:w_method=gptq:w_grid=restricted").key()


def test_four_bit_presets_search_clips_with_gptq_and_calibrate_a4_clipping():
    """RTN W4 presets keep min-max ranges on the restricted grid; with ``w_method=gptq`` a W4 preset uses the full
    grid and searched row clips unless given (the same weight quantizer in every W4 column); the A4 presets search
    their activation clips; the 8-bit presets do neither."""
    weight_fields = ("w_bits", "w_grid", "w_clip_search", "w_method", "w_granularity", "symmetric", "w_clip")
    names = ("w4a16", "w4a8", "w4a4", "w4a4kv4")
    rtn = {tuple(getattr(get_quant(n), f) for f in weight_fields) for n in names}
    assert rtn == {(4, "restricted", False, "rtn", "channel", True, 1.0)}
    gptq = {tuple(getattr(get_quant(f"{n}:w_method=gptq"), f) for f in weight_fields) for n in names}
    assert gptq == {(4, "full", True, "gptq", "channel", True, 1.0)}
    assert [get_quant(n).a_clip_search for n in names] == [False, False, True, True]
    assert get_quant("w4a4").needs_calibration and not get_quant("w4a8").needs_calibration
    for name in ("w8a8-tensor", "w8a8-dynamic", "w8a8-token"):
        c = get_quant(f"{name}:w_method=gptq")
        assert (c.w_grid, c.w_clip_search, c.a_clip_search) == ("restricted", False, False)
    # what is given wins; a preset default gives way to an override it cannot go with
    given = get_quant("w4a8:w_method=gptq:w_grid=restricted:w_clip_search=false")
    assert (given.w_grid, given.w_clip_search) == ("restricted", False)
    asym = get_quant("w4a16:w_method=gptq:symmetric=false")
    assert (asym.symmetric, asym.w_grid, asym.w_clip_search) == (False, "restricted", True)
    static = get_quant("w4a4:a_granularity=tensor-static")
    assert static.a_clip_search is False and static.needs_calibration


@pytest.mark.parametrize("spec, words", [
    ("w9a9", "unknown quantization preset"),
    ("w4a8:nope=1", "bad override"),
    ("w4a8:group_size=x", "bad value"),
    ("w4a8:a_clip=1.5", "a_clip"),
    ("w4a8:w_granularity=row", "w_granularity"),
    ("w4a16:w_grid=wide", "w_grid"),
    ("w4a16:w_grid=full:symmetric=false", "symmetric"),
    ("w4a16:gptq_offload_inputs=yes", "gptq_offload_inputs"),
    ("", "preset name"),
])
def test_bad_specs(spec, words):
    with pytest.raises(QuantConfigError, match=words):
        get_quant(spec)
    with pytest.raises(QuantConfigError):
        QuantConfig(w_bits=1)


def test_restricted_and_full_grids_exact():
    """4 bits, one row with abs-max 7.5: restricted has step 7.5/7 and levels -7..7; full (compressed-tensors)
    has step 1 (abs-max / 7.5) and levels -8..7, the top value clipped from 7.5 to 7."""
    assert sym_range(4, "restricted") == (-7, 7) and sym_range(4, "full") == (-8, 7)
    assert sym_range(8, "full") == (-128, 127) and sym_range(3, "restricted") == (-3, 3)
    with pytest.raises(ValueError):
        sym_range(4, "wide")
    assert float(sym_scale(torch.tensor(7.5), 4, grid="full")) == 1.0
    assert float(sym_scale(torch.tensor(7.0), 4, grid="restricted")) == 1.0
    w = torch.tensor([[7.5, -7.5, 3.2, -3.7, 0.49, 6.6, -8.0 * 7.5 / 8, 2.5]])
    full = quant_weight(w, 4, True, "channel", grid="full")
    # step 1: round half to even (2.5 -> 2, -3.7 -> -4), +7.5 -> 8 clipped to 7, -7.5 -> -8 (the extra level)
    assert full.tolist() == [[7.0, -8.0, 3.0, -4.0, 0.0, 7.0, -8.0, 2.0]]
    step = 7.5 / 7
    rest = quant_weight(w, 4, True, "channel", grid="restricted")
    expected = torch.tensor([[7, -7, 3, -3, 0, 6, -7, 2]], dtype=torch.float32) * step
    assert torch.allclose(rest, expected, atol=1e-6)
    # the full grid's levels over a dense row: all 16 integers -8..7 times abs-max / 7.5
    row = torch.linspace(-3.0, 3.0, 601).unsqueeze(0)
    levels = torch.unique(quant_weight(row, 4, True, "channel", grid="full") / (3.0 / 7.5)).round()
    assert levels.tolist() == list(range(-8, 8))
    levels = torch.unique(quant_weight(row, 4, True, "channel", grid="restricted") / (3.0 / 7)).round()
    assert levels.tolist() == list(range(-7, 8))


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_full_grid_every_granularity(granularity):
    """The full grid per channel / group / tensor: every value is an integer in [-8, 7] times its scale, and
    the error inside the range is at most half a step (the clipped top at most one step)."""
    x = _data(3)
    q = quant_weight(x, 4, True, granularity, group_size=32, grid="full")
    if granularity == "tensor":
        amax = x.abs().amax().expand(x.shape[0], 1)
        scales = (amax / 7.5).expand_as(x)
    elif granularity == "channel":
        scales = (x.abs().amax(dim=1, keepdim=True) / 7.5).expand_as(x)
    else:
        scales = (x.reshape(16, 3, 32).abs().amax(dim=2, keepdim=True) / 7.5).expand(16, 3, 32).reshape(16, 96)
    k = q / scales
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert k.round().min() >= -8 and k.round().max() == 7  # the +40 outlier: 7.5 steps, clipped to 7
    assert torch.all((q - x).abs() <= scales * (1 + 1e-5))
    assert not torch.equal(q, quant_weight(x, 4, True, granularity, group_size=32))
