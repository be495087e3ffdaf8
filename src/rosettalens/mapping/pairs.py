"""Paired activations of two models on the same texts, extracted in memory.

Pairing rule (``pairing``) for plain texts:

* ``"all"`` -- both tokenizers give identical token ids for every text (same tokenizer): every
  position except special tokens (BOS etc., whose activations are outliers) is a pair;
* ``"aligned"`` -- positions whose tokens end at the same character of the text
  (:mod:`rosettalens.align`); special tokens and tokens ending inside a character never pair;
* ``"last"`` -- the last aligned position of each text (both models have read the whole text);
* ``"auto"`` -- ``"all"`` when the tokenizations agree, else ``"aligned"``.

Instructions read through each model's chat template (``chat=True``): identical token ids pair every
position (template tokens included); otherwise the positions of the instruction's own text whose
tokens end at the same character, plus the last prompt token of each prompt (where a model decides
how to answer), which always pairs. Optional responses, teacher-forced after the prompts, pair the
same way.

:func:`depth_map` gives the layer of another model at the same relative depth.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rosettalens.errors import ConfigError, DataError
from rosettalens.names import parse_hook_name

PAIRINGS = ("auto", "all", "aligned", "last")
#: ``chat=True``: sentinel character ends that always pair (the last prompt token, the last response token)
LAST_PROMPT, LAST_RESPONSE = 10**9, 10**9 + 1


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
    if parse_hook_name(name)[0] in ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        return int(hm.cfg.d_model)
    raise ConfigError(
        f"hook {hook!r}: mappers work on residual-stream-like hooks (embed, resid_pre/mid/post, attn_out, mlp_out)"
    )


@torch.no_grad()
def read_positions(
    hm,
    hooks: Sequence[str],
    id_lists: Sequence[Sequence[int]],
    positions: Sequence[np.ndarray],
    batch_size: int = 8,
) -> dict[str, list[torch.Tensor]]:
    """Activations of ``hm`` at each of ``hooks`` at the given positions of each id list (left-padded
    batches, one forward pass per batch for all hooks): ``{hook: [[k_i, d] per text]}`` (float32, CPU)."""
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    pid = pad_id(hm)
    for s in range(0, len(id_lists), batch_size):
        chunk = id_lists[s : s + batch_size]
        ids, mask = pad_left(chunk, pid, hm.device)
        _, cache = hm.run_with_cache(ids, hooks=list(hooks), attention_mask=mask, stop_early=True)
        P = ids.shape[1]
        for h in hooks:
            act = cache[hm.resolve_hook(h)]
            for j, x in enumerate(chunk):
                p = torch.as_tensor(positions[s + j], dtype=torch.long) + (P - len(x))
                out[h].append(act[j, p.to(act.device)].float().cpu())
    return out


def run_positions(
    hm, hook: str, id_lists: Sequence[Sequence[int]], positions: Sequence[np.ndarray], batch_size: int = 8
) -> list[torch.Tensor]:
    """Activations of ``hm`` at ``hook`` at the given positions of each id list: ``[k_i, d]`` per text (CPU)."""
    return read_positions(hm, [hook], id_lists, positions, batch_size)[hook]


def pair_chat(src_hm, tgt_hm, prompts: Sequence[str], responses: Sequence[str] | None = None) -> PairedTexts:
    """Pair the positions of ``prompts`` formatted with each model's chat template (``hm.format_chat``),
    each followed by its response when ``responses`` is given (module docstring). ``pairing`` is
    ``"all"`` for identical token ids, else ``"aligned"``; the last prompt token (or, with responses,
    the last response token) is each text's largest paired position."""
    from rosettalens.align import align_positions  # noqa: PLC0415 - optional heavy import

    src_side = _chat_ends(src_hm, prompts, responses)
    tgt_side = _chat_ends(tgt_hm, prompts, responses)
    same = all(a[0] == b[0] for a, b in zip(src_side, tgt_side))
    pos_s, pos_t = [], []
    for (ia, ea), (_, eb) in zip(src_side, tgt_side):
        if same:
            pa = pb = np.arange(len(ia), dtype=np.int64)
        else:
            pa, pb = align_positions(ea, eb)
        pos_s.append(np.asarray(pa, dtype=np.int64))
        pos_t.append(np.asarray(pb, dtype=np.int64))
    return PairedTexts(
        "all" if same else "aligned", [a for a, _ in src_side], [b for b, _ in tgt_side], pos_s, pos_t
    )


def _chat_ends(
    hm, prompts: Sequence[str], responses: Sequence[str] | None
) -> list[tuple[list[int], list[int]]]:
    """Per prompt: token ids of the chat-formatted text and each token's char end relative to the start
    of the user text (-1 outside it; the last prompt token gets a sentinel so it always pairs).

    ``responses``: each formatted prompt is followed by its response (teacher-forced); a response
    token's end is counted from the response's start, past the user text's, and the response's last
    token gets a second sentinel."""
    from rosettalens.align import char_ends  # noqa: PLC0415 - optional heavy import

    out = []
    resp = list(responses) if responses is not None else [""] * len(prompts)
    for text, formatted, r in zip(prompts, hm.format_chat(list(prompts)), resp):
        ids, ends = char_ends(hm.tokenizer, formatted + r, add_special_tokens=False)
        start, n = formatted.rfind(text), len(formatted)
        rel = [e - start if start >= 0 and start < e <= start + len(text) else -1 for e in ends]
        if not r:
            rel[-1] = LAST_PROMPT  # the assistant-start position
        else:
            rel = [len(text) + 1 + e - n if n < e <= n + len(r) else x for x, e in zip(rel, ends)]
            before = [k for k, e in enumerate(ends) if 0 <= e <= n]
            if before:
                rel[before[-1]] = LAST_PROMPT
            rel[-1] = LAST_RESPONSE
        out.append((list(ids), rel))
    return out


def depth_map(layer: int, n_src: int, n_tgt: int) -> int:
    """The layer of an ``n_tgt``-layer model at the relative depth of ``layer`` in an ``n_src``-layer one."""
    return min(n_tgt - 1, round(layer * (n_tgt - 1) / max(n_src - 1, 1)))


def paired_activations(
    src_hm,
    tgt_hm,
    texts: Sequence[str],
    src_hook: str | Sequence[str],
    tgt_hook: str | Sequence[str],
    *,
    pairing: str = "auto",
    chat: bool = False,
    responses: Sequence[str] | None = None,
    max_tokens: int | None = None,
    max_length: int | None = 256,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "extract pairs",
) -> tuple[Any, Any, dict]:
    """Extract paired activations ``X_src [n, d_src]``, ``X_tgt [n, d_tgt]`` (float32, CPU), row ``i``
    of both at paired positions (module docstring).

    ``src_hook`` / ``tgt_hook``: one hook each (tensors returned) or several, read in the same passes
    (``{hook: tensor}`` returned, every hook with the same rows).

    Plain texts (``chat=False``): paired by ``pairing``, tokenized with special tokens and cut to
    ``max_length`` tokens; texts are processed in order until ``max_tokens`` pairs are collected (then
    truncated to it). ``info = {pairing, n_pairs, n_texts, paired_fraction_tgt}``.

    Instructions (``chat=True``): each text is an instruction formatted with the model's chat
    template (``hm.format_chat``; :func:`rosettalens.organisms.prompt_view` gives models without one
    a plain format), followed by its entry of ``responses`` when given; no truncation, every text
    read. ``info = {same_tokenizer, pairs, paired_fraction, last_rows}``: ``last_rows`` ``[n_texts]``
    are the rows of each prompt's last token (of each response's last token with ``responses``).
    """
    single = isinstance(src_hook, str)
    if single != isinstance(tgt_hook, str):
        raise ConfigError("give one hook for both models or a list of hooks for both")
    src_hooks = [src_hook] if isinstance(src_hook, str) else list(src_hook)
    tgt_hooks = [tgt_hook] if isinstance(tgt_hook, str) else list(tgt_hook)
    for hm, hooks in ((src_hm, src_hooks), (tgt_hm, tgt_hooks)):
        for h in hooks:
            hook_width(hm, h)
    if chat:
        if pairing != "auto":
            raise ConfigError("chat=True pairs by its own rule; leave pairing at 'auto'")
        if not texts:
            raise DataError("no prompts to extract activations from")
        pt = pair_chat(src_hm, tgt_hm, texts, responses)
        xs, ys = _read_pairs(src_hm, tgt_hm, pt, src_hooks, tgt_hooks, None, batch_size, progress, desc)
        n_pairs = pt.n_pairs
        n_tok = sum(map(len, pt.ids_src)) + sum(map(len, pt.ids_tgt))
        offsets = torch.tensor([0] + [len(p) for p in pt.pos_src]).cumsum(0)
        last_rows = torch.stack([offsets[i] + int(np.argmax(p)) for i, p in enumerate(pt.pos_src)])
        info: dict[str, Any] = {
            "same_tokenizer": pt.pairing == "all",
            "pairs": n_pairs,
            "paired_fraction": 2 * n_pairs / max(n_tok, 1),
            "last_rows": last_rows,
        }
        X = {h: torch.cat(v) for h, v in xs.items()}
        Y = {h: torch.cat(v) for h, v in ys.items()}
    else:
        if responses is not None:
            raise ConfigError("responses are paired with chat=True only")
        pt = pair_texts(src_hm.tokenizer, tgt_hm.tokenizer, texts, pairing, max_length)
        xs, ys = _read_pairs(src_hm, tgt_hm, pt, src_hooks, tgt_hooks, max_tokens, batch_size, progress, desc)
        used = len(xs[src_hooks[0]])
        n = sum(len(x) for x in xs[src_hooks[0]])
        if n == 0:
            raise DataError(f"no paired positions between {src_hm.name} and {tgt_hm.name} on these texts")
        X = {h: torch.cat(v)[:max_tokens] if max_tokens else torch.cat(v) for h, v in xs.items()}
        Y = {h: torch.cat(v)[:max_tokens] if max_tokens else torch.cat(v) for h, v in ys.items()}
        info = {
            "pairing": pt.pairing,
            "n_pairs": int(X[src_hooks[0]].shape[0]),
            "n_texts": used,
            "paired_fraction_tgt": n / max(sum(len(x) for x in pt.ids_tgt[:used]), 1),
        }
    if single:
        return X[src_hooks[0]], Y[tgt_hooks[0]], info
    return X, Y, info


def _read_pairs(
    src_hm, tgt_hm, pt: PairedTexts, src_hooks: list[str], tgt_hooks: list[str], stop_at: int | None,
    batch_size: int, progress: bool, desc: str,
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:  # fmt: skip
    """Both models' activations at ``pt``'s paired positions, batch by batch (per text ``[k_i, d]``),
    until ``stop_at`` pairs are read (``None``: every text)."""
    xs: dict[str, list[torch.Tensor]] = {h: [] for h in src_hooks}
    ys: dict[str, list[torch.Tensor]] = {h: [] for h in tgt_hooks}
    step, n = max(1, batch_size), 0
    bar = tqdm(
        total=stop_at or pt.n_pairs, desc=desc, unit="tok", file=sys.stderr, disable=not progress, leave=False
    )
    try:
        for s in range(0, len(pt.ids_src), step):
            sl = slice(s, s + step)
            a = read_positions(src_hm, src_hooks, pt.ids_src[sl], pt.pos_src[sl], batch_size)
            b = read_positions(tgt_hm, tgt_hooks, pt.ids_tgt[sl], pt.pos_tgt[sl], batch_size)
            for h in src_hooks:
                xs[h].extend(a[h])
            for h in tgt_hooks:
                ys[h].extend(b[h])
            k = sum(len(p) for p in pt.pos_src[sl])
            n += k
            bar.update(k)
            if stop_at and n >= stop_at:
                break
    finally:
        bar.close()
    return xs, ys
