"""The lm-evaluation-harness adapter on a tiny model and a local task file (no network); skipped without
lm_eval (the ``eval`` extra)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture
def loaded(tiny_folder, cache):
    from outlierlab.models import load_model

    return load_model(str(tiny_folder))


def test_loglikelihood_matches_the_model(loaded):
    from outlierlab.evaluation.lm_eval import OutlierlabLM

    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    lm = OutlierlabLM(model=loaded, batch_size=2)
    reqs = [_Req("w5 w6 w7", " w8 w9"), _Req("w10 ", "w11"), _Req("", "w12 w13"), _Req("w5", " w40")]
    got = lm.loglikelihood(reqs)
    tok = loaded.tokenizer
    for req, (score, greedy) in zip(reqs, got):
        ctx, cont = req.args
        ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids or [tok.bos_token_id]
        cont_ids = tok(cont, add_special_tokens=False).input_ids
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0, :-1].float(), -1)
        want = logp[len(ctx_ids) - 1:].gather(-1, torch.tensor(cont_ids).unsqueeze(-1)).sum()
        assert score == pytest.approx(float(want), abs=1e-4)
        assert greedy == bool((logp[len(ctx_ids) - 1:].argmax(-1) == torch.tensor(cont_ids)).all())
    # rolling log-likelihood over several windows equals the sum of per-token log-probabilities
    lm._max_length = 8
    text = " ".join(f"w{i}" for i in range(4, 24))
    rolling = lm.loglikelihood_rolling([_Req(text)])[0]
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    total = 0.0
    for t in range(1, len(ids)):
        inp = torch.tensor([ids[max(0, t - 8):t]])
        with torch.no_grad():
            total += float(torch.log_softmax(loaded.model(input_ids=inp).logits[0, -1], -1)[ids[t]])
    assert rolling < 0 and abs(rolling - total) < 0.1 * abs(total)  # later windows see less context
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_simple_evaluate_with_a_local_task(tmp_path, loaded):
    from lm_eval.tasks import TaskManager

    from outlierlab.evaluation.lm_eval import OutlierlabLM, register

    rng = random.Random(0)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps({"question": " ".join(f"w{rng.randrange(4, 128)}" for _ in range(5)),
                                "choices": [f" w{rng.randrange(4, 128)}" for _ in range(3)],
                                "answer": rng.randrange(3)}) + "\n" for _ in range(6))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: outlierlab_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    scores = {}
    for quant in ("fp", "w4a4kv4"):
        lm = OutlierlabLM(model=loaded, quant=quant, seq_len=64, calib_samples=2)  # w4a4kv4 calibrates its clips
        res = lm_eval.simple_evaluate(model=lm, tasks=["outlierlab_tiny"], task_manager=tm, log_samples=True,
                                      bootstrap_iters=0)
        acc = res["results"]["outlierlab_tiny"]["acc,none"]
        assert 0.0 <= acc <= 1.0
        scores[quant] = [s["resps"] for s in res["samples"]["outlierlab_tiny"]]
    assert scores["fp"] != scores["w4a4kv4"]  # the quantized model gives other log-likelihoods
    register()
    from lm_eval.api.registry import get_model

    assert get_model("outlierlab") is OutlierlabLM and get_model("hf") is not None
    assert math.isfinite(OutlierlabLM(model=loaded).loglikelihood([_Req("w5", " w6")])[0][0])


def test_cli_lm_eval(tmp_path, tiny_folder, cache):
    from typer.testing import CliRunner

    from outlierlab.cli import app

    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"question": f"w{5 + i} w{9 + i}", "choices": [" w20", " w30"], "answer": i % 2}) + "\n"
        for i in range(4)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(
        f"task: outlierlab_cli\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        f"  cache_dir: {tmp_path / 'hf'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = tmp_path / "o"
    args = ["lm-eval", "--tasks", "outlierlab_cli", "--include-path", str(tmp_path / "tasks"), "--model",
            str(tiny_folder), "--quant", "w8a8-token", "--out", str(out), "--no-builtin-tasks"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "lm_eval.json").read_text())
    assert doc["quant"]["name"] == "w8a8-token" and 0 <= doc["results"]["outlierlab_cli"]["acc,none"] <= 1
    bad = CliRunner().invoke(app, args[:2] + ["nope"] + args[3:])
    assert bad.exit_code == 2 and "unknown lm_eval task" in bad.output


def test_an_offloaded_model_is_scored_in_place_and_given_back(loaded):
    """A model accelerate offloaded is not deep-copied: mitigated and quantized in place, it scores as the
    in-memory copy does, and ``close()`` gives every original weight back."""
    from accelerate import cpu_offload

    from outlierlab.evaluation.lm_eval import OutlierlabLM
    from outlierlab.runtime import offload

    reqs = [_Req("w5 w6 w7", " w8 w9"), _Req("w10 ", "w11")]
    ref = OutlierlabLM(model=loaded, methods="smoothquant", quant="w8a8-tensor", calib_samples=2, seq_len=32)
    want = ref.loglikelihood(reqs)
    off = cpu_offload(loaded.model, execution_device=torch.device("cpu"))
    with offload.writable(off, write_back=False):
        before = {k: v.detach().clone() for k, v in off.state_dict().items()}
    lm = OutlierlabLM(model=off, tokenizer=loaded.tokenizer, methods="smoothquant", quant="w8a8-tensor",
                      calib_samples=2, seq_len=32)
    assert lm.model is off and lm._journal is not None
    got = lm.loglikelihood(reqs)
    with offload.writable(off, write_back=False):  # quantized in its store
        assert any(not torch.equal(before[k], v) for k, v in off.state_dict().items())
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    lm.close()
    with offload.writable(off, write_back=False):
        assert all(torch.equal(before[k], v) for k, v in off.state_dict().items())
