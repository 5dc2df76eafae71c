"""Perplexity with one documented protocol, identical for every method so numbers are comparable.

Protocol (``EvalConfig`` defaults): the first ``n_samples`` non-overlapping windows of ``seq_len`` tokens of
``brown:eval`` (Brown genres K-R, never seen in calibration), in corpus order; BOS as the tokenizer does
(SmolLM2 adds none); every token after the first of each window is predicted; perplexity is
``exp(mean negative log-likelihood)`` over all predicted tokens, accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..data import DataConfig, Windows, make_windows
from ..models.loader import input_device


@dataclass(frozen=True)
class EvalConfig:
    source: str = "brown:eval"
    seq_len: int = 512
    n_samples: int = 8
    bos: str = "auto"
    batch_size: int = 4

    def data_config(self) -> DataConfig:
        return DataConfig(source=self.source, seq_len=self.seq_len, n_samples=self.n_samples, bos=self.bos,
                          order="sequential")

    def protocol(self) -> dict:
        """What is written next to every perplexity so readers can compare numbers."""
        return {**asdict(self), "order": "sequential", "predicted_tokens_per_window": self.seq_len - 1,
                "metric": "exp(mean NLL over predicted tokens)"}


def eval_windows(tokenizer, config: EvalConfig | None = None, max_positions: int | None = None) -> Windows:
    return make_windows(tokenizer, (config or EvalConfig()).data_config(), max_positions=max_positions)


@torch.inference_mode()
def perplexity(model: nn.Module, windows, batch_size: int = 4) -> float:
    """exp(mean NLL) of next-token prediction over every window (``Windows`` or a [n, T] LongTensor).

    The loss reads the logits in place (the last position is masked with ``ignore_index`` instead of sliced
    off, which would copy them), and the sum stays on the device until the end (no host sync per batch).
    """
    ids = getattr(windows, "input_ids", windows)
    device = input_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        if logits.dtype != torch.float32:
            logits = logits.float()
        labels = torch.full_like(batch, -100)
        labels[:, :-1] = batch[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                          ignore_index=-100, reduction="sum")
        total += nll.double()
        count += batch[:, 1:].numel()
    return math.exp(float(total) / count)
