"""Tracing: hooks, streaming statistics, the profiler and its result."""

from .hooks import HookSet, attach_positions
from .profiler import ProfileConfig, Tracer, profile
from .result import Profile, load_report
from .stats import PositionStats, StatsConfig

__all__ = ["HookSet", "PositionStats", "Profile", "ProfileConfig", "StatsConfig", "Tracer", "attach_positions",
           "load_report", "profile"]
