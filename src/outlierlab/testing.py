"""Tiny randomly initialised models of every supported family, and planted outliers with known ground truth.

Random weights show no massive activations, so structural tests plant them: a super weight in the down
projection, a large norm gain, an outlier-triggering column in W_q. The helpers here write those into the
weights through the adapter (respecting each family's storage layout and gain convention).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import get_adapter

#: the token every test window starts with (as real text starts with BOS or a delimiter)
BOS = 1

#: model_type -> config overrides that make a tiny model of that family.
TINY_FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "gpt2": {},
    "opt": {},
    "gpt_neox": {},
    "phi": {},
}

_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, n_embd=64, n_layer=3, n_head=4,
    n_positions=256, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_config(model_type: str, **overrides):
    """A small config (d=64, 3 layers, vocab 128) of ``model_type``; only keys the config knows are set."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kwargs = {k: v for k, v in _COMMON.items() if hasattr(base, k) or k in ("pad_token_id", "bos_token_id",
                                                                              "eos_token_id", "vocab_size")}
    if model_type == "gpt_neox":
        kwargs.pop("num_key_value_heads", None)
    if model_type == "opt":
        kwargs["ffn_dim"] = 128
    kwargs.update(TINY_FAMILIES.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random causal LM of ``model_type`` in fp32 eval mode, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    if hasattr(cfg, "attn_implementation"):
        pass
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float().eval()


def random_windows(model: nn.Module, n: int = 4, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, seq_len), generator=gen)


def _linear_param(model, layer: int, role: str):
    adapter = get_adapter(model)
    spec = next(s for s in adapter.linears() if s.role == role)
    return adapter, spec, adapter.layers()[layer].get_submodule(spec.module).weight


@torch.no_grad()
def plant_super_weight(model: nn.Module, layer: int, row: int, col: int, value: float) -> None:
    """Write ``value`` into the down projection (``down`` or ``fc2``) at output ``row``, input ``col``."""
    adapter = get_adapter(model)
    role = "down" if adapter.ffn_kind == "glu" else "fc2"
    _, spec, w = _linear_param(model, layer, role)
    if spec.transposed:
        w[col, row] = value
    else:
        w[row, col] = value


@torch.no_grad()
def plant_gain(model: nn.Module, layer: int, norm: str, channel: int, gain: float) -> None:
    """Make the effective gain of ``norm`` (e.g. ``attn.norm``) equal ``gain`` at ``channel``."""
    adapter = get_adapter(model)
    spec = next(n for n in adapter.norms() if n.name == norm)
    module = adapter.layers()[layer].get_submodule(spec.module)
    module.weight[channel] = gain - spec.gain_offset


@torch.no_grad()
def plant_otc_column(model: nn.Module, layer: int, col: int, scale: float, role: str = "q") -> None:
    """Multiply input column ``col`` of a linear (``q`` by default; fused ``qkv`` where q is fused) by ``scale``."""
    adapter = get_adapter(model)
    roles = {s.role for s in adapter.linears()}
    if role not in roles and role == "q":
        role = "qkv"
    _, spec, w = _linear_param(model, layer, role)
    if spec.transposed:
        w[col, :] *= scale
    else:
        w[:, col] *= scale


@torch.no_grad()
def _isolate_feature(model: nn.Module, ad, k: int, layer: int, token: int = BOS, value: float = 1.0) -> None:
    """Residual channel ``k`` holds ``value`` at ``token`` and 0 elsewhere up to ``layer``: the embedding
    column, learned position embeddings and every writer of channel k (W_o of layers <= layer, W_down of
    layers < layer, their biases) are zeroed."""
    from .analysis.layout import linear_parts

    emb = model.get_input_embeddings()
    hidden = emb.weight.shape[1]
    emb.weight[:, k] = 0.0
    emb.weight[token, k] = value
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m is not emb and m.weight.shape[1] == hidden:
            m.weight[:, k] = 0.0  # learned position embeddings (GPT-2, OPT)
    for L in range(layer + 1):
        for p in linear_parts(ad, L):
            if p.role == "o" or (L < layer and p.role in ("down", "fc2")):
                mod = ad.layers()[L].get_submodule(p.spec.module)
                if p.spec.transposed:
                    mod.weight[:, k] = 0.0
                else:
                    mod.weight[k, :] = 0.0
                if getattr(mod, "bias", None) is not None:
                    mod.bias[k] = 0.0


@torch.no_grad()
def plant_token_ma(model: nn.Module, layer: int = 1, k: int = 5, j: int = 13, d: int = 7, value: float = 1000.0,
                   a: float | None = None, token: int = BOS, measure: bool = False) -> None:
    """A massive activation on ``token`` (BOS: token 0 of the test windows), channel ``d``, written by the
    single weight W_down[d, j] of ``layer``.

    The embedding of ``token`` gets a feature in residual channel ``k`` that no other token has (the embedding
    column, position embeddings and every earlier writer of channel k are zeroed), the gate/up (or fc1) row ``j`` of
    ``layer`` reads only channel k (fc1 with a negative bias), so y6[j] is large at token 0 and about zero
    elsewhere; then W_down[d, j] is set so that y7[d] is about ``value`` at token 0: from the y6 the tiny
    configs give, or (``measure=True``, for other shapes) from y6[j] measured on ``token`` by one forward.
    """
    from .analysis.layout import linear_parts

    ad = get_adapter(model)
    _isolate_feature(model, ad, k, layer, token)
    glu = ad.ffn_kind == "glu"
    a = a or (3.0 if glu else 4.0)
    for p in linear_parts(ad, layer):
        if p.role not in (("gate", "up") if glu else ("fc1",)):
            continue
        mod = ad.layers()[layer].get_submodule(p.spec.module)
        row = j if p.rows is None else int(p.rows[j])
        e = torch.zeros(model.get_input_embeddings().weight.shape[1])
        e[k] = a
        if p.spec.transposed:
            mod.weight[:, row] = e
        else:
            mod.weight[row, :] = e
        if getattr(mod, "bias", None) is not None:
            mod.bias[row] = 0.0 if glu else -2 * a
    y6 = (8 * a) ** 2 if glu else 6 * a
    if measure:
        from .analysis.layout import capture_token_rows

        pos = next(s.input_position for s in ad.linears() if s.role in ("down", "fc2"))
        src = next(p.same_as or p.name for p in ad.positions() if p.name == pos)
        rows = capture_token_rows(model, ad, torch.tensor([token]), [0], layers=[layer], positions=[src])
        y6 = float(rows[(layer, src)][0, j])
    plant_super_weight(model, layer, d, j, value / y6)


def bos_window(model: nn.Module, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """One ``[seq_len]`` window of random tokens starting with :data:`BOS`."""
    ids = random_windows(model, 1, seq_len, seed=seed)[0]
    ids[0] = BOS
    return ids


def _rows_at(model: nn.Module, ad, ids: torch.Tensor, layer: int, position: str) -> torch.Tensor:
    """``[T, C]``: the tensor of ``position`` (same_as resolved) at ``layer`` for every token of ``ids``."""
    from .analysis.layout import capture_token_rows, same_as_map

    src = same_as_map(ad)[position]
    return capture_token_rows(model, ad, ids, list(range(ids.shape[-1])), layers=[layer], positions=[src])[
        (layer, src)]


def _set_row(mod: nn.Module, row: int, values: torch.Tensor, transposed: bool, bias: float = 0.0) -> None:
    if transposed:
        mod.weight[:, row] = values
    else:
        mod.weight[row, :] = values
    if getattr(mod, "bias", None) is not None:
        mod.bias[row] = bias


@torch.no_grad()
def _plant_reader(model: nn.Module, ad, layer: int, roles: tuple[str, ...], k: int, j: int, ids: torch.Tensor,
                  c: float, gate: bool = False) -> None:
    """Rows ``j`` of the ``roles`` projections read only residual channel k, scaled from a measurement so that
    their output is ``c`` at token 0 of ``ids``. ``gate``: a bias makes the output about -c elsewhere (an fc1
    row before a GeLU/ReLU, where a LayerNorm leaves channel k nonzero at the other tokens)."""
    from .analysis.layout import linear_parts

    parts = [p for p in linear_parts(ad, layer) if p.role in roles]
    rows = _rows_at(model, ad, ids, layer, parts[0].input_position)
    x0, rest = float(rows[0, k]), float(rows[1:, k].abs().max())
    e, bias = torch.zeros(rows.shape[1]), 0.0
    e[k] = c / x0
    if gate:
        if abs(x0) <= 2 * rest:
            raise ValueError(f"layer {layer}: the token-0 feature ({x0:.3g}) does not stand out ({rest:.3g})")
        e[k] = math.copysign(2 * c / (abs(x0) - rest), x0)
        bias = -c * (abs(x0) + rest) / (abs(x0) - rest)
    for p in parts:
        row = j if p.rows is None else int(p.rows[j])
        _set_row(ad.layers()[layer].get_submodule(p.spec.module), row, e, p.spec.transposed, bias)


@torch.no_grad()
def plant_ffn_steps(model: nn.Module, writes=((1, 400.0), (2, 200.0)), k: int = 5, j: int = 13, d: int = 7,
                    feature: float = 50.0, c: float = 24.0) -> None:
    """A massive activation at token 0, channel ``d``, built by the FFNs of several layers: layer L adds about
    ``value`` through W_down[d, j] (W_fc2), each layer reading the token's own feature in residual channel k
    (``feature`` at BOS in the residual stream, whatever the embedding scale; 0 elsewhere), so that no step
    needs another (a large feature keeps it readable behind an MA that dominates a LayerNorm). The gate/up (fc1)
    rows and W_down[d, j] are scaled from measured values, layer after layer: their pre-activation at token 0
    is ``c`` (24: y6[j] = silu(24) * 24 = 576 in a GLU FFN, y4[j] = 24 in a GeLU FFN)."""
    ad = get_adapter(model)
    _isolate_feature(model, ad, k, max(L for L, _ in writes))
    ids = bos_window(model)
    model.get_input_embeddings().weight[BOS, k] = feature / float(_rows_at(model, ad, ids, 0, "attn.in")[0, k])
    glu = ad.ffn_kind == "glu"
    for layer, value in writes:
        _plant_reader(model, ad, layer, ("gate", "up") if glu else ("fc1",), k, j, ids, c, gate=not glu)
        y6 = float(_rows_at(model, ad, ids, layer, "mlp.down_in")[0, j])
        plant_super_weight(model, layer, d, j, value / y6)


@torch.no_grad()
def plant_norm_gain_ma(model: nn.Module, layer: int = 1, k: int = 5, j: int = 13, d: int = 7,
                       gain: float = 2000.0) -> None:
    """A massive activation at token 0, channel ``d``, made by the gain of the norm between the FFN and the
    residual add (sandwich norms: Gemma 2/3's ``post_feedforward_layernorm``): the FFN writes an ordinary value
    into channel d at token 0 only (W_down[d, :] is zero but for W_down[d, j] = the rms of column j, y6[j] is
    token 0's), and the norm's effective gain at d is ``gain``."""
    from .analysis.attribution import branch_norm_spec
    from .analysis.layout import linear_parts

    ad = get_adapter(model)
    spec = branch_norm_spec(ad, "mlp")
    if spec is None:
        raise ValueError(f"{type(ad).__name__} has no norm between the FFN and the residual add")
    plant_ffn_steps(model, ((layer, 1.0),), k, j, d, feature=1.0)
    part = next(p for p in linear_parts(ad, layer) if p.role in ("down", "fc2"))
    mod = ad.layers()[layer].get_submodule(part.spec.module)
    col = ad.linear_weight(layer, part.spec)[:, j].clone()
    row = torch.zeros_like(ad.linear_weight(layer, part.spec)[d])
    row[j] = float(torch.cat([col[:d], col[d + 1:]]).pow(2).mean().sqrt())
    _set_row(mod, d, row, part.spec.transposed)
    plant_gain(model, layer, spec.name, d, gain)


@torch.no_grad()
def plant_attention_ma(model: nn.Module, layer: int = 1, k: int = 5, jv: int = 3, d: int = 7,
                       value: float = 1000.0) -> int:
    """A massive activation at token 0, channel ``d``, written by one entry of the attention output projection:
    value channel ``jv`` reads only the token's feature in residual channel k, so the context of token 0 (which
    attends to itself alone) is large in the channel(s) of that value; W_o[d, j] is set for the largest one, j,
    so that the output at d is about ``value``. Later tokens read key position 0 with their attention
    probability. Returns j."""
    from .analysis.layout import linear_parts

    ad = get_adapter(model)
    _isolate_feature(model, ad, k, layer)
    ids = bos_window(model)
    _plant_reader(model, ad, layer, ("v",), k, jv, ids, 8.0)
    ctx = _rows_at(model, ad, ids, layer, "attn.ctx")[0]
    j = int(ctx.abs().argmax())
    part = next(p for p in linear_parts(ad, layer) if p.role == "o")
    w = ad.layers()[layer].get_submodule(part.spec.module).weight
    w[(j, d) if part.spec.transposed else (d, j)] = value / float(ctx[j])
    return j


@torch.no_grad()
def plant_bias_ma(model: nn.Module, layer: int = 1, d: int = 7, value: float = 1000.0,
                  role: str | None = None) -> None:
    """A massive activation in channel ``d`` of every token, written by the bias entry b[d] of a projection
    (default: the FFN's down projection, ``down`` / ``fc2``; ``o``: the attention output)."""
    role = role or ("down" if get_adapter(model).ffn_kind == "glu" else "fc2")
    _, spec, _ = _linear_param(model, layer, role)
    bias = getattr(get_adapter(model).layers()[layer].get_submodule(spec.module), "bias", None)
    if bias is None:
        raise ValueError(f"{spec.module} has no bias")
    bias[d] = value


def mitigation_modes() -> dict:
    """Every mitigation method in every documented mode, by a short name (the device lane and
    bench/mitigation_modes.py run them all)."""
    from .mitigation import (
        GammaConfig,
        NoneConfig,
        OTCConfig,
        PaperConfig,
        PrefixConfig,
        RotateConfig,
        SmoothQuantConfig,
        TMAConfig,
    )

    return {
        "none": NoneConfig(),
        "prefix": PrefixConfig(),
        "gamma.fold": GammaConfig(),
        "gamma.nofold": GammaConfig(mode="nofold"),
        "smoothquant": SmoothQuantConfig(),
        "tma.scale.all": TMAConfig(),
        "tma.scale.origin": TMAConfig(layers="origin"),
        "tma.scale.uncompensated": TMAConfig(layers="origin", compensate=False),
        "tma.clip.all": TMAConfig(mode="clip"),
        "tma.clip.origin": TMAConfig(mode="clip", layers="origin"),
        "tma.zero.origin": TMAConfig(mode="zero", layers="origin"),
        "tma.zero.all": TMAConfig(mode="zero", layers="all"),
        "tma.replace.origin": TMAConfig(mode="replace", layers="origin"),
        "tma.replace.all": TMAConfig(mode="replace", layers="all"),
        "otc.closed": OTCConfig(),
        "otc.gain": OTCConfig(compensate="gain"),
        "otc.steps": OTCConfig(steps=5),
        "rotate": RotateConfig(),
        "rotate.online": RotateConfig(online_hadamard=True),
        "paper": PaperConfig(),
    }
