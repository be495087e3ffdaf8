"""Applying a :class:`SteeringVector` to a model: addition (``hm.steer``) or directional ablation
(``hm.ablate``). Both are context managers; hooks are removed on exit, also on error.

- ``add_vector(hm, sv, scale, positions)``: adds ``scale * sv.vector`` at ``sv.hook`` (or ``hook=``);
  positions ``"all"`` (every prompt and generated token), ``"prompt"``, ``"generated"``, an int, list
  or slice of prompt positions (see :meth:`HookedModel.steer`).
- ``ablate_vector(hm, sv, hooks=None)``: removes the component along ``sv.unit()`` at every layer's
  ``resid_pre``, ``attn_out`` and ``mlp_out`` (Arditi et al. 2024), or at ``hooks``.
- ``apply_vector(hm, sv, mode="add"|"ablate", ...)`` dispatches on ``mode``.
- ``direction_intervention(hm, v, mode, hook, ...)``: the same for a raw direction tensor, as a function
  returning a fresh context manager (ablate, gated ablate, subtract).

Each checks that the vector fits the model first (:class:`~rosettalens.errors.ShapeError` if not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rosettalens.errors import ConfigError
from rosettalens.steering.vectors import SteeringVector

if TYPE_CHECKING:
    from rosettalens.hooks import HookedModel

__all__ = ["MODES", "ablate_vector", "add_vector", "apply_vector", "direction_intervention"]

MODES = ("add", "ablate")


@contextlib.contextmanager
def add_vector(
    hm: HookedModel,
    sv: SteeringVector,
    scale: float = 1.0,
    positions: Any = "all",
    hook: str | None = None,
) -> Iterator[HookedModel]:
    """Add ``scale * sv.vector`` at ``hook`` (default ``sv.hook``) inside the ``with`` block."""
    name = sv.check_compatible(hm, hook)
    with hm.steer(name, sv.vector, scale=float(scale), positions=positions):
        yield hm


@contextlib.contextmanager
def ablate_vector(
    hm: HookedModel, sv: SteeringVector, hooks: Sequence[str] | None = None
) -> Iterator[HookedModel]:
    """Project ``sv``'s direction out of the residual stream inside the ``with`` block."""
    sv.check_compatible(hm, hooks[0] if hooks else None)
    with hm.ablate(sv.unit(), hooks=hooks):
        yield hm


def apply_vector(
    hm: HookedModel,
    sv: SteeringVector,
    mode: str = "add",
    *,
    scale: float = 1.0,
    positions: Any = "all",
    hook: str | None = None,
    hooks: Sequence[str] | None = None,
) -> contextlib.AbstractContextManager:
    """``add_vector`` or ``ablate_vector`` depending on ``mode``."""
    if mode == "add":
        return add_vector(hm, sv, scale=scale, positions=positions, hook=hook)
    if mode == "ablate":
        return ablate_vector(hm, sv, hooks=hooks)
    raise ConfigError(f"unknown steering mode {mode!r}; expected 'add' or 'ablate'")


def direction_intervention(
    hm: HookedModel,
    vector: Any,
    mode: str,
    hook: str,
    scale: float = 1.0,
    threshold: float | None = None,
    pool: str = "max",
) -> Callable[[], contextlib.AbstractContextManager]:
    """A function returning a fresh context manager that applies a raw direction ``vector [d_model]``:
    ``mode="ablate"`` projects it out of the residual stream at every layer (``hm.ablate``), or, with
    ``threshold``, only on the prompts whose projection at ``hook``'s layer exceeds it
    (:func:`rosettalens.steering.conditional_ablate`, ``pool`` as there); ``"subtract"`` adds
    ``-scale * vector`` at ``hook`` at every position."""
    import torch

    from rosettalens.names import parse_hook_name
    from rosettalens.steering.conditional import conditional_ablate

    v = torch.as_tensor(vector).detach().float()
    if mode == "ablate" and threshold is not None:
        layer = parse_hook_name(hook)[1]
        if layer is None:
            raise ConfigError(f"a gated ablation needs a per-layer hook, got {hook!r}")
        return lambda: conditional_ablate(hm, v, layer, threshold, pool=pool)
    if mode == "ablate":
        return lambda: hm.ablate(v)
    if mode == "subtract":
        return lambda: hm.steer(hook, -float(scale) * v, positions="all")
    raise ConfigError(f"unknown mode {mode!r}; expected 'ablate' or 'subtract'")
