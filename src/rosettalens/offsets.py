"""Where each token of a tokenization ends in the text (its character end offset).

A token's character end is the offset just past its last character, or ``-1`` when the token does not
end at a character boundary (byte-level BPE splits a multi-byte character over several tokens), is a
special token or is zero-width. :mod:`rosettalens.store` records it for every stored row and
:mod:`rosettalens.align` pairs two tokenizations by it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["char_ends", "char_ends_by_decoding", "char_ends_from_offsets"]


def char_ends_from_offsets(
    offsets: Sequence[tuple[int, int]], special: Sequence[bool] | None = None, next_start: int | None = None
) -> list[int]:
    """Character end offset of every token, or ``-1`` where the token does not end at a character boundary.

    ``offsets`` are a fast tokenizer's ``offset_mapping`` (``[pos]`` pairs of char start/end). Byte-level
    tokenizers give every token that covers part of a character the span of the whole character; such a
    token really ends inside the character exactly when the next token starts before its end, so it gets
    ``-1``. ``next_start`` is the start of the token after the last one (if the sequence was truncated).
    """
    n = len(offsets)
    ends = [-1] * n
    nxt = next_start  # start of the next real (non-special, non-empty) token, scanning backwards
    for i in range(n - 1, -1, -1):
        start, end = int(offsets[i][0]), int(offsets[i][1])
        if (special is not None and special[i]) or end <= start:
            continue
        ends[i] = -1 if (nxt is not None and nxt < end) else end
        nxt = start
    return ends


def char_ends_by_decoding(tokenizer, text: str, ids: Sequence[int]) -> list[int]:
    """Reference (slow, O(n^2)) char ends: ``decode(ids[:i+1])`` must be a prefix of ``text``.

    Works for any tokenizer whose decoding reproduces the text (special tokens skipped). Used as the
    fallback for tokenizers without offsets and as the independent check in tests.
    """
    special = set(tokenizer.all_special_ids)
    ends, last = [], None
    for i, tid in enumerate(ids):
        if tid in special:
            ends.append(-1)
            continue
        prefix = tokenizer.decode(
            list(ids[: i + 1]), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        bad = not prefix or "\ufffd" in prefix[-1:] or (last is not None and len(prefix) <= last)
        if bad or not text.startswith(prefix):
            ends.append(-1)
        else:
            ends.append(len(prefix))
            last = len(prefix)
    return ends


def char_ends(tokenizer, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """Tokenize ``text``; return ``(ids, char_ends)`` (``-1`` = no character end)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        special_ids = set(tokenizer.all_special_ids)
        return ids, char_ends_from_offsets(enc["offset_mapping"], [t in special_ids for t in ids])
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return ids, char_ends_by_decoding(tokenizer, text, ids)
