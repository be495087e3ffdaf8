"""Evaluating a mapper on held-out data: activation metrics and fidelity inside the target model.

Activation metrics (``activation_metrics``), on paired held-out activations ``Y`` (target) and
``Ŷ = mapper(X)``, sums over rows ``i`` and dimensions ``j``:

* ``fvu = Σ (Y_ij - Ŷ_ij)^2 / Σ (Y_ij - mean_i Y_ij)^2`` (fraction of variance unexplained);
* ``r2 = 1 - fvu`` (variance-weighted R^2); ``r2_per_dim`` = mean over dimensions of each
  dimension's own R^2 (sklearn's ``uniform_average``; constant dimensions skipped);
* ``mean_cosine`` = mean over rows of ``cos(Ŷ_i, Y_i)``; ``mean_cosine_shuffled`` the same
  against a random permutation of the rows (the chance baseline).

Fidelity (``fidelity``): the mapped source activations are spliced into the target at its hook
(``tgt_hm.patch``) at the paired positions, and the target's next-token predictions compared
with its own run:

* ``kl`` = mean over evaluated positions of ``KL(p_target || p_patched)`` (nats);
* ``loss_recovered_zero`` / ``loss_recovered_mean`` = ``(L_ablate - L_patched) / (L_ablate - L_clean)``
  where ``L`` is the mean next-token cross-entropy and the ablation replaces the same positions
  with zeros or with the target's mean activation at the hook (over the evaluation texts);
* greedy completions: ``max_new_tokens`` greedy tokens of the target with mapped activations vs
  the target's own; ``token_match_rate`` = fraction of generated positions with the same token.

Evaluated positions: same tokenizer (``pairing="all"``): every position from the first patched one
on (special tokens such as BOS are not patched); ``"aligned"``: the same, patching only the aligned
positions (the rest keep the target's own activations); ``"last"``: each text is cut at its last
aligned boundary that has a following target token, the last position is patched and the following
token is the label. During greedy generation with different tokenizers the source reads only the
prompt, and the mapped activation replaces the prompt's last position.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rosettalens.errors import DataError, ShapeError
from rosettalens.mapping.base import (  # the activation metrics live beside Mapper.score
    Mapper,
    activation_metrics,
    fvu,
    mean_cosine,
    r2_per_dim,
)
from rosettalens.mapping.pairs import (
    PairedTexts,
    pad_id,
    pad_left,
    pair_texts,
    paired_activations,
    run_positions,
)

__all__ = [
    "activation_metrics",
    "check_widths",
    "evaluate",
    "fidelity",
    "fvu",
    "greedy_match",
    "mean_cosine",
    "r2_per_dim",
]


# ------------------------------------------------------------------------------------ fidelity
def _cut_last(pt: PairedTexts) -> tuple[PairedTexts, list[int]]:
    """For ``last``: cut each text at its last aligned pair that has a following target token."""
    ids_s, ids_t, pos_s, pos_t, keep = [], [], [], [], []
    for i, (a, b, ps, pq) in enumerate(zip(pt.ids_src, pt.ids_tgt, pt.pos_src, pt.pos_tgt)):
        ok = np.nonzero(pq < len(b) - 1)[0]
        if len(ok) == 0:
            continue
        k = ok[-1]
        ids_s.append(a[: ps[k] + 1])
        ids_t.append(b[: pq[k] + 2])  # keep the label token; it is never patched
        pos_s.append(np.asarray([ps[k]]))
        pos_t.append(np.asarray([pq[k]]))
        keep.append(i)
    return PairedTexts("last", ids_s, ids_t, pos_s, pos_t), keep


def _replace_fn(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor | None):
    """Patch fn replacing ``act[rows, cols]`` by ``values [k, d]`` (``None`` = zeros)."""

    def fn(act: torch.Tensor, hook_name: str) -> torch.Tensor:
        new = act.clone()
        if values is None:
            new[rows.to(act.device), cols.to(act.device)] = 0
        else:
            new[rows.to(act.device), cols.to(act.device)] = values.to(act.device, act.dtype)
        return new

    return fn


def _logprobs(hm, ids: torch.Tensor, mask: torch.Tensor, hook: str, at, fn=None) -> torch.Tensor:
    """Next-token log-probabilities ``[k, vocab]`` (float32, CPU) at positions ``at = (rows, cols)``,
    with ``fn`` patched at ``hook``."""
    if fn is None:
        logits = hm.forward(ids, attention_mask=mask)
    else:
        with hm.patch({hook: fn}):
            logits = hm.forward(ids, attention_mask=mask)
    rows, cols = at
    return logits[rows.to(logits.device), cols.to(logits.device)].float().log_softmax(-1).cpu()


def _ce(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, labels[:, None]).squeeze(-1)


@torch.no_grad()
def fidelity(
    mapper: Mapper,
    src_hm,
    tgt_hm,
    texts: Sequence[str],
    src_hook: str | None = None,
    tgt_hook: str | None = None,
    *,
    pairing: str = "auto",
    max_length: int | None = 128,
    batch_size: int = 4,
    n_generate: int = 4,
    max_new_tokens: int = 16,
    prompt_tokens: int = 24,
    progress: bool = True,
) -> dict:
    """Splice mapped activations into the target; KL, loss recovered, greedy token match (module docstring).

    ``src_hook`` / ``tgt_hook`` default to the mapper's recorded hooks.
    """
    src_hook = src_hm.resolve_hook(src_hook or mapper.meta.get("source_hook") or "")
    tgt_hook = tgt_hm.resolve_hook(tgt_hook or mapper.meta.get("target_hook") or "")
    check_widths(mapper, src_hm, tgt_hm, src_hook, tgt_hook)
    want_last = pairing == "last"
    pt = pair_texts(
        src_hm.tokenizer, tgt_hm.tokenizer, texts, "aligned" if want_last else pairing, max_length
    )
    if want_last:
        pt, _ = _cut_last(pt)
    keep = [i for i, p in enumerate(pt.pos_tgt) if len(p) > 0]
    if not keep:
        raise DataError(
            "no paired positions to evaluate fidelity on (texts too short or tokenizers never align)"
        )
    sel = PairedTexts(
        pt.pairing, *([getattr(pt, f)[i] for i in keep] for f in ("ids_src", "ids_tgt", "pos_src", "pos_tgt"))
    )

    # the target's mean activation at the hook over the patched positions (mean-ablation value)
    own = run_positions(tgt_hm, tgt_hook, sel.ids_tgt, sel.pos_tgt, batch_size)
    mean_act = torch.cat(own).to(torch.float64).mean(0).float()
    del own

    sums = dict.fromkeys(
        ("kl", "kl_zero", "kl_mean", "ce_clean", "ce_patched", "ce_zero", "ce_mean", "top1"), 0.0
    )
    n_kl = n_ce = 0
    pid = pad_id(tgt_hm)
    bar = tqdm(total=len(sel.ids_tgt), desc="fidelity", unit="text", file=sys.stderr, disable=not progress)
    try:
        for s in range(0, len(sel.ids_tgt), batch_size):
            sl = slice(s, s + batch_size)
            src_acts = run_positions(src_hm, src_hook, sel.ids_src[sl], sel.pos_src[sl], batch_size)
            mapped = torch.cat([mapper.transform(a) for a in src_acts])
            ids_t, pos_t = sel.ids_tgt[sl], sel.pos_tgt[sl]
            ids, mask = pad_left(ids_t, pid, tgt_hm.device)
            P = ids.shape[1]
            rows = torch.cat([torch.full((len(p),), j, dtype=torch.long) for j, p in enumerate(pos_t)])
            cols = torch.cat(
                [torch.as_tensor(p, dtype=torch.long) + (P - len(x)) for p, x in zip(pos_t, ids_t)]
            )
            # evaluated positions: from the first patched one (last mode: the patched one) to the end
            ev_r, ev_c, labels = [], [], []  # labels: next token, or -1 at a text's last position
            for j, (p, x) in enumerate(zip(pos_t, ids_t)):
                off = P - len(x)
                last = int(p.max()) + 1 if sel.pairing == "last" else len(x)
                for t in range(int(p.min()), last):
                    ev_r.append(j)
                    ev_c.append(off + t)
                    labels.append(x[t + 1] if t + 1 < len(x) else -1)
            ev = (torch.as_tensor(ev_r, dtype=torch.long), torch.as_tensor(ev_c, dtype=torch.long))
            lab_ids = torch.as_tensor(labels, dtype=torch.long)
            has = lab_ids >= 0

            pc = _logprobs(tgt_hm, ids, mask, tgt_hook, ev)
            runs = {
                "patched": _logprobs(tgt_hm, ids, mask, tgt_hook, ev, _replace_fn(rows, cols, mapped)),
                "zero": _logprobs(tgt_hm, ids, mask, tgt_hook, ev, _replace_fn(rows, cols, None)),
                "mean": _logprobs(
                    tgt_hm, ids, mask, tgt_hook, ev, _replace_fn(rows, cols, mean_act.expand(len(rows), -1))
                ),
            }
            for key, lp in (("kl", runs["patched"]), ("kl_zero", runs["zero"]), ("kl_mean", runs["mean"])):
                sums[key] += float((pc.exp() * (pc - lp)).sum(-1).clamp_min(0).sum())
            sums["top1"] += float((pc.argmax(-1) == runs["patched"].argmax(-1)).sum())
            n_kl += len(ev_r)
            if bool(has.any()):
                sums["ce_clean"] += float(_ce(pc[has], lab_ids[has]).sum())
                for key in ("patched", "zero", "mean"):
                    sums[f"ce_{key}"] += float(_ce(runs[key][has], lab_ids[has]).sum())
                n_ce += int(has.sum())
            bar.update(len(ids_t))
    finally:
        bar.close()

    res: dict = {
        "pairing": sel.pairing,
        "source_hook": src_hook,
        "target_hook": tgt_hook,
        "n_texts": len(sel.ids_tgt),
        "n_positions": n_kl,
        "n_patched": int(sum(len(p) for p in sel.pos_tgt)),
        "kl": sums["kl"] / n_kl,
        "kl_zero_ablation": sums["kl_zero"] / n_kl,
        "kl_mean_ablation": sums["kl_mean"] / n_kl,
        "top1_agreement": sums["top1"] / n_kl,
    }
    if n_ce:
        l_clean, l_patched, l_zero, l_mean = (
            sums[k] / n_ce for k in ("ce_clean", "ce_patched", "ce_zero", "ce_mean")
        )
        res.update(
            loss_clean=l_clean,
            loss_patched=l_patched,
            loss_zero_ablation=l_zero,
            loss_mean_ablation=l_mean,
            loss_recovered_zero=(l_zero - l_patched) / (l_zero - l_clean)
            if l_zero != l_clean
            else float("nan"),
            loss_recovered_mean=(l_mean - l_patched) / (l_mean - l_clean)
            if l_mean != l_clean
            else float("nan"),
        )
    if n_generate > 0 and max_new_tokens > 0:
        res["generation"] = greedy_match(
            mapper,
            src_hm,
            tgt_hm,
            [texts[i] for i in range(len(texts)) if texts[i]][: max(n_generate * 4, n_generate)],
            src_hook,
            tgt_hook,
            pairing=pairing,
            n_prompts=n_generate,
            max_new_tokens=max_new_tokens,
            prompt_tokens=prompt_tokens,
        )
    return res


def _greedy(tgt_hm, prompt: list[int], max_new_tokens: int, tgt_hook: str, make_fn=None) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new_tokens):
        ids = torch.as_tensor([seq], dtype=torch.long, device=tgt_hm.device)
        if make_fn is None:
            logits = tgt_hm.forward(ids)
        else:
            with tgt_hm.patch({tgt_hook: make_fn(seq)}):
                logits = tgt_hm.forward(ids)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@torch.no_grad()
def greedy_match(
    mapper: Mapper,
    src_hm,
    tgt_hm,
    texts: Sequence[str],
    src_hook: str,
    tgt_hook: str,
    *,
    pairing: str = "auto",
    n_prompts: int = 4,
    max_new_tokens: int = 16,
    prompt_tokens: int = 24,
    n_examples: int = 3,
) -> dict:
    """Greedy completions of the target with mapped activations vs its own; token match rate.

    Same tokenizer: at every step the source reads the whole sequence so far and every
    (non-special) position is replaced by its mapped activation. Different tokenizers: the prompt is
    cut at an aligned boundary, and only the prompt's last position is replaced.
    """
    pt = pair_texts(
        src_hm.tokenizer, tgt_hm.tokenizer, texts, "aligned" if pairing == "last" else pairing, prompt_tokens
    )
    matches: list[float] = []
    examples: list[dict[str, Any]] = []
    tok = tgt_hm.tokenizer
    for a, b, ps, pq in zip(pt.ids_src, pt.ids_tgt, pt.pos_src, pt.pos_tgt):
        if len(matches) >= n_prompts:
            break
        if pt.pairing == "all":
            prompt = b
            special = set(getattr(tok, "all_special_ids", []) or [])

            def make_fn(seq, special=special, vec=None, P=None):
                pos = np.asarray([i for i, t in enumerate(seq) if t not in special], dtype=np.int64)
                act = run_positions(src_hm, src_hook, [seq], [pos])[0]
                return _replace_fn(
                    torch.zeros(len(pos), dtype=torch.long), torch.as_tensor(pos), mapper.transform(act)
                )

        else:
            if len(pq) == 0:
                continue
            prompt, src_prompt = b[: pq[-1] + 1], a[: ps[-1] + 1]
            act = run_positions(src_hm, src_hook, [src_prompt], [np.asarray([len(src_prompt) - 1])])[0]
            vec = mapper.transform(act)
            P = len(prompt)

            def make_fn(seq, special=None, vec=vec, P=P):  # same signature as the branch above
                return _replace_fn(torch.zeros(1, dtype=torch.long), torch.as_tensor([P - 1]), vec)

        own = _greedy(tgt_hm, prompt, max_new_tokens, tgt_hook)
        new = _greedy(tgt_hm, prompt, max_new_tokens, tgt_hook, make_fn)
        matches.append(float(np.mean([x == y for x, y in zip(own, new)])))
        if len(examples) < n_examples:
            examples.append(
                {
                    "prompt": tok.decode(prompt, skip_special_tokens=True),
                    "target": tok.decode(own, skip_special_tokens=True),
                    "mapped": tok.decode(new, skip_special_tokens=True),
                }
            )
    return {
        "n_prompts": len(matches),
        "max_new_tokens": max_new_tokens,
        "token_match_rate": float(np.mean(matches)) if matches else float("nan"),
        "examples": examples,
    }


def check_widths(mapper: Mapper, src_hm, tgt_hm, src_hook: str, tgt_hook: str) -> None:
    """:class:`ShapeError` unless ``mapper`` maps ``src_hm``'s width at ``src_hook`` to ``tgt_hm``'s at
    ``tgt_hook`` (read from the models' configs, nothing run)."""
    from rosettalens.mapping.pairs import hook_width  # noqa: PLC0415

    ws, wt = hook_width(src_hm, src_hook), hook_width(tgt_hm, tgt_hook)
    if ws != mapper.d_src or wt != mapper.d_tgt:
        raise ShapeError(
            f"mapper is {mapper.d_src} -> {mapper.d_tgt} but {src_hm.name}:{src_hook} has width {ws} "
            f"and {tgt_hm.name}:{tgt_hook} has width {wt}"
        )


def evaluate(
    mapper: Mapper,
    src_hm,
    tgt_hm,
    texts: Sequence[str],
    src_hook: str | None = None,
    tgt_hook: str | None = None,
    *,
    pairing: str = "auto",
    max_tokens: int | None = 20000,
    max_length: int | None = 128,
    batch_size: int = 4,
    fidelity_texts: int = 32,
    n_generate: int = 4,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> dict:
    """Held-out activation metrics plus fidelity inside the target, as one JSON-ready dict.

    ``texts`` should be held out from the mapper's training data. Fidelity uses the first
    ``fidelity_texts`` texts.
    """
    src_hook = src_hm.resolve_hook(src_hook or mapper.meta.get("source_hook") or "")
    tgt_hook = tgt_hm.resolve_hook(tgt_hook or mapper.meta.get("target_hook") or "")
    check_widths(mapper, src_hm, tgt_hm, src_hook, tgt_hook)
    X, Y, info = paired_activations(
        src_hm,
        tgt_hm,
        texts,
        src_hook,
        tgt_hook,
        pairing=pairing,
        max_tokens=max_tokens,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
    )
    out = {
        "mapper": {"kind": mapper.kind, "d_src": mapper.d_src, "d_tgt": mapper.d_tgt, **mapper.meta},
        "source_hook": src_hook,
        "target_hook": tgt_hook,
        "pairs": info,
        "activations": activation_metrics(mapper, X, Y),
    }
    out["fidelity"] = fidelity(
        mapper,
        src_hm,
        tgt_hm,
        list(texts)[:fidelity_texts],
        src_hook,
        tgt_hook,
        pairing=pairing,
        max_length=max_length,
        batch_size=batch_size,
        n_generate=n_generate,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    return out
