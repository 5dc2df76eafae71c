"""Perplexity with one documented protocol, identical for every method so numbers are comparable.

Protocol (``EvalConfig`` defaults): the first ``n_samples`` non-overlapping windows of ``seq_len`` tokens of
``brown:eval`` (Brown genres K-R, never seen in calibration), in corpus order; BOS as the tokenizer does
(SmolLM2 adds none); every token after the first of each window is predicted; perplexity is
``exp(mean negative log-likelihood)`` over all predicted tokens, accumulated in float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..data import DataConfig, Windows, make_windows
from ..runtime import NextTokenLoss, run


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


def perplexity(model: nn.Module, windows, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean NLL) of next-token prediction over every window (``Windows`` or a [n, T] LongTensor).

    The sum stays on the device until the end (no host sync per batch).
    """
    loss = NextTokenLoss()
    run(model, windows, batch_size, loss, progress=progress, description="perplexity")
    return loss.perplexity()
