"""End-to-end experiments, one module each, every one writing a run directory.

Each module in :data:`EXPERIMENTS` exposes ``EXPERIMENT`` (an :class:`~rosettalens.experiments.base.Experiment`);
``rosetta run NAME`` turns its config dataclass into options, and :func:`run` runs it from Python with
the same options and the same checks. See docs/experiments.md and docs/cli.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .base import Experiment, RunContext, Stage, run_experiment
from .runner import EXPERIMENTS, config_from_values, load_experiment, preflight, print_plan

__all__ = ["EXPERIMENTS", "Experiment", "RunContext", "Stage", "get_experiment", "run", "run_experiment"]


def get_experiment(name: str) -> Experiment:
    """The ``EXPERIMENT`` object of a registered experiment."""
    import importlib

    from ..errors import ConfigError

    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name]).EXPERIMENT


def run(
    name: str,
    *,
    preset: str | None = None,
    config: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    reuse: Sequence[str | os.PathLike[str]] = (),
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run experiment ``name`` as ``rosetta run NAME`` does and return its ``--json`` object.

    ``options`` are its config fields (``source_layer=12``, ``out="runs/x"``), checked like the
    command line's: an unknown name, a wrong type, a value outside a ``Literal`` field's choices, a
    layer the model lacks, an unknown model or an unreadable file raises a
    :class:`~rosettalens.errors.RosettaError` before anything is downloaded, loaded or written.
    ``preset``, ``config`` (a config.json), ``resume`` (a run directory), ``reuse`` (earlier run
    directories) and ``overwrite`` are the options of the same names.

    >>> run("refusal-transfer", n_eval=8, out="runs/quick")  # doctest: +SKIP
    """
    exp, _ = load_experiment(name)
    resume_s = None if resume is None else os.fspath(resume)
    cfg = config_from_values(
        exp,
        options,
        config=None if config is None else os.fspath(config),
        preset=preset,
        resume=resume_s,
    )
    preflight(exp, cfg, resume=resume_s, overwrite=overwrite, reuse=reuse)
    if progress:
        print_plan(exp, cfg)
    return run_experiment(exp, cfg, resume=resume_s, progress=progress, overwrite=overwrite, reuse=reuse)
