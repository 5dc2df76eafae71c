"""Calibrated clipping: the weight clip search (per row, the ratio of least rounding error; RTN, GPTQ and the
export's recovered scales agree) and the activation clip search (per linear input, the ratio of least output
error on the calibration windows, checked against a brute force on independently captured inputs)."""

from __future__ import annotations

import pytest
import torch

from outlierlab.quantization import QuantConfigError, get_quant, prepare
from outlierlab.quantization.export import weight_codes
from outlierlab.quantization.fake import A_SEARCH_RATIOS
from outlierlab.quantization.gptq import gptq_quantize
from outlierlab.quantization.quantizers import (
    SEARCH_NORM,
    SEARCH_STEP,
    SEARCH_STEPS,
    fake_quant,
    qparams,
    quant_dynamic,
    quant_weight,
    quant_weight_as,
    searched_qparams,
)
from outlierlab.testing import random_windows, tiny_model


def _planted_rows(seed=0):
    """Gaussian rows, half of them with one planted value 12 sigma out: min-max wastes their grid."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 256, generator=g)
    w[::2, 7] = 12.0
    return w


@pytest.mark.parametrize("grid", ["restricted", "full"])
def test_weight_search_never_worse_and_clips_the_planted_rows(grid):
    w = _planted_rows()
    plain = quant_weight(w, 4, grid=grid)
    searched = quant_weight(w, 4, grid=grid, search=True)
    err = lambda q: (q - w).abs().pow(SEARCH_NORM).sum(dim=1)  # noqa: E731
    assert (err(searched) <= err(plain) + 1e-4).all()
    assert (err(searched)[::2] < err(plain)[::2]).all()  # the planted rows gain
    scale, _ = searched_qparams(w, 4, grid=grid)
    steps = 7 if grid == "restricted" else 7.5
    ratio = scale.squeeze(1) * steps / w.abs().amax(dim=1)
    assert (ratio[::2] < 1).all() and (ratio >= 0.21 - 1e-6).all() and (ratio <= 1 + 1e-6).all()
    k = searched / scale  # on the grid of the searched scale
    assert torch.allclose(k, k.round(), atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_coarse_to_fine_search_is_within_a_percent_of_every_ratio_tried(symmetric):
    """The search tries 24 of the 80 ratios; each row's error is checked against the best of all 80 (brute force,
    rounded here with the module's own fake_quant)."""
    w = torch.cat([_planted_rows(s) for s in range(4)])
    ratios = [1 - i * SEARCH_STEP for i in range(SEARCH_STEPS)]
    err = lambda q: (q - w).abs().pow(SEARCH_NORM).sum(dim=1)  # noqa: E731
    brute = torch.stack([err(fake_quant(w, *qparams(w, 4, symmetric, -1, r), 4)) for r in ratios]).amin(0)
    scale, zero = searched_qparams(w, 4, symmetric)
    got = err(fake_quant(w, scale, zero, 4))
    assert (got >= brute - 1e-4).all() and (got <= brute * 1.01 + 1e-4).all()
    assert (got <= brute + 1e-4).float().mean() >= 0.9  # most rows land on the exhaustive optimum itself


def test_gptq_with_an_identity_hessian_is_searched_rtn():
    """With H = I no error is propagated: GPTQ's result is RTN's with the same (searched) scales."""
    w = _planted_rows(1)
    q = gptq_quantize(w, torch.eye(w.shape[1]), 4, damp=0.0, clip_search=True)
    assert torch.allclose(q, quant_weight(w, 4, search=True), atol=1e-6)
    assert not torch.allclose(q, quant_weight(w, 4), atol=1e-6)


@pytest.mark.parametrize("grid", ["restricted", "full"])
def test_searched_scales_are_recovered_by_the_export(grid):
    w = _planted_rows(2)
    config = get_quant(f"w4a16:w_clip_search=true:w_grid={grid}")
    wq = quant_weight_as(w, config)
    assert torch.equal(wq, quant_weight(w, 4, grid=grid, search=True))
    codes, scale = weight_codes(w, wq, config)
    assert torch.allclose(codes * scale, wq, atol=1e-6)


def _captured_inputs(model, module, ids):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().float()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


@pytest.mark.parametrize("granularity", ["token", "tensor-dynamic"])
def test_activation_clip_search_matches_a_brute_force(granularity):
    model = tiny_model("llama")
    calib = random_windows(model, n=4, seq_len=32, seed=3)
    plan = prepare(model, f"w4a4:w_bits=none:a_clip_search=true:a_granularity={granularity}", calib)
    clips = {t.name: plan.acts[t.name].clip for t in plan.targets}
    assert set(clips.values()) <= set(A_SEARCH_RATIOS)
    assert 0 < plan.info["a_clips"]["min"] <= plan.info["a_clips"]["max"] <= 1
    layer = model.model.layers[0]
    for names, mods in ((["q_proj", "k_proj", "v_proj"], layer.self_attn), (["gate_proj", "up_proj"], layer.mlp),
                        (["down_proj"], layer.mlp)):
        targets = [f"model.layers.0.{'self_attn' if mods is layer.self_attn else 'mlp'}.{n}" for n in names]
        assert len({clips[n] for n in targets}) == 1  # one ratio per input, shared by its readers
        x = _captured_inputs(model, getattr(mods, names[0]), calib)
        if granularity == "tensor-dynamic":
            x = x.reshape(calib.shape[0], calib.shape[1], -1)
        w = torch.cat([getattr(mods, n).weight.detach().float() for n in names])
        dims = -1 if granularity == "token" else (1, 2)
        errs = [float(((x - quant_dynamic(x, 4, True, dims, r)).reshape(-1, w.shape[1]) @ w.t()).pow(2).sum())
                for r in A_SEARCH_RATIOS]
        assert clips[targets[0]] == A_SEARCH_RATIOS[min(range(len(errs)), key=errs.__getitem__)]


def test_activation_clip_search_needs_calibration_and_a_dynamic_granularity():
    assert get_quant("w4a4:a_clip_search=true").needs_calibration
    with pytest.raises(QuantConfigError, match="a_clip_search"):
        get_quant("w8a8-tensor:a_clip_search=true")
    model = tiny_model("llama")
    with pytest.raises(QuantConfigError, match="calibration"):
        prepare(model, "w4a4:a_clip_search=true")
