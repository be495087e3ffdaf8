"""Attribution graphs of sequence-continuation prompts in two models, and the features they share.

Stages, all written to one run directory:

1. transcoders: one transcoder set per model, loaded from ``--transcoders A_DIR,B_DIR`` or trained
   here on ``--data`` at a CPU budget (``--train-tokens``) and saved under ``transcoders_0/``,
   ``transcoders_1/`` (``transcoders.json``);
2. prompts: per task, clean prompts made with the first model's tokenizer (``prompts.json``); both
   models read the same texts;
3. graphs: an attribution graph (``rosettalens.circuits.graph``) of the first ``--n-graphs`` prompts
   of every task in each model, with replacement / completeness scores and intervention agreement
   (``graphs.json``; every graph under ``graphs/``);
4. matching: every transcoder feature that is a node of some graph of model A is matched to those of
   model B by activation correlation (``similarity.match_features``) over the task prompts, at the
   positions where both tokenizations have read the same characters (``align.align_texts``). A feature
   is *matched* when its best correlation with a graph feature of the other model is at least
   ``--min-corr``. ``shared_influence`` (per model, then the mean of the two) is the share of the
   graphs' feature influence (circuit-tracer's logit influence, summed over feature nodes) carried by
   matched features. The null: the same with model B's rows shuffled among rows of the same task and
   the same distance from the prompt's end (position-locked features keep their chance to match),
   ``--n-null`` times: ``shared_influence_null`` (its mean) and ``shared_influence_p`` (one-sided,
   ``(1 + #null >= observed) / (1 + n_null)``). Within each model, which graph features recur across
   tasks (influence-weighted overlap of the task graphs' feature sets) (``matching.json``);
5. plots and ``report.html``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..config import option
from ..errors import ConfigError, DataError
from .base import Experiment, RunContext, Stage


@dataclass
class SeqcontGraphsConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    models: str = option("smollm2-135m-instruct,gemma-3-270m", "two comma-separated models to compare")
    transcoders: str | None = option(
        None,
        "comma-separated transcoder set folders, one per model (an empty entry: trained in the run)",
        shown="trained in the run",
    )
    data: str = option("corpus", "documents the transcoders train on when --transcoders is not given")
    train_tokens: int = option(8000, "training tokens per transcoder set trained here")
    width: int = option(1024, "features per transcoder trained here")
    k: int = option(32, "active features per token of the transcoders trained here")
    tasks: str = option("digits,months", "comma-separated built-in sequence tasks")
    templates: Literal["paper", "bare"] = option(
        "bare", "prompt style: paper (names and verbs) or bare lists"
    )
    n_prompts: int = option(24, "prompts per task (feature matching reads all of them)")
    n_graphs: int = option(2, "prompts per task that get an attribution graph in each model")
    max_feature_nodes: int = option(256, "feature rows per graph (chosen by influence)")
    batch_size: int = option(16, "graph targets per batched backward pass")
    min_corr: float = option(0.8, "a feature is matched when its best correlation is at least this")
    n_null: int = option(200, "row shuffles of the shuffled-matching null")
    agreement_features: int = option(10, "features steered down per graph for intervention agreement")
    seed: int = option(0, "random seed (prompts, training, null shuffles)")
    device: str | None = option(None, "cpu, cuda, cuda:N or mps", shown="auto")
    dtype: str | None = option(None, "float32, bfloat16 or float16", shown="auto")
    out: str | None = option(None, "run directory", shown="runs/NAME-TIMESTAMP")

    def model_list(self) -> list[str]:
        names = [m.strip() for m in self.models.split(",") if m.strip()]
        if len(names) != 2:
            raise ConfigError(f"--models needs exactly two models (A,B), got {self.models!r}")
        return names

    def transcoder_list(self) -> list[str | None]:
        """One transcoder set folder per model; ``None``: trained in the run."""
        if not self.transcoders:
            return [None, None]
        dirs = [d.strip() or None for d in self.transcoders.split(",")]
        if len(dirs) != 2:
            raise ConfigError(
                "--transcoders needs one entry per model: A_DIR,B_DIR (an empty one is trained)"
            )
        return dirs

    def task_list(self) -> list[str]:
        from ..circuits.tasks import load_task

        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not names:
            raise ConfigError("no task given (--tasks)")
        for t in names:
            load_task(t)
        return names

    def validate(self) -> None:
        for name in (
            "n_prompts",
            "n_graphs",
            "max_feature_nodes",
            "batch_size",
            "train_tokens",
            "width",
            "k",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.n_graphs > self.n_prompts:
            raise ConfigError("--n-graphs must be at most --n-prompts")
        if self.n_null < 0 or self.agreement_features < 0:
            raise ConfigError("--n-null and --agreement-features must be >= 0")
        if not -1 <= self.min_corr <= 1:
            raise ConfigError(f"--min-corr must be in [-1, 1], got {self.min_corr}")
        if self.templates not in ("paper", "bare"):
            raise ConfigError(f"--templates must be paper or bare, got {self.templates!r}")
        self.model_list()
        self.task_list()
        from pathlib import Path

        from ..transcoders.model import SET_FILE

        for d in self.transcoder_list():
            if d is not None and not (Path(d) / SET_FILE).is_file():
                raise ConfigError(f"--transcoders {d} is not a transcoder set (no {SET_FILE})")


def shared_influence(graph_feats: list[dict[str, Any]], matched: set[tuple[int, int]]) -> float:
    """Share of the feature influence of graphs carried by ``matched`` (layer, feature) pairs.

    ``graph_feats``: per graph ``{"keys": [(layer, feature)] per feature node, "influence": [float]}``.
    """
    num = den = 0.0
    for g in graph_feats:
        for key, infl in zip(g["keys"], g["influence"], strict=True):
            den += infl
            if tuple(key) in matched:
                num += infl
    return num / den if den > 0 else float("nan")


def _matched_sets(corr: np.ndarray, keys_a: list, keys_b: list, min_corr: float) -> tuple[set, set]:
    """Features of A (rows) and B (columns) whose best correlation is at least ``min_corr``."""
    if corr.size == 0:
        return set(), set()
    c = np.nan_to_num(corr, nan=-1.0)
    ma = {tuple(keys_a[i]) for i in np.nonzero(c.max(1) >= min_corr)[0]}
    mb = {tuple(keys_b[j]) for j in np.nonzero(c.max(0) >= min_corr)[0]}
    return ma, mb


def shuffled_null(
    A: np.ndarray,
    B: np.ndarray,
    strata: list[str],
    keys: list[list[tuple[int, int]]],
    feats: list[list[dict[str, Any]]],
    min_corr: float,
    n_null: int,
    seed: int,
) -> list[float]:
    """Shared influence (mean of the two models') with the rows of ``B [n, f_b]`` shuffled among rows
    of the same stratum (``strata [n]``), ``n_null`` times; ``A [n, f_a]``, ``keys`` / ``feats`` per
    model as in :func:`shared_influence`."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    null = []
    for _ in range(n_null):
        perm = np.arange(len(strata))
        for idx in groups.values():
            perm[idx] = rng.permutation(idx)
        na, nb = _matched_sets(_corr(A, B[perm]), keys[0], keys[1], min_corr)
        null.append(float(np.nanmean([shared_influence(feats[0], na), shared_influence(feats[1], nb)])))
    return null


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation ``[f_a, f_b]`` of the columns of ``a [n, f_a]`` and ``b [n, f_b]`` (constant
    columns give NaN)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a.T @ b) / np.outer(na, nb)


class SeqcontGraphsExperiment(Experiment):
    name = "seqcont-graphs"
    config_cls = SeqcontGraphsConfig
    title = "rosettalens: attribution graphs of sequence continuation across models"
    layer_fields: dict[str, str] = {}

    def plan(self, cfg: SeqcontGraphsConfig) -> dict[str, Any]:
        from ..organisms.registry import model_billions

        given = cfg.transcoder_list()
        train = sum(d is None for d in given)
        n_graphs = cfg.n_graphs * len(cfg.task_list()) * 2
        # calibrated on one CPU thread (SmolLM2 vs Gemma 3 270M, 2026-12-05): a graph of 256 feature rows
        # with its 20 interventions 3 s, a Gemma transcoder set on 8,000 tokens 35 s, loading 10 s;
        # twice that here, scaled by each model's size against Gemma's 0.27B
        sizes = [(model_billions(m) or 0.5) / 0.27 for m in cfg.model_list()]
        # the paper templates' prompts are about 3x longer (28 tokens against 8): 225 s measured, 24 prompts
        per_graph = 0.1 * cfg.max_feature_nodes / 256 * (2.5 if cfg.templates == "paper" else 1.0)
        minutes = 0.3 * len(sizes) + sum(
            s * (per_graph * n_graphs / 2 + (1.2 * cfg.train_tokens / 8000 if d is None else 0.0))
            for s, d in zip(sizes, given, strict=True)
        )
        return {
            "models": cfg.model_list(),
            "organisms_to_build": [],
            "minutes": round(minutes, 1),
            "peak_gb": 4.2,  # measured 4.1 GB RSS at the defaults
            "notes": f"trains {train} transcoder set(s) ({cfg.train_tokens} tokens each), builds {n_graphs} graphs",
        }

    def stages(self, cfg: SeqcontGraphsConfig) -> list[Stage]:
        return [
            Stage("models", (), self.load_models),
            Stage("transcoders", ("transcoders.json",), self.transcoders, load=self.load_transcoders),
            Stage("prompts", ("prompts.json",), self.prompts),
            Stage("graphs", ("graphs.json",), self.graphs),
            Stage("matching", ("matching.json",), self.matching),
            Stage("plots", (), self.plots),
            Stage("summary", (), self.collect),
        ]

    # ------------------------------------------------------------------------------------ models
    def load_models(self, ctx: RunContext) -> None:
        import rosettalens

        cfg = ctx.config
        torch.manual_seed(cfg.seed)
        kw: dict[str, Any] = {"progress": ctx.progress}
        if cfg.device:
            kw["device"] = cfg.device
        if cfg.dtype:
            kw["dtype"] = getattr(torch, cfg.dtype)
        ctx.state["hms"] = [rosettalens.load(m, **kw) for m in cfg.model_list()]

    # ------------------------------------------------------------------------------- transcoders
    def transcoders(self, ctx: RunContext) -> None:
        cfg = ctx.config
        given = cfg.transcoder_list()
        info, dirs = [], []
        docs = None
        for i, hm in enumerate(ctx.state["hms"]):
            if given[i] is not None:
                dirs.append(given[i])
                info.append({"model": hm.name, "trained": False, "dir": given[i]})
                continue
            from ..data.sources import load_documents
            from ..transcoders.train import TrainConfig, train_transcoders

            docs = docs if docs is not None else load_documents(cfg.data).documents
            tcfg = TrainConfig(width=cfg.width, k=cfg.k, max_tokens=cfg.train_tokens, seed=cfg.seed)
            tset, _ = train_transcoders(hm, docs, tcfg, progress=ctx.progress)
            tset.info["model_spec"] = cfg.model_list()[i]
            path = ctx.path(f"transcoders_{i}")
            tset.save(path)
            dirs.append(str(path))
            info.append({"model": hm.name, "trained": True, "tokens": cfg.train_tokens})
        ctx.save_json("transcoders.json", {"dirs": dirs, "info": info})
        self.load_transcoders(ctx)

    def load_transcoders(self, ctx: RunContext) -> None:
        from ..transcoders.model import TranscoderSet

        d = ctx.load_json("transcoders.json")
        sets = []
        for path, hm in zip(d["dirs"], ctx.state["hms"], strict=True):
            tset = TranscoderSet.load(path, device=hm.device)
            for tc in tset.transcoders.values():
                tc.to(hm.dtype)
            sets.append(tset)
        ctx.state["tsets"] = sets

    # ----------------------------------------------------------------------------------- prompts
    def prompts(self, ctx: RunContext) -> None:
        """Per task, model A's prompts that model B reads with the answer as its next token, with each
        model's own token ids (a trailing space token where a tokenizer splits the space off the answer).
        The prompts are A's texts read by B's tokenizer, not two prompt sets drawn apart (with random
        names and verbs those would share few texts)."""
        from ..circuits.tasks import load_task, make_prompts, prompt_ids

        cfg = ctx.config
        hm_a, hm_b = ctx.state["hms"]
        out = {}
        for t in cfg.task_list():
            task = load_task(t)
            ps = make_prompts(hm_a, task, n=cfg.n_prompts, seed=cfg.seed, templates=cfg.templates)
            ids_b = prompt_ids(hm_b, task, ps.texts, ps.answers)
            keep = [i for i, ids in enumerate(ids_b) if ids is not None]
            if not keep:
                raise DataError(
                    f"task {t}: model B reads none of model A's prompts with the answer as one token"
                )
            out[t] = {
                "texts": [ps.texts[i] for i in keep],
                "answers": [ps.answers[i] for i in keep],
                "ids": [[ps.clean_ids[i].tolist() for i in keep], [ids_b[i] for i in keep]],
            }
        ctx.save_json("prompts.json", out)
        ctx.state["prompts"] = out

    # ------------------------------------------------------------------------------------ graphs
    def graphs(self, ctx: RunContext) -> None:
        from ..circuits.graph import build_graph
        from ..circuits.graph_checks import intervention_agreement
        from ..circuits.graph_view import graph_json, save_graph

        cfg = ctx.config
        prompts = ctx.state["prompts"]
        rows = []
        for mi, (hm, tset) in enumerate(zip(ctx.state["hms"], ctx.state["tsets"], strict=True)):
            for task, p in prompts.items():
                for gi, text in enumerate(p["texts"][: cfg.n_graphs]):
                    ids = torch.tensor(p["ids"][mi][gi])
                    g = build_graph(
                        hm, tset, ids, max_feature_nodes=cfg.max_feature_nodes, batch_size=cfg.batch_size
                    )
                    rep, comp = g.scores()
                    agr = (
                        intervention_agreement(hm, tset, g, n_features=cfg.agreement_features)
                        if cfg.agreement_features
                        else {"spearman": float("nan"), "n": 0}
                    )
                    infl = g.influence()[: g.n_features]
                    keys = [[int(v) for v in g.active_features[s][[0, 2]]] for s in g.selected]
                    folder = ctx.path(f"graphs/m{mi}_{task}_{gi}")
                    folder.mkdir(parents=True, exist_ok=True)
                    scores = {"replacement_score": rep, "completeness_score": comp,
                              "intervention_agreement": agr["spearman"]}  # fmt: skip
                    save_graph(g, folder, graph_json(g, scores=scores),
                               title=f"{hm.name}: {text!r}")  # fmt: skip
                    rows.append(
                        {
                            "model": hm.name,
                            "model_index": mi,
                            "task": task,
                            "prompt": text,
                            "top_logit": g.logit_strs[0] if g.logit_strs else "",
                            "answer": p["answers"][gi],
                            "n_tokens": g.n_pos,
                            "n_active_features": g.info["n_active_features"],
                            "n_feature_nodes": g.n_features,
                            "replacement_score": rep,
                            "completeness_score": comp,
                            "intervention_agreement": agr["spearman"],
                            "keys": keys,
                            "influence": infl.tolist(),
                            "folder": folder.name,
                        }
                    )
                    if ctx.progress:
                        print(
                            f"[graphs] {hm.name} {task} #{gi}: completeness {comp:.3f}, replacement {rep:.3f}, "
                            f"agreement {agr['spearman']:.3f}",
                            file=sys.stderr,
                        )
        ctx.save_json("graphs.json", {"graphs": rows})
        ctx.state["graphs"] = {"graphs": rows}

    # ---------------------------------------------------------------------------------- matching
    @torch.no_grad()
    def _acts(self, hm: Any, tset: Any, text: str, keys: list[tuple[int, int]]) -> tuple[np.ndarray, Any]:
        """Activations ``[pos, len(keys)]`` of the (layer, feature) ``keys`` on ``text`` and the token ids."""
        from ..names import hook_name

        layers = sorted({L for L, _ in keys})
        ids = hm.tokenize(text)["input_ids"]
        _, cache = hm.run_with_cache(ids, hooks=[hook_name("mlp_in", L) for L in layers])
        enc = {L: tset[L].encode(cache[hook_name("mlp_in", L)][0]).float().cpu() for L in layers}
        cols = [enc[L][:, f] for L, f in keys]
        a = torch.stack(cols, 1).numpy() if cols else np.zeros((ids.shape[1], 0))
        return a, ids[0].cpu()

    def matching(self, ctx: RunContext) -> None:
        from ..align import align_texts
        from ..similarity.matching import match_features

        cfg = ctx.config
        graphs = ctx.state["graphs"]["graphs"]
        hms, tsets = ctx.state["hms"], ctx.state["tsets"]
        keys = []
        for mi in range(2):
            ks = sorted({tuple(k) for g in graphs if g["model_index"] == mi for k in g["keys"]})
            keys.append(ks)
        rows_a, rows_b, strata = [], [], []
        for task, p in ctx.state["prompts"].items():
            al = align_texts(hms[0].tokenizer, hms[1].tokenizer, p["texts"])
            for text, (ia, ib) in zip(p["texts"], al["pairs"], strict=True):
                a, ids_a = self._acts(hms[0], tsets[0], text, keys[0])
                b, ids_b = self._acts(hms[1], tsets[1], text, keys[1])
                ia, ib = np.asarray(ia), np.asarray(ib)
                ok = (ia < a.shape[0]) & (ib < b.shape[0])
                ia, ib = ia[ok], ib[ok]
                rows_a.append(a[ia])
                rows_b.append(b[ib])
                strata += [f"{task}:{a.shape[0] - i}" for i in ia]
        A = np.concatenate(rows_a) if rows_a else np.zeros((0, len(keys[0])))
        B = np.concatenate(rows_b) if rows_b else np.zeros((0, len(keys[1])))
        fm = match_features(torch.from_numpy(A).float(), torch.from_numpy(B).float(), "max", return_corr=True)
        corr = fm.corr_matrix if fm.corr_matrix is not None else _corr(A, B)
        ma, mb = _matched_sets(corr, keys[0], keys[1], cfg.min_corr)
        feats = [[{"keys": g["keys"], "influence": g["influence"]} for g in graphs if g["model_index"] == mi]
                 for mi in range(2)]  # fmt: skip
        obs = [shared_influence(feats[0], ma), shared_influence(feats[1], mb)]
        observed = _nanmean(obs)
        null = shuffled_null(A, B, strata, keys, feats, cfg.min_corr, cfg.n_null, cfg.seed)
        null_arr = np.asarray(null)
        p_val = float((1 + np.sum(null_arr >= observed)) / (1 + len(null))) if null else float("nan")
        # cross-model pairs: each matched A feature with its best B feature
        pairs: list[dict[str, Any]] = []
        c = np.nan_to_num(corr, nan=-1.0)
        infl_a = _feature_influence(graphs, 0)
        infl_b = _feature_influence(graphs, 1)
        for i, ka in enumerate(keys[0]):
            if c.shape[1] == 0:
                break
            j = int(c[i].argmax())
            if c[i, j] >= cfg.min_corr:
                pairs.append({"a": list(ka), "b": list(keys[1][j]), "corr": float(c[i, j]),
                              "influence_a": infl_a.get(ka, 0.0), "influence_b": infl_b.get(keys[1][j], 0.0)})  # fmt: skip
        pairs.sort(key=lambda r: -(r["influence_a"] + r["influence_b"]))
        within = {hms[mi].name: _task_overlap(graphs, mi) for mi in range(2)}
        out = {
            "shared_influence": observed,
            "shared_influence_by_model": {hms[0].name: obs[0], hms[1].name: obs[1]},
            "shared_influence_null": float(null_arr.mean()) if null else float("nan"),
            "shared_influence_null_std": float(null_arr.std()) if null else float("nan"),
            "shared_influence_p": p_val,
            "null_values": null,
            "n_rows": int(A.shape[0]),
            "n_graph_features": [len(keys[0]), len(keys[1])],
            "n_matched": [len(ma), len(mb)],
            "min_corr": cfg.min_corr,
            "top_pairs": pairs[:20],
            "within_model_task_overlap": within,
        }
        ctx.save_json("matching.json", out)
        ctx.state["matching"] = out

    # ------------------------------------------------------------------------------------- plots
    def plots(self, ctx: RunContext) -> None:
        from ..report.html import pyplot

        m = ctx.state.get("matching") or ctx.load_json("matching.json")
        g = (ctx.state.get("graphs") or ctx.load_json("graphs.json"))["graphs"]
        plt = pyplot()
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        if m["null_values"]:
            ax[0].hist(m["null_values"], bins=30, color="#bbb", label="shuffled matching (null)")
        ax[0].axvline(m["shared_influence"], color="#c53030", label="observed")
        ax[0].set_xlabel("shared influence (share of graph feature influence on matched features)")
        ax[0].set_title(f"p = {m['shared_influence_p']:.3g}")
        ax[0].legend(fontsize=8)
        for mi, color in ((0, "#2b6cb0"), (1, "#dd6b20")):
            pts = [(r["replacement_score"], r["completeness_score"]) for r in g if r["model_index"] == mi]
            if pts:
                name = next(r["model"] for r in g if r["model_index"] == mi)
                ax[1].scatter(*zip(*pts, strict=True), color=color, label=name)
        ax[1].set_xlabel("replacement score")
        ax[1].set_ylabel("completeness score")
        ax[1].set_xlim(0, 1)
        ax[1].set_ylim(0, 1)
        ax[1].legend(fontsize=8)
        fig.tight_layout()
        ctx.save_figure("shared_influence.png", fig)

    # ----------------------------------------------------------------------------------- summary
    def collect(self, ctx: RunContext) -> None:
        out = self.summary(ctx)
        out.pop("run_dir", None)
        ctx.results.update(out)

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        m = ctx.state.get("matching") or ctx.load_json("matching.json")
        g = (ctx.state.get("graphs") or ctx.load_json("graphs.json"))["graphs"]
        by_model: dict[str, dict[str, float]] = {}
        for name in dict.fromkeys(r["model"] for r in g):
            rs = [r for r in g if r["model"] == name]
            by_model[name] = {
                k: _nanmean([r[k] for r in rs])
                for k in ("completeness_score", "replacement_score", "intervention_agreement")
            }
        return {
            "shared_influence": m["shared_influence"],
            "shared_influence_null": m["shared_influence_null"],
            "shared_influence_p": m["shared_influence_p"],
            "shared_influence_by_model": m["shared_influence_by_model"],
            "n_matched": m["n_matched"],
            "n_graph_features": m["n_graph_features"],
            "graph_scores": by_model,
            "within_model_task_overlap": m["within_model_task_overlap"],
            "top_pairs": m["top_pairs"][:5],
            "run_dir": str(ctx.run_dir),
        }

    def report(self, ctx: RunContext) -> None:
        """``report.html``: what was run, shared influence beside its shuffled null and p, the plots, the
        top matched features."""
        from ..report.html import config_defaults, experiment_report, headline_table, kv_table, records_table

        r = ctx.results
        headline = headline_table(r, [
            ("shared influence (share of graph feature influence on cross-model matched features)",
             "shared_influence"),
            ("shared influence under shuffled matching (null mean)", "shared_influence_null"),
            ("p-value (observed vs shuffled null)", "shared_influence_p"),
            ("shared influence per model", "shared_influence_by_model"),
            ("matched features per model", "n_matched"),
            ("graph features per model", "n_graph_features"),
            ("graph scores per model (means over graphs)", "graph_scores"),
        ])  # fmt: skip
        m = ctx.state.get("matching") or {}
        top = m.get("top_pairs") or r.get("top_pairs") or []
        ex = ("<h3>Top matched features (A feature [layer, index] with its best B feature)</h3>"
              + records_table(top[:10]))  # fmt: skip
        details = [
            ("Within-model task overlap", kv_table(list((r.get("within_model_task_overlap") or {}).items())))
        ]
        experiment_report(
            ctx, self.name, self.title or "rosettalens: sequence-continuation attribution graphs",
            config_defaults(self.config_cls), headline, ex,
            captions={"shared_influence.png": "shared influence vs its shuffled-matching null; replacement vs "
                      "completeness score per graph"},
            details=details,
        )  # fmt: skip


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _feature_influence(graphs: list[dict[str, Any]], mi: int) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for g in graphs:
        if g["model_index"] != mi:
            continue
        for k, v in zip(g["keys"], g["influence"], strict=True):
            out[tuple(k)] = out.get(tuple(k), 0.0) + float(v)  # type: ignore[index]
    return out


def _task_overlap(graphs: list[dict[str, Any]], mi: int) -> dict[str, Any]:
    """Influence-weighted overlap of the task graphs' feature sets in one model: for each task pair,
    the share of the two tasks' feature influence on features in both (and the top shared features)."""
    per_task: dict[str, dict[tuple[int, int], float]] = {}
    for g in graphs:
        if g["model_index"] != mi:
            continue
        d = per_task.setdefault(g["task"], {})
        for k, v in zip(g["keys"], g["influence"], strict=True):
            d[tuple(k)] = d.get(tuple(k), 0.0) + float(v)  # type: ignore[index]
    tasks = sorted(per_task)
    out: dict[str, Any] = {}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            common = set(per_task[a]) & set(per_task[b])
            tot = sum(per_task[a].values()) + sum(per_task[b].values())
            shared = sum(per_task[a][k] + per_task[b][k] for k in common)
            top = sorted(common, key=lambda k: -(per_task[a][k] + per_task[b][k]))[:5]
            out[f"{a}|{b}"] = {
                "influence_share": shared / tot if tot > 0 else float("nan"),
                "n_common": len(common),
                "top_common": [list(k) for k in top],
            }
    return out


EXPERIMENT = SeqcontGraphsExperiment()
