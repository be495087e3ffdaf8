"""``rosetta steer vector | transfer | eval``.

::

    rosetta steer vector   --model M --hook H --positive P --negative N --out FILE
                           [--method diff_of_means|pca] [--positions last|mean] [--split S] [--n-prompts N]
    rosetta steer vector   --model M --hook auto --positive harmful --negative harmless --out FILE
                           (refusal-direction selection, Arditi et al. 2024)
    rosetta steer transfer --vector FILE --mapper-dir DIR --out FILE [--method jacobian|difference] [--no-calibrate]
    rosetta steer eval     --model M --vector FILE --mode add|ablate [--scale S] --task refusal [--json]

P / N are built-in prompt sets (``harmful``, ``harmless``), ``hf:`` sets or ``.txt``/``.jsonl`` files.
Bad input prints one line on stderr and exits with status 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rosettalens import options as opt
from rosettalens.errors import ConfigError

__all__ = ["register"]


def _emit(args: argparse.Namespace, obj: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        opt.print_json(obj)
    else:
        for line in lines:
            print(line)


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def _load_model(args: argparse.Namespace):
    import rosettalens

    return rosettalens.load(
        args.model, device=args.device, dtype=args.dtype, progress=not (args.json or args.no_progress)
    )


def _vector_path(out: str) -> Path:
    """Where ``SteeringVector.save(out)`` writes (``.safetensors`` appended when missing)."""
    p = Path(out)
    if p.is_dir():
        raise ConfigError(f"--out {p} is a folder; give a file name such as {p / 'vector.safetensors'}")
    if p.suffix == ".json":
        raise ConfigError(f"--out {p}: give the .safetensors path of the vector, not its .json sidecar")
    return p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")


def _check_vector_out(out: str, overwrite: bool) -> Path:
    p = _vector_path(out)
    for f in (p, p.with_suffix(".json")):
        opt.check_output(f, overwrite, "vector file")
    return p


def _save_vector(sv: Any, path: Path, overwrite: bool) -> Path:
    return sv.save(path, overwrite=overwrite)


def _prompts(source: str, split: str | None, limit: int | None) -> list[str]:
    from rosettalens.data.tasks import BUILTIN_SETS, load_prompts

    if split is None:
        split = "train" if source in BUILTIN_SETS else None
    return load_prompts(source, split, limit=limit)


# ---------------------------------------------------------------------------------------------- vector
def _cmd_vector(args: argparse.Namespace) -> int:
    from rosettalens.data.tasks import load_prompts
    from rosettalens.steering.refusal import select_refusal_direction
    from rosettalens.steering.vectors import compute_vector

    positions: Any = args.positions
    if positions not in ("last", "mean"):
        try:
            positions = int(positions)
        except ValueError:
            raise ConfigError(
                f"--positions must be last, mean or a negative int, got {positions!r}"
            ) from None
        if positions >= 0:
            raise ConfigError(f"--positions must be last, mean or a negative int, got {positions}")
    out = _check_vector_out(args.out, args.overwrite)
    opt.check_prompt_spec(args.positive, "--positive")
    opt.check_prompt_spec(args.negative, "--negative")
    if args.hook != "auto":
        opt.check_hooks([args.hook], "--hook")
    opt.check_models([args.model])
    if args.hook != "auto":
        opt.check_hook_layers(args.model, [args.hook], "--hook")
    _seed(args.seed)
    src = {"positive": args.positive, "negative": args.negative}
    if args.hook == "auto":
        lim_val = args.n_prompts if args.n_prompts is None else max(1, args.n_prompts // 3)
        pos_tr = load_prompts(args.positive, "train", limit=args.n_prompts)
        neg_tr = load_prompts(args.negative, "train", limit=args.n_prompts)
        pos_va = load_prompts(args.positive, "val", limit=lim_val)
        neg_va = load_prompts(args.negative, "val", limit=lim_val)
        hm = _load_model(args)
        sel = select_refusal_direction(
            hm,
            pos_tr,
            neg_tr,
            pos_va,
            neg_va,
            kl_threshold=args.kl_threshold,
            induce_check=args.induce_check,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            source=src,
        )
        sv = sel.vector
        sv.source["candidates"] = sel.candidates
    else:
        pos = _prompts(args.positive, args.split, args.n_prompts)
        neg = _prompts(args.negative, args.split, args.n_prompts)
        hm = _load_model(args)
        sv = compute_vector(
            hm,
            pos,
            neg,
            args.hook,
            method=args.method,
            positions=positions,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            source={**src, "split": args.split},
        )
    path = _save_vector(sv, out, args.overwrite)
    obj = {
        "out": str(path),
        "model": sv.model,
        "hook": sv.hook,
        "d_model": sv.d_model,
        "kind": sv.kind,
        "norm": sv.norm,
    }
    if sv.kind == "refusal":
        obj.update(layer=sv.source["layer"], bypass=sv.source["bypass"], kl=sv.source["kl"])
    _emit(
        args,
        obj,
        [
            f"wrote {path}: {sv.kind} vector of {sv.model} at {sv.hook}, d_model {sv.d_model}, norm {sv.norm:.4g}"
        ],
    )
    return 0


# ---------------------------------------------------------------------------------------------- transfer
def _cmd_transfer(args: argparse.Namespace) -> int:
    import warnings

    from rosettalens.steering.transfer import transfer
    from rosettalens.steering.vectors import SteeringVector

    dest = _check_vector_out(args.out, args.overwrite)
    sv = SteeringVector.load(args.vector)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = transfer(
            sv,
            args.mapper,
            method=args.method,
            calibrate=not args.no_calibrate,
            target_model=args.target_model,
            target_hook=args.target_hook,
        )
    for w in caught:
        print(f"rosetta: warning: {w.message}", file=sys.stderr)
    path = _save_vector(out, dest, args.overwrite)
    obj = {
        "out": str(path),
        "source_model": sv.model,
        "source_hook": sv.hook,
        "model": out.model,
        "hook": out.hook,
        "d_model": out.d_model,
        "norm": out.norm,
        "source_norm": sv.norm,
        "mapper_kind": out.source["mapper"]["kind"],
        "rule": out.source["rule"],
        "calibrate": out.source["calibrate"],
    }
    _emit(
        args,
        obj,
        [
            f"wrote {path}: {sv.model}:{sv.hook} (d {sv.d_model}) -> {out.model}:{out.hook} (d {out.d_model}) "
            f"through a {obj['mapper_kind']} mapper, norm {sv.norm:.4g} -> {out.norm:.4g}"
        ],
    )
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _cmd_eval(args: argparse.Namespace) -> int:
    from rosettalens.data.tasks import BUILTIN_SETS, load_prompts
    from rosettalens.steering.evaluate import evaluate_refusal
    from rosettalens.steering.vectors import SteeringVector

    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give a .json file name")
        opt.check_output(out, args.overwrite, "results file")
    for spec, what in ((args.harmful_eval, "--harmful-eval"), (args.harmless_eval, "--harmless-eval")):
        opt.check_prompt_spec(spec, what)
    opt.check_models([args.model])
    _seed(args.seed)
    sv = SteeringVector.load(args.vector)
    # built-in sets: their held-out test split; files and hf: sets: every prompt
    harmful = load_prompts(
        args.harmful_eval, "test" if args.harmful_eval in BUILTIN_SETS else None, limit=args.n_prompts
    )
    harmless = load_prompts(
        args.harmless_eval, "test" if args.harmless_eval in BUILTIN_SETS else None, limit=args.n_prompts
    )
    hm = _load_model(args)
    sv.check_compatible(hm)
    res = evaluate_refusal(
        hm,
        sv,
        mode=args.mode,
        scale=args.scale,
        positions=args.positions,
        harmful=harmful,
        harmless=harmless,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed if args.seed is not None else 0,
        random_baseline=not args.no_random,
        progress=not args.no_progress,
    )
    res["vector_file"] = args.vector
    res["harmful_eval"] = args.harmful_eval
    res["harmless_eval"] = args.harmless_eval
    if args.out:
        from rosettalens.io import atomic_write_text

        atomic_write_text(Path(args.out), opt.to_json(res, indent=2) + "\n", overwrite=args.overwrite)
    h, s = res["harmful"], res["harmless"]
    lines = [
        f"{res['model']}: {args.mode} {sv.kind} vector at {sv.hook}"
        + (f" (scale {args.scale})" if args.mode == "add" else ""),
        f"refusal rate on {res['n_harmful']} harmful prompts:  baseline {h['baseline']:.2f}  steered {h['steered']:.2f}"
        + (f"  random {h['random']:.2f}" if "random" in h else ""),
        f"refusal rate on {res['n_harmless']} harmless prompts: baseline {s['baseline']:.2f}  steered {s['steered']:.2f}"
        + (f"  random {s['random']:.2f}" if "random" in s else ""),
        "KL on harmless prompts: " + "  ".join(f"{k} {v:.4f}" for k, v in res["kl_harmless"].items()),
    ]
    _emit(args, res, lines)
    return 0


# ---------------------------------------------------------------------------------------------- register
def _common(p: argparse.ArgumentParser) -> None:
    opt.add_device(p)
    opt.add_dtype(p)
    opt.add_seed(p)
    opt.add_batch_size(p, 16, "prompts")
    opt.add_no_progress(p)
    opt.add_json(p)


VECTOR_OUT = "output .safetensors file (a .json sidecar is written beside it)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``steer`` with its ``vector``, ``transfer`` and ``eval`` subcommands."""
    steer = subparsers.add_parser(
        "steer", help="steering vectors: compute, transfer through a mapper, evaluate"
    )
    sub = steer.add_subparsers(dest="steer_command", metavar="{vector,transfer,eval}")
    sub.required = True

    v = sub.add_parser(
        "vector", help="compute a contrastive steering vector (or select the refusal direction)"
    )
    opt.add_model(v)
    opt.add_hook(
        v, help="hook point, e.g. resid_pre.10; 'auto' selects the refusal direction (Arditi et al.)"
    )
    opt.add_option(v, "--positive", required=True, type=opt.data_spec, metavar="P",
                   help="prompts the vector points towards: harmful, harmless, hf:ID or a .txt/.jsonl file")  # fmt: skip
    opt.add_option(v, "--negative", required=True, type=opt.data_spec, metavar="N",
                   help="prompts the vector points away from (same forms as --positive)")  # fmt: skip
    opt.add_out(v, VECTOR_OUT, metavar="FILE")
    opt.add_overwrite(v, "an existing vector file")
    opt.add_option(v, "--method", choices=["diff_of_means", "pca"], default="diff_of_means",
                   help="difference of the two sets' means, or the first principal component of the "
                   "paired differences (default: diff_of_means)")  # fmt: skip
    opt.add_option(v, "--positions", default="last", metavar="last|mean|-K",
                   help="the token read per prompt: the last, the mean over the prompt, or a negative "
                   "offset such as -2 (default: last)")  # fmt: skip
    opt.add_option(v, "--split", choices=["train", "val", "test", "all"], default=None,
                   help="split of the prompt sets (default: train for built-in sets, every prompt of a file)")  # fmt: skip
    opt.add_n_prompts(v, None, "at most N prompts per set, balanced over categories", aliases=("--limit",))
    opt.add_option(v, "--kl-threshold", type=opt.positive_float, default=0.1, metavar="X",
                   help="--hook auto: KL bound on harmless prompts (default: 0.1)")  # fmt: skip
    opt.add_option(v, "--induce-check", action="store_true",
                   help="--hook auto: also require that adding the direction induces refusal")  # fmt: skip
    _common(v)
    v.set_defaults(func=_cmd_vector)

    t = sub.add_parser("transfer", help="carry a steering vector into another model's space through a mapper")
    opt.add_option(t, "--vector", required=True, type=opt.path, metavar="FILE",
                   help="steering vector .safetensors file (rosetta steer vector)")  # fmt: skip
    opt.add_option(t, "--mapper-dir", dest="mapper", required=True, type=opt.path, metavar="DIR",
                   help="mapper folder written by `rosetta map train`", aliases=("--mapper",))  # fmt: skip
    opt.add_out(t, VECTOR_OUT, metavar="FILE")
    opt.add_overwrite(t, "an existing vector file")
    opt.add_option(t, "--method", choices=["jacobian", "difference"], default="jacobian",
                   help="rule for non-linear mappers: the mapper's Jacobian at the mean source activation, or "
                   "map(mean + v) - map(mean) (default: jacobian)")  # fmt: skip
    opt.add_option(t, "--no-calibrate", action="store_true",
                   help="do not rescale the vector to the target's activation norms")  # fmt: skip
    opt.add_model(t, "--target-model", required=False,
                  help="override the mapper's recorded target model name (default: the mapper's)")  # fmt: skip
    opt.add_hook(t, "--target-hook", required=False,
                 help="override the mapper's recorded target hook (default: the mapper's)")  # fmt: skip
    opt.add_json(t)
    t.set_defaults(func=_cmd_transfer)

    e = sub.add_parser(
        "eval", help="refusal rates with the vector applied, against a random direction of equal norm"
    )
    opt.add_model(e)
    opt.add_option(e, "--vector", required=True, type=opt.path, metavar="FILE",
                   help="steering vector .safetensors file")  # fmt: skip
    opt.add_option(e, "--mode", choices=["add", "ablate"], required=True,
                   help="add the scaled vector to the hook's activations, or project its direction out")  # fmt: skip
    opt.add_option(e, "--scale", type=opt.finite_float, default=1.0, metavar="X",
                   help="--mode add: multiplier of the vector (default: 1)")  # fmt: skip
    opt.add_option(e, "--positions", choices=["all", "prompt", "generated"], default="all",
                   help="--mode add: the positions the vector is added at (default: all)")  # fmt: skip
    opt.add_option(e, "--task", choices=["refusal"], default="refusal",
                   help="what is measured: refusal rates on harmful and harmless prompts (default: refusal)")  # fmt: skip
    opt.add_option(e, "--harmful-eval", default="harmful", type=opt.data_spec, metavar="P",
                   help="harmful prompts (default: the built-in set's test split)")  # fmt: skip
    opt.add_option(e, "--harmless-eval", default="harmless", type=opt.data_spec, metavar="P",
                   help="harmless prompts (default: the built-in set's test split)")  # fmt: skip
    opt.add_n_prompts(e, None, "at most N prompts per set", aliases=("--limit",))
    opt.add_max_new_tokens(e, 32)
    opt.add_option(e, "--no-random", action="store_true", help="skip the random-direction baseline")
    opt.add_out(e, "also write the results JSON to this file", required=False, metavar="FILE")
    opt.add_overwrite(e, "an existing --out file")
    _common(e)
    e.set_defaults(func=_cmd_eval)
