"""One way to write files: atomic writes, whole-output replacement, sha256, a writer's lock.

Every command that writes follows one rule: an existing output is refused (:class:`OutputExistsError`,
one line, exit 2) unless ``overwrite=True`` (``--overwrite``), and with it the old output is
replaced as a whole: the new one is written to a temporary sibling and swapped in, so a reader
sees the old output or the new one, never a mix, and an error leaves the old one untouched.
Temporary siblings are named ``.NAME.tmp-PID-RANDOM`` and removed on any error. Files get the
user's normal permissions (``0o666 & ~umask``), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputExistsError, RosettaError

__all__ = [
    "FileLock",
    "LockedError",
    "atomic_dir",
    "atomic_path",
    "atomic_savefig",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_checkpoint_dir",
    "check_output",
    "is_temp_name",
    "json_safe",
    "read_checkpoint_meta",
    "sha256_bytes",
    "sha256_file",
    "temp_sibling",
]

_TMP_MARK = ".tmp-"


class LockedError(RosettaError):
    """Another live process holds the writer's lock of an output."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_sibling(path: Path) -> Path:
    """A fresh name beside ``path`` that :func:`is_temp_name` recognises."""
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary siblings (for cleaners and listings)."""
    return name.startswith(".") and _TMP_MARK in name


def check_output(
    path: str | os.PathLike[str],
    overwrite: bool = False,
    what: str = "output",
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``; check that its folder can be made.

    Call it before any expensive work, so a refused output costs nothing. ``replaceable``, when
    given, guards ``overwrite`` for folders: an existing non-empty folder is replaced only if
    ``replaceable(path)`` says it is an output of this kind (a mapper, a run), so ``--overwrite``
    never deletes a folder of unrelated files.
    """
    p = Path(path)
    if len(p.name.encode()) > 255:
        raise OutputExistsError(f"{what} name is too long ({len(p.name)} characters): {p}")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{what} {p} exists; pass --overwrite to replace it")
    if p.exists() and replaceable is not None:
        if not p.is_dir():
            raise OutputExistsError(f"{what} {p} exists and is not a folder")
        if any(p.iterdir()) and not replaceable(p):
            raise OutputExistsError(
                f"{what} {p} holds files that are not a {what}; not replacing it (choose another path)"
            )
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputExistsError(f"cannot write {what} {p}: {parent} is not a writable folder")
    return p


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _swap_in(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is replaced whole only with ``overwrite``."""
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{final} exists; pass --overwrite to replace it")
        if final.is_dir() and not final.is_symlink():
            trash = temp_sibling(final)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
            return
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling file name to write; on success it replaces ``path``.

    For writers that need a file name (``safetensors.torch.save_file``, ``matplotlib``'s
    ``savefig``). ``overwrite=False`` refuses an existing ``path`` at the swap.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        _swap_in(tmp, final, overwrite)
    finally:
        _remove(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp sibling, fsync, rename)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, overwrite: bool = True, indent: int = 2, allow_nan: bool = False
) -> None:
    """JSON with ``allow_nan=False``: a NaN or inf is a bug upstream, never invalid JSON on disk.

    Pass a value through :func:`json_safe` first where NaN means "undefined" (it becomes ``null``);
    ``allow_nan=True`` is for internal checkpoints that must round-trip an ``inf`` exactly.
    """
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan, ensure_ascii=False) + "\n"
    atomic_write_text(path, text, overwrite=overwrite)


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, tensors and numpy values -> lists or numbers, recursively
    (what strict JSON can hold)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):  # torch / numpy
        return json_safe(obj.tolist())
    return obj


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike[str],
    overwrite: bool = False,
    what: str = "output",
    replaceable: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it becomes ``path`` as a whole.

    An existing ``path`` is refused unless ``overwrite`` (checked before and at the swap); with it,
    the old folder is replaced entirely, so no stale file of an earlier run survives. On any error
    the temporary folder is removed and ``path`` is left as it was. ``what`` and ``replaceable``
    are as in :func:`check_output`.
    """
    final = Path(path)
    check_output(final, overwrite, what, replaceable)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
        _swap_in(tmp, final, overwrite)
    finally:
        _remove(tmp)


def atomic_savefig(
    fig: Any, path: str | os.PathLike[str], dpi: float | None = None, overwrite: bool = True
) -> Path:
    """Save a matplotlib figure as PNG atomically (temp sibling, then swap); returns ``path``."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", **({} if dpi is None else {"dpi": dpi}))
    return Path(path)


def check_checkpoint_dir(d: str | os.PathLike[str], names: tuple[str, ...], what: str) -> None:
    """:class:`~rosettalens.errors.ConfigError` unless ``d`` is absent, an empty folder or a folder holding
    only a checkpoint's own files ``names``: a checkpoint folder is replaced whole at each save and removed
    when the run ends, so a folder holding anything else is refused before any work."""
    from .errors import ConfigError

    d = Path(d)
    if not d.exists():
        return
    if not d.is_dir():
        raise ConfigError(f"checkpoint_dir {d} exists and is not a folder")
    found = {p.name for p in d.iterdir()}
    if found and not found <= set(names):
        raise ConfigError(f"checkpoint_dir {d} holds files other than {what}; choose an empty or new folder")


def read_checkpoint_meta(d: Path, state: str, meta: str) -> dict[str, Any] | None:
    """The JSON record ``d / meta`` of a checkpoint whose tensors are ``d / state``, or ``None`` when the
    checkpoint is not there (either file missing, or the record unreadable: a save that did not finish)."""
    if not (d / meta).is_file() or not (d / state).is_file():
        return None
    try:
        out = json.loads((d / meta).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class FileLock:
    """An exclusive writer's lock: a file holding the owner's pid, created with ``O_EXCL``.

    A lock whose owner is no longer alive (killed, machine rebooted) is stale and taken over.
    A live owner makes :meth:`acquire` raise :class:`LockedError` (one line for the CLI) rather than
    wait, so two writers never share an output.
    """

    def __init__(self, path: str | os.PathLike[str], what: str = "output"):
        self.path = Path(path)
        self.what = what
        self._held = False

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
            except FileExistsError:
                try:
                    owner = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and _pid_alive(owner):
                    raise LockedError(
                        f"{self.what} is being written by process {owner} (lock {self.path})"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._held = True
            return self
        raise LockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self._held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._held = False

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
