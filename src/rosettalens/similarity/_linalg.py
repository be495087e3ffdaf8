"""Numerical helpers shared by the similarity metrics: one-thread LAPACK on a CPU, Gram matrices through
SYRK, squared distances and the packed upper triangle of a symmetric matrix (all float64 tensors)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = [
    "Prepared",
    "eigh",
    "gram",
    "gram_t",
    "one_thread",
    "sq_dists",
    "svd",
    "svdvals",
    "symmetric_from_upper",
    "to_np",
    "tri_rows",
    "upper_mask",
    "upper_tri",
]

#: A function of a row permutation (None = identity) returning the metric of (X, Y[perm]).
Prepared = Callable[[torch.Tensor | None], float]


@contextmanager
def one_thread(t: torch.Tensor) -> Iterator[None]:
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


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a symmetric ``a [d, d]`` (ascending eigenvalues), one LAPACK thread on CPU."""
    with one_thread(a):
        return torch.linalg.eigh(a)


def svdvals(a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``a`` (descending), one LAPACK thread on CPU."""
    with one_thread(a):
        return torch.linalg.svdvals(a)


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``a``, one LAPACK thread on CPU."""
    with one_thread(a):
        return torch.linalg.svd(a, full_matrices=False)


def gram_t(a: torch.Tensor) -> torch.Tensor:
    """``a^T a`` for ``a [n, d]`` -> ``[d, d]``; on CPU through numpy, whose BLAS call is SYRK (half the work)."""
    if a.device.type == "cpu":
        an = a.numpy()
        return torch.from_numpy(an.T @ an)
    return a.T @ a


def gram(a: torch.Tensor) -> torch.Tensor:
    """``a a^T`` for ``a [n, d]`` -> ``[n, n]`` (SYRK through numpy on CPU)."""
    if a.device.type == "cpu":
        an = a.numpy()
        return torch.from_numpy(an @ an.T)
    return a @ a.T


def to_np(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array on the CPU (detached)."""
    return t.detach().cpu().numpy()


def sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``x [n, d]`` -> ``[n, n]`` (zero diagonal)."""
    g = gram(x)
    sq = g.diagonal().clone()
    g.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0.0)
    g.fill_diagonal_(0.0)
    return g


def upper_mask(n: int, device: torch.device) -> torch.Tensor:
    """``[n, n]`` bool: True above the diagonal."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def upper_tri(d: torch.Tensor) -> torch.Tensor:
    """Entries above the diagonal of a square ``d``, row by row (the order of ``d[triu(1) mask]``).

    On CPU row slices are copied (no ``[n, n]`` boolean mask): 0.2 s instead of 2.6 s at n = 10,000.
    """
    n = d.shape[0]
    if d.device.type != "cpu":
        return d[upper_mask(n, d.device)]
    dn = d.numpy()
    out = np.empty(n * (n - 1) // 2, dtype=dn.dtype)
    for i, start, stop in tri_rows(n):
        out[start:stop] = dn[i, i + 1 :]
    return torch.from_numpy(out)


def tri_rows(n: int) -> Iterator[tuple[int, int, int]]:
    """``(row, start, stop)``: where row ``i``'s entries above the diagonal sit in the upper-triangle vector."""
    start = 0
    for i in range(n - 1):
        yield i, start, start + n - 1 - i
        start += n - 1 - i


def symmetric_from_upper(v: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric ``[n, n]`` matrix (zero diagonal) whose upper triangle is ``v`` (as upper_tri)."""
    if v.device.type != "cpu":
        f = torch.zeros(n, n, dtype=v.dtype, device=v.device)
        f[upper_mask(n, v.device)] = v
        return f + f.T
    vn = v.numpy()
    fn = np.zeros((n, n), dtype=vn.dtype)
    for i, start, stop in tri_rows(n):
        fn[i, i + 1 :] = vn[start:stop]
    fn += fn.T
    return torch.from_numpy(fn)
