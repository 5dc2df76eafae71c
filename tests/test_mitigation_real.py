"""Mitigation on the real default model (SmolLM2-135M-Instruct, Brown text): the exported checkpoint of a
function-preserving transform in a fresh process, and the science target.

Slow: they load the model and run the evaluation windows. To stay within the slow-test budget the
before/after measurements use the first 4 windows of the evaluation protocol (the report in
docs/mitigation.md uses all 8); the targets are the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPT = "The committee said that the new school"


@pytest.fixture(scope="module")
def smollm():
    from outlierlab.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def windows(smollm):
    from outlierlab.api import as_windows
    from outlierlab.data import DataConfig
    from outlierlab.evaluation import EvalConfig, eval_windows

    calib = as_windows(DataConfig(source="brown:calib", seq_len=512, n_samples=4), smollm)
    ev = eval_windows(smollm.tokenizer, EvalConfig(n_samples=4))
    return calib, ev


@pytest.fixture(scope="module")
def before(smollm, windows):
    from outlierlab.mitigation.measure import measure

    return measure(smollm.model, windows[1], tokenizer=smollm.tokenizer)


def _greedy(model, tokenizer, n: int = 12) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:])


def test_rotated_export_loads_in_a_fresh_process_and_generates_the_same_text(smollm, tmp_path):
    import copy

    from outlierlab.mitigation import RotateConfig, export, mitigate

    model = copy.deepcopy(smollm.model)
    ids = smollm.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = smollm.model(input_ids=ids).logits
    result = mitigate(model, [RotateConfig()], None, smollm.tokenizer)
    assert result.exact and not result.runtime
    with torch.inference_mode():
        rotated = model(input_ids=ids).logits
    assert float((rotated - ref).abs().max() / ref.abs().max()) < 1e-4
    text = _greedy(model, smollm.tokenizer)
    folder = export.save(model, smollm.tokenizer, result, tmp_path / "rotated")
    torch.save(rotated, tmp_path / "rotated_logits.pt")
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(folder)!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32).eval()
        ids = tok({PROMPT!r}, return_tensors="pt").input_ids
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        ref = torch.load({str(tmp_path / "rotated_logits.pt")!r})
        print(json.dumps({{"text": tok.decode(out[0, ids.shape[1]:]),
                          "rel": float((logits - ref).abs().max() / ref.abs().max()),
                          "modules": sorted(m.split(".")[0] for m in __import__("sys").modules if m.startswith("outlierlab"))}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["modules"] == []  # plain transformers, no outlierlab code
    assert got["rel"] < 1e-4
    assert got["text"] == text


def test_science_target_residual_10x_co_3x_ppl_within_1pct(smollm, windows, before):
    """The best configuration found (docs/mitigation.md): compensated TMA scale + rotation, both
    function-preserving. Also checks the study's own combination (tma + gamma + otc) reaches the residual
    target at no perplexity cost, and records that its CO cut stays below 3x on this model (the COs come
    from the residual stream, not from the gains)."""
    import copy

    from outlierlab.mitigation import mitigate
    from outlierlab.mitigation.measure import measure, reduction

    calib, ev = windows
    model = copy.deepcopy(smollm.model)
    result = mitigate(model, ["tma", "rotate"], calib, smollm.tokenizer)
    after = measure(model, ev, tokenizer=smollm.tokenizer)
    red = reduction(before, after)
    assert result.exact
    assert red["resid_max_x"] >= 10
    assert red["co_ratio_max_x"] >= 3
    assert abs(red["ppl_rel"]) <= 0.01
    assert after["ma_count_resid"] == 0

    paper = copy.deepcopy(smollm.model)
    mitigate(paper, ["paper"], calib, smollm.tokenizer)
    after = measure(paper, ev, tokenizer=smollm.tokenizer)
    red = reduction(before, after)
    assert red["resid_max_x"] >= 10 and abs(red["ppl_rel"]) <= 0.01
    assert 1.3 <= red["co_ratio_max_x"] < 3  # gamma removes the gains' share only (measured 1.6x)


def test_compensated_tma_beats_the_clamp_reference(smollm, windows, before):
    """Clamping y6 to +-100 everywhere cuts the residual max ~18x for +20% perplexity (the issue's
    reference); the compensated scale at the origin layer cuts it >= 10x at unchanged perplexity."""
    import copy

    from outlierlab.mitigation import TMAConfig, mitigate
    from outlierlab.mitigation.measure import MeasureConfig, measure

    calib, ev = windows
    rows = {}
    for name, cfg in {"clip": TMAConfig(mode="clip", target=100.0, layers="all"),
                      "comp": TMAConfig(mode="scale", target=20.0, layers="origin")}.items():
        model = copy.deepcopy(smollm.model)
        result = mitigate(model, [cfg], calib, smollm.tokenizer)
        if name == "comp":
            assert result.applied[0]["info"]["origins"] == [11]
        rows[name] = measure(model, ev, MeasureConfig(fast=True))
        result.remove()
    clip, comp = rows["clip"], rows["comp"]
    assert before["resid_max"] / clip["resid_max"] > 10 and clip["ppl"] / before["ppl"] - 1 > 0.05
    assert before["resid_max"] / comp["resid_max"] >= 10
    assert abs(comp["ppl"] / before["ppl"] - 1) < 1e-3
