"""outlierlab: find, explain and remove the activation outliers of Hugging Face causal LMs."""

from .adapters import get_adapter, supported_model_types
from .analysis.detect import DetectConfig
from .analysis.explain import ExplainConfig, Explanation, explain
from .api import profile
from .data import DataConfig, Windows, make_windows
from .errors import OutlierlabError
from .evaluation.compare import CompareConfig, compare
from .mitigation import METHODS, MitigationResult, mitigate
from .mitigation.export import load
from .models import load_model
from .quantization import QuantConfig, get_quant, quantize_
from .tracing import Profile, ProfileConfig, StatsConfig

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CompareConfig",
    "DataConfig",
    "DetectConfig",
    "ExplainConfig",
    "Explanation",
    "MitigationResult",
    "OutlierlabError",
    "Profile",
    "ProfileConfig",
    "QuantConfig",
    "StatsConfig",
    "Windows",
    "compare",
    "explain",
    "get_adapter",
    "get_quant",
    "load",
    "load_model",
    "make_windows",
    "mitigate",
    "profile",
    "quantize_",
    "supported_model_types",
]
