"""Plots (PNG, matplotlib Agg) and a self-contained HTML report for a run directory."""

from .html import refusal_report, write_report

__all__ = ["refusal_report", "write_report"]
