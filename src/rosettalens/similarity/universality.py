"""SAE feature-space universality (Lan et al. 2024): layer grids, filtered feature matching, paired
decoder-row similarity against shuffled pairings, and semantic subspaces.

The pipeline for one layer pair, given two SAEs and their codes on the *same* (paired) tokens:

1. :func:`match_saes`: every live feature of A gets its most correlated feature of B
   (:func:`~rosettalens.similarity.matching.match_features`, ``method="max"``), then the paper's filters,
   in this order, each counted in ``removed``:

   * ``min_corr``: correlation at least the threshold;
   * ``nonconcept``: drop a pair when *all* top-activating tokens of either feature are non-concept
     tokens (whitespace, punctuation, symbols, special tokens);
   * ``shared_top_token``: keep a pair only when the two features' top-activating tokens share at least
     one token (compared as normalised text, so two tokenizers can agree);
   * ``one_to_one``: when several A features matched the same B feature, keep one: ``"best"`` keeps the
     highest correlation, ``"first"`` the lowest A index (what the paper's code did), ``"none"`` keeps all.

2. :func:`paired_similarity`: SVCCA, RSA and linear CKA of the paired decoder rows
   ``W_dec_a[a_i] [n, d_a]`` vs ``W_dec_b[b_i] [n, d_b]``, each against ``n_permutations`` random
   re-pairings of the same rows (p-value with the +1 correction, see
   :mod:`~rosettalens.similarity.permutation`).

   SVCCA convention: rows are features, so there are often fewer rows than dimensions; CCA on more
   directions than rows is trivially 1. Each side is therefore reduced to its principal directions
   holding ``keep_variance`` of the variance *and at most* ``max(1, floor(n * max_dims_fraction))``
   (default a quarter of the rows, so both sides together use at most half the rows); the reduction
   does not depend on the pairing, so the observed value and its null are computed identically.

3. :func:`subspace_scores`: pairs grouped by keyword lists (``data/semantic_subspaces.json``) on the
   top token of one side, each group scored like the full space with more shuffles.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosettalens.errors import ConfigError, DataError, HookPointError
from rosettalens.similarity.categories import normalize_token_text
from rosettalens.similarity.matching import (
    FeatureMatch,
    is_nonconcept_text,
    match_features,
    paired_rows,
    semantic_subspaces,
)
from rosettalens.similarity.permutation import permutation_test

__all__ = [
    "SUBSPACES_FILE",
    "MatchFilters",
    "FilteredMatch",
    "load_subspaces",
    "parse_layers",
    "match_saes",
    "filter_match",
    "reduce_rows",
    "paired_similarity",
    "subspace_scores",
    "ONE_TO_ONE",
]

SUBSPACES_FILE = Path(__file__).resolve().parent.parent / "data" / "semantic_subspaces.json"
ONE_TO_ONE = ("best", "first", "none")
DEFAULT_METRICS = ("svcca", "rsa", "linear_cka")


# ---------------------------------------------------------------------------------------- inputs
def load_subspaces(path: str | Path | None = None) -> dict[str, list[str]]:
    """Keyword lists ``{subspace: [keyword, ...]}`` from a JSON file (default: the bundled team lists).

    The file is either ``{"subspaces": {name: [words]}}`` (the bundled format) or ``{name: [words]}``.
    """
    p = Path(path) if path is not None else SUBSPACES_FILE
    try:
        raw = json.loads(p.read_text("utf-8"))
    except FileNotFoundError:
        raise DataError(f"subspace keyword file not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read subspace keyword file {p}: {e}") from None
    table = raw.get("subspaces", raw) if isinstance(raw, dict) else None
    if not isinstance(table, dict) or not table:
        raise DataError(f"{p}: expected a JSON object {{subspace: [keywords]}} (or under 'subspaces')")
    out: dict[str, list[str]] = {}
    for name, words in table.items():
        if name.startswith("_"):
            continue
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise DataError(f"{p}: subspace {name!r} must be a non-empty list of keyword strings")
        out[name] = [normalize_token_text(w) for w in words]
    if not out:
        raise DataError(f"{p}: no subspaces")
    return out


def _spread(n_layers: int, points: int) -> list[int]:
    """``points`` layers at relative depths ``(i + 0.5) / points`` (distinct, ascending)."""
    return sorted({min(n_layers - 1, int((i + 0.5) * n_layers / points)) for i in range(points)})


def parse_layers(spec: str | None, n_layers_a: int, n_layers_b: int) -> tuple[list[int], list[int]]:
    """Layers of A and of B whose pairs form the grid.

    ``spec``:

    * ``None`` / ``"auto"``: 5 layers per model at relative depths 0.1, 0.3, ..., 0.9 (the grid's
      diagonal pairs equal relative depth);
    * ``"auto:N"``: N layers per model at relative depths ``(i + 0.5) / N``;
    * ``"all"``: every layer of both models;
    * ``"stride:K"``: every K-th layer of each model, starting at 0;
    * ``"3,6,9"``: these layers in both models (negative indices count from the end);
    * ``"3,6,9/4,8"``: A's layers, then B's.

    Raises :class:`~rosettalens.errors.HookPointError` for a layer out of range.
    """
    s = (spec or "auto").strip().replace(" ", "")
    if s == "all":
        return list(range(n_layers_a)), list(range(n_layers_b))
    if s == "auto" or s.startswith("auto:"):
        pts = 5 if s == "auto" else _int(s[5:], "layers auto:N")
        if pts < 1:
            raise ConfigError(f"--layers auto:N needs N >= 1, got {pts}")
        return _spread(n_layers_a, min(pts, n_layers_a)), _spread(n_layers_b, min(pts, n_layers_b))
    if s.startswith("stride:"):
        k = _int(s[7:], "layers stride:K")
        if k < 1:
            raise ConfigError(f"--layers stride:K needs K >= 1, got {k}")
        return list(range(0, n_layers_a, k)), list(range(0, n_layers_b, k))
    parts = s.split("/")
    if len(parts) > 2:
        raise ConfigError(f"--layers {spec!r}: expected 'LIST' or 'LIST_A/LIST_B'")
    la = _layer_list(parts[0], n_layers_a, "A")
    lb = _layer_list(parts[-1], n_layers_b, "B")
    return la, lb


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an integer") from None


def _layer_list(text: str, n_layers: int, side: str) -> list[int]:
    if not text:
        raise ConfigError(f"--layers: empty layer list for model {side}")
    out = []
    for tok in text.split(","):
        i = _int(tok, "--layers")
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise HookPointError(
                f"layer {i} is out of range for model {side}, which has {n_layers} layers (0..{n_layers - 1})"
            )
        out.append(j)
    return sorted(set(out))


# ---------------------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class MatchFilters:
    """The paper's filters (module docstring); ``None`` / ``False`` disables one."""

    min_corr: float | None = 0.3
    drop_nonconcept: bool = True
    shared_top_token: bool = True
    one_to_one: str = "best"
    top_k: int = 5  # top-activating tokens tracked per feature

    def validate(self) -> None:
        if self.one_to_one not in ONE_TO_ONE:
            raise ConfigError(f"one_to_one must be one of {', '.join(ONE_TO_ONE)}, got {self.one_to_one!r}")
        if self.min_corr is not None and not -1.0 <= self.min_corr <= 1.0:
            raise ConfigError(f"min_corr must be in [-1, 1], got {self.min_corr}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")


@dataclass(frozen=True)
class FilteredMatch:
    """The unfiltered max-correlation match, the filtered pairs, and what each filter removed."""

    all: FeatureMatch  # every live A feature with its best B feature
    kept: FeatureMatch  # after the filters
    removed: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Counts and correlation summaries (JSON-ready; the pairs themselves via ``kept.to_dict()``)."""
        return {
            "n_features_a": self.all.n_features_a,
            "n_features_b": self.all.n_features_b,
            "n_tokens": self.all.n_tokens,
            "n_dead_a": int(self.all.dead_a.size),
            "n_dead_b": int(self.all.dead_b.size),
            "n_matched": len(self.all),
            "n_pairs": len(self.kept),
            "removed": dict(self.removed),
            "mean_corr_all": float(self.all.corr.mean()) if len(self.all) else None,
            "mean_corr_kept": float(self.kept.corr.mean()) if len(self.kept) else None,
        }


def _texts(tokenizer: Any) -> tuple[Callable[[int], str], set[int]]:
    if hasattr(tokenizer, "decode"):
        specials = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
        return (lambda i: tokenizer.decode([int(i)])), specials
    if isinstance(tokenizer, Mapping):
        return (lambda i: str(tokenizer.get(int(i), ""))), set()
    if callable(tokenizer):
        return (lambda i: str(tokenizer(int(i)))), set()
    raise ConfigError(
        f"tokenizer must have .decode, be a callable id -> str or a dict, got {type(tokenizer)}"
    )


class _TopText:
    """Normalised text of each feature's top-activating tokens (``top_ids [f, k]``, -1 = none)."""

    def __init__(self, top_ids: np.ndarray, tokenizer: Any):
        self.ids = top_ids
        fn, self.specials = _texts(tokenizer)
        uniq = np.unique(top_ids[top_ids >= 0])
        self.text = {int(t): normalize_token_text(fn(int(t))) for t in uniq}

    def row(self, f: int) -> list[int]:
        return [int(t) for t in self.ids[f] if t >= 0]

    def nonconcept(self, f: int) -> bool:
        """True when the feature has no top token or all of them are non-concept tokens."""
        return all(t in self.specials or is_nonconcept_text(self.text[t]) for t in self.row(f))

    def words(self, f: int) -> set[str]:
        return {self.text[t] for t in self.row(f) if t not in self.specials and self.text[t]}


def filter_match(
    match: FeatureMatch, tokenizer_a: Any, tokenizer_b: Any | None, filters: MatchFilters
) -> FilteredMatch:
    """Apply :class:`MatchFilters` to an unfiltered ``match`` (from ``match_features`` with token ids)."""
    filters.validate()
    need_tokens = filters.drop_nonconcept or filters.shared_top_token
    if need_tokens and (match.top_tokens_a is None or match.top_tokens_b is None):
        raise ConfigError("the token filters need top tokens: match_features(..., token_ids_a=...)")
    keep = np.ones(len(match), dtype=bool)
    removed: dict[str, int] = {}

    def apply(name: str, mask: np.ndarray) -> None:
        nonlocal keep
        removed[name] = int((keep & ~mask).sum())
        keep = keep & mask

    if filters.min_corr is not None:
        apply("min_corr", match.corr >= filters.min_corr)
    if need_tokens:
        ta = _TopText(match.top_tokens_a, tokenizer_a)  # type: ignore[arg-type]
        tb = _TopText(match.top_tokens_b, tokenizer_a if tokenizer_b is None else tokenizer_b)  # type: ignore[arg-type]
        if filters.drop_nonconcept:
            mask = np.array([not (ta.nonconcept(i) or tb.nonconcept(j)) for i, j in zip(match.a, match.b)])
            apply("nonconcept", mask.astype(bool).reshape(-1))
        if filters.shared_top_token:
            mask = np.array([bool(ta.words(i) & tb.words(j)) for i, j in zip(match.a, match.b)])
            apply("shared_top_token", mask.astype(bool).reshape(-1))
    if filters.one_to_one != "none":
        idx = np.flatnonzero(keep)
        a, b, c = match.a[idx], match.b[idx], match.corr[idx]
        # by B feature; then best correlation first ("best") or lowest A index first ("first")
        order = np.lexsort((a, -c, b)) if filters.one_to_one == "best" else np.lexsort((a, b))
        first = np.ones(order.size, dtype=bool)
        first[1:] = b[order][1:] != b[order][:-1]
        mask = np.zeros(len(match), dtype=bool)
        mask[idx[order[first]]] = True
        apply("one_to_one", mask | ~keep)
    return FilteredMatch(match, match.subset(keep), removed)


def match_saes(
    codes_a: Any,
    codes_b: Any,
    token_ids_a: Any,
    token_ids_b: Any,
    tokenizer_a: Any,
    tokenizer_b: Any,
    filters: MatchFilters | None = None,
    chunk_size: int = 4096,
) -> FilteredMatch:
    """Match SAE A's features to SAE B's by activation correlation over paired tokens, then filter.

    Args:
        codes_a: ``[n_tokens, width_a]`` feature activations of SAE A on the paired tokens (array,
            tensor, scipy sparse, or an iterable of chunks; see ``match_features``).
        codes_b: ``[n_tokens, width_b]`` of SAE B on the same tokens, in the same order.
        token_ids_a: ``[n_tokens]`` model A's token id of every row; ``token_ids_b`` model B's.
        tokenizer_a, tokenizer_b: read the top tokens (tokenizer, dict or callable id -> text).
        filters: :class:`MatchFilters` (default: the paper's, one-to-one keeping the best match).
    """
    filters = filters or MatchFilters()
    filters.validate()
    m = match_features(
        codes_a,
        codes_b,
        method="max",
        token_ids_a=token_ids_a,
        token_ids_b=token_ids_b,
        tokenizer_a=tokenizer_a,
        tokenizer_b=tokenizer_b,
        top_k=filters.top_k,
        chunk_size=chunk_size,
    )
    return filter_match(m, tokenizer_a, tokenizer_b, filters)


# ---------------------------------------------------------------------------------------- scores
def reduce_rows(w: torch.Tensor, keep_variance: float, max_dims: int) -> torch.Tensor:
    """Principal-component scores of the centred rows ``w [n, d]`` -> ``[n, k]`` (float64).

    ``k`` is the fewest directions holding ``keep_variance`` of the variance, at most ``max_dims``.
    """
    x = w.detach().to(torch.float64).cpu()
    x = x - x.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    lam = s * s
    tot = float(lam.sum())
    if tot <= 0:
        return x[:, :1] * 0.0
    frac = torch.cumsum(lam, 0) / tot
    k = int((frac < keep_variance * (1 - 1e-12)).sum()) + 1
    k = max(1, min(k, max_dims, int((lam > lam[0] * 1e-10).sum())))
    return u[:, :k] * s[:k]


def paired_similarity(
    w_a: Any,
    w_b: Any,
    match: FeatureMatch,
    idx: np.ndarray | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_permutations: int = 100,
    seed: int = 0,
    keep_variance: float = 0.99,
    max_dims_fraction: float = 0.25,
    min_pairs: int = 8,
) -> dict[str, Any]:
    """Similarity of paired decoder rows with its shuffled-pairing null.

    ``w_a [width_a, d_a]``, ``w_b [width_b, d_b]`` (e.g. ``sae.W_dec``); the rows ``match.a[idx]`` and
    ``match.b[idx]`` are compared. Returns ``{"n_pairs", metric: value, metric+"_null_mean",
    metric+"_null_std", metric+"_p", "svcca_dims"}``; metric values are ``None`` with fewer than
    ``min_pairs`` pairs.
    """
    if n_permutations < 1:
        raise ConfigError(f"n_permutations must be >= 1, got {n_permutations}")
    xa, xb = paired_rows(torch.as_tensor(w_a).detach().cpu(), torch.as_tensor(w_b).detach().cpu(), match, idx)
    n = int(xa.shape[0])
    out: dict[str, Any] = {"n_pairs": n}
    if n < max(min_pairs, 4):
        for m in metrics:
            out.update({m: None, f"{m}_null_mean": None, f"{m}_null_std": None, f"{m}_p": None})
        return out
    for k, m in enumerate(metrics):
        if m == "svcca":
            cap = max(1, int(n * max_dims_fraction))
            x, y = reduce_rows(xa, keep_variance, cap), reduce_rows(xb, keep_variance, cap)
            out["svcca_dims"] = [int(x.shape[1]), int(y.shape[1])]
            kwargs: dict[str, Any] = {"keep_variance": 1.0}
        else:
            x, y, kwargs = xa, xb, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = permutation_test(m, x, y, n_permutations=n_permutations, seed=seed + k, **kwargs)
        out[m] = r.observed
        out[f"{m}_null_mean"] = r.null_mean
        out[f"{m}_null_std"] = r.null_std
        out[f"{m}_p"] = r.p_value
    return out


def subspace_scores(
    w_a: Any,
    w_b: Any,
    match: FeatureMatch,
    subspaces: Mapping[str, Iterable[str]],
    side: str = "a",
    metrics: Sequence[str] = ("svcca", "rsa"),
    n_permutations: int = 1000,
    seed: int = 0,
    min_pairs: int = 8,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Per semantic subspace: the pairs whose top token (of ``side``) is a keyword, scored as a whole.

    ``match`` must carry top-token text (``match_features`` with tokenizers; :func:`match_saes` does).
    Returns ``[{"name", "n_pairs", svcca, svcca_null_mean, svcca_p, ...}]`` in the keyword file's order.
    """
    groups = semantic_subspaces(match, {k: list(v) for k, v in subspaces.items()}, side=side)
    rows = []
    for i, (name, idx) in enumerate(groups.items()):
        r = paired_similarity(
            w_a, w_b, match, idx, metrics, n_permutations, seed + 1000 * i, min_pairs=min_pairs, **kwargs
        )
        rows.append({"name": name, **r})
    return rows
