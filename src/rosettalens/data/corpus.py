"""A real-text corpus built offline from what every Python installation carries (prose and code).

``rosetta data corpus build`` (:mod:`rosettalens.data.corpus_cli`, or :func:`build_corpus`) reads, on this machine, with no network:

* ``stdlib``: the standard library's ``.py`` sources (tests, ``site-packages`` and ``idlelib`` left out):
  code with its docstrings and comments; licence PSF-2.0;
* ``pydoc-topics``: the language reference topics that ``pydoc`` ships (``pydoc_data.topics``); PSF-2.0;
* ``dist-docs``: the documentation installed with every distribution in ``site-packages``: the long
  description in its ``METADATA`` and its ``.md`` / ``.rst`` / ``.txt`` files and licence texts; each
  document carries its distribution's declared licence;
* ``dist-docstrings``: the module, class and function docstrings of the installed distributions'
  Python sources (at most ``max_chars_per_dist`` characters per distribution, so that no one
  package dominates); the distribution's licence.

Documents are cut at blank lines into pieces of at most ``max_chars`` characters (so that a document
fits a typical extraction window), then deduplicated: exactly (sha256 of the text with whitespace
collapsed and lower-cased) and nearly (MinHash over word 5-shingles, 16 hashes in 4 bands; a piece
whose estimated Jaccard similarity to a kept piece is >= 0.8 is dropped). The order is canonical
(source, then path, then position), so the same installation gives the same corpus, byte for byte.

Stored once, under ``$ROSETTA_CACHE/corpus/NAME/`` (default ``~/.cache/rosettalens/corpus/pycorpus``)::

    manifest.json            sources (n_docs, chars, licences), shards (file, sha256, n_docs, chars),
                             totals, dedup counts, token counts per cached zoo tokenizer, python version
    shard-00000.jsonl        {"text", "source", "path", "license"} per line, 20000 documents per shard

``--data corpus`` (or ``corpus:NAME``) reads it wherever a dataset name is accepted, building it first
when it is missing, in a fixed shuffled order (the stored order permuted with seed 0), so that the
first N tokens of it mix every source. The corpus depends on what is installed: the manifest's hashes identify it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rosettalens.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_NAME",
    "SOURCES",
    "CorpusDoc",
    "build_corpus",
    "corpus_dir",
    "load_corpus",
    "near_duplicates",
    "normalise",
    "split_text",
]

DEFAULT_NAME = "pycorpus"
SOURCES = ("stdlib", "pydoc-topics", "dist-docs", "dist-docstrings")
FORMAT = "rosettalens.corpus/1"
MANIFEST = "manifest.json"
SHARD_DOCS = 20000
PSF = "PSF-2.0"
_DOC_SUFFIXES = (".md", ".rst", ".txt")
_SKIP_TXT = {"entry_points.txt", "top_level.txt", "dependency_links.txt", "namespace_packages.txt",
             "not-zip-safe", "SOURCES.txt", "requires.txt", "RECORD", "WHEEL", "INSTALLER", "REQUESTED"}  # fmt: skip


@dataclass(frozen=True)
class CorpusDoc:
    """One document: its text, the source it came from, the file path inside the source, its licence."""

    text: str
    source: str
    path: str
    license: str


# ------------------------------------------------------------------------------------------ location
def corpus_dir(name: str = DEFAULT_NAME) -> Path:
    """Where corpus ``name`` is stored: ``$ROSETTA_CACHE/corpus/NAME`` (``~/.cache/rosettalens/...``)."""
    from rosettalens.models.zoo import cache_root

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ConfigError(f"corpus name {name!r}: use letters, digits, '.', '_' and '-'")
    return cache_root() / "corpus" / name


# ------------------------------------------------------------------------------------------ text tools
_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text as compared for exact duplicates: NFKC, lower-cased, whitespace collapsed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


def split_text(text: str, max_chars: int, min_chars: int = 200) -> list[str]:
    """``text`` cut at blank lines into pieces of at most ``max_chars`` characters (a paragraph longer
    than that is cut at line ends, then hard); pieces shorter than ``min_chars`` are dropped."""
    paras = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    out: list[str] = []
    cur = ""
    for p in paras:
        p = p.rstrip()
        if not p.strip():
            continue
        pieces = [p] if len(p) <= max_chars else _hard_split(p, max_chars)
        for q in pieces:
            if cur and len(cur) + 2 + len(q) > max_chars:
                out.append(cur)
                cur = ""
            cur = f"{cur}\n\n{q}" if cur else q
    if cur:
        out.append(cur)
    return [o for o in out if len(o.strip()) >= min_chars]


def _hard_split(p: str, max_chars: int) -> list[str]:
    out, cur = [], ""
    for line in p.split("\n"):
        while len(line) > max_chars:
            out.append(line[:max_chars])
            line = line[max_chars:]
        if cur and len(cur) + 1 + len(line) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line
    if cur:
        out.append(cur)
    return out


_P = (1 << 61) - 1


def _minhash(text: str, coeffs: np.ndarray, shingle: int = 5) -> np.ndarray | None:
    words = normalise(text).split(" ")
    if len(words) < shingle:
        return None
    sh = {" ".join(words[i : i + shingle]) for i in range(len(words) - shingle + 1)}
    h = np.fromiter(
        (int.from_bytes(hashlib.blake2b(s.encode(), digest_size=7).digest(), "little") for s in sh),
        dtype=np.uint64,
        count=len(sh),
    )
    a, b = coeffs[:, 0:1], coeffs[:, 1:2]
    # (a * h + b) mod p in exact integer arithmetic on 64-bit pieces (object math is too slow)
    hv = (h[None, :] % np.uint64(1 << 31)) * a + b  # < 2^31 * 2^31 + 2^31 fits in uint64
    return (hv % np.uint64(_P)).min(axis=1)


def near_duplicates(texts: list[str], threshold: float = 0.8, n_hash: int = 16, bands: int = 4) -> set[int]:
    """Indices of texts that nearly duplicate an earlier text (MinHash LSH over word 5-shingles; the
    estimated Jaccard similarity of the candidate pair must reach ``threshold``)."""
    rng = np.random.default_rng(12345)
    coeffs = rng.integers(1, 1 << 31, size=(n_hash, 2), dtype=np.uint64)
    rows = n_hash // bands
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    sigs: list[np.ndarray | None] = []
    drop: set[int] = set()
    for i, t in enumerate(texts):
        sig = _minhash(t, coeffs)
        sigs.append(sig)
        if sig is None:
            continue
        cands: set[int] = set()
        keys = [sig[b * rows : (b + 1) * rows].tobytes() for b in range(bands)]
        for b, key in enumerate(keys):
            cands.update(buckets[b].get(key, ()))
        if any(float((sigs[j] == sig).mean()) >= threshold for j in cands):  # type: ignore[union-attr]
            drop.add(i)
            continue
        for b, key in enumerate(keys):
            buckets[b].setdefault(key, []).append(i)
    return drop


# ------------------------------------------------------------------------------------------ sources
def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> Iterator[Path]:
    skip = {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "__pycache__",
        "lib2to3",
        "turtledemo",
    }
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith("test_"):
                yield Path(dirpath) / f


def _read(p: Path, limit: int = 2_000_000) -> str | None:
    try:
        if p.stat().st_size > limit:
            return None
        return p.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _src_stdlib(root: Path | None) -> Iterator[tuple[str, str, str]]:
    root = root or _stdlib_root()
    for p in _stdlib_files(root):
        text = _read(p)
        if text:
            yield text, str(p.relative_to(root)), PSF


def _src_pydoc_topics() -> Iterator[tuple[str, str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for k in sorted(topics):
        yield topics[k], f"pydoc_data.topics:{k}", PSF


def _dist_license(meta: Any) -> str:
    lic = (meta.get("License-Expression") or "").strip()
    if not lic:
        raw = (meta.get("License") or "").strip()
        lic = raw.splitlines()[0][:80] if raw and len(raw) < 200 else ""
    if not lic:
        cls = [
            c.split("::")[-1].strip()
            for c in (meta.get_all("Classifier") or [])
            if c.startswith("License ::")
        ]
        lic = "; ".join(cls)
    return lic or "unknown"


def _distributions(site: Path | None) -> list[Any]:
    from importlib import metadata

    dists = list(metadata.distributions(path=[str(site)]) if site else metadata.distributions())
    seen, out = set(), []

    def key(d: Any) -> tuple[str, str]:
        return ((d.metadata["Name"] or "").lower(), d.version or "")

    for d in sorted(dists, key=key):
        name = key(d)[0]
        if name and name not in seen:
            seen.add(name)
            out.append(d)
    return out


def _src_dist_docs(site: Path | None) -> Iterator[tuple[str, str, str]]:
    for d in _distributions(site):
        meta = d.metadata
        name = meta.get("Name") or "?"
        lic = _dist_license(meta)
        body = meta.get_payload() if hasattr(meta, "get_payload") else None
        desc = body or meta.get("Description") or ""
        if isinstance(desc, str) and desc.strip():
            yield desc, f"{name}:METADATA", lic
        for f in sorted(d.files or [], key=str):
            fn = f.name
            if fn in _SKIP_TXT or "__pycache__" in str(f):
                continue
            is_doc = fn.endswith(_DOC_SUFFIXES) or fn.upper().startswith(
                ("LICENSE", "LICENCE", "COPYING", "README")
            )
            if not is_doc or fn.endswith((".py", ".pyc", ".so")):
                continue
            text = _read(Path(str(d.locate_file(f))), limit=500_000)
            if text and text.strip():
                yield text, f"{name}:{f}", lic


def _docstrings(text: str) -> str | None:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            ds = ast.get_docstring(node)
            if ds and len(ds) >= 80:
                head = "" if isinstance(node, ast.Module) else f"{node.name}\n"
                parts.append(head + ds)
    return "\n\n".join(parts) if parts else None


def _src_dist_docstrings(site: Path | None, max_chars_per_dist: int) -> Iterator[tuple[str, str, str]]:
    for d in _distributions(site):
        name = d.metadata.get("Name") or "?"
        lic = _dist_license(d.metadata)
        used = 0
        for f in sorted(d.files or [], key=str):
            if used >= max_chars_per_dist:
                break
            s = str(f)
            if not s.endswith(".py") or "/tests/" in s or "/test/" in s or s.startswith(".."):
                continue
            text = _read(Path(str(d.locate_file(f))), limit=1_000_000)
            ds = _docstrings(text) if text else None
            if ds:
                used += len(ds)
                yield ds, f"{name}:{f}", lic


# ------------------------------------------------------------------------------------------ building
def collect(
    sources: Iterable[str] = SOURCES,
    *,
    stdlib_root: Path | None = None,
    site: Path | None = None,
    max_chars: int = 1500,
    min_chars: int = 200,
    max_chars_per_dist: int = 400_000,
    progress: bool = False,
) -> tuple[list[CorpusDoc], dict[str, Any]]:
    """The deduplicated documents of ``sources`` in canonical order and the dedup counts.

    ``stdlib_root`` / ``site``: other roots than this interpreter's (tests use small synthetic trees)."""
    sources = list(sources)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ConfigError(f"unknown corpus source(s) {bad or sources}; choose from {', '.join(SOURCES)}")
    gens = {
        "stdlib": lambda: _src_stdlib(stdlib_root),
        "pydoc-topics": _src_pydoc_topics,
        "dist-docs": lambda: _src_dist_docs(site),
        "dist-docstrings": lambda: _src_dist_docstrings(site, max_chars_per_dist),
    }
    pieces: list[CorpusDoc] = []
    for src in sources:
        n0 = len(pieces)
        for text, path, lic in gens[src]():
            for i, piece in enumerate(split_text(text, max_chars, min_chars)):
                pieces.append(CorpusDoc(piece, src, f"{path}#{i}", lic))
        if progress:
            print(f"corpus: {src}: {len(pieces) - n0} pieces", file=sys.stderr)
    seen: set[str] = set()
    exact: list[CorpusDoc] = []
    for doc in pieces:
        h = hashlib.sha256(normalise(doc.text).encode()).hexdigest()
        if h not in seen:
            seen.add(h)
            exact.append(doc)
    drop = near_duplicates([d.text for d in exact])
    docs = [d for i, d in enumerate(exact) if i not in drop]
    stats = {
        "pieces": len(pieces),
        "exact_duplicates": len(pieces) - len(exact),
        "near_duplicates": len(drop),
    }
    return docs, stats


def _zoo_tokenizers() -> list[tuple[str, Any]]:
    """Tokenizers of the zoo models that are in the cache (nothing is downloaded)."""
    from transformers import AutoTokenizer

    from rosettalens.models.zoo import ZOO, model_dir

    out = []
    for name in ZOO:
        d = model_dir(name)
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            try:
                out.append((name, AutoTokenizer.from_pretrained(str(d))))
            except Exception:
                continue
    return out


def token_lengths(texts: list[str], tok: Any, batch: int = 1000) -> list[int]:
    """Tokens per text (no special tokens)."""
    out: list[int] = []
    for i in range(0, len(texts), batch):
        out.extend(len(e) for e in tok(texts[i : i + batch], add_special_tokens=False)["input_ids"])
    return out


def build_corpus(
    name: str = DEFAULT_NAME,
    sources: Iterable[str] = SOURCES,
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_chars: int = 1500,
    count_with: list[tuple[str, Any]] | None = None,
    stdlib_root: Path | None = None,
    site: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build corpus ``name`` (module docstring) into ``out`` (default :func:`corpus_dir`) and return its
    manifest. An existing corpus is returned as it is unless ``overwrite``. ``count_with``: ``(name,
    tokenizer)`` pairs to count tokens with (default: the cached zoo tokenizers)."""
    from rosettalens.io import atomic_dir, atomic_write_json, sha256_file

    sources = list(sources)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ConfigError(f"unknown corpus source(s) {bad or sources}; choose from {', '.join(SOURCES)}")
    dest = Path(out) if out is not None else corpus_dir(name)
    if (dest / MANIFEST).is_file() and not overwrite:
        return json.loads((dest / MANIFEST).read_text("utf-8"))
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MANIFEST).is_file())):
        raise ConfigError(f"{dest} exists and is not a corpus; choose another --out")  # never replaced
    docs, stats = collect(sources, stdlib_root=stdlib_root, site=site, max_chars=max_chars, progress=progress)
    if not docs:
        raise DataError("the corpus sources gave no documents")
    per_source: dict[str, dict[str, Any]] = {}
    for d in docs:
        rec = per_source.setdefault(d.source, {"n_docs": 0, "chars": 0, "licenses": {}})
        rec["n_docs"] += 1
        rec["chars"] += len(d.text)
        rec["licenses"][d.license] = rec["licenses"].get(d.license, 0) + 1
    tokenizers = _zoo_tokenizers() if count_with is None else count_with
    texts = [d.text for d in docs]
    tokens: dict[str, Any] = {}
    for tname, tok in tokenizers:
        lengths = token_lengths(texts, tok)
        total = int(sum(lengths))
        per: dict[str, int] = {}
        for d, n_tok in zip(docs, lengths, strict=True):
            per[d.source] = per.get(d.source, 0) + n_tok
        tokens[tname] = {"total": total, "per_source": per}
        if progress:
            print(f"corpus: {tname}: {total} tokens", file=sys.stderr)
    with atomic_dir(dest, overwrite=True, what="corpus folder") as tmp:
        shards = []
        for k, start in enumerate(range(0, len(docs), SHARD_DOCS)):
            part = docs[start : start + SHARD_DOCS]
            fn = f"shard-{k:05d}.jsonl"
            with open(tmp / fn, "w", encoding="utf-8") as f:
                for d in part:
                    f.write(json.dumps({"text": d.text, "source": d.source, "path": d.path, "license": d.license},
                                       ensure_ascii=False) + "\n")  # fmt: skip
            shards.append({"file": fn, "sha256": sha256_file(tmp / fn), "n_docs": len(part),
                           "chars": sum(len(d.text) for d in part)})  # fmt: skip
        manifest = {
            "format": FORMAT,
            "name": name,
            "sources": per_source,
            "n_docs": len(docs),
            "chars": sum(len(t) for t in texts),
            "tokens": tokens,
            "dedup": stats,
            "max_chars": max_chars,
            "shards": shards,
            "python": sys.version.split()[0],
            "stdlib": str(stdlib_root or _stdlib_root()),
        }
        atomic_write_json(tmp / MANIFEST, manifest, indent=1)
    return manifest


def load_corpus(spec: str = "corpus", *, verify: bool = False, build: bool = True, progress: bool = True):
    """The documents of ``corpus`` / ``corpus:NAME`` as a :class:`rosettalens.data.Corpus` (built first
    when missing and ``build``). ``verify`` checks every shard's sha256 against the manifest."""
    from rosettalens.data.documents import Corpus
    from rosettalens.io import sha256_file

    name = spec.split(":", 1)[1] if ":" in spec else DEFAULT_NAME
    d = corpus_dir(name)
    if not (d / MANIFEST).is_file():
        if not build:
            raise DataError(f"corpus {name!r} is not built; run: rosetta data corpus build --name {name}")
        if progress:
            print(f"corpus {name!r} is not built yet: building it into {d} (once)", file=sys.stderr)
        build_corpus(name, progress=progress)
    m = json.loads((d / MANIFEST).read_text("utf-8"))
    docs: list[str] = []
    for s in m["shards"]:
        p = d / s["file"]
        if verify and sha256_file(p) != s["sha256"]:
            raise DataError(f"corpus shard {p} does not match its sha256 in {d / MANIFEST}; rebuild it")
        with open(p, encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f if line.strip())
    # a fixed interleaving: any prefix (``--max-tokens N``) mixes every source, prose and code
    order = np.random.default_rng(0).permutation(len(docs))
    docs = [docs[i] for i in order]
    info = {
        "source": "corpus",
        "name": name,
        "path": str(d),
        "order": "stored order permuted with numpy default_rng(0)",
        "shards_sha256": [s["sha256"] for s in m["shards"]],
    }
    return Corpus(spec, docs, info)
