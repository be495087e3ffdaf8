"""Reading documents from files, Hugging Face datasets and the built-in corpora."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rosettalens.data.documents import Corpus, documents_sha256
from rosettalens.data.hfspec import HF_SYNTAX, parse_hf_spec
from rosettalens.data.tasks import BUILTIN_SETS, load_prompts
from rosettalens.errors import DataError

__all__ = [
    "BUILTIN_DIR",
    "HF_SYNTAX",
    "Corpus",
    "builtin_datasets",
    "documents_sha256",
    "load_documents",
    "parse_hf_spec",
]

BUILTIN_DIR = Path(__file__).parent / "builtin"


# --------------------------------------------------------------------------------------------- builtins
@dataclass(frozen=True)
class _Builtin:
    name: str
    description: str
    load: Callable[[], list[str]]


def _file_builtin(path: Path) -> Callable[[], list[str]]:
    return lambda: _read_file(path, field=None)


def _prompts(loader, name: str) -> Callable[[], list[str]]:
    return lambda: loader(name)


def _sequences() -> list[str]:
    """Ordered sequences (digits, number words, months, days, letters) with varied starts and lengths."""
    words = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split()
    months = "January February March April May June July August September October November December".split()
    days = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    digits = [str(i) for i in range(0, 40)]
    docs = []
    for seq, seps in ((digits, (" ", ", ")), (words, (" ", ", ")), (months, (" ", ", ")), (letters, (" ",))):
        for start in range(0, len(seq) - 4):
            for length in (4, 6):
                if start + length > len(seq):
                    continue
                for sep in seps:
                    docs.append(sep.join(seq[start : start + length]))
    cyc = days + days
    for start in range(7):
        docs.append(" ".join(cyc[start : start + 5]))
    return docs


def _index() -> dict[str, _Builtin]:
    out: dict[str, _Builtin] = {}
    meta_path = BUILTIN_DIR / "index.json"
    meta = json.loads(meta_path.read_text("utf-8")) if meta_path.exists() else {}
    if BUILTIN_DIR.is_dir():
        for p in sorted(BUILTIN_DIR.iterdir()):
            if p.suffix in (".txt", ".jsonl"):
                out[p.stem] = _Builtin(p.stem, meta.get(p.stem, f"bundled file {p.name}"), _file_builtin(p))
    for name in BUILTIN_SETS:  # the instruction sets of rosettalens.data.tasks (steering) are documents too
        out[name] = _Builtin(
            name,
            f"instruction set '{name}' of rosettalens.data.tasks (all splits)",
            _prompts(load_prompts, name),
        )
    out["sequences"] = _Builtin(
        "sequences",
        "ordered sequences: digits, number words, months, weekdays, letters (varied starts and lengths)",
        _sequences,
    )
    return out


def builtin_datasets() -> list[dict]:
    """Name, description and number of documents of every built-in dataset."""
    rows = []
    for b in _index().values():
        docs = b.load()
        rows.append({"name": b.name, "description": b.description, "n_documents": len(docs)})
    return rows


# --------------------------------------------------------------------------------------------- files
def _read_file(path: Path, field: str | None) -> list[str]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, expected a .txt or .jsonl file: {path}")
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file is not valid UTF-8: {path} (byte {e.start})") from None
    if path.suffix == ".txt":
        if field is not None:
            raise DataError(f"--field applies to .jsonl files, not to {path.name}")
        docs = [line.rstrip("\r") for line in text.split("\n")]
        docs = [d for d in docs if d.strip()]
    elif path.suffix == ".jsonl":
        key = field or "text"
        docs = []
        for i, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or key not in obj:
                raise DataError(f"{path}:{i}: no field {key!r} (choose the text field with --field)")
            if not isinstance(obj[key], str):
                raise DataError(f"{path}:{i}: field {key!r} is {type(obj[key]).__name__}, expected a string")
            if obj[key].strip():
                docs.append(obj[key])
    else:
        raise DataError(
            f"unsupported data file {path.name!r}: expected .txt (one document per line) or .jsonl"
        )
    if not docs:
        raise DataError(f"data file has no documents: {path}")
    return docs


# --------------------------------------------------------------------------------------------- HF datasets
def _load_hf(spec: str, field: str | None) -> tuple[list[str], dict]:
    ds_id, config, split = parse_hf_spec(spec)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(
            f"{spec!r} needs the optional 'datasets' package: pip install 'rosettalens[datasets]'"
        ) from None
    from datasets import load_dataset

    try:
        ds = load_dataset(ds_id, config, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (offline? the Hugging Face hub may be unreachable)" if _looks_offline(e) else ""
        raise DataError(f"cannot load dataset {ds_id!r} split {split!r}{offline}: {msg[:200]}") from None
    key = field or "text"
    if key not in ds.column_names:
        raise DataError(f"dataset {ds_id!r} has no column {key!r} (columns: {ds.column_names}); use --field")
    docs = [t for t in ds[key] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"dataset {ds_id!r} split {split!r} has no non-empty {key!r} texts")
    return docs, {"source": "hf", "dataset": ds_id, "config": config, "split": split, "field": key}


def _looks_offline(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("connect", "offline", "resolve", "network", "timed out", "couldn't reach"))


# --------------------------------------------------------------------------------------------- entry point
def load_documents(spec: str | os.PathLike, field: str | None = None) -> Corpus:
    """Load the documents named by ``spec``: a file path, ``hf:<dataset id>[:<config>][@<split>]``
    (see :func:`parse_hf_spec`) or a built-in name.

    Raises :class:`DataError` for a missing, empty or unreadable source, an unknown name, or an
    unreachable dataset.
    """
    s = os.fspath(spec)
    if not s.strip():
        raise DataError("no data given: expected a .txt/.jsonl file, hf:<dataset id> or a built-in name")
    if s.startswith("hf:"):
        docs, info = _load_hf(s, field)
        return Corpus(s, docs, info)
    path = Path(s)
    if path.suffix in (".txt", ".jsonl") or path.exists() or os.sep in s:
        docs = _read_file(path, field)
        info = {"source": "file", "path": str(path.resolve())}
        if field:
            info["field"] = field
        return Corpus(s, docs, info)
    if s == "corpus" or s.startswith("corpus:"):  # the offline real-text corpus (rosettalens.data.corpus)
        from rosettalens.data.corpus import load_corpus

        return load_corpus(s)
    index = _index()
    if s in index:
        return Corpus(s, index[s].load(), {"source": "builtin"})
    raise DataError(
        f"unknown data {s!r}: not a file, not hf:<dataset id>, not a built-in (built-ins: {', '.join(index)})"
    )
