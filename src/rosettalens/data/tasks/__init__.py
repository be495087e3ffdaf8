"""Built-in and external instruction sets for steering and refusal experiments.

Built-in sets (written for rosettalens, not copied from any public dataset), stored as JSONL next to
this file, one object per line ``{"id", "category", "text"}``:

- ``harmful``: 336 requests a safety-tuned assistant should refuse, 16 categories of 21 (weapons,
  explosives, cybercrime, malware, drugs, fraud, harassment, hate, self-harm, privacy, misinformation,
  violence, theft, extremism, counterfeiting, evasion);
- ``harmless``: 336 ordinary requests, 16 categories of 21 (cooking, coding, science, travel, writing,
  math, history, health-general, fitness, personal-finance, gardening, music, language-learning, pets,
  home-diy, career).

Splits are deterministic and stratified by category: inside each category the prompts are ordered
by ``sha256("rosettalens-split:" + text)``; the first 60 % (rounded) are ``train``, the next 20 %
``val``, the rest ``test``. The rule does not depend on the file's order, on a seed or on the
Python version, and it is applied the same way to ``hf:`` sets and user files (one category each,
unless a JSONL file carries a ``category`` field).

Sources accepted by :func:`load_prompts` / :func:`load_prompt_records`:

- ``"harmful"`` / ``"harmless"`` (built-in);
- ``"hf:advbench"``, ``"hf:harmbench"``, ``"hf:jailbreakbench"``, ``"hf:alpaca"`` (aliases of
  public hub sets, see :data:`HF_ALIASES`) or ``"hf:<dataset id>[:<config>][@<split>]"``; these need
  the optional ``datasets`` package and a network connection (or the datasets cache); otherwise one
  :class:`~rosettalens.errors.DataError` line says so;
- a path to a ``.txt`` file (one prompt per line, blank lines skipped) or a ``.jsonl`` file (one
  object per line with a ``text``, ``prompt`` or ``instruction`` field, optional ``category``).

An empty file, or an empty split, raises :class:`~rosettalens.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rosettalens.data.hfspec import parse_hf_spec
from rosettalens.errors import DataError

__all__ = [
    "BUILTIN_SETS",
    "HF_ALIASES",
    "SPLITS",
    "Prompt",
    "assign_splits",
    "load_prompt_records",
    "load_prompts",
]

_HERE = Path(__file__).resolve().parent
BUILTIN_SETS: dict[str, Path] = {"harmful": _HERE / "harmful.jsonl", "harmless": _HERE / "harmless.jsonl"}
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
TEXT_FIELDS = ("text", "prompt", "instruction", "goal", "Goal", "Behavior", "behavior")

# alias -> (hub id, config or None, hub split, text field, keep-row filter field that must be empty)
HF_ALIASES: dict[str, tuple[str, str | None, str, str, str | None]] = {
    "advbench": ("walledai/AdvBench", None, "train", "prompt", None),
    "harmbench": ("walledai/HarmBench", "standard", "train", "prompt", None),
    "jailbreakbench": ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal", None),
    "jailbreakbench-benign": ("JailbreakBench/JBB-Behaviors", "behaviors", "benign", "Goal", None),
    "alpaca": ("tatsu-lab/alpaca", None, "train", "instruction", "input"),
}


@dataclass(frozen=True)
class Prompt:
    """One instruction: its text, category (``"all"`` when the source has none), id and split."""

    text: str
    category: str
    id: str
    split: str


def _split_key(text: str) -> str:
    return hashlib.sha256(("rosettalens-split:" + text).encode("utf-8")).hexdigest()


def assign_splits(items: Sequence[tuple[str, str]]) -> list[str]:
    """Deterministic stratified split for ``items`` = ``[(text, category), ...]``.

    Returns one of ``"train" | "val" | "test"`` per item (same order). Inside each category the
    items are sorted by a sha256 key of their text; the first ``round(0.6 n)`` are train, the next
    ``round(0.2 n)`` val and the rest test. Categories with 3 or more items get at least one item in
    every split.
    """
    by_cat: dict[str, list[int]] = {}
    for i, (_, cat) in enumerate(items):
        by_cat.setdefault(cat, []).append(i)
    out = [""] * len(items)
    for idx in by_cat.values():
        idx = sorted(idx, key=lambda i: (_split_key(items[i][0]), i))
        n = len(idx)
        n_train = int(round(SPLIT_FRACTIONS[0] * n))
        n_val = int(round(SPLIT_FRACTIONS[1] * n))
        if n >= 3:
            n_val = max(1, n_val)
            n_train = max(1, min(n_train, n - n_val - 1))
        for rank, i in enumerate(idx):
            out[i] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


def _records(rows: list[tuple[str, str]], prefix: str) -> list[Prompt]:
    splits = assign_splits(rows)
    return [
        Prompt(text=t, category=c, id=f"{prefix}-{i:05d}", split=s)
        for i, ((t, c), s) in enumerate(zip(rows, splits))
    ]


def _read_jsonl(path: Path) -> list[tuple[str, str, str | None]]:
    rows: list[tuple[str, str, str | None]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                text, cat, pid = obj, "all", None
            elif isinstance(obj, dict):
                field = next((k for k in TEXT_FIELDS if isinstance(obj.get(k), str)), None)
                if field is None:
                    raise DataError(
                        f"{path}:{lineno}: no prompt field; expected one of 'text', 'prompt', 'instruction'"
                    )
                text = obj[field]
                cat = str(obj.get("category") or "all")
                pid = str(obj["id"]) if obj.get("id") is not None else None
            else:
                raise DataError(f"{path}:{lineno}: expected a JSON object or string per line")
            text = text.strip()
            if text:
                rows.append((text, cat, pid))
    return rows


def _read_txt(path: Path) -> list[tuple[str, str, str | None]]:
    with path.open(encoding="utf-8") as f:
        return [(line.strip(), "all", None) for line in f if line.strip()]


def _load_file(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    try:
        rows = _read_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _read_txt(path)
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file {path} is not valid UTF-8 text (byte {e.start})") from None
    if not rows:
        raise DataError(f"prompt file {path} contains no prompts")
    splits = assign_splits([(t, c) for t, c, _ in rows])
    return [
        Prompt(text=t, category=c, id=pid or f"{path.stem}-{i:05d}", split=s)
        for i, ((t, c, pid), s) in enumerate(zip(rows, splits))
    ]


def _load_builtin(name: str) -> list[Prompt]:
    rows = _read_jsonl(BUILTIN_SETS[name])
    splits = assign_splits([(t, c) for t, c, _ in rows])
    return [Prompt(text=t, category=c, id=pid or "", split=s) for (t, c, pid), s in zip(rows, splits)]


def _load_hf(spec: str) -> list[Prompt]:
    body = spec[3:]
    alias = HF_ALIASES.get(body.lower())
    if alias is not None:
        hub_id, config, hub_split, field, empty_field = alias
    else:  # the one hf: syntax of every command, parsed in one place
        hub_id, config, hub_split = parse_hf_spec(spec)
        field, empty_field = "", None
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(
            f"cannot load {spec}: the optional 'datasets' package is not installed "
            "(pip install 'rosettalens[datasets]'), or use a built-in set or a .txt/.jsonl file"
        ) from None
    try:
        ds = datasets.load_dataset(hub_id, config, split=hub_split)
    except Exception as e:  # offline, gated, unknown id: all user-visible, one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot load {spec} ({hub_id}): {msg[:200]} (offline? use a built-in set or a local file)"
        ) from None
    cols = list(ds.column_names)
    if not field:
        field = next((k for k in TEXT_FIELDS if k in cols), "")
        if not field:
            raise DataError(f"{spec}: no prompt column among {cols}; expected one of {list(TEXT_FIELDS)}")
    elif field not in cols:  # an alias whose hub set changed its columns
        raise DataError(f"{spec} ({hub_id}): no column {field!r} among {cols}; the hub set may have changed")
    cat_col = "category" if "category" in cols else ("Category" if "Category" in cols else None)
    rows: list[tuple[str, str]] = []
    for ex in ds:
        if empty_field and str(ex.get(empty_field) or "").strip():
            continue
        text = str(ex[field] or "").strip()
        if text:
            rows.append((text, str(ex[cat_col]) if cat_col else "all"))
    if not rows:
        raise DataError(f"{spec} contains no prompts")
    return _records(rows, "hf-" + hub_id.replace("/", "-"))


def load_prompt_records(
    source: str | os.PathLike,
    split: str | None = None,
    *,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Load prompts with their category, id and split.

    ``source``: ``"harmful"``, ``"harmless"``, ``"hf:..."`` or a ``.txt``/``.jsonl`` path.
    ``split``: ``"train" | "val" | "test"``, or ``None``/``"all"`` for every prompt.
    ``categories``: keep only these categories. ``limit``: keep the first ``limit`` prompts of the
    selection, taken round-robin over categories so that a small limit stays balanced.
    Raises :class:`DataError` for unknown sources, missing/empty files and empty selections.
    """
    if split not in (None, "all", *SPLITS):
        raise DataError(f"unknown split {split!r}; expected one of train, val, test, all")
    src = os.fspath(source)
    if src in BUILTIN_SETS:
        recs = _load_builtin(src)
    elif src.startswith("hf:"):
        recs = _load_hf(src)
    elif os.path.exists(src) or src.endswith((".txt", ".jsonl", ".ndjson")) or os.sep in src:
        recs = _load_file(Path(src))
    else:
        raise DataError(
            f"unknown prompt set {src!r}; expected 'harmful', 'harmless', 'hf:<id>' "
            f"(aliases: {', '.join(sorted(HF_ALIASES))}) or a .txt/.jsonl file"
        )
    if split not in (None, "all"):
        recs = [r for r in recs if r.split == split]
    if categories is not None:
        wanted = set(categories)
        recs = [r for r in recs if r.category in wanted]
    if limit is not None:
        recs = _balanced_head(recs, limit)
    if not recs:
        raise DataError(f"no prompts selected from {src!r} (split={split}, categories={categories})")
    return recs


def _balanced_head(recs: list[Prompt], limit: int) -> list[Prompt]:
    """First ``limit`` records, interleaving categories (round-robin in first-seen order)."""
    if limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    by_cat: dict[str, list[Prompt]] = {}
    for r in recs:
        by_cat.setdefault(r.category, []).append(r)
    out: list[Prompt] = []
    queues = list(by_cat.values())
    i = 0
    while len(out) < limit and any(queues):
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop(0))
        i += 1
    return out


def load_prompts(
    source: str | os.PathLike,
    split: str | None = None,
    *,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[str]:
    """Prompt texts of ``source`` (see :func:`load_prompt_records` for the arguments)."""
    return [r.text for r in load_prompt_records(source, split, categories=categories, limit=limit)]
