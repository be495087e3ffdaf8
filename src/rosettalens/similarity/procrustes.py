"""Orthogonal Procrustes similarity of two centred, normalised representations."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rosettalens.similarity._linalg import (
    Prepared,
    eigh,
    gram,
    svdvals,
)
from rosettalens.similarity._tensor import ArrayLike, center, paired
from rosettalens.similarity.errors import DegenerateInputError

__all__ = [
    "ProcrustesResult",
    "prepare_procrustes",
    "procrustes",
]


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
    lam, u = eigh(gram(xc))
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
    nuc = float(svdvals(fx.T @ fyp).sum())
    nuc_c = min(max(nuc, 0.0), 1.0)  # rounding only: the nuclear norm of unit-norm inputs is <= 1
    return ProcrustesResult(math.sqrt(max(2.0 - 2.0 * nuc_c, 0.0)), math.acos(nuc_c), nuc_c)


def prepare_procrustes(x: torch.Tensor, y: torch.Tensor) -> Prepared:
    """``fn(perm)`` -> the metric of ``(x, y[perm])`` (``perm`` a row permutation, None the identity) for
    ``x [n, d1]``, ``y [n, d2]`` (float64): the work that does not depend on the row order done once."""
    fx, fy = _prep_procrustes_parts(x, y)
    return lambda perm: _procrustes_from(fx, fy, perm).similarity
