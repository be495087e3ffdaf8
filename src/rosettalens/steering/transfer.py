"""Transfer a :class:`SteeringVector` into another model's space through a fitted mapper.

The math is the mapping package's :func:`rosettalens.mapping.transfer_vector` (linear mappers:
``v -> W v``, bias dropped; the autoencoder: mean Jacobian-vector product or mean finite difference
over anchor activations; optional norm calibration ``||v_t|| / N_tgt = ||v|| / N_src``). This module
checks that vector and mapper belong together and records provenance in the new vector's ``source``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from rosettalens.errors import ShapeError
from rosettalens.steering.vectors import SteeringVector

__all__ = ["transfer"]


def transfer(
    vector: SteeringVector,
    mapper: Any,
    *,
    method: str = "jacobian",
    calibrate: bool = True,
    anchor: torch.Tensor | None = None,
    target_model: str | None = None,
    target_hook: str | None = None,
) -> SteeringVector:
    """Carry ``vector`` through ``mapper`` (a fitted ``Mapper`` or a saved mapper directory).

    Raises :class:`ShapeError` when the vector's ``d_model`` is not the mapper's source width. The
    mapper's recorded source model/hook should match the vector's; a mismatch only warns (names of
    the same model may differ, e.g. a zoo name and a local path). The result's model and hook are the
    mapper's target ones (or ``target_model``/``target_hook``), its kind ``"transferred"``.
    """
    from rosettalens.mapping import load_mapper, transfer_vector

    mapper_dir: str | None = None
    if isinstance(mapper, str | os.PathLike):
        mapper_dir = str(Path(mapper))
        mapper = load_mapper(mapper)
    if mapper.d_src != vector.d_model:
        raise ShapeError(
            f"vector from {vector.model} at {vector.hook} has d_model {vector.d_model}, but the mapper expects "
            f"source width {mapper.d_src} (source {mapper.meta.get('source_model')}:{mapper.meta.get('source_hook')})"
        )
    src_model, src_hook = mapper.meta.get("source_model"), mapper.meta.get("source_hook")
    mismatch = [
        f"{what} {mine!r} != mapper's {theirs!r}"
        for what, mine, theirs in (("model", vector.model, src_model), ("hook", vector.hook, src_hook))
        if theirs is not None and mine != theirs
    ]
    if mismatch:
        warnings.warn(
            "transferring a vector through a mapper fitted elsewhere: " + "; ".join(mismatch), stacklevel=2
        )
    out = transfer_vector(mapper, vector.vector, anchor, method=method, calibrate=calibrate)
    provenance = {
        "transferred_from": {
            "model": vector.model,
            "hook": vector.hook,
            "kind": vector.kind,
            "d_model": vector.d_model,
            "norm": vector.norm,
            "source": vector.source,
        },
        "mapper": {
            "dir": mapper_dir,
            "kind": mapper.kind,
            "d_src": mapper.d_src,
            "d_tgt": mapper.d_tgt,
            **{k: v for k, v in mapper.meta.items()},
        },
        "rule": "W v (linear, bias dropped)" if getattr(mapper, "linear", False) else method,
        "calibrate": calibrate,
        "n_anchor": None if anchor is None else int(anchor.reshape(-1, vector.d_model).shape[0]),
    }
    return SteeringVector(
        vector=out,
        model=target_model or mapper.meta.get("target_model") or "unknown",
        hook=target_hook or mapper.meta.get("target_hook") or vector.hook,
        kind="transferred",
        source=provenance,
    )
