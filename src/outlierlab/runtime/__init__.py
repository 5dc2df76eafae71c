"""The runtime: the one forward loop (:mod:`.forward`) and the one registry of what is installed on a model
(:mod:`.registry`). Every stage runs models and installs hooks through these two."""

from .forward import (
    Batch,
    NextTokenLoss,
    call,
    frozen_gc,
    input_device,
    like,
    next_token_nll,
    run,
    window_ids,
)
from .registry import (
    ORDER,
    BatchInfo,
    Entry,
    FunctionEntry,
    Hooks,
    Registry,
    install,
    installed,
    registry,
    uninstall,
)

__all__ = [
    "ORDER",
    "Batch",
    "BatchInfo",
    "Entry",
    "FunctionEntry",
    "Hooks",
    "NextTokenLoss",
    "Registry",
    "call",
    "frozen_gc",
    "input_device",
    "install",
    "installed",
    "like",
    "next_token_nll",
    "registry",
    "run",
    "uninstall",
    "window_ids",
]
