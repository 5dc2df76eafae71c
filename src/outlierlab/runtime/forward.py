"""The one forward loop: every stage that runs windows through a model goes through :func:`run`.

It owns what each hand-written loop used to get right or wrong on its own:

- **placement**: token ids go to the execution device of the input embeddings (:func:`input_device`), which
  for a model placed by accelerate (several GPUs, CPU or disk offload) is where its first module runs, not
  where its first parameter happens to be stored;
- **batching** and the **window offset**: the registry's :class:`~outlierlab.runtime.registry.BatchInfo` says,
  during every forward, which window the batch starts at and its ``[batch, tokens]`` shape (for statistics and
  for families that flatten tokens);
- **grad mode**: ``inference_mode`` unless ``grad=True`` (fine-tuning);
- **dtype policy**: the model runs in its own dtype; losses and statistics are reduced in float32 / float64
  (:func:`next_token_nll`), whatever that dtype is;
- **logits only when read**: a pass whose consumers never read the logits (profiles, calibrations, captures)
  asks the model for the last position's logits only (``logits_to_keep=1``, where the model's ``forward``
  takes it): the output layer is 28% of a SmolLM2 forward on 2 CPU cores (49,152 x 576);
- **the garbage collector**: the objects that exist when a run starts (the model, the libraries) are left out
  of the collector's passes until it ends (:func:`frozen_gc`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..progress import progress_bar
from .registry import registry


def input_device(model: nn.Module) -> torch.device:
    """Where the input ids must go: the execution device of the input embeddings when accelerate placed the
    model (their weights may be offloaded, on the meta device), else the device of the first parameter."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return next(model.parameters()).device


def window_ids(windows) -> torch.Tensor:
    """The ``[n, T]`` token ids of a ``Windows`` object or of a LongTensor."""
    ids = getattr(windows, "input_ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TypeError("windows must be a Windows object or a [n_windows, seq_len] LongTensor of token ids")
    return ids


@dataclass(frozen=True)
class Batch:
    """One forward: the token ids (on the input device) and the index of its first window."""

    ids: torch.Tensor
    start: int


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def call(model: nn.Module, ids: torch.Tensor, start: int = 0, logits: bool = True, **kwargs):
    """One forward of ``ids`` ([B, T], any device) with the registry's batch info set; returns the output.

    ``logits=False``: the caller does not read the logits; the output layer then runs on the last position
    only where the model allows it (the output's ``logits`` are ``[B, 1, vocab]``)."""
    batch = ids.to(input_device(model), non_blocking=True)
    info = registry(model).batch
    info.batch, info.tokens, info.window0 = int(batch.shape[0]), int(batch.shape[1]), int(start)
    if not logits and _takes_logits_to_keep(type(model)):
        kwargs.setdefault("logits_to_keep", 1)
    return model(input_ids=batch, use_cache=False, **kwargs)


_FROZEN = 0  # depth of nested frozen_gc blocks


@contextlib.contextmanager
def frozen_gc():
    """Leave the objects that exist now out of the garbage collector's passes until the outermost such block
    ends (``gc.freeze``/``gc.unfreeze``, both constant time): a full collection during the block walks only
    what the block created, not every object of torch, transformers and the model. Without it, one 7B profile
    in three on the H200 spent 0.22-0.25 s in one full collection (bench/profile_overhead.py prints the time).
    Nothing is lost: objects that die meanwhile are collected after the block."""
    global _FROZEN
    if _FROZEN == 0:
        gc.freeze()
    _FROZEN += 1
    try:
        yield
    finally:
        _FROZEN -= 1
        if _FROZEN == 0:
            gc.unfreeze()


def run(model: nn.Module, windows, batch_size: int = 4, on_batch: Callable[[Batch, object], None] | None = None,
        *, progress: bool = False, description: str = "forward", first_window: int = 0,
        grad: bool = False, stop: type[BaseException] | None = None, logits: bool = True,
        first_batch: Callable[[Callable[[], object]], object] | None = None) -> None:
    """Forward every window once, in batches of ``batch_size``; ``on_batch(batch, output)`` after each.

    ``first_window``: the index of ``windows[0]`` in the whole window set (a rank's shard). ``stop``: an
    exception type a hook raises to end a forward early (layer-input capture); it is swallowed per batch.
    ``logits=False``: nothing reads the logits (see :func:`call`). ``first_batch``: runs the first forward,
    given as a function of nothing, and returns its output (the tracer's watch for in-place writes, which may
    run it twice).
    """
    ids = window_ids(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    mode = contextlib.nullcontext() if grad else torch.inference_mode()
    with frozen_gc(), mode, progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(ids))
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            try:
                forward = functools.partial(call, model, chunk, first_window + start, logits)
                out = first_batch(forward) if first_batch is not None and start == 0 else forward()
            except BaseException as exc:
                if stop is not None and isinstance(exc, stop):
                    out = None
                else:
                    raise
            if on_batch is not None:
                on_batch(Batch(chunk, first_window + start), out)
            bar.advance(task, len(chunk))


#: logits rows per step of :func:`next_token_nll` are capped at this many elements (8 MB in float32): a log-softmax
#: of the whole [batch x tokens, vocabulary] block streams it through memory several times; slices stay in cache
NLL_CHUNK_ELEMENTS = 2 ** 21


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood (float64 scalar on the logits' device) and the token count.

    Per predicted position ``logsumexp(logits) - logits[next id]`` in float32, summed in float64, over slices
    of rows (on 2 CPU cores 5-15x faster than one cross-entropy over SmolLM2's 4 x 512 x 49,152 logits; per
    token the same value, the sum more exact). No host sync: the sum stays on the device.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    labels = ids.to(logits.device).clone()
    labels[:, :-1] = ids[:, 1:]
    labels[:, -1] = -1  # the last position predicts nothing
    labels = labels.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    rows = max(1, NLL_CHUNK_ELEMENTS // vocab)
    for i in range(0, flat.shape[0], rows):
        chunk, target = flat[i:i + rows].float(), labels[i:i + rows]
        picked = chunk.gather(1, target.clamp(min=0)[:, None])[:, 0]
        nll = (torch.logsumexp(chunk, dim=-1) - picked).double()
        total += torch.where(target >= 0, nll, 0.0).sum()
    return total, int(ids[:, 1:].numel())


class NextTokenLoss:
    """An ``on_batch`` for :func:`run` that sums the next-token NLL on the device (no host sync per batch);
    :meth:`perplexity` reads it once at the end."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []
        self.count = 0

    def __call__(self, batch: Batch, out) -> None:
        nll, n = next_token_nll(out.logits, batch.ids)
        self.sums.append(nll)
        self.count += n

    def perplexity(self) -> float:
        """exp(mean NLL) over every token predicted so far."""
        total = torch.stack([t.to(self.sums[0].device) for t in self.sums]).sum()
        return math.exp(float(total) / self.count)


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` on ``ref``'s device (and dtype when ``t`` is floating): for weight edits on any device."""
    return t.to(device=ref.device, dtype=ref.dtype if t.is_floating_point() else t.dtype)
