"""Option types and up-front checks shared by every ``rosetta`` command (one definition each).

The ``type=`` helpers turn a bad value into argparse's usage error, which :mod:`rosettalens.cli`
prints as one line ``rosetta: error: ...`` with exit status 2, before any model is loaded or store
read. The ``check_*`` helpers are called by a command after parsing and still before any work:
:func:`check_models` resolves every model name a command will need without loading it,
:func:`check_output` refuses an existing output unless ``--overwrite``. :func:`print_json` is the
one way a command prints its ``--json`` object (never NaN: that is not JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .io import check_output, json_safe

__all__ = [
    "DEVICE_MAPS",
    "DTYPES",
    "data_spec",
    "device_map",
    "dtype",
    "check_device",
    "check_models",
    "check_output",
    "check_hooks",
    "check_path",
    "check_prompt_spec",
    "check_text_file",
    "device",
    "finite_float",
    "fraction_open",
    "fraction_closed",
    "fraction_upto1",
    "json_safe",
    "nonneg_float",
    "nonneg_int",
    "one_line",
    "path",
    "positive_float",
    "positive_int",
    "print_json",
    "to_json",
]

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
_NAME_MAX = 255  # bytes per path component on every common file system


def one_line(e: BaseException | str) -> str:
    """The first non-empty line of an error's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _number(kind: Callable[[str], Any], s: str) -> Any:
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {s!r}"
        ) from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def positive_int(s: str) -> int:
    """An integer >= 1."""
    v = _number(int, s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(s: str) -> int:
    """An integer >= 0."""
    v = _number(int, s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def finite_float(s: str) -> float:
    """Any finite number (no nan, no inf)."""
    return float(_number(float, s))


def positive_float(s: str) -> float:
    """A finite number > 0."""
    v = finite_float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def nonneg_float(s: str) -> float:
    """A finite number >= 0."""
    v = finite_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def fraction_open(s: str) -> float:
    """A fraction strictly between 0 and 1."""
    v = finite_float(s)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {s}")
    return v


def fraction_closed(s: str) -> float:
    """A fraction in [0, 1)."""
    v = finite_float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def fraction_upto1(s: str) -> float:
    """A fraction in (0, 1]."""
    v = finite_float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


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


def path(s: str) -> str:
    """argparse type of :func:`check_path`."""
    try:
        return check_path(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def data_spec(s: str) -> str:
    """A ``--data`` value: a built-in name, an ``hf:`` spec in the one syntax (checked by
    :func:`~rosettalens.data.sources.parse_hf_spec`) or a file name (checked as :func:`path`)."""
    if not s.startswith("hf:"):
        return path(s)
    from .data.sources import parse_hf_spec

    try:
        parse_hf_spec(s)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def check_hooks(names: str | Iterable[str] | None, what: str) -> None:
    """Hook-point names (a list or comma-separated) as written, before any model is loaded
    (:func:`rosettalens.hooks.check_hook_name`; the layer range is checked against the model later)."""
    from .errors import HookPointError
    from .names import check_hook_name

    if isinstance(names, str):
        names = [h.strip() for h in names.split(",") if h.strip()]
    for name in names or ():
        try:
            check_hook_name(name)
        except HookPointError as e:
            raise HookPointError(f"{what}: {e}") from None


def check_prompt_spec(spec: str, what: str) -> None:
    """A prompt set before any model is loaded: a built-in set, an ``hf:`` alias or spec in the one
    syntax, or a readable UTF-8 ``.txt``/``.jsonl`` file (:func:`check_text_file`)."""
    from .data.sources import parse_hf_spec
    from .data.tasks import BUILTIN_SETS, HF_ALIASES

    if spec in BUILTIN_SETS:
        return
    if spec.startswith("hf:"):
        if spec[len("hf:") :].lower() not in HF_ALIASES:
            parse_hf_spec(spec)
        return
    check_text_file(spec, what)


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


def device(s: str) -> str:
    """argparse type for ``--device`` (see :func:`check_device`)."""
    try:
        return check_device(s, "device") or s
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device ")) from None


def dtype(s: str) -> str:
    """argparse type for a model's ``--dtype``."""
    if s not in DTYPES:
        raise argparse.ArgumentTypeError(f"{s!r} is not a dtype; choose from {', '.join(DTYPES)}")
    return s


def device_map(s: str) -> str:
    """argparse type for ``--device-map`` (accelerate's strategies)."""
    if s not in DEVICE_MAPS:
        raise argparse.ArgumentTypeError(f"{s!r} is not a device map; choose from {', '.join(DEVICE_MAPS)}")
    return s


def check_models(names: Iterable[str | None]) -> None:
    """Resolve every model name a command will need, without loading or downloading anything.

    Unknown names, missing folders or files, a folder without a valid ``config.json``, a ``.gguf``
    file that is not GGUF: :class:`~rosettalens.errors.UnknownModelError` (or ``DataError``).
    """
    from .models.loading import check_model

    for name in dict.fromkeys(n for n in names if n):
        check_model(name)


def check_text_file(p: str | os.PathLike[str], what: str) -> None:
    """An existing file that is valid UTF-8 (read once, cheaply, before any work)."""
    f = Path(check_path(str(p), what))
    try:
        if not f.is_file():
            raise DataError(f"{what} {f} is not a file")
        f.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {f} is not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {what} {f}: {e.strerror or e}") from None


def _default(o: Any) -> Any:
    import dataclasses

    if hasattr(o, "tolist"):  # tensors, numpy arrays and scalars
        return o.tolist()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    return str(o)  # paths, dtypes, devices


def to_json(obj: Any, indent: int | None = None) -> str:
    """The one JSON encoding of a command's result: NaN/inf -> null, tensors -> lists."""
    return json.dumps(
        json_safe(json.loads(json.dumps(obj, default=_default))), allow_nan=False, indent=indent
    )


def print_json(obj: Any) -> None:
    """Print a command's ``--json`` object: one line, valid JSON (``allow_nan=False``)."""
    print(to_json(obj))
