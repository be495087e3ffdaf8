"""Centred kernel alignment: linear and RBF CKA (optionally debiased) and minibatch CKA over a stream of
batches (conventions: :mod:`rosettalens.similarity.metrics`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from rosettalens.errors import ConfigError, ShapeError
from rosettalens.similarity._linalg import (
    Prepared,
    gram,
    gram_t,
    sq_dists,
    upper_tri,
)
from rosettalens.similarity._tensor import ArrayLike, center, paired
from rosettalens.similarity.errors import BatchSizeError, DegenerateInputError

__all__ = [
    "MinibatchCKA",
    "RBF_MEDIANS",
    "linear_cka",
    "prepare_linear_cka",
    "prepare_rbf_cka",
    "rbf_cka",
]


# ----------------------------------------------------------------------------------------------
# CKA


def _check_debiased_rows(n: int, debiased: bool, what: str) -> None:
    if debiased and n < 4:
        raise BatchSizeError(
            f"{what} with debiased=True uses the unbiased HSIC estimator, which needs at least 4 rows; got {n}"
        )


def _use_gram(n: int, d1: int, d2: int) -> bool:
    """True when the ``[n, n]`` Gram path is cheaper than the feature-space path."""
    return n * (d1 + d2 + 3) < d1 * d2 + d1 * d1 + d2 * d2


def _debias(xty: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, n: int) -> torch.Tensor:
    """``n (n-3) x`` unbiased HSIC (Song et al. 2012) from feature-space terms of centred data.

    ``xty = ||Xc^T Yc||_F^2``; ``kx``, ``ky`` are the squared row norms of ``Xc``, ``Yc``.
    """
    return xty - n / (n - 2) * (kx @ ky) + kx.sum() * ky.sum() / ((n - 1) * (n - 2))


def _center_gram_(k: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Centre a symmetric Gram matrix ``[n, n]`` in place (double centring or U-centring)."""
    n = k.shape[0]
    if unbiased:
        k.fill_diagonal_(0.0)
        means = k.sum(dim=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        k.sub_(means[:, None]).sub_(means[None, :])
        k.fill_diagonal_(0.0)
    else:
        means = k.mean(dim=0)
        k.sub_(means[:, None]).sub_(means[None, :]).add_(means.mean())
    return k


def _cka_ratio(xy: torch.Tensor | float, xx: torch.Tensor | float, yy: torch.Tensor | float) -> float:
    xy, xx, yy = float(xy), float(xx), float(yy)
    if not (xx > 0 and yy > 0):
        which = "X" if not xx > 0 else "Y"
        raise DegenerateInputError(
            f"CKA is undefined: {which} has no (estimated) variance across rows; "
            "check for constant inputs or too few rows"
        )
    return xy / math.sqrt(xx * yy)


def _gram_dot(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    return torch.dot(k.reshape(-1), l.reshape(-1))


def linear_cka(X: ArrayLike, Y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) of ``X [n, d1]`` and ``Y [n, d2]``.

    Computed in feature space (``d x d`` products) when that is cheaper, else with ``[n, n]`` Gram
    matrices. ``debiased=True`` uses the unbiased HSIC estimator (needs ``n >= 4``); the result may be
    negative and is not clamped. Invariant to orthogonal transforms and isotropic scaling.
    """
    x, y = paired(X, Y, min_rows=2, what="linear_cka")
    _check_debiased_rows(x.shape[0], debiased, "linear_cka")
    return prepare_linear_cka(x, y, debiased)(None)


def prepare_linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> Prepared:
    """``fn(perm)`` -> the metric of ``(x, y[perm])`` (``perm`` a row permutation, None the identity) for
    ``x [n, d1]``, ``y [n, d2]`` (float64): the work that does not depend on the row order done once."""
    n, d1 = x.shape
    d2 = y.shape[1]
    _check_debiased_rows(n, debiased, "linear_cka")
    xc, yc = center(x), center(y)
    if _use_gram(n, d1, d2):
        k = _center_gram_(gram(xc), debiased)
        l = _center_gram_(gram(yc), debiased)  # noqa: E741
        xx, yy = _gram_dot(k, k), _gram_dot(l, l)

        def gram_fn(perm: torch.Tensor | None) -> float:
            lp = l if perm is None else l[perm][:, perm]
            return _cka_ratio(_gram_dot(k, lp), xx, yy)

        return gram_fn

    xx = torch.linalg.matrix_norm(gram_t(xc)) ** 2
    yy = torch.linalg.matrix_norm(gram_t(yc)) ** 2
    if debiased:  # squared row norms, needed only by the unbiased estimator
        kx, ky = (xc * xc).sum(1), (yc * yc).sum(1)
        xx, yy = _debias(xx, kx, kx, n), _debias(yy, ky, ky, n)

    def feature_fn(perm: torch.Tensor | None) -> float:
        yp = yc if perm is None else yc[perm]
        xy = torch.linalg.matrix_norm(xc.T @ yp) ** 2
        if debiased:
            xy = _debias(xy, kx, ky if perm is None else ky[perm], n)
        return _cka_ratio(xy, xx, yy)

    return feature_fn


RBF_MEDIANS = ("all", "pairs")


def _pair_order_stats_(d: torch.Tensor, ranks: list[int]) -> list[float]:
    """Order statistics (1-based ``ranks``) of the pairs ``i < j`` of a symmetric ``[n, n]`` matrix.

    ``d`` is left as it was.
    """
    n = d.shape[0]
    if d.device.type == "cpu":  # copy out the upper triangle, then an in-place numpy selection
        vals = upper_tri(d).numpy()  # a fresh copy
        vals.partition([r - 1 for r in ranks])
        return [float(vals[r - 1]) for r in ranks]
    diag = d.diagonal().clone()
    d.fill_diagonal_(-1.0)  # sorts below every distance: pair r sits at full ranks n+2r-1 and n+2r
    flat = d.reshape(-1)
    out = [float(torch.kthvalue(flat, n + 2 * r - 1).values) for r in ranks]
    d.diagonal().copy_(diag)
    return out


def _median_sq_dist_(d: torch.Tensor, median: str) -> float:
    """Median of the squared distances ``d [n, n]`` (symmetric, zero diagonal, entries >= 0).

    ``median="all"``: over all ``n^2`` entries, the ``n`` zeros of the diagonal included (Kornblith et
    al.'s ``np.median(sq_distances)``); ``"pairs"``: over the ``n (n - 1) / 2`` pairs ``i < j``.
    """
    n = d.shape[0]
    if median == "pairs":
        m = n * (n - 1) // 2
        ranks = [(m + 1) // 2] if m % 2 else [m // 2, m // 2 + 1]
        return float(np.mean(_pair_order_stats_(d, ranks)))
    # all n^2 entries sorted: n zeros, then every pair twice (pair rank r at full ranks n+2r-1, n+2r)
    big = n * n
    full = [(big + 1) // 2] if big % 2 else [big // 2, big // 2 + 1]
    pair_ranks = [(k - n + 1) // 2 for k in full if k > n]
    vals = [0.0] * (len(full) - len(pair_ranks)) + _pair_order_stats_(d, pair_ranks)
    return float(np.mean(vals))


def _rbf_gram(x: torch.Tensor, sigma: float, name: str, median: str = "all") -> torch.Tensor:
    g = sq_dists(center(x))
    med = _median_sq_dist_(g, median)
    if not med > 0:
        raise DegenerateInputError(
            f"rbf_cka: the median pairwise distance of {name} is 0 (most rows are identical); "
            "the RBF bandwidth is undefined"
        )
    return g.mul_(-1.0 / (2.0 * sigma * sigma * med)).exp_()


def rbf_cka(
    X: ArrayLike, Y: ArrayLike, sigma: float = 0.5, debiased: bool = False, median: str = "all"
) -> float:
    """RBF-kernel CKA (Kornblith et al. 2019) with the bandwidth of their reference code.

    The kernel is ``exp(-|x_i - x_j|^2 / (2 sigma^2 m))`` where ``m`` is the median squared distance:
    with ``median="all"`` (default) over all ``n^2`` entries of the distance matrix, diagonal zeros
    included, exactly as Kornblith et al.'s ``gram_rbf``; ``median="pairs"`` takes it over the pairs
    ``i < j`` only (a slightly wider bandwidth). ``X [n, d1]``, ``Y [n, d2]`` -> float.
    Builds two ``[n, n]`` float64 Gram matrices (``16 n^2`` bytes); use on up to ~10-20k rows.
    ``debiased=True`` uses the unbiased HSIC estimator (may be negative; never clamped).
    """
    x, y = paired(X, Y, min_rows=2, what="rbf_cka")
    return prepare_rbf_cka(x, y, sigma, debiased, median)(None)


def prepare_rbf_cka(
    x: torch.Tensor, y: torch.Tensor, sigma: float = 0.5, debiased: bool = False, median: str = "all"
) -> Prepared:
    """``fn(perm)`` -> the metric of ``(x, y[perm])`` (``perm`` a row permutation, None the identity) for
    ``x [n, d1]``, ``y [n, d2]`` (float64): the work that does not depend on the row order done once."""
    if not sigma > 0:
        raise ConfigError(f"rbf_cka: sigma must be > 0, got {sigma}")
    if median not in RBF_MEDIANS:
        raise ConfigError(f"rbf_cka: median must be one of {', '.join(RBF_MEDIANS)}; got {median!r}")
    _check_debiased_rows(x.shape[0], debiased, "rbf_cka")
    k = _center_gram_(_rbf_gram(x, sigma, "X", median), debiased)
    l = _center_gram_(_rbf_gram(y, sigma, "Y", median), debiased)  # noqa: E741
    xx, yy = _gram_dot(k, k), _gram_dot(l, l)

    def fn(perm: torch.Tensor | None) -> float:
        lp = l if perm is None else l[perm][:, perm]
        return _cka_ratio(_gram_dot(k, lp), xx, yy)

    return fn


class MinibatchCKA:
    """Linear CKA accumulated over minibatches with the unbiased HSIC estimator (Nguyen et al. 2021).

    ``CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b))``, where
    ``HSIC_1`` is the unbiased estimator of Song et al. (2012) on one batch. Each batch needs at least
    4 rows (a :class:`BatchSizeError` otherwise); use batches of a fixed size, ideally >= 64 rows.

    Example::

        mb = MinibatchCKA()
        for xb, yb in batches:          # xb [b, d1], yb [b, d2], rows paired
            mb.update(xb, yb)
        value = mb.compute()
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._xy = 0.0
        self._xx = 0.0
        self._yy = 0.0
        self._dims: tuple[int, int] | None = None
        self.n_batches = 0
        self.n_rows = 0

    def update(self, X: ArrayLike, Y: ArrayLike) -> None:
        """Add one batch ``X [b, d1]``, ``Y [b, d2]`` (b >= 4)."""
        x, y = paired(X, Y, min_rows=1, what="MinibatchCKA")
        b = x.shape[0]
        if b < 4:
            raise BatchSizeError(
                f"MinibatchCKA: a batch of {b} row(s) is too small for the unbiased HSIC estimator "
                "(needs >= 4 rows per batch; use batches of >= 64 rows and drop or merge a short last batch)"
            )
        dims = (x.shape[1], y.shape[1])
        if self._dims is not None and dims != self._dims:
            raise ShapeError(f"MinibatchCKA: batch widths {dims} differ from earlier batches {self._dims}")
        self._dims = dims
        xc, yc = center(x), center(y)
        kx, ky = (xc * xc).sum(1), (yc * yc).sum(1)
        scale = 1.0 / (b * (b - 3))
        if _use_gram(b, *dims):
            k = _center_gram_(gram(xc), True)
            l = _center_gram_(gram(yc), True)  # noqa: E741
            xy, xx, yy = _gram_dot(k, l), _gram_dot(k, k), _gram_dot(l, l)
        else:
            xy = _debias(torch.linalg.matrix_norm(xc.T @ yc) ** 2, kx, ky, b)
            xx = _debias(torch.linalg.matrix_norm(gram_t(xc)) ** 2, kx, kx, b)
            yy = _debias(torch.linalg.matrix_norm(gram_t(yc)) ** 2, ky, ky, b)
        self._xy += float(xy) * scale
        self._xx += float(xx) * scale
        self._yy += float(yy) * scale
        self.n_batches += 1
        self.n_rows += b

    def compute(self) -> float:
        """The minibatch CKA so far (may be negative; never clamped)."""
        if self.n_batches == 0:
            raise BatchSizeError("MinibatchCKA.compute() called before any update()")
        return _cka_ratio(self._xy, self._xx, self._yy)
