"""Similarity metrics between two representations of the same rows.

Every metric takes ``X [n, d1]`` and ``Y [n, d2]`` whose row ``i`` describes the same token (or
stimulus) in both spaces. Inputs may be numpy arrays or torch tensors on any device; all arithmetic
is done in float64 with torch on the device of ``X``. Rows containing NaN/inf raise
:class:`~rosettalens.similarity.errors.NonFiniteError`.

Conventions (stated once, here):

* CCA-family metrics centre each column. Directions whose variance is below ``1e-11 x`` the largest
  (times ``max(n, d)``) are numerically null and dropped.
* ``svcca`` keeps, per input, the fewest principal directions whose squared singular values reach
  ``keep_variance`` of the total, then averages the canonical correlations.
* ``pwcca`` weights the canonical correlations by how much of the *smaller* input (fewer directions)
  each canonical variate accounts for (Morcos et al. 2018), using centred activations.
* CKA bandwidth for the RBF kernel is ``sigma x`` the median distance, as Kornblith et al.'s code:
  the median over all ``n^2`` squared distances (diagonal zeros included), then square-rooted
  (``median="pairs"`` takes pairs i<j only). Debiased CKA uses the unbiased HSIC estimator of Song et
  al. (2012); it may be negative and is never clamped.
* RSA compares the upper triangles (i < j) of the two representational dissimilarity matrices.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from rosettalens.errors import ConfigError, ShapeError
from rosettalens.similarity._tensor import ArrayLike, center, paired
from rosettalens.similarity.errors import BatchSizeError, DegenerateInputError

__all__ = [
    "cca",
    "svcca",
    "pwcca",
    "linear_cka",
    "rbf_cka",
    "MinibatchCKA",
    "rsa",
    "rdm",
    "procrustes",
    "mutual_knn",
    "jaccard_knn",
    "SVCCAResult",
    "PWCCAResult",
    "ProcrustesResult",
]

# A function of a row permutation (None = identity) returning the metric of (X, Y[perm]).
Prepared = Callable[[torch.Tensor | None], float]

_EPS = float(np.finfo(np.float64).eps)


@contextmanager
def _one_thread(t: torch.Tensor) -> Iterator[None]:
    """Dense LAPACK (eigh/SVD/Cholesky) on CPU in one thread.

    At the sizes used here (``d x d`` with d up to a few thousand) threaded MKL LAPACK gains little, and
    when cores are shared it can stall for seconds (measured: eigh of a 576 x 576 matrix 4.9 s with 2
    threads on a loaded 2-core machine vs 0.24 s with 1). Matmuls keep all threads.
    """
    if t.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _one_thread(a):
        return torch.linalg.eigh(a)


def _svdvals(a: torch.Tensor) -> torch.Tensor:
    with _one_thread(a):
        return torch.linalg.svdvals(a)


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _one_thread(a):
        return torch.linalg.svd(a, full_matrices=False)


def _gram_t(a: torch.Tensor) -> torch.Tensor:
    """``a^T a`` for ``a [n, d]`` -> ``[d, d]``; on CPU through numpy, whose BLAS call is SYRK (half the work)."""
    if a.device.type == "cpu":
        an = a.numpy()
        return torch.from_numpy(an.T @ an)
    return a.T @ a


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``a a^T`` for ``a [n, d]`` -> ``[n, n]`` (SYRK through numpy on CPU)."""
    if a.device.type == "cpu":
        an = a.numpy()
        return torch.from_numpy(an @ an.T)
    return a @ a.T


# ----------------------------------------------------------------------------------------------
# principal bases (shared by CCA, SVCCA, PWCCA)


@dataclass
class _Spectrum:
    """Eigen-decomposition of the smaller Gram matrix of a centred ``xc [n, d]``."""

    xc: torch.Tensor
    lam: torch.Tensor  # [r] squared singular values, descending, numerically non-zero only
    vecs: torch.Tensor  # [d, r] right singular vectors (feature_space) or [n, r] left ones
    feature_space: bool

    def basis(self, k: int | None = None) -> torch.Tensor:
        """Orthonormal ``[n, k]`` basis of the top-``k`` principal directions (all when None)."""
        k = self.lam.numel() if k is None else k
        lam, vecs = self.lam[:k], self.vecs[:, :k]
        if not self.feature_space:
            return vecs
        q = self.xc @ (vecs / lam.sqrt())
        # Q^T Q = I up to ~eps * lam_max / lam_min; past 1e6 one Cholesky-QR pass restores orthonormality
        if float(lam[0] / lam[-1]) > 1e6:
            g = _gram_t(q)
            with _one_thread(g):
                chol = torch.linalg.cholesky(g)
            q = torch.linalg.solve_triangular(chol.T, q, upper=True, left=False)
        return q


def _spectrum(xc: torch.Tensor, name: str, keep_variance: float | None = None) -> _Spectrum:
    """Principal directions of a centred ``xc [n, d]`` from the smaller Gram matrix.

    With ``keep_variance`` only the directions SVCCA keeps are returned (their count is found from all
    eigenvalues; when few are kept, only their eigenvectors are computed).
    """
    n, d = xc.shape
    feature_space = d <= n
    gram = _gram_t(xc) if feature_space else _gram(xc)
    m = gram.shape[0]
    tol = max(n, d) * _EPS * 10
    if keep_variance is not None:
        with _one_thread(gram):
            lam_all = torch.linalg.eigvalsh(gram).flip(0)
        _check_variance(lam_all, name)
        lam_all = lam_all[lam_all > lam_all[0] * tol]
        k = _n_keep(lam_all, keep_variance)
        if k <= m // 3 and gram.device.type == "cpu":
            import scipy.linalg

            lam, vecs = scipy.linalg.eigh(gram.numpy(), subset_by_index=[m - k, m - 1], driver="evr")
            lam, vecs = torch.from_numpy(lam[::-1].copy()), torch.from_numpy(vecs[:, ::-1].copy())
            return _Spectrum(xc, lam, vecs, feature_space)
        lam, vecs = _eigh(gram)
        return _Spectrum(xc, lam.flip(0)[:k], vecs.flip(1)[:, :k], feature_space)
    lam, vecs = _eigh(gram)
    lam, vecs = lam.flip(0), vecs.flip(1)
    _check_variance(lam, name)
    keep = lam > lam[0] * tol
    return _Spectrum(xc, lam[keep], vecs[:, keep], feature_space)


def _check_variance(lam: torch.Tensor, name: str) -> None:
    if float(lam[0]) <= 0:
        raise DegenerateInputError(
            f"{name} has zero variance (every row is the same); the metric is undefined"
        )


def _n_keep(lam: torch.Tensor, keep_variance: float) -> int:
    frac = torch.cumsum(lam, 0) / lam.sum()
    k = int((frac < keep_variance * (1 - 1e-12)).sum()) + 1
    return min(k, lam.numel())


def _warn_overfit(rx: int, ry: int, n: int) -> None:
    if rx + ry > n - 1:
        warnings.warn(
            f"CCA on {n} rows with {rx} + {ry} directions: canonical correlations are trivially 1 "
            "when the directions outnumber the rows; use more rows or fewer directions (svcca)",
            RuntimeWarning,
            stacklevel=3,
        )


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# CCA family


def cca(X: ArrayLike, Y: ArrayLike) -> np.ndarray:
    """All canonical correlations of ``X [n, d1]`` and ``Y [n, d2]``, descending.

    Returns a float64 array of length ``min(rank X, rank Y)`` with values in ``[0, 1]``.
    Invariant to invertible linear maps of either input.
    """
    x, y = paired(X, Y, min_rows=2, what="cca")
    qx = _spectrum(center(x), "X").basis()
    qy = _spectrum(center(y), "Y").basis()
    _warn_overfit(qx.shape[1], qy.shape[1], x.shape[0])
    return _to_np(_svdvals(qx.T @ qy).clamp_(0.0, 1.0))


@dataclass(frozen=True)
class SVCCAResult:
    """SVCCA value with its ingredients."""

    value: float  # mean canonical correlation of the reduced inputs
    correlations: np.ndarray = field(repr=False)  # [min(dims_x, dims_y)] descending
    dims_x: int  # principal directions kept for X
    dims_y: int  # principal directions kept for Y


def _check_keep(keep_variance: float) -> None:
    if not 0.0 < keep_variance <= 1.0:
        raise ConfigError(f"keep_variance must be in (0, 1], got {keep_variance}")


def svcca(
    X: ArrayLike, Y: ArrayLike, keep_variance: float = 0.99, return_details: bool = False
) -> float | SVCCAResult:
    """SVCCA (Raghu et al. 2017): SVD-reduce each centred input, then mean canonical correlation.

    Keeps, per input, the fewest principal directions whose squared singular values reach
    ``keep_variance`` of the total (relative to the total, so the scale of the data does not matter).
    ``X [n, d1]``, ``Y [n, d2]`` -> float in ``[0, 1]`` (an :class:`SVCCAResult` if ``return_details``).
    """
    _check_keep(keep_variance)
    x, y = paired(X, Y, min_rows=2, what="svcca")
    qx, qy = _svcca_bases(x, y, keep_variance)
    _warn_overfit(qx.shape[1], qy.shape[1], x.shape[0])
    rho = _svdvals(qx.T @ qy).clamp_(0.0, 1.0)
    value = float(rho.mean())
    if return_details:
        return SVCCAResult(value, _to_np(rho), qx.shape[1], qy.shape[1])
    return value


def _svcca_bases(x: torch.Tensor, y: torch.Tensor, keep_variance: float) -> tuple[torch.Tensor, torch.Tensor]:
    sx, sy = _spectrum(center(x), "X", keep_variance), _spectrum(center(y), "Y", keep_variance)
    return sx.basis(), sy.basis()


@dataclass(frozen=True)
class PWCCAResult:
    """PWCCA value with its weights and canonical correlations."""

    value: float
    weights: np.ndarray = field(repr=False)  # [r] non-negative, sum to 1
    correlations: np.ndarray = field(repr=False)  # [r] descending
    weighted_side: str  # "X" or "Y": the input with fewer directions, whose variates were weighted


def pwcca(X: ArrayLike, Y: ArrayLike, return_details: bool = False) -> float | PWCCAResult:
    """Projection-weighted CCA (Morcos et al. 2018); either input may be the wider one.

    The canonical variates ``h_i`` of the input with fewer directions get weight
    ``sum_j |<h_i, z_j>|`` over that input's centred neurons ``z_j``; the result is the weighted mean
    canonical correlation. ``X [n, d1]``, ``Y [n, d2]`` -> float in ``[0, 1]``.
    """
    x, y = paired(X, Y, min_rows=2, what="pwcca")
    return _pwcca_from(_PWCCAParts.build(x, y), None, return_details)


@dataclass
class _PWCCAParts:
    qx: torch.Tensor
    qy: torch.Tensor
    px: torch.Tensor  # qx^T xc [rx, d1]
    py: torch.Tensor  # qy^T yc [ry, d2]

    @classmethod
    def build(cls, x: torch.Tensor, y: torch.Tensor) -> _PWCCAParts:
        xc, yc = center(x), center(y)
        qx, qy = _spectrum(xc, "X").basis(), _spectrum(yc, "Y").basis()
        _warn_overfit(qx.shape[1], qy.shape[1], x.shape[0])
        return cls(qx, qy, qx.T @ xc, qy.T @ yc)


def _pwcca_from(parts: _PWCCAParts, perm: torch.Tensor | None, details: bool) -> float | PWCCAResult:
    qy = parts.qy if perm is None else parts.qy[perm]
    u, rho, vh = _svd(parts.qx.T @ qy)
    rho = rho.clamp(0.0, 1.0)
    r = rho.numel()
    if parts.qx.shape[1] <= parts.qy.shape[1]:
        side, loadings = "X", u[:, :r].T @ parts.px  # canonical variates of X against X's neurons
    else:
        side, loadings = "Y", vh[:r] @ parts.py  # (row permutation of Y leaves this unchanged)
    alpha = loadings.abs().sum(dim=1)
    weights = alpha / alpha.sum()
    value = float((weights * rho).sum())
    if details:
        return PWCCAResult(value, _to_np(weights), _to_np(rho), side)
    return value


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
    return _prep_linear_cka(x, y, debiased)(None)


def _prep_linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> Prepared:
    n, d1 = x.shape
    d2 = y.shape[1]
    _check_debiased_rows(n, debiased, "linear_cka")
    xc, yc = center(x), center(y)
    if _use_gram(n, d1, d2):
        k = _center_gram_(_gram(xc), debiased)
        l = _center_gram_(_gram(yc), debiased)  # noqa: E741
        xx, yy = _gram_dot(k, k), _gram_dot(l, l)

        def gram_fn(perm: torch.Tensor | None) -> float:
            lp = l if perm is None else l[perm][:, perm]
            return _cka_ratio(_gram_dot(k, lp), xx, yy)

        return gram_fn

    xx = torch.linalg.matrix_norm(_gram_t(xc)) ** 2
    yy = torch.linalg.matrix_norm(_gram_t(yc)) ** 2
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
        vals = _upper_tri(d).numpy()  # a fresh copy
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


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``x [n, d]`` -> ``[n, n]`` (zero diagonal)."""
    g = _gram(x)
    sq = g.diagonal().clone()
    g.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0.0)
    g.fill_diagonal_(0.0)
    return g


def _rbf_gram(x: torch.Tensor, sigma: float, name: str, median: str = "all") -> torch.Tensor:
    g = _sq_dists(center(x))
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
    return _prep_rbf_cka(x, y, sigma, debiased, median)(None)


def _prep_rbf_cka(
    x: torch.Tensor, y: torch.Tensor, sigma: float = 0.5, debiased: bool = False, median: str = "all"
) -> Prepared:
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
            k = _center_gram_(_gram(xc), True)
            l = _center_gram_(_gram(yc), True)  # noqa: E741
            xy, xx, yy = _gram_dot(k, l), _gram_dot(k, k), _gram_dot(l, l)
        else:
            xy = _debias(torch.linalg.matrix_norm(xc.T @ yc) ** 2, kx, ky, b)
            xx = _debias(torch.linalg.matrix_norm(_gram_t(xc)) ** 2, kx, kx, b)
            yy = _debias(torch.linalg.matrix_norm(_gram_t(yc)) ** 2, ky, ky, b)
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


# ----------------------------------------------------------------------------------------------
# RSA

_INNER = ("correlation", "cosine", "euclidean", "sqeuclidean")
_OUTER = ("spearman", "pearson", "kendall")


def _unit_rows(z: torch.Tensor, name: str, what: str) -> torch.Tensor:
    norms = z.norm(dim=1, keepdim=True)
    zero = (norms[:, 0] == 0).nonzero().flatten()
    if zero.numel():
        first = ", ".join(str(int(i)) for i in zero[:5])
        raise DegenerateInputError(
            f"{what} distance is undefined for rows of {name} with zero {'variance' if what == 'correlation' else 'norm'} (rows {first})"
        )
    return z / norms


def _rdm_full(x: torch.Tensor, inner: str, name: str = "X") -> torch.Tensor:
    """Representational dissimilarity matrix ``[n, n]`` of the rows of ``x [n, d]``.

    Duplicated rows (e.g. BOS tokens) get exactly equal dissimilarities (and exactly 0 between them), so
    that rank-based comparisons see the ties that a pairwise formula would see.
    """
    uniq, inverse = torch.unique(x, dim=0, return_inverse=True)
    if uniq.shape[0] < x.shape[0]:
        return _rdm_full(uniq, inner, name)[inverse][:, inverse]
    if inner == "correlation":
        z = _unit_rows(x - x.mean(dim=1, keepdim=True), name, "correlation")
        d = _gram(z).neg_().add_(1.0)
    elif inner == "cosine":
        z = _unit_rows(x, name, "cosine")
        d = _gram(z).neg_().add_(1.0)
    elif inner == "sqeuclidean":
        d = _sq_dists(center(x))
    elif inner == "euclidean":
        d = _sq_dists(center(x)).sqrt_()
    else:
        raise ConfigError(f"rsa: unknown inner={inner!r}; choose one of {', '.join(_INNER)}")
    d.fill_diagonal_(0.0)
    return d


def rdm(X: ArrayLike, inner: str = "correlation") -> np.ndarray:
    """Representational dissimilarity matrix of ``X [n, d]`` -> ``[n, n]`` float64 numpy array.

    ``inner``: ``"correlation"`` (1 - Pearson r between rows), ``"cosine"``, ``"euclidean"``,
    ``"sqeuclidean"``.
    """
    from rosettalens.similarity._tensor import as_f64

    return _to_np(_rdm_full(as_f64(X, "X"), inner))


def _upper_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def _upper_tri(d: torch.Tensor) -> torch.Tensor:
    """Entries above the diagonal of a square ``d``, row by row (the order of ``d[triu(1) mask]``).

    On CPU row slices are copied (no ``[n, n]`` boolean mask): 0.2 s instead of 2.6 s at n = 10,000.
    """
    n = d.shape[0]
    if d.device.type != "cpu":
        return d[_upper_mask(n, d.device)]
    dn = d.numpy()
    out = np.empty(n * (n - 1) // 2, dtype=dn.dtype)
    for i, start, stop in _tri_rows(n):
        out[start:stop] = dn[i, i + 1 :]
    return torch.from_numpy(out)


def _tri_rows(n: int) -> Iterator[tuple[int, int, int]]:
    """``(row, start, stop)``: where row ``i``'s entries above the diagonal sit in the upper-triangle vector."""
    start = 0
    for i in range(n - 1):
        yield i, start, start + n - 1 - i
        start += n - 1 - i


def _symmetric_from_upper(v: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric ``[n, n]`` matrix (zero diagonal) whose upper triangle is ``v`` (as _upper_tri)."""
    if v.device.type != "cpu":
        f = torch.zeros(n, n, dtype=v.dtype, device=v.device)
        f[_upper_mask(n, v.device)] = v
        return f + f.T
    vn = v.numpy()
    fn = np.zeros((n, n), dtype=vn.dtype)
    for i, start, stop in _tri_rows(n):
        fn[i, i + 1 :] = vn[start:stop]
    fn += fn.T
    return torch.from_numpy(fn)


def _argsort_packed(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An ascending argsort of float64 ``a`` through one sort of uint64 keys, and where ties start.

    Returns ``(idx, starts)``: ``a[idx]`` is ascending (ties in any order) and ``starts[i]`` is True
    where ``a[idx[i]]`` differs from ``a[idx[i - 1]]``. Each key packs a monotone quantisation of the
    value (high bits) with the element's index (low bits), so a plain vectorised ``sort`` replaces the
    slower ``argsort`` (11.3 s -> ~5 s for 50M values on one core). Values that quantise equally come
    out in index order; only those groups are then ordered by (and compared on) their exact values.
    """
    m = a.size
    kbits = max(1, (m - 1).bit_length())
    vbits = min(52, 64 - kbits)  # 2**vbits - 1 must be exact in float64
    lo, hi = float(a.min()), float(a.max())
    top = float(2**vbits - 1)
    scale = top / (hi - lo) if hi > lo else 0.0
    if vbits < 20 or not np.isfinite(scale) or scale <= 0:
        idx = np.argsort(a)
        srt = a[idx]
        starts = np.empty(m, dtype=bool)
        starts[0] = True
        np.not_equal(srt[1:], srt[:-1], out=starts[1:])
        return idx, starts
    q = a - lo
    q *= scale  # monotone non-decreasing in a (so is every rounding step)
    np.minimum(q, top, out=q)
    key = q.astype(np.uint64)
    del q
    key <<= np.uint64(kbits)
    key |= np.arange(m, dtype=np.uint64)
    key.sort()
    quant = key >> np.uint64(kbits)  # the quantised values, ascending
    key &= np.uint64((1 << kbits) - 1)
    idx = key.view(np.int64)  # the indices (< 2**63): no copy
    same = quant[1:] == quant[:-1]
    starts = np.ones(m, dtype=bool)
    np.logical_not(same, out=starts[1:])
    if same.any():  # order each group of equal quantised values by the exact values
        member = np.zeros(m, dtype=bool)
        member[:-1] |= same
        member[1:] |= same
        pos = np.flatnonzero(member)
        sub = idx[pos]
        idx[pos] = sub[np.lexsort((a[sub], quant[pos]))]
        nxt = np.flatnonzero(same) + 1  # within a group, a new value starts where the exact value changes
        starts[nxt] = a[idx[nxt]] != a[idx[nxt - 1]]
    return idx, starts


def _rank_average(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``v [m]`` with ties given their average rank (as scipy.stats.rankdata)."""
    if v.device.type == "cpu":  # numpy's vectorised sort beats torch.sort on one CPU core (~2x measured)
        a = v.numpy()
        idx, starts = _argsort_packed(a)
        by_pos = np.arange(1, a.size + 1, dtype=np.float64)  # rank of sorted position p (0-based): p + 1
        cont = np.flatnonzero(~starts)  # positions that continue a tie group (few, even on 50M floats)
        if cont.size:  # a tie group starting at sorted position p with c members gets rank p + (c + 1) / 2
            members = np.union1d(cont - 1, cont)
            group = np.cumsum(starts[members]) - 1  # members of one group are consecutive positions
            first = members[starts[members]]
            counts = np.bincount(group)
            by_pos[members] = (first + (counts + 1) / 2.0)[group]
        ranks_np = np.empty(a.size, dtype=np.float64)
        ranks_np[idx] = by_pos
        return torch.from_numpy(ranks_np)
    vals, order = torch.sort(v)
    ranks = torch.empty_like(v)
    if not bool((vals[1:] == vals[:-1]).any()):
        ranks[order] = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
        return ranks
    _, inverse, sizes = torch.unique_consecutive(vals, return_inverse=True, return_counts=True)
    avg = torch.cumsum(sizes, 0).to(v.dtype) - (sizes.to(v.dtype) - 1) / 2
    ranks[order] = avg[inverse]
    return ranks


def _centered_unit(v: torch.Tensor, name: str) -> torch.Tensor:
    v = v - v.mean()
    nrm = v.norm()
    if not float(nrm) > 0:
        raise DegenerateInputError(
            f"rsa: every dissimilarity of {name} is equal; the correlation is undefined"
        )
    return v / nrm


def rsa(X: ArrayLike, Y: ArrayLike, inner: str = "correlation", outer: str = "spearman") -> float:
    """Representational similarity analysis of ``X [n, d1]`` and ``Y [n, d2]``.

    Builds each input's dissimilarity matrix (``inner``: see :func:`rdm`) and correlates their upper
    triangles (``outer``: ``"spearman"`` with average ranks for ties, ``"pearson"`` or ``"kendall"``
    tau-b; kendall runs through scipy and is slow beyond ~2,000 rows). Memory: a few ``[n, n]`` float64.
    """
    x, y = paired(X, Y, min_rows=3, what="rsa")
    return _prep_rsa(x, y, inner, outer)(None)


def _prep_rsa(
    x: torch.Tensor, y: torch.Tensor, inner: str = "correlation", outer: str = "spearman"
) -> Prepared:
    if inner not in _INNER:
        raise ConfigError(f"rsa: unknown inner={inner!r}; choose one of {', '.join(_INNER)}")
    if outer not in _OUTER:
        raise ConfigError(f"rsa: unknown outer={outer!r}; choose one of {', '.join(_OUTER)}")
    n = x.shape[0]
    a = _upper_tri(_rdm_full(x, inner, "X"))
    b = _upper_tri(_rdm_full(y, inner, "Y"))
    if outer == "kendall":
        from scipy.stats import kendalltau

        a_np, b_tri = _to_np(a), b
        bfull = _symmetric_from_upper(b, n)

        def kendall_fn(perm: torch.Tensor | None) -> float:
            bp = b_tri if perm is None else _upper_tri(bfull[perm][:, perm])
            return float(kendalltau(a_np, _to_np(bp)).statistic)

        return kendall_fn
    if outer == "spearman":
        a, b = _rank_average(a), _rank_average(b)
    ua = _centered_unit(a, "X")
    ub = _centered_unit(b, "Y")
    del a, b

    full: list[torch.Tensor] = []  # Y's symmetric [n, n] (rank) matrix, built on the first permutation

    def fn(perm: torch.Tensor | None) -> float:
        if perm is None:
            return float(torch.dot(ua, ub))
        if not full:
            full.append(_symmetric_from_upper(ub, n))
        # permuting the rows of Y permutes its RDM's rows and columns; ranks move with the entries
        return float(torch.dot(ua, _upper_tri(full[0][perm][:, perm])))

    return fn


# ----------------------------------------------------------------------------------------------
# Procrustes


@dataclass(frozen=True)
class ProcrustesResult:
    """Orthogonal Procrustes comparison of centred, unit-Frobenius-norm inputs.

    ``similarity = ||X^T Y||_*`` (nuclear norm) is ``cos`` of the angular distance; 1 iff the inputs
    are equal up to rotation, translation and scale. ``distance = sqrt(2 - 2 similarity)`` is the
    residual of the best rotation (Ding et al. 2021; Williams et al. 2021).
    """

    distance: float
    angular_distance: float  # radians, in [0, pi/2]
    similarity: float

    @property
    def value(self) -> float:
        return self.similarity


def _row_space_factor(xc: torch.Tensor) -> torch.Tensor:
    """``F [n, r]`` with ``F F^T = xc xc^T``: ``xc`` itself when narrow, else ``U sqrt(lam)``."""
    n, d = xc.shape
    if d <= n:
        return xc
    lam, u = _eigh(_gram(xc))
    keep = lam > 0
    return u[:, keep] * lam[keep].sqrt()


def procrustes(X: ArrayLike, Y: ArrayLike) -> ProcrustesResult:
    """Orthogonal Procrustes distance and angular similarity of ``X [n, d1]`` and ``Y [n, d2]``.

    Both inputs are centred and scaled to unit Frobenius norm; unequal widths are zero-padded (which
    leaves ``||X^T Y||_*`` unchanged, so no padding is materialised). Not invariant to general
    (non-orthogonal) linear maps.
    """
    x, y = paired(X, Y, min_rows=2, what="procrustes")
    return _procrustes_from(*_prep_procrustes_parts(x, y), None)


def _prep_procrustes_parts(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for t, name in ((x, "X"), (y, "Y")):
        tc = center(t)
        nrm = torch.linalg.matrix_norm(tc)
        if not float(nrm) > 0:
            raise DegenerateInputError(f"procrustes: {name} has zero variance; the metric is undefined")
        out.append(_row_space_factor(tc / nrm))
    return out[0], out[1]


def _procrustes_from(fx: torch.Tensor, fy: torch.Tensor, perm: torch.Tensor | None) -> ProcrustesResult:
    fyp = fy if perm is None else fy[perm]
    nuc = float(_svdvals(fx.T @ fyp).sum())
    nuc_c = min(max(nuc, 0.0), 1.0)  # rounding only: the nuclear norm of unit-norm inputs is <= 1
    return ProcrustesResult(math.sqrt(max(2.0 - 2.0 * nuc_c, 0.0)), math.acos(nuc_c), nuc_c)


def _prep_procrustes(x: torch.Tensor, y: torch.Tensor) -> Prepared:
    fx, fy = _prep_procrustes_parts(x, y)
    return lambda perm: _procrustes_from(fx, fy, perm).similarity


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


def _prep_knn(
    x: torch.Tensor, y: torch.Tensor, k: int = 10, metric: str = "cosine", jaccard: bool = False
) -> Prepared:
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


# ----------------------------------------------------------------------------------------------
# prepared (permutation-friendly) forms, keyed by metric name


def _prep_cca(x: torch.Tensor, y: torch.Tensor) -> Prepared:
    qx = _spectrum(center(x), "X").basis()
    qy = _spectrum(center(y), "Y").basis()
    _warn_overfit(qx.shape[1], qy.shape[1], x.shape[0])
    return lambda perm: float(_svdvals(qx.T @ (qy if perm is None else qy[perm])).clamp_(0, 1).mean())


def _prep_svcca(x: torch.Tensor, y: torch.Tensor, keep_variance: float = 0.99) -> Prepared:
    _check_keep(keep_variance)
    qx, qy = _svcca_bases(x, y, keep_variance)
    _warn_overfit(qx.shape[1], qy.shape[1], x.shape[0])
    return lambda perm: float(_svdvals(qx.T @ (qy if perm is None else qy[perm])).clamp_(0, 1).mean())


def _prep_pwcca(x: torch.Tensor, y: torch.Tensor) -> Prepared:
    parts = _PWCCAParts.build(x, y)
    return lambda perm: float(_pwcca_from(parts, perm, False))  # type: ignore[arg-type]


# name -> (public function, prepare(x, y, **kwargs), minimum rows)
PREPARED: dict[str, tuple[Callable[..., object], Callable[..., Prepared], int]] = {
    "cca": (cca, _prep_cca, 2),
    "svcca": (svcca, _prep_svcca, 2),
    "pwcca": (pwcca, _prep_pwcca, 2),
    "linear_cka": (linear_cka, _prep_linear_cka, 2),
    "rbf_cka": (rbf_cka, _prep_rbf_cka, 2),
    "rsa": (rsa, _prep_rsa, 3),
    "procrustes": (procrustes, _prep_procrustes, 2),
    "mutual_knn": (mutual_knn, _prep_knn, 2),
    "jaccard_knn": (jaccard_knn, lambda x, y, **kw: _prep_knn(x, y, jaccard=True, **kw), 2),
}
