"""Paired activations of two models on the same texts, extracted in memory.

Pairing rule (``pairing``):

* ``"all"`` -- both tokenizers give identical token ids for every text (same tokenizer): every
  position except special tokens (BOS etc., whose activations are outliers) is a pair;
* ``"aligned"`` -- positions whose tokens end at the same character of the text
  (:mod:`rosettalens.align`); special tokens and tokens ending inside a character never pair;
* ``"last"`` -- the last aligned position of each text (both models have read the whole text);
* ``"auto"`` -- ``"all"`` when the tokenizations agree, else ``"aligned"``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rosettalens.errors import ConfigError, DataError

PAIRINGS = ("auto", "all", "aligned", "last")


@dataclass
class PairedTexts:
    """Token ids of each text in both models and the paired positions.

    ``ids_src[i]`` / ``ids_tgt[i]``: token ids of text ``i``; ``pos_src[i]`` / ``pos_tgt[i]``:
    equally long int arrays of paired positions (indices into the unpadded ids).
    """

    pairing: str
    ids_src: list[list[int]]
    ids_tgt: list[list[int]]
    pos_src: list[np.ndarray]
    pos_tgt: list[np.ndarray]

    @property
    def n_pairs(self) -> int:
        return int(sum(len(p) for p in self.pos_src))


def _ids(tokenizer, text: str, max_length: int | None) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids[:max_length] if max_length else ids


def pair_texts(
    tok_src, tok_tgt, texts: Sequence[str], pairing: str = "auto", max_length: int | None = None
) -> PairedTexts:
    """Tokenize ``texts`` with both tokenizers and pair positions by ``pairing`` (module docstring)."""
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown pairing {pairing!r}; expected one of {', '.join(PAIRINGS)}")
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("no (non-empty) texts to extract activations from")
    ids_s = [_ids(tok_src, t, max_length) for t in texts]
    ids_t = [
        _ids(tok_tgt, t, max_length) if tok_tgt is not tok_src else list(s) for t, s in zip(texts, ids_s)
    ]
    same = all(a == b for a, b in zip(ids_s, ids_t))
    if pairing == "auto":
        pairing = "all" if same else "aligned"
    if pairing == "all":
        if not same:
            raise ConfigError(
                "the two tokenizers tokenize the texts differently; use pairing 'aligned' or 'last'"
            )
        special = set(getattr(tok_tgt, "all_special_ids", []) or [])
        pos = [np.asarray([i for i, t in enumerate(s) if t not in special], dtype=np.int64) for s in ids_s]
        return PairedTexts("all", ids_s, ids_t, pos, [p.copy() for p in pos])
    from rosettalens.align import align_positions, char_ends  # noqa: PLC0415 - optional heavy import

    pos_s, pos_t = [], []
    for text, a, b in zip(texts, ids_s, ids_t):
        _, ends_a = char_ends(tok_src, text)
        _, ends_b = char_ends(tok_tgt, text)
        ia, ib = align_positions(ends_a[: len(a)], ends_b[: len(b)])
        order = np.argsort(ia, kind="stable")
        ia, ib = ia[order], ib[order]
        if pairing == "last":
            ia, ib = ia[-1:], ib[-1:]
        pos_s.append(ia.astype(np.int64))
        pos_t.append(ib.astype(np.int64))
    return PairedTexts(pairing, ids_s, ids_t, pos_s, pos_t)


def pad_left(
    id_lists: Sequence[Sequence[int]], pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: ``input_ids [batch, pos]`` and ``attention_mask [batch, pos]``."""
    P = max(len(x) for x in id_lists)
    ids = torch.full((len(id_lists), P), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(id_lists), P), dtype=torch.long)
    for i, x in enumerate(id_lists):
        if len(x):
            ids[i, P - len(x) :] = torch.as_tensor(list(x), dtype=torch.long)
            mask[i, P - len(x) :] = 1
    return ids.to(device), mask.to(device)


def pad_id(hm) -> int:
    tok = hm.tokenizer
    pid = getattr(tok, "pad_token_id", None)
    if pid is None:
        pid = getattr(tok, "eos_token_id", None)
    return int(pid or 0)


def hook_width(hm, hook: str) -> int:
    """Width of a residual-like hook (``d_model``) without running the model."""
    name = hm.resolve_hook(hook)
    if name.split(".")[0] in ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        return int(hm.cfg.d_model)
    raise ConfigError(
        f"hook {hook!r}: mappers work on residual-stream-like hooks (embed, resid_pre/mid/post, attn_out, mlp_out)"
    )


@torch.no_grad()
def run_positions(
    hm, hook: str, id_lists: Sequence[Sequence[int]], positions: Sequence[np.ndarray], batch_size: int = 8
) -> list[torch.Tensor]:
    """Activations of ``hm`` at ``hook`` at the given positions of each id list: ``[k_i, d]`` per text (CPU)."""
    out: list[torch.Tensor] = []
    pid = pad_id(hm)
    for s in range(0, len(id_lists), batch_size):
        chunk = id_lists[s : s + batch_size]
        ids, mask = pad_left(chunk, pid, hm.device)
        _, cache = hm.run_with_cache(ids, hooks=[hook], attention_mask=mask, stop_early=True)
        act = next(iter(cache.values()))
        P = ids.shape[1]
        for j, x in enumerate(chunk):
            p = torch.as_tensor(positions[s + j], dtype=torch.long) + (P - len(x))
            out.append(act[j, p.to(act.device)].float().cpu())
    return out


def paired_activations(
    src_hm,
    tgt_hm,
    texts: Sequence[str],
    src_hook: str,
    tgt_hook: str,
    *,
    pairing: str = "auto",
    max_tokens: int | None = None,
    max_length: int | None = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Extract paired activations ``X_src [n, d_src]``, ``X_tgt [n, d_tgt]`` (float32, CPU).

    Texts are processed in order until ``max_tokens`` pairs are collected (then truncated to it).
    Returns ``(X_src, X_tgt, info)`` with ``info = {pairing, n_pairs, n_texts, paired_fraction}``.
    """
    src_hook, tgt_hook = src_hm.resolve_hook(src_hook), tgt_hm.resolve_hook(tgt_hook)
    hook_width(src_hm, src_hook), hook_width(tgt_hm, tgt_hook)
    pt = pair_texts(src_hm.tokenizer, tgt_hm.tokenizer, texts, pairing, max_length)
    xs, ys, used, n, total_tgt = [], [], 0, 0, 0
    step = max(1, batch_size)
    bar = tqdm(
        total=max_tokens or pt.n_pairs,
        desc="extract pairs",
        unit="tok",
        file=sys.stderr,
        disable=not progress,
    )
    try:
        for s in range(0, len(pt.ids_src), step):
            sl = slice(s, s + step)
            a = run_positions(src_hm, src_hook, pt.ids_src[sl], pt.pos_src[sl], batch_size)
            b = run_positions(tgt_hm, tgt_hook, pt.ids_tgt[sl], pt.pos_tgt[sl], batch_size)
            xs.extend(a)
            ys.extend(b)
            k = sum(len(x) for x in a)
            n += k
            used += len(a)
            total_tgt += sum(len(x) for x in pt.ids_tgt[sl])
            bar.update(k)
            if max_tokens and n >= max_tokens:
                break
    finally:
        bar.close()
    if n == 0:
        raise DataError(f"no paired positions between {src_hm.name} and {tgt_hm.name} on these texts")
    X, Y = torch.cat(xs), torch.cat(ys)
    if max_tokens:
        X, Y = X[:max_tokens], Y[:max_tokens]
    info = {
        "pairing": pt.pairing,
        "n_pairs": int(X.shape[0]),
        "n_texts": used,
        "paired_fraction_tgt": n / max(total_tgt, 1),
    }
    return X, Y, info
