"""Closed-form linear mappers: affine (ridge), orthogonal (Procrustes) and low-rank (reduced-rank regression).

Every linear mapper computes ``y = x @ W.T + b`` with ``W = weight [d_tgt, d_src]`` and
``b = bias [d_tgt]``, fitted in float64 from centred second moments accumulated in chunks, so a
fit never holds a float64 copy of the whole data set.
"""

from __future__ import annotations

from typing import Any

import torch

from rosettalens.errors import ConfigError, DataError
from rosettalens.mapping.base import Mapper, check_pair, register_kind, split_indices

#: Relative ridge strengths tried by :class:`AffineMapper`; ``lambda = alpha * trace(C_xx) / d_src``
#: (``alpha`` times the mean eigenvalue of the centred source scatter matrix), so the grid is
#: independent of activation scale and of the number of rows.
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

_CHUNK = 16384


def _means(X: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 column means of ``X [n, d]`` (restricted to ``rows``), accumulated in chunks."""
    idx = torch.arange(X.shape[0]) if rows is None else rows
    total = torch.zeros(X.shape[1], dtype=torch.float64)
    for i in range(0, len(idx), _CHUNK):
        total += X[idx[i : i + _CHUNK]].to(torch.float64).sum(0)
    return total / len(idx)


def _scatter(
    X: torch.Tensor,
    Y: torch.Tensor,
    mx: torch.Tensor,
    my: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centred scatter matrices in float64: ``C_xx [d_src, d_src]``, ``C_xy [d_src, d_tgt]``, ``sum ||y - my||^2``."""
    idx = torch.arange(X.shape[0]) if rows is None else rows
    cxx = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
    cxy = torch.zeros(X.shape[1], Y.shape[1], dtype=torch.float64)
    yy = 0.0
    for i in range(0, len(idx), _CHUNK):
        r = idx[i : i + _CHUNK]
        xc = X[r].to(torch.float64) - mx
        yc = Y[r].to(torch.float64) - my
        cxx += xc.T @ xc
        cxy += xc.T @ yc
        yy += float((yc * yc).sum())
    return cxx, cxy, yy


def _ridge_solver(cxx: torch.Tensor, cxy: torch.Tensor):
    """Return ``solve(lam) -> B [d_src, d_tgt]`` minimising ``||Xc B - Yc||^2 + lam ||B||^2``.

    One symmetric eigendecomposition serves every ``lam``. ``lam = 0`` gives the minimum-norm
    least-squares solution (pseudo-inverse; eigenvalues below ``d * eps * max`` are dropped).
    """
    s, V = torch.linalg.eigh(cxx)
    s = s.clamp_min(0.0)
    Vt_cxy = V.T @ cxy
    tol = float(s.max()) * cxx.shape[0] * torch.finfo(torch.float64).eps

    def solve(lam: float) -> torch.Tensor:
        if lam > 0:
            g = 1.0 / (s + lam)
        else:
            g = torch.where(s > tol, 1.0 / s.clamp_min(tol), torch.zeros_like(s))
        return V @ (g[:, None] * Vt_cxy)

    return solve


class LinearMapper(Mapper):
    """Shared base: ``y = x @ weight.T + bias``; ``weight [d_tgt, d_src]``, ``bias [d_tgt]`` (float64)."""

    linear = True

    def __init__(self) -> None:
        super().__init__()
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def weight(self) -> torch.Tensor:
        """``W [d_tgt, d_src]`` in float64: the map's linear part (its Jacobian everywhere)."""
        self._require_fitted()
        assert self._weight is not None
        return self._weight

    @property
    def bias(self) -> torch.Tensor:
        """``b [d_tgt]`` in float64."""
        self._require_fitted()
        assert self._bias is not None
        return self._bias

    def _set_linear(self, B: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> None:
        """Store the map ``y = (x - mx) @ B + my`` (``B [d_src, d_tgt]``) as weight/bias."""
        self._weight = B.T.contiguous()
        self._bias = (my - mx @ B).contiguous()
        self.d_src, self.d_tgt = B.shape
        self._cast.clear()

    def _transform(self, X: torch.Tensor) -> torch.Tensor:
        key = (X.dtype, X.device)
        if key not in self._cast:
            self._cast[key] = (self.weight.to(X.dtype).to(X.device), self.bias.to(X.dtype).to(X.device))
        W, b = self._cast[key]
        return torch.addmm(b, X, W.T)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        W, b = tensors["weight"], tensors["bias"]
        if tuple(W.shape) != (self.d_tgt, self.d_src) or tuple(b.shape) != (self.d_tgt,):
            raise ValueError(
                f"weight {tuple(W.shape)} / bias {tuple(b.shape)} vs d_src={self.d_src}, d_tgt={self.d_tgt}"
            )
        self._weight, self._bias = W, b
        self._cast.clear()


@register_kind
class AffineMapper(LinearMapper):
    """Affine map ``y = W x + b`` by closed-form ridge regression in float64.

    The bias is not penalised (data are centred first). With ``alpha=None`` the relative ridge
    strength is chosen from ``alphas`` by validation MSE on a held-out ``val_fraction`` of the
    rows (split with ``seed``), then the map is refitted on all rows with the chosen strength.
    ``lambda = alpha * trace(C_xx) / d_src``. ``fit_info`` records the chosen ``alpha``,
    ``lambda`` and the validation FVU of every candidate.
    """

    kind = "affine"

    def __init__(
        self,
        alpha: float | None = None,
        alphas: tuple[float, ...] | list[float] = DEFAULT_ALPHAS,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if alpha is not None and alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        if not alphas or any(a < 0 for a in alphas):
            raise ConfigError(f"alphas must be a non-empty list of values >= 0, got {alphas}")
        self.alpha = alpha
        self.alphas = tuple(sorted(float(a) for a in alphas))
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)

    def _hparams(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "alphas": list(self.alphas),
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }

    def fit(self, X_src: torch.Tensor, X_tgt: torch.Tensor) -> AffineMapper:
        """Fit on ``X_src [n, d_src]``, ``X_tgt [n, d_tgt]``."""
        X, Y = check_pair(X_src, X_tgt)
        n = X.shape[0]
        self.fit_info = {}
        alpha = self.alpha
        if alpha is None and len(self.alphas) == 1:
            alpha = self.alphas[0]
        if alpha is None and n < 4:
            alpha = self.alphas[0]
            self.fit_info["alpha_selection"] = "too few rows to validate; used the smallest alpha"
        if alpha is None:
            tr, va = split_indices(n, self.val_fraction, self.seed)
            mx, my = _means(X, tr), _means(Y, tr)
            cxx, cxy, _ = _scatter(X, Y, mx, my, tr)
            # validation rows centred by the *training* means: residual = (y - my) - (x - mx) B
            vxx, vxy, vyy = _scatter(X, Y, mx, my, va)
            vmy = _means(Y, va)
            val_sst = float(((Y[va].to(torch.float64) - vmy) ** 2).sum())
            solve = _ridge_solver(cxx, cxy)
            unit = float(torch.trace(cxx)) / X.shape[1]
            val_fvu = []
            for a in self.alphas:
                B = solve(a * unit)
                sse = vyy - 2.0 * float((B * vxy).sum()) + float((B * (vxx @ B)).sum())
                val_fvu.append(max(sse, 0.0) / val_sst if val_sst > 0 else float("nan"))
            best = min(range(len(self.alphas)), key=lambda i: (val_fvu[i], i))
            alpha = self.alphas[best]
            self.fit_info["val_fvu_by_alpha"] = {repr(a): f for a, f in zip(self.alphas, val_fvu)}
            self.fit_info["n_val"] = len(va)
        if "n_val" in self.fit_info:
            # refit on all rows without another pass: scatter about the training means, moved to the full means
            ax, ay = mx, my
            mx, my = _means(X), _means(Y)
            dx, dy = mx - ax, my - ay
            cxx = cxx + vxx - n * torch.outer(dx, dx)
            cxy = cxy + vxy - n * torch.outer(dx, dy)
        else:
            mx, my = _means(X), _means(Y)
            cxx, cxy, _ = _scatter(X, Y, mx, my)
        lam = alpha * float(torch.trace(cxx)) / X.shape[1]
        self._set_linear(_ridge_solver(cxx, cxy)(lam), mx, my)
        self.fit_info.update(alpha=alpha, ridge_lambda=lam)
        self._record_norms(X, Y)
        return self


@register_kind
class OrthogonalMapper(LinearMapper):
    """Orthogonal Procrustes after centring and scaling: ``y = my + c * ((x - mx) @ R)``.

    Both sides are centred and divided by their Frobenius norm (``Xs = Xc/||Xc||``,
    ``Ys = Yc/||Yc||``); ``R`` maximises ``trace(R.T @ Xs.T @ Ys)``: with the thin SVD
    ``Xs.T @ Ys = U S V^T``, ``R = U V^T`` ``[d_src, d_tgt]``.

    **Unequal widths.** The narrower space is treated as zero-padded to the wider width and a full
    orthogonal matrix is fitted there; restricted to the real coordinates this is exactly the
    semi-orthogonal ``R = U V^T`` above: if ``d_src <= d_tgt`` its rows are orthonormal (an
    isometric embedding of the source into the target space, ``R R^T = I``); if ``d_src > d_tgt``
    its columns are orthonormal (rotate, then drop the ``d_src - d_tgt`` padded coordinates,
    ``R^T R = I``).

    The scale is ``c = (||Yc|| / ||Xc||) * trace(S)``: the least-squares optimal scale of the
    similarity transform (``trace(S) = 1`` for an exact rotation + scale). With ``scale=False``,
    ``c = ||Yc|| / ||Xc||`` (norm matching only). ``fit_info`` records ``scale``, ``similarity``
    (``trace(S)``) and ``disparity = 1 - trace(S)^2`` (as :func:`scipy.spatial.procrustes`).
    The matrix ``R`` is saved as ``rotation``.
    """

    kind = "orthogonal"

    def __init__(self, scale: bool = True) -> None:
        super().__init__()
        self.scale = bool(scale)
        self.rotation: torch.Tensor | None = None

    def _hparams(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def fit(self, X_src: torch.Tensor, X_tgt: torch.Tensor) -> OrthogonalMapper:
        """Fit on ``X_src [n, d_src]``, ``X_tgt [n, d_tgt]``."""
        X, Y = check_pair(X_src, X_tgt)
        mx, my = _means(X), _means(Y)
        cxx, cxy, yy = _scatter(X, Y, mx, my)
        nx, ny = float(torch.trace(cxx)) ** 0.5, yy**0.5
        if nx == 0.0 or ny == 0.0:
            raise DataError("orthogonal mapper: source or target activations are constant (zero variance)")
        U, S, Vh = torch.linalg.svd(cxy / (nx * ny), full_matrices=False)
        R = U @ Vh
        sim = float(S.sum())
        c = ny / nx * (sim if self.scale else 1.0)
        self._set_linear(c * R, mx, my)
        self.rotation = R.contiguous()
        self.fit_info = {"scale": c, "similarity": sim, "disparity": 1.0 - sim**2}
        self._record_norms(X, Y)
        return self

    def _state(self) -> dict[str, torch.Tensor]:
        assert self.rotation is not None
        return {**super()._state(), "rotation": self.rotation}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._set_state(tensors)
        self.rotation = tensors["rotation"]


@register_kind
class LowRankMapper(LinearMapper):
    """Reduced-rank regression: the best rank-``rank`` affine map in least squares, closed form.

    ``B_ols = (C_xx + lambda I)^+ C_xy``; ``V_r`` = top-``rank`` eigenvectors of the fitted values'
    scatter ``B_ols^T C_xx B_ols``; ``B = B_ols V_r V_r^T`` (Izenman 1975, identity weighting).
    Saved as ``down = (B_ols V_r)^T [rank, d_src]`` and ``up = V_r [d_tgt, rank]``;
    ``weight = up @ down``. ``alpha`` is the relative ridge strength (default 0: pseudo-inverse).
    """

    kind = "lowrank"

    def __init__(self, rank: int = 32, alpha: float = 0.0) -> None:
        super().__init__()
        if int(rank) < 1:
            raise ConfigError(f"rank must be >= 1, got {rank}")
        if alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None

    def _hparams(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha}

    def fit(self, X_src: torch.Tensor, X_tgt: torch.Tensor) -> LowRankMapper:
        """Fit on ``X_src [n, d_src]``, ``X_tgt [n, d_tgt]``."""
        X, Y = check_pair(X_src, X_tgt)
        if self.rank > min(X.shape[1], Y.shape[1]):
            raise ConfigError(f"rank {self.rank} exceeds min(d_src, d_tgt) = {min(X.shape[1], Y.shape[1])}")
        mx, my = _means(X), _means(Y)
        cxx, cxy, yy = _scatter(X, Y, mx, my)
        lam = self.alpha * float(torch.trace(cxx)) / X.shape[1]
        B_ols = _ridge_solver(cxx, cxy)(lam)
        G = B_ols.T @ cxx @ B_ols
        G = (G + G.T) / 2
        evals, evecs = torch.linalg.eigh(G)
        Vr = evecs[:, -self.rank :].flip(1).contiguous()
        self.down = (B_ols @ Vr).T.contiguous()
        self.up = Vr
        self._set_linear(self.down.T @ self.up.T, mx, my)
        kept = evals.flip(0)
        total = float(kept.clamp_min(0).sum())
        self.fit_info = {
            "ridge_lambda": lam,
            "explained_of_ols": float(kept[: self.rank].clamp_min(0).sum()) / total
            if total > 0
            else float("nan"),
        }
        self._record_norms(X, Y)
        return self

    def _state(self) -> dict[str, torch.Tensor]:
        assert self.down is not None and self.up is not None
        return {"down": self.down, "up": self.up, "bias": self.bias}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        down, up, b = tensors["down"], tensors["up"], tensors["bias"]
        if tuple(down.shape) != (self.rank, self.d_src) or tuple(up.shape) != (self.d_tgt, self.rank):
            raise ValueError(f"down {tuple(down.shape)} / up {tuple(up.shape)} do not match rank {self.rank}")
        self.down, self.up = down, up
        self._weight, self._bias = (up @ down).contiguous(), b
        self._cast.clear()
