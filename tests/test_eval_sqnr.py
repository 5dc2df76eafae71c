"""Per-linear quantization error: matches a direct computation, points at the planted outlier's operator and
blames the right source (activation vs weight), covers the KV cache, and the perplexity protocol is kept."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from outlierlab.evaluation import EvalConfig, perplexity
from outlierlab.evaluation.sqnr import QuantErrorReport, quant_error
from outlierlab.quantization import quantize_
from outlierlab.testing import plant_gain, random_windows, tiny_model


def _out(module, model, ids):
    got = []
    h = module.register_forward_hook(lambda m, a, o: got.append(o.detach().float()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return got[0]


def test_sqnr_matches_direct_computation():
    model = tiny_model("llama")
    ids = random_windows(model, n=2, seq_len=16)
    spec = "w4a4:roles=q:layers=0"  # only layer 0's q_proj: its input is exact in both runs
    rep = quant_error(model, spec, ids)
    assert len(rep.rows) == 1
    row = rep.rows[0]
    q_proj = model.model.layers[0].self_attn.q_proj
    y = _out(q_proj, model, ids)
    with quantize_(model, spec, ids):  # w4a4 chooses its activation clips on the same windows
        yq = _out(q_proj, model, ids)
    sqnr = 10 * math.log10(float((y ** 2).sum() / ((y - yq) ** 2).sum()))
    assert row.sqnr_db == pytest.approx(sqnr, abs=1e-3)
    flat, dflat = y.reshape(-1, y.shape[-1]), (y - yq).reshape(-1, y.shape[-1])
    rel = float(((dflat ** 2).sum(-1) / (flat ** 2).sum(-1)).mean())
    assert row.rel_mse == pytest.approx(rel, rel=1e-4)
    assert row.tokens == 32 and row.operator == "L0 q (attn.norm)"
    # weights-only and activations-only parts are each smaller than the total
    assert row.rel_mse_act < row.rel_mse and row.rel_mse_weight < row.rel_mse


def test_points_at_the_planted_channel_outlier_and_blames_activations():
    model = tiny_model("llama")
    plant_gain(model, 1, "mlp.norm", 5, 400.0)  # a CO at the gate/up input (y2) of layer 1
    ids = random_windows(model, n=2, seq_len=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = quant_error(model, "w8a8-tensor", ids)
    worst = rep.worst(3)
    # the CO breaks the FFN of layer 1: its inputs y2 (gate, up) and, through them, y6 (down)
    assert {(r.layer, r.role) for r in worst} == {(1, "gate"), (1, "up"), (1, "down")}
    assert all(r.cause == "activation" and r.input_absmax > 100 for r in worst)
    assert rep.get(1, "gate").alias == "y2" and rep.get(1, "down").alias == "y6"
    others = [r.rel_mse for r in rep.rows if r not in worst]
    assert min(r.rel_mse for r in worst) > 30 * max(others)
    assert rep.summary()["worst_rel_mse"]["operator"].startswith("L1 ")
    # weight-only quantization blames the weights everywhere
    rep_w = quant_error(model, "w4a16", ids)
    assert all(r.cause == "weight" and r.rel_mse_act == 0 for r in rep_w.rows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_kv_error_and_files(tmp_path):
    model = tiny_model("gpt2")
    ids = random_windows(model, n=2, seq_len=16)
    ref = _out(model.lm_head, model, ids)
    rep = quant_error(model, "w4a4kv4", ids)
    assert len(rep.kv) == 2 * model.config.n_layer
    assert all(math.isfinite(d["sqnr_db"]) and 0 < d["sqnr_db"] < 60 for d in rep.kv)
    low = rep.lowest_kv()
    assert low["sqnr_db"] == min(d["sqnr_db"] for d in rep.kv)
    # read back from JSON an entry without a number (an error-free one's inf) never ranks lowest
    doc = {**rep.to_json(), "kv": [{**low, "sqnr_db": None}, *(d for d in rep.kv if d is not low)]}
    assert QuantErrorReport.from_json(doc).lowest_kv()["sqnr_db"] == min(d["sqnr_db"] for d in rep.kv if d is not low)
    assert torch.equal(_out(model.lm_head, model, ids), ref)  # KV probe removed, attention restored
    assert model.config._attn_implementation == "eager"
    rep.save_csv(tmp_path / "e.csv")
    with open(tmp_path / "e.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(rep.rows) == 4 * model.config.n_layer
    assert {"name", "layer", "role", "sqnr_db", "rel_mse", "rel_mse_act", "rel_mse_weight"} <= set(rows[0])
    doc = rep.to_json()
    assert doc["summary"]["worst_rel_mse"]["operator"] and len(doc["linears"]) == len(rows)


def test_perplexity_protocol_and_batch_invariance():
    model = tiny_model("llama")
    ids = random_windows(model, n=4, seq_len=24)
    p1, p4 = perplexity(model, ids, batch_size=1), perplexity(model, ids, batch_size=4)
    assert p1 == pytest.approx(p4, rel=1e-6)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert p1 == pytest.approx(math.exp(float(nll)), rel=1e-5)
    proto = EvalConfig().protocol()
    assert proto["source"] == "brown:eval" and proto["n_samples"] == 8 and proto["seq_len"] == 512
    assert proto["order"] == "sequential" and proto["predicted_tokens_per_window"] == 511


def test_quantized_weights_are_built_one_linear_at_a_time():
    """quant_error holds at most one linear's quantized weight: each is read when its linear runs and dropped."""
    import weakref

    from outlierlab.quantization import prepare

    model = tiny_model("llama")
    ids = random_windows(model, n=2, seq_len=16)
    plan = prepare(model, "w4a8", ids)
    inner, alive, most = plan.weights, [], [0]

    class Counting(dict):
        def __contains__(self, name):
            return name in inner

        def __getitem__(self, name):
            w = inner[name]
            alive.append(weakref.ref(w))
            most[0] = max(most[0], sum(r() is not None for r in alive))
            return w

    plan.weights = Counting()
    rep = quant_error(model, "w4a8", ids, plan=plan)
    assert len(alive) == len(rep.rows) == len(plan.targets)  # every linear read once (one batch)
    assert most[0] <= 2  # the one being measured (and the previous one until the collector sees it)
