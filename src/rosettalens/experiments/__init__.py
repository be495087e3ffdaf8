"""End-to-end experiments, one module each, every one writing a run directory."""

EXPERIMENTS = {"refusal-transfer": "rosettalens.experiments.refusal_transfer"}

__all__ = ["EXPERIMENTS"]
