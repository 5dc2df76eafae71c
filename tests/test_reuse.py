"""Work done once and shared: the profile of the unmodified model serves the mitigation calibrations, explain's
ablations use a documented subset of the evaluation windows, and compare takes cells measured elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch

from outlierlab.data import DataConfig, Windows
from outlierlab.mitigation import base as mbase
from outlierlab.mitigation import mitigate
from outlierlab.testing import (
    BOS,
    plant_gain,
    plant_token_ma,
    random_windows,
    tiny_model,
)
from outlierlab.tracing import ProfileConfig, profile


def _windows(model, n=4, seq_len=32, seed=0) -> Windows:
    ids = random_windows(model, n, seq_len, seed)
    ids[:, 0] = BOS  # the planted MA's token
    return Windows(ids, tuple(range(0, n * seq_len, seq_len)), False, DataConfig(source="test", seq_len=seq_len,
                                                                               n_samples=n), {})


def _planted(family="llama"):
    torch.manual_seed(0)
    model = tiny_model(family)
    plant_token_ma(model)
    plant_gain(model, 0, "attn.norm", 3, 40.0)
    return model


#: method -> calibration passes (without the profile, with it): tma's defaults need no data; in paper, otc's
#: scoring runs before gamma and tma, which keep every score, so the profile serves it; smoothquant changes the
#: scores (its up -> down rows), so otc traces again after it; prefix leaves the model unchanged
PASSES = {"smoothquant": (1, 0), "prefix": (1, 0), "tma": (0, 0), "paper": (1, 0), "prefix,smoothquant": (2, 0),
          "smoothquant,otc": (2, 1), "gamma,otc": (1, 0), "prefix,otc": (2, 0)}


def _rounded(obj):
    """``obj`` with every float to 5 significant digits (the profile and a calibration pass batch differently)."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


@pytest.mark.parametrize("method", sorted(PASSES))
def test_shared_profile_gives_the_same_mitigation_without_a_new_pass(method, monkeypatch):
    model = _planted()
    calib = _windows(model)
    prof = profile(model, calib, ProfileConfig(batch_size=2))
    passes = []
    real = mbase.calib_profile
    monkeypatch.setattr(mbase, "calib_profile", lambda *a, **k: passes.append(a[2]) or real(*a, **k))

    fresh = copy.deepcopy(model)
    r1 = mitigate(fresh, [method], calib)
    n_fresh = len(passes)
    passes.clear()
    lines = []
    r2 = mitigate(model, [method], calib, profile=prof, log=lines.append)
    # the first calibration of an unmodified model reads the profile; later ones (after a method changed the
    # model) trace again
    assert (n_fresh, len(passes)) == PASSES[method], passes
    assert any("from the profile of the unmodified model" in s for s in lines) == (n_fresh > len(passes))
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [x.get("runtime") for x in r1.applied] == [x.get("runtime") for x in r2.applied]
    assert _rounded([x["info"] for x in r1.applied]) == _rounded([x["info"] for x in r2.applied])
    r1.remove()
    r2.remove()


def test_a_profile_of_other_windows_is_not_used(monkeypatch):
    model = _planted()
    calib = _windows(model)
    other = _windows(model, n=3)
    prof = profile(model, other, ProfileConfig(batch_size=2))
    passes = []
    real = mbase.calib_profile
    monkeypatch.setattr(mbase, "calib_profile", lambda *a, **k: passes.append(a[2]) or real(*a, **k))
    mitigate(model, ["smoothquant"], calib, profile=prof).remove()
    assert len(passes) == 1


def test_explain_ablations_use_the_first_windows_and_say_so():
    from outlierlab.analysis.explain import ExplainConfig, explain

    model = _planted()
    calib = _windows(model)
    ev = _windows(model, 5, seed=1).input_ids
    ex = explain(model, calib.input_ids, ExplainConfig(max_ablations=1, ablation_windows=2), eval_windows=ev)
    p = ex.perplexity["protocol"]
    assert p["n_windows_used"] == 2 and p["n_windows_protocol"] == 5
    from outlierlab.evaluation import perplexity

    assert ex.perplexity["baseline"] == pytest.approx(perplexity(model, ev[:2]), rel=1e-9)
