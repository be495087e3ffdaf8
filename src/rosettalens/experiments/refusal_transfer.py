"""Refusal transfer (Oozeer et al. 2025): a source model's refusal direction, carried through a learned
activation mapping, removes (ablation) and induces (addition) refusal in a target model.

Stages (each with a progress bar on stderr), all written to one run directory:

1. prompts: built-in harmful/harmless sets (train / val / test splits) or user files;
2. source refusal direction: Arditi et al. 2024 selection over source layers (diff-of-means at the last
   prompt token, scored by the refusal log-odds drop under ablation with a KL bound on harmless prompts),
   or with ``layer_selection="sweep"`` the layer pair chosen after stage 3 by the sweep of stage 7 run
   over every candidate layer: the pair whose *transferred* direction, ablated in the target, lowers
   the target's refusal score most on the validation prompts (optionally under ``max_kl``);
3. paired activations of both models on the chat-formatted train prompts at ``resid_pre`` of the
   source layer and the target layer at the same relative depth. Same tokenizer: every position;
   different tokenizers: positions of the user text whose tokens end at the same character (plus the
   last prompt token of each prompt);
4. mapper fit on those pairs (affine by default; orthogonal, lowrank, autoencoder), held-out FVU;
5. transfer of the source direction through the mapper (linear: ``W v``; autoencoder: mean Jacobian-
   vector product; norm calibrated) and the target's own (native) diff-of-means direction at that layer;
6. evaluation on the target with greedy generation and the substring refusal judge: harmful test
   prompts unsteered / native ablated / transferred ablated / random (equal norm) ablated; harmless
   prompts unsteered / transferred ablated (refusal and next-token KL damage); harmless prompts with the
   transferred vector *added* (induced refusal);
7. a per-layer sweep (source layers at several depths, affine maps): FVU, cosine(transferred, native)
   and the refusal-score drop of each direction under ablation, without generation;
8. ``results.json``, ``config.json``, ``sweep.png``, ``examples.json``, ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ChatTemplateError, ConfigError, DataError

DEFAULT_SOURCE = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"


@dataclass
class RefusalTransferConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    source: str = DEFAULT_SOURCE
    target: str = DEFAULT_TARGET
    mapper: str = "affine"
    source_layer: int | None = None  # default: Arditi selection over source layers
    target_layer: int | None = None  # default: same relative depth as the source layer
    candidate_stride: int = 2  # Arditi candidates: every `stride`-th layer below 0.8 depth
    sweep_points: int = 3  # source layers in the per-layer sweep (0 disables it)
    # how the layer pair is chosen when --source-layer is not given: "arditi" (the source's refusal
    # direction by Arditi et al.'s filter, target at the same relative depth) or "sweep" (every
    # candidate source layer with its depth-matched target layer; the pair whose transferred
    # direction, ablated, lowers the target's refusal score most on the validation prompts)
    layer_selection: str = "arditi"
    max_kl: float | None = None  # "sweep" only: skip pairs whose ablation moves harmless KL above this
    n_train: int = 64  # prompts per set for directions and the mapper
    n_val: int = 16  # prompts per set for selection and the sweep
    n_eval: int = 32  # held-out prompts per set for the generation evaluation
    max_new_tokens: int = 16  # refusals show in the first tokens ("I'm sorry, but I can't ...")
    batch_size: int = 32
    harmful: str | None = None  # user files (one prompt per line, or JSONL) replacing the built-ins
    harmless: str | None = None
    harmful_eval: str | None = None  # evaluation-only files
    harmless_eval: str | None = None
    induce_scale: float = 1.0
    # second refusal judge: "target", "source", "none" or a model with a chat template (a bundled
    # instruct model is reused when it is the source or target); it judges the harmful conditions and
    # the harmless baseline / induced ones
    judge: str = "target"
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    out: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from ..mapping import mapper_kinds

        if self.mapper not in mapper_kinds():
            raise ConfigError(f"unknown mapper kind {self.mapper!r}; choose from {', '.join(mapper_kinds())}")
        for name in ("n_train", "n_val", "n_eval", "max_new_tokens", "batch_size", "candidate_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.sweep_points < 0:
            raise ConfigError("--sweep-points must be >= 0")
        if self.layer_selection not in ("arditi", "sweep"):
            raise ConfigError(f"--layer-selection must be 'arditi' or 'sweep', got {self.layer_selection!r}")
        if self.max_kl is not None and not self.max_kl > 0:
            raise ConfigError("--max-kl must be > 0")


# ----------------------------------------------------------------------------------------- prompts
def _prompts(cfg: RefusalTransferConfig) -> dict[str, list[str]]:
    from ..data.tasks import load_prompts

    def split(source: str | None, builtin: str, name: str, n: int) -> list[str]:
        if source is None:
            return load_prompts(builtin, name, limit=n)
        texts = load_prompts(source)
        # a user file: deterministic split by position (train, val, test)
        cut1, cut2 = int(0.6 * len(texts)), int(0.8 * len(texts))
        part = {"train": texts[:cut1], "val": texts[cut1:cut2], "test": texts[cut2:]}[name]
        return part[:n]

    p = {
        "harmful_train": split(cfg.harmful, "harmful", "train", cfg.n_train),
        "harmless_train": split(cfg.harmless, "harmless", "train", cfg.n_train),
        "harmful_val": split(cfg.harmful, "harmful", "val", cfg.n_val),
        "harmless_val": split(cfg.harmless, "harmless", "val", cfg.n_val),
    }
    p["harmful_test"] = (
        load_prompts(cfg.harmful_eval)[: cfg.n_eval]
        if cfg.harmful_eval
        else split(cfg.harmful, "harmful", "test", cfg.n_eval)
    )
    p["harmless_test"] = (
        load_prompts(cfg.harmless_eval)[: cfg.n_eval]
        if cfg.harmless_eval
        else split(cfg.harmless, "harmless", "test", cfg.n_eval)
    )
    for k, v in p.items():
        if not v:
            raise DataError(f"no {k.replace('_', ' ')} prompts (file too short for a train/val/test split?)")
    return p


# ------------------------------------------------------------------------------ paired activations
def _content_ends(hm, prompts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Per prompt: token ids of the chat-formatted text and each token's char end relative to the start
    of the user text (-1 outside it; the last prompt token gets a sentinel so it always pairs)."""
    from ..align import char_ends

    out = []
    for text, formatted in zip(prompts, hm.format_chat(prompts)):
        ids, ends = char_ends(hm.tokenizer, formatted, add_special_tokens=False)
        start = formatted.rfind(text)
        rel = [e - start if start >= 0 and start < e <= start + len(text) else -1 for e in ends]
        rel[-1] = 10**9  # the assistant-start position: the one refusal is read from
        out.append((ids, rel))
    return out


@torch.no_grad()
def paired_activations(
    src_hm, tgt_hm, prompts: Sequence[str], src_hooks: Sequence[str], tgt_hooks: Sequence[str],
    batch_size: int = 16, desc: str = "paired activations", progress: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:  # fmt: skip
    """Row-aligned activations ``{hook: [rows, d]}`` of both models on chat-formatted ``prompts``.

    Same tokenizer (identical ids): every non-pad position. Otherwise positions of the user text whose
    tokens end at the same character offset, plus the last prompt token.
    """
    from ..align import align_positions

    src_side = _content_ends(src_hm, prompts)
    tgt_side = _content_ends(tgt_hm, prompts)
    same = all(a[0] == b[0] for a, b in zip(src_side, tgt_side))
    pairs = []
    n_src = n_tgt = 0
    for (ia, ea), (ib, eb) in zip(src_side, tgt_side):
        if same:
            idx = torch.arange(len(ia))
            pairs.append((idx, idx))
        else:
            pa, pb = align_positions(ea, eb)
            pairs.append((torch.as_tensor(pa), torch.as_tensor(pb)))
        n_src, n_tgt = n_src + len(ia), n_tgt + len(ib)
    n_pairs = sum(len(p[0]) for p in pairs)
    # row of each prompt's last token (always paired: it is where refusal is read from)
    offsets = torch.tensor([0] + [len(p[0]) for p in pairs]).cumsum(0)
    last_rows = torch.stack([offsets[i] + int(torch.argmax(p[0])) for i, p in enumerate(pairs)])
    info = {"same_tokenizer": same, "pairs": n_pairs, "paired_fraction": 2 * n_pairs / max(n_src + n_tgt, 1),
            "last_rows": last_rows}  # fmt: skip
    X: dict[str, list[Tensor]] = {h: [] for h in src_hooks}
    Y: dict[str, list[Tensor]] = {h: [] for h in tgt_hooks}
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False, disable=not progress)
    for i in range(0, len(prompts), batch_size):
        for hm, side, hooks, store, which in (
            (src_hm, src_side, src_hooks, X, 0),
            (tgt_hm, tgt_side, tgt_hooks, Y, 1),
        ):
            ids_list = [side[j][0] for j in range(i, min(i + batch_size, len(prompts)))]
            width = max(len(x) for x in ids_list)
            pad = hm.tokenizer.pad_token_id
            ids = torch.full((len(ids_list), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, x in enumerate(ids_list):
                ids[r, width - len(x) :] = torch.as_tensor(x)
                mask[r, width - len(x) :] = 1
            _, cache = hm.run_with_cache(ids, hooks=list(hooks), attention_mask=mask, stop_early=True)
            for r, x in enumerate(ids_list):
                sel = pairs[i + r][which] + (width - len(x))
                for h in hooks:
                    store[h].append(cache[hm.resolve_hook(h)][r, sel].float().cpu())
        bar.update(min(batch_size, len(prompts) - i))
    bar.close()
    return {h: torch.cat(v) for h, v in X.items()}, {h: torch.cat(v) for h, v in Y.items()}, info


# ------------------------------------------------------------------------------------- evaluation
def _refusal_rate(texts: Sequence[str]) -> float:
    from ..steering import is_refusal

    return sum(map(is_refusal, texts)) / max(len(texts), 1)


def _score_under(hm, prompts, direction: Tensor | None, batch_size: int) -> float:
    """Mean refusal log-odds at the first generated position, optionally with ``direction`` ablated."""
    import contextlib

    from ..steering import refusal_scores

    ctx = hm.ablate(direction) if direction is not None else contextlib.nullcontext()
    with ctx:
        return float(refusal_scores(hm, prompts, batch_size=batch_size).mean())


def _depth_map(layer: int, n_src: int, n_tgt: int) -> int:
    return min(n_tgt - 1, round(layer * (n_tgt - 1) / max(n_src - 1, 1)))


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


JUDGED_HARMLESS = ("harmless_baseline", "harmless_induced")


def _model_judge(cfg, src, tgt, comps, harmful, harmless, progress: bool = True) -> dict[str, Any]:
    """Judge every completion with an instruct model (``steering.judge_with_model``) and report its
    refusal rate per condition and its agreement with the substring judge (raw and Cohen's kappa)."""
    import rosettalens

    from ..steering import agreement, is_refusal, judge_with_model

    if cfg.judge in ("target", tgt.name):
        jhm = tgt
    elif cfg.judge in ("source", src.name):
        jhm = src
    else:
        jhm = rosettalens.load(cfg.judge, device=cfg.device, dtype=cfg.dtype)
    if not jhm.has_chat_template():
        raise ChatTemplateError(
            f"judge model {jhm.name} has no chat template; pass --judge none or an instruct model"
        )
    verdicts: dict[str, list[bool]] = {}
    judged = {c: t for c, t in comps.items() if c.startswith("harmful") or c in JUDGED_HARMLESS}
    for cond, texts in tqdm(judged.items(), desc="model judge", leave=False, disable=not progress):
        prompts = harmful if cond.startswith("harmful") else harmless
        verdicts[cond] = judge_with_model(jhm, prompts, texts, batch_size=cfg.batch_size)
    sub = [is_refusal(t) for texts in judged.values() for t in texts]
    mod = [v for vs in verdicts.values() for v in vs]
    return {
        "model": jhm.name,
        "method": "logits: refusal when P(no) > P(yes) after rosettalens.steering.judge.JUDGE_TEMPLATE",
        "refusal_rate": {c: sum(v) / max(len(v), 1) for c, v in verdicts.items()},
        "agreement_with_substring": agreement(sub, mod),
    }


def run(cfg: RefusalTransferConfig, progress: bool = True) -> dict[str, Any]:
    """Run the experiment; returns the results dict (also written to ``<run_dir>/results.json``)."""
    import rosettalens

    from ..mapping import get_mapper_class
    from ..mapping.evaluate import activation_metrics
    from ..steering import (
        SteeringVector,
        diff_of_means,
        generate_completions,
        last_token_logprobs,
        random_like,
        select_refusal_direction,
        transfer,
    )
    from ..steering.refusal import _kl
    from ..steering.vectors import collect_activations

    cfg.validate()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 2)

    torch.manual_seed(cfg.seed)
    prompts = _prompts(cfg)
    run_dir = Path(cfg.out or f"runs/refusal-transfer-{time.strftime('%Y%m%d-%H%M%S')}")
    src = rosettalens.load(cfg.source, device=cfg.device, dtype=cfg.dtype)
    tgt = rosettalens.load(cfg.target, device=cfg.device, dtype=cfg.dtype)
    for hm in (src, tgt):
        if not hm.has_chat_template():
            raise ChatTemplateError(
                f"{hm.name} has no chat template; refusal transfer needs instruct (chat) models"
            )
    bs = cfg.batch_size
    lap("load")

    # 2. the source's refusal direction
    n_s, n_t = src.cfg.n_layers, tgt.cfg.n_layers
    k = len(prompts["harmful_train"])

    def source_vec_at(layer: int, how: str) -> SteeringVector:
        acts = collect_activations(src, prompts["harmful_train"] + prompts["harmless_train"], [f"resid_pre.{layer}"],
                                   positions=[-1], batch_size=bs)  # fmt: skip
        a = acts[f"resid_pre.{layer}"][:, 0]
        return SteeringVector(vector=diff_of_means(a[:k], a[k:]), model=src.name, hook=f"resid_pre.{layer}",
                              kind="refusal", source={"method": "diff_of_means", "selection": how})  # fmt: skip

    by_sweep = cfg.source_layer is None and cfg.layer_selection == "sweep"
    ls: int | None = None
    selection: dict[str, Any] | None = None
    if cfg.source_layer is not None:
        ls = int(src.resolve_hook(f"resid_pre.{cfg.source_layer}").split(".")[1])
        src_vec = source_vec_at(ls, "user layer")
    elif not by_sweep:
        cands = list(range(0, max(1, int(0.8 * n_s)), cfg.candidate_stride))
        sel = select_refusal_direction(
            src, prompts["harmful_train"], prompts["harmless_train"], prompts["harmful_val"], prompts["harmless_val"],
            layers=cands, batch_size=bs, progress=progress,
        )  # fmt: skip
        src_vec, ls, selection = sel.vector, sel.layer, sel.to_dict()

    def target_for(layer: int) -> int:
        if cfg.target_layer is not None:
            return int(tgt.resolve_hook(f"resid_pre.{cfg.target_layer}").split(".")[1])
        return _depth_map(layer, n_s, n_t)

    lt = target_for(ls) if ls is not None else None
    lap("source_direction")

    # 3. paired activations (chosen pair + sweep pairs in the same passes)
    # sweep: source layers from 20% to 80% depth (layer 0 excluded: at the last template token every
    # prompt has the same embedding, so the diff-of-means there is zero); selecting by sweep tries
    # every candidate_stride-th layer from 1 to 80% depth
    if by_sweep:
        sweep_src = list(range(1, max(2, int(0.8 * n_s)), cfg.candidate_stride))
    elif cfg.sweep_points:
        sweep_src = sorted(
            {max(1, round(f * (0.8 * n_s - 1))) for f in torch.linspace(0.2, 1.0, cfg.sweep_points).tolist()}
        )
    else:
        sweep_src = []
    src_layers = sorted(set(sweep_src) | ({ls} if ls is not None else set()))
    tgt_layers = sorted({target_for(x) for x in sweep_src} | ({lt} if lt is not None else set()))
    train_prompts = prompts["harmful_train"] + prompts["harmless_train"]
    val_prompts = prompts["harmful_val"] + prompts["harmless_val"]
    Xtr, Ytr, pair_info = paired_activations(src, tgt, train_prompts, [f"resid_pre.{x}" for x in src_layers],
                                             [f"resid_pre.{x}" for x in tgt_layers], bs, "paired train", progress)  # fmt: skip
    Xva, Yva, _ = paired_activations(src, tgt, val_prompts, [f"resid_pre.{x}" for x in src_layers],
                                     [f"resid_pre.{x}" for x in tgt_layers], bs, "paired val", progress)  # fmt: skip
    last = pair_info.pop("last_rows")  # [n_train_prompts] rows of the last prompt tokens
    lap("paired_activations")

    def run_sweep() -> list[dict[str, Any]]:
        """Per source layer: affine map, FVU, cos(transferred, native), and validation refusal scores
        and harmless KL under ablation (logit-based: no generation)."""
        from ..mapping import AffineMapper

        out: list[dict[str, Any]] = []
        base_score = _score_under(tgt, prompts["harmful_val"], None, bs)
        base_hl = last_token_logprobs(tgt, prompts["harmless_val"], batch_size=bs)
        kh = len(prompts["harmful_val"])
        for x in tqdm(sweep_src, desc="layer sweep", disable=not progress, leave=False):
            y = target_for(x)
            hx, hy = f"resid_pre.{x}", f"resid_pre.{y}"
            m = AffineMapper().fit(Xtr[hx], Ytr[hy])
            met = activation_metrics(m, Xva[hx], Yva[hy])
            # directions from the last prompt tokens of the paired train activations
            sa, ta = Xtr[hx][last], Ytr[hy][last]
            v_src, v_nat = diff_of_means(sa[:k], sa[k:]), diff_of_means(ta[:k], ta[k:])
            v_tr = m.weight.to(torch.float64) @ v_src.double()
            if v_nat.norm() == 0 or v_tr.norm() == 0:
                continue
            with tgt.ablate(v_tr.float()):
                kl = float(
                    _kl(base_hl, last_token_logprobs(tgt, prompts["harmless_val"], batch_size=bs)).mean()
                )
            out.append({
                "source_layer": x, "target_layer": y, "fvu": met["fvu"], "r2": met.get("r2"),
                "cos_transferred_native": _cos(v_tr, v_nat),
                "score_baseline": base_score,
                "score_native_ablated": _score_under(tgt, prompts["harmful_val"], v_nat.float(), bs),
                "score_transferred_ablated": _score_under(tgt, prompts["harmful_val"], v_tr.float(), bs),
                "kl_harmless_transferred_ablated": kl,
                "n_val_harmful": kh,
            })  # fmt: skip
        return out

    sweep: list[dict[str, Any]] = []
    if by_sweep:
        sweep = run_sweep()
        ok = [e for e in sweep if cfg.max_kl is None or e["kl_harmless_transferred_ablated"] <= cfg.max_kl]
        if not sweep:
            raise ConfigError(
                "layer selection by sweep: no candidate pair has a usable direction; give --source-layer"
            )
        if not ok:
            raise ConfigError(
                f"layer selection by sweep: no candidate pair keeps the harmless KL <= {cfg.max_kl}; "
                "raise --max-kl or give --source-layer"
            )
        best = max(ok, key=lambda e: e["score_baseline"] - e["score_transferred_ablated"])
        ls, lt = best["source_layer"], best["target_layer"]
        src_vec = source_vec_at(ls, "validation sweep")
        selection = {
            "method": "sweep",
            "criterion": "largest drop of the target's validation refusal score under the transferred ablation"
            + (f", harmless KL <= {cfg.max_kl}" if cfg.max_kl is not None else ""),
            "source_layer": ls,
            "target_layer": lt,
            "candidates": [e["source_layer"] for e in sweep],
            "excluded_by_kl": [e["source_layer"] for e in sweep if e not in ok],
        }
        lap("sweep")
    assert ls is not None and lt is not None

    # 4. the mapper for the chosen pair
    hs, ht = f"resid_pre.{ls}", f"resid_pre.{lt}"
    mapper = get_mapper_class(cfg.mapper)()
    mapper.fit(Xtr[hs], Ytr[ht])
    mapper_metrics = activation_metrics(mapper, Xva[hs], Yva[ht])
    lap("mapper")

    # 5. transferred and native directions at the target layer
    anchors = Xtr[hs]
    tr_vec = transfer(src_vec, mapper, anchor=anchors, target_model=tgt.name, target_hook=ht)
    tacts = Ytr[ht][last]
    native_vec = SteeringVector(vector=diff_of_means(tacts[:k], tacts[k:]), model=tgt.name, hook=ht, kind="refusal",
                                source={"method": "diff_of_means", "layer": lt})  # fmt: skip
    rnd_vec = random_like(tr_vec, seed=cfg.seed)
    cos_native = _cos(tr_vec.vector, native_vec.vector)
    lap("directions")

    # 6. generation evaluation on the target
    gen = dict(max_new_tokens=cfg.max_new_tokens, batch_size=bs, progress=progress)
    harmful, harmless = prompts["harmful_test"], prompts["harmless_test"]
    comps: dict[str, list[str]] = {}
    comps["harmful_baseline"] = generate_completions(tgt, harmful, desc="harmful: baseline", **gen)
    for name, vec in (("native", native_vec), ("transferred", tr_vec), ("random", rnd_vec)):
        with tgt.ablate(vec.vector.float()):
            comps[f"harmful_{name}"] = generate_completions(
                tgt, harmful, desc=f"harmful: {name} ablated", **gen
            )
    comps["harmless_baseline"] = generate_completions(tgt, harmless, desc="harmless: baseline", **gen)
    with tgt.ablate(tr_vec.vector.float()):
        comps["harmless_transferred"] = generate_completions(
            tgt, harmless, desc="harmless: transferred ablated", **gen
        )
    with tgt.steer(ht, tr_vec.vector.float(), scale=cfg.induce_scale, positions="all"):
        comps["harmless_induced"] = generate_completions(
            tgt, harmless, desc="harmless: transferred added", **gen
        )
    with tgt.steer(ht, rnd_vec.vector.float(), scale=cfg.induce_scale, positions="all"):
        comps["harmless_induced_random"] = generate_completions(
            tgt, harmless, desc="harmless: random added", **gen
        )
    base_lp = last_token_logprobs(tgt, harmless, batch_size=bs)
    with tgt.ablate(tr_vec.vector.float()):
        abl_lp = last_token_logprobs(tgt, harmless, batch_size=bs)
    kl_transferred = float(_kl(base_lp, abl_lp).mean())
    rates = {k2: _refusal_rate(v) for k2, v in comps.items()}
    lap("generation_eval")

    # 6b. the model judge beside the substring judge (agreement over every completion)
    judge_info = (
        _model_judge(cfg, src, tgt, comps, harmful, harmless, progress) if cfg.judge != "none" else None
    )
    lap("model_judge")

    # 7. per-layer sweep (affine maps, logit-based refusal score: no generation)
    if sweep_src and not by_sweep:
        sweep = run_sweep()
        lap("sweep")

    # 8. results and artifacts
    drop_native = rates["harmful_baseline"] - rates["harmful_native"]
    drop_tr = rates["harmful_baseline"] - rates["harmful_transferred"]
    results: dict[str, Any] = {
        "source": src.name,
        "target": tgt.name,
        "layers": {"source": hs, "target": ht},
        "refusal_rate": {
            "baseline": rates["harmful_baseline"],
            "native": rates["harmful_native"],
            "transferred": rates["harmful_transferred"],
            "random": rates["harmful_random"],
        },
        "transferred_fraction_of_native_drop": (drop_tr / drop_native) if drop_native > 0 else None,
        "harmless": {
            "refusal_rate_baseline": rates["harmless_baseline"],
            "refusal_rate_transferred": rates["harmless_transferred"],
            "kl_transferred": kl_transferred,
        },
        "induced_refusal_rate": rates["harmless_induced"],
        "induced_refusal_rate_random": rates["harmless_induced_random"],
        "mapper": {
            "kind": cfg.mapper,
            "fvu": mapper_metrics["fvu"],
            **{k2: v for k2, v in mapper_metrics.items() if k2 != "fvu"},
        },
        "vectors": {
            "source_norm": src_vec.norm,
            "transferred_norm": tr_vec.norm,
            "native_norm": native_vec.norm,
            "cos_transferred_native": cos_native,
        },
        "pairing": pair_info,
        "selection": selection,
        "sweep": sweep,
        "n": {k2: len(v) for k2, v in prompts.items()},
        "judge": "substring (rosettalens.steering.judge.REFUSAL_SUBSTRINGS)",
        "model_judge": judge_info,
        "timings_s": timings,
        "run_dir": str(run_dir),
    }
    _write_run(run_dir, cfg, results, comps, prompts, mapper, src_vec, tr_vec, native_vec)
    results["timings_s"]["total"] = round(time.perf_counter() - t0, 2)
    _atomic_json(run_dir / "results.json", results)
    return results


# --------------------------------------------------------------------------------------- artifacts
def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _write_run(run_dir: Path, cfg, results, comps, prompts, mapper, src_vec, tr_vec, native_vec) -> None:
    from ..report import refusal_report

    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(run_dir / "config.json", dataclasses.asdict(cfg))
    mapper.save(run_dir / "mapper", source_model=results["source"], source_hook=results["layers"]["source"],
                target_model=results["target"], target_hook=results["layers"]["target"])  # fmt: skip
    src_vec.save(run_dir / "source_refusal.safetensors")
    tr_vec.save(run_dir / "transferred_refusal.safetensors")
    native_vec.save(run_dir / "native_refusal.safetensors")
    n_ex = 4
    examples = {
        cond: [{"prompt": p, "completion": c} for p, c in zip(prompts["harmful_test" if cond.startswith("harmful") else "harmless_test"], texts)][:n_ex]
        for cond, texts in comps.items()
    }  # fmt: skip
    _atomic_json(run_dir / "examples.json", examples)
    _atomic_json(run_dir / "completions.json", comps)
    refusal_report(run_dir, results, examples)
