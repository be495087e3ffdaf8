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

Each step is a :class:`~rosettalens.experiments.base.Stage` of :class:`RefusalTransfer`;
``--resume RUN_DIR`` skips the stages whose outputs exist (models and paired activations are
recomputed: they are held in memory, not written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import option
from ..errors import ChatTemplateError, ConfigError, DataError
from ..mapping import depth_map, load_recorded_mapper, paired_activations, record_mapper
from ..names import hook_name, parse_hook_name
from ..steering import cosine
from .base import Experiment, RunContext, Stage

DEFAULT_SOURCE = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"


@dataclass
class RefusalTransferConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    source: str = option(DEFAULT_SOURCE, "source model (an instruct model with a chat template)")
    target: str = option(DEFAULT_TARGET, "target model (an instruct model with a chat template)")
    mapper: Literal["affine", "orthogonal", "lowrank", "autoencoder"] = option(
        "affine", "mapper kind fitted from the source's activations to the target's"
    )
    source_layer: int | None = option(None, "source resid_pre layer (negative counts from the end)",
                                      shown="auto: by --layer-selection")  # fmt: skip
    target_layer: int | None = option(
        None, "target resid_pre layer", shown="auto: the source layer's relative depth"
    )
    candidate_stride: int = option(2, "candidate source layers: every stride-th layer below 0.8 of the depth")
    sweep_points: int = option(3, "source layers in the per-layer sweep (0: none)")
    layer_selection: Literal["arditi", "sweep"] = option(
        "arditi", "how the layer pair is chosen without --source-layer: arditi (the source's refusal direction "
        "by Arditi et al.'s filter, the target at the same relative depth) or sweep (every candidate source "
        "layer with its depth-matched target layer: the pair whose transferred direction, ablated, lowers the "
        "target's validation refusal score most)"
    )  # fmt: skip
    max_kl: float | None = option(None, "--layer-selection sweep only: skip pairs whose ablation moves the harmless "
                                  "KL above this", shown="no bound")  # fmt: skip
    n_train: int = option(64, "prompts per set (harmful, harmless) for the directions and the mapper")
    n_val: int = option(16, "prompts per set for the layer selection and the sweep")
    n_eval: int = option(32, "held-out prompts per set for the generation evaluation")
    max_new_tokens: int = option(16, "tokens generated per answer (refusals show in the first tokens)")
    batch_size: int = option(32, "prompts per forward pass")
    harmful: str | None = option(None, "harmful prompts replacing the built-ins (one per line, or JSONL; split "
                                 "60/20/20 into train/val/test)", shown="built-in")  # fmt: skip
    harmless: str | None = option(
        None, "harmless prompts replacing the built-ins, as --harmful", shown="built-in"
    )
    harmful_eval: str | None = option(None, "harmful prompts for the evaluation only", shown="the test split")
    harmless_eval: str | None = option(
        None, "harmless prompts for the evaluation only", shown="the test split"
    )
    induce_scale: float = option(
        1.0, "multiple of the transferred vector added to harmless prompts (induced refusal)"
    )
    judge: str = option("target", "second refusal judge beside the substring judge: target, source, none, or a "
                        "model with a chat template; it judges the harmful conditions and the harmless "
                        "baseline and induced ones")  # fmt: skip
    seed: int = option(0, "random seed (random direction, mapper initialisation)")
    device: str | None = option(None, "cpu, cuda, cuda:N or mps", shown="auto")
    dtype: str | None = option(None, "float32, bfloat16 or float16", shown="auto")
    out: str | None = option(None, "run directory", shown="runs/NAME-TIMESTAMP")
    extras: dict[str, Any] = option(
        default_factory=dict, help="free-form notes saved with the config", hidden=True
    )

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


# ------------------------------------------------------------------------------------ the stages
class RefusalTransfer(Experiment):
    """The experiment as stages (``rosettalens.experiments.base``); read :meth:`stages` top to bottom."""

    name = "refusal-transfer"
    config_cls = RefusalTransferConfig
    title = "rosettalens: refusal transfer"
    summary_line = (
        "a source model's refusal direction, mapped into a target model, removes and induces refusal"
    )

    def plan(self, cfg: RefusalTransferConfig) -> dict[str, Any]:
        """What a run will load, and its cost: measured for the default pair (10 min, 10.7 GB on one thread
        of a 2-core CPU, docs/results/), scaled by the models' size for others."""
        from ..organisms.registry import model_billions

        size = sum(model_billions(m) or 1.0 for m in (cfg.source, cfg.target))
        default = (cfg.source, cfg.target) == (DEFAULT_SOURCE, DEFAULT_TARGET)
        judge = [] if cfg.judge in ("none", "target", "source", cfg.source, cfg.target) else [cfg.judge]
        return {
            "models": [cfg.source, cfg.target, *judge],
            "organisms_to_build": [],
            "minutes": 10.0 if default else round(300 * size / 60, 1),
            "peak_gb": 10.7 if default else round(5.3 * size, 1),
            "notes": "measured with the default models"
            if default
            else "estimated from the default run by the models' size",
        }

    def stages(self, cfg: RefusalTransferConfig) -> list[Stage]:
        by_sweep = cfg.source_layer is None and cfg.layer_selection == "sweep"
        source_direction = Stage("source_direction", ("source_direction.json", "source_refusal.safetensors"),
                                 self.source_direction, self.load_source_direction)  # fmt: skip
        head = [
            Stage("prompts", ("prompts.json",), self.prompts),
            Stage("models", (), self.models),
        ]
        middle = [
            Stage("mapper", ("mapper/mapper.safetensors", "mapper/config.json", "mapper_metrics.json"),
                  self.mapper, self.load_mapper),
            Stage("directions", ("transferred_refusal.safetensors", "native_refusal.safetensors"),
                  self.directions, self.load_directions),
            Stage("generation_eval", ("completions.json", "generation_eval.json"), self.generation_eval),
            Stage("model_judge", ("model_judge.json",), self.model_judge),
        ]  # fmt: skip
        sweep = Stage("sweep", ("sweep.json",), self.sweep)
        activations = Stage("paired_activations", (), self.paired_activations)
        if by_sweep:  # the sweep picks the layer pair, then the source direction is computed there
            return [*head, activations, sweep, source_direction, *middle, Stage("results", (), self.results)]
        tail = [sweep] if cfg.sweep_points else []
        return [*head, source_direction, activations, *middle, *tail, Stage("results", (), self.results)]

    # 1. prompts
    def prompts(self, ctx: RunContext) -> None:
        ctx.state["prompts"] = _prompts(ctx.config)
        ctx.save_json("prompts.json", ctx.state["prompts"])

    # models (always loaded, also on resume)
    def models(self, ctx: RunContext) -> None:
        import rosettalens

        cfg = ctx.config
        torch.manual_seed(cfg.seed)
        src = rosettalens.load(cfg.source, device=cfg.device, dtype=cfg.dtype)
        tgt = rosettalens.load(cfg.target, device=cfg.device, dtype=cfg.dtype)
        for hm in (src, tgt):
            if not hm.has_chat_template():
                raise ChatTemplateError(
                    f"{hm.name} has no chat template; refusal transfer needs instruct (chat) models"
                )
        ctx.state["src"], ctx.state["tgt"] = src, tgt

    def _target_for(self, ctx: RunContext, layer: int) -> int:
        cfg, src, tgt = ctx.config, ctx.state["src"], ctx.state["tgt"]
        if cfg.target_layer is not None:
            return cast(int, parse_hook_name(tgt.resolve_hook(hook_name("resid_pre", cfg.target_layer)))[1])
        return depth_map(layer, src.cfg.n_layers, tgt.cfg.n_layers)

    def _source_vec_at(self, ctx: RunContext, layer: int, how: str):
        from ..steering import SteeringVector, diff_of_means
        from ..steering.vectors import collect_activations

        src, p = ctx.state["src"], ctx.state["prompts"]
        k = len(p["harmful_train"])
        hook = hook_name("resid_pre", layer)
        acts = collect_activations(src, p["harmful_train"] + p["harmless_train"], [hook],
                                   positions=[-1], batch_size=ctx.config.batch_size)  # fmt: skip
        a = acts[hook][:, 0]
        return SteeringVector(vector=diff_of_means(a[:k], a[k:]), model=src.name, hook=hook,
                              kind="refusal", source={"method": "diff_of_means", "selection": how})  # fmt: skip

    # 2. the source's refusal direction (user layer, Arditi selection, or the sweep's choice)
    def source_direction(self, ctx: RunContext) -> None:
        from ..steering import select_refusal_direction

        cfg, src, p = ctx.config, ctx.state["src"], ctx.state["prompts"]
        selection: dict[str, Any] | None = None
        if cfg.source_layer is not None:
            ls = cast(int, parse_hook_name(src.resolve_hook(hook_name("resid_pre", cfg.source_layer)))[1])
            vec = self._source_vec_at(ctx, ls, "user layer")
        elif cfg.layer_selection == "sweep":
            selection = ctx.state["sweep"]["selection"]
            ls = selection["source_layer"]
            vec = self._source_vec_at(ctx, ls, "validation sweep")
        else:
            cands = list(range(0, max(1, int(0.8 * src.cfg.n_layers)), cfg.candidate_stride))
            sel = select_refusal_direction(
                src, p["harmful_train"], p["harmless_train"], p["harmful_val"], p["harmless_val"],
                layers=cands, batch_size=cfg.batch_size, progress=ctx.progress,
            )  # fmt: skip
            vec, ls, selection = sel.vector, sel.layer, sel.to_dict()
        info = {"source_layer": ls, "target_layer": self._target_for(ctx, ls), "selection": selection}
        vec.save(ctx.path("source_refusal.safetensors"))
        ctx.save_json("source_direction.json", info)
        ctx.state["source_direction"], ctx.state["src_vec"] = info, vec

    def load_source_direction(self, ctx: RunContext) -> None:
        from ..steering import SteeringVector

        ctx.state["source_direction"] = ctx.load_json("source_direction.json")
        ctx.state["src_vec"] = SteeringVector.load(ctx.path("source_refusal.safetensors"))

    def _sweep_layers(self, ctx: RunContext) -> list[int]:
        cfg, n_s = ctx.config, ctx.state["src"].cfg.n_layers
        # source layers from 20% to 80% depth (layer 0 excluded: at the last template token every
        # prompt has the same embedding, so the diff-of-means there is zero); selecting by sweep tries
        # every candidate_stride-th layer from 1 to 80% depth
        if cfg.source_layer is None and cfg.layer_selection == "sweep":
            return list(range(1, max(2, int(0.8 * n_s)), cfg.candidate_stride))
        if cfg.sweep_points:
            pts = torch.linspace(0.2, 1.0, cfg.sweep_points).tolist()
            return sorted({max(1, round(f * (0.8 * n_s - 1))) for f in pts})
        return []

    # 3. paired activations of both models (chosen pair + sweep pairs in the same passes; in memory)
    def paired_activations(self, ctx: RunContext) -> None:
        cfg, src, tgt, p = ctx.config, ctx.state["src"], ctx.state["tgt"], ctx.state["prompts"]
        chosen = ctx.state.get("source_direction")
        sweep_src = self._sweep_layers(ctx)
        src_layers = sorted(set(sweep_src) | ({chosen["source_layer"]} if chosen else set()))
        tgt_layers = sorted({self._target_for(ctx, x) for x in sweep_src} | ({chosen["target_layer"]} if chosen else set()))  # fmt: skip
        sh, th = (
            [hook_name("resid_pre", x) for x in src_layers],
            [hook_name("resid_pre", x) for x in tgt_layers],
        )
        train = p["harmful_train"] + p["harmless_train"]
        val = p["harmful_val"] + p["harmless_val"]
        bs = cfg.batch_size
        kw: dict[str, Any] = dict(chat=True, batch_size=bs, progress=ctx.progress)
        Xtr, Ytr, info = paired_activations(src, tgt, train, sh, th, desc="paired train", **kw)
        Xva, Yva, _ = paired_activations(src, tgt, val, sh, th, desc="paired val", **kw)
        last = info.pop("last_rows")  # [n_train_prompts] rows of the last prompt tokens
        ctx.state.update(Xtr=Xtr, Ytr=Ytr, Xva=Xva, Yva=Yva, last=last, pairing=info)

    # 7 (or 2b with layer_selection="sweep"). per-layer sweep: affine maps, logit-based refusal scores
    def sweep(self, ctx: RunContext) -> None:
        cfg = ctx.config
        by_sweep = cfg.source_layer is None and cfg.layer_selection == "sweep"
        out: dict[str, Any] = {"sweep": self._run_sweep(ctx)}
        if by_sweep:
            sweep = out["sweep"]
            ok = [
                e for e in sweep if cfg.max_kl is None or e["kl_harmless_transferred_ablated"] <= cfg.max_kl
            ]
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
            out["selection"] = {
                "method": "sweep",
                "criterion": "largest drop of the target's validation refusal score under the transferred ablation"
                + (f", harmless KL <= {cfg.max_kl}" if cfg.max_kl is not None else ""),
                "source_layer": best["source_layer"],
                "target_layer": best["target_layer"],
                "candidates": [e["source_layer"] for e in sweep],
                "excluded_by_kl": [e["source_layer"] for e in sweep if e not in ok],
            }
        ctx.save_json("sweep.json", out)
        ctx.state["sweep"] = out

    def _run_sweep(self, ctx: RunContext) -> list[dict[str, Any]]:
        """Per source layer: affine map, FVU, cos(transferred, native), and validation refusal scores
        and harmless KL under ablation (logit-based: no generation)."""
        from ..mapping import AffineMapper
        from ..mapping.evaluate import activation_metrics
        from ..steering import diff_of_means, kl_divergence, last_token_logprobs

        st, bs, p, tgt = ctx.state, ctx.config.batch_size, ctx.state["prompts"], ctx.state["tgt"]
        Xtr, Ytr, Xva, Yva, last = st["Xtr"], st["Ytr"], st["Xva"], st["Yva"], st["last"]
        k = len(p["harmful_train"])
        out: list[dict[str, Any]] = []
        base_score = _score_under(tgt, p["harmful_val"], None, bs)
        base_hl = last_token_logprobs(tgt, p["harmless_val"], batch_size=bs)
        kh = len(p["harmful_val"])
        for x in tqdm(self._sweep_layers(ctx), desc="layer sweep", disable=not ctx.progress, leave=False):
            y = self._target_for(ctx, x)
            hx, hy = hook_name("resid_pre", x), hook_name("resid_pre", y)
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
                    kl_divergence(base_hl, last_token_logprobs(tgt, p["harmless_val"], batch_size=bs)).mean()
                )
            out.append({
                "source_layer": x, "target_layer": y, "fvu": met["fvu"], "r2": met.get("r2"),
                "cos_transferred_native": cosine(v_tr, v_nat),
                "score_baseline": base_score,
                "score_native_ablated": _score_under(tgt, p["harmful_val"], v_nat.float(), bs),
                "score_transferred_ablated": _score_under(tgt, p["harmful_val"], v_tr.float(), bs),
                "kl_harmless_transferred_ablated": kl,
                "n_val_harmful": kh,
            })  # fmt: skip
        return out

    def _hooks(self, ctx: RunContext) -> tuple[str, str]:
        d = ctx.state["source_direction"]
        return hook_name("resid_pre", d["source_layer"]), hook_name("resid_pre", d["target_layer"])

    # 4. the mapper for the chosen pair
    def mapper(self, ctx: RunContext) -> None:
        from ..mapping import get_mapper_class

        hs, ht = self._hooks(ctx)
        mapper = get_mapper_class(ctx.config.mapper)()
        st = ctx.state
        mapper.fit(st["Xtr"][hs], st["Ytr"][ht])
        st["mapper_metrics"] = record_mapper(ctx.run_dir, mapper, st["Xva"][hs], st["Yva"][ht], source_model=st["src"].name,
                                             source_hook=hs, target_model=st["tgt"].name, target_hook=ht)  # fmt: skip
        st["mapper"] = mapper

    def load_mapper(self, ctx: RunContext) -> None:
        ctx.state["mapper"], ctx.state["mapper_metrics"] = load_recorded_mapper(ctx.run_dir)

    # 5. transferred and native directions at the target layer (+ a random one of equal norm)
    def directions(self, ctx: RunContext) -> None:
        from ..steering import SteeringVector, diff_of_means, transfer

        st, (hs, ht) = ctx.state, self._hooks(ctx)
        tgt, k = st["tgt"], len(st["prompts"]["harmful_train"])
        tr_vec = transfer(
            st["src_vec"], st["mapper"], anchor=st["Xtr"][hs], target_model=tgt.name, target_hook=ht
        )
        tacts = st["Ytr"][ht][st["last"]]
        native = SteeringVector(vector=diff_of_means(tacts[:k], tacts[k:]), model=tgt.name, hook=ht, kind="refusal",
                                source={"method": "diff_of_means", "layer": cast(int, parse_hook_name(ht)[1])})  # fmt: skip
        tr_vec.save(ctx.path("transferred_refusal.safetensors"))
        native.save(ctx.path("native_refusal.safetensors"))
        st["tr_vec"], st["native_vec"] = tr_vec, native

    def load_directions(self, ctx: RunContext) -> None:
        from ..steering import SteeringVector

        ctx.state["tr_vec"] = SteeringVector.load(ctx.path("transferred_refusal.safetensors"))
        ctx.state["native_vec"] = SteeringVector.load(ctx.path("native_refusal.safetensors"))

    # 6. generation evaluation on the target
    def generation_eval(self, ctx: RunContext) -> None:
        from ..steering import generate_completions, kl_divergence, last_token_logprobs, random_like

        cfg, st = ctx.config, ctx.state
        tgt, bs, ht = st["tgt"], cfg.batch_size, self._hooks(ctx)[1]
        tr, native, rnd = st["tr_vec"].vector.float(), st["native_vec"].vector.float(), random_like(st["tr_vec"], seed=cfg.seed).vector.float()  # fmt: skip
        gen = dict(max_new_tokens=cfg.max_new_tokens, batch_size=bs, progress=ctx.progress)
        harmful, harmless = st["prompts"]["harmful_test"], st["prompts"]["harmless_test"]
        comps: dict[str, list[str]] = {}
        comps["harmful_baseline"] = generate_completions(tgt, harmful, desc="harmful: baseline", **gen)
        for name, vec in (("native", native), ("transferred", tr), ("random", rnd)):
            with tgt.ablate(vec):
                comps[f"harmful_{name}"] = generate_completions(
                    tgt, harmful, desc=f"harmful: {name} ablated", **gen
                )
        comps["harmless_baseline"] = generate_completions(tgt, harmless, desc="harmless: baseline", **gen)
        with tgt.ablate(tr):
            comps["harmless_transferred"] = generate_completions(
                tgt, harmless, desc="harmless: transferred ablated", **gen
            )
        with tgt.steer(ht, tr, scale=cfg.induce_scale, positions="all"):
            comps["harmless_induced"] = generate_completions(
                tgt, harmless, desc="harmless: transferred added", **gen
            )
        with tgt.steer(ht, rnd, scale=cfg.induce_scale, positions="all"):
            comps["harmless_induced_random"] = generate_completions(
                tgt, harmless, desc="harmless: random added", **gen
            )
        base_lp = last_token_logprobs(tgt, harmless, batch_size=bs)
        with tgt.ablate(tr):
            abl_lp = last_token_logprobs(tgt, harmless, batch_size=bs)
        ctx.save_json("completions.json", comps)
        ctx.save_json(
            "generation_eval.json", {"kl_transferred": float(kl_divergence(base_lp, abl_lp).mean())}
        )
        st["completions"], st["generation_eval"] = comps, ctx.load_json("generation_eval.json")

    # 6b. the model judge beside the substring judge (agreement over every completion)
    def model_judge(self, ctx: RunContext) -> None:
        cfg, st = ctx.config, ctx.state
        p = st["prompts"]
        info = None
        if cfg.judge != "none":
            info = _model_judge(cfg, st["src"], st["tgt"], st["completions"], p["harmful_test"], p["harmless_test"],
                                ctx.progress)  # fmt: skip
        ctx.save_json("model_judge.json", info)
        st["model_judge"] = info

    # 8. results.json (written by run_experiment), examples.json
    def results(self, ctx: RunContext) -> None:
        st, cfg = ctx.state, ctx.config
        prompts, comps = st["prompts"], st["completions"]
        hs, ht = self._hooks(ctx)
        rates = {k2: _refusal_rate(v) for k2, v in comps.items()}
        drop_native = rates["harmful_baseline"] - rates["harmful_native"]
        drop_tr = rates["harmful_baseline"] - rates["harmful_transferred"]
        metrics = st["mapper_metrics"]
        ctx.results.update({
            "source": st["src"].name,
            "target": st["tgt"].name,
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
                "kl_transferred": st["generation_eval"]["kl_transferred"],
            },
            "induced_refusal_rate": rates["harmless_induced"],
            "induced_refusal_rate_random": rates["harmless_induced_random"],
            "mapper": {"kind": cfg.mapper, "fvu": metrics["fvu"], **{k2: v for k2, v in metrics.items() if k2 != "fvu"}},
            "vectors": {
                "source_norm": st["src_vec"].norm,
                "transferred_norm": st["tr_vec"].norm,
                "native_norm": st["native_vec"].norm,
                "cos_transferred_native": cosine(st["tr_vec"].vector, st["native_vec"].vector),
            },
            "pairing": st["pairing"],
            "selection": st["source_direction"]["selection"],
            "sweep": st["sweep"]["sweep"] if "sweep" in st else [],
            "n": {k2: len(v) for k2, v in prompts.items()},
            "judge": "substring (rosettalens.steering.judge.REFUSAL_SUBSTRINGS)",
            "model_judge": st["model_judge"],
        })  # fmt: skip
        n_ex = 4
        examples = {
            cond: [{"prompt": q, "completion": c} for q, c in zip(prompts["harmful_test" if cond.startswith("harmful") else "harmless_test"], texts)][:n_ex]
            for cond, texts in comps.items()
        }  # fmt: skip
        ctx.save_json("examples.json", examples)
        st["examples"] = examples

    def report(self, ctx: RunContext) -> None:
        from ..report import refusal_report

        refusal_report(ctx.run_dir, ctx.results, ctx.state["examples"], ctx)

    def print_summary(self, results: dict[str, Any]) -> None:
        r = results["refusal_rate"]
        print(f"{results['source']} -> {results['target']}  ({results['layers']['source']} -> {results['layers']['target']}, "
              f"{results['mapper']['kind']} mapper, held-out FVU {results['mapper']['fvu']:.3f})")  # fmt: skip
        print(f"harmful refusal rate: baseline {r['baseline']:.2f}  native ablated {r['native']:.2f}  "
              f"transferred ablated {r['transferred']:.2f}  random ablated {r['random']:.2f}")  # fmt: skip
        h = results["harmless"]
        print(f"harmless: refusal {h['refusal_rate_baseline']:.2f} -> {h['refusal_rate_transferred']:.2f} "
              f"(KL {h['kl_transferred']:.4f}); induced refusal {results['induced_refusal_rate']:.2f}")  # fmt: skip
        print(f"run directory: {results['run_dir']} (report.html)")


EXPERIMENT = RefusalTransfer()
