"""QuaRot-style rotation of the residual stream with a randomized Hadamard matrix (exact in fp32).

Every pre-norm block reads the residual stream ``h`` only through a norm that is invariant to an orthogonal
change of basis once its gain is taken out, so with ``h' = h Q`` (``Q`` orthogonal) the model computes the
same function when:

1. the norm gains (and LayerNorm biases) are fused into the linears that read them (``W <- W diag(g)``)
   and the norms keep unit gain (Gemma's ``1 + w``: ``w = 0``);
2. the token (and position) embeddings become ``E Q``; every linear reading the residual stream through a
   norm (q, k, v, gate, up, fc1, the LM head) becomes ``W Q``; every linear writing into it (o, down, fc2)
   becomes ``Q^T W`` with bias ``b Q``; a tied LM head is untied first (the embedding and the head now
   differ).

RMSNorm families (LLaMA, Mistral, Qwen2/3, Phi-3, Gemma) need nothing more. LayerNorm families (GPT-2, OPT,
GPT-NeoX, Phi) also subtract the mean: the residual stream is first made mean-free (embedding rows and
writer outputs centered, which LayerNorm cannot see) and ``Q`` is built to map the all-ones direction onto
itself (a randomized Hadamard times a Householder reflection), so the stream stays mean-free and LayerNorm
acts as an RMSNorm on it; the LayerNorm bias stays in the norm as ``(beta / g) Q``. Post-norm layouts
(OPT-350m) and sandwich norms on the branch outputs (Gemma 2/3: a gain between the branch and the residual
add) cannot be rotated exactly with standard modules and raise a clear error.

``Q = diag(s) H / sqrt(d)`` with random signs ``s`` and a Hadamard matrix ``H`` built from Sylvester doubling
and Paley constructions (d = 2^a x m, m in 1, 12, 20, 28, 36, 44, 60, 72, ...); other sizes fall back to a
seeded random orthogonal matrix (said in the result). ``online_hadamard=True`` also rotates the
down-projection input (y6) at runtime (a forward pre-hook, ``W_down <- W_down H``): that part is not a plain
Hugging Face checkpoint any more and is restored by ``outlierlab.load``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import ClassVar

import torch
from torch import nn

from ..adapters import get_adapter
from ..runtime import ORDER, Entry
from .base import (
    Context,
    MitigationError,
    consumers,
    down_spec,
    linear_bias,
    linear_module,
    linear_weight,
    norm_module,
)


@dataclass(frozen=True)
class RotateConfig:
    """Randomized-Hadamard rotation of the residual stream (see the module docstring)."""

    name: ClassVar[str] = "rotate"
    seed: int = 0
    #: also rotate y6 (the down-projection input) online with a Hadamard matrix (runtime hook)
    online_hadamard: bool = False
    #: "hadamard" (random orthogonal fallback when no Hadamard matrix of that size is known) | "random"
    kind: str = "hadamard"

    @property
    def exact(self) -> bool:
        return True


# -- Hadamard matrices -----------------------------------------------------------------------------------
def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, int(n ** 0.5) + 1))


def _chi(q: int) -> list[int]:
    squares = {(x * x) % q for x in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4."""
    chi = _chi(q)
    n = q + 1
    s = torch.zeros(n, n)
    s[0, 1:] = 1
    s[1:, 0] = -1
    for i in range(q):
        for j in range(q):
            s[1 + i, 1 + j] = chi[(j - i) % q]
    return s + torch.eye(n)


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 mod 4."""
    chi = _chi(q)
    n = q + 1
    c = torch.zeros(n, n)
    c[0, 1:] = 1
    c[1:, 0] = 1
    for i in range(q):
        for j in range(q):
            c[1 + i, 1 + j] = chi[(j - i) % q]
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    return torch.kron(c, a) + torch.kron(torch.eye(n), b)


@cache
def _base_orders(limit: int = 400) -> dict[int, tuple[str, int]]:
    orders: dict[int, tuple[str, int]] = {1: ("one", 1)}
    for q in range(3, limit):
        if not _is_prime(q):
            continue
        if q % 4 == 3:
            orders.setdefault(q + 1, ("paley1", q))
        elif q % 4 == 1 and 2 * (q + 1) < limit:
            orders.setdefault(2 * (q + 1), ("paley2", q))
    return orders


def _base(order: int) -> torch.Tensor:
    kind, q = _base_orders()[order]
    if kind == "one":
        return torch.ones(1, 1)
    return _paley1(q) if kind == "paley1" else _paley2(q)


@lru_cache(maxsize=16)
def hadamard(n: int) -> torch.Tensor | None:
    """An unnormalized Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``), or None if unknown."""
    candidates = [m for m in _base_orders() if n % m == 0 and ((n // m) & (n // m - 1)) == 0]
    if not candidates:
        return None
    m = max(candidates)  # fewest Sylvester doublings
    h = _base(m).double()
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    k = n // m
    while k > 1:
        h = torch.kron(two, h)
        k //= 2
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)):  # a construction bug, never silent
        raise AssertionError(f"Hadamard construction of order {n} failed")
    return h


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation(n: int, seed: int = 0, kind: str = "hadamard") -> tuple[torch.Tensor, str]:
    """An orthogonal ``[n, n]`` float64 matrix: ``diag(random signs) H / sqrt(n)`` or a random orthogonal."""
    h = hadamard(n) if kind == "hadamard" else None
    if h is None:
        return random_orthogonal(n, seed), "random_orthogonal"
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return signs.unsqueeze(1) * h / math.sqrt(n), "randomized_hadamard"


def mean_preserving(q0: torch.Tensor) -> torch.Tensor:
    """``q0`` times a Householder reflection so that the result maps the all-ones vector to itself."""
    n = q0.shape[0]
    u = torch.full((n,), 1.0 / math.sqrt(n), dtype=q0.dtype)
    w = q0.T @ u
    v = u - w
    if float(v.norm()) < 1e-12:
        return q0
    v = v / v.norm()
    p = torch.eye(n, dtype=q0.dtype) - 2.0 * torch.outer(v, v)
    return q0 @ p


# -- tied heads ------------------------------------------------------------------------------------------
def _tie_flag_owners(model: nn.Module) -> list:
    cfg = model.config
    owners = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if get_text is not None:
        text = get_text()
        if text is not cfg:
            owners.append(text)
    return owners


def untie_lm_head(model: nn.Module) -> bool:
    """Give the LM head its own weight if it shares the input embedding's; returns True if it did."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None:
        raise MitigationError(f"{type(model).__name__} has no output embedding (LM head)")
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    for owner in _tie_flag_owners(model):
        if getattr(owner, "tie_word_embeddings", False):
            owner.tie_word_embeddings = False
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    return tied


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    return model.get_output_embeddings().weight.data


# -- the transform ---------------------------------------------------------------------------------------
def _is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or (
        "layernorm" in type(module).__name__.lower() and "rms" not in type(module).__name__.lower()
        and getattr(module, "bias", None) is not None
    )


def check_rotatable(model: nn.Module) -> None:
    adapter = get_adapter(model)
    kind = type(adapter).__name__
    if not adapter.pre_norm:
        raise MitigationError(f"rotate: {kind} is post-norm here (the norm output is the residual stream); "
                              "a rotation cannot be folded exactly")
    if adapter.branch_output_norms:
        raise MitigationError(f"rotate: {kind} has norms on the branch outputs (sandwich norms) whose gains sit "
                              "between the branch and the residual add; a rotation cannot be folded exactly")
    if adapter.residual_projections():
        raise MitigationError(f"rotate: {kind} projects the residual stream outside the layers (OPT with "
                              "word_embed_proj_dim != hidden_size); not supported")
    if adapter.final_norm() is None:
        raise MitigationError(f"rotate: {kind} has no final norm")


@torch.no_grad()
def _fuse_norm(norm_mod: nn.Module, offset: float, readers: list[torch.Tensor], layernorm: bool
               ) -> torch.Tensor | None:
    """Fold the gain into ``readers`` ([out, in] views), set unit gain; returns ``beta / g`` (LayerNorm)."""
    g = norm_mod.weight.data.double() + offset
    for w in readers:
        w.copy_((w.double() * g.to(w.device).unsqueeze(0)).to(w.dtype))
    norm_mod.weight.data.fill_(1.0 - offset)
    if layernorm and getattr(norm_mod, "bias", None) is not None:
        beta = norm_mod.bias.data.double()
        if bool((beta != 0).any()):
            if bool((g.abs() < 1e-8)[beta != 0].any()):
                raise MitigationError("rotate: a LayerNorm gain is zero where its bias is not")
            return beta / torch.where(g == 0, torch.ones_like(g), g)
        return torch.zeros_like(beta)
    return None


def rot_in(w: torch.Tensor, q: torch.Tensor) -> None:
    """Reader: ``W <- W Q`` on an [out, in] view."""
    w.copy_((w.double() @ q.to(w.device)).to(w.dtype))


def _rot_out(w: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Writer: ``W <- Q^T W``, ``b <- b Q``."""
    w.copy_((q.T.to(w.device) @ w.double()).to(w.dtype))
    if bias is not None:
        bias.copy_((bias.double() @ q.to(bias.device)).to(bias.dtype))


def _center_out(w: torch.Tensor, bias: torch.Tensor | None) -> None:
    w.copy_((w.double() - w.double().mean(dim=0, keepdim=True)).to(w.dtype))
    if bias is not None:
        bias.copy_((bias.double() - bias.double().mean()).to(bias.dtype))


def is_layernorm_model(model: nn.Module) -> bool:
    """True when the residual stream is read through LayerNorms (mean subtracted), not RMSNorms."""
    return _is_layernorm(get_adapter(model).final_norm())


@torch.no_grad()
def rotate_model(model: nn.Module, cfg: RotateConfig, matrix: torch.Tensor | None = None) -> dict:
    """Fuse the norm gains and rotate the residual stream by ``Q`` (``matrix``, orthogonal ``[d, d]``, when
    given; else built from ``cfg``)."""
    check_rotatable(model)
    adapter = get_adapter(model)
    layers = adapter.layers()
    final = adapter.final_norm()
    layernorm = _is_layernorm(final)
    d = model.get_input_embeddings().weight.shape[1]
    if matrix is None:
        q0, construction = rotation(d, cfg.seed, cfg.kind)
    else:
        q0, construction = matrix.detach().double().cpu(), "given"
    q = mean_preserving(q0) if layernorm else q0
    untied = untie_lm_head(model)
    emb = model.get_input_embeddings().weight.data
    pos_embs = [m.weight.data for m in adapter.position_embeddings()]
    head = lm_head_weight(model)
    writers = [out_spec_ for out_spec_ in adapter.linears() if out_spec_.output_position in ("attn.out", "mlp.out")]
    if layernorm:
        for e in [emb, *pos_embs]:
            e.copy_((e.double() - e.double().mean(dim=1, keepdim=True)).to(e.dtype))
    for i in range(len(layers)):
        for norm in adapter.norms():
            if not norm.consumers:
                continue
            mod = norm_module(adapter, i, norm)
            readers = [linear_weight(adapter, i, s) for s in consumers(adapter, norm)]
            beta = _fuse_norm(mod, norm.gain_offset, readers, layernorm)
            for w in readers:
                rot_in(w, q)
            if beta is not None:
                mod.bias.data.copy_((beta @ q.to(beta.device)).to(mod.bias.dtype))
        for spec in writers:
            w, b = linear_weight(adapter, i, spec), linear_bias(adapter, i, spec)
            if layernorm:
                _center_out(w, b)
            _rot_out(w, q, b)
    beta = _fuse_norm(final, adapter.final_norm_offset(), [head], layernorm)
    rot_in(head, q)
    if beta is not None:
        final.bias.data.copy_((beta @ q.to(beta.device)).to(final.bias.dtype))
    for e in [emb, *pos_embs]:
        rot_in(e, q)
    return {"construction": construction, "hidden_size": d, "untied_lm_head": untied,
            "layernorm_centering": layernorm}


# -- online Hadamard on y6 ----------------------------------------------------------------------------------
def _online_matrix(n: int, seed: int, kind: str) -> torch.Tensor:
    return rotation(n, seed + 7919, kind)[0]


@torch.no_grad()
def fold_online_hadamard(model: nn.Module, seed: int, kind: str) -> dict:
    """``W_down <- W_down H`` for every layer (the runtime hook then feeds ``y6 H``)."""
    adapter = get_adapter(model)
    spec = down_spec(adapter)
    n = linear_weight(adapter, 0, spec).shape[1]
    h = _online_matrix(n, seed, kind)
    for i in range(adapter.n_layers):
        rot_in(linear_weight(adapter, i, spec), h)
    return {"size": n, "seed": seed, "kind": kind}


class OnlineHadamard(Entry):
    """Registry entry ``rotate``: forward pre-hooks feeding ``y6 H`` to every down projection (after tma's)."""

    name = "rotate"
    order = ORDER["rotation"]

    def __init__(self, params: dict):
        self.params = dict(params["online_hadamard"])
        self._h64 = _online_matrix(self.params["size"], self.params["seed"], self.params["kind"])
        self._cache: dict = {}

    def describe(self) -> dict:
        return {"name": self.name, "params": {"online_hadamard": self.params}}

    def hook(self, module, args):
        x = args[0]
        key = (x.dtype, x.device)
        h = self._cache.get(key)
        if h is None:
            h = self._cache[key] = self._h64.to(dtype=x.dtype, device=x.device)
        return (x @ h, *args[1:])

    def attach(self, model, hooks, reg) -> None:
        adapter = get_adapter(model)
        spec = down_spec(adapter)
        for i in range(adapter.n_layers):
            hooks.pre(linear_module(adapter, i, spec), self.hook)


def apply(ctx: Context, cfg: RotateConfig) -> dict:
    info = rotate_model(ctx.model, cfg)
    ctx.say(f"rotate: residual stream rotated by a {info['construction'].replace('_', ' ')} of size "
            f"{info['hidden_size']}" + (" (LM head untied)" if info["untied_lm_head"] else ""))
    out = {"info": info}
    if cfg.online_hadamard:
        params = fold_online_hadamard(ctx.model, cfg.seed, cfg.kind)
        out["runtime"] = {"online_hadamard": params}
        out["info"]["online_hadamard"] = params
    return out

