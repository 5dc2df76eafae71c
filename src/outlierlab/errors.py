"""User-facing errors: each one is printed by the CLI as a single clear line."""


class OutlierlabError(Exception):
    """An error the user can act on (bad path, offline hub, unsupported model, bad data...)."""


class UnsupportedArchitecture(OutlierlabError):
    """The model's ``model_type`` has no adapter."""


class DataError(OutlierlabError):
    """The text source is missing, unreachable, empty or too short."""


class ModelNotFound(OutlierlabError):
    """The model path, alias or hub id cannot be resolved."""


class NonFiniteActivation(OutlierlabError):
    """NaN or inf appeared in a traced activation."""
