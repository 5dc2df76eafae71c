"""Evaluation: the one perplexity protocol every stage uses."""

from .perplexity import EvalConfig, eval_windows, perplexity

__all__ = ["EvalConfig", "eval_windows", "perplexity"]
