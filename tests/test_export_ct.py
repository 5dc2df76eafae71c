"""The compressed-tensors export: written from the harness' quantized weights, reloaded by plain transformers,
the same perplexity as the fake-quant harness; what a checkpoint cannot hold is refused."""

from __future__ import annotations

import json

import pytest
import torch

from outlierlab.evaluation import perplexity
from outlierlab.mitigation import mitigate
from outlierlab.quantization import quantize_
from outlierlab.quantization.export import ExportError, export_compressed, weight_codes
from outlierlab.testing import plant_gain, random_windows, tiny_model


def _reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("quant", ["w4a16", "w4a16:w_method=gptq", "w4a16:w_grid=full:w_method=gptq",
                                   "w8a8-token", "w4a8", "w8a8-tensor"])
def test_export_reloads_with_the_harness_perplexity(quant, tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama")
    plant_gain(model, 0, "mlp.norm", 3, 30.0)
    ids = random_windows(model, 4, 32)
    result = mitigate(model, ["smoothquant"], ids)  # a weight-only method, folded into what is exported
    folder = export_compressed(model, None, quant, tmp_path / "ck", calib=ids, methods=result.methods_json())
    with quantize_(model, quant, ids):
        harness = perplexity(model, ids)
    reloaded = _reload(folder)
    got = perplexity(reloaded, ids)
    assert got == pytest.approx(harness, rel=5e-3)
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    group = cfg["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == int(quant[1])
    man = json.loads((folder / "outlierlab.json").read_text())
    assert [m["method"] for m in man["methods"]] == ["smoothquant"]
    if "a8" in quant and "tensor" not in quant:
        # the reloaded linears quantize their input per token (compressed-tensors' grid: abs-max / 127.5)
        assert group["input_activations"]["num_bits"] == 8
        lin = reloaded.get_submodule("model.layers.0.mlp.down_proj")
        x = torch.randn(2, 5, lin.in_features) * 10
        scale = x.abs().amax(-1, keepdim=True) / 127.5
        xq = (x / scale).round().clamp(-128, 127) * scale
        with torch.no_grad():
            y = lin(x)
        assert torch.allclose(y, torch.nn.functional.linear(xq, lin.weight, lin.bias), atol=1e-4)
        assert not torch.allclose(y, torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-4)


def test_codes_and_scales_are_recovered_exactly():
    from outlierlab.quantization import get_quant
    from outlierlab.quantization.quantizers import quant_weight_as

    w = torch.randn(16, 64)
    for spec in ("w4a16", "w4a16:w_grid=restricted:w_clip_search=false", "w8a8-token",
                 "w4a16:w_granularity=group:group_size=16"):
        q = get_quant(spec)
        wq = quant_weight_as(w, q)
        codes, scale = weight_codes(w, wq, q)
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2 ** (q.w_bits - 1)
        full = scale.repeat_interleave(q.group_size, 1) if q.w_granularity == "group" else scale
        assert torch.allclose(codes * full, wq, rtol=0, atol=1e-6)
    with pytest.raises(ExportError, match="not on the grid"):
        weight_codes(w, w, get_quant("w4a16"))


def test_what_a_checkpoint_cannot_hold_is_refused(tmp_path):
    model = tiny_model("llama")
    ids = random_windows(model, 2, 16)
    with pytest.raises(ExportError, match="KV-cache"):
        export_compressed(model, None, "w4a4kv4", tmp_path / "a", calib=ids)
    with pytest.raises(ExportError, match="full precision"):
        export_compressed(model, None, "fp", tmp_path / "b", calib=ids)
    result = mitigate(model, ["tma"], ids)
    with pytest.raises(ExportError, match="runtime-only parts are installed \\(tma\\)"):
        export_compressed(model, None, "w4a16", tmp_path / "c", calib=ids)
    result.remove()
    with pytest.raises(ExportError, match="nn.Linear"):
        export_compressed(tiny_model("gpt2"), None, "w4a16", tmp_path / "d", calib=ids)
    assert not (tmp_path / "d").exists()


def test_cli_export_checks_the_reload(tiny_folder, tmp_path, cache):
    from typer.testing import CliRunner

    from outlierlab.cli import app

    text = str(tmp_path / "text.txt")
    out = tmp_path / "exp"
    res = CliRunner().invoke(app, ["export", "--model", str(tiny_folder), "--quant", "w4a8", "--method",
                                   "smoothquant", "--data", text, "--eval-data", text, "-n", "2", "--seq-len",
                                   "32", "--eval-samples", "2", "--eval-seq-len", "32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "export_check.json").read_text())
    assert abs(doc["rel_diff"]) <= 0.005 and doc["reloaded_linear_type"] == "Linear"
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["w8a8-token", "w4a16"])
def test_default_model_export_reloads_within_half_a_percent(quant, tmp_path):
    from outlierlab import load_model
    from outlierlab.api import as_windows
    from outlierlab.data import DataConfig
    from outlierlab.evaluation import EvalConfig, eval_windows

    lm = load_model("smollm2-135m")
    calib = as_windows(DataConfig(), lm)  # the protocol: 16 calibration windows, 8 evaluation windows
    ev = eval_windows(lm.tokenizer, EvalConfig())
    mitigate(lm.model, ["smoothquant"], calib)
    folder = export_compressed(lm.model, lm.tokenizer, quant, tmp_path / "ck", calib=calib)
    with quantize_(lm.model, quant, calib):
        harness = perplexity(lm.model, ev)
    got = perplexity(_reload(folder), ev)
    assert got == pytest.approx(harness, rel=5e-3)
    packed = "weight_packed" if quant == "w4a16" else "weight"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        t = f.get_tensor(f"model.layers.0.mlp.down_proj.{packed}")
    assert t.dtype == (torch.int32 if quant == "w4a16" else torch.int8)
