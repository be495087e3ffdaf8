"""``rosetta crosscoder train | eval``.

::

    rosetta crosscoder train --models A,B (--hook H | --hooks HA,HB) --data D --out DIR [--width N] [--k K]
                             [--arch batchtopk|l1] [--max-tokens N] [--epochs E] ... [--json]
    rosetta crosscoder eval  --crosscoder DIR --data D [--models A,B] [--max-tokens N] [--no-splice] [--json]

``train`` runs both models over ``D``'s documents, pairs their activations (by position with one
tokenizer, by character ends with two), leaves out the first ``--skip-first`` positions and norm
outliers (the sink rule, recorded in the crosscoder and applied again by ``eval``), trains one
crosscoder on the documents before the last ``--heldout`` fraction and evaluates it on those. Under
``torchrun --nproc_per_node N`` the ranks share the extraction's forward passes and then all hold the
pairs one process extracts (:func:`rosettalens.crosscoder.extract_pairs`), training is data parallel
(:mod:`rosettalens.crosscoder.train`) and rank 0 evaluates, writes and reports. ``eval`` reports, on
``D``, explained variance per model, L0, dead fraction, the latent classes (shared / A-only / B-only by
the relative decoder norm), the shared latents' decoder cosine, Latent Scaling, and the CE / KL splice
scores per model (under ``torchrun`` the ranks share the extraction and rank 0 reports). Bad input: one line on stderr, exit status 2, nothing half-written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rosettalens import options as opt
from rosettalens.errors import ConfigError, DataError

__all__ = ["register", "main"]


def _two(s: str, what: str) -> tuple[str, str]:
    parts = [p.strip() for p in str(s).split(",")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{what} takes two values 'A,B', got {s!r}")
    return parts[0], parts[1]


def _hooks(args: argparse.Namespace) -> tuple[str, str]:
    if args.hook and args.hooks:
        raise ConfigError("give --hook (one hook point for both models) or --hooks HA,HB, not both")
    if args.hooks:
        ha, hb = _two(args.hooks, "--hooks")
    elif args.hook:
        ha = hb = args.hook
    else:
        raise ConfigError("--hook H or --hooks HA,HB is required")
    opt.check_hooks([ha, hb], "--hooks" if args.hooks else "--hook")
    return ha, hb


def _rank() -> tuple[int, int]:
    """(rank, world) under ``torchrun`` (``(0, 1)`` alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _device(device: str | None) -> str | None:
    """``--device`` of this process: under ``torchrun`` a plain ``cuda`` (or the default, when a GPU is
    there) becomes the local rank's GPU (round-robin when there are fewer GPUs than ranks)."""
    import torch

    if _rank()[1] > 1 and device in (None, "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def _load_pair(names: tuple[str, str], args: argparse.Namespace):
    import rosettalens

    device, progress = _device(args.device), not args.no_progress and _rank()[0] == 0
    hm_a = rosettalens.load(names[0], device=device, dtype=args.dtype, progress=progress)
    if names[1] == names[0]:
        return hm_a, hm_a
    hm_b = rosettalens.load(names[1], device=device, dtype=args.dtype, progress=progress)
    return hm_a, hm_b


def _documents(spec: str) -> tuple[str, list[str]]:
    from rosettalens.data import load_documents

    corpus = load_documents(spec)
    docs = [d for d in corpus.documents if d and d.strip()]
    if not docs:
        raise DataError(f"data {spec!r} holds no non-empty documents")
    return corpus.spec, docs


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rosettalens.crosscoder import CrossCoderConfig, CrossCoderTrainConfig, extract_pairs, summarize
    from rosettalens.crosscoder import train_crosscoder as train
    from rosettalens.crosscoder.model import is_crosscoder_dir

    names = _two(args.models, "--models")
    hooks = _hooks(args)
    opt.check_models(names)
    out = Path(args.out)
    opt.check_output(out, args.overwrite, "crosscoder folder", replaceable=is_crosscoder_dir)
    if args.arch == "batchtopk" and args.k >= args.width:
        raise ConfigError(f"--k ({args.k}) must be smaller than --width ({args.width})")
    if args.dedicated_a + args.dedicated_b >= args.width:
        raise ConfigError(
            f"--dedicated-a + --dedicated-b ({args.dedicated_a + args.dedicated_b}) must leave shared latents "
            f"of --width {args.width}"
        )
    spec, docs = _documents(args.data)
    n_held = int(round(len(docs) * args.heldout))
    if len(docs) - n_held < 1:
        raise DataError(f"data {args.data!r} has {len(docs)} documents: none left for training")
    hm_a, hm_b = _load_pair(names, args)
    widths = (hm_a.hook_width(hooks[0]), hm_b.hook_width(hooks[1]))
    if args.tie_shared and widths[0] != widths[1]:  # before extracting anything
        raise ConfigError(
            f"--tie-shared needs one width for both hook points, got {widths[0]} and {widths[1]}"
        )
    rank = _rank()[0]
    progress = not args.no_progress and rank == 0
    kw: dict[str, Any] = dict(
        pairing=args.pairing,
        skip_first=args.skip_first,
        norm_ratio=args.norm_ratio,
        max_length=args.max_length,
        batch_size=args.extract_batch_size,
        progress=progress,
    )
    pairs = extract_pairs(hm_a, hm_b, docs[: len(docs) - n_held], *hooks, max_tokens=args.max_tokens, **kw)
    medians = (pairs.info["median_norm_a"], pairs.info["median_norm_b"])
    held = None
    if n_held:  # held-out documents under the training medians
        held = extract_pairs(
            hm_a,
            hm_b,
            docs[len(docs) - n_held :],
            *hooks,
            max_tokens=args.max_tokens,
            median_norms=medians,
            **kw,
        )
    cfg = CrossCoderConfig(
        d_a=int(pairs.x_a.shape[1]),
        d_b=int(pairs.x_b.shape[1]),
        width=args.width,
        arch=args.arch,
        k=args.k if args.arch == "batchtopk" else None,
        l1_coeff=args.l1_coeff,
        seed=args.seed,
        model_a=names[0],  # as given (a zoo name, folder or hub id): eval loads it again
        model_b=names[1],
        hook_a=hm_a.resolve_hook(hooks[0]),
        hook_b=hm_b.resolve_hook(hooks[1]),
        pairing=pairs.pairing,
        skip_first=args.skip_first,
        norm_ratio=args.norm_ratio,
        median_norm_a=medians[0],
        median_norm_b=medians[1],
        dedicated_a=args.dedicated_a,
        dedicated_b=args.dedicated_b,
        tie_shared=args.tie_shared,
    )
    tcfg = CrossCoderTrainConfig(
        batch_size=min(args.batch_size, len(pairs)),
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        device=str(hm_a.device),
    )
    cc = train((pairs.x_a, pairs.x_b), cfg, tcfg, progress=progress)
    if rank != 0:
        return 0  # under torchrun rank 0 evaluates, writes and reports
    ev_on = held if held is not None and len(held) else pairs
    summary = summarize(cc, ev_on.x_a, ev_on.x_b)
    cc.info["data"] = {"spec": spec, "train": pairs.info, "heldout": held.info if held is not None else None}
    cc.info["eval"] = {**_public(summary), "on": "heldout" if ev_on is held else "train"}
    cc.to("cpu").save(out, overwrite=args.overwrite)
    result = {
        "out": str(out),
        "models": list(names),
        "hooks": [cfg.hook_a, cfg.hook_b],
        "pairing": pairs.pairing,
        "train_pairs": len(pairs),
        "steps": cc.info["train"]["steps"],
        "tokens": cc.info["train"]["tokens"],
        "metrics_on": cc.info["eval"]["on"],
        **{k: v for k, v in _public(summary).items() if k != "rho_histogram"},
    }
    if args.json:
        opt.print_json(result)
    else:
        ev = result["explained_variance"]
        print(
            f"{out}: {cfg.arch} width {cfg.width}  explained variance A {ev['a']:.3f} B {ev['b']:.3f}  "
            f"l0 {result['l0']:.1f}  dead {100 * result['dead_fraction']:.1f}%  shared {result['n_shared']}  "
            f"A-only {result['n_a_only']}  B-only {result['n_b_only']}"
        )
    return 0


# ----------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from rosettalens.crosscoder import extract_pairs, load_crosscoder, splice_metrics, summarize
    from rosettalens.errors import ShapeError

    cc = load_crosscoder(args.crosscoder)
    c = cc.cfg
    if args.models:
        names = _two(args.models, "--models")
    elif c.model_a and c.model_b:
        names = (c.model_a, c.model_b)
    else:
        raise ConfigError(f"crosscoder {args.crosscoder} records no models; pass --models A,B")
    if not (c.hook_a and c.hook_b):
        raise DataError(f"crosscoder {args.crosscoder} records no hook points")
    opt.check_models(names)
    spec, docs = _documents(args.data)
    hm_a, hm_b = _load_pair(names, args)
    for hm, hook, d in ((hm_a, c.hook_a, c.d_a), (hm_b, c.hook_b, c.d_b)):
        if hm.hook_width(hm.resolve_hook(hook)) != d:
            raise ShapeError(f"{hm.name} {hook} has width {hm.hook_width(hook)} but the crosscoder takes {d}")
    cc.to(hm_a.device)
    pairs = extract_pairs(
        hm_a,
        hm_b,
        docs,
        c.hook_a,
        c.hook_b,
        pairing=args.pairing,
        skip_first=c.skip_first,
        norm_ratio=c.norm_ratio,
        median_norms=(c.median_norm_a, c.median_norm_b),
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        progress=not args.no_progress and _rank()[0] == 0,
    )
    if _rank()[0] != 0:
        return 0  # under torchrun the ranks share the extraction; rank 0 scores, splices and reports
    summary = _public(summarize(cc, pairs.x_a, pairs.x_b))
    result: dict[str, Any] = {
        "crosscoder": str(args.crosscoder),
        "models": list(names),
        "hooks": [c.hook_a, c.hook_b],
        "data": spec,
        "pairing": pairs.pairing,
        "arch": c.arch,
        "width": c.width,
        "k": c.k,
        **summary,
    }
    if not args.no_splice:
        used = sorted(set(pairs.doc.tolist()))
        texts = [docs[i] for i in used]
        result["splice"] = splice_metrics(
            cc,
            hm_a,
            hm_b,
            texts,
            pairing=args.pairing,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    if args.json:
        opt.print_json(result)
    else:
        ev = result["explained_variance"]
        line = (
            f"{args.crosscoder} on {names[0]} / {names[1]} ({result['n_tokens']} paired tokens): explained "
            f"variance A {ev['a']:.3f} B {ev['b']:.3f}  l0 {result['l0']:.1f}  dead "
            f"{100 * result['dead_fraction']:.1f}%  shared {result['n_shared']}  A-only {result['n_a_only']}  "
            f"B-only {result['n_b_only']}"
        )
        if "splice" in result:
            s = result["splice"]
            line += (
                f"  CE loss recovered A {s['a']['ce_loss_recovered']:.3f} B {s['b']['ce_loss_recovered']:.3f}"
            )
        print(line)
    return 0


# ------------------------------------------------------------------------------------------- register
def _common(p: argparse.ArgumentParser) -> None:
    opt.add_option(
        p,
        "--pairing",
        choices=("auto", "all", "aligned"),
        default="auto",
        help="how positions pair: all (one tokenizer, by position), aligned (by character ends), auto "
        "(all when the tokenizations agree) (default: auto)",
    )
    opt.add_max_length(p, 256)
    opt.add_device(p)
    opt.add_dtype(p)
    opt.add_no_progress(p)
    opt.add_json(p)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "crosscoder",
        help="train and evaluate crosscoders on two models' paired activations",
        description=(__doc__ or "").split("\n\n")[0],
    )
    sub = p.add_subparsers(dest="crosscoder_command", required=True, parser_class=type(p))

    t = sub.add_parser("train", help="train a crosscoder on two models' paired activations")
    opt.add_option(
        t,
        "--models",
        required=True,
        metavar="A,B",
        help="the two models, comma-separated (" + opt.MODEL_HELP + ")",
    )
    opt.add_hook(t, required=False, help="one hook point for both models, e.g. resid_post.10")
    opt.add_option(
        t,
        "--hooks",
        default=None,
        metavar="HA,HB",
        help="one hook point per model, e.g. resid_post.12,resid_post.16",
    )
    opt.add_data(t)
    opt.add_out(t, "output folder (crosscoder.json + crosscoder.safetensors)")
    opt.add_option(
        t,
        "--width",
        type=opt.positive_int,
        default=2048,
        metavar="N",
        help="number of latents (default: 2048)",
    )
    opt.add_option(
        t,
        "--k",
        type=opt.positive_int,
        default=32,
        metavar="K",
        help="batchtopk: active latents per token on average (default: 32)",
    )
    opt.add_option(
        t,
        "--arch",
        choices=("batchtopk", "l1"),
        default="batchtopk",
        help="batchtopk (default) or l1 (Anthropic's sum-of-decoder-norms penalty, for comparison)",
    )
    opt.add_option(
        t,
        "--l1-coeff",
        type=opt.nonneg_float,
        default=1.0,
        metavar="C",
        help="l1: penalty coefficient (default: 1.0)",
    )
    for side in ("a", "b"):
        opt.add_option(
            t,
            f"--dedicated-{side}",
            type=opt.nonneg_int,
            default=0,
            metavar="N",
            help=f"latents only model {side.upper()} reads and writes (model diffing; default: 0)",
        )
    opt.add_option(
        t,
        "--tie-shared",
        action="store_true",
        help="one decoder row for both models on the other latents (needs one width): what one model adds "
        "to a shared direction goes to its dedicated latents",
    )
    opt.add_max_tokens(t, 65536, help="paired training tokens to extract", aliases=("--tokens",))
    opt.add_option(
        t,
        "--epochs",
        type=opt.positive_int,
        default=4,
        metavar="E",
        help="passes over the training tokens (default: 4)",
    )
    opt.add_option(
        t,
        "--batch-size",
        type=opt.positive_int,
        default=1024,
        metavar="B",
        help="training batch in tokens (default: 1024)",
    )
    opt.add_option(
        t,
        "--lr",
        type=opt.positive_float,
        default=None,
        metavar="LR",
        help="learning rate (default: 2e-3, measured for short runs; see docs/crosscoder.md)",
    )
    opt.add_option(
        t,
        "--extract-batch-size",
        type=opt.positive_int,
        default=8,
        metavar="B",
        help="documents per forward pass; under torchrun the ranks take these batches in turn (default: 8)",
    )
    opt.add_heldout(t, 0.1)
    opt.add_skip_first(t, 1)
    opt.add_option(
        t,
        "--norm-ratio",
        type=opt.nonneg_float,
        default=10.0,
        metavar="R",
        help="leave out tokens whose norm exceeds R times their model's median norm; 0: off (default: 10)",
    )
    opt.add_seed(t)
    opt.add_overwrite(t)
    _common(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval", help="evaluate a crosscoder on data (explained variance, latent classes, splice CE/KL)"
    )
    opt.add_option(
        e,
        "--crosscoder",
        required=True,
        type=opt.path,
        metavar="DIR",
        help="crosscoder folder (rosetta crosscoder train)",
    )
    opt.add_data(e)
    opt.add_option(
        e,
        "--models",
        default=None,
        metavar="A,B",
        help="the two models (default: the ones recorded in the crosscoder)",
    )
    opt.add_max_tokens(e, 8192, help="paired tokens to evaluate on")
    opt.add_batch_size(e, 8)
    opt.add_option(
        e,
        "--no-splice",
        action="store_true",
        help="skip the splice CE / KL scores (two extra forwards per model)",
    )
    _common(e)
    e.set_defaults(func=cmd_eval)


def main(argv=None) -> int:
    """``python -m rosettalens.crosscoder.cli ARGS`` = ``rosetta crosscoder ARGS``."""
    from rosettalens.cli import main as rosetta

    argv = list(sys.argv[1:] if argv is None else argv)
    return rosetta(argv if argv[:1] == ["crosscoder"] else ["crosscoder", *argv])


if __name__ == "__main__":
    sys.exit(main())
