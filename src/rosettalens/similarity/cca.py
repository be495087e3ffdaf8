"""The CCA family: mean canonical correlation (``cca``), SVCCA and PWCCA, on principal bases of the
centred inputs (conventions: :mod:`rosettalens.similarity.metrics`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from rosettalens.errors import ConfigError
from rosettalens.similarity._linalg import (
    Prepared,
    eigh,
    gram,
    gram_t,
    one_thread,
    svd,
    svdvals,
    to_np,
)
from rosettalens.similarity._tensor import ArrayLike, center, paired
from rosettalens.similarity.errors import DegenerateInputError

__all__ = [
    "PWCCAResult",
    "SVCCAResult",
    "cca",
    "prepare_cca",
    "prepare_pwcca",
    "prepare_svcca",
    "pwcca",
    "svcca",
]


_EPS = float(np.finfo(np.float64).eps)


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
            g = gram_t(q)
            with one_thread(g):
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
    g = gram_t(xc) if feature_space else gram(xc)
    m = g.shape[0]
    tol = max(n, d) * _EPS * 10
    if keep_variance is not None:
        with one_thread(g):
            lam_all = torch.linalg.eigvalsh(g).flip(0)
        _check_variance(lam_all, name)
        lam_all = lam_all[lam_all > lam_all[0] * tol]
        k = _n_keep(lam_all, keep_variance)
        if k <= m // 3 and g.device.type == "cpu":
            import scipy.linalg

            lam, vecs = scipy.linalg.eigh(g.numpy(), subset_by_index=[m - k, m - 1], driver="evr")
            lam, vecs = torch.from_numpy(lam[::-1].copy()), torch.from_numpy(vecs[:, ::-1].copy())
            return _Spectrum(xc, lam, vecs, feature_space)
        lam, vecs = eigh(g)
        return _Spectrum(xc, lam.flip(0)[:k], vecs.flip(1)[:, :k], feature_space)
    lam, vecs = eigh(g)
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
    return to_np(svdvals(qx.T @ qy).clamp_(0.0, 1.0))


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
    rho = svdvals(qx.T @ qy).clamp_(0.0, 1.0)
    value = float(rho.mean())
    if return_details:
        return SVCCAResult(value, to_np(rho), qx.shape[1], qy.shape[1])
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
    u, rho, vh = svd(parts.qx.T @ qy)
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
        return PWCCAResult(value, to_np(weights), to_np(rho), side)
    return value


def prepare_cca(x: torch.Tensor, y: torch.Tensor) -> Prepared:
    """``fn(perm)`` -> the metric of ``(x, y[perm])`` (``perm`` a row permutation, None the identity) for
    ``x [n, d1]``, ``y [n, d2]`` (float64): the work that does not depend on the row order done once."""
    qx = _spectrum(center(x), "X").basis()
    qy = _spectrum(center(y), "Y").basis()
    _warn_overfit(qx.shape[1], qy.shape[1], x.shape[0])
    return lambda perm: float(svdvals(qx.T @ (qy if perm is None else qy[perm])).clamp_(0, 1).mean())


def prepare_svcca(x: torch.Tensor, y: torch.Tensor, keep_variance: float = 0.99) -> Prepared:
    """``fn(perm)`` -> the metric of ``(x, y[perm])`` (``perm`` a row permutation, None the identity) for
    ``x [n, d1]``, ``y [n, d2]`` (float64): the work that does not depend on the row order done once."""
    _check_keep(keep_variance)
    qx, qy = _svcca_bases(x, y, keep_variance)
    _warn_overfit(qx.shape[1], qy.shape[1], x.shape[0])
    return lambda perm: float(svdvals(qx.T @ (qy if perm is None else qy[perm])).clamp_(0, 1).mean())


def prepare_pwcca(x: torch.Tensor, y: torch.Tensor) -> Prepared:
    """``fn(perm)`` -> the metric of ``(x, y[perm])`` (``perm`` a row permutation, None the identity) for
    ``x [n, d1]``, ``y [n, d2]`` (float64): the work that does not depend on the row order done once."""
    parts = _PWCCAParts.build(x, y)
    return lambda perm: float(_pwcca_from(parts, perm, False))  # type: ignore[arg-type]
