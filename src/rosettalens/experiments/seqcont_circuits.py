"""Shared sequence-continuation circuits across tasks and models (Lan, Torr, Barez 2024).

Stages, all written to one run directory:

1. prompts: per model and task, clean prompts in the paper's style (names and verbs) with corrupted
   twins (members replaced by random members); the competence filter (next member top-1 and
   p(next) > 2 p(last)) keeps at most ``n_prompts``; competence per model and task (``prompts.json``);
2. circuits: node pruning by iterative mean-ablation (heads and MLPs; backward then forward over the
   layers) keeping ``threshold`` of the full model's metric (``circuits.json``);
3. edges: path patching between the circuit's nodes (``edges.json``);
4. faithfulness: f(C) with the complement mean-ablated, EAP node attribution, the MIB faithfulness
   curve (CPR / CMD) and random circuits of the same sizes (``faithfulness.json``);
5. shared: IoU matrix of the task circuits, the shared sub-circuit (their intersection), its
   faithfulness on each task, its heads' roles (successor / copy scores, attention to the members),
   and the ablation test: the shared sub-circuit vs random component sets of the same size,
   mean-ablated, on every task and on other tasks (one-digit addition, interval sequences), with
   top-1 accuracies, metrics and permutation p-values; the same test for the shared sub-circuit's heads
   alone vs random head sets (``ablation_test_heads``; MLP ablation alone can break a model)
   (``shared.json``);
6. cross-model (``--models A,B``): circuits by relative depth, the shared sub-circuits' heads of two
   models matched by their role scores (``cross_model.json``);
7. plots (attribution per head, EAP of ``resid_pre`` by layer x position, faithfulness curves, IoU
   matrices, relative depths; optional exact patching heatmaps with ``--patching true``) and
   ``report.html``.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..config import option
from ..errors import ConfigError, DataError
from .base import Experiment, RunContext, Stage, config_dict


@dataclass
class SeqcontConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    model: str = option("smollm2-135m-instruct", "the model whose circuits are found")
    models: str | None = option(None, "comma-separated models to compare across (overrides --model)",
                                shown="--model alone")  # fmt: skip
    tasks: str = option(
        "digits,number-words,months",
        "comma-separated sequence tasks: built-in ones or ones --task-file defines",
    )
    task_file: str | None = option(
        None,
        "user tasks (JSON): added to --tasks, or, when --tasks names some of them, only those named run",
        shown="none",
    )
    other_tasks: str = option("addition,interval-digits", "tasks of the ablation test only (comma-separated)")
    other_filter: Literal["competent", "all"] = option(
        "competent", "the other tasks' prompts: competent (the competence filter, from 16x candidates) or all"
    )
    templates: Literal["paper", "bare"] = option(
        "paper", "built-in template style: paper (names and verbs) or bare"
    )
    n_prompts: int = option(8, "prompts per task after the competence filter")
    threshold: float = option(0.8, "share of the full model's metric a pruned circuit keeps, in (0, 1]")
    group_first: bool = option(True, "pruning tries a whole layer's heads first (one forward)")
    batched: bool = option(True, "pruning scores many candidate removals per forward (the same circuit)")
    max_rows: int = option(16, "batched pruning: circuits scored per forward at most")
    edges: bool = option(True, "path patching between the circuit's nodes")
    max_edge_nodes: int = option(
        6, "path patching among at most this many circuit nodes (the most important)"
    )
    n_random: int = option(2, "random circuits per faithfulness curve (random_cpr / random_cmd)")
    n_random_ablation: int = option(20, "random component sets per task in the ablation test (its p-values)")
    n_random_circuits: int = option(20, "random circuits of the pruned circuit's size (its p-value)")
    role_min_score: float = option(0.2, "a head's role needs its best role score >= this, else unassigned")
    role_max_distance: float = option(
        0.25, "cross-model head pairs farther apart in role scores do not match"
    )
    patching: bool = option(False, "exact head patching heatmaps (patch_sweep; slow on a CPU)")
    batch_size: int = option(32, "prompts per forward pass")
    seed: int = option(0, "random seed (corrupted prompts, random circuits)")
    device: str | None = option(None, "cpu, cuda, cuda:N or mps", shown="auto")
    dtype: str | None = option(None, "float32, bfloat16 or float16", shown="auto")
    out: str | None = option(None, "run directory", shown="runs/NAME-TIMESTAMP")

    def model_list(self) -> list[str]:
        names = [m.strip() for m in (self.models or self.model).split(",") if m.strip()]
        if not names:
            raise ConfigError("no model given")
        return names

    def validate(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold must be in (0, 1], got {self.threshold}")
        for name in ("n_prompts", "batch_size", "max_edge_nodes", "max_rows", "n_random_circuits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("n_random", "n_random_ablation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        if self.role_min_score < 0 or self.role_max_distance < 0:
            raise ConfigError("--role-min-score and --role-max-distance must be >= 0")
        if self.other_filter not in ("competent", "all"):
            raise ConfigError(f"--other-filter must be competent or all, got {self.other_filter!r}")
        if self.templates not in ("paper", "bare"):
            raise ConfigError(f"--templates must be paper or bare, got {self.templates!r}")
        self.model_list()
        _tasks(self)


def _tasks(cfg: SeqcontConfig) -> tuple[list[Any], list[Any]]:
    """(main tasks, other tasks of the ablation test) as SequenceTask objects."""
    from ..circuits.tasks import load_task, select_tasks

    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    main = select_tasks(names, cfg.task_file)
    if not main:
        raise ConfigError("no task given (--tasks or --task-file)")
    seen = [t.name for t in main]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"repeated task names: {seen}")
    other = [load_task(t.strip()) for t in cfg.other_tasks.split(",") if t.strip() and t.strip() not in seen]
    return main, other


def _user_task_names(cfg: SeqcontConfig) -> set[str]:
    """The names of the tasks ``--task-file`` defines (their prompts are checked strictly)."""
    from ..circuits.tasks import load_task_file

    return {t.name for t in load_task_file(cfg.task_file)} if cfg.task_file else set()


# the config fields a model's pruned circuit depends on (with the model itself and the task): a --reuse run
# that agrees on them lends its circuits for the models it ran
CIRCUIT_KEY = ("task_file", "templates", "n_prompts", "threshold", "group_first", "batched", "max_rows",
               "batch_size", "seed", "dtype")  # fmt: skip
# which model's circuits came from which --reuse run: {model: {task: run directory}}
REUSED_FILE = "circuits/reused.json"


def _components(c: dict) -> set[str]:
    return set(c["heads"]) | {f"mlp.{m}" for m in c["mlps"]}


def _iou(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


class SeqcontExperiment(Experiment):
    name = "seqcont-circuits"
    config_cls = SeqcontConfig
    title = "rosettalens: shared sequence-continuation circuits"
    summary_line = "sequence-continuation circuits by patching and pruning, shared across tasks and models"

    def plan(self, cfg: SeqcontConfig) -> dict[str, Any]:
        """What a run will load, and its cost: measured for the default (SmolLM2, 3 tasks: 22 min, 1.6 GB
        on one thread of a 2-core CPU, docs/results/), scaled by the models' size and the task count."""
        from ..organisms.registry import model_billions

        models = cfg.model_list()
        n_tasks = len([t for t in cfg.tasks.split(",") if t.strip()]) + (1 if cfg.task_file else 0)
        sizes = [(model_billions(m) or 0.5) / 0.135 for m in models]
        minutes = 22.0 * sum(sizes) * max(n_tasks, 1) / 3 * cfg.n_prompts / 8
        return {
            "models": models,
            "organisms_to_build": [],
            "minutes": round(minutes * (3 if cfg.patching else 1), 1),
            "peak_gb": round(1.6 * max(sizes), 1),
            "notes": "measured for the default run, scaled by model size, tasks and prompts"
            + ("; --patching roughly triples it" if cfg.patching else ""),
        }

    def stages(self, cfg: SeqcontConfig) -> list[Stage]:
        stages = [
            Stage("models", (), self.load_models),
            Stage("prompts", ("prompts.json",), self.prompts, load=self.load_prompts),
            Stage("circuits", ("circuits.json",), self.circuits, load=self.load_circuits),
            Stage("faithfulness", ("faithfulness.json",), self.faithfulness),
            Stage("shared", ("shared.json",), self.shared),
        ]
        if cfg.edges:
            stages.append(Stage("edges", ("edges.json",), self.edges))
        if len(cfg.model_list()) > 1:
            stages.append(Stage("cross_model", ("cross_model.json",), self.cross_model))
        stages.append(Stage("plots", (), self.plots))
        stages.append(Stage("summary", (), self.collect))
        return stages

    def collect(self, ctx: RunContext) -> None:
        """results.json: the summary (also after --resume, from the stages' files)."""
        out = self.summary(ctx)
        out.pop("run_dir", None)
        ctx.results.update(out)

    # ------------------------------------------------------------------------------------ models
    def load_models(self, ctx: RunContext) -> None:
        import rosettalens

        cfg = ctx.config
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
        hms = {}
        for name in cfg.model_list():
            kw: dict[str, Any] = {"progress": ctx.progress}
            if cfg.device:
                kw["device"] = cfg.device
            if dtype is not None:
                kw["dtype"] = dtype
            hms[name] = rosettalens.load(name, **kw)
        ctx.state["hms"] = hms
        ctx.state["task_objs"] = _tasks(cfg)

    # ----------------------------------------------------------------------------------- prompts
    def _build(self, ctx: RunContext, keep: dict | None) -> dict:
        """Prompt sets per model and task; ``keep`` (from prompts.json) gives the kept rows."""
        from ..circuits.tasks import competence, make_prompts

        cfg = ctx.config
        main, other = ctx.state["task_objs"]
        user = _user_task_names(cfg)
        sets: dict[str, dict[str, Any]] = {}
        report: dict[str, dict[str, Any]] = {}
        for mname, hm in ctx.state["hms"].items():
            sets[mname], report[mname] = {}, {}
            for task in [*main, *other]:
                is_main = task in main
                tpl = None if task.templates else cfg.templates
                # other tasks under the competence filter draw more candidates: a model may do them rarely
                n_cand = (4 if is_main or cfg.other_filter == "all" else 16) * cfg.n_prompts
                ps = make_prompts(hm, task, n=n_cand, seed=cfg.seed, strict=task.name in user,
                                  templates=tpl)  # fmt: skip
                if keep is not None:
                    rows = keep[mname][task.name]["rows"]
                    stats = keep[mname][task.name]
                else:
                    mask, stats = competence(hm, ps, cfg.batch_size)
                    rows = mask.nonzero().flatten().tolist()
                    if is_main or cfg.other_filter == "competent":
                        rows = rows[: cfg.n_prompts]
                    else:  # ablation test on every prompt, accuracy measured with and without ablation
                        rows = list(range(min(len(ps), cfg.n_prompts)))
                    if is_main and not rows:
                        raise DataError(
                            f"{mname} passes no prompt of the competence filter on task {task.name!r} "
                            f"(next member top-1 and p(next) > 2 p(last) on 0 of {len(ps)}); drop the task"
                        )
                    stats = {**stats, "rows": rows, "tokenization": ps.tokenization,
                             "examples": ps.subset(rows).examples(2), "main": is_main}  # fmt: skip
                sets[mname][task.name] = ps.subset(rows)
                report[mname][task.name] = stats
        return {"sets": sets, "report": report}

    def prompts(self, ctx: RunContext) -> None:
        out = self._build(ctx, None)
        ctx.state["sets"] = out["sets"]
        ctx.save_json("prompts.json", out["report"])
        ctx.state["prompts"] = out["report"]

    def load_prompts(self, ctx: RunContext) -> None:
        keep = ctx.load_json("prompts.json")
        ctx.state["prompts"] = keep
        ctx.state["sets"] = self._build(ctx, keep)["sets"]

    def _main(self, ctx: RunContext) -> list[str]:
        return [t.name for t in ctx.state["task_objs"][0]]

    # ---------------------------------------------------------------------------------- circuits
    def circuits(self, ctx: RunContext) -> None:
        from ..circuits.pruning import prune_nodes

        cfg = ctx.config
        out: dict[str, dict[str, Any]] = {}
        reused: dict[str, dict[str, str]] = {}
        if ctx.exists(REUSED_FILE):  # a resumed run: the circuits taken before it stopped
            reused = ctx.load_json(REUSED_FILE)
        for k, (mname, hm) in enumerate(ctx.state["hms"].items()):
            out[mname] = {}
            for task in self._main(ctx):
                # one file per model and task as soon as it is pruned: a resumed run keeps them
                part = f"circuits/{k}-{task}.json"
                if ctx.exists(part):
                    saved = ctx.load_json(part)
                    # a run resumed with another --models order must not take another model's circuit
                    if saved.get("model", mname) == mname:
                        out[mname][task] = saved
                        continue
                lent = self._lent_circuit(ctx, mname, task)
                if lent is not None:
                    lender, out[mname][task] = lent
                    reused.setdefault(mname, {})[task] = str(lender)
                    ctx.save_json(part, out[mname][task])
                    ctx.save_json(REUSED_FILE, reused)
                    if ctx.progress:
                        print(f"{mname} {task}: circuit reused from {lender}", file=sys.stderr)
                    continue
                ps = ctx.state["sets"][mname][task]
                res = prune_nodes(
                    hm, ps.clean_ids, ps.metric(), ps.corrupted_ids, threshold=cfg.threshold,
                    group_first=cfg.group_first, batch_size=cfg.batch_size, progress=ctx.progress,
                    batched=cfg.batched, max_rows=cfg.max_rows, seed=cfg.seed,
                )  # fmt: skip
                out[mname][task] = {**res.to_dict(), "trace": res.trace, "model": mname}
                ctx.save_json(part, out[mname][task])
                if ctx.progress:
                    print(f"{mname} {task}: {len(res.heads)} heads {res.heads} + MLPs {res.mlps} keep "
                          f"{res.ratio:.2f} of {res.score_full:.3f} ({res.n_forward} forwards)", file=sys.stderr)  # fmt: skip
        reused = {
            m: {t: r for t, r in v.items() if t in out.get(m, {})} for m, v in reused.items() if m in out
        }
        reused = {m: v for m, v in reused.items() if v}
        if reused:
            ctx.save_json(REUSED_FILE, reused)
        ctx.state["reused_circuits"] = reused
        ctx.state["circuits"] = out
        ctx.save_json("circuits.json", out)

    def load_circuits(self, ctx: RunContext) -> None:
        """On resume: ``circuits.json`` and which circuits came from ``--reuse`` runs."""
        ctx.state["circuits"] = ctx.load_json("circuits.json")
        ctx.state["reused_circuits"] = ctx.load_json(REUSED_FILE) if ctx.exists(REUSED_FILE) else {}

    def _lent_circuit(self, ctx: RunContext, mname: str, task: str) -> tuple[Any, dict[str, Any]] | None:
        """(run directory, circuit) of ``mname`` on ``task`` from the first ``--reuse`` run that pruned it
        under the same settings: its config agrees on :data:`CIRCUIT_KEY`, its models include ``mname``,
        its ``circuits.json`` holds the circuit and its ``prompts.json`` kept the same prompts (rows) for
        the task. None when no run lends it (it is pruned here)."""
        mine = config_dict(ctx.config)
        rows = ctx.state["prompts"][mname][task]["rows"]
        for lender, values in ctx.reuse:
            models = [m.strip() for m in str(values.get("models") or values.get("model") or "").split(",")]
            if mname not in models or any(values.get(f) != mine.get(f) for f in CIRCUIT_KEY):
                continue
            if not ((lender / "circuits.json").exists() and (lender / "prompts.json").exists()):
                continue
            try:
                circuits = json.loads((lender / "circuits.json").read_text())
                prompts = json.loads((lender / "prompts.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"--reuse {lender}: cannot read its circuits: {e}") from e
            c = circuits.get(mname, {}).get(task)
            if c is None or prompts.get(mname, {}).get(task, {}).get("rows") != rows:
                continue
            return lender, {**c, "model": mname}
        return None

    # ------------------------------------------------------------------------------------- edges
    def edges(self, ctx: RunContext) -> None:
        from ..circuits.pruning import path_patch_edges

        cfg = ctx.config
        out: dict[str, dict[str, Any]] = {}
        for mname, hm in ctx.state["hms"].items():
            out[mname] = {}
            for task in self._main(ctx):
                c = ctx.state["circuits"][mname][task]
                ranked = _rank_nodes(c)
                nodes = ranked[: cfg.max_edge_nodes]
                ps = ctx.state["sets"][mname][task]
                edges = path_patch_edges(
                    hm, ps.clean_ids, ps.corrupted_ids, ps.metric(), senders=nodes,
                    receivers=[*nodes, "logits"], inputs=("qkv",), progress=ctx.progress,
                )  # fmt: skip
                edges.sort(key=lambda e: -abs(e["effect"]))
                out[mname][task] = {"nodes": nodes, "n_circuit_nodes": len(ranked), "edges": edges}
        ctx.save_json("edges.json", out)

    # ------------------------------------------------------------------------------ faithfulness
    def faithfulness(self, ctx: RunContext) -> None:
        from ..circuits.attribution import attribute_nodes
        from ..circuits.faithfulness import Circuit, Faithfulness

        cfg = ctx.config
        out: dict[str, dict[str, Any]] = {}
        for mname, hm in ctx.state["hms"].items():
            out[mname] = {}
            for task in self._main(ctx):
                ps = ctx.state["sets"][mname][task]
                c = ctx.state["circuits"][mname][task]
                metric = ps.metric()
                fa = Faithfulness(hm, ps.clean_ids, metric, ablation="mean", reference=ps.corrupted_ids,
                                  batch_size=cfg.batch_size, seed=cfg.seed)  # fmt: skip
                circuit = Circuit(heads=list(c["heads"]), mlps=list(c["mlps"]))
                rb = fa.random_baseline(circuit, n=cfg.n_random_circuits, seed=cfg.seed)
                f_c = rb["faithfulness"]
                attr = attribute_nodes(hm, ps.clean_ids, ps.corrupted_ids, metric, method="eap", resid=True,
                                       batch_size=cfg.batch_size)  # fmt: skip
                ev = fa.evaluate(attr, n_random=max(cfg.n_random, 1), seed=cfg.seed)
                out[mname][task] = {
                    "faithfulness": f_c, "m_full": fa.m_full, "m_empty": fa.m_empty,
                    "random_same_size": {k: rb[k] for k in ("random", "random_mean", "random_std", "p_value")},
                    "cpr": ev["cpr"], "cmd": ev["cmd"], "random_cpr": ev["random_cpr"],
                    "random_cmd": ev["random_cmd"], "curve_signed": ev["curve_signed"],
                    "curve_absolute": ev["curve_absolute"], "random_curves": ev["random_curves"],
                    "attribution": {"heads": attr.heads.tolist(), "mlps": attr.mlps.tolist(),
                                    "resid": attr.resid.tolist() if attr.resid is not None else None},
                }  # fmt: skip
        ctx.state["faithfulness"] = out
        ctx.save_json("faithfulness.json", out)

    # ------------------------------------------------------------------------------------ shared
    def shared(self, ctx: RunContext) -> None:
        from ..circuits.faithfulness import Circuit, Faithfulness
        from ..circuits.pruning import component_means
        from ..circuits.roles import member_attention, successor_scores

        cfg = ctx.config
        main = self._main(ctx)
        tasks_by_name = {t.name: t for t in [*ctx.state["task_objs"][0], *ctx.state["task_objs"][1]]}
        out: dict[str, dict[str, Any]] = {}
        for mname, hm in ctx.state["hms"].items():
            circ = ctx.state["circuits"][mname]
            comps = {t: _components(circ[t]) for t in main}
            iou = [[_iou(comps[a], comps[b]) for b in main] for a in main]
            shared = set.intersection(*comps.values()) if comps else set()
            all_comp = [f"{L}.{h}" for L in range(hm.cfg.n_layers) for h in range(hm.cfg.n_heads)]
            all_comp += [f"mlp.{L}" for L in range(hm.cfg.n_layers)]
            rng = random.Random(cfg.seed)
            # expected IoU of random sets with the circuits' sizes (the chance overlap)
            rand_iou = []
            for _ in range(20):
                rs = {t: set(rng.sample(all_comp, len(comps[t]))) for t in main}
                rand_iou.append(sum(_iou(rs[a], rs[b]) for i, a in enumerate(main) for b in main[i + 1 :]))
            n_pairs = max(1, len(main) * (len(main) - 1) // 2)
            mean_iou = sum(iou[i][j] for i in range(len(main)) for j in range(i + 1, len(main))) / n_pairs
            sh = Circuit.from_components(shared)
            rand_shared = [len(set.intersection(*[set(rng.sample(all_comp, len(comps[t]))) for t in main]))
                           for _ in range(20)]  # fmt: skip
            entry: dict[str, Any] = {
                "heads": sh.heads, "mlps": sh.mlps, "iou": iou, "tasks": main, "mean_iou": mean_iou,
                "random_mean_iou": sum(rand_iou) / len(rand_iou) / n_pairs,
                "random_shared_size": sum(rand_shared) / len(rand_shared), "size": len(sh),
            }  # fmt: skip
            # faithfulness of the shared sub-circuit on each task
            entry["faithfulness"] = {}
            for t in main:
                ps = ctx.state["sets"][mname][t]
                fa = Faithfulness(hm, ps.clean_ids, ps.metric(), ablation="mean", reference=ps.corrupted_ids,
                                  batch_size=cfg.batch_size)  # fmt: skip
                entry["faithfulness"][t] = fa(sh)
            # head roles (every head: the cross-model matching uses them), member attention per task
            roles: dict[str, dict[str, list]] = {}
            for t in main:
                succ, copy = successor_scores(hm, tasks_by_name[t])
                att = member_attention(hm, ctx.state["sets"][mname][t], batch_size=cfg.batch_size)
                roles[t] = {
                    "successor": succ.tolist(),
                    "copy": copy.tolist(),
                    "member_attention": att.tolist(),
                }
            entry["roles"] = roles
            entry["shared_roles"] = {
                h: {
                    k: sum(roles[t][k][int(h.split(".")[0])][int(h.split(".")[1])] for t in main) / len(main)
                    for k in ("successor", "copy", "member_attention")
                }
                for h in sh.heads
            }
            # ablation test: shared sub-circuit vs random sets of the same size, mean-ablated; and the
            # same test restricted to its heads (vs random head sets of as many heads)
            test: dict[str, Any] = {}
            test_heads: dict[str, Any] = {}
            for t, ps in ctx.state["sets"][mname].items() if len(sh) else ():
                if not len(ps):  # an other task the model passes no prompt of (competence filter)
                    test[t] = {"main_task": False, "n_prompts": 0, "note": "no competent prompt"}
                    continue
                means = component_means(hm, ps.corrupted_ids, cfg.batch_size)
                kw: dict[str, Any] = {
                    "n_random": cfg.n_random_ablation,
                    "rng": rng,
                    "batch_size": cfg.batch_size,
                    "means": means,
                }
                test[t] = {"main_task": t in main, **ablation_test(hm, ps, sh.heads, sh.mlps, **kw)}
                if sh.heads:
                    test_heads[t] = {"main_task": t in main, **ablation_test(hm, ps, sh.heads, [], **kw)}
            entry["ablation_test"] = test
            entry["ablation_test_heads"] = test_heads
            out[mname] = entry
        ctx.state["shared"] = out
        ctx.save_json("shared.json", out)

    # ------------------------------------------------------------------------------- cross-model
    def cross_model(self, ctx: RunContext) -> None:
        from ..circuits.roles import match_roles

        cfg = ctx.config
        main = self._main(ctx)
        hms = ctx.state["hms"]
        depth: dict[str, dict[str, Any]] = {}
        for mname, hm in hms.items():
            nL = hm.cfg.n_layers
            depth[mname] = {}
            for t in main:
                c = ctx.state["circuits"][mname][t]
                depth[mname][t] = {
                    "heads": [int(h.split(".")[0]) / max(nL - 1, 1) for h in c["heads"]],
                    "mlps": [m / max(nL - 1, 1) for m in c["mlps"]],
                }
        names = list(hms)
        matches = []
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                sa, sb = ctx.state["shared"][a], ctx.state["shared"][b]
                ra, rb = sa["shared_roles"], sb["shared_roles"]
                if not ra or not rb:
                    matches.append(
                        {"models": [a, b], "pairs": [], "note": "a shared sub-circuit has no head"}
                    )
                    continue
                m = match_roles(
                    ra, rb, min_score=cfg.role_min_score, max_distance=cfg.role_max_distance,
                    null_a=_mean_roles(sa["roles"], main), null_b=_mean_roles(sb["roles"], main),
                    seed=cfg.seed,
                )  # fmt: skip
                nA, nB = hms[a].cfg.n_layers, hms[b].cfg.n_layers
                for p in m["pairs"]:
                    x, y = p["heads"]
                    p[a], p[b] = x, y
                    p["relative_depth"] = [
                        int(x.split(".")[0]) / max(nA - 1, 1),
                        int(y.split(".")[0]) / max(nB - 1, 1),
                    ]
                matches.append({"models": [a, b], **m})
        out = {"relative_depth": depth, "role_matches": matches}
        ctx.state["cross_model"] = out
        ctx.save_json("cross_model.json", out)

    # ------------------------------------------------------------------------------------- plots
    def plots(self, ctx: RunContext) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        main = self._main(ctx)
        for mname, hm in ctx.state["hms"].items():
            safe = mname.replace("/", "_")
            fa = ctx.state["faithfulness"][mname]
            fig, axes = plt.subplots(1, len(main), figsize=(4.2 * len(main), 3.6), squeeze=False)
            for ax, t in zip(axes[0], main):
                im = ax.imshow(
                    torch.tensor(fa[t]["attribution"]["heads"]).numpy(), aspect="auto", cmap="RdBu"
                )
                ax.set(title=f"{t}: EAP per head", xlabel="head", ylabel="layer")
                fig.colorbar(im, ax=ax)
            ctx.save_figure(f"attribution_heads_{safe}.png", fig)
            if all(fa[t]["attribution"]["resid"] is not None for t in main):
                fig, axes = plt.subplots(1, len(main), figsize=(4.2 * len(main), 3.6), squeeze=False)
                for ax, t in zip(axes[0], main):
                    im = ax.imshow(
                        torch.tensor(fa[t]["attribution"]["resid"]).numpy(), aspect="auto", cmap="RdBu"
                    )
                    ax.set(title=f"{t}: EAP resid_pre", xlabel="position", ylabel="layer")
                    fig.colorbar(im, ax=ax)
                ctx.save_figure(f"attribution_resid_{safe}.png", fig)
            fig, axes = plt.subplots(1, len(main), figsize=(4.2 * len(main), 3.4), squeeze=False)
            for ax, t in zip(axes[0], main):
                cs = fa[t]["curve_signed"]
                ax.plot(cs["fractions"], cs["faithfulness"], "o-", label=f"EAP (CPR {fa[t]['cpr']:.2f})")
                for j, rc in enumerate(fa[t]["random_curves"]):
                    ax.plot(rc["fractions"], rc["faithfulness"], "--", color="grey", alpha=0.6,
                            label="random" if j == 0 else None)  # fmt: skip
                ax.axhline(
                    fa[t]["faithfulness"],
                    color="C3",
                    lw=1,
                    label=f"pruned circuit f={fa[t]['faithfulness']:.2f}",
                )
                ax.set(xscale="log", title=t, xlabel="share of components", ylabel="faithfulness")
                ax.legend(fontsize=7)
            ctx.save_figure(f"faithfulness_{safe}.png", fig)
            sh = ctx.state["shared"][mname]
            fig, ax = plt.subplots(figsize=(3.2 + 0.5 * len(main), 3 + 0.4 * len(main)))
            im = ax.imshow(torch.tensor(sh["iou"]).numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set(xticks=range(len(main)), yticks=range(len(main)), title=f"circuit IoU ({mname})")
            ax.set_xticklabels(main, rotation=45, ha="right")
            ax.set_yticklabels(main)
            for i in range(len(main)):
                for j in range(len(main)):
                    ax.text(j, i, f"{sh['iou'][i][j]:.2f}", ha="center", va="center", color="w", fontsize=8)
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            ctx.save_figure(f"iou_{safe}.png", fig)
            if ctx.config.patching:
                from ..circuits.patching import patch_sweep

                fig, axes = plt.subplots(1, len(main), figsize=(4.2 * len(main), 3.6), squeeze=False)
                for ax, t in zip(axes[0], main):
                    ps = ctx.state["sets"][mname][t]
                    res = patch_sweep(hm, ps.clean_ids, ps.corrupted_ids, ps.metric(), sweep="heads")
                    im = ax.imshow(res.values.cpu().numpy(), aspect="auto", cmap="RdBu")
                    ax.set(title=f"{t}: patch clean head into corrupted", xlabel="head", ylabel="layer")
                    fig.colorbar(im, ax=ax)
                ctx.save_figure(f"patching_heads_{safe}.png", fig)
        if "cross_model" in ctx.state:
            depth = ctx.state["cross_model"]["relative_depth"]
            fig, axes = plt.subplots(1, len(main), figsize=(4.2 * len(main), 3.4), squeeze=False)
            for ax, t in zip(axes[0], main):
                for k, m in enumerate(depth):
                    ax.hist(depth[m][t]["heads"], bins=10, range=(0, 1), alpha=0.5, label=m, color=f"C{k}")
                ax.set(title=f"{t}: circuit heads by relative depth", xlabel="layer / (n_layers - 1)")
                ax.legend(fontsize=7)
            ctx.save_figure("relative_depth.png", fig)

    # ----------------------------------------------------------------------------------- summary
    def _model_summary(self, ctx: RunContext, mname: str) -> dict[str, Any]:
        main = self._main(ctx)
        tasks = {}
        for t in main:
            p = ctx.state["prompts"][mname][t]
            c = ctx.state["circuits"][mname][t]
            f = ctx.state["faithfulness"][mname][t]
            tasks[t] = {
                "n_prompts": len(p["rows"]), "competence": p["competence"], "baseline_metric": c["score_full"],
                "circuit": {"heads": c["heads"], "mlps": c["mlps"]}, "circuit_ratio": c["ratio"],
                "faithfulness": f["faithfulness"], "cpr": f["cpr"], "cmd": f["cmd"],
                "random_faithfulness": f.get("random_same_size", {}).get("random_mean"),
                "faithfulness_p_value": f.get("random_same_size", {}).get("p_value"),
                "random_cpr": f["random_cpr"], "random_cmd": f["random_cmd"],
            }  # fmt: skip
        sh = ctx.state["shared"][mname]
        other = {
            t: ctx.state["prompts"][mname][t]["competence"]
            for t in ctx.state["prompts"][mname]
            if t not in main
        }
        return {
            "model": mname,
            "tasks": tasks,
            "other_tasks_competence": other,
            "shared": {
                "heads": sh["heads"],
                "mlps": sh["mlps"],
                "iou": sh["iou"],
                "mean_iou": sh["mean_iou"],
                "random_mean_iou": sh["random_mean_iou"],
                "faithfulness": sh["faithfulness"],
                "roles": sh["shared_roles"],
                "ablation_test": sh["ablation_test"],
                "ablation_test_heads": sh.get("ablation_test_heads", {}),
            },  # fmt: skip
        }

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        names = list(ctx.state["hms"])
        out = self._model_summary(ctx, names[0])
        if len(names) > 1:
            out["models"] = {m: self._model_summary(ctx, m) for m in names}
            out["cross_model"] = ctx.state.get("cross_model")
        if ctx.state.get("reused_circuits"):
            out["reused_circuits"] = ctx.state["reused_circuits"]
        out["run_dir"] = str(ctx.run_dir)
        return out

    def report(self, ctx: RunContext) -> None:
        """``report.html``: what was run, per model the circuits' faithfulness beside random circuits of
        the same size (with p-values) and the shared sub-circuit, the plots, top prompts and circuits."""
        import html

        from ..report.html import config_defaults, experiment_report, kv_table, records_table, value_html

        s = self.summary(ctx)
        cols = ("competence", "n_prompts", "baseline_metric", "circuit_ratio", "faithfulness",
                "random_faithfulness", "faithfulness_p_value", "cpr", "random_cpr", "cmd", "random_cmd")  # fmt: skip
        head, ex = [], []
        details: list[tuple[str, str]] = []
        for m, ms in (s.get("models") or {s["model"]: s}).items():
            rows = [{"task": t, **{k: v.get(k) for k in cols}} for t, v in ms["tasks"].items()]
            sh = ms["shared"]
            shared = kv_table([
                ("shared sub-circuit: mean IoU of the task circuits", sh["mean_iou"]),
                ("mean IoU of random circuits of the same sizes (baseline)", sh["random_mean_iou"]),
                ("faithfulness of the shared sub-circuit per task", sh["faithfulness"]),
            ])  # fmt: skip
            tests = []
            for what, key in (
                ("shared sub-circuit", "ablation_test"),
                ("its heads only", "ablation_test_heads"),
            ):
                for t, v in (sh.get(key) or {}).items():
                    tests.append({"ablated": what, "task": t, **{k: v.get(k) for k in _ABLATION_COLS if k in v},
                                  **{f"{k} (random sets, mean)": _mean(v.get(k)) for k in _RANDOM_COLS if k in v}})  # fmt: skip
            head.append(f"<h3>{html.escape(m)}</h3>" + records_table(rows) + shared
                        + "<h4>Ablation tests (vs random sets of the same size)</h4>" + records_table(tests))  # fmt: skip
            details.append((f"{m}: ablation tests in full", kv_table([
                ("shared sub-circuit", sh.get("ablation_test")), ("its heads only", sh.get("ablation_test_heads"))])))  # fmt: skip
            prompts = ctx.state.get("prompts", {}).get(m, {})
            for t, v in ms["tasks"].items():
                exs = (prompts.get(t) or {}).get("examples") or []
                ex.append(
                    f"<h3>{html.escape(m)}: {html.escape(t)}</h3>"
                    + kv_table([("top prompts (kept by the competence filter)", exs),
                                ("circuit heads", v["circuit"]["heads"]), ("circuit MLPs", v["circuit"]["mlps"])])
                )  # fmt: skip
            ex.append(
                f"<h3>{html.escape(m)}: shared sub-circuit</h3>"
                + kv_table(
                    [("heads", sh["heads"]), ("MLPs", sh["mlps"]), ("shared heads' roles", sh["roles"])]
                )
            )
        if s.get("cross_model"):
            rows2 = []
            for mm in s["cross_model"]["role_matches"]:
                a, b = mm["models"]
                rows2.append((f"{a} vs {b}", _roles_line(mm)))
                for p in mm["pairs"]:
                    rows2.append((f"{p[a]} / {p[b]}", f"distance {p['role_distance']:.3f}, roles {p['roles'][0]} / "
                                  f"{p['roles'][1]}{' (same)' if p['same_role'] else ''}"
                                  f"{'' if p['matched'] else ' (too far: not matched)'}"))  # fmt: skip
            details.append(("Cross-model role matches", kv_table(rows2)))
        other = {
            m: ms.get("other_tasks_competence") for m, ms in (s.get("models") or {s["model"]: s}).items()
        }
        details.append(("Competence on the other tasks", value_html(other)))
        experiment_report(
            ctx, self.name, self.title or "rosettalens: sequence-continuation circuits",
            config_defaults(self.config_cls), "".join(head), "".join(ex), details=details,
            models=list(s.get("models") or [s["model"]]),
        )  # fmt: skip

    def print_summary(self, summary: dict[str, Any]) -> None:
        for m, ms in (summary.get("models") or {summary["model"]: summary}).items():
            print(m)
            for t, v in ms["tasks"].items():
                c = v["circuit"]
                print(f"  {t}: competence {v['competence']:.2f} (n={v['n_prompts']}), circuit {len(c['heads'])} heads "
                      f"+ {len(c['mlps'])} MLPs, f={v['faithfulness']:.2f}{_vs_random(v)}, CPR {v['cpr']:.2f} "
                      f"(random {v['random_cpr']:.2f}), CMD {v['cmd']:.2f}")  # fmt: skip
            sh = ms["shared"]
            print(f"  shared: heads {sh['heads']} MLPs {sh['mlps']}, mean IoU {sh['mean_iou']:.2f} "
                  f"(random {sh['random_mean_iou']:.2f})")  # fmt: skip
            for key, what in (("ablation_test", "shared"), ("ablation_test_heads", "shared heads only")):
                for t, v in sh.get(key, {}).items():
                    print(f"  ablation test ({what}) {t}: {_ablation_line(v)}")
        for m in (summary.get("cross_model") or {}).get("role_matches", []):
            print(f"roles {m['models'][0]} vs {m['models'][1]}: {_roles_line(m)}")
        print(f"run directory: {summary['run_dir']} (report.html)")


def ablation_test(
    hm: Any,
    ps: Any,
    heads: list[str],
    mlps: list[int],
    n_random: int,
    rng: random.Random,
    batch_size: int = 32,
    means: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The paper's ablation test on one prompt set: mean-ablate ``heads`` and ``mlps`` (per position, the
    means over ``ps.corrupted_ids``) and ``n_random`` random sets of as many heads (drawn from every
    head) and as many MLPs (from every layer); top-1 accuracy of the next member and the mean metric on
    ``ps.clean_ids``, without and with each ablation.

    The effect of an ablation is the drop it causes (unablated minus ablated); ``p_value_accuracy`` /
    ``p_value_metric`` = ``(1 + #{random sets whose drop >= the given set's}) / (1 + n_random)`` (the
    one-sided permutation p-value, as for the pruned circuit's faithfulness); None without random sets.
    With ``mlps=[]`` every random set is heads only (the heads-only test)."""
    from ..circuits.pruning import component_means, mean_ablate, run_last_logits

    if means is None:
        means = component_means(hm, ps.corrupted_ids, batch_size)
    metric = ps.metric()

    def run(h: list[str], m: list[int]) -> tuple[float, float]:
        with mean_ablate(hm, means, h, m):
            lg = run_last_logits(hm, ps.clean_ids, batch_size)
        return float((lg[:, -1].argmax(-1).cpu() == ps.answer_ids).float().mean()), float(metric(lg).mean())

    all_h = [f"{L}.{h}" for L in range(hm.cfg.n_layers) for h in range(hm.cfg.n_heads)]
    sets: list[dict[str, Any]] = [
        {
            "heads": rng.sample(all_h, len(heads)),
            "mlps": sorted(rng.sample(range(hm.cfg.n_layers), len(mlps))),
        }
        for _ in range(n_random)
    ]
    base, abl = run([], []), run(list(heads), list(mlps))
    rand = [run(r["heads"], r["mlps"]) for r in sets]

    def p(k: int) -> float | None:
        if not rand:
            return None
        drop = base[k] - abl[k]
        return (1 + sum(base[k] - r[k] >= drop for r in rand)) / (1 + len(rand))

    return {
        "n_prompts": len(ps), "heads": list(heads), "mlps": list(mlps), "n_random": n_random,
        "accuracy": base[0], "metric": base[1],
        "accuracy_shared_ablated": abl[0], "metric_shared_ablated": abl[1],
        "accuracy_random_ablated": [r[0] for r in rand], "metric_random_ablated": [r[1] for r in rand],
        "random_sets": sets, "p_value_accuracy": p(0), "p_value_metric": p(1),
    }  # fmt: skip


_ABLATION_COLS = ("n_prompts", "accuracy", "accuracy_shared_ablated", "p_value_accuracy", "metric",
                  "metric_shared_ablated", "p_value_metric")  # fmt: skip
_RANDOM_COLS = ("accuracy_random_ablated", "metric_random_ablated")


def _mean(x: Any) -> float | None:
    """The mean of a list of numbers (None for none)."""
    return sum(x) / len(x) if isinstance(x, list) and x else None


def _ablation_line(v: dict) -> str:
    """One line of an ablation test: accuracy and metric unablated -> the set ablated, the mean over
    random sets of its size, and the p-values (``p=-`` without random sets; older runs have none)."""

    def mean(x: list) -> float:
        return sum(x) / len(x) if x else float("nan")

    def pv(k: str) -> str:
        return "-" if v.get(k) is None else f"{v[k]:.3f}"

    if "note" in v:
        return v["note"]
    size = f"{len(v['heads'])} heads + {len(v['mlps'])} MLPs; " if "heads" in v else ""
    n = len(v["accuracy_random_ablated"])
    return (f"{size}accuracy {v['accuracy']:.2f} -> {v['accuracy_shared_ablated']:.2f} ablated, "
            f"{mean(v['accuracy_random_ablated']):.2f} for {n} random sets (p={pv('p_value_accuracy')}); "
            f"metric {v['metric']:.2f} -> {v['metric_shared_ablated']:.2f}, random "
            f"{mean(v['metric_random_ablated']):.2f} (p={pv('p_value_metric')})")  # fmt: skip


def _vs_random(v: dict) -> str:
    """`` (random same size 0.12, p=0.048)`` when the summary has the random baseline (older runs do not)."""
    if v.get("faithfulness_p_value") is None:
        return ""
    return f" (random same size {v['random_faithfulness']:.2f}, p={v['faithfulness_p_value']:.3f})"


def _roles_line(m: dict) -> str:
    if not m["pairs"]:
        return m.get("note", "no pairs")
    line = f"{m['n_matched']} of {len(m['pairs'])} head pairs within distance {m['max_distance']}, {m['n_same_role']} share a role"
    if "p_value" in m:
        line += f" (random head sets {m['null_mean_same_role']:.2f}, p={m['p_value']:.3f})"
    return line


def _mean_roles(roles: dict[str, dict[str, list]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Every head's role scores averaged over ``tasks`` (``roles[task][key][L][H]``): ``{"L.H": {...}}``."""
    keys = ("successor", "copy", "member_attention")
    first = roles[tasks[0]][keys[0]]
    return {
        f"{L}.{H}": {k: sum(roles[t][k][L][H] for t in tasks) / len(tasks) for k in keys}
        for L in range(len(first))
        for H in range(len(first[L]))
    }


def _rank_nodes(c: dict) -> list[str | int]:
    """Circuit nodes, most important first: by the pruning trace's ratio when each was tried (lower =
    removing it hurt more)."""
    nodes: list[str | int] = [*c["heads"], *c["mlps"]]
    ratio: dict[Any, float] = {}
    for e in c.get("trace", []):
        ratio[e["component"]] = min(ratio.get(e["component"], float("inf")), e["ratio"])
    return sorted(nodes, key=lambda n: ratio.get(n, float("inf")))


EXPERIMENT = SeqcontExperiment()
