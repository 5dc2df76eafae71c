"""The ``outlierlab`` command line: one module per command in this package, each registering on ``app``.

Known failures print one line (``error: ...``) and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import pkgutil

from .common import app

#: the order of ``outlierlab --help``: the order a user takes the study in (typer lists in registration order)
ORDER = ("run", "profile", "explain", "mitigate", "compare", "quant-error", "lm-eval", "export", "report", "models")

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "common":
        importlib.import_module(f"{__name__}.{_info.name}")

# a command missing from ORDER is listed last rather than hidden
app.registered_commands.sort(key=lambda c: ORDER.index(c.name) if c.name in ORDER else len(ORDER))

__all__ = ["ORDER", "app"]
