"""`rosetta run EXPERIMENT [--config FILE] [--resume RUN_DIR] [options] [--json]`.

One subcommand per entry of ``rosettalens.experiments.EXPERIMENTS``. Options are the fields of the
experiment's config dataclass; ``--config`` reads a saved ``config.json`` (e.g. from an earlier run
directory) and command-line options override it; ``--resume RUN_DIR`` continues a run in place,
skipping the stages whose outputs exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from .. import options as opt
from ..errors import ConfigError
from . import EXPERIMENTS
from .base import Experiment, _make_config, run_experiment

# config fields that name models (checked up front, without loading); "models" is comma-separated
MODEL_FIELDS = ("source", "target", "model", "models", "generate_model", "judge")
JUDGE_ROLES = ("target", "source", "none")
# config fields that are user prompt files (read as UTF-8 before any work)
PROMPT_FILE_FIELDS = ("harmful", "harmless", "harmful_eval", "harmless_eval", "eval_prompts")


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _base_types(cls: type, name: str) -> tuple[set[type], bool]:
    """The plain types a config field accepts and whether it may be None."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    plain = {typing.get_origin(a) or a for a in args if a is not type(None)}
    return plain, type(None) in args


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


def check_types(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Each value has its field's type (a JSON int is accepted for a float); ConfigError otherwise."""
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
    return out


def _add_config_options(p: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        if f.name == "extras" or "dict" in str(f.type):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        p.add_argument(flag, dest=f.name, type=_field_type(cls, f), default=None,
                       help=f.metadata.get("help", f"(default: {default})"))  # fmt: skip


def config_from_args(exp: Experiment, args: argparse.Namespace) -> Any:
    """The config: ``--config`` file (or the resumed run's config.json), then command-line options."""
    from .base import read_run_config

    values: dict[str, Any] = {}
    source = None
    if args.resume:
        named, values = read_run_config(args.resume)
        if named != exp.name:
            raise ConfigError(
                f"--resume {args.resume}: that directory holds a {named or 'unnamed'} run, not {exp.name}"
            )
        source = f"{args.resume}/config.json"
    if args.config:
        path = Path(args.config)
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
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(exp.config_cls)
        if getattr(args, f.name, None) is not None
    }
    if args.resume and not args.config and not overrides:
        return None  # the resumed run's own config
    values.update(overrides)
    return _make_config(exp.config_cls, values, source or "options")


def experiment_parser(name: str) -> tuple[Experiment, argparse.ArgumentParser]:
    """The experiment's own parser: ``--config``, ``--resume``, ``--json`` and one option per config field."""
    from ..cli import _Parser

    mod = importlib.import_module(EXPERIMENTS[name])
    exp: Experiment = mod.EXPERIMENT
    doc = (mod.__doc__ or "").strip()
    p = _Parser(prog=f"rosetta run {name}", description=doc.split("\n\n")[0])
    p.add_argument("--config", type=opt.path, help="a config.json to start from (options override it)")
    p.add_argument(
        "--resume",
        type=opt.path,
        metavar="RUN_DIR",
        help="continue this run directory (skips finished stages)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out as a whole (not with --resume)",
    )
    _add_config_options(p, exp.config_cls)
    return exp, p


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


def preflight(exp: Experiment, cfg: Any, args: argparse.Namespace) -> None:
    """Every check that needs no model: config values, devices, model names, prompt files, the output."""
    if cfg is None:
        return  # a resumed run's own config was checked when it started
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
    out = getattr(cfg, "out", None)
    if out and not args.resume:
        p = Path(opt.check_path(out, "--out"))
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {p} is a file; give a folder for the run")
        if (p / "config.json").is_file() and not args.overwrite:  # other files: the run goes beside them
            raise ConfigError(
                f"--out {p} already holds a run; pass --resume {p} to continue it or --overwrite to replace it"
            )


def _run(args: argparse.Namespace) -> int:
    # only the chosen experiment's module is imported (a broken or slow module elsewhere costs nothing)
    exp, parser = experiment_parser(args.experiment)
    args = parser.parse_args(args.rest)
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume exclude each other")
    cfg = config_from_args(exp, args)
    preflight(exp, cfg, args)
    progress = not args.json or sys.stderr.isatty()
    summary = run_experiment(exp, cfg, resume=args.resume, progress=progress, overwrite=args.overwrite)
    if args.json:
        opt.print_json(summary)
    else:
        exp.print_summary(summary)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="end-to-end experiments (each writes a run directory)")
    sub = p.add_subparsers(dest="experiment", required=True)
    for name in EXPERIMENTS:
        # every remaining word goes to the experiment's own parser (no option prefix at this level)
        sp = sub.add_parser(
            name, add_help=False, prefix_chars="\x01", help=f"`rosetta run {name} --help`: its options"
        )
        sp.add_argument("rest", nargs="*")
        sp.set_defaults(func=_run)
