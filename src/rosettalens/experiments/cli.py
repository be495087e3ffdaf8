"""`rosetta run EXPERIMENT [--config FILE] [options] [--json]`.

Options are the fields of the experiment's config dataclass; `--config` reads a saved `config.json`
(e.g. from an earlier run directory) and command-line options override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _field_type(f: dataclasses.Field) -> Any:
    t = str(f.type)
    if "int" in t and "float" not in t:
        return int
    if "float" in t:
        return float
    return str


def _add_config_options(p: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        if f.name == "extras":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        p.add_argument(flag, dest=f.name, type=_field_type(f), default=None,
                       help=f"(default: {default})")  # fmt: skip


def _run_refusal_transfer(args: argparse.Namespace) -> int:
    from .refusal_transfer import RefusalTransferConfig, run

    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        known = {f.name for f in dataclasses.fields(RefusalTransferConfig)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"config {path} has unknown fields: {', '.join(sorted(unknown))}")
    for f in dataclasses.fields(RefusalTransferConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    cfg = RefusalTransferConfig(**values)
    results = run(cfg, progress=not args.json or sys.stderr.isatty())
    if args.json:
        print(json.dumps(results, default=str))
    else:
        r = results["refusal_rate"]
        print(f"{results['source']} -> {results['target']}  ({results['layers']['source']} -> {results['layers']['target']}, "
              f"{results['mapper']['kind']} mapper, held-out FVU {results['mapper']['fvu']:.3f})")  # fmt: skip
        print(f"harmful refusal rate: baseline {r['baseline']:.2f}  native ablated {r['native']:.2f}  "
              f"transferred ablated {r['transferred']:.2f}  random ablated {r['random']:.2f}")  # fmt: skip
        h = results["harmless"]
        print(f"harmless: refusal {h['refusal_rate_baseline']:.2f} -> {h['refusal_rate_transferred']:.2f} "
              f"(KL {h['kl_transferred']:.4f}); induced refusal {results['induced_refusal_rate']:.2f}")  # fmt: skip
        print(f"run directory: {results['run_dir']} (report.html)")
    return 0


def register(subparsers) -> None:
    from .refusal_transfer import RefusalTransferConfig

    p = subparsers.add_parser("run", help="end-to-end experiments (each writes a run directory)")
    sub = p.add_subparsers(dest="experiment", required=True)
    rt = sub.add_parser(
        "refusal-transfer",
        help="carry a source model's refusal direction through a mapper and ablate/add it in a target",
        description=(
            __import__("rosettalens.experiments.refusal_transfer", fromlist=["x"]).__doc__ or ""
        ).split("\n\n")[0],
    )
    rt.add_argument("--config", help="a config.json to start from (options override it)")
    rt.add_argument("--json", action="store_true", help="print one JSON object with the results")
    _add_config_options(rt, RefusalTransferConfig)
    rt.set_defaults(func=_run_refusal_transfer)
