"""Loading an organism by name, folder or base model (built on first use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, RosettaError
from ..models.loading import load, resolve
from .build import build_organism
from .registry import MANIFEST, is_organism_name, read_manifest, resolve_organism

__all__ = ["load_organism"]


def load_organism(
    model: str, task: str, device: str | None = None, dtype: str | None = None, progress: bool = True
) -> tuple[Any, dict[str, Any]]:
    """``(HookedModel, manifest)`` of an organism given by name (``BASE+task``), folder, or base model.

    A base model (zoo name, folder or hub id without a manifest) is turned into its ``BASE+task``
    organism, built on first use (``build_organism``). The organism's task must be ``task``
    (:class:`ConfigError` otherwise); an unknown base raises ``UnknownModelError`` before any build.
    """
    p = Path(model).expanduser()
    if p.is_dir() and (p / MANIFEST).is_file():
        path = p
    elif is_organism_name(model):
        base, _, org_task = model.rpartition("+")
        try:
            _, path = resolve_organism(model)
        except RosettaError:
            resolve(base, pull=False, progress=False)  # UnknownModelError for an unknown base
            path = Path(build_organism(base, org_task, progress=progress, device=device)["path"])
    else:
        resolve(model, pull=False, progress=False)  # UnknownModelError before any build
        path = Path(build_organism(model, task, progress=progress, device=device)["path"])
    manifest = read_manifest(path)
    if manifest.get("task") != task:
        raise ConfigError(f"organism {path.name} was built for task {manifest.get('task')!r}, not {task!r}")
    hm = load(str(path), device=device, dtype=dtype, progress=progress)
    hm.name = manifest.get("name") or path.name
    return hm, manifest
