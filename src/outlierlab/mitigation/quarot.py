"""QuaRot: the residual-stream rotation of :mod:`.rotate` plus the rotations of the activations it does not
reach, so that every linear input and the KV cache are quantized in a Hadamard basis (exact in fp32).

- **R1** (residual stream): :func:`.rotate.rotate_model` (norm gains fused, readers ``W Q``, writers ``Q^T W``).
- **down-projection input** (y6 / y4): online, ``W_down <- W_down H`` and a pre-hook feeds ``y6 H``.
- **attention output** (o_proj input): per head, where the value projection is its own linear (``v``):
  ``W_v <- (blockdiag H_hd)^T W_v`` (bias too) and ``W_o <- W_o blockdiag(H_hd)`` are folded, which is exact
  because attention mixes tokens, never the head dimension; the values (so the V cache) are then in the
  Hadamard basis. Then a full online Hadamard over the o_proj input (``W_o <- W_o H``, pre-hook ``x H``)
  mixes the heads too. Families with a fused qkv projection (GPT-2, GPT-NeoX, Phi-3) get the online part only.
- **KV cache**: K (after RoPE and any k-norm) and, where V was not folded, V are rotated per head by a
  Hadamard just before the KV quantizer and rotated back after it (``Q(k H) H^T``; for the scores this is
  QuaRot's ``(q H)(Q(k H))^T``). It reaches the quantizer through the registry: the KV entry reads
  :meth:`QuaRotEntry.kv_rotation` of the installed entry. Without a KV quantizer nothing is done.

The matrices are randomized Hadamards (random signs, :func:`.rotate.rotation`), seeded from ``seed``; sizes with
no known Hadamard fall back to a seeded random orthogonal matrix (said in the result). The runtime part is the
registry entry ``quarot`` (order ``rotation``: after tma's hooks, before the fake quantizer); like rotate's online
Hadamard, the exported checkpoint needs ``outlierlab.load``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..adapters import get_adapter
from ..runtime import ORDER, Entry
from .base import (
    Context,
    MitigationError,
    down_spec,
    linear_bias,
    linear_module,
    linear_spec,
    linear_weight,
    out_spec,
)
from .rotate import RotateConfig, rot_in, rotate_model, rotation

#: seed offsets of the online matrices (distinct from R1's and from rotate's online Hadamard)
_SEEDS = {"down": 7919, "o": 104729, "head": 1299709, "kv": 15485863}


@dataclass(frozen=True)
class QuaRotConfig:
    """Rotation R1 + online Hadamards at the down and o_proj inputs + per-head Hadamard of K/V (module docstring)."""

    name: ClassVar[str] = "quarot"
    seed: int = 0
    #: "hadamard" (random orthogonal fallback when no Hadamard of that size is known) | "random"
    kind: str = "hadamard"
    #: online Hadamard at the down-projection input
    down: bool = True
    #: Hadamard at the attention output: per head folded into v/o where possible, plus an online full one
    attn_out: bool = True
    #: per-head Hadamard of K and V before the KV quantizer
    kv: bool = True

    @property
    def exact(self) -> bool:
        return True


def matrix(params: dict) -> torch.Tensor:
    """The float64 orthogonal matrix described by ``{"size", "seed", "kind"}``."""
    return rotation(int(params["size"]), int(params["seed"]), params["kind"])[0]


def head_dim(model: nn.Module, adapter) -> int:
    attn = adapter.attention(0)
    hd = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
    if hd is None:
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(hd)


def _params(size: int, seed: int, kind: str, part: str) -> dict:
    return {"size": int(size), "seed": int(seed) + _SEEDS[part], "kind": kind,
            "construction": rotation(size, int(seed) + _SEEDS[part], kind)[1]}


@torch.no_grad()
def fold_head_rotation(adapter, h: torch.Tensor) -> None:
    """Values in the per-head Hadamard basis: ``W_v <- B^T W_v`` (``b_v <- b_v B``), ``W_o <- W_o B``."""
    v, o = linear_spec(adapter, "v"), out_spec(adapter)
    hd = h.shape[0]
    for i in range(adapter.n_layers):
        wv, bv = linear_weight(adapter, i, v), linear_bias(adapter, i, v)
        wo = linear_weight(adapter, i, o)
        if wv.shape[0] % hd or wo.shape[1] % hd:
            raise MitigationError(f"quarot: layer {i} v/o sizes ({wv.shape[0]}, {wo.shape[1]}) are not multiples "
                                  f"of the head dimension {hd}")
        blocks = torch.block_diag(*[h] * (wv.shape[0] // hd)).to(wv.device)
        wv.copy_((blocks.T @ wv.double()).to(wv.dtype))
        if bv is not None:
            bv.copy_((bv.double() @ blocks.to(bv.device)).to(bv.dtype))
        rot_in(wo, torch.block_diag(*[h] * (wo.shape[1] // hd)))


@torch.no_grad()
def fold_online(model: nn.Module, adapter, cfg: QuaRotConfig) -> dict:
    """Fold the weight side of every rotation (R1 excluded) and return the runtime parameters."""
    params: dict = {}
    if cfg.down:
        spec = down_spec(adapter)
        params["down"] = _params(linear_weight(adapter, 0, spec).shape[1], cfg.seed, cfg.kind, "down")
        h = matrix(params["down"])
        for i in range(adapter.n_layers):
            rot_in(linear_weight(adapter, i, spec), h)
    hd = head_dim(model, adapter)
    folded_v = False
    if cfg.attn_out:
        if linear_spec(adapter, "v") is not None:
            params["head"] = _params(hd, cfg.seed, cfg.kind, "head")
            fold_head_rotation(adapter, matrix(params["head"]))
            folded_v = True
        o = out_spec(adapter)
        params["o"] = _params(linear_weight(adapter, 0, o).shape[1], cfg.seed, cfg.kind, "o")
        h = matrix(params["o"])
        for i in range(adapter.n_layers):
            rot_in(linear_weight(adapter, i, o), h)
    if cfg.kv:
        params["kv"] = {**_params(hd, cfg.seed, cfg.kind, "kv"), "which": ["k"] if folded_v else ["k", "v"]}
    return params


class QuaRotEntry(Entry):
    """Registry entry ``quarot``: pre-hooks feeding ``x H`` to the down and o projections, and the per-head
    K/V rotation that the KV quantizer applies (:meth:`kv_rotation`)."""

    name = "quarot"
    order = ORDER["rotation"]

    def __init__(self, params: dict):
        self.params = {k: dict(v) for k, v in params.items()}
        self._h64 = {k: matrix(v) for k, v in self.params.items() if k in ("down", "o", "kv")}
        self._cache: dict = {}

    def describe(self) -> dict:
        return {"name": self.name, "params": self.params}

    def _matrix(self, part: str, x: torch.Tensor) -> torch.Tensor:
        key = (part, x.dtype, x.device)
        h = self._cache.get(key)
        if h is None:
            h = self._cache[key] = self._h64[part].to(dtype=x.dtype, device=x.device)
        return h

    def _hook(self, part: str):
        def hook(module, args):
            x = args[0]
            if x.dtype in (torch.float32, torch.float64):
                return (x @ self._matrix(part, x), *args[1:])
            # in 16-bit the Hadamard's entries (1/sqrt(n)) round: rotate in float32, then round the result once
            return ((x.float() @ self._matrix(part, x.float())).to(x.dtype), *args[1:])

        return hook

    def kv_rotation(self, x: torch.Tensor, which: str) -> torch.Tensor | None:
        """The ``[head_dim, head_dim]`` matrix to apply to ``which`` (``"k"``/``"v"``) states before the KV
        quantizer (``x @ H``, undone after it), or None."""
        kv = self.params.get("kv")
        if kv is None or which not in kv["which"] or x.shape[-1] != kv["size"]:
            return None
        return self._matrix("kv", x)

    def attach(self, model, hooks, reg) -> None:
        adapter = get_adapter(model)
        for part, spec in (("down", down_spec), ("o", out_spec)):
            if part in self.params:
                s = spec(adapter)
                for i in range(adapter.n_layers):
                    hooks.pre(linear_module(adapter, i, s), self._hook(part))


def apply(ctx: Context, cfg: QuaRotConfig) -> dict:
    try:
        info = rotate_model(ctx.model, RotateConfig(seed=cfg.seed, kind=cfg.kind))
    except MitigationError as exc:
        raise MitigationError(f"quarot needs the residual-stream rotation: {exc}") from None
    params = fold_online(ctx.model, ctx.adapter, cfg)
    info["online"] = params
    parts = ", ".join(f"{k} ({v['size']})" for k, v in params.items())
    ctx.say(f"quarot: residual stream rotated ({info['construction'].replace('_', ' ')}, d={info['hidden_size']}); "
            f"Hadamard at {parts or 'nothing else'}")
    return {"info": info, "runtime": params}
