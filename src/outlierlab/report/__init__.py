"""Reporting: terminal summaries (and, as stages land, figures and the HTML report)."""
