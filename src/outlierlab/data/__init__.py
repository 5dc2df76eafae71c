"""Text data: the Brown corpus, text sources and token windows."""

from outlierlab.data.brown import brown_text, fetch_brown
from outlierlab.data.sources import load_text
from outlierlab.data.windows import DataConfig, Windows, make_windows

__all__ = ["DataConfig", "Windows", "brown_text", "fetch_brown", "load_text", "make_windows"]
