"""Feature matching between two dictionaries (SAEs) by activation correlation (Lan et al. 2024).

Both dictionaries' activations are read over the *same* tokens, ``acts_a [n_tokens, f_a]`` and
``acts_b [n_tokens, f_b]``, in token chunks. Pearson correlations are accumulated from running
float64 sums (``sum a``, ``sum a^2``, ``sum b``, ``sum b^2``, ``A^T B``), so memory is one
``[f_a, f_b]`` float64 matrix plus one chunk: two 16k-feature dictionaries need ~2.1 GB whatever the
number of tokens. Sparse chunks (SAE codes, density < 10%) go through scipy sparse products.

Filters (applied in this order, each counted in :attr:`FeatureMatch.removed`): minimum correlation,
non-concept features (top tokens mostly punctuation, whitespace or special tokens), shared top
token, then one-to-one (for each B feature keep only the A feature with the *highest* correlation).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from rosettalens.errors import ConfigError, ShapeError
from rosettalens.similarity.categories import BUILTIN_CATEGORIES, normalize_token_text
from rosettalens.similarity.errors import NonFiniteError

__all__ = [
    "FeatureMatch",
    "match_features",
    "semantic_subspaces",
    "paired_rows",
    "is_nonconcept_text",
    "BUILTIN_CATEGORIES",
]

_SPARSE_DENSITY = 0.1
_DEAD = -2.0  # correlation given to dead B features so that they are never the best match


@dataclass(frozen=True)
class FeatureMatch:
    """Matched feature pairs ``(a[i], b[i])`` with their activation correlation ``corr[i]``."""

    a: np.ndarray  # [m] int64 feature index in dictionary A
    b: np.ndarray  # [m] int64 matched feature index in dictionary B
    corr: np.ndarray  # [m] float64 Pearson correlation over the tokens
    method: str
    n_tokens: int
    n_features_a: int
    n_features_b: int
    dead_a: np.ndarray = field(repr=False)  # features with zero variance over the tokens
    dead_b: np.ndarray = field(repr=False)
    removed: dict[str, int] = field(default_factory=dict)  # pairs dropped by each filter, in order
    top_tokens_a: np.ndarray | None = field(default=None, repr=False)  # [f_a, top_k] token ids, -1 = none
    top_tokens_b: np.ndarray | None = field(default=None, repr=False)  # [f_b, top_k]
    top_text_a: list[str] | None = field(default=None, repr=False)  # [m] normalised top token of a[i]
    top_text_b: list[str] | None = field(default=None, repr=False)  # [m]
    corr_matrix: np.ndarray | None = field(default=None, repr=False)  # [f_a, f_b] if requested

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def subset(self, idx: np.ndarray | Sequence[int]) -> FeatureMatch:
        """The pairs at positions ``idx`` (indices or boolean mask into the pairs)."""
        idx = np.asarray(idx)
        if idx.dtype == np.bool_:
            idx = np.flatnonzero(idx)
        pick = (lambda xs: [xs[i] for i in idx]) if idx.size else (lambda xs: [])
        return replace(
            self,
            a=self.a[idx],
            b=self.b[idx],
            corr=self.corr[idx],
            top_text_a=None if self.top_text_a is None else pick(self.top_text_a),
            top_text_b=None if self.top_text_b is None else pick(self.top_text_b),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the pairs and counts."""
        out: dict[str, Any] = {
            "method": self.method,
            "n_tokens": self.n_tokens,
            "n_features_a": self.n_features_a,
            "n_features_b": self.n_features_b,
            "n_pairs": len(self),
            "n_dead_a": int(self.dead_a.size),
            "n_dead_b": int(self.dead_b.size),
            "mean_corr": float(self.corr.mean()) if len(self) else None,
            "removed": dict(self.removed),
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "corr": self.corr.tolist(),
        }
        if self.top_text_a is not None:
            out["top_text_a"] = list(self.top_text_a)
        if self.top_text_b is not None:
            out["top_text_b"] = list(self.top_text_b)
        return out


# ----------------------------------------------------------------------------------------------
# chunked input


def _iter_chunks(acts: Any, chunk_size: int, name: str) -> Iterator[Any]:
    """Yield row chunks of ``acts``: an array/tensor/scipy matrix ``[n, f]`` or an iterable of chunks."""
    if isinstance(acts, torch.Tensor) and acts.layout != torch.strided:
        acts = _torch_sparse_to_scipy(acts)
    if isinstance(acts, torch.Tensor | np.ndarray) or sp.issparse(acts):
        if acts.ndim != 2:
            raise ShapeError(f"{name} must be [n_tokens, n_features], got shape {tuple(acts.shape)}")
        if sp.issparse(acts):
            acts = sp.csr_matrix(acts)
        for start in range(0, acts.shape[0], chunk_size):
            yield acts[start : start + chunk_size]
        return
    if isinstance(acts, Iterable):
        yield from acts
        return
    raise ShapeError(
        f"{name} must be an array, tensor, scipy sparse matrix or iterable of chunks, got {type(acts).__name__}"
    )


def _torch_sparse_to_scipy(t: torch.Tensor) -> sp.csr_matrix:
    coo = t.detach().to_sparse_coo().coalesce().cpu()
    idx = coo.indices().numpy()
    return sp.csr_matrix((coo.values().to(torch.float64).numpy(), (idx[0], idx[1])), shape=tuple(coo.shape))


def _as_chunk(c: Any, name: str, device: torch.device) -> torch.Tensor | sp.csr_matrix:
    """float64 chunk: scipy CSR when sparse enough (and on CPU), else a dense torch tensor on ``device``."""
    if isinstance(c, torch.Tensor) and c.layout != torch.strided:
        c = _torch_sparse_to_scipy(c)
    if sp.issparse(c):
        m = sp.csr_matrix(c, dtype=np.float64)
        if not np.isfinite(m.data).all():
            raise NonFiniteError(f"{name} has NaN or inf activations")
        return m if device.type == "cpu" else torch.from_numpy(m.toarray()).to(device)
    t = c.detach() if isinstance(c, torch.Tensor) else torch.from_numpy(np.asarray(c))
    if t.ndim != 2:
        raise ShapeError(f"{name} chunks must be [chunk_tokens, n_features], got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name} has NaN or inf activations")
    if device.type == "cpu" and t.numel() and int(torch.count_nonzero(t)) < _SPARSE_DENSITY * t.numel():
        return sp.csr_matrix(t.cpu().numpy(), dtype=np.float64)
    return t.to(device=device, dtype=torch.float64)


class _TopK:
    """Running top-``k`` activations per feature and their global token positions."""

    def __init__(self, n_features: int, k: int) -> None:
        self.k = k
        self.values = torch.full((k, n_features), -torch.inf, dtype=torch.float64)
        self.pos = torch.full((k, n_features), -1, dtype=torch.int64)

    def _merge(self, values: torch.Tensor, pos: torch.Tensor) -> None:
        allv = torch.cat([self.values, values])
        allp = torch.cat([self.pos, pos])
        top = torch.topk(allv, self.k, dim=0)
        self.values = top.values
        self.pos = torch.gather(allp, 0, top.indices)

    def add(self, chunk: torch.Tensor | sp.csr_matrix, offset: int) -> None:
        f = self.values.shape[1]
        if not isinstance(chunk, torch.Tensor):  # a scipy CSR chunk (see _as_chunk)
            coo = chunk.tocoo()
            order = np.lexsort((-coo.data, coo.col))
            cols, rows, vals = coo.col[order], coo.row[order], coo.data[order]
            if cols.size == 0:
                return
            starts = np.r_[0, np.flatnonzero(np.diff(cols)) + 1]
            rank = np.arange(cols.size) - np.repeat(starts, np.diff(np.r_[starts, cols.size]))
            keep = rank < self.k
            v = torch.full((self.k, f), -torch.inf, dtype=torch.float64)
            p = torch.full((self.k, f), -1, dtype=torch.int64)
            r, c = torch.from_numpy(rank[keep]), torch.from_numpy(cols[keep].astype(np.int64))
            v[r, c] = torch.from_numpy(vals[keep])
            p[r, c] = torch.from_numpy(rows[keep].astype(np.int64) + offset)
            self._merge(v, p)
        else:
            kk = min(self.k, chunk.shape[0])
            top = torch.topk(chunk, kk, dim=0)
            self._merge(top.values.cpu(), top.indices.cpu() + offset)

    def positions(self) -> np.ndarray:
        """``[f, k]`` token positions of the top non-zero activations (-1 where fewer than k)."""
        pos = self.pos.clone()
        pos[~(self.values != 0) | ~torch.isfinite(self.values)] = -1
        return pos.T.numpy()


class _CorrStats:
    """Running float64 sums for Pearson correlations between the columns of A and of B."""

    def __init__(self, fa: int, fb: int, device: torch.device) -> None:
        self.n = 0
        self.device = device
        self.sa = np.zeros(fa)
        self.qa = np.zeros(fa)
        self.sb = np.zeros(fb)
        self.qb = np.zeros(fb)
        self.cross = torch.zeros(fa, fb, dtype=torch.float64, device=device)

    @staticmethod
    def _sums(c: torch.Tensor | sp.csr_matrix, f: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(c, torch.Tensor):  # a scipy CSR chunk
            return (
                np.bincount(c.indices, weights=c.data, minlength=f),
                np.bincount(c.indices, weights=c.data * c.data, minlength=f),
            )
        return c.sum(0).cpu().numpy(), (c * c).sum(0).cpu().numpy()

    def add(self, a: torch.Tensor | sp.csr_matrix, b: torch.Tensor | sp.csr_matrix) -> None:
        fa, fb = self.cross.shape
        s, q = self._sums(a, fa)
        self.sa += s
        self.qa += q
        s, q = self._sums(b, fb)
        self.sb += s
        self.qb += q
        self.n += a.shape[0]
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):  # both scipy CSR
            prod = sp.csr_matrix(a.T @ b)
            prod.sum_duplicates()
            coo = prod.tocoo()
            self.cross.numpy()[coo.row, coo.col] += coo.data  # CPU: a view of the accumulator
            return
        # mixed or dense chunks: dense product straight into the accumulator (no [f_a, f_b] temporary)
        ad = a if isinstance(a, torch.Tensor) else torch.from_numpy(a.toarray()).to(self.device)
        bd = b if isinstance(b, torch.Tensor) else torch.from_numpy(b.toarray()).to(self.device)
        self.cross.addmm_(ad.T, bd)

    def finish(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Turn the accumulator into the correlation matrix in place; returns (corr, dead_a, dead_b)."""
        n = self.n
        sds, deads = [], []
        for s, q in ((self.sa, self.qa), (self.sb, self.qb)):
            mu = s / n
            var = q / n - mu * mu
            dead = var <= 1e-12 * np.maximum(q / n, np.finfo(np.float64).tiny)
            sd = np.sqrt(np.clip(var, 0.0, None))
            sd[dead] = np.inf
            sds.append(torch.from_numpy(sd).to(self.device))
            deads.append(dead)
        c = self.cross
        c.div_(n)
        c.addr_(
            torch.from_numpy(self.sa / n).to(self.device),
            torch.from_numpy(self.sb / n).to(self.device),
            alpha=-1,
        )
        c.div_(sds[0][:, None]).div_(sds[1][None, :]).clamp_(-1.0, 1.0)
        dead_b = torch.from_numpy(deads[1]).to(self.device)
        c[:, dead_b] = _DEAD
        return c, np.flatnonzero(deads[0]), np.flatnonzero(deads[1])


# ----------------------------------------------------------------------------------------------
# token text


def is_nonconcept_text(text: str) -> bool:
    """True for tokens that carry no concept: empty/whitespace, or only punctuation/symbols/controls."""
    stripped = normalize_token_text(text)
    if not stripped:
        return True
    return all(unicodedata.category(ch)[0] in "PSZC" for ch in stripped)


def _decoder(tok: Any) -> tuple[Callable[[int], str], set[int]] | None:
    if tok is None:
        return None
    if hasattr(tok, "decode"):
        specials = {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
        return (lambda i: tok.decode([int(i)])), specials
    if isinstance(tok, Mapping):
        return (lambda i: str(tok.get(int(i), ""))), set()
    if callable(tok):
        return (lambda i: str(tok(int(i)))), set()
    raise ConfigError(
        f"tokenizer must have .decode, be a callable id -> str or a dict, got {type(tok).__name__}"
    )


@dataclass
class _Side:
    ids: np.ndarray  # [f, k] top token ids (-1 = none)
    texts: dict[int, str] | None  # normalised text per token id (None without a decoder)
    specials: set[int]

    def top_token(self, feature: int) -> int:
        row = [int(t) for t in self.ids[feature] if t >= 0]
        if not row:
            return -1
        counts = Counter(row)
        best = max(counts.values())
        return next(t for t in row if counts[t] == best)  # most frequent; ties -> highest activation

    def key(self, token: int) -> str | int:
        return self.texts.get(token, "") if self.texts is not None else token

    def nonconcept(self, feature: int) -> bool:
        row = [int(t) for t in self.ids[feature] if t >= 0]
        if not row or self.texts is None:
            return not row
        bad = sum(1 for t in row if t in self.specials or is_nonconcept_text(self.texts.get(t, "")))
        return bad * 2 > len(row)


def _side(positions: np.ndarray, token_ids: Any, tokenizer: Any, name: str, n_tokens: int) -> _Side:
    ids_all = np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids).reshape(-1)
    if ids_all.shape[0] != n_tokens:
        raise ShapeError(f"{name} has {ids_all.shape[0]} entries but the activations cover {n_tokens} tokens")
    ids = np.where(positions >= 0, ids_all[np.clip(positions, 0, None)], -1).astype(np.int64)
    dec = _decoder(tokenizer)
    if dec is None:
        return _Side(ids, None, set())
    fn, specials = dec
    texts = {int(t): normalize_token_text(fn(int(t))) for t in np.unique(ids) if t >= 0}
    return _Side(ids, texts, specials)


# ----------------------------------------------------------------------------------------------
# matching


def match_features(
    acts_a: Any,
    acts_b: Any,
    method: str = "max",
    *,
    min_corr: float | None = None,
    one_to_one: bool = False,
    token_ids_a: Any = None,
    token_ids_b: Any = None,
    tokenizer_a: Any = None,
    tokenizer_b: Any = None,
    drop_nonconcept: bool = False,
    shared_top_token: bool = False,
    top_k: int = 10,
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
    return_corr: bool = False,
) -> FeatureMatch:
    """Match the features of dictionary A to those of dictionary B by activation correlation.

    Args:
        acts_a: ``[n_tokens, f_a]`` activations of dictionary A: a numpy array, torch tensor (dense or
            sparse), scipy sparse matrix, or an iterable of ``[chunk_tokens, f_a]`` chunks (e.g. streamed
            from disk). Never converted to float64 as a whole.
        acts_b: ``[n_tokens, f_b]`` on the same tokens, in the same form (iterables yield matching chunks).
        method: ``"max"`` (each A feature -> its most correlated B feature) or ``"hungarian"`` (optimal
            one-to-one assignment maximising total correlation; O(f^3), slow beyond a few thousand).
        min_corr: drop pairs whose correlation is below this.
        one_to_one: for each B feature matched by several A features keep the best-correlated one.
        token_ids_a: ``[n_tokens]`` token ids of the rows (needed for the token filters); ``token_ids_b``
            defaults to it (same tokenizer).
        tokenizer_a: a tokenizer (``.decode``), a callable ``id -> str`` or a dict, to read top tokens;
            ``tokenizer_b`` defaults to it.
        drop_nonconcept: drop pairs where either feature's top-``top_k`` tokens are mostly punctuation,
            whitespace or special (BOS/EOS/pad) tokens.
        shared_top_token: keep only pairs whose features have the same top token (compared as normalised
            text when tokenizers are given, else by id).
        top_k: number of top activations tracked per feature.
        chunk_size: tokens per chunk for array inputs.
        device: where the ``[f_a, f_b]`` float64 accumulator lives (default CPU).
        return_corr: also return the full correlation matrix (``8 f_a f_b`` bytes).

    Returns:
        :class:`FeatureMatch` (pairs sorted by A feature index; dead features are never matched).
    """
    if method not in ("max", "hungarian"):
        raise ConfigError(f"method must be 'max' or 'hungarian', got {method!r}")
    if chunk_size < 1 or top_k < 1:
        raise ConfigError("chunk_size and top_k must be >= 1")
    if (drop_nonconcept or shared_top_token) and token_ids_a is None:
        raise ConfigError("drop_nonconcept / shared_top_token need token_ids_a (the token id of every row)")
    if drop_nonconcept and tokenizer_a is None:
        raise ConfigError(
            "drop_nonconcept needs tokenizer_a (a tokenizer or id -> text callable) to read tokens"
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    track = token_ids_a is not None

    stats: _CorrStats | None = None
    tops: tuple[_TopK, _TopK] | None = None
    chunks_b = _iter_chunks(acts_b, chunk_size, "acts_b")
    for raw_a in _iter_chunks(acts_a, chunk_size, "acts_a"):
        raw_b = next(chunks_b, None)
        if raw_b is None:
            raise ShapeError("acts_b has fewer tokens (chunks) than acts_a; both must cover the same tokens")
        a, b = _as_chunk(raw_a, "acts_a", dev), _as_chunk(raw_b, "acts_b", dev)
        if a.shape[0] != b.shape[0]:
            raise ShapeError(
                f"paired chunks have {a.shape[0]} and {b.shape[0]} tokens; they must cover the same tokens"
            )
        if stats is None:
            stats = _CorrStats(a.shape[1], b.shape[1], dev)
            if track:
                tops = (_TopK(a.shape[1], top_k), _TopK(b.shape[1], top_k))
        elif (a.shape[1], b.shape[1]) != tuple(stats.cross.shape):
            raise ShapeError(
                f"chunk widths {(a.shape[1], b.shape[1])} differ from the first chunk's {tuple(stats.cross.shape)}"
            )
        if tops is not None:
            tops[0].add(a, stats.n)
            tops[1].add(b, stats.n)
        stats.add(a, b)
        del a, b
    if next(chunks_b, None) is not None:
        raise ShapeError("acts_b has more tokens (chunks) than acts_a; both must cover the same tokens")
    if stats is None or stats.n < 2:
        raise ShapeError("match_features needs at least 2 tokens of activations")
    n_tokens = stats.n
    fa, fb = stats.cross.shape
    corr, dead_a, dead_b = stats.finish()
    del stats

    alive_a = np.setdiff1d(np.arange(fa), dead_a)
    if method == "max":
        best, idx = corr.max(dim=1)
        a_idx = alive_a
        b_idx = idx.cpu().numpy()[alive_a]
        values = best.cpu().numpy()[alive_a]
    else:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
        values = corr.cpu().numpy()[rows, cols]
        a_idx, b_idx = rows, cols
    keep = ~np.isin(a_idx, dead_a) & ~np.isin(b_idx, dead_b)
    a_idx, b_idx, values = a_idx[keep].astype(np.int64), b_idx[keep].astype(np.int64), values[keep]

    side_a = side_b = None
    if tops is not None:
        side_a = _side(tops[0].positions(), token_ids_a, tokenizer_a, "token_ids_a", n_tokens)
        side_b = _side(
            tops[1].positions(),
            token_ids_a if token_ids_b is None else token_ids_b,
            tokenizer_a if tokenizer_b is None else tokenizer_b,
            "token_ids_b",
            n_tokens,
        )
        if shared_top_token and (side_a.texts is None) != (side_b.texts is None):
            raise ConfigError("shared_top_token: give a tokenizer for both sides or for neither")
        if shared_top_token and side_a.texts is None and token_ids_b is not None:
            raise ConfigError(
                "shared_top_token across two tokenizers compares token text: pass tokenizer_a/_b"
            )

    removed: dict[str, int] = {}

    def apply(name: str, mask: np.ndarray) -> None:
        nonlocal a_idx, b_idx, values
        removed[name] = int((~mask).sum())
        a_idx, b_idx, values = a_idx[mask], b_idx[mask], values[mask]

    if min_corr is not None:
        apply("min_corr", values >= min_corr)
    if drop_nonconcept and side_a is not None and side_b is not None:
        apply(
            "nonconcept",
            np.array(
                [not (side_a.nonconcept(i) or side_b.nonconcept(j)) for i, j in zip(a_idx, b_idx)], dtype=bool
            ),
        )
    if shared_top_token and side_a is not None and side_b is not None:
        same = [
            (ta := side_a.top_token(i)) >= 0
            and (tb := side_b.top_token(j)) >= 0
            and side_a.key(ta) == side_b.key(tb)
            and side_a.key(ta) != ""
            for i, j in zip(a_idx, b_idx)
        ]
        apply("shared_top_token", np.array(same, dtype=bool))
    if one_to_one and method == "max":
        order = np.lexsort((a_idx, -values, b_idx))  # by B feature, best correlation first, then lower A
        first = np.ones(order.size, dtype=bool)
        first[1:] = b_idx[order][1:] != b_idx[order][:-1]
        mask = np.zeros(a_idx.size, dtype=bool)
        mask[order[first]] = True
        apply("one_to_one", mask)

    order = np.argsort(a_idx, kind="stable")
    a_idx, b_idx, values = a_idx[order], b_idx[order], values[order]
    texts_a = texts_b = None
    if side_a is not None and side_a.texts is not None and side_b is not None and side_b.texts is not None:
        texts_a = [str(side_a.key(side_a.top_token(i))) if side_a.top_token(i) >= 0 else "" for i in a_idx]
        texts_b = [str(side_b.key(side_b.top_token(j))) if side_b.top_token(j) >= 0 else "" for j in b_idx]
    return FeatureMatch(
        a=a_idx,
        b=b_idx,
        corr=values.astype(np.float64),
        method=method,
        n_tokens=n_tokens,
        n_features_a=fa,
        n_features_b=fb,
        dead_a=dead_a,
        dead_b=dead_b,
        removed=removed,
        top_tokens_a=None if side_a is None else side_a.ids,
        top_tokens_b=None if side_b is None else side_b.ids,
        top_text_a=texts_a,
        top_text_b=texts_b,
        corr_matrix=corr.cpu().numpy() if return_corr else None,
    )


def semantic_subspaces(
    match: FeatureMatch,
    categories: Mapping[str, Iterable[str]] | None = None,
    side: str = "a",
) -> dict[str, np.ndarray]:
    """Group matched pairs into semantic subspaces by keyword categories.

    A pair belongs to a category when its feature's top token (normalised text, see
    :func:`~rosettalens.similarity.categories.normalize_token_text`) is one of the category's keywords.

    Args:
        match: from :func:`match_features` called with ``token_ids_a`` and ``tokenizer_a``.
        categories: ``{name: keywords}``; default the built-ins (Time, Calendar, People/Roles, Nature,
            Emotions, Month names, Countries, Biology). Merge with ``{**BUILTIN_CATEGORIES, **mine}``.
        side: whose top token decides: ``"a"``, ``"b"``, ``"both"`` (both must match) or ``"either"``.

    Returns:
        ``{category: int64 indices into the pairs}`` (use ``match.subset(idx)``), every category present.
    """
    if match.top_text_a is None or match.top_text_b is None:
        raise ConfigError(
            "semantic_subspaces needs top-token text: call match_features with token_ids_a and tokenizer_a"
        )
    if side not in ("a", "b", "both", "either"):
        raise ConfigError(f"side must be 'a', 'b', 'both' or 'either', got {side!r}")
    cats = BUILTIN_CATEGORIES if categories is None else categories
    out: dict[str, np.ndarray] = {}
    for name, words in cats.items():
        if isinstance(words, str):
            raise ConfigError(f"category {name!r}: give a list of keywords, not one string")
        kw = {normalize_token_text(w) for w in words}
        in_a = np.array([t in kw for t in match.top_text_a], dtype=bool)
        in_b = np.array([t in kw for t in match.top_text_b], dtype=bool)
        mask = {"a": in_a, "b": in_b, "both": in_a & in_b, "either": in_a | in_b}[side]
        out[name] = np.flatnonzero(mask).astype(np.int64)
    return out


def paired_rows(
    weights_a: Any, weights_b: Any, match: FeatureMatch, idx: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of two per-feature matrices (e.g. SAE decoders ``[f_a, d_a]``, ``[f_b, d_b]``) paired by ``match``.

    Returns ``(W_a[a[idx]], W_b[b[idx]])``, ready for any metric or :func:`permutation_test` (which then
    tests the subspace similarity against randomly re-paired features, as in Lan et al. 2024).
    """
    wa = weights_a if isinstance(weights_a, torch.Tensor) else torch.as_tensor(np.asarray(weights_a))
    wb = weights_b if isinstance(weights_b, torch.Tensor) else torch.as_tensor(np.asarray(weights_b))
    sel = slice(None) if idx is None else torch.as_tensor(np.asarray(idx), dtype=torch.long)
    a = torch.as_tensor(match.a, dtype=torch.long)[sel]
    b = torch.as_tensor(match.b, dtype=torch.long)[sel]
    return wa[a.to(wa.device)], wb[b.to(wb.device)]
