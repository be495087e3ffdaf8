"""Config fields that carry their own help: the one place an option's help, choices and shown default live.

Every config dataclass (experiments, trainers) declares its fields with :func:`option`; the CLI
generates its parser from them (``--help`` text from ``help``, choices from a ``Literal[...]``
type, the shown default from ``shown`` when the real default is ``None``)::

    @dataclass
    class MyConfig:
        mapper: Literal["affine", "orthogonal"] = option("affine", "mapper kind fitted between the models")
        out: str | None = option(None, "run directory", shown="runs/NAME-TIMESTAMP")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

_MISSING: Any = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    shown: str | None = None,
    aliases: Sequence[str] = (),
    hidden: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with CLI metadata.

    ``help``: one or two sentences, shown by ``--help``. ``shown``: what the default means when the
    value itself says nothing (``None`` -> ``"auto"``, ``"runs/NAME-TIMESTAMP"``). ``aliases``: old
    spellings accepted with a deprecation line. ``hidden``: accepted but not listed by ``--help``.
    """
    if not help and not hidden:
        raise ValueError("option() needs a help text")
    meta = {"help": help, "shown": shown, "aliases": tuple(aliases), "hidden": hidden, "metavar": metavar}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_help(f: dataclasses.Field) -> str:
    """The help text of a config field ("" when it has none)."""
    return str(f.metadata.get("help") or "")


def field_shown_default(f: dataclasses.Field) -> str | None:
    """What ``--help`` shows as the field's default."""
    shown = f.metadata.get("shown")
    if shown is not None:
        return str(shown)
    if f.default is not dataclasses.MISSING:
        return None if f.default is None else str(f.default)
    return None
