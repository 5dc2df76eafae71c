"""The ``outlierlab`` command line: one module per command in this package, each registering on ``app``.

Known failures print one line (``error: ...``) and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import pkgutil

from .common import app

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "common":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["app"]
