"""SpinQuant-style learned rotation: R1 (the residual-stream rotation) optimised on the calibration windows
against the next-token loss of the model with fake-quantized activations, then QuaRot's online Hadamards.

Once the norm gains are fused (unit gains), the rotated model's linears that read the residual stream see
``norm(h) R`` with weights ``W R``; so, with activations quantized at those inputs, it computes
``Q(x R) R^T W^T`` from the unrotated weights. Training therefore needs no weight refolding: a forward hook on
every norm feeding linears replaces its output ``x`` by ``x + (Q(x R) R^T - x).detach()``-style straight-through
fake quantization (per token, ``bits`` bits, symmetric) in the basis ``R``, and only ``R`` gets gradients.

``R`` starts from the randomized Hadamard of :mod:`.rotate` (``seed``) and moves by Cayley steps, which keep it
exactly orthogonal: with the Euclidean gradient ``G``, ``A = G R^T - R G^T`` (skew), scaled to Frobenius norm
``lr`` (decaying linearly to 0 over ``steps``), and ``R <- (I + A/2)^{-1} (I - A/2) R``. The learned ``R`` is then
folded exactly like rotate's, and QuaRot's online parts (down and o_proj Hadamards, K/V rotation before the KV
quantizer) are added. The quantized loss on the training windows before and after is in the result.

Only the RMSNorm families (LLaMA, Mistral, Qwen, Phi-3, Gemma): a LayerNorm stream needs a rotation that keeps
the all-ones direction, which these steps do not preserve. Defaults are sized for a CPU (a few minutes on
SmolLM2-135M); R2 (per head) stays the fixed Hadamard of quarot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..runtime import (
    ORDER,
    FunctionEntry,
    NextTokenLoss,
    call,
    installed,
    next_token_nll,
    run,
)
from .base import Context, MitigationError, consumers, norm_module
from .quarot import QuaRotConfig, fold_online
from .rotate import (
    RotateConfig,
    check_rotatable,
    is_layernorm_model,
    rotate_model,
    rotation,
)


@dataclass(frozen=True)
class SpinQuantConfig:
    """Learned R1 by Cayley steps against the activation-quantized loss, + QuaRot's online parts."""

    name: ClassVar[str] = "spinquant"
    seed: int = 0
    #: optimisation steps (one batch each)
    steps: int = 16
    #: Frobenius norm of each step's skew generator at the start (decays linearly to 0)
    lr: float = 0.5
    #: activation bits of the training loss (per token, symmetric)
    bits: int = 4
    #: calibration windows used (cycled) and their length in tokens
    samples: int = 8
    seq_len: int = 256
    batch_size: int = 1
    #: QuaRot's online parts on top of the learned R1
    down: bool = True
    attn_out: bool = True
    kv: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "bits", "samples", "seq_len", "batch_size"):
            if int(getattr(self, key)) < (0 if key == "steps" else 1):
                raise MitigationError(f"spinquant.{key} must be positive, not {getattr(self, key)}")
        if not self.lr > 0:
            raise MitigationError(f"spinquant.lr must be > 0, not {self.lr}")

    @property
    def exact(self) -> bool:
        return True


def _readers(model: nn.Module, adapter) -> list[nn.Module]:
    """The norm modules whose outputs feed linears (their outputs are the rotated, quantized inputs)."""
    return [norm_module(adapter, i, n) for i in range(adapter.n_layers) for n in adapter.norms()
            if n.consumers and all(c is not None for c in consumers(adapter, n))]


def _quantized_in_basis(bits: int, rot: list[torch.Tensor]):
    from ..quantization.quantizers import quant_dynamic

    def hook(module, args, out):
        r = rot[0].to(dtype=out.dtype, device=out.device)
        xr = out @ r
        with torch.no_grad():
            noise = quant_dynamic(xr.detach(), bits, True, -1, 1.0) - xr.detach()
        return (xr + noise) @ r.T

    return hook


def _quantized_loss(model, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL (nats) of ``ids`` with the training hooks live."""
    acc = NextTokenLoss()
    run(model, ids, batch_size, acc)
    return math.log(acc.perplexity())


def cayley_step(r: torch.Tensor, g: torch.Tensor, step: float) -> torch.Tensor:
    """One descent step on the orthogonal group: ``(I + A/2)^{-1} (I - A/2) R`` with ``A = G R^T - R G^T``
    scaled to Frobenius norm ``step`` (float64; ``R`` stays orthogonal to rounding)."""
    a = g @ r.T - r @ g.T
    norm = float(a.norm())
    if norm == 0.0 or not math.isfinite(norm):
        return r
    a = a * (step / norm)
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return torch.linalg.solve(eye + a / 2, (eye - a / 2) @ r)


def learn_rotation(model: nn.Module, adapter, ids: torch.Tensor, cfg: SpinQuantConfig,
                   say=lambda msg: None) -> tuple[torch.Tensor, dict]:
    """Learn R1 on ``ids`` ([n, T]) for a model whose norm gains are fused (unit). Returns ``R`` (float64,
    on the CPU) and ``{"loss_start", "loss_end", "losses"}`` (quantized next-token loss, nats)."""
    d = model.get_input_embeddings().weight.shape[1]
    r64 = rotation(d, cfg.seed)[0]
    rot = [r64.float()]
    batches = [ids[i:i + cfg.batch_size] for i in range(0, ids.shape[0], cfg.batch_size)]
    norms = _readers(model, adapter)
    hook = _quantized_in_basis(cfg.bits, rot)

    def declare(hooks) -> None:
        for m in norms:
            hooks.forward(m, hook)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    losses: list[float] = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with installed(model, FunctionEntry("spinquant.train", ORDER["rotation"], declare)):
            start = _quantized_loss(model, ids, cfg.batch_size)
            for step in range(cfg.steps):
                leaf = r64.float().requires_grad_(True)
                rot[0] = leaf
                with torch.enable_grad():
                    batch = batches[step % len(batches)]
                    nll, count = next_token_nll(call(model, batch).logits, batch)
                    loss = nll / count
                    loss.backward()
                losses.append(float(loss.detach()))
                lr = cfg.lr * (1.0 - step / cfg.steps)
                r64 = cayley_step(r64, leaf.grad.detach().double().cpu(), lr)
                say(f"spinquant: step {step + 1}/{cfg.steps} quantized loss {losses[-1]:.4f}")
            rot[0] = r64.float()
            end = _quantized_loss(model, ids, cfg.batch_size)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return r64, {"loss_start": start, "loss_end": end, "losses": losses}


def apply(ctx: Context, cfg: SpinQuantConfig) -> dict:
    model = ctx.model
    check_rotatable(model)
    if is_layernorm_model(model):
        raise MitigationError("spinquant: the model reads its residual stream through LayerNorms; a learned "
                              "rotation must keep the all-ones direction there, which the Cayley steps do not "
                              "(use quarot)")
    t0 = time.perf_counter()
    d = model.get_input_embeddings().weight.shape[1]
    rotate_model(model, RotateConfig(), torch.eye(d, dtype=torch.float64))  # fuse the gains only
    ids = ctx.calib_ids("spinquant")[: cfg.samples, : cfg.seq_len]
    r, info = learn_rotation(model, ctx.adapter, ids, cfg, ctx.say)
    info["train_s"] = time.perf_counter() - t0
    info.update(rotate_model(model, RotateConfig(), r))
    params = fold_online(model, ctx.adapter, QuaRotConfig(seed=cfg.seed, down=cfg.down, attn_out=cfg.attn_out,
                                                          kv=cfg.kv))
    info["online"] = params
    ctx.say(f"spinquant: {cfg.steps} Cayley steps, {cfg.bits}-bit quantized loss {info['loss_start']:.4f} -> "
            f"{info['loss_end']:.4f} in {info['train_s']:.0f} s")
    return {"info": info, "runtime": params}
