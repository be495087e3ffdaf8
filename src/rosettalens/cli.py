"""The `rosetta` command. Each package registers its own subcommands (see `_COMMAND_MODULES`).

Contract: `--json` prints exactly one JSON object on stdout; progress goes to stderr;
bad input exits with status 2 and one clear line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import RosettaError

_COMMAND_MODULES = [
    "rosettalens.models.cli",
    "rosettalens.store_cli",
    "rosettalens.similarity.cli",
    "rosettalens.steering.cli",
    "rosettalens.mapping.cli",
    "rosettalens.experiments.cli",
    "rosettalens.circuits.cli",
    "rosettalens.sae.cli",
    "rosettalens.organisms.cli",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own status for usage errors)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rosetta", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="rosettalens " + _version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RosettaError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rosetta: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rosetta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
