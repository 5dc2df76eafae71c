"""The one progress-bar style of every long loop (profiling, ablations, sweeps, GPTQ, the comparison)."""

from __future__ import annotations


def progress_bar(enabled: bool = True):
    """A transient rich progress bar: description, bar, done/total, elapsed and remaining time.

    Disabled (prints nothing) when ``enabled`` is False, so callers need no second code path.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=True)
