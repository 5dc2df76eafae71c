"""Synthetic models: random weights of a real model's shape, with planted outliers, for running every stage at
scale without real weights (``--model synthetic:llama-7b``).

Spec: ``synthetic:FAMILY-SIZE[:key=value,...]`` where FAMILY is any supported ``model_type`` (llama, qwen2,
gemma2, gpt2...), SIZE one of :data:`SHAPES` (``7b``, ``13b``, ``70b``, ``tiny``), and the options override
config fields (``layers=4`` is short for the layer count), the seed (``seed=1``) or the tokenizer
(``tokenizer=FOLDER``; default: the default model's, SmolLM2 from its package). The vocabulary follows the
tokenizer.

Weights (see :func:`random_init`): every matrix N(0, initializer_range), drawn in float32 on the device the
model runs on (``cpu`` or ``cuda``: the two draw different numbers, hence :func:`identity` names the device
type), chunk by chunk, each chunk seeded from (seed, parameter name, chunk), so the values do not depend on where
the model is placed or offloaded; biases 0, norm gains by transformers' own init of those modules. No other
initialization runs: the model is allocated uninitialized first (initializing a 13B model element by element on
the CPU took minutes).

Planted, with known ground truth (see :func:`plant`): a massive activation made by one down-projection weight
at layer 1 on the delimiter token ``"."``, a large norm gain at layer 0, and an outlier-triggering column of
W_q at layer 2. Random weights alone show no massive activations.
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import OutlierlabError

PREFIX = "synthetic:"

#: hidden size, FFN size, layers, attention heads, KV heads
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 128, 3, 4, 2),
    "7b": (4096, 11008, 32, 32, 32),
    "13b": (5120, 13824, 40, 40, 40),
    "70b": (8192, 28672, 80, 64, 8),
}
#: what is planted (layer, channels, values), so tests and reports can check against it
PLANTED = {
    "gain": {"layer": 0, "norm": "attn.norm", "channel": 21, "gain": 60.0},
    "ma": {"layer": 1, "k": 5, "j": 13, "d": 7, "value": 1000.0},
    "otc": {"layer": 2, "col": 40, "scale": 50.0},
}
_SHORT = {"layers": "num_hidden_layers"}
#: bumped whenever the weights a spec builds change, so that caches keyed by :func:`identity` miss
WEIGHTS_VERSION = 2
#: elements per independently seeded draw
_CHUNK = 1 << 24


def is_synthetic(model: str) -> bool:
    return model.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str, dict, int]:
    """``synthetic:llama-7b:layers=4`` -> ("llama", "7b", {"num_hidden_layers": 4}, seed); a ``tokenizer``
    option is read by :func:`build`, not here."""
    body = spec[len(PREFIX):]
    name, _, opts = body.partition(":")
    family, _, size = name.rpartition("-")
    if not family or size not in SHAPES:
        raise OutlierlabError(f"{spec!r}: expected synthetic:FAMILY-SIZE with SIZE in {', '.join(SHAPES)} "
                              "(e.g. synthetic:llama-7b)")
    overrides, seed = {}, 0
    for part in filter(None, opts.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise OutlierlabError(f"{spec!r}: options are key=value pairs, not {part!r}")
        if key == "seed":
            seed = int(value)
            continue
        if key == "tokenizer":
            continue
        overrides[_SHORT.get(key, key)] = _number(value)
    return family, size, overrides, seed


def _number(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def config(spec: str, vocab_size: int):
    """The transformers config of a spec (every family's own config class, fields it does not know dropped)."""
    from ..adapters import adapter_class
    from ..testing import tiny_config

    family, size, overrides, _ = parse(spec)
    adapter_class(family)  # a clear error for an unsupported family
    hidden, ffn, layers, heads, kv = SHAPES[size]
    shape = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv, head_dim=hidden // heads, n_embd=hidden, n_layer=layers, n_head=heads,
                 n_inner=ffn, ffn_dim=ffn, word_embed_proj_dim=hidden, max_position_embeddings=4096,
                 n_positions=4096, vocab_size=vocab_size)
    if overrides.get("num_hidden_layers") is not None:
        shape["n_layer"] = overrides["num_hidden_layers"]
    return tiny_config(family, **{**shape, **overrides})


def identity(spec: str, device: str | torch.device = "cpu") -> str:
    """A stable identity of the weights a spec builds on ``device``'s type (for caches), without hashing them."""
    key = f"v{WEIGHTS_VERSION}:{torch.device(device).type}:{spec}"
    return "synthetic-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def tokenizer_for(spec: str):
    """The ``tokenizer=FOLDER`` option's tokenizer, else the default model's."""
    from transformers import AutoTokenizer

    from ..paths import file_sha256
    from .loader import DEFAULT_MODEL, gguf_cache_folder, resolve

    opts = dict(p.partition("=")[::2] for p in spec[len(PREFIX):].partition(":")[2].split(",") if p)
    folder = opts.get("tokenizer")
    if folder is None:
        source = resolve(DEFAULT_MODEL)
        folder = gguf_cache_folder(source.location, file_sha256(source.location))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def build(spec: str, device: torch.device, dtype: torch.dtype, tokenizer=None,
          draw_on: torch.device | None = None):
    """The synthetic model of ``spec`` on ``device`` in ``dtype``, outliers planted; its random numbers drawn
    on ``draw_on`` (default ``device``; an offloaded GPU run builds on the CPU and draws on the GPU)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    tokenizer = tokenizer or tokenizer_for(spec)
    cfg = config(spec, len(tokenizer))
    _, _, _, seed = parse(spec)
    torch.manual_seed(seed)
    with torch.device(device), no_init_weights():  # allocated only: random_init writes every value once
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    random_init(model, seed, draw_on or device)
    model.eval()
    plant(model, _delimiter(tokenizer))
    return model, tokenizer


@torch.no_grad()
def random_init(model, seed: int, draw_on: str | torch.device) -> None:
    """Every matrix (parameter of 2+ dims) N(0, initializer_range), see the module docstring; the other
    parameters of a matrix's module (biases) 0, and the modules without a matrix (norm gains: 1, or 0 where the
    gain is 1 + w) by the model's own ``_init_weights``, one module at a time (never a pass over the matrices:
    on a CPU that pass is what took minutes). Buffers (rotary frequencies) were computed at construction."""
    from torch import nn

    cfg = model.config
    std = getattr(cfg, "initializer_range", None) or getattr(cfg, "init_std", None) or 0.02
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            draw_normal(p, std, f"{seed}:{name}", torch.device(draw_on))
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if any(p.dim() >= 2 for p in own):
            for p in own:
                if p.dim() < 2:
                    p.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx] = 0.0
        else:
            model._init_weights(m)


def draw_normal(t: torch.Tensor, std: float, key: str, device: torch.device) -> None:
    """Fill ``t`` with N(0, std) drawn in float32 on ``device``, :data:`_CHUNK` elements per generator seeded
    from ``key`` and the chunk's index (so the values do not depend on the order: the CPU draws chunks on all
    its threads, one generator being serial)."""
    from concurrent.futures import ThreadPoolExecutor

    flat = t.detach().view(-1)  # grad mode is per thread: a detached view is written the same in every one
    base = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 2
    starts = range(0, flat.numel(), _CHUNK)

    def fill(i: int) -> None:
        n = min(_CHUNK, flat.numel() - starts[i])
        gen = torch.Generator(device=device).manual_seed(base + i)
        flat[starts[i]:starts[i] + n].copy_(torch.randn(n, generator=gen, device=device).mul_(std))

    if device.type != "cpu" or len(starts) == 1:
        for i in range(len(starts)):
            fill(i)
        return
    with ThreadPoolExecutor(max_workers=min(len(starts), torch.get_num_threads())) as pool:
        list(pool.map(fill, range(len(starts))))


def _delimiter(tokenizer) -> int:
    ids = tokenizer(".", add_special_tokens=False)["input_ids"]
    return int(ids[0])


@torch.no_grad()
def plant(model, token: int) -> None:
    """Plant :data:`PLANTED` (on ``token``) in ``model`` through its adapter."""
    from ..adapters import get_adapter
    from ..testing import plant_gain, plant_otc_column, plant_token_ma

    adapter = get_adapter(model)
    n, hidden = adapter.n_layers, model.get_input_embeddings().weight.shape[1]
    plant_gain(model, **PLANTED["gain"])
    if n > PLANTED["ma"]["layer"]:
        # the trigger grows with the width (the residual's RMS dilutes the token's feature), the super weight
        # follows the y6 measured on the token
        a = (4.0 if adapter.ffn_kind == "glu" else 6.0) * max(1.0, (hidden / 64) ** 0.5)
        plant_token_ma(model, **PLANTED["ma"], token=token, a=a, measure=True)
    if n > PLANTED["otc"]["layer"]:
        plant_otc_column(model, PLANTED["otc"]["layer"], PLANTED["otc"]["col"], PLANTED["otc"]["scale"])
