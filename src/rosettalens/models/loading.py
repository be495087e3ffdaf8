"""Resolve a MODEL string and load it as a :class:`~rosettalens.hooks.HookedModel`.

A MODEL string is, in this order: a zoo name, a local HF folder, a ``.gguf`` file (converted once
and cached by its sha256), or a hub id (when online or already in the HF cache).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CacheError, RosettaError, UnknownModelError
from . import zoo


def _dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if dtype not in table:
        raise RosettaError(f"unknown dtype {dtype!r}; choose from {', '.join(table)}")
    return table[dtype]


def _device(device: Any) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve(model: str, pull: bool = True, progress: bool = True) -> tuple[str, Path | str]:
    """Return ``(display name, path or hub id)`` for a MODEL string; pulls zoo models if needed."""
    if model in zoo.ZOO:
        return model, (zoo.pull(model, progress=progress) if pull else zoo.model_dir(model))
    p = Path(model).expanduser()
    if "+" in model and not p.exists():  # an organism, BASE+task (rosettalens.organisms)
        from ..organisms.registry import is_organism_name, resolve_organism

        if is_organism_name(model):
            return resolve_organism(model)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UnknownModelError(
                f"{p} is a folder but holds no config.json (not a Hugging Face model folder)"
            )
        return p.name, p
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UnknownModelError(f"GGUF file {p} does not exist")
        digest = zoo.sha256_file(p)
        dest = zoo.cache_root() / "models" / f"gguf-{digest[:16]}"
        try:
            zoo.check_cache(dest, digest)
        except CacheError:
            zoo.convert_gguf(p, dest, digest, p.stem)
        return p.stem, dest
    if "/" in model and not p.exists():
        return model, model  # a hub id: transformers decides whether it is reachable or cached
    close = difflib.get_close_matches(model, list(zoo.ZOO), n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; zoo models: {', '.join(zoo.ZOO)}"
    raise UnknownModelError(f"unknown model {model!r} (not a zoo name, folder, .gguf file or hub id){hint}")


def load(
    model: str, device: Any = None, dtype: Any = None, device_map: str | None = None, progress: bool = True
):
    """Load MODEL as a HookedModel (eval mode, float32 by default).

    ``device_map="auto"`` spreads a large model over the available devices with ``accelerate``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hooks import HookedModel

    name, where = resolve(model, progress=progress)
    dt = _dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": dt}
    if device_map:
        kwargs["device_map"] = device_map
    local = isinstance(where, Path)
    if not local:
        kwargs["local_files_only"] = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        tok = AutoTokenizer.from_pretrained(
            str(where), **({} if local else {"local_files_only": kwargs.get("local_files_only", False)})
        )
        hf: Any = AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
    except (OSError, ValueError) as e:
        if local:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnknownModelError(
            f"cannot load {model!r} from the hub or the HF cache ({msg}); zoo models: {', '.join(zoo.ZOO)}"
        ) from e
    hf.eval()
    if not device_map:
        hf.to(_device(device))
    return HookedModel(hf, tok, name=name)
