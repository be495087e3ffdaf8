"""Option types, up-front checks and the shared option definitions (``add_out``, ``add_overwrite``, ...) of every ``rosetta`` command.

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
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConfigError, DataError
from .io import check_output, json_safe
from .models.checks import (
    DEVICE_MAPS,
    DTYPES,
    check_device,
    check_path,
    check_prompt_spec,
    check_text_file,
    device_map,
)

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


def check_layers(model: str, layers: Iterable[int], what: str) -> None:
    """Layers of ``model`` against its layer count from metadata alone (the zoo's table, an organism's
    base, a folder's ``config.json``; :func:`~rosettalens.models.zoo.layers_of`), before any download
    or load; a model whose count only loading would tell is checked later. HookPointError if not."""
    from .errors import HookPointError
    from .models.zoo import layers_of

    n = layers_of(model)
    if n is None:
        return
    for layer in layers:
        if not -n <= layer < n:
            raise HookPointError(
                f"{what}: layer {layer} is out of range for {model}, which has {n} layers "
                f"(0..{n - 1}, or -{n}..-1 from the end)"
            )


def check_hook_layers(model: str, names: str | Iterable[str], what: str) -> None:
    """Hook-point names as written (:func:`check_hooks`) and their layers against ``model``'s layer
    count (:func:`check_layers`), before any download or load."""
    from .names import parse_hook_name

    if isinstance(names, str):
        names = [h.strip() for h in names.split(",") if h.strip()]
    names = list(names)
    check_hooks(names, what)
    layers = [layer for layer in (parse_hook_name(h)[1] for h in names) if layer is not None]
    check_layers(model, layers, what)


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


def check_models(names: Iterable[str | None]) -> None:
    """Resolve every model name a command will need, without loading or downloading anything.

    Unknown names, missing folders or files, a folder without a valid ``config.json``, a ``.gguf``
    file that is not GGUF: :class:`~rosettalens.errors.UnknownModelError` (or ``DataError``).
    """
    from .models.loading import check_model

    for name in dict.fromkeys(n for n in names if n):
        check_model(name)


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


# ---------------------------------------------------------------------------------------------------
# One set of option definitions for every hand-written command (docs/cli.md has the vocabulary table).
# Each ``add_*`` adds one option with its help text; ``aliases`` are old spellings, accepted but not
# listed by ``--help``, that print one deprecation line on stderr when used.


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores like the new one and says so on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        import sys

        print(f"rosetta: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_alias(p: argparse.ArgumentParser, old: str, action: argparse.Action) -> None:
    """Accept ``old`` as a hidden, deprecated spelling of ``action``'s option."""
    new = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
    kw: dict[str, Any] = {"dest": action.dest, "action": DeprecatedAlias, "new": new}
    kw.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if action.nargs == 0:
        kw.update(nargs=0, const=action.const if action.const is not None else True)
    else:
        kw.update(type=action.type, choices=action.choices, metavar=action.metavar, nargs=action.nargs)
    p.add_argument(old, **kw)


def add_option(
    p: argparse.ArgumentParser, *flags: str, aliases: Iterable[str] = (), **kw: Any
) -> argparse.Action:
    """``p.add_argument(*flags, **kw)`` plus hidden deprecated ``aliases``; a help text is required."""
    if not kw.get("help"):
        raise ValueError(f"option {flags[0]} needs a help text")
    action = p.add_argument(*flags, **kw)
    for old in aliases:
        add_alias(p, old, action)
    return action


def _default_note(default: Any) -> str:
    return "" if default is None else f" (default: {default})"


def add_out(
    p: argparse.ArgumentParser,
    help: str,
    *,
    required: bool = True,
    metavar: str = "DIR",
    default: str | None = None,
    aliases: Iterable[str] = (),
) -> argparse.Action:
    """``--out``: where the command writes (a folder or a file, as ``help`` says)."""
    return add_option(p, "--out", required=required, default=default, type=path, metavar=metavar,
                      help=help + _default_note(default), aliases=aliases)  # fmt: skip


def add_overwrite(
    p: argparse.ArgumentParser, what: str = "an existing --out as a whole", aliases: Iterable[str] = ()
) -> argparse.Action:
    """``--overwrite``: replace what ``--out`` names (never another kind of file or folder)."""
    return add_option(p, "--overwrite", action="store_true", help=f"replace {what}", aliases=aliases)


def add_json(p: argparse.ArgumentParser) -> argparse.Action:
    """``--json``: one JSON object on stdout, nothing else."""
    return add_option(p, "--json", action="store_true",
                      help="print one JSON object on stdout (nothing else; progress stays on stderr)")  # fmt: skip


def add_no_progress(p: argparse.ArgumentParser) -> argparse.Action:
    """``--no-progress``: no progress bars on stderr."""
    return add_option(p, "--no-progress", action="store_true", help="no progress bars on stderr")


def add_device(
    p: argparse.ArgumentParser, default_means: str = "cuda if available, else cpu"
) -> argparse.Action:
    """``--device``: cpu, cuda, cuda:N, mps or auto."""
    return add_option(p, "--device", type=device, default=None, metavar="DEVICE",
                      help=f"torch device: cpu, cuda, cuda:N, mps or auto (default: {default_means})")  # fmt: skip


def add_dtype(p: argparse.ArgumentParser, what: str = "model compute dtype") -> argparse.Action:
    """``--dtype``: the model's compute dtype."""
    return add_option(p, "--dtype", type=dtype, default=None, metavar="{" + ",".join(DTYPES) + "}",
                      help=f"{what} (default: float32)")  # fmt: skip


def add_device_map(p: argparse.ArgumentParser) -> argparse.Action:
    """``--device-map``: spread a large model over devices with accelerate."""
    return add_option(p, "--device-map", type=device_map, default=None, metavar="{" + ",".join(DEVICE_MAPS) + "}",
                      help="spread a large model over the devices with accelerate (default: one device)")  # fmt: skip


def add_seed(
    p: argparse.ArgumentParser, default: int | None = 0, what: str = "random seed"
) -> argparse.Action:
    """``--seed``."""
    return add_option(p, "--seed", type=int, default=default, metavar="N", help=what + _default_note(default))


MODEL_HELP = "zoo name (rosetta models list), local HF folder, .gguf file or hub id"


def add_model(
    p: argparse.ArgumentParser,
    flag: str = "--model",
    *,
    required: bool = True,
    default: str | None = None,
    help: str = MODEL_HELP,
    metavar: str = "MODEL",
) -> argparse.Action:
    """A model option (or positional when ``flag`` has no dashes)."""
    if not flag.startswith("-"):
        return add_option(p, flag, type=path, metavar=metavar, help=help)
    return add_option(p, flag, required=required, default=default, type=path, metavar=metavar,
                      help=help + _default_note(default))  # fmt: skip


def add_hook(
    p: argparse.ArgumentParser,
    flag: str = "--hook",
    *,
    required: bool = True,
    default: str | None = None,
    help: str = "hook point, e.g. resid_post.10 (negative layers count from the end)",
) -> argparse.Action:
    """A hook-point option."""
    return add_option(p, flag, required=required, default=default, metavar="HOOK", help=help)


def add_data(
    p: argparse.ArgumentParser,
    *,
    required: bool = True,
    default: str | None = None,
    help: str = "documents: built-in dataset name (rosetta data list), .txt (one per line), .jsonl or hf:<id>",
) -> argparse.Action:
    """``--data``: a document source."""
    return add_option(p, "--data", required=required, default=default, type=data_spec, metavar="D",
                      help=help + _default_note(default))  # fmt: skip


def add_max_tokens(
    p: argparse.ArgumentParser,
    default: int | None,
    help: str = "stop after this many tokens",
    aliases: Iterable[str] = (),
) -> argparse.Action:
    """``--max-tokens``: a token count (old spellings ``--tokens``, ``--n-tokens`` as aliases)."""
    return add_option(p, "--max-tokens", type=positive_int, default=default, metavar="N",
                      help=help + _default_note(default), aliases=aliases)  # fmt: skip


def add_max_length(p: argparse.ArgumentParser, default: int | None) -> argparse.Action:
    """``--max-length``: tokens per document."""
    return add_option(p, "--max-length", type=positive_int, default=default, metavar="N",
                      help="truncate each document to this many tokens" + _default_note(default))  # fmt: skip


def add_max_new_tokens(p: argparse.ArgumentParser, default: int) -> argparse.Action:
    """``--max-new-tokens``: generated tokens per prompt."""
    return add_option(p, "--max-new-tokens", type=positive_int, default=default, metavar="N",
                      help="tokens generated per prompt" + _default_note(default))  # fmt: skip


def add_n_prompts(
    p: argparse.ArgumentParser,
    default: int | None,
    help: str = "prompts to use",
    aliases: Iterable[str] = (),
) -> argparse.Action:
    """``--n-prompts``: a prompt count (old spellings ``--n``, ``--limit`` as aliases)."""
    return add_option(p, "--n-prompts", type=positive_int, default=default, metavar="N",
                      help=help + _default_note("all" if default is None else default), aliases=aliases)  # fmt: skip


def add_batch_size(p: argparse.ArgumentParser, default: int, what: str = "documents") -> argparse.Action:
    """``--batch-size``: items per forward pass."""
    return add_option(p, "--batch-size", type=positive_int, default=default, metavar="B",
                      help=f"{what} per forward pass" + _default_note(default))  # fmt: skip


def add_heldout(p: argparse.ArgumentParser, default: float, what: str = "documents") -> argparse.Action:
    """``--heldout``: the fraction held out for evaluation (old spelling ``--eval-fraction``)."""
    return add_option(p, "--heldout", type=fraction_open, default=default, metavar="F",
                      help=f"fraction of the {what} held out for evaluation" + _default_note(default),
                      aliases=("--eval-fraction",))  # fmt: skip


def add_skip_first(p: argparse.ArgumentParser, default: int) -> argparse.Action:
    """``--skip-first``: positions at the start of each document left out (old spelling ``--min-pos``)."""
    return add_option(p, "--skip-first", type=nonneg_int, default=default, metavar="P",
                      help="leave out the first P positions of each document (attention sinks)"
                      + _default_note(default), aliases=("--min-pos",))  # fmt: skip
