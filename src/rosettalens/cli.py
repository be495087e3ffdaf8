"""The `rosetta` command: representation universality across language models.

Where each subcommand lives: models -> models/cli.py; extract, data -> data/cli.py; compare ->
similarity/cli.py; steer -> steering/cli.py; map -> mapping/cli.py; run -> experiments/cli.py;
circuits -> circuits/cli.py; sae -> sae/cli.py; organisms -> organisms/cli.py. The options shared
by every command (``--out``, ``--overwrite``, ``--json``, ``--no-progress``, ``--device``, ...) are
defined once in options.py; docs/cli.md has the vocabulary.

Contract: `--json` prints exactly one JSON object on stdout; progress goes to stderr; bad input
(argparse errors included) prints one line `rosetta: error: ...` on stderr and exits with status 2,
before any model is loaded or output written. Every error a user can cause is a RosettaError
(errors.py); the handler in :func:`main` is the only place that prints one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import RosettaError
from .options import one_line

# the modules whose ``register(subparsers)`` adds their subcommands, in `rosetta --help` order
COMMAND_MODULES = [
    "rosettalens.models.cli",
    "rosettalens.data.cli",
    "rosettalens.similarity.cli",
    "rosettalens.steering.cli",
    "rosettalens.mapping.cli",
    "rosettalens.experiments.cli",
    "rosettalens.circuits.cli",
    "rosettalens.circuits.graph_cli",
    "rosettalens.sae.cli",
    "rosettalens.transcoders.cli",
    "rosettalens.crosscoder.cli",
    "rosettalens.organisms.cli",
]

PREFIX = "rosetta: error: "


def print_error(e: BaseException | str) -> int:
    """Print ``rosetta: error: <one line>`` on stderr; return the exit status 2."""
    print(PREFIX + one_line(e), file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """Usage errors as one line with the shared prefix, exit status 2 (argparse's own status)."""

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.removeprefix("rosetta").strip()
        subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if (
            subs
            and message.startswith("the following arguments are required: ")
            and message.endswith(str(subs[0].metavar))
        ):
            usage = " ".join(self.format_usage().split())
            message = f"a subcommand is required ({usage})"
        self.exit(2, PREFIX + (f"{sub}: " if sub else "") + one_line(message) + "\n")


def _name_subcommands(parser: argparse.ArgumentParser) -> None:
    """Show subcommand choices (not an internal ``dest``) in usage and 'required' errors."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if action.metavar is None:
                action.metavar = "{" + ",".join(action.choices) + "}"
            for sub in dict.fromkeys(action.choices.values()):
                _name_subcommands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rosetta", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version="rosettalens " + _version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    _name_subcommands(parser)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors (already printed)
        return int(e.code or 0) if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except SystemExit as e:  # a nested parser's usage error (`rosetta run NAME ...`), already printed
        return int(e.code or 0) if isinstance(e.code, int) else 2
    except RosettaError as e:
        return print_error(e)
    except KeyboardInterrupt:
        print("rosetta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
