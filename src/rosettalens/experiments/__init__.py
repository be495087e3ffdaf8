"""End-to-end experiments, one module each, every one writing a run directory.

Each module in :data:`EXPERIMENTS` exposes ``EXPERIMENT`` (an :class:`~rosettalens.experiments.base.Experiment`);
``rosetta run NAME`` turns its config dataclass into options. See docs/experiments.md.
"""

from .base import Experiment, RunContext, Stage, run_experiment

# experiment name -> module exposing EXPERIMENT (one line per experiment)
EXPERIMENTS = {
    "refusal-transfer": "rosettalens.experiments.refusal_transfer",
    "sae-universality": "rosettalens.experiments.sae_universality",
    "seqcont-circuits": "rosettalens.experiments.seqcont_circuits",
    "backdoor-transfer": "rosettalens.experiments.backdoor_transfer",
    "safety-switch": "rosettalens.experiments.safety_switch",
}

__all__ = ["EXPERIMENTS", "Experiment", "RunContext", "Stage", "get_experiment", "run_experiment"]


def get_experiment(name: str) -> Experiment:
    """The ``EXPERIMENT`` object of a registered experiment."""
    import importlib

    from ..errors import ConfigError

    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name]).EXPERIMENT
