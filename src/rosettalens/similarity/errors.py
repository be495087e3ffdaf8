"""Errors raised by :mod:`rosettalens.similarity` (all are :class:`~rosettalens.errors.RosettaError`)."""

from __future__ import annotations

from rosettalens.errors import ConfigError, RosettaError


class NonFiniteError(RosettaError, ValueError):
    """An input matrix has rows containing NaN or inf."""


class BatchSizeError(ConfigError):
    """A batch (or a whole input) has too few rows for the requested estimator."""


class DegenerateInputError(RosettaError, ValueError):
    """The metric is undefined for this input (e.g. a constant matrix has zero variance)."""
