"""Permutation tests: every similarity value with its null.

The null distribution is built by shuffling the row pairing of ``Y`` against ``X`` (which destroys
any relation between the paired rows but keeps each input's own structure). The p-value carries the
+1 correction, ``p = (1 + #{null >= observed}) / (1 + n_permutations)``, so it is never 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rosettalens.errors import ConfigError
from rosettalens.similarity._tensor import ArrayLike, paired
from rosettalens.similarity.metrics import PREPARED, Prepared

__all__ = ["PermutationResult", "permutation_test", "metric_names", "prepare_metric"]

_ALTERNATIVES = ("greater", "less", "two-sided")


@dataclass(frozen=True)
class PermutationResult:
    """Observed metric value, its permutation null, and the +1-corrected p-value."""

    observed: float
    null_mean: float
    null_std: float  # sample standard deviation (ddof=1) of the null values
    p_value: float
    n_permutations: int
    alternative: str
    null: np.ndarray = field(repr=False)  # [n_permutations] metric on shuffled pairings

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the null values)."""
        return {
            "observed": self.observed,
            "null_mean": self.null_mean,
            "null_std": self.null_std,
            "p_value": self.p_value,
            "n_permutations": self.n_permutations,
            "alternative": self.alternative,
        }


def metric_names() -> list[str]:
    """Names accepted wherever a metric is given by name (CLI ``--metrics``, :func:`permutation_test`)."""
    return sorted(PREPARED)


def _scalar(value: Any) -> float:
    if hasattr(value, "value"):
        return float(value.value)
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return float(arr)
    return float(arr.mean())  # e.g. cca's canonical correlations -> their mean


def prepare_metric(
    metric: str | Callable[..., Any], X: ArrayLike, Y: ArrayLike, **kwargs: Any
) -> tuple[str, Prepared]:
    """Resolve ``metric`` to ``(name, fn)``; see :func:`_prepare`."""
    name, fn, _, _ = _prepare(metric, X, Y, **kwargs)
    return name, fn


def _prepare(
    metric: str | Callable[..., Any], X: ArrayLike, Y: ArrayLike, **kwargs: Any
) -> tuple[str, Prepared, torch.Tensor, torch.Tensor]:
    """Resolve ``metric`` (a name or a function) to ``(name, fn)`` with ``fn(perm) = metric(X, Y[perm])``.

    Built-in metrics precompute what a row permutation leaves unchanged (bases, Gram matrices, ranks),
    so each permutation costs a fraction of a full evaluation. Any other callable ``f(X, Y, **kwargs)``
    returning a number (or an object with ``.value``, or an array whose mean is taken) is evaluated
    from scratch per permutation.
    """
    name: str | None = None
    if isinstance(metric, str):
        if metric not in PREPARED:
            raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(metric_names())}")
        name = metric
    else:
        for key, (fn, _, _) in PREPARED.items():
            if fn is metric:
                name = key
                break
    if name is not None:
        _, prep, min_rows = PREPARED[name]
        x, y = paired(X, Y, min_rows=min_rows, what=name)
        return name, prep(x, y, **kwargs), x, y
    if not callable(metric):
        raise ConfigError(f"metric must be a metric name or a callable, got {type(metric).__name__}")
    x, y = paired(X, Y, min_rows=2, what=getattr(metric, "__name__", "metric"))
    label = getattr(metric, "__name__", "metric")

    def generic(perm: torch.Tensor | None) -> float:
        return _scalar(metric(x, y if perm is None else y[perm], **kwargs))

    return label, generic, x, y


def permutation_test(
    metric: str | Callable[..., Any],
    X: ArrayLike,
    Y: ArrayLike,
    n_permutations: int = 1000,
    seed: int = 0,
    alternative: str = "greater",
    **metric_kwargs: Any,
) -> PermutationResult:
    """Test ``metric(X, Y)`` against the null of shuffled row pairings.

    Args:
        metric: a name from :func:`metric_names` (``"svcca"``, ``"linear_cka"``, ``"rsa"``, ...), one of
            the metric functions, or any ``f(X, Y, **metric_kwargs) -> float``.
        X: ``[n, d1]``; Y: ``[n, d2]`` with paired rows.
        n_permutations: number of shuffles (>= 1).
        seed: seeds ``numpy.random.default_rng``; the same seed gives the same permutations.
        alternative: ``"greater"`` (large = similar; default), ``"less"`` (for distances), or
            ``"two-sided"`` (distance from the null mean).

    Returns:
        :class:`PermutationResult` with ``p = (1 + #{null at least as extreme}) / (1 + n_permutations)``.
    """
    if int(n_permutations) < 1:
        raise ConfigError(f"n_permutations must be >= 1, got {n_permutations}")
    if alternative not in _ALTERNATIVES:
        raise ConfigError(f"alternative must be one of {', '.join(_ALTERNATIVES)}, got {alternative!r}")
    _, fn, x, y = _prepare(metric, X, Y, **metric_kwargs)
    width = max(x.shape[1], y.shape[1])
    return run_permutations(fn, x.shape[0], int(n_permutations), seed, alternative, x.device, width)


# Below this many multiply-adds per evaluation, BLAS threads cost more than they save (and on a busy
# machine a small multi-threaded matmul can stall for milliseconds), so the null runs single-threaded.
_SMALL_WORK = 4_000_000


def _single_thread_ok(n_rows: int, width: int) -> bool:
    return n_rows * max(n_rows, width) * max(width, 1) < _SMALL_WORK


@contextmanager
def small_problem_threads(n_rows: int, width: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a small CPU problem single-threaded (restoring the thread count afterwards)."""
    single = torch.device(device).type == "cpu" and _single_thread_ok(n_rows, width)
    threads = torch.get_num_threads()
    try:
        if single:
            torch.set_num_threads(1)
        yield
    finally:
        if single:
            torch.set_num_threads(threads)


def run_permutations(
    fn: Prepared,
    n_rows: int,
    n_permutations: int,
    seed: int = 0,
    alternative: str = "greater",
    device: torch.device | str = "cpu",
    width: int | None = None,
) -> PermutationResult:
    """Evaluate a prepared metric on the identity and on ``n_permutations`` seeded row shuffles.

    ``width`` (the larger input width) lets small CPU problems run single-threaded (faster there).
    """
    observed = fn(None)
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations, dtype=np.float64)
    with small_problem_threads(n_rows, width if width is not None else 1 << 30, device):
        for i in range(n_permutations):
            perm = torch.from_numpy(rng.permutation(n_rows)).to(device)
            null[i] = fn(perm)
    if alternative == "greater":
        extreme = null >= observed
    elif alternative == "less":
        extreme = null <= observed
    else:
        centre = null.mean()
        extreme = np.abs(null - centre) >= abs(observed - centre)
    p = (1.0 + float(extreme.sum())) / (1.0 + n_permutations)
    std = float(null.std(ddof=1)) if n_permutations > 1 else 0.0
    return PermutationResult(float(observed), float(null.mean()), std, p, n_permutations, alternative, null)
