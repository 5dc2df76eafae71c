"""A servable checkpoint: the (mitigated) model quantized as measured, written in the compressed-tensors format.

:func:`export_compressed` writes ``DIR/`` with ``model.safetensors`` (quantized linears as integer codes +
scales, everything else as it is), ``config.json`` with a ``quantization_config`` of ``quant_method
"compressed-tensors"``, the tokenizer files and ``outlierlab.json`` (the methods folded into the weights, the
quantization config, the format). transformers loads it with ``AutoModelForCausalLM.from_pretrained(DIR)``
(the ``compressed-tensors`` package installed); vLLM serves the same format.

What is written is exactly what the fake-quant harness measured: the plan of :func:`~.fake.prepare` gives the
quantized weights (RTN or GPTQ), their scales are recomputed from the unquantized weights the way the weight
quantizer computed them, and every weight is checked to lie on its grid (codes x scale) before it is packed.
Activations: per-token dynamic (``a_granularity="token"``) becomes compressed-tensors' dynamic per-token
input quantization, per-tensor static becomes a stored ``input_scale``. Two small convention differences
remain on the activation side (compressed-tensors divides the dynamic abs-max by ``(2^b - 1) / 2`` and clamps
to ``[-2^(b-1), 2^(b-1) - 1]``; the harness uses ``2^(b-1) - 1`` and a symmetric clamp), so a reloaded W8A8
model is within a fraction of a percent of the harness' perplexity, not bit-identical; weight-only settings are
identical up to float rounding.

Refused with a message that says why: runtime-only mitigation (tma's hooks, an online Hadamard, a
full-precision prefix: a checkpoint cannot hold them; export those with ``outlierlab mitigate --export``),
KV-cache quantization, asymmetric grids, per-tensor weights, and linears that are not ``nn.Linear``.

The model is not changed: the state dict is built tensor by tensor beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import OutlierlabError
from ..paths import atomic_folder, atomic_write_json
from .config import QuantConfig, get_quant
from .quantizers import weight_qparams

MANIFEST = "outlierlab.json"
#: a weight is on its grid when every entry is within this fraction of a step of codes x scale
GRID_TOLERANCE = 1e-3


class ExportError(OutlierlabError):
    """A model or setting that cannot be written as a compressed-tensors checkpoint."""


def _require_library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise ExportError("the compressed-tensors export needs the `compressed-tensors` package: "
                          "pip install 'outlierlab[export]'") from exc


def check_exportable(model: nn.Module, config: QuantConfig) -> None:
    """Raise :class:`ExportError` naming what a compressed-tensors checkpoint cannot hold."""
    from ..runtime import registry

    entries = [e for e in registry(model).entries if not e.name.startswith(("trace", "probe", "measure"))]
    if entries:
        names = ", ".join(sorted({e.name for e in entries}))
        raise ExportError(f"runtime-only parts are installed ({names}); a compressed-tensors checkpoint holds "
                          "weights only: use weight-only methods (gamma, smoothquant, rotate without online "
                          "Hadamard, otc) or `outlierlab mitigate --export` (reloaded with outlierlab.load)")
    if not config.quantizes_weights:
        raise ExportError(f"{config.name!r} leaves the weights in full precision: nothing to compress")
    problems = []
    if config.quantizes_kv:
        problems.append("KV-cache quantization")
    if not config.symmetric:
        problems.append("asymmetric grids")
    if config.w_granularity == "tensor":
        problems.append("per-tensor weights")
    if config.w_bits not in (4, 8):
        problems.append(f"{config.w_bits}-bit weights (4 or 8)")
    if config.quantizes_activations and config.a_granularity == "tensor-dynamic":
        problems.append("per-sequence dynamic activations")
    if config.lm_head or config.embeddings:
        problems.append("a quantized lm_head/embedding")
    if problems:
        raise ExportError(f"{config.name!r} cannot be exported as compressed-tensors: {', '.join(problems)} "
                          "not supported (export per-channel or per-group symmetric 4/8-bit weights with "
                          "per-token or static per-tensor activations)")


def _scheme(config: QuantConfig, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = config.w_granularity == "group"
    weights = QuantizationArgs(num_bits=config.w_bits, type="int", symmetric=True,
                               strategy="group" if group else "channel",
                               group_size=config.group_size if group else None)
    acts = None
    if config.quantizes_activations:
        static = config.a_granularity == "tensor-static"
        acts = QuantizationArgs(num_bits=config.a_bits, type="int", symmetric=True,
                                strategy="tensor" if static else "token", dynamic=not static)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts)


def weight_codes(w: torch.Tensor, wq: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of the quantized weight ``wq [out, in]`` whose unquantized weight is ``w``: the scale
    as the weight quantizer computed it (per row, or per row and group), the codes checked to be integers on
    the grid."""
    w, wq = w.detach().float(), wq.detach().float()
    out_f, in_f = w.shape
    if config.w_granularity == "group":
        if in_f % config.group_size:
            raise ExportError(f"input size {in_f} is not a multiple of group_size {config.group_size}")
        n = in_f // config.group_size
        scale, _ = weight_qparams(w.reshape(out_f, n, config.group_size), config.w_bits, True, -1,
                                  config.w_clip, config.w_grid, config.w_clip_search)
        scale = scale.reshape(out_f, n)
        full = scale.repeat_interleave(config.group_size, dim=1)
    else:
        scale, _ = weight_qparams(w, config.w_bits, True, -1, config.w_clip, config.w_grid, config.w_clip_search)
        full = scale
    codes = torch.round(wq / full)
    off = float(((codes * full - wq).abs() / full).max()) if wq.numel() else 0.0
    top = 2 ** (config.w_bits - 1)
    if off > GRID_TOLERANCE or codes.min() < -top or codes.max() > top - 1:
        raise ExportError("a quantized weight is not on the grid of scales recomputed from the unquantized "
                          f"weight (off by {off:.2g} of a step): its scales were set during quantization "
                          "(e.g. GPTQ group scales from updated weights) and are not recoverable")
    return codes, scale


def export_compressed(model: nn.Module, tokenizer, config: QuantConfig | str, out_dir: str | os.PathLike,
                      calib=None, *, batch_size: int = 4, plan=None, methods: list[dict] | None = None,
                      extra: dict | None = None) -> Path:
    """Write the compressed-tensors checkpoint of ``model`` quantized with ``config`` (calibrated on ``calib``
    when the setting needs it, or the given ``plan`` of :func:`~.fake.prepare`) to ``out_dir``; see the module
    docstring. ``methods``: the mitigation records already applied to ``model`` (for the manifest); ``extra``:
    more manifest fields (e.g. measured numbers)."""
    _require_library()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig

    from .fake import prepare

    config = plan.config if plan is not None else get_quant(config)
    check_exportable(model, config)
    plan = plan if plan is not None else prepare(model, config, calib, batch_size=batch_size)
    bad = [t.name for t in plan.targets if type(t.module) is not nn.Linear]
    if bad:
        raise ExportError(f"compressed-tensors compresses nn.Linear modules; {bad[0]} is a "
                          f"{type(plan.targets[0].module).__name__} ({len(bad)} such linears)")
    names = [t.name for t in plan.targets]
    scheme = _scheme(config, names)
    fmt = infer_module_format(nn.Linear, scheme)
    compressor = BaseCompressor.get_value_from_registry(fmt.value)

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for t in plan.targets:
        w, wq = t.weight_view(), plan.weights[t.name]
        _, scale = weight_codes(w, wq, config)  # raises unless wq lies on the grid of these scales
        local = {"weight": wq.to(w.dtype).cpu(), "weight_scale": scale.to(w.dtype).cpu()}
        if config.quantizes_activations and config.a_granularity == "tensor-static":
            local["input_scale"] = plan.acts[t.name].scale.reshape(1).to(w.dtype).cpu()
        state.pop(f"{t.name}.weight")
        for key, value in compressor.compress(local, scheme).items():
            state[f"{t.name}.{key}"] = value.contiguous()

    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt.value,
                                 quantization_status="compressed", ignore=["lm_head"])
    return _write(model, tokenizer, state, qconfig, out_dir, {
        "schema_version": "1.0", "kind": "compressed_tensors_checkpoint", "format": fmt.value,
        "quant": {**config.to_dict(), "summary": config.describe()}, "methods": methods or [],
        "load_with": "AutoModelForCausalLM.from_pretrained(DIR) with the compressed-tensors package",
        **(extra or {})})


def _write(model, tokenizer, state: dict, qconfig, out_dir, manifest: dict) -> Path:
    """Everything into a temporary folder beside ``out_dir``, then renamed into place."""
    import compressed_tensors
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ExportError(f"{out_dir} exists and is not an outlierlab export; refusing to replace it")
    with atomic_folder(out_dir) as tmp:
        # tied weights (lm_head = embeddings) are stored once, under the name transformers expects
        tied = getattr(model, "_tied_weights_keys", None) or {}
        for key in (tied if isinstance(tied, dict) else {k: None for k in tied}):
            if getattr(model.config, "tie_word_embeddings", False):
                state.pop(key, None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {"version": compressed_tensors.__version__, "quant_method":
                                      "compressed-tensors", "sparsity_config": {}, "transform_config": {},
                                      **qconfig.model_dump(exclude=["quant_method"])}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
    return out_dir
