"""outlierlab: find, explain and remove the activation outliers of Hugging Face causal LMs."""

from .adapters import get_adapter, supported_model_types
from .analysis.detect import DetectConfig
from .analysis.explain import ExplainConfig, Explanation, explain
from .api import profile
from .evaluation.compare import CompareConfig, compare
from .data import DataConfig, Windows, make_windows
from .errors import OutlierlabError
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
    "QuantConfig",
    "DetectConfig",
    "ExplainConfig",
    "Explanation",
    "MitigationResult",
    "OutlierlabError",
    "Profile",
    "ProfileConfig",
    "StatsConfig",
    "Windows",
    "compare",
    "explain",
    "get_quant",
    "quantize_",
    "get_adapter",
    "load",
    "load_model",
    "make_windows",
    "mitigate",
    "profile",
    "supported_model_types",
]
