"""`rosetta run EXPERIMENT [--config FILE] [--preset NAME] [--resume RUN_DIR] [--reuse RUN_DIR..] [options]`.

One subcommand per entry of ``rosettalens.experiments.EXPERIMENTS``. The options are generated from
the experiment's config dataclass: each field's help, shown default, aliases and metavar come from its
:func:`rosettalens.config.option` metadata, its choices from a ``Literal[...]`` type (checked by
argparse and listed by ``--help``), and a ``bool`` field is a flag pair ``--x/--no-x``. Values come,
later ones winning, from the config class's defaults, ``--config FILE`` (or the resumed run's
``config.json``), ``--preset NAME`` and the command line. Everything checkable without a model
(values, layer ranges from the zoo's metadata, model names, prompt and task files, the output
folder) is checked before any download, model load or store read; then the experiment's plan (models
to pull, organisms to build, minutes, peak memory) is printed on stderr and the run starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from .. import options as opt
from ..config import field_help, field_shown_default
from ..errors import ConfigError
from .base import Experiment, run_experiment
from .runner import (
    EXPERIMENTS,
    MODEL_FIELDS,
    PROMPT_FILE_FIELDS,
    base_types,
    check_types,
    config_from_values,
    cost_text,
    field_choices,
    load_experiment,
    plan_of,
    preflight,
    print_plan,
    summary_line,
)

__all__ = [
    "bool_flags",
    "check_types",
    "config_fields",
    "config_from_args",
    "config_from_values",
    "experiment_help",
    "experiment_parser",
    "field_choices",
    "preflight",
    "register",
]

BOOL_WORDS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
SKIPPED_FIELDS = ("extras",)  # free-form dicts: only through --config


def _parse_bool(s: str) -> bool:
    v = BOOL_WORDS.get(s.strip().lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return v


# ------------------------------------------------------------------------------------- field types
def _field_type(cls: type, f: dataclasses.Field) -> Any:
    plain, _ = base_types(cls, f.name)
    if bool in plain:
        return _parse_bool
    if int in plain and float not in plain:
        return int
    if float in plain:
        return opt.finite_float
    if f.name == "device":
        return opt.device
    if f.name == "dtype":
        return opt.dtype
    return str


def _is_bool(cls: type, f: dataclasses.Field) -> bool:
    plain, _ = base_types(cls, f.name)
    return plain == {bool}


def _help_text(name: str, f: dataclasses.Field) -> str:
    """A field's help with its shown default (``runs/NAME-TIMESTAMP`` for ``out``); '%' escaped."""
    text = field_help(f)
    shown = field_shown_default(f)
    if shown is None and f.name == "out":
        shown = f"runs/{name}-TIMESTAMP"
    note = f"(default: {shown})" if shown not in (None, "") else ""
    text = f"{text} {note}".strip() if text else note
    return text.replace("%", "%%")


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are command-line options."""
    return [f for f in dataclasses.fields(cls) if f.name not in SKIPPED_FIELDS and "dict" not in str(f.type)]


def _add_config_options(p: argparse.ArgumentParser, cls: type, name: str) -> None:
    for f in config_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        aliases = list(meta.get("aliases", ()))
        help_text = argparse.SUPPRESS if meta.get("hidden") else _help_text(name, f)
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if _is_bool(cls, f):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _field_type(cls, f)
            choices = field_choices(cls, f.name)
            if choices is not None:
                kw["choices"] = choices
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
            elif choices is None and kw["type"] in (int, opt.finite_float):
                kw["metavar"] = "N" if kw["type"] is int else "X"
            elif f.name == "dtype":
                kw["metavar"] = "{" + ",".join(opt.DTYPES) + "}"
            elif f.name in MODEL_FIELDS and choices is None:
                kw["metavar"] = "MODEL[,MODEL..]" if f.name == "models" else "MODEL"
            elif f.name in PROMPT_FILE_FIELDS:
                kw["metavar"] = "PROMPTS"
            elif f.name == "out" or f.name.endswith("_dir"):
                kw["metavar"] = "DIR"
            elif f.name.endswith(("_file", "_prompts")):
                kw["metavar"] = "FILE"
        action = p.add_argument(flag, **kw)
        for alias in aliases:
            old = alias if alias.startswith("-") else "--" + alias.replace("_", "-")
            if not _is_bool(cls, f):
                opt.add_alias(p, old, action)
                continue
            for spelled, value, new in ((old, True, flag), ("--no-" + old[2:], False, "--no-" + flag[2:])):
                p.add_argument(spelled, dest=f.name, action=opt.DeprecatedAlias, new=new, nargs=0, const=value,
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip


def bool_flags(cls: type) -> set[str]:
    """The ``--x`` spellings of the config's bool fields (their aliases included)."""
    flags = set()
    for f in config_fields(cls):
        if _is_bool(cls, f):
            flags.add("--" + f.name.replace("_", "-"))
            flags.update(
                a if a.startswith("-") else "--" + a.replace("_", "-") for a in f.metadata.get("aliases", ())
            )
    return flags


def _bool_words(argv: Sequence[str], flags: set[str]) -> list[str]:
    """The old spelling ``--x true|false`` (or ``--x=false``) as ``--x`` / ``--no-x``, with a
    deprecation line on stderr."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        flag, eq, word = a.partition("=")
        if flag in flags and (eq or (i + 1 < len(argv) and argv[i + 1].lower() in BOOL_WORDS)):
            if not eq:
                word = argv[i + 1]
                i += 1
            value = BOOL_WORDS.get(word.lower())
            if value is None:
                raise ConfigError(f"{flag} takes no value (use {flag} or --no-{flag[2:]}), got {word!r}")
            new = flag if value else "--no-" + flag[2:]
            print(f"rosetta: warning: {flag} {word} is deprecated; use {new}", file=sys.stderr)
            out.append(new)
        else:
            out.append(a)
        i += 1
    return out


# --------------------------------------------------------------------------------- one experiment
def _as_flags(values: dict[str, Any]) -> str:
    """``{"mode": "erase", "controls": False}`` as ``--mode erase --no-controls``."""
    out = []
    for f, v in values.items():
        flag = f.replace("_", "-")
        out.append((f"--{flag}" if v else f"--no-{flag}") if isinstance(v, bool) else f"--{flag} {v}")
    return " ".join(out)


def experiment_parser(name: str) -> tuple[Experiment, argparse.ArgumentParser]:
    """The experiment's own parser: ``--config``, ``--preset``, ``--resume``, ``--overwrite``, ``--json``,
    ``--no-progress`` and one option per config field."""
    from ..cli import Parser

    exp, mod = load_experiment(name)
    doc = (mod.__doc__ or "").strip()
    p = Parser(
        prog=f"rosetta run {name}",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt.add_option(p, "--config", type=opt.path, metavar="FILE",
                   help="a config.json to start from, e.g. an earlier run's (options override it)")  # fmt: skip
    presets = dict(getattr(exp, "presets", None) or {})
    if presets:
        lines = "; ".join(f"{k}: " + _as_flags(vals) for k, vals in presets.items())
        opt.add_option(p, "--preset", choices=list(presets), default=None,
                       help=f"a named set of options (options given beside it win): {lines}".replace("%", "%%"))  # fmt: skip
    opt.add_option(p, "--resume", type=opt.path, metavar="RUN_DIR",
                   help="continue this run directory (finished stages are skipped)")  # fmt: skip
    opt.add_option(p, "--reuse", nargs="+", action="extend", type=opt.path, metavar="RUN_DIR", default=[],
                   help="earlier run directories whose stages this run takes instead of recomputing them, "
                   "where their config.json agrees on what the stage depends on")  # fmt: skip
    opt.add_overwrite(p, "an earlier run in --out as a whole (not with --resume)")
    opt.add_json(p)
    opt.add_no_progress(p)
    _add_config_options(p, exp.config_cls, name)
    return exp, p


def config_from_args(exp: Experiment, args: argparse.Namespace) -> Any:
    """The config of a parsed command line (see :func:`config_from_values`)."""
    options = {f.name: getattr(args, f.name, None) for f in config_fields(exp.config_cls)}
    return config_from_values(
        exp, options, config=args.config, preset=getattr(args, "preset", None), resume=args.resume
    )


def _run(args: argparse.Namespace) -> int:
    # only the chosen experiment's module is imported (a broken or slow module elsewhere costs nothing)
    exp, parser = experiment_parser(args.experiment)
    args = parser.parse_args(_bool_words(args.rest, bool_flags(exp.config_cls)))
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume exclude each other")
    cfg = config_from_args(exp, args)
    preflight(exp, cfg, resume=args.resume, overwrite=args.overwrite, reuse=args.reuse)
    print_plan(exp, cfg)
    progress = not args.no_progress and (not args.json or sys.stderr.isatty())
    summary = run_experiment(
        exp, cfg, resume=args.resume, progress=progress, overwrite=args.overwrite, reuse=args.reuse
    )
    if args.json:
        opt.print_json(summary)
    else:
        exp.print_summary(summary)
    return 0


def experiment_help(name: str) -> str:
    """``rosetta run --help``'s line for one experiment: what it does and what it costs."""
    try:
        exp, mod = load_experiment(name)
        line = summary_line(exp, mod)
        cost = cost_text(plan_of(exp, exp.config_cls()))
    except Exception as e:  # a broken module still lists, with why
        return f"(cannot load: {opt.one_line(e)})"
    return f"{line} [{cost}]" if cost else line


class _RunHelp(argparse.ArgumentParser):
    """``rosetta run --help``: one line per experiment, what it does and what it costs."""

    def format_help(self) -> str:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    choice.help = experiment_help(choice.dest).replace("%", "%%")
        return super().format_help()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="end-to-end experiments, each writing a run directory (`rosetta run --help` lists them)",
        description="Run one experiment end to end into a run directory (config.json, results.json, plots, "
        "report.html). `rosetta run NAME --help` lists its options.",
    )
    # its --help imports every experiment to say what each does and costs (other commands import none)
    p.__class__ = type("RunParser", (_RunHelp, type(p)), {})
    sub = p.add_subparsers(dest="experiment", required=True, title="experiments")
    for name in EXPERIMENTS:
        # every remaining word goes to the experiment's own parser (no option prefix at this level)
        sp = sub.add_parser(name, add_help=False, prefix_chars="\x01", help=f"`rosetta run {name} --help`")
        sp.add_argument("rest", nargs="*")
        sp.set_defaults(func=_run)
