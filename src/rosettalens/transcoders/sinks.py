"""The positions a transcoder leaves out: attention sinks and outlier-norm tokens.

The rule of the SAE work (:mod:`rosettalens.sae.sinks`), applied to both ends of the MLP::

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
from rosettalens.sae.sinks import NORM_RATIO, SKIP_FIRST, positions_of
from rosettalens.sae.sinks import keep_mask as keep_one

__all__ = ["SKIP_FIRST", "NORM_RATIO", "Keep", "keep_mask", "positions_of"]


@dataclass
class Keep:
    """``mask [batch, pos]`` (True: kept) and the medians ``(in, out)`` it used."""

    mask: Tensor
    medians: tuple[float, float]


def _median(acts: Tensor, ref: Tensor) -> float:
    norms = acts.detach().double().norm(dim=-1)
    return float(norms[ref].median()) if ref.any() else 0.0


def keep_mask(
    x: Tensor,
    y: Tensor,
    attention_mask: Tensor | None = None,
    skip_first: int = SKIP_FIRST,
    norm_ratio: float = NORM_RATIO,
    medians: tuple[float | None, float | None] | None = None,
) -> Keep:
    """The kept positions of ``x = mlp_in.L``, ``y = mlp_out.L`` ``[batch, pos, d]`` under the rule
    (module docstring): :func:`rosettalens.sae.sinks.keep_mask` of each, and-ed; padding
    (``attention_mask == 0``) is never kept."""
    if x.dim() != 3 or y.shape[:2] != x.shape[:2]:
        raise ShapeError(
            f"x and y must be [batch, pos, d] with equal batch and pos, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    mask = attention_mask.to(x.device).bool() if attention_mask is not None else None
    real = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    first = real & (positions_of(real) >= skip_first)
    ref = first if first.any() else real
    m_in, m_out = medians if medians is not None else (None, None)
    med = (
        _median(x, ref) if m_in is None else float(m_in),
        _median(y, ref) if m_out is None else float(m_out),
    )
    keep = keep_one(x, mask, skip_first=skip_first, norm_ratio=norm_ratio, median_norm=med[0] or None)
    keep &= keep_one(y, mask, skip_first=skip_first, norm_ratio=norm_ratio, median_norm=med[1] or None)
    return Keep(keep, med)
