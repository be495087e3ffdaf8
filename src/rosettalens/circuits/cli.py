"""``rosetta circuits patch``: an activation-patching sweep on one model.

::

    rosetta circuits patch --model M --clean TEXT --corrupted TEXT --sweep KIND [--json] [--out DIR]
    rosetta circuits patch --model M --task months [--n-prompts 8] --sweep KIND [--json] [--out DIR]

KIND: resid_pre | attn_out | mlp_out (layer x position), heads | q | k | v (layer x head, with
``--by-position`` also per position; k/v per key-value head). With ``--clean``/``--corrupted`` the
metric is ``logit(answer) - logit(wrong)`` at the last position (``--answer``/``--wrong``: one token
each; by default the clean and the corrupted run's top predictions); with ``--task`` it is the task's
``logit(next member) - logit(last member)``. ``--out DIR`` writes ``patch.safetensors`` (values,
per-prompt values, clean and corrupted metrics), ``patch.json`` and ``patch.png`` (the heat map).
Bad input (prompts of unequal token length, an unknown sweep kind, an answer that is not one token)
prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rosettalens import options as opt
from rosettalens.errors import ConfigError, DataError, ShapeError

__all__ = ["register"]


def _single_token(hm: Any, text: str, what: str) -> int:
    ids = hm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise DataError(
            f"--{what} {text!r} is {len(ids)} tokens for {hm.name}; give one token (e.g. ' Paris')"
        )
    return int(ids[0])


def _text_inputs(hm: Any, args: argparse.Namespace) -> tuple[Any, Any, Any, dict]:
    clean = hm.tokenize(args.clean)["input_ids"]
    corrupted = hm.tokenize(args.corrupted)["input_ids"]
    if clean.shape != corrupted.shape:
        raise ShapeError(
            f"clean and corrupted prompts must have the same token length for {hm.name}: "
            f"{clean.shape[1]} vs {corrupted.shape[1]} tokens"
        )
    if args.answer is not None:
        answer = _single_token(hm, args.answer, "answer")
    else:
        answer = int(hm.forward(clean)[0, -1].argmax())
    if args.wrong is not None:
        wrong = _single_token(hm, args.wrong, "wrong")
    else:
        top = hm.forward(corrupted)[0, -1].topk(2).indices.tolist()
        wrong = top[0] if top[0] != answer else top[1]
    if wrong == answer:
        raise ConfigError("--answer and --wrong are the same token")

    def metric(logits: Any) -> Any:  # [batch, pos, vocab] -> [batch]
        return logits[:, -1, answer] - logits[:, -1, wrong]

    info = {
        "clean": args.clean,
        "corrupted": args.corrupted,
        "metric": "logit(answer) - logit(wrong) at the last position",
        "answer": hm.tokenizer.decode([answer]),
        "wrong": hm.tokenizer.decode([wrong]),
    }
    return clean, corrupted, metric, info


def _task_inputs(hm: Any, args: argparse.Namespace) -> tuple[Any, Any, Any, dict]:
    try:
        from rosettalens.circuits.tasks import load_task, make_prompts
    except ImportError as e:  # pragma: no cover - tasks ship with the package
        raise ConfigError(f"--task needs rosettalens.circuits.tasks ({e})") from e
    prompts = make_prompts(
        hm, load_task(args.task), n=args.n_prompts, seed=args.seed or 0, templates=args.templates
    )
    info = {
        "task": args.task,
        "n_prompts": len(prompts),
        "metric": "logit(next member) - logit(last shown member) at the last position",
        "examples": prompts.texts[:3],
        "corrupted_examples": prompts.corrupted_texts[:3],
    }
    return prompts.clean_ids, prompts.corrupted_ids, prompts.metric("logit_diff"), info


def is_patch_dir(path: Path) -> bool:
    """True for a folder that ``circuits patch --out`` wrote: the only kind ``--overwrite`` replaces."""
    names = {"patch.safetensors", "patch.json", "patch.png"}
    return path.is_dir() and {p.name for p in path.iterdir()} <= names


def _write_out(out: Path, res: Any, payload: dict, overwrite: bool) -> None:
    """``patch.safetensors`` + ``patch.json`` + ``patch.png`` into ``out``, built in a temp sibling and swapped in whole."""
    from safetensors.torch import save_file

    from rosettalens.io import atomic_dir

    with atomic_dir(
        out.resolve(), overwrite=overwrite, what="patch result folder", replaceable=is_patch_dir
    ) as tmp:
        save_file(
            {
                "values": res.values.contiguous(),
                "per_prompt": res.per_prompt.contiguous(),
                "clean": res.clean.contiguous(),
                "corrupted": res.corrupted.contiguous(),
            },
            str(tmp / "patch.safetensors"),
            metadata={"sweep": res.sweep, "axes": ",".join(res.axes)},
        )
        (tmp / "patch.json").write_text(opt.to_json(payload, indent=2) + "\n")
        _heatmap(tmp / "patch.png", res, payload.get("model", ""))


def _heatmap(path: Path, res: Any, model: str) -> None:
    """``patch.png``: the patching result as a heat map, layers down and positions or heads across
    (values normalised: 0 = corrupted, 1 = clean restored, when the two metrics differ)."""
    from rosettalens.report.html import pyplot

    norm = res.normalized() if res.clean_metric != res.corrupted_metric else res.values
    grid = norm.detach().double().reshape(norm.shape[0], -1).cpu().numpy()
    plt = pyplot()
    rows, cols = grid.shape
    fig, ax = plt.subplots(figsize=(min(12.0, 2.5 + 0.45 * cols), min(9.0, 1.8 + 0.35 * rows)))
    lim = max(1.0, float(abs(grid).max())) if grid.size else 1.0
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_ylabel("layer")
    ax.set_yticks(range(rows), [str(x) for x in res.labels.get("layer", range(rows))])
    across = res.axes[1] if len(res.axes) > 1 else ""
    ticks = res.labels.get("tokens") or [str(x) for x in res.labels.get(across, range(cols))]
    if len(ticks) == cols:
        ax.set_xticks(range(cols), [str(t)[:8] for t in ticks], rotation=60 if across == "position" else 0)
    ax.set_xlabel(across)
    ax.set_title(f"{model}: {res.sweep} patching (1 = clean restored)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _table(res: Any) -> list[str]:
    """The normalised grid as text: one row per layer."""
    norm = res.normalized() if res.clean_metric != res.corrupted_metric else res.values
    lines = []
    if len(res.axes) == 2:
        cols = res.labels.get("tokens") or [str(x) for x in res.labels[res.axes[1]]]
        head = " ".join(f"{str(c)[:7]:>7}" for c in cols)
        lines.append(f"{'layer':>5} {head}")
        for i, lay in enumerate(res.labels["layer"]):
            lines.append(f"{lay:>5} " + " ".join(f"{float(v):7.3f}" for v in norm[i]))
    return lines


def _cmd_patch(args: argparse.Namespace) -> int:
    import torch

    import rosettalens
    from rosettalens.circuits.patching import patch_sweep

    if (args.task is None) == (args.clean is None and args.corrupted is None):
        raise ConfigError("give either --clean TEXT and --corrupted TEXT, or --task NAME")
    if args.task is None and (args.clean is None or args.corrupted is None):
        raise ConfigError("--clean and --corrupted go together")
    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    if args.task is not None:
        from rosettalens.circuits.tasks import load_task

        load_task(args.task)  # an unknown task or a broken task file fails before the model loads
    if args.out:
        opt.check_output(args.out, args.overwrite, "patch result folder", replaceable=is_patch_dir)
    opt.check_models([args.model])
    if layers:
        opt.check_layers(args.model, layers, "--layers")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    hm = rosettalens.load(
        args.model, device=args.device, dtype=args.dtype, progress=not (args.json or args.no_progress)
    )
    clean, corrupted, metric, info = _task_inputs(hm, args) if args.task else _text_inputs(hm, args)
    t0 = time.perf_counter()
    res = patch_sweep(
        hm,
        clean,
        corrupted,
        metric,
        args.sweep,
        layers=layers,
        by_position=args.by_position,
        memory_budget=args.memory_budget * 2**20,
        last_logits_only=True,  # both metrics read the last position only
        progress=not args.json and not args.no_progress and sys.stderr.isatty(),
    )
    elapsed = time.perf_counter() - t0
    payload = {"model": hm.name, **info, **res.to_dict(), "seconds": round(elapsed, 3)}
    payload["top"] = [{**where, "value": v} for where, v in res.top(5)]
    if args.out:
        _write_out(Path(args.out), res, payload, args.overwrite)
        payload["out"] = str(Path(args.out).resolve())
    if args.json:
        opt.print_json(payload)
        return 0
    print(
        f"{hm.name}: {args.sweep} sweep {'x'.join(map(str, res.values.shape))} ({', '.join(res.axes)}), "
        f"{res.meta['patches']} patches in {res.meta['forwards']} forwards, {elapsed:.1f} s"
    )
    print(
        f"metric clean {res.clean_metric:.4f}, corrupted {res.corrupted_metric:.4f}; "
        "values below: 0 = corrupted, 1 = clean restored"
    )
    for line in _table(res):
        print(line)
    if res.kv_groups is not None:
        print("kv heads -> query heads: " + "; ".join(f"{k}: {v}" for k, v in res.kv_groups.items()))
    print(
        "top: "
        + "; ".join(", ".join(f"{k} {v}" for k, v in w.items()) + f" -> {val:.4f}" for w, val in res.top(5))
    )
    if args.out:
        print(f"wrote {payload['out']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``circuits`` with its ``patch`` subcommand."""
    from rosettalens.circuits.patching import SWEEPS
    from rosettalens.circuits.tasks import BUILTIN_TASKS

    circuits = subparsers.add_parser("circuits", help="circuits: activation patching sweeps")
    sub = circuits.add_subparsers(dest="circuits_command", metavar="{patch}")
    sub.required = True
    p = sub.add_parser("patch", help="activation patching sweep: layer x position or layer x head")
    opt.add_model(p)
    opt.add_option(p, "--clean", default=None, metavar="TEXT", help="clean prompt text")
    opt.add_option(p, "--corrupted", default=None, metavar="TEXT",
                   help="corrupted prompt text (the same token length as --clean)")  # fmt: skip
    opt.add_option(p, "--task", default=None, choices=list(BUILTIN_TASKS),
                   help="a built-in sequence task instead of --clean/--corrupted")  # fmt: skip
    opt.add_n_prompts(p, 8, "--task: prompts to average over")
    opt.add_option(p, "--templates", choices=["paper", "bare"], default=None,
                   help="--task: only the paper's templates (names and verbs) or only the bare list "
                   "(default: both)")  # fmt: skip
    opt.add_option(p, "--answer", default=None, metavar="TOKEN",
                   help="the clean answer, one token such as ' Paris' (default: the clean run's top-1)")  # fmt: skip
    opt.add_option(p, "--wrong", default=None, metavar="TOKEN",
                   help="the competing token (default: the corrupted run's top-1)")  # fmt: skip
    opt.add_option(p, "--sweep", required=True, choices=list(SWEEPS),
                   help="what to patch: resid_pre, attn_out, mlp_out (layer x position) or heads, q, k, v "
                   "(layer x head; k and v per key-value head)")  # fmt: skip
    opt.add_option(p, "--by-position", action="store_true", help="heads/q/k/v: each position separately")
    opt.add_option(p, "--layers", default=None, metavar="L[,L..]",
                   help="comma-separated layers, negative from the end (default: every layer)")  # fmt: skip
    opt.add_option(p, "--memory-budget", type=opt.positive_float, default=1024, metavar="MIB",
                   help="MiB of activations per batched forward (default: 1024)")  # fmt: skip
    opt.add_device(p)
    opt.add_dtype(p)
    opt.add_seed(p, None, "random seed of the task's prompts (default: 0)")
    opt.add_out(p, "folder for patch.safetensors, patch.json and the heat map patch.png", required=False)
    opt.add_overwrite(p)
    opt.add_no_progress(p)
    opt.add_json(p)
    p.set_defaults(func=_cmd_patch)
