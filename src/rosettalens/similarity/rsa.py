"""Representational similarity analysis: dissimilarity matrices (``rdm``) compared by a rank or linear
correlation of their upper triangles (``rsa``)."""

from __future__ import annotations

import numpy as np
import torch

from rosettalens.errors import ConfigError
from rosettalens.similarity._linalg import (
    Prepared,
    gram,
    sq_dists,
    symmetric_from_upper,
    to_np,
    upper_tri,
)
from rosettalens.similarity._tensor import ArrayLike, center, paired
from rosettalens.similarity.errors import DegenerateInputError

__all__ = [
    "prepare_rsa",
    "rank_average",
    "rdm",
    "rsa",
]


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
        d = gram(z).neg_().add_(1.0)
    elif inner == "cosine":
        z = _unit_rows(x, name, "cosine")
        d = gram(z).neg_().add_(1.0)
    elif inner == "sqeuclidean":
        d = sq_dists(center(x))
    elif inner == "euclidean":
        d = sq_dists(center(x)).sqrt_()
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

    return to_np(_rdm_full(as_f64(X, "X"), inner))


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


def rank_average(v: torch.Tensor) -> torch.Tensor:
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
    return prepare_rsa(x, y, inner, outer)(None)


def prepare_rsa(
    x: torch.Tensor, y: torch.Tensor, inner: str = "correlation", outer: str = "spearman"
) -> Prepared:
    """``fn(perm)`` -> the metric of ``(x, y[perm])`` (``perm`` a row permutation, None the identity) for
    ``x [n, d1]``, ``y [n, d2]`` (float64): the work that does not depend on the row order done once."""
    if inner not in _INNER:
        raise ConfigError(f"rsa: unknown inner={inner!r}; choose one of {', '.join(_INNER)}")
    if outer not in _OUTER:
        raise ConfigError(f"rsa: unknown outer={outer!r}; choose one of {', '.join(_OUTER)}")
    n = x.shape[0]
    a = upper_tri(_rdm_full(x, inner, "X"))
    b = upper_tri(_rdm_full(y, inner, "Y"))
    if outer == "kendall":
        from scipy.stats import kendalltau

        a_np, b_tri = to_np(a), b
        bfull = symmetric_from_upper(b, n)

        def kendall_fn(perm: torch.Tensor | None) -> float:
            bp = b_tri if perm is None else upper_tri(bfull[perm][:, perm])
            return float(kendalltau(a_np, to_np(bp)).statistic)

        return kendall_fn
    if outer == "spearman":
        a, b = rank_average(a), rank_average(b)
    ua = _centered_unit(a, "X")
    ub = _centered_unit(b, "Y")
    del a, b

    full: list[torch.Tensor] = []  # Y's symmetric [n, n] (rank) matrix, built on the first permutation

    def fn(perm: torch.Tensor | None) -> float:
        if perm is None:
            return float(torch.dot(ua, ub))
        if not full:
            full.append(symmetric_from_upper(ub, n))
        # permuting the rows of Y permutes its RDM's rows and columns; ranks move with the entries
        return float(torch.dot(ua, upper_tri(full[0][perm][:, perm])))

    return fn
