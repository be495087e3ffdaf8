"""Up-front checks of a device, a device map, a dtype, a path and a prompt set, before any model is loaded.

Shared by the library (:mod:`rosettalens.models.loading`) and the command line
(:mod:`rosettalens.options` re-exports them): a bad value raises
:class:`~rosettalens.errors.ConfigError` (or argparse's usage error for the ``type=`` helper).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ConfigError, DataError

__all__ = [
    "DEVICE_MAPS",
    "DTYPES",
    "check_device",
    "check_path",
    "check_prompt_spec",
    "check_text_file",
    "device_map",
]

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
_NAME_MAX = 255  # bytes per path component on every common file system


def _check_path_text(s: str) -> str | None:
    if "\x00" in s:
        return "contains a NUL character"
    for part in Path(s).expanduser().parts:
        if len(part.encode()) > _NAME_MAX:
            return f"has a name of {len(part)} characters (the file system allows {_NAME_MAX})"
    return None


def check_path(s: str, what: str = "path") -> str:
    """A file or folder name the file system can hold (not required to exist); ConfigError if not."""
    why = _check_path_text(s)
    if why:
        raise ConfigError(f"{what} {s[:60]!r}... {why}")
    return s


def check_device(s: str | None, what: str = "--device") -> str | None:
    """``None``/``auto``/``cpu``/``cuda``/``cuda:N``/``mps``, and present on this machine."""
    if s is None or s == "auto":
        return s
    import torch

    try:
        d = torch.device(s)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{what} {s!r} is not a device; use cpu, cuda, cuda:N, mps or auto") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {s}: CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ConfigError(f"{what} {s}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{what} {s}: MPS is not available on this machine")
    elif d.type != "cpu":
        raise ConfigError(f"{what} {s!r}: unsupported device type; use cpu, cuda, cuda:N, mps or auto")
    return s


def device_map(s: str) -> str:
    """argparse type for ``--device-map`` (accelerate's strategies)."""
    if s not in DEVICE_MAPS:
        raise argparse.ArgumentTypeError(f"{s!r} is not a device map; choose from {', '.join(DEVICE_MAPS)}")
    return s


def check_text_file(p: str | os.PathLike[str], what: str) -> None:
    """An existing file that is valid UTF-8 (read once, cheaply, before any work); DataError if not."""
    f = Path(check_path(str(p), what))
    try:
        if not f.is_file():
            raise DataError(f"{what} {f} is not a file")
        f.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {f} is not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {what} {f}: {e.strerror or e}") from None


def check_prompt_spec(spec: str, what: str) -> None:
    """A prompt set before any model is loaded: a built-in set, an ``hf:`` alias or spec in the one
    syntax, or a readable UTF-8 ``.txt``/``.jsonl`` file (:func:`check_text_file`)."""
    from ..data.hfspec import parse_hf_spec
    from ..data.tasks import BUILTIN_SETS, HF_ALIASES

    if spec in BUILTIN_SETS:
        return
    if spec.startswith("hf:"):
        if spec[len("hf:") :].lower() not in HF_ALIASES:
            parse_hf_spec(spec)
        return
    check_text_file(spec, what)
