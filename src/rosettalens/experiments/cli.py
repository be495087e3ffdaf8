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
import importlib
import json
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import options as opt
from ..config import field_help, field_shown_default
from ..errors import ConfigError
from . import EXPERIMENTS
from .base import Experiment, _make_config, run_experiment

# config fields that name models (checked up front, without loading); "models" is comma-separated
MODEL_FIELDS = ("source", "target", "model", "models", "generate_model", "judge")
JUDGE_ROLES = ("target", "source", "none")
# config fields that are user prompt files (read as UTF-8 before any work)
PROMPT_FILE_FIELDS = ("harmful", "harmless", "harmful_eval", "harmless_eval", "eval_prompts")
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
def _hint_args(cls: type, name: str) -> tuple[tuple[Any, ...], bool]:
    """The alternatives of a field's type hint (``X | None`` -> ``(X,)``) and whether None is allowed."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(a for a in args if a is not type(None)), type(None) in args


def field_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The values of a ``Literal[...]`` field (None for other types)."""
    args, _ = _hint_args(cls, name)
    values: list[Any] = []
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            values += typing.get_args(a)
        else:
            return None
    return tuple(values) or None


def _base_types(cls: type, name: str) -> tuple[set[type], bool]:
    """The plain types a config field accepts and whether it may be None."""
    args, nullable = _hint_args(cls, name)
    plain: set[type] = set()
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            plain |= {type(v) for v in typing.get_args(a)}
        else:
            plain.add(typing.get_origin(a) or a)
    return plain, nullable


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    plain, _ = _base_types(cls, f.name)
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
    plain, _ = _base_types(cls, f.name)
    return plain == {bool}


def check_types(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Each value has its field's type and, for a ``Literal`` field, one of its values (a JSON int is
    accepted for a float); ConfigError otherwise."""
    out = dict(values)
    for name, v in values.items():
        try:
            plain, nullable = _base_types(cls, name)
        except KeyError:
            continue  # unknown fields: _make_config names them
        if (v is None and nullable) or Any in plain:
            continue
        if float in plain and isinstance(v, int) and not isinstance(v, bool):
            out[name] = float(v)
            continue
        if int in plain and isinstance(v, bool) and bool not in plain:
            ok = False
        else:
            ok = any(isinstance(v, t) for t in plain)
        if not ok:
            want = " or ".join(sorted(t.__name__ for t in plain)) + (" or null" if nullable else "")
            raise ConfigError(f"{where}: {name} must be {want}, got {json.dumps(v)[:40]}")
        choices = field_choices(cls, name)
        if choices is not None and v not in choices:
            raise ConfigError(f"{where}: {name} {v!r} is not one of {', '.join(map(str, choices))}")
    return out


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
def load_experiment(name: str) -> tuple[Experiment, types.ModuleType]:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    mod = importlib.import_module(EXPERIMENTS[name])
    return mod.EXPERIMENT, mod


def summary_line(exp: Experiment, mod: types.ModuleType | None = None) -> str:
    """One line: what the experiment does (``summary_line`` or its docstring's first line)."""
    line = getattr(exp, "summary_line", "") or ""
    if not line and mod is not None:
        para = " ".join((mod.__doc__ or "").strip().split("\n\n")[0].split())
        line = re.split(r"(?<!\bal)\.\s+(?=[A-Z])", para)[0]  # the first sentence ("et al. 2025" is none)
    line = " ".join(line.split()).rstrip(".")
    if len(line) > 110:
        line = line[:107].rsplit(" ", 1)[0] + " ..."
    return line or exp.name


def plan_of(exp: Experiment, cfg: Any) -> dict[str, Any] | None:
    """The experiment's plan for ``cfg`` (None when it defines none)."""
    plan = getattr(exp, "plan", None)
    if plan is None:
        return None
    out = plan(cfg)
    return out if isinstance(out, dict) else None


def cost_text(plan: dict[str, Any] | None) -> str:
    """``about 9 min, peak 2.8 GB`` from a plan ("" when it says neither)."""
    if not plan:
        return ""
    parts = []
    if plan.get("minutes") is not None:
        m = float(plan["minutes"])
        parts.append(f"about {m:.0f} min" if m >= 1 else "under a minute")
    if plan.get("peak_gb") is not None:
        parts.append(f"peak {float(plan['peak_gb']):.1f} GB")
    return ", ".join(parts)


def plan_text(plan: dict[str, Any]) -> str:
    """``plan: pulls X, uses Y, builds Z; about 9 min, peak 2.8 GB; NOTES``."""
    from ..models import zoo

    models = list(dict.fromkeys(m for m in plan.get("models") or [] if m))
    pulls = [m for m in models if m in zoo.ZOO and not zoo.is_cached(m)]
    uses = [m for m in models if m not in pulls]
    what = []
    if pulls:
        what.append("pulls " + ", ".join(pulls))
    if uses:
        what.append("uses " + ", ".join(uses))
    if plan.get("organisms_to_build"):
        what.append("builds " + ", ".join(plan["organisms_to_build"]))
    pieces = [", ".join(what), cost_text(plan), str(plan.get("notes") or "")]
    return "plan: " + "; ".join(p for p in pieces if p)


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
    from ..cli import _Parser

    exp, mod = load_experiment(name)
    doc = (mod.__doc__ or "").strip()
    p = _Parser(
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


def config_from_values(
    exp: Experiment,
    options: dict[str, Any],
    *,
    config: str | None = None,
    preset: str | None = None,
    resume: str | None = None,
) -> Any:
    """The config: defaults < ``config`` file (or the resumed run's config.json) < ``preset`` < options.

    None for a resume with nothing given (the run's own config). Unknown fields, wrong types and
    values outside a ``Literal`` field's choices raise :class:`ConfigError`."""
    from .base import read_run_config

    values: dict[str, Any] = {}
    source = None
    if resume:
        named, values = read_run_config(resume)
        if named != exp.name:
            raise ConfigError(
                f"--resume {resume}: that directory holds a {named or 'unnamed'} run, not {exp.name}"
            )
        source = f"{resume}/config.json"
    if config:
        path = Path(config)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} is not a JSON object")
        named = values.pop("experiment", exp.name)
        if named != exp.name:
            raise ConfigError(f"config {path} is for the {named} experiment, not {exp.name}")
        source = str(path)
        values = check_types(exp.config_cls, values, f"config {path}")
    if preset is not None:
        presets = getattr(exp, "presets", None) or {}
        if preset not in presets:
            avail = ", ".join(presets) or "none"
            raise ConfigError(f"{exp.name} has no preset {preset!r}; presets: {avail}")
        values.update(check_types(exp.config_cls, dict(presets[preset]), f"preset {preset}"))
    known = {f.name for f in dataclasses.fields(exp.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"{exp.name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}"
        )
    overrides = check_types(exp.config_cls, {k: v for k, v in options.items() if v is not None}, "options")
    if resume and not config and preset is None and not overrides:
        return None  # the resumed run's own config
    values.update(overrides)
    return _make_config(exp.config_cls, values, source or "options")


def config_from_args(exp: Experiment, args: argparse.Namespace) -> Any:
    """The config of a parsed command line (see :func:`config_from_values`)."""
    options = {f.name: getattr(args, f.name, None) for f in config_fields(exp.config_cls)}
    return config_from_values(
        exp, options, config=args.config, preset=getattr(args, "preset", None), resume=args.resume
    )


def _model_names(cfg: Any) -> list[str]:
    names: list[str] = []
    for field in MODEL_FIELDS:
        v = getattr(cfg, field, None)
        if not isinstance(v, str) or not v:
            continue
        if field == "judge" and v in JUDGE_ROLES:
            continue
        names += [m.strip() for m in v.split(",")] if field == "models" else [v]
    return names


def preflight(
    exp: Experiment,
    cfg: Any,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    reuse: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Every check that needs no model: config values, layer ranges (from the zoo's metadata or a
    folder's config.json), devices, model names, prompt and task files, the output folder, the runs
    given to ``--reuse``."""
    from .base import reuse_runs

    if reuse:
        out = getattr(cfg, "out", None) if cfg is not None else None
        reuse_runs(exp, reuse, Path(resume or out or "runs/.new"))
    if cfg is None:
        return  # a resumed run's own config was checked when it started
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other")
    if hasattr(cfg, "validate"):
        cfg.validate()
    opt.check_device(getattr(cfg, "device", None))
    dtype = getattr(cfg, "dtype", None)
    if dtype is not None and dtype not in opt.DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose from {', '.join(opt.DTYPES)}")
    for field in PROMPT_FILE_FIELDS:
        v = getattr(cfg, field, None)
        if v:  # a built-in set, an hf: set in the one syntax, or a readable UTF-8 file
            opt.check_prompt_spec(v, "--" + field.replace("_", "-"))
    opt.check_models(_model_names(cfg))
    exp.check_layers(cfg)
    task_file = getattr(cfg, "task_file", None)
    if task_file:
        from ..circuits.tasks import load_task_file

        load_task_file(task_file)
    out = getattr(cfg, "out", None)
    if out and not resume:
        p = Path(opt.check_path(out, "--out"))
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {p} is a file; give a folder for the run")
        if (p / "config.json").is_file() and not overwrite:  # other files: the run goes beside them
            raise ConfigError(
                f"--out {p} already holds a run; pass --resume {p} to continue it or --overwrite to replace it"
            )


def print_plan(exp: Experiment, cfg: Any) -> None:
    """The experiment's plan on stderr (nothing when it defines none)."""
    plan = plan_of(exp, cfg) if cfg is not None else None
    if plan:
        print(plan_text(plan), file=sys.stderr)


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
