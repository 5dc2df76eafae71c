"""The combination this project recommends from the study: TMA removal + gamma equalization + OTC tuning.

Defaults chosen by measurement on SmolLM2-135M (docs/mitigation.md has the numbers and the reasoning):

- ``tma``: the compensated scale at the origin layer: it removes the residual MA (and its y6 trigger) while
  keeping the sink exactly (the clamp reference costs +2% perplexity for a 6.5x cut, +20% for 18x);
- ``gamma``: fold, k = 1.5, target median: exact, and it removes the gain's share of the norm-output COs;
- ``otc``: closed form with gain compensation off and no fine-tuning by default (scoring only): on SmolLM2
  the OTC columns do not create the CO channels (the residual stream does), and every function-changing
  shrink measured cost more perplexity than it removed outliers; ``OTCConfig(steps=...)`` turns the
  selective fine-tuning on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .gamma import GammaConfig
from .otc import OTCConfig
from .tma import TMAConfig


@dataclass(frozen=True)
class PaperConfig:
    """tma + gamma + otc, applied in the documented composition order."""

    name: ClassVar[str] = "paper"
    tma: TMAConfig = field(default_factory=TMAConfig)
    gamma: GammaConfig = field(default_factory=GammaConfig)
    otc: OTCConfig = field(default_factory=OTCConfig)

    def expand(self) -> list:
        return [self.tma, self.gamma, self.otc]

    @property
    def exact(self) -> bool:
        return all(c.exact for c in self.expand())
