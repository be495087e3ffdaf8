"""Carrying a *direction* (a steering vector) from source space to target space through a mapper.

A mapper maps *points* (activations). A direction ``v`` added to a source activation ``x``
should become the change it causes in the mapped activation, without the mapper's offset:

* linear mappers (affine, orthogonal, low-rank): ``v -> W v`` -- the bias is dropped; this is
  exact for every anchor because ``f(x + v) - f(x) = W v``;
* the autoencoder (non-linear): the rule is chosen with ``method``:

  - ``"jacobian"`` (default): the mean directional derivative over anchor activations,
    ``mean_i J(x_i) v`` -- the first-order change, linear in ``v``;
  - ``"difference"``: the mean finite change ``mean_i [f(x_i + v) - f(x_i)]`` -- what adding
    ``v`` at each anchor actually does through the map (not linear in ``v``).

  ``anchor`` ``[n, d_src]`` are source activations at the hook (e.g. the prompts you will steer);
  without them the single anchor is the mean source activation seen in training.

**Norm calibration** (``calibrate=True``): the result is rescaled so that its norm relative to the
target's mean activation norm equals the source vector's norm relative to the source's mean
activation norm: ``||v_t|| / N_tgt = ||v|| / N_src``. ``N_src`` and ``N_tgt`` default to the mean
row norms of the mapper's training activations (``fit_info['src_mean_norm'/'tgt_mean_norm']``).
"""

from __future__ import annotations

import torch

from rosettalens.errors import ConfigError, ShapeError
from rosettalens.mapping.base import Mapper, MapperError, as_matrix

METHODS = ("jacobian", "difference")


def _anchors(mapper: Mapper, anchor: torch.Tensor | None) -> torch.Tensor:
    if anchor is None:
        net = getattr(mapper, "net", None)
        if net is None:
            raise MapperError("no anchor activations given and the mapper stores no training mean")
        return net.mx.detach().to(torch.float64)[None]
    if anchor.ndim == 1:
        anchor = anchor[None]
    return as_matrix(anchor.reshape(-1, anchor.shape[-1]), "anchor", mapper.d_src).to(torch.float64)


def jacobian(mapper: Mapper, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Jacobian ``[d_tgt, d_src]`` (float64) of the map over ``anchor [n, d_src]``.

    For linear mappers this is ``W`` (anchors are ignored).
    """
    mapper._require_fitted()
    if mapper.linear:
        return mapper.weight  # type: ignore[attr-defined]
    return mapper.mean_jacobian(_anchors(mapper, anchor))  # type: ignore[attr-defined]


def transfer_vector(
    mapper: Mapper,
    v: torch.Tensor,
    anchor: torch.Tensor | None = None,
    *,
    method: str = "jacobian",
    calibrate: bool = False,
    src_norm: float | None = None,
    tgt_norm: float | None = None,
) -> torch.Tensor:
    """Transfer direction(s) ``v [d_src]`` or ``[k, d_src]`` to target space ``[d_tgt]`` / ``[k, d_tgt]``.

    See the module docstring for the rules. The result has ``v``'s dtype (float32 if ``v`` is not
    floating) and lives on the CPU. ``src_norm`` / ``tgt_norm`` override the calibration norms.
    """
    mapper._require_fitted()
    if method not in METHODS:
        raise ConfigError(f"unknown transfer method {method!r}; expected one of {METHODS}")
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v)
    if v.ndim not in (1, 2) or v.shape[-1] != mapper.d_src:
        raise ShapeError(
            f"vector of shape {tuple(v.shape)} does not fit the mapper's source width {mapper.d_src} "
            f"(source {mapper.meta.get('source_model')}:{mapper.meta.get('source_hook')})"
        )
    out_dtype = v.dtype if v.is_floating_point() else torch.float32
    V = v.detach().to("cpu", torch.float64).reshape(-1, mapper.d_src)
    if mapper.linear:
        T = V @ mapper.weight.T  # type: ignore[attr-defined]
    else:
        A = _anchors(mapper, anchor)
        rows = []
        for vec in V:
            if method == "jacobian":
                rows.append(mapper.jvp(A, vec).mean(0))  # type: ignore[attr-defined]
            else:
                rows.append((mapper.transform(A + vec) - mapper.transform(A)).mean(0))
        T = torch.stack(rows)
    if calibrate:
        ns = src_norm if src_norm is not None else mapper.fit_info.get("src_mean_norm")
        nt = tgt_norm if tgt_norm is not None else mapper.fit_info.get("tgt_mean_norm")
        if not ns or not nt:
            raise MapperError(
                "norm calibration needs src/tgt mean activation norms; the mapper has none recorded"
            )
        tn = T.norm(dim=1, keepdim=True)
        want = V.norm(dim=1, keepdim=True) / ns * nt
        T = torch.where(tn > 0, T * (want / tn.clamp_min(1e-300)), T)
    T = T.to("cpu", out_dtype)
    return T[0] if v.ndim == 1 else T
