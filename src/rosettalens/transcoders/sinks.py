"""The positions a transcoder leaves out: attention sinks and outlier-norm tokens.

The rule of the SAE work, applied to both ends of the MLP::

    left out  =  position < skip_first                                  (position in the unpadded document)
              or ||x|| > norm_ratio * median ||x||   (x = mlp_in.L)     (norm_ratio 0: no norm test)
              or ||y|| > norm_ratio * median ||y||   (y = mlp_out.L)

The medians are those of the training tokens (recorded in :class:`TranscoderConfig` as
``median_norm_in`` / ``median_norm_out``); without them, the medians of the real tokens at hand at
positions ``>= skip_first``. Training leaves these tokens out; evaluation and the replaced forward
passes keep the model's own MLP output there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rosettalens.errors import ShapeError

__all__ = ["SKIP_FIRST", "NORM_RATIO", "Keep", "keep_mask", "positions_of"]

SKIP_FIRST = 1
NORM_RATIO = 10.0


@dataclass
class Keep:
    """``mask [batch, pos]`` (True: kept) and the medians ``(in, out)`` it used."""

    mask: Tensor
    medians: tuple[float, float]


def positions_of(attention_mask: Tensor) -> Tensor:
    """Position of each token in its unpadded document ``[batch, pos]`` (left or right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def keep_mask(
    x: Tensor,
    y: Tensor,
    attention_mask: Tensor | None = None,
    skip_first: int = SKIP_FIRST,
    norm_ratio: float = NORM_RATIO,
    medians: tuple[float | None, float | None] | None = None,
) -> Keep:
    """The kept positions of ``x = mlp_in.L``, ``y = mlp_out.L`` ``[batch, pos, d]`` under the rule
    (module docstring); padding (``attention_mask == 0``) is never kept."""
    if x.dim() != 3 or y.shape[:2] != x.shape[:2]:
        raise ShapeError(
            f"x and y must be [batch, pos, d] with equal batch and pos, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if attention_mask is not None:
        real = attention_mask.to(x.device).bool()
    keep = real & (positions_of(real) >= skip_first)
    meds = list(medians) if medians is not None else [None, None]
    out: list[float] = []
    ref = keep if keep.any() else real
    norms = (x.detach().double().norm(dim=-1), y.detach().double().norm(dim=-1))
    for i, nrm in enumerate(norms):
        m = meds[i]
        if m is None:
            m = float(nrm[ref].median()) if ref.any() else 0.0
        out.append(float(m))
    if norm_ratio > 0:
        for nrm, m in zip(norms, out, strict=True):
            if m > 0:
                keep &= nrm <= norm_ratio * m
    return Keep(keep, (out[0], out[1]))
