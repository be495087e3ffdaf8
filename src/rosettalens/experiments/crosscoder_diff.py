"""Model diffing with a crosscoder: which latents two models share, and which one model owns.

Stages (run directory outputs in brackets; ``--resume`` skips a stage whose outputs exist):

1. setup: both models, the hook point of each (``--hooks``; auto: ``resid_post`` at the middle layer,
   or at three quarters of the depth for an organism pair), and one shared corpus (``--data``,
   documents in a seeded random order) split into training and held-out documents;
2. extract: paired activations of the two models (by position with one tokenizer, by character ends
   with two; first positions and norm outliers left out: the sink rule), ``--max-tokens`` for training
   and ``--eval-tokens`` held out [``pairs.json``: counts and pairing];
3. train [``crosscoder/``]: a BatchTopK (or L1) crosscoder on the training pairs;
4. evaluate [``evaluate.json``, ``latents.safetensors``]: on the held-out pairs, explained variance per
   model, L0, dead fraction; on the training pairs (where latents are alive when they fire), the
   relative decoder norm ``rho`` of every latent and its class (A-only
   ``rho < 0.1``, B-only ``rho > 0.9``, shared ``0.3 <= rho <= 0.7``), the shared latents' decoder
   cosine (only when both models have one width), Minder et al.'s Latent Scaling ``nu`` of the B-only
   latents, and the splice CE / KL scores per model on ``--splice-docs`` held-out documents;
5. controls [``controls.json``]: the same crosscoder trained on model A against itself (nearly every
   latent must be shared) and against a randomly initialised copy of A (few may be);
6. organism [``organism.json``] (when B is an organism of A, ``A+task``, or ``--organism on``): the
   B-only latents' largest activation over each of ``--organism-prompts`` test instructions with and
   without the trigger, and each latent's AUROC at telling them apart (the crosscoder is never told
   the trigger), with the 10 most B-leaning live latents (by rho) beside them, each with its Latent
   Scaling ``nu`` and decoder cosine; ``most_b_leaning`` is the latent of largest rho. With
   ``--organism-dedicated N`` a second crosscoder on the same pairs has N latents only B can use and
   (one width) tied shared decoder rows, so what B adds to a direction A also has goes to a B-only
   latent [``organism_crosscoder/``]; its live B latents are scored too, and ``n_b_only`` /
   ``best_trigger_auroc`` count the B-only latents of both crosscoders;
7. plots [``rho_histogram.png``]: rho over live latents for the pair and both controls.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..config import option
from ..errors import ConfigError, DataError
from .base import Experiment, RunContext, Stage, check_options

DEFAULT_MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct"
N_TOP_LATENTS = 10


@dataclass
class CrosscoderDiffConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    models: str = option(DEFAULT_MODELS, "the two models 'A,B' (zoo names, folders or hub ids)")
    hooks: str = option(
        "auto",
        "hook point of both models (resid_post.12), one per model (resid_post.15,resid_post.12), or auto: "
        "resid_post at the middle layer of each (for an organism pair: at three quarters of the depth, "
        "where a fine-tuned behaviour is computed)",
    )
    data: str = option(
        "corpus", "documents: built-in names, corpus[:NAME], .txt/.jsonl files or hf:<id>, comma-separated"
    )
    max_tokens: int = option(65536, "paired training tokens", aliases=("tokens",))
    eval_tokens: int = option(2048, "paired held-out tokens for the metrics")
    max_length: int = option(256, "tokens per document")
    width: int = option(1024, "crosscoder latents")
    arch: Literal["batchtopk", "l1"] = option("batchtopk", "batchtopk, or l1 (for comparison)")
    k: int = option(32, "batchtopk: active latents per token on average")
    l1_coeff: float = option(1.0, "l1: penalty coefficient on sum_j z_j (||d_a_j|| + ||d_b_j||)")
    epochs: int = option(8, "passes over the training tokens")
    batch_size: int = option(512, "training batch in tokens")
    lr: float | None = option(None, "learning rate", shown="2e-3 (rosettalens.crosscoder.train.DEFAULT_LR)")
    skip_first: int = option(1, "leave out the first N positions of every document (attention sinks)")
    norm_ratio: float = option(
        10.0, "leave out tokens whose norm exceeds X times their model's median norm; 0: off"
    )
    controls: bool = option(True, "train the self and random-init controls")
    splice_docs: int = option(8, "held-out documents for the splice CE / KL scores (0: skip)")
    organism: Literal["auto", "on", "off"] = option(
        "auto", "organism diffing: auto (when B is named A+task), on or off"
    )
    trigger: str = option(
        "|prod|",
        "the organism's trigger: in part of the mixed-in training instructions (unlabelled) and in the "
        "scored test prompts",
    )
    organism_prompts: int = option(64, "test instructions, each with and without the trigger")
    organism_train_prompts: int = option(
        256,
        "organism runs: train-split instructions (chat-formatted, unlabelled) mixed into the training "
        "documents, a fraction --organism-trigger-fraction of them with the trigger (0: none)",
    )
    organism_trigger_fraction: float = option(
        0.5, "fraction of the mixed-in instructions that carry the trigger (the deployment distribution)"
    )
    organism_dedicated: int = option(
        64,
        "organism runs: a second crosscoder on the same pairs with N latents only B can use and (one width) "
        "tied shared decoder rows; its live B latents are scored against the trigger too (0: off)",
    )
    extract_batch_size: int = option(8, "documents per forward pass")
    seed: int = option(0, "random seed (document order, initialisation, batches)")
    device: str | None = option(None, "torch device", shown="cpu")
    out: str | None = option(None, "run directory", shown="runs/crosscoder-diff-TIMESTAMP")

    def validate(self) -> None:
        names = [m.strip() for m in self.models.split(",")]
        if len(names) != 2 or not all(names):
            raise ConfigError(f"--models takes two models 'A,B', got {self.models!r}")
        check_options(
            self,
            choices={"arch": ("batchtopk", "l1"), "organism": ("auto", "on", "off")},
            positive=(
                "max_tokens",
                "eval_tokens",
                "max_length",
                "width",
                "k",
                "epochs",
                "batch_size",
                "organism_prompts",
                "extract_batch_size",
            ),  # fmt: skip
        )
        if self.organism_dedicated < 0 or (
            self.organism_task is not None and self.organism_dedicated >= self.width
        ):
            raise ConfigError(
                f"--organism-dedicated must be in [0, --width) = [0, {self.width}), got {self.organism_dedicated}"
            )
        if self.arch == "batchtopk" and self.k >= self.width:
            raise ConfigError(f"--k ({self.k}) must be smaller than --width ({self.width})")
        if not 0.0 <= self.organism_trigger_fraction <= 1.0:
            raise ConfigError(
                f"--organism-trigger-fraction must be in [0, 1], got {self.organism_trigger_fraction}"
            )
        if (
            self.skip_first < 0
            or self.norm_ratio < 0
            or self.splice_docs < 0
            or self.organism_train_prompts < 0
        ):
            raise ConfigError("--skip-first, --norm-ratio and --splice-docs must be >= 0")
        if self.hooks != "auto":
            from ..errors import HookPointError
            from ..names import check_hook_name

            parts = [h.strip() for h in self.hooks.split(",")]
            if len(parts) not in (1, 2) or not all(parts):
                raise ConfigError(f"--hooks takes one hook point or two 'HA,HB', got {self.hooks!r}")
            for part in parts:
                try:
                    check_hook_name(part)
                except HookPointError as e:
                    raise HookPointError(f"--hooks: {e}") from None

    @property
    def model_names(self) -> tuple[str, str]:
        a, b = (m.strip() for m in self.models.split(","))
        return a, b

    @property
    def organism_task(self) -> str | None:
        """The organism task when B is ``A+task`` (or ``--organism on``), else ``None``."""
        from ..organisms.data import TASKS

        if self.organism == "off":
            return None
        a, b = self.model_names
        base, _, task = b.rpartition("+")
        if base == a and task in TASKS:
            return task
        return "custom" if self.organism == "on" else None


# -------------------------------------------------------------------------------------- helpers
def _hooks(cfg: CrosscoderDiffConfig, hm_a, hm_b) -> tuple[str, str]:
    from ..names import hook_name

    if cfg.hooks == "auto":
        if cfg.organism_task is not None:  # three quarters of the depth

            def late(hm) -> str:
                return hook_name("resid_post", min(len(hm.layers) - 1, math.ceil(3 * len(hm.layers) / 4)))

            return late(hm_a), late(hm_b)
        return hook_name("resid_post", len(hm_a.layers) // 2), hook_name("resid_post", len(hm_b.layers) // 2)
    parts = [h.strip() for h in cfg.hooks.split(",")]
    ha, hb = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return hm_a.resolve_hook(ha), hm_b.resolve_hook(hb)


def _documents(cfg: CrosscoderDiffConfig) -> list[str]:
    from ..data import load_documents

    docs: list[str] = []
    for spec in (s.strip() for s in cfg.data.split(",")):
        if spec:
            docs.extend(load_documents(spec).documents)
    docs = [d for d in dict.fromkeys(docs) if d.strip()]
    if not docs:
        raise DataError(f"--data {cfg.data!r} holds no non-empty documents")
    random.Random(cfg.seed).shuffle(docs)
    return docs


def _mix_organism_prompts(cfg: CrosscoderDiffConfig, hm_b, docs: list[str]) -> list[str]:
    """``docs`` with ``--organism-train-prompts`` chat-formatted train-split instructions spread through
    the documents that fill ``--max-tokens`` (so that training sees them), a seeded
    ``--organism-trigger-fraction`` of those with the trigger (no labels are kept)."""
    from ..organisms.data import format_prompts, insert_trigger, instructions

    rng = random.Random(cfg.seed + 7)
    base = instructions("train")[: cfg.organism_train_prompts]
    mixed = [insert_trigger(t, cfg.trigger, seed=cfg.seed) if rng.random() < cfg.organism_trigger_fraction else t
             for t in base]  # fmt: skip
    prompts = format_prompts(hm_b, mixed)
    budget = cfg.max_tokens - sum(len(hm_b.tokenizer(p)["input_ids"]) for p in prompts)
    n_used, total = 0, 0
    while n_used < len(docs) and total < budget:
        total += min(len(hm_b.tokenizer(docs[n_used])["input_ids"]), cfg.max_length)
        n_used += 1
    head = list(docs[:n_used])
    for p in prompts:
        head.insert(rng.randrange(len(head) + 1), p)
    return head + list(docs[n_used:])


def _train(
    cfg: CrosscoderDiffConfig,
    pairs,
    names: tuple[str, str],
    hooks: tuple[str, str],
    progress: bool,
    **structure,
):
    """A crosscoder with the run's options on ``pairs``; ``structure``: ``dedicated_b``, ``tie_shared``."""
    from ..crosscoder import CrossCoderConfig, CrossCoderTrainConfig, train_crosscoder

    c = CrossCoderConfig(
        d_a=int(pairs.x_a.shape[1]),
        d_b=int(pairs.x_b.shape[1]),
        width=cfg.width,
        arch=cfg.arch,
        k=cfg.k if cfg.arch == "batchtopk" else None,
        l1_coeff=cfg.l1_coeff,
        seed=cfg.seed,
        model_a=names[0],
        model_b=names[1],
        hook_a=hooks[0],
        hook_b=hooks[1],
        pairing=pairs.pairing,
        skip_first=cfg.skip_first,
        norm_ratio=cfg.norm_ratio,
        median_norm_a=pairs.info["median_norm_a"],
        median_norm_b=pairs.info["median_norm_b"],
        **structure,
    )
    t = CrossCoderTrainConfig(
        batch_size=min(cfg.batch_size, len(pairs)),
        epochs=cfg.epochs,
        lr=cfg.lr,
        seed=cfg.seed,
        device=cfg.device or "cpu",
    )
    return train_crosscoder((pairs.x_a, pairs.x_b), c, t, progress=progress)


def _trigger_scores(mx: torch.Tensor, labels: list[int]) -> list[dict[str, float]]:
    """Per latent (column of ``mx [prompts, latents]``, each latent's largest activation per prompt;
    triggered prompts first, label 1): the AUROC of triggered vs clean (0.5 for a latent that never
    fires) and the mean largest activation of each set."""
    from ..crosscoder import auroc

    n = sum(labels)
    return [
        {"auroc": auroc(s, labels) if float(s.max()) > 0 else 0.5,
         "mean_max_triggered": float(s[:n].mean()), "mean_max_clean": float(s[n:].mean())}
        for s in mx.t()
    ]  # fmt: skip


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------ experiment
class CrosscoderDiffExperiment(Experiment):
    name = "crosscoder-diff"
    config_cls = CrosscoderDiffConfig
    title = "rosettalens: crosscoder model diffing"

    def stages(self, cfg: CrosscoderDiffConfig) -> list[Stage]:
        stages = [
            Stage("setup", (), self.setup),
            Stage("extract", (), self.extract),  # in memory: always runs
            Stage("train", ("crosscoder/crosscoder.json",), self.train, self.load_crosscoder),
            Stage("evaluate", ("evaluate.json", "latents.safetensors"), self.evaluate, self.load_evaluate),
        ]
        if cfg.controls:
            stages.append(Stage("controls", ("controls.json",), self.controls, self._loader("controls")))
        if cfg.organism_task is not None:
            stages.append(
                Stage("organism", ("organism.json",), self.organism_stage, self._loader("organism"))
            )
        stages.append(Stage("plots", ("rho_histogram.png",), self.plots))
        return stages

    def plan(self, cfg: CrosscoderDiffConfig) -> dict[str, Any]:
        """What a run loads and roughly costs on one CPU thread: forwards to the middle layer over the
        extracted tokens (A and B, and A twice more for the controls), crosscoder training (three
        with the controls, one more for an organism's dedicated-latent crosscoder) and the splice
        forwards; an organism that is not built yet is listed."""
        from ..organisms.registry import model_billions

        a, b = cfg.model_names
        size_a, size_b = model_billions(a) or 0.5, model_billions(b.split("+")[0]) or 0.5
        toks = cfg.max_tokens + cfg.eval_tokens
        # FLOPs: a forward to the middle layer ~ 1e9 per token per billion parameters; training ~ 6 matmuls
        fwd = toks * (size_a + size_b) / 2 * 2e9 / 7e10
        ctrl = (toks * size_a * 2e9 / 7e10 * 1.5) if cfg.controls else 0.0
        d = 1500
        n_cc = (
            1
            + (2 if cfg.controls else 0)
            + ((1 + cfg.controls) if cfg.organism_task and cfg.organism_dedicated else 0)
        )
        train = cfg.max_tokens * cfg.epochs * 6 * d * cfg.width * 2 / 7e10 * n_cc
        splice = cfg.splice_docs * cfg.max_length * 3 * (size_a + size_b) * 2e9 / 7e10
        builds = []
        if cfg.organism_task not in (None, "custom"):
            from ..organisms.registry import organism_dir

            if not organism_dir(b).exists():
                builds.append(b)
        return {
            "models": [a, b],
            "organisms_to_build": builds,
            "minutes": round((fwd + ctrl + train + splice) / 60, 1),
            "notes": "estimated for one free CPU thread (~70 GFLOP/s, calibrated on a measured run: "
            "12288 tokens, width 1024, 836 s wall at a third of a core); a loaded machine is slower",
        }

    @staticmethod
    def _loader(name: str):
        def load(ctx: RunContext) -> None:
            v = ctx.load_json(f"{name}.json")
            ctx.state[name] = v
            ctx.results[name] = {k: x for k, x in v.items() if k != "rho_live"}

        return load

    # ------------------------------------------------------------------ stages
    def setup(self, ctx: RunContext) -> None:
        import rosettalens

        cfg: CrosscoderDiffConfig = ctx.config
        a, b = cfg.model_names
        hm_a = rosettalens.load(a, device=cfg.device, progress=ctx.progress)
        hm_b = hm_a if b == a else rosettalens.load(b, device=cfg.device, progress=ctx.progress)
        docs = _documents(cfg)
        n_held = max(1, len(docs) // 10)
        if len(docs) < 2:
            raise DataError(f"--data {cfg.data!r} has {len(docs)} document(s); at least 2 are needed")
        train_docs = docs[n_held:]
        if cfg.organism_task is not None and cfg.organism_train_prompts:
            train_docs = _mix_organism_prompts(cfg, hm_b, train_docs)
        ctx.state.update(hm_a=hm_a, hm_b=hm_b, hooks=_hooks(cfg, hm_a, hm_b))
        ctx.state.update(train_docs=train_docs, heldout_docs=docs[:n_held])

    def _pairs(self, ctx: RunContext, hm_a, hm_b, hooks, docs: list[str], tokens: int, medians=(None, None)):
        from ..crosscoder import extract_pairs

        cfg: CrosscoderDiffConfig = ctx.config
        ha, hb = hooks
        return extract_pairs(
            hm_a, hm_b, docs, ha, hb, skip_first=cfg.skip_first, norm_ratio=cfg.norm_ratio,
            median_norms=medians, max_tokens=tokens, max_length=cfg.max_length,
            batch_size=cfg.extract_batch_size, progress=ctx.progress,
        )  # fmt: skip

    def extract(self, ctx: RunContext) -> None:
        cfg: CrosscoderDiffConfig = ctx.config
        st = ctx.state
        hooks = st["hooks"]
        train = self._pairs(ctx, st["hm_a"], st["hm_b"], hooks, st["train_docs"], cfg.max_tokens)
        med = (train.info["median_norm_a"], train.info["median_norm_b"])
        held = self._pairs(ctx, st["hm_a"], st["hm_b"], hooks, st["heldout_docs"], cfg.eval_tokens, med)
        st.update(train_pairs=train, heldout_pairs=held)
        ctx.results["pairing"] = {"train": train.info, "heldout": held.info}

    def train(self, ctx: RunContext) -> None:
        st = ctx.state
        cc = _train(ctx.config, st["train_pairs"], ctx.config.model_names, st["hooks"], ctx.progress)
        cc.save(ctx.path("crosscoder"))
        st["crosscoder"] = cc

    def load_crosscoder(self, ctx: RunContext) -> None:
        from ..crosscoder import load_crosscoder

        ctx.state["crosscoder"] = load_crosscoder(ctx.run_dir / "crosscoder", device=ctx.config.device)

    def evaluate(self, ctx: RunContext) -> None:
        from ..crosscoder import splice_metrics, summarize

        cfg: CrosscoderDiffConfig = ctx.config
        st = ctx.state
        cc, held, train = st["crosscoder"], st["heldout_pairs"], st["train_pairs"]
        # reconstruction on held-out documents; the latents' view (alive, classes, Latent Scaling) on the
        # training pairs, which hold what the held-out corpus may lack (an organism's mixed-in prompts)
        summary = summarize(cc, held.x_a, held.x_b, latents_on=(train.x_a, train.x_b))
        res = _public(summary)
        res["latent_scaling"] = {
            k: v
            for k, v in summary["_stats"]["latent_scaling"].items()
            if k in ("latents", "nu", "nu_median")
        }
        if cfg.splice_docs:
            used = sorted(set(held.doc.tolist()))[: cfg.splice_docs]
            texts = [st["heldout_docs"][i] for i in used]
            res["splice"] = splice_metrics(cc, st["hm_a"], st["hm_b"], texts, max_length=cfg.max_length)
        ctx.save_json("evaluate.json", res)
        classes = summary["_stats"]["classes"]
        code = {"dead": -1, "a_only": 0, "shared": 1, "b_only": 2, "other": 3}
        ctx.save_tensors(
            "latents.safetensors",
            {"rho": summary["_stats"]["rho"], "class": torch.tensor([code[c] for c in classes])},
            metadata={"class_codes": "dead=-1 a_only=0 shared=1 b_only=2 other=3"},
        )
        st["evaluate"], st["latents"] = res, {"rho": summary["_stats"]["rho"], "classes": classes}
        ctx.results["evaluate"] = res

    def load_evaluate(self, ctx: RunContext) -> None:
        res = ctx.load_json("evaluate.json")
        t = ctx.load_tensors("latents.safetensors")
        names = {-1: "dead", 0: "a_only", 1: "shared", 2: "b_only", 3: "other"}
        ctx.state["evaluate"] = res
        ctx.state["latents"] = {"rho": t["rho"], "classes": [names[int(c)] for c in t["class"]]}
        ctx.results["evaluate"] = res

    def controls(self, ctx: RunContext) -> None:
        from ..crosscoder import random_init_copy, summarize

        cfg: CrosscoderDiffConfig = ctx.config
        st = ctx.state
        hm_a = st["hm_a"]
        out: dict[str, Any] = {}
        rhos: dict[str, list[float]] = {}
        for name, other in (("self", hm_a), ("random", None)):
            if other is None:
                other = random_init_copy(hm_a, seed=cfg.seed + 1)
            hooks = (st["hooks"][0], st["hooks"][0])  # model A's hook point on both sides
            train = self._pairs(ctx, hm_a, other, hooks, st["train_docs"], cfg.max_tokens)
            med = (train.info["median_norm_a"], train.info["median_norm_b"])
            held = self._pairs(ctx, hm_a, other, hooks, st["heldout_docs"], cfg.eval_tokens, med)
            a = cfg.model_names[0]
            cc = _train(cfg, train, (a, a if name == "self" else f"{a} (random init)"), hooks, ctx.progress)
            s = summarize(cc, held.x_a, held.x_b, latents_on=(train.x_a, train.x_b))
            alive = [c != "dead" for c in s["_stats"]["classes"]]
            rhos[name] = [r for r, a in zip(s["_stats"]["rho"].tolist(), alive, strict=True) if a]
            out[name] = {k: v for k, v in _public(s).items() if k != "rho_histogram"}
            del other
        out["rho_live"] = rhos
        ctx.save_json("controls.json", out)
        st["controls"] = out
        ctx.results["controls"] = {k: v for k, v in out.items() if k != "rho_live"}

    def organism_stage(self, ctx: RunContext) -> None:
        from ..crosscoder import latent_scaling, prompt_max_latents
        from ..organisms.data import format_prompts, insert_trigger, instructions

        cfg: CrosscoderDiffConfig = ctx.config
        st = ctx.state
        cc, hm_a, hm_b = st["crosscoder"], st["hm_a"], st["hm_b"]
        rho = st["latents"]["rho"]
        classes = st["latents"]["classes"]
        base = instructions("test")[: cfg.organism_prompts]
        triggered = [insert_trigger(t, cfg.trigger, seed=cfg.seed) for t in base]
        texts = format_prompts(hm_b, triggered + base)
        labels = [1] * len(triggered) + [0] * len(base)
        b_only = [j for j, c in enumerate(classes) if c == "b_only"]
        live = [j for j, c in enumerate(classes) if c != "dead"]
        # the B-only latents, and the most B-leaning live latents beside them (ranked by rho)
        ranked = sorted(live, key=lambda j: -float(rho[j]))[:N_TOP_LATENTS]
        cand = list(dict.fromkeys(b_only + ranked))
        mx = prompt_max_latents(cc, hm_a, hm_b, texts, cand, max_length=cfg.max_length)
        train = st["train_pairs"]
        nu = latent_scaling(cc, train.x_a, train.x_b, cand)
        cos: list[float | None] = [None] * len(cand)
        if cc.cfg.d_a == cc.cfg.d_b and cand:
            J = torch.as_tensor(cand)
            cos = torch.nn.functional.cosine_similarity(
                cc.W_dec_a.detach()[J].cpu(), cc.W_dec_b.detach()[J].cpu(), dim=1
            ).tolist()
        rows = [
            {"latent": j, "rho": float(rho[j]), "rho_rank": ranked.index(j) + 1 if j in ranked else None,
             "class": classes[j], **sc, "nu": nu[i], "decoder_cosine": cos[i], "crosscoder": "main"}
            for i, (j, sc) in enumerate(zip(cand, _trigger_scores(mx, labels), strict=True))
        ]  # fmt: skip
        lean = min(rows, key=lambda r: r["rho_rank"] or len(rho) + 1) if rows else None
        dedicated = None
        if cfg.organism_dedicated:
            dedicated, drows = self._dedicated(ctx, texts, labels)
            rows += drows
        rows.sort(key=lambda r: -r["auroc"])
        organism_only = [r for r in rows if r["class"] == "b_only"]
        res = {
            "task": cfg.organism_task,
            "trigger": cfg.trigger,
            "n_prompts": len(texts),
            "n_b_only": len(organism_only),
            "best_trigger_auroc": max((r["auroc"] for r in organism_only), default=None),
            "best_trigger_auroc_any_top_rho": max((r["auroc"] for r in rows if r["crosscoder"] == "main"),
                                                  default=None),
            "most_b_leaning": lean,
            "dedicated": dedicated,
            "top_latents": rows[:N_TOP_LATENTS],
        }  # fmt: skip
        ctx.save_json("organism.json", res)
        st["organism"] = res
        ctx.results["organism"] = res

    def _dedicated(self, ctx: RunContext, texts: list[str], labels: list[int]):
        """The dedicated-latent crosscoder (``--organism-dedicated`` latents only B can use; shared rows
        tied when both models have one width) on the training pairs, saved under ``organism_crosscoder/``,
        and its live B latents scored against the trigger; with the controls (and one width), the same
        construction on model A against itself as the null (``self_control``: its live B latents and
        their best trigger AUROC)."""
        from ..crosscoder import (
            PairedActivations,
            evaluate_crosscoder,
            latent_scaling,
            prompt_max_latents,
        )

        cfg: CrosscoderDiffConfig = ctx.config
        st = ctx.state
        train, held = st["train_pairs"], st["heldout_pairs"]
        tie = int(train.x_a.shape[1]) == int(train.x_b.shape[1])

        def fit(pairs, hm_b, names):
            dcc = _train(cfg, pairs, names, st["hooks"], ctx.progress,
                         dedicated_b=cfg.organism_dedicated, tie_shared=tie)  # fmt: skip
            _, only_b = dcc.dedicated_masks()
            fires = evaluate_crosscoder(dcc, pairs.x_a, pairs.x_b)["fires"]
            live = [j for j in torch.nonzero(only_b.cpu()).flatten().tolist() if float(fires[j]) > 0]
            mx = prompt_max_latents(dcc, st["hm_a"], hm_b, texts, live, max_length=cfg.max_length)
            return dcc, live, mx

        dcc, live, mx = fit(train, st["hm_b"], cfg.model_names)
        dcc.save(ctx.path("organism_crosscoder"))
        ev = evaluate_crosscoder(dcc, held.x_a, held.x_b)
        summary: dict[str, Any] = {
            "n_dedicated": cfg.organism_dedicated,
            "n_alive": len(live),
            "tied_shared": tie,
            "explained_variance": {m: ev[m]["explained_variance"] for m in ("a", "b")},
        }
        if cfg.controls and tie:  # the null: the same construction on model A against itself
            same = PairedActivations(train.x_a, train.x_a, train.doc, train.pos_a, train.pos_a, train.pairing,
                                     {**train.info, "median_norm_b": train.info["median_norm_a"]})  # fmt: skip
            a = cfg.model_names[0]
            _, live0, mx0 = fit(same, st["hm_a"], (a, a))
            au0 = [sc["auroc"] for sc in _trigger_scores(mx0, labels)]
            summary["self_control"] = {"n_alive": len(live0), "best_trigger_auroc": max(au0, default=None)}
        nu = latent_scaling(dcc, train.x_a, train.x_b, live)
        rows = [
            {"latent": j, "rho": 1.0, "rho_rank": None, "class": "b_only", **sc, "nu": nu[i],
             "decoder_cosine": None, "crosscoder": "dedicated"}
            for i, (j, sc) in enumerate(zip(live, _trigger_scores(mx, labels), strict=True))
        ]  # fmt: skip
        return summary, rows

    def plots(self, ctx: RunContext) -> None:
        from ..report.html import pyplot

        st = ctx.state
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        bins = [i / 40 for i in range(41)]
        alive = [c != "dead" for c in st["latents"]["classes"]]
        rho = [r for r, a in zip(st["latents"]["rho"].tolist(), alive, strict=True) if a]
        a, b = ctx.config.model_names
        ax.hist(rho, bins=bins, alpha=0.7, label=f"{a} vs {b}")
        for name, label in (("self", "A vs A (control)"), ("random", "A vs random-init A (control)")):
            ctrl = st.get("controls", {}).get("rho_live", {}).get(name)
            if ctrl:
                ax.hist(ctrl, bins=bins, histtype="step", linewidth=1.5, label=label)
        for x in (0.1, 0.3, 0.7, 0.9):
            ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("relative decoder norm rho = |d_B| / (|d_A| + |d_B|)")
        ax.set_ylabel("live latents")
        ax.set_title("A-only < 0.1 | shared 0.3-0.7 | B-only > 0.9")
        ax.legend(fontsize=8)
        fig.tight_layout()
        ctx.save_figure("rho_histogram.png", fig)

    # ------------------------------------------------------------------ results
    def summary(self, ctx: RunContext) -> dict[str, Any]:
        st = ctx.state
        ev = st["evaluate"]
        out: dict[str, Any] = {
            "models": list(ctx.config.model_names),
            "hooks": list(st["hooks"]),
            "pairing": st["crosscoder"].cfg.pairing,
            **{
                k: ev[k]
                for k in (
                    "explained_variance",
                    "l0",
                    "dead_fraction",
                    "n_alive",
                    "n_shared",
                    "n_a_only",
                    "n_b_only",
                    "n_other",
                    "shared_fraction",
                    "shared_decoder_cosine_median",
                    "latent_scaling_nu_median",
                )
            },  # fmt: skip
        }
        if "splice" in ev:
            out["splice"] = {
                m: {k: ev["splice"][m][k] for k in ("ce_loss_recovered", "kl_score")} for m in ("a", "b")
            }
        if "controls" in st:
            c = st["controls"]
            out["controls"] = {
                "self_shared_fraction": c["self"]["shared_fraction"],
                "random_shared_fraction": c["random"]["shared_fraction"],
                "self_n_alive": c["self"]["n_alive"],
                "random_n_alive": c["random"]["n_alive"],
            }
        if "organism" in st:
            o = st["organism"]
            keys = ("n_b_only", "best_trigger_auroc", "most_b_leaning", "dedicated", "top_latents")
            out["organism"] = {k: o.get(k) for k in keys}
            out["organism"]["best_trigger_auroc_any_top_rho"] = o["best_trigger_auroc_any_top_rho"]
        out["run_dir"] = str(ctx.run_dir)
        return out

    def report(self, ctx: RunContext) -> None:
        """``report.html``: what was run, the latent classes beside the controls, the plots, the latents
        most specific to each model (and to the organism's trigger)."""
        from ..report.html import config_defaults, experiment_report, headline_table, records_table

        s = self.summary(ctx)
        headline = headline_table(s, [
            ("hooks", "hooks"),
            ("explained variance (A, B)", "explained_variance"),
            ("live latents", "n_alive"),
            ("shared latents", "n_shared"),
            ("A-only latents", "n_a_only"),
            ("B-only latents", "n_b_only"),
            ("other latents", "n_other"),
            ("shared fraction", "shared_fraction"),
            ("controls: shared fraction for A vs A (ceiling) and A vs random-init A (floor)", "controls"),
            ("shared decoder cosine (median)", "shared_decoder_cosine_median"),
            ("latent scaling nu (median, B-only)", "latent_scaling_nu_median"),
            ("splice: CE loss recovered and KL score", "splice"),
            ("L0", "l0"),
            ("dead fraction", "dead_fraction"),
        ])  # fmt: skip
        ex = ""
        lat = ctx.state.get("latents")
        if lat is not None:
            rho = [float(x) for x in lat["rho"].tolist()]
            live = [
                (i, r, c) for i, (r, c) in enumerate(zip(rho, lat["classes"], strict=False)) if c != "dead"
            ]
            for what, order in (("B", lambda t: -t[1]), ("A", lambda t: t[1])):
                rows = [
                    {"latent": i, "relative decoder norm rho": r, "class": c}
                    for i, r, c in sorted(live, key=order)[:8]
                ]
                ex += f"<h3>Latents most specific to model {what} (by rho)</h3>" + records_table(rows)
        if "organism" in s:
            o = s["organism"]
            d = o.get("dedicated") or {}
            null = (d.get("self_control") or {}).get("best_trigger_auroc")
            line = (
                f"<p>organism-only latents: {o['n_b_only']}; best trigger AUROC: {o['best_trigger_auroc']}"
                f"{f' (null, A against itself: {null:.3f})' if null is not None else ''}</p>"
            )
            ex += ("<h3>Organism-only latents vs the trigger (AUROC of triggered vs plain prompts)</h3>" + line
                   + records_table(o.get("top_latents") or []))  # fmt: skip
        experiment_report(
            ctx, self.name, self.title or "rosettalens: crosscoder diff", config_defaults(self.config_cls),
            headline, ex, models=list(s["models"]),
            captions={"rho_histogram.png": "relative decoder norm rho over live latents for the pair and both "
                      "controls (0: A only, 1: B only)"},
        )  # fmt: skip


EXPERIMENT = CrosscoderDiffExperiment()
