"""Resolve a MODEL string and load it as a :class:`~rosettalens.hooks.HookedModel`.

A MODEL string is, in this order: a zoo name, a local HF folder, a ``.gguf`` file (converted once
and cached by its sha256), or a hub id (when online or already in the HF cache).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CacheError, ConfigError, DataError, UnknownModelError
from ..io import sha256_file
from . import zoo
from .checks import DEVICE_MAPS, check_device, check_path
from .gguf_layout import gguf_layout_error


def _dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(table)}")
    return table[dtype]


def _device(device: Any) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    check_device(str(device))
    return torch.device(device)


_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or os.sep in model.strip(os.sep) and not _HUB_ID.match(model)


def _check_folder(p: Path) -> None:
    """A local HF folder: a readable ``config.json`` object and untruncated ``*.safetensors`` files."""
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UnknownModelError(f"{p} is a folder but holds no config.json (not a Hugging Face model folder)")
    try:
        obj = json.loads(cfg.read_bytes())
    except (OSError, ValueError) as e:
        raise DataError(f"{cfg} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or "model_type" not in obj:
        raise DataError(f"{cfg} is not a Hugging Face model config (no model_type)")
    for name in _JSON_FILES:  # the tokenizer's files and the shard index, when present
        f = p / name
        if not f.is_file():
            continue
        try:
            obj = json.loads(f.read_bytes())
        except (OSError, ValueError) as e:
            raise DataError(f"{f} is not valid JSON ({_first_line(e)})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{f} is corrupt (a JSON {type(obj).__name__}, expected an object)")
    for f in sorted(p.glob("*.safetensors")):
        _check_safetensors(f)


def _check_safetensors(f: Path) -> None:
    """Header readable and the file as long as the header says (a truncated copy fails here, cheaply)."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"{f} is not a readable safetensors file ({e})") from None
    if 8 + n + end > size:
        raise DataError(f"{f} is truncated: {size} bytes, its header needs {8 + n + end}")


def _check_gguf(p: Path) -> None:
    """The GGUF magic bytes, then the header, metadata and tensor table, and the size of the data."""
    if not p.is_file():
        raise UnknownModelError(f"GGUF file {p} does not exist")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise DataError(f"{p} is not a GGUF file (it does not start with the GGUF magic bytes)")
    why = gguf_layout_error(p)
    if why:
        raise DataError(f"{p} is a corrupt or truncated GGUF file: {why}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _file_errors() -> tuple[type[BaseException], ...]:
    """What the parsers of transformers, tokenizers, safetensors and gguf raise on a corrupt or
    inconsistent file (a config whose sizes disagree with the weights is a RuntimeError)."""
    import struct

    from safetensors import SafetensorError

    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError]
    errors += [struct.error, SafetensorError]
    try:
        from huggingface_hub.errors import StrictDataclassError  # a config field of the wrong type

        errors.append(StrictDataclassError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    return tuple(errors)


def _unknown(model: str) -> UnknownModelError:
    close = difflib.get_close_matches(model, list(zoo.ZOO), n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; zoo models: {', '.join(zoo.ZOO)}"
    return UnknownModelError(f"unknown model {model!r} (not a zoo name, folder, .gguf file or hub id){hint}")


def display_name(model: str) -> str:
    """The name a loaded MODEL carries (``hm.name``, a store's ``model.name``), without loading it."""
    p = Path(model).expanduser()
    if model in zoo.ZOO or ("+" in model and not p.exists()):
        return model
    if p.is_dir():
        return p.name
    if p.suffix == ".gguf":
        return p.stem
    return model


def check_model(model: str) -> None:
    """Check that MODEL names something loadable, without loading, pulling or converting it.

    Zoo names and hub ids are accepted by name (a hub id is fetched or found in the HF cache only when
    loaded); folders, ``.gguf`` files and organisms are checked on disk. Raises
    :class:`~rosettalens.errors.UnknownModelError` or :class:`~rosettalens.errors.DataError`.
    """
    if model in zoo.ZOO:
        return
    p = Path(check_path(model, "model"))
    if not p.exists():
        from .organism_names import is_organism_name, organism_dir

        if is_organism_name(model):
            if not organism_dir(model).is_dir():  # built on first use by the commands that build it
                check_model(model.rpartition("+")[0])
            return
    if p.is_dir():
        _check_folder(p)
        return
    if p.suffix == ".gguf":
        _check_gguf(p)
        return
    if p.exists():
        raise UnknownModelError(f"{p} is a file, not a model folder or a .gguf file")
    if _looks_like_path(model):
        raise UnknownModelError(f"no such model folder or file: {p}")
    if _HUB_ID.match(model):
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):  # offline: only the HF cache can serve it
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "config.json"), str):
                raise UnknownModelError(
                    f"hub model {model!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                    f"zoo models: {', '.join(zoo.ZOO)}"
                )
        return
    raise _unknown(model)


def resolve(model: str, pull: bool = True, progress: bool = True) -> tuple[str, Path | str]:
    """Return ``(display name, path or hub id)`` for a MODEL string; pulls zoo models if needed."""
    if model in zoo.ZOO:
        return model, (zoo.pull(model, progress=progress) if pull else zoo.model_dir(model))
    p = Path(model).expanduser()
    if not p.exists():  # an organism, BASE+task or a built one's --name (rosettalens.organisms)
        from .organism_names import is_organism_name, resolve_organism

        if is_organism_name(model):
            return resolve_organism(model)
    if p.is_dir():
        _check_folder(p)
        return p.name, p
    if p.suffix == ".gguf":
        _check_gguf(p)
        digest = sha256_file(p)
        dest = zoo.cache_root() / "models" / f"gguf-{digest[:16]}"
        try:
            zoo.check_cache(dest, digest)
        except CacheError:
            try:
                zoo.convert_gguf(p, dest, digest, p.stem)
            except _file_errors() as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                raise DataError(f"cannot convert GGUF file {p}: {_first_line(e)}") from e
        return p.stem, dest
    if p.exists():
        raise UnknownModelError(f"{p} is a file, not a model folder or a .gguf file")
    if _looks_like_path(model):
        raise UnknownModelError(f"no such model folder or file: {p}")
    if _HUB_ID.match(model):
        return model, model  # a hub id: transformers decides whether it is reachable or cached
    raise _unknown(model)


def load(
    model: str, device: Any = None, dtype: Any = None, device_map: str | None = None, progress: bool = True
):
    """Load MODEL as a HookedModel (eval mode, float32 by default).

    ``device_map="auto"`` spreads a large model over the available devices with ``accelerate``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hooks import HookedModel

    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ConfigError(f"--device-map {device_map!r}: choose from {', '.join(DEVICE_MAPS)}")
    dev = None if device_map else _device(device)
    name, where = resolve(model, progress=progress)
    dt = _dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": dt}
    if device_map:
        kwargs["device_map"] = device_map
    local = isinstance(where, Path)
    if not local:
        kwargs["local_files_only"] = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:  # --no-progress also hides transformers' weight-loading bar
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(
            str(where), **({} if local else {"local_files_only": kwargs.get("local_files_only", False)})
        )
        hf: Any = AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
    except _file_errors() as e:  # the user's files or names
        if isinstance(e, torch.OutOfMemoryError):
            raise
        msg = _first_line(e)
        if local:
            raise DataError(f"cannot load the model in {where}: {msg}") from e
        raise UnknownModelError(
            f"cannot load {model!r} from the hub or the HF cache ({msg}); zoo models: {', '.join(zoo.ZOO)}"
        ) from e
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    hf.eval()
    if dev is not None:
        hf.to(dev)
    return HookedModel(hf, tok, name=name)
