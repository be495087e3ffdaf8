"""Pairing positions of two tokenizations of the same texts.

Two tokenizers never share positions. A position of tokenization A is paired with a position of
tokenization B when both tokens *end at the same character offset* of the text: the two models have then
read exactly the same prefix of the text. Tokens that end inside a character (byte-level BPE splits a
multi-byte character over several tokens), special tokens and zero-width tokens have no character end
(``-1``) and are never paired. The other mode pairs the last token of every document ("last").

``PairedStores`` applies the same rule to two activation stores (``rosettalens.store``) extracted from the
same documents, giving row-aligned ``(X_a, X_b)`` matrices and shuffled batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from rosettalens.errors import StoreError
from rosettalens.offsets import char_ends, char_ends_by_decoding, char_ends_from_offsets
from rosettalens.store import row_batches

__all__ = [
    "PairedStores",
    "align_positions",
    "align_texts",
    "char_ends",
    "char_ends_from_offsets",
    "char_ends_by_decoding",
]


def align_positions(ends_a: Sequence[int], ends_b: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(idx_a, idx_b)`` of positions whose character ends agree (``-1`` never pairs)."""
    ea, eb = np.asarray(ends_a, dtype=np.int64), np.asarray(ends_b, dtype=np.int64)
    va, vb = np.nonzero(ea >= 0)[0], np.nonzero(eb >= 0)[0]
    _, ia, ib = np.intersect1d(ea[va], eb[vb], assume_unique=False, return_indices=True)
    return va[ia], vb[ib]


def align_texts(tok_a, tok_b, texts: Sequence[str], add_special_tokens: bool = True) -> dict:
    """Pair the positions of two tokenizers over ``texts``.

    Returns ``{"pairs": [(idx_a, idx_b) per text], "ids_a", "ids_b", "fraction_a", "fraction_b",
    "paired_fraction"}``; fractions count paired positions over all positions (special tokens included),
    ``paired_fraction`` is ``2 * n_pairs / (n_a + n_b)`` (1.0 for identical tokenizers).
    """
    pairs, ids_a, ids_b = [], [], []
    n_a = n_b = n_p = 0
    for text in texts:
        a, ends_a = char_ends(tok_a, text, add_special_tokens)
        b, ends_b = char_ends(tok_b, text, add_special_tokens)
        ia, ib = align_positions(ends_a, ends_b)
        pairs.append((ia, ib))
        ids_a.append(a)
        ids_b.append(b)
        n_a, n_b, n_p = n_a + len(a), n_b + len(b), n_p + len(ia)
    return {
        "pairs": pairs,
        "ids_a": ids_a,
        "ids_b": ids_b,
        "fraction_a": n_p / max(n_a, 1),
        "fraction_b": n_p / max(n_b, 1),
        "paired_fraction": 2 * n_p / max(n_a + n_b, 1),
    }


# --------------------------------------------------------------------------------------------- stores
class PairedStores:
    """Row-aligned view of two activation stores extracted from the same documents.

    ``mode="aligned"``: rows whose tokens end at the same character of the same document (stores made
    with the same tokenizer pair every row at the same position, split characters included).
    ``mode="last"``: the last stored row of every document (both must have read the same text, i.e. end
    at the same character; documents truncated differently are left out).

    ``pair.rows_a`` / ``pair.rows_b`` are the paired row indices ``[n_pairs]``; ``pair.read(hook_a,
    hook_b)`` returns ``(X_a [n_pairs, d_a], X_b [n_pairs, d_b])``.
    """

    def __init__(self, store_a, store_b, mode: str = "aligned"):
        if mode not in ("aligned", "last"):
            raise StoreError(f"unknown pairing mode {mode!r}: expected 'aligned' or 'last'")
        ha = store_a.manifest.get("dataset", {}).get("sha256")
        hb = store_b.manifest.get("dataset", {}).get("sha256")
        if ha is None or ha != hb:
            raise StoreError(
                f"cannot pair stores extracted from different texts: {store_a.path} "
                f"(dataset {str(ha)[:12]}) vs {store_b.path} (dataset {str(hb)[:12]})"
            )
        self.store_a, self.store_b, self.mode = store_a, store_b, mode
        da, db = store_a.doc_index.numpy(), store_b.doc_index.numpy()
        ca, cb = store_a.char_end.numpy(), store_b.char_end.numpy()
        if mode == "last":
            ra, rb = _last_rows(da), _last_rows(db)
            ka = da[ra] * (1 << 32) + ca[ra]
            kb = db[rb] * (1 << 32) + cb[rb]
            _, ia, ib = np.intersect1d(ka, kb, return_indices=True)
            rows_a, rows_b = ra[ia], rb[ib]
            n_a, n_b = len(ra), len(rb)
        else:
            same_tok = store_a.manifest.get("tokenizer", {}).get("sha256") == store_b.manifest.get(
                "tokenizer", {}
            ).get("sha256")
            if same_tok:  # one tokenization: every position pairs with itself, split characters included
                pa, pb = store_a.pos_index.numpy(), store_b.pos_index.numpy()
                va, vb = np.arange(len(da)), np.arange(len(db))
                ka, kb = da * (1 << 32) + pa, db * (1 << 32) + pb
            else:
                va, vb = np.nonzero(ca >= 0)[0], np.nonzero(cb >= 0)[0]
                ka = da[va] * (1 << 32) + ca[va]
                kb = db[vb] * (1 << 32) + cb[vb]
            _, ia, ib = np.intersect1d(ka, kb, return_indices=True)
            rows_a, rows_b = va[ia], vb[ib]
            n_a, n_b = len(da), len(db)
        self.rows_a = torch.from_numpy(rows_a.astype(np.int64))
        self.rows_b = torch.from_numpy(rows_b.astype(np.int64))
        n = len(rows_a)
        self.fraction_a = n / max(n_a, 1)
        self.fraction_b = n / max(n_b, 1)
        self.paired_fraction = 2 * n / max(n_a + n_b, 1)

    def __len__(self) -> int:
        return len(self.rows_a)

    def read(self, hook_a: str, hook_b: str, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_a [n, d_a], X_b [n, d_b])`` for all pairs, or for the pair indices ``rows``."""
        ra, rb = self.rows_a, self.rows_b
        if rows is not None:
            idx = torch.as_tensor(rows, dtype=torch.long)
            ra, rb = ra[idx], rb[idx]
        return self.store_a.read(hook_a, rows=ra), self.store_b.read(hook_b, rows=rb)

    def iter_batches(
        self,
        hook_a: str,
        hook_b: str,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield row-aligned ``(X_a [batch, d_a], X_b [batch, d_b])``; shuffled by ``seed`` if asked."""
        for idx in row_batches(len(self), batch_size, shuffle, seed, drop_last):
            yield self.read(hook_a, hook_b, rows=idx)


def _last_rows(doc_index: np.ndarray) -> np.ndarray:
    """Index of the last row of every document (rows are in canonical (doc, pos) order)."""
    if len(doc_index) == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.nonzero(doc_index[1:] != doc_index[:-1])[0]
    return np.concatenate([change, [len(doc_index) - 1]]).astype(np.int64)
