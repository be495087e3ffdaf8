"""Input checking and small float64 helpers shared by the similarity metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rosettalens.errors import ShapeError
from rosettalens.similarity.errors import BatchSizeError, NonFiniteError

ArrayLike = Any  # numpy array, torch tensor (any device) or nested sequence


def as_f64(x: ArrayLike, name: str = "X", device: torch.device | str | None = None) -> torch.Tensor:
    """Return ``x`` as a float64 torch tensor ``[n, d]`` (on ``device``, else on x's own device).

    Raises :class:`ShapeError` for non-2-D input and :class:`NonFiniteError` when a row holds NaN/inf.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_sparse or t.layout != torch.strided:
            t = t.to_dense()
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise ShapeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from exc
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ShapeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise ShapeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if t.ndim != 2:
        hint = " (use x[:, None] for a single feature)" if t.ndim == 1 else ""
        raise ShapeError(f"{name} must be 2-D [n, d], got shape {tuple(t.shape)}{hint}")
    if device is not None:
        t = t.to(device)
    t = t.to(torch.float64)
    # one cheap reduction first: a row sum is finite unless the row holds NaN/inf (or overflows)
    if bool(torch.isfinite(t.sum(dim=1)).all()):
        return t
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        first = ", ".join(str(int(r)) for r in rows[:5])
        raise NonFiniteError(
            f"{name} has {rows.numel()} row(s) containing NaN or inf (first: {first}); "
            "drop or impute those rows (in both inputs) before comparing"
        )
    return t


def paired(
    x: ArrayLike, y: ArrayLike, min_rows: int = 2, what: str = "this metric"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair of matrices with paired rows; returns float64 tensors on x's device."""
    xt = as_f64(x, "X")
    yt = as_f64(y, "Y", device=xt.device)
    if xt.shape[0] != yt.shape[0]:
        raise ShapeError(
            f"X and Y must have paired rows, got {xt.shape[0]} and {yt.shape[0]} rows "
            "(row i of X and row i of Y must describe the same token/stimulus)"
        )
    if xt.shape[0] < min_rows:
        raise BatchSizeError(f"{what} needs at least {min_rows} rows, got {xt.shape[0]}")
    if xt.shape[1] == 0 or yt.shape[1] == 0:
        raise ShapeError(
            f"X and Y need at least one column, got shapes {tuple(xt.shape)} and {tuple(yt.shape)}"
        )
    return xt, yt


def center(x: torch.Tensor) -> torch.Tensor:
    """Subtract column means: ``[n, d] -> [n, d]``."""
    return x - x.mean(dim=0, keepdim=True)
