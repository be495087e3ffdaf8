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
