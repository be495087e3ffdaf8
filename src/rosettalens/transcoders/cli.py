"""``rosetta transcoders train | eval``.

::

    rosetta transcoders train --model M --data D --out DIR [--layers L,L..] [--width N] [--k K]
                              [--arch topk|relu] [--skip] [--max-tokens N]
                              [--checkpoint-dir DIR --checkpoint-every N] [...] [--json]
    rosetta transcoders eval  --transcoders DIR --model M --data D [--max-tokens N] [--json]

``train`` runs the model over ``D``'s documents and trains one transcoder per layer (every layer by
default: ``mlp_in.L -> mlp_out.L``) in one pass, then evaluates the set on the held-out documents
(per-layer explained variance, L0, dead fraction; CE loss and KL with every MLP replaced at once) and
writes it to ``--out`` (``transcoders.json`` + ``layer_{L}.safetensors``, see docs/transcoders.md).
With ``--checkpoint-dir DIR --checkpoint-every N`` a checkpoint is saved every
``N`` forward passes and an interrupted run, started again with the same arguments, resumes from it.
``eval`` reports the same metrics for a saved set on any data. Bad input: one line on stderr, exit
status 2, nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from typing import Any

from rosettalens import options as opt
from rosettalens.errors import ConfigError

__all__ = ["register", "main"]

#: the cost of the default budget, as measured (docs/transcoders.md)
COST = "SmolLM2-135M, all 30 layers, one CPU thread: about 8 min training + 1.5 min evaluation"


def _layers(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--layers must be a comma-separated list of integers, got {s!r}") from None
    if not vals:
        raise ConfigError("--layers is empty")
    return vals


def _train_config(args: argparse.Namespace):
    from rosettalens.transcoders.train import TrainConfig

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if kw["layers"] is not None:
        kw["layers"] = _layers(kw["layers"])
    cfg = TrainConfig(**kw)
    cfg.validate()
    return cfg


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("explained_variance_min", "explained_variance_mean", "explained_variance_max", "l0_mean",
            "dead_fraction_mean", "ce_clean", "ce_replaced", "ce_zero", "ce_loss_score", "kl_replaced",
            "kl_zero", "n_tokens")  # fmt: skip
    return {k: result[k] for k in keys if k in result}


def _print_table(result: dict[str, Any]) -> None:
    print("layer  explained_var     l0   dead")
    for L, r in result["layers"].items():
        print(f"{L:>5}  {r['explained_variance']:>13.3f}  {r['l0']:>5.1f}  {r['dead_fraction']:.3f}")
    print(
        f"every MLP replaced: CE {result['ce_replaced']:.3f} (clean {result['ce_clean']:.3f}, MLPs zeroed "
        f"{result['ce_zero']:.3f}), CE loss score {result['ce_loss_score']:.3f}, KL {result['kl_replaced']:.4f}"
    )


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    import rosettalens
    from rosettalens.data.sources import load_documents
    from rosettalens.transcoders.evaluate import evaluate_transcoders
    from rosettalens.transcoders.model import is_transcoder_set_dir
    from rosettalens.transcoders.train import train_transcoders

    cfg = _train_config(args)
    opt.check_output(args.out, args.overwrite, "transcoder set", replaceable=is_transcoder_set_dir)
    opt.check_models([args.model])
    if cfg.layers is not None:
        opt.check_layers(args.model, cfg.layers, "--layers")
    corpus = load_documents(args.data)
    torch.manual_seed(cfg.seed)
    hm = rosettalens.load(args.model, device=args.device, progress=not args.no_progress)
    t0 = time.time()
    tset, held = train_transcoders(hm, corpus.documents, cfg, progress=not args.no_progress)
    tset.info["data"] = corpus.describe()
    tset.info["model_spec"] = args.model  # what loads the model again (`eval` defaults to it)
    result: dict[str, Any] = {}
    if args.eval_tokens and held:
        result = evaluate_transcoders(tset, hm, held, max_tokens=args.eval_tokens, max_length=cfg.max_length,
                                      progress=not args.no_progress)  # fmt: skip
        tset.info["eval_heldout"] = result
        for L, r in result["layers"].items():
            tset[L].cfg.info.update({k: r[k] for k in ("explained_variance", "l0", "dead_fraction")})
    tset.info["seconds_total"] = time.time() - t0
    tset.save(args.out, overwrite=args.overwrite)
    summary = {"out": str(args.out), "model": tset.model, "layers": tset.layers, "tokens": tset.info["tokens"],
               "seconds": tset.info["seconds_total"], **_summary(result)}  # fmt: skip
    if result:
        summary["per_layer"] = result["layers"]
    if args.json:
        opt.print_json(summary)
    else:
        if result:
            _print_table(result)
        print(
            f"wrote {args.out} ({len(tset)} layers, {tset.info['tokens']} tokens, {summary['seconds']:.0f} s)"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import rosettalens
    from rosettalens.data.sources import load_documents
    from rosettalens.transcoders.evaluate import evaluate_transcoders
    from rosettalens.transcoders.model import TranscoderSet

    tset = TranscoderSet.load(args.transcoders)
    model = args.model or tset.info.get("model_spec") or tset.model
    if not model:
        raise ConfigError("the transcoder set records no model; pass --model")
    opt.check_models([model])
    corpus = load_documents(args.data)
    hm = rosettalens.load(model, device=args.device, progress=not args.no_progress)
    tset.to(hm.device)
    result = evaluate_transcoders(tset, hm, corpus.documents, max_tokens=args.max_tokens, max_length=args.max_length,
                                  docs_per_forward=args.batch_size, progress=not args.no_progress)  # fmt: skip
    if args.json:
        opt.print_json({"transcoders": str(args.transcoders), "model": model, **_summary(result),
                        "per_layer": result["layers"]})  # fmt: skip
    else:
        _print_table(result)
    return 0


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field (help, choices and defaults from the dataclass)."""
    from rosettalens.config import field_help, field_shown_default
    from rosettalens.transcoders.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        shown = field_shown_default(f)
        help = field_help(f) + (f" (default: {shown})" if shown is not None else "")
        hint = hints[f.name]
        if hint is bool:
            opt.add_option(p, flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        elif typing.get_origin(hint) is typing.Literal:
            opt.add_option(p, flag, choices=typing.get_args(hint), default=f.default, help=help)
        elif f.name == "layers":
            opt.add_option(p, flag, default=None, metavar="L[,L..]", help=help)
        elif f.name == "checkpoint_dir":
            opt.add_option(p, flag, type=opt.path, default=None, metavar="DIR", help=help)
        elif hint is int:
            ikind = opt.nonneg_int if f.name in ("skip_first", "checkpoint_every") else opt.positive_int
            opt.add_option(p, flag, type=ikind, default=f.default, metavar="N", help=help)
        else:
            kind = opt.fraction_closed if f.name.endswith("_frac") else opt.nonneg_float
            opt.add_option(p, flag, type=kind, default=f.default, metavar="X", help=help)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "transcoders",
        help="train and evaluate per-layer transcoders (sparse MLP replacements)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    sub = p.add_subparsers(dest="transcoders_command", required=True, parser_class=type(p))

    t = sub.add_parser(
        "train",
        help=f"train one transcoder per layer in one pass over the data (default budget: {COST})",
        description=f"Train per-layer transcoders (mlp_in.L -> mlp_out.L). Default budget: {COST}.",
    )
    opt.add_model(t)
    opt.add_data(t)
    opt.add_out(t, "output folder: transcoders.json + layer_{L}.safetensors")
    _add_config_options(t)
    opt.add_option(t, "--eval-tokens", type=opt.nonneg_int, default=4096, metavar="N",
                   help="evaluate on up to N held-out tokens after training (0: skip) (default: 4096)")  # fmt: skip
    opt.add_device(t, "cpu")
    opt.add_overwrite(t)
    opt.add_no_progress(t)
    opt.add_json(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval", help="evaluate a transcoder set: per layer and with every MLP replaced at once"
    )
    opt.add_option(e, "--transcoders", required=True, type=opt.path, metavar="DIR",
                   help="transcoder set folder (rosetta transcoders train)")  # fmt: skip
    opt.add_model(e, required=False, help=opt.MODEL_HELP + " (default: the set's model)")
    opt.add_data(e)
    opt.add_max_tokens(e, 4096, help="evaluate on documents up to this many tokens")
    opt.add_max_length(e, 128)
    opt.add_batch_size(e, 8)
    opt.add_device(e, "cpu")
    opt.add_no_progress(e)
    opt.add_json(e)
    e.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    """``python -m rosettalens.transcoders.cli ARGS`` = ``rosetta transcoders ARGS``."""
    from rosettalens.cli import main as rosetta

    args = list(sys.argv[1:] if argv is None else argv)
    return rosetta(args if args[:1] == ["transcoders"] else ["transcoders", *args])


if __name__ == "__main__":
    sys.exit(main())
