"""outlierlab: find, explain and remove the activation outliers of Hugging Face causal LMs."""

from .adapters import get_adapter, supported_model_types
from .analysis.detect import DetectConfig
from .api import profile
from .data import DataConfig, Windows, make_windows
from .errors import OutlierlabError
from .models import load_model
from .tracing import Profile, ProfileConfig, StatsConfig

__version__ = "0.1.0"

__all__ = [
    "DataConfig",
    "DetectConfig",
    "OutlierlabError",
    "Profile",
    "ProfileConfig",
    "StatsConfig",
    "Windows",
    "get_adapter",
    "load_model",
    "make_windows",
    "profile",
    "supported_model_types",
]
