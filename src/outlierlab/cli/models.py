"""``outlierlab models``: supported architectures and aliases."""

from __future__ import annotations

from .common import app, out


@app.command("models")
def models_cmd() -> None:
    """List the supported architectures and the model aliases."""
    from ..adapters import supported_model_types
    from ..models.loader import ALIASES

    out.print("architectures (HF model_type): " + ", ".join(supported_model_types()))
    out.print("aliases: " + ", ".join(ALIASES))


