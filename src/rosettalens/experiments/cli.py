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
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import EXPERIMENTS
from .base import Experiment, _json_default, _make_config, run_experiment


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _field_type(f: dataclasses.Field) -> Any:
    t = str(f.type)
    if "bool" in t:
        return _parse_bool
    if "int" in t and "float" not in t:
        return int
    if "float" in t:
        return float
    return str


def _add_config_options(p: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        if f.name == "extras" or "dict" in str(f.type):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        p.add_argument(flag, dest=f.name, type=_field_type(f), default=None,
                       help=f"(default: {default})")  # fmt: skip


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
    p.add_argument("--config", help="a config.json to start from (options override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory (skips finished stages)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    _add_config_options(p, exp.config_cls)
    return exp, p


def _run(args: argparse.Namespace) -> int:
    # only the chosen experiment's module is imported (a broken or slow module elsewhere costs nothing)
    exp, parser = experiment_parser(args.experiment)
    args = parser.parse_args(args.rest)
    cfg = config_from_args(exp, args)
    summary = run_experiment(exp, cfg, resume=args.resume, progress=not args.json or sys.stderr.isatty())
    if args.json:
        print(json.dumps(summary, default=_json_default))
    else:
        exp.print_summary(summary)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="end-to-end experiments (each writes a run directory)")
    sub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name in EXPERIMENTS:
        # every remaining word goes to the experiment's own parser (no option prefix at this level)
        sp = sub.add_parser(
            name, add_help=False, prefix_chars="\x01", help=f"`rosetta run {name} --help`: its options"
        )
        sp.add_argument("rest", nargs="*")
        sp.set_defaults(func=_run)
