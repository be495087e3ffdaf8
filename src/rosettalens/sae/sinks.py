"""One rule for the positions an SAE leaves out: attention sinks and outlier-norm tokens.

A decoder model writes a few tokens with residual norms far above the rest: the first position of
every document (the attention sink; without a BOS token it is the first word) and, in some models, a
handful of later tokens. Such a token dominates the input normalisation, the FVU and the training
signal of an SAE, and an SAE trained without it reconstructs it badly. The rule, shared by training,
``sae eval``, the splice metrics and the experiments::

    left out  =  position < skip_first                           (position in the unpadded document)
              or ||x|| > norm_ratio * median_norm                 (norm_ratio 0: no norm test)

``median_norm`` is the median token norm of the SAE's training data (recorded by the trainer, so that
evaluation applies the very threshold of training); without one, the median of the real tokens at
hand. The rule is saved in the SAE's config (``SAEConfig.skip_first``, ``norm_ratio``,
``median_norm``); :func:`sae_rule` reads it back. Spliced forward passes keep the model's own
activation at left-out positions (:func:`rosettalens.sae.splice_metrics`).

Shapes: ``acts [batch, pos, d]`` with ``attention_mask [batch, pos]`` (left or right padding), or
``acts [n, d]`` with ``positions [n]`` (a store's ``pos_index``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from rosettalens.errors import ConfigError, ShapeError

__all__ = ["SKIP_FIRST", "NORM_RATIO", "SinkRule", "keep_mask", "keep_rows", "positions_of", "sae_rule"]

SKIP_FIRST = 1
NORM_RATIO = 10.0


@dataclass(frozen=True)
class SinkRule:
    """Which positions are left out (module docstring). ``norm_ratio=0`` turns the norm test off;
    ``median_norm=None`` takes the median of the data the rule is applied to."""

    skip_first: int = SKIP_FIRST
    norm_ratio: float = NORM_RATIO
    median_norm: float | None = None

    def __post_init__(self) -> None:
        if self.skip_first < 0:
            raise ConfigError(f"skip_first must be >= 0, got {self.skip_first}")
        if not (math.isfinite(self.norm_ratio) and self.norm_ratio >= 0):
            raise ConfigError(f"norm_ratio must be a finite number >= 0, got {self.norm_ratio}")
        if self.norm_ratio and 0 < self.norm_ratio <= 1:
            raise ConfigError(f"norm_ratio must be 0 (off) or > 1, got {self.norm_ratio}")
        if self.median_norm is not None and not (math.isfinite(self.median_norm) and self.median_norm > 0):
            raise ConfigError(f"median_norm must be > 0, got {self.median_norm}")

    @property
    def off(self) -> bool:
        return self.skip_first == 0 and self.norm_ratio == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_median(self, median_norm: float | None) -> SinkRule:
        return SinkRule(self.skip_first, self.norm_ratio, median_norm)

    def keep(
        self, acts: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """:func:`keep_mask` under this rule."""
        return keep_mask(
            acts,
            attention_mask,
            positions=positions,
            skip_first=self.skip_first,
            norm_ratio=self.norm_ratio,
            median_norm=self.median_norm,
        )


def positions_of(attention_mask: Tensor) -> Tensor:
    """Position of each token in its unpadded document ``[batch, pos]`` (left or right padding; pads
    get the position of the token before them, or 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def keep_mask(
    acts: Tensor,
    attention_mask: Tensor | None = None,
    *,
    positions: Tensor | None = None,
    skip_first: int = SKIP_FIRST,
    norm_ratio: float = NORM_RATIO,
    median_norm: float | None = None,
) -> Tensor:
    """Bool mask of the positions kept (``False``: left out, and padding) under the sink rule.

    acts: ``[batch, pos, d]`` (per-head hooks ``[batch, pos, h, d_head]`` are flattened) with
    ``attention_mask [batch, pos]`` (default: no padding), or ``[n, d]`` with ``positions [n]`` (the
    position of each row in its document; ``None``: no position test). Returns ``[batch, pos]`` or
    ``[n]``. Without ``median_norm`` the median is taken over the real tokens at positions
    ``>= skip_first``.
    """
    if acts.dim() < 2:
        raise ShapeError(f"acts must be [batch, pos, d] or [n, d], got shape {tuple(acts.shape)}")
    rows = acts.dim() == 2 and attention_mask is None
    if rows:
        real = torch.ones(acts.shape[0], dtype=torch.bool, device=acts.device)
        pos = None if positions is None else torch.as_tensor(positions).to(acts.device).long()
        if pos is not None and pos.shape != real.shape:
            raise ShapeError(f"positions {tuple(pos.shape)} do not match acts rows {acts.shape[0]}")
        flat = acts
    else:
        if acts.dim() == 2:
            acts = acts[None]
        flat = acts.reshape(*acts.shape[:2], -1)
        mask = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
        if attention_mask is not None:
            mask = attention_mask.to(acts.device).bool().reshape(acts.shape[:2])
        real = mask
        pos = positions_of(mask) if positions is None else torch.as_tensor(positions).to(acts.device).long()
    keep = real.clone()
    if pos is not None and skip_first > 0:
        keep &= pos >= skip_first
    if norm_ratio > 0:
        norms = flat.detach().double().norm(dim=-1)
        med = median_norm
        if med is None:
            ref = norms[keep] if keep.any() else norms[real]
            med = float(ref.median()) if ref.numel() else 0.0
        if med > 0:
            keep &= norms <= norm_ratio * med
    return keep


def keep_rows(store: Any, hooks: list[str] | None = None, rule: SinkRule | None = None,
              chunk: int = 16384) -> tuple[Tensor, dict[str, float]]:  # fmt: skip
    """Rows of an activation store kept under ``rule`` at every one of ``hooks`` (default: all the
    store's hooks): ``(keep [rows] bool, {hook: median norm})``. The medians are taken over the rows at
    positions ``>= skip_first`` (or are the rule's own ``median_norm`` when it has one)."""
    rule = rule or SinkRule()
    n = len(store)
    keep = torch.ones(n, dtype=torch.bool)
    if rule.skip_first > 0:
        keep &= store.pos_index >= rule.skip_first
    medians: dict[str, float] = {}
    for h in hooks or list(store.hooks):
        norms = torch.empty(n, dtype=torch.float64)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            x = store.read(h, torch.arange(s, e).numpy())
            norms[s:e] = x.reshape(e - s, -1).double().norm(dim=1)
        ref = norms[keep] if keep.any() else norms
        med = rule.median_norm if rule.median_norm is not None else float(ref.median()) if n else 0.0
        medians[h] = med
        if rule.norm_ratio > 0 and med > 0:
            keep &= norms <= rule.norm_ratio * med
    return keep, medians


def sae_rule(sae: Any) -> SinkRule:
    """The sink rule recorded in an SAE's config (SAEs saved without one: the default rule)."""
    cfg = getattr(sae, "cfg", sae)
    return SinkRule(
        int(getattr(cfg, "skip_first", SKIP_FIRST)),
        float(getattr(cfg, "norm_ratio", NORM_RATIO)),
        getattr(cfg, "median_norm", None),
    )
