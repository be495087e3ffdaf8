"""Nearest-neighbour overlap: how many of each row's k nearest neighbours two representations share
(mutual kNN, Jaccard kNN)."""

from __future__ import annotations

import math

import torch

from rosettalens.errors import ConfigError
from rosettalens.similarity._linalg import (
    Prepared,
)
from rosettalens.similarity._tensor import ArrayLike, paired

__all__ = [
    "jaccard_knn",
    "mutual_knn",
    "prepare_knn",
]


# ----------------------------------------------------------------------------------------------
# nearest-neighbour overlap

_KNN_METRICS = ("cosine", "euclidean", "ip")


def _knn_mask_rows(x: torch.Tensor, rows: slice, k: int, metric: str, xn: torch.Tensor) -> torch.Tensor:
    """Boolean ``[c, n]`` mask of the ``k`` nearest neighbours (self excluded) of ``x[rows]``.

    Ties at the k-th similarity are broken toward the lower row index, so the result is deterministic.
    """
    if metric == "euclidean":
        s = 2.0 * (x[rows] @ x.T) - xn[None, :]  # = -(squared distance) + const per row
    else:
        s = x[rows] @ x.T
    c, n = s.shape
    r = torch.arange(rows.start, rows.stop, device=x.device)
    s[torch.arange(c, device=x.device), r] = -math.inf
    top = torch.topk(s, min(k + 1, n), dim=1)
    mask = torch.zeros(c, n, dtype=torch.bool, device=x.device)
    mask.scatter_(1, top.indices[:, :k], True)
    if k < n:
        tied = (top.values[:, k] == top.values[:, k - 1]).nonzero().flatten()
        if tied.numel():  # a tie straddles the k-th place: keep the lowest indices among the tied
            st = s[tied]
            kth = top.values[tied, k - 1 : k]
            gt = st > kth
            tie = st == kth
            need = k - gt.sum(dim=1, keepdim=True)
            mask[tied] = gt | (tie & (torch.cumsum(tie, dim=1) <= need))
    return mask


def _knn_prepare_x(x: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    if metric not in _KNN_METRICS:
        raise ConfigError(f"unknown kNN metric {metric!r}; choose one of {', '.join(_KNN_METRICS)}")
    if metric == "cosine":
        norms = x.norm(dim=1, keepdim=True)
        x = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    return x, (x * x).sum(1)


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n - 1:
        raise ConfigError(
            f"k must be between 1 and n-1 = {n - 1} (neighbours exclude the row itself), got {k}"
        )


def _knn_overlap(x: torch.Tensor, y: torch.Tensor, k: int, metric: str, chunk: int = 1024) -> torch.Tensor:
    """``[n]`` size of the intersection of each row's k-NN sets in X and in Y."""
    n = x.shape[0]
    _check_k(k, n)
    xs, xn = _knn_prepare_x(x, metric)
    ys, yn = _knn_prepare_x(y, metric)
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        mx = _knn_mask_rows(xs, rows, k, metric, xn)
        my = _knn_mask_rows(ys, rows, k, metric, yn)
        out[rows] = (mx & my).sum(dim=1).to(torch.float64)
    return out


def mutual_knn(X: ArrayLike, Y: ArrayLike, k: int = 10, metric: str = "cosine") -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024): mean ``|N_X(i) & N_Y(i)| / k``.

    Neighbours exclude the row itself; ``metric``: ``"cosine"`` (default, as Huh et al. normalise
    features), ``"euclidean"`` or ``"ip"`` (inner product). Computed in float64 in row chunks.
    """
    x, y = paired(X, Y, min_rows=2, what="mutual_knn")
    return float(_knn_overlap(x, y, k, metric).mean() / k)


def jaccard_knn(X: ArrayLike, Y: ArrayLike, k: int = 10, metric: str = "cosine") -> float:
    """Mean Jaccard index of each row's k-NN sets in X and in Y: ``|A & B| / |A | B|``."""
    x, y = paired(X, Y, min_rows=2, what="jaccard_knn")
    inter = _knn_overlap(x, y, k, metric)
    return float((inter / (2 * k - inter)).mean())


_KNN_FULL_MAX_ROWS = 30_000


def prepare_knn(
    x: torch.Tensor, y: torch.Tensor, k: int = 10, metric: str = "cosine", jaccard: bool = False
) -> Prepared:
    """``fn(perm)`` -> the metric of ``(x, y[perm])`` (``perm`` a row permutation, None the identity) for
    ``x [n, d1]``, ``y [n, d2]`` (float64): the work that does not depend on the row order done once."""
    n = x.shape[0]
    _check_k(k, n)

    def score(inter: torch.Tensor) -> float:
        return float((inter / (2 * k - inter)).mean()) if jaccard else float(inter.mean() / k)

    if n > _KNN_FULL_MAX_ROWS:  # [n, n] masks too large: recompute per permutation
        return lambda perm: score(_knn_overlap(x, y if perm is None else y[perm], k, metric))
    xs, xn = _knn_prepare_x(x, metric)
    ys, yn = _knn_prepare_x(y, metric)
    mx = _knn_mask_rows(xs, slice(0, n), k, metric, xn)
    my = _knn_mask_rows(ys, slice(0, n), k, metric, yn)

    def fn(perm: torch.Tensor | None) -> float:
        myp = my if perm is None else my[perm][:, perm]
        return score((mx & myp).sum(dim=1).to(torch.float64))

    return fn
