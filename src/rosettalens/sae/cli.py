"""``rosetta sae train | eval``.

::

    rosetta sae train --store DIR --hook H --arch topk|batchtopk|jumprelu|relu --width N[,N..] [--k K[,K..]]
                      --out DIR [--tokens N] [--batch-size B] [--lr LR] [--l1-coeff C] [--l0-coeff C]
                      [--heldout F] [--min-pos P] [--seed S] [--device D] [--checkpoint-every STEPS]
                      [--overwrite] [--json]
    rosetta sae eval  --sae DIR|HUB_ID --model M --data D [--hook H] [--max-tokens N] [--min-pos P] [--json]

``train`` trains one SAE per (width, k) from one pass over the store's rows (the last ``--heldout``
fraction of rows is held out and the SAEs are evaluated on it); one SAE is written to ``--out`` itself,
several to ``--out/<arch>-w<width>[-k<k>]``, in SAELens's format. Runs under ``torchrun`` (data
parallel; rank 0 writes). ``eval`` runs the model over ``D``'s documents and reports FVU, L0, dead and
dense fractions on the activations, and the CE loss recovered and KL score of splicing the SAE in.
Bad input: one line on stderr, exit status 2, nothing half-written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from rosettalens import options as opt
from rosettalens.errors import ConfigError, DataError

__all__ = ["register", "main"]


def _ints(s: str | None, what: str) -> list[int | None]:
    if s is None:
        return [None]
    try:
        vals = [int(v) for v in str(s).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"--{what} must be an integer or a comma-separated list of integers, got {s!r}"
        ) from None
    if not vals:
        raise ConfigError(f"--{what} is empty")
    if min(vals) < 1:
        raise ConfigError(f"--{what} must be >= 1, got {min(vals)}")
    return list(vals)


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from rosettalens.io import atomic_dir
    from rosettalens.sae import SAEConfig, TrainConfig, evaluate_sae, train_saes
    from rosettalens.sae.model import ARCHS, is_sae_output
    from rosettalens.store import ActivationStore

    if args.arch not in ARCHS:
        raise ConfigError(f"unknown --arch {args.arch!r}; expected one of {', '.join(ARCHS)}")
    out = Path(args.out)
    opt.check_output(out, args.overwrite, "SAE folder", replaceable=is_sae_output)  # before training
    widths = _ints(args.width, "width")
    ks = _ints(args.k, "k")
    if args.arch in ("topk", "batchtopk") and ks == [None]:
        raise ConfigError(f"--arch {args.arch} needs --k (active latents per token)")
    store = ActivationStore.open(args.store)
    hook = args.hook
    if hook is None:
        if len(store.hooks) != 1:
            raise ConfigError(
                f"store {store.path} holds several hooks ({', '.join(store.hooks)}); pass --hook"
            )
        hook = store.hooks[0]
    if hook not in store.hooks:
        raise DataError(f"store {store.path} has no hook {hook!r}; stored hooks: {', '.join(store.hooks)}")
    d_in = int(math.prod(store.manifest["hook_shapes"][hook]))
    if args.d_in is not None and args.d_in != d_in:
        from rosettalens.errors import ShapeError

        raise ShapeError(f"store {store.path} hook {hook} has width {d_in} but --d-in is {args.d_in}")
    cfgs = []
    for w in widths:
        for k in ks:
            c = SAEConfig(
                d_in=d_in,
                width=int(w),  # type: ignore[arg-type]
                arch=args.arch,
                k=k,
                l1_coeff=args.l1_coeff,
                l0_coeff=args.l0_coeff,
                seed=args.seed,
                model=store.manifest.get("model", {}).get("name"),
                hook=hook,
            )
            c.validate()
            cfgs.append(c)
    n = len(store)
    n_train = n - int(round(n * args.heldout))
    train_rows: Any = (0, n_train)
    held_idx = torch.arange(n_train, n)
    if args.min_pos > 0:  # leave out the first tokens of every document (attention sinks)
        keep = store.pos_index >= args.min_pos
        train_rows = torch.nonzero(keep[:n_train]).reshape(-1)
        held_idx = held_idx[keep[n_train:]]
    n_used = n_train if isinstance(train_rows, tuple) else len(train_rows)
    if n_used < args.batch_size:
        raise DataError(
            f"store {store.path} has {n} rows; {n_used} for training is less than one batch ({args.batch_size})"
        )
    ckpt = out.parent / f".{out.name}.checkpoint" if args.checkpoint_every else None
    tcfg = TrainConfig(
        batch_size=args.batch_size,
        tokens=args.tokens,
        lr=args.lr,
        seed=args.seed,
        device=args.device or "cpu",
        checkpoint_dir=str(ckpt) if ckpt else None,
        checkpoint_every=args.checkpoint_every or 0,
    )
    saes = train_saes(store, cfgs, tcfg, hook=hook, rows=train_rows, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    rows_summary: list[dict[str, Any]] = []
    held = None
    if len(held_idx):
        held = store.read(hook, held_idx[:65536].numpy()).float().reshape(-1, d_in)
    names = [_name(c) for c in cfgs]
    # built in a temp sibling and swapped in whole (an earlier --out is replaced only with --overwrite)
    with atomic_dir(out, overwrite=args.overwrite, what="SAE folder", replaceable=is_sae_output) as tmp:
        for sae, name in zip(saes, names, strict=True):
            if held is not None:
                sae.info["heldout"] = evaluate_sae(sae, held.to(sae.device))
            target = tmp if len(saes) == 1 else tmp / name  # (one SAE: the folder itself)
            sae.to(torch.device("cpu")).save(target)
            m = sae.info.get("heldout") or sae.info.get("final") or {}
            rows_summary.append(
                {
                    "path": str(out if len(saes) == 1 else out / name),
                    "arch": sae.arch,
                    "width": sae.width,
                    "k": sae.cfg.k,
                    **{key: m.get(key) for key in ("fvu", "l0", "dead_fraction", "dense_fraction")},
                }
            )
    info = saes[0].info["train"]
    summary = {
        "out": str(out),
        "store": str(store.path),
        "hook": hook,
        "train_rows": n_used,
        "heldout_rows": 0 if held is None else int(held.shape[0]),
        "steps": info["steps"],
        "tokens": info["tokens"],
        "world_size": info["world_size"],
        "metrics_on": "heldout" if held is not None else "last training window",
        "saes": rows_summary,
    }
    if args.json:
        opt.print_json(summary)
    else:
        for r in rows_summary:
            print(
                f"{r['path']}: {r['arch']} width {r['width']}"
                + (f" k {r['k']}" if r["k"] else "")
                + f"  fvu {r['fvu']:.4f}  l0 {r['l0']:.1f}  dead {100 * r['dead_fraction']:.1f}%"
            )
    return 0


def _name(c) -> str:
    return f"{c.arch}-w{c.width}" + (f"-k{c.k}" if c.k is not None else "")


# ----------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    import rosettalens
    from rosettalens.data import load_documents
    from rosettalens.sae import evaluate_sae, load_sae, splice_metrics

    opt.check_hooks([args.hook] if args.hook else None, "--hook")
    opt.check_models([args.model])
    sae = load_sae(args.sae)
    hook = args.hook or sae.cfg.hook
    if not hook:
        raise ConfigError(f"SAE {args.sae} records no hook point; pass --hook")
    corpus = load_documents(args.data)
    docs = [d for d in corpus.documents if d and d.strip()]
    if not docs:
        raise DataError(f"data {args.data!r} holds no non-empty documents")
    hm = rosettalens.load(args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    hook = hm.resolve_hook(hook)
    width = hm.hook_width(hook)
    if width != sae.d_in:
        from rosettalens.errors import ShapeError

        raise ShapeError(f"{hm.name} {hook} has width {width} but the SAE takes d_in={sae.d_in}")
    sae.to(hm.device)
    # documents up to --max-tokens real tokens
    special = set(getattr(hm.tokenizer, "all_special_ids", []) or [])
    chosen, total = [], 0
    for d in docs:
        ids = hm.tokenizer(d, add_special_tokens=True, truncation=True, max_length=args.max_length)[
            "input_ids"
        ]
        real = sum(1 for i in ids if i not in special)
        if real == 0:
            continue
        chosen.append(d)
        total += real
        if args.max_tokens is not None and total >= args.max_tokens:
            break
    if not chosen:
        raise DataError(f"data {args.data!r} gives no tokens")
    acts = []
    spec = torch.tensor(sorted(special), dtype=torch.long)
    for s in range(0, len(chosen), args.batch_size):
        enc = hm.tokenize(chosen[s : s + args.batch_size], max_length=args.max_length)
        _, cache = hm.run_with_cache(enc, hooks=[hook], stop_early=True)
        a = cache[hook]
        mask = enc["attention_mask"]
        real = mask.bool() & ~torch.isin(enc["input_ids"], spec.to(enc["input_ids"].device))
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # position in the (left-padded) document
        real &= pos >= args.min_pos
        acts.append(a.reshape(*a.shape[:2], -1)[real].float().cpu())
    x = torch.cat(acts)
    if x.shape[0] == 0:
        raise DataError(f"no tokens at position >= {args.min_pos} in {args.data!r}")
    metrics = evaluate_sae(sae, x)
    splice = splice_metrics(sae, hm, hook, chosen, batch_size=args.batch_size, max_length=args.max_length)
    result = {
        "sae": str(args.sae),
        "model": hm.name,
        "hook": hook,
        "data": corpus.spec,
        "arch": sae.arch,
        "width": sae.width,
        "k": sae.cfg.k,
        **{k: metrics[k] for k in ("fvu", "explained_variance", "l0", "dead_fraction", "dense_fraction")},
        **{k: v for k, v in splice.items() if k != "n_tokens"},
        "n_tokens": metrics["n_tokens"],
    }
    if args.json:
        opt.print_json(result)
    else:
        print(
            f"{args.sae} on {hm.name} {hook} ({result['n_tokens']} tokens): fvu {result['fvu']:.4f}  "
            f"l0 {result['l0']:.1f}  dead {100 * result['dead_fraction']:.1f}%  "
            f"CE loss recovered {result['ce_loss_recovered']:.3f}  KL score {result['kl_score']:.3f}"
        )
    return 0


# ------------------------------------------------------------------------------------------- register
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sae", help="train and evaluate sparse autoencoders", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="sae_command", required=True, parser_class=type(p))

    t = sub.add_parser("train", help="train SAEs on an activation store (several from one pass)")
    t.add_argument("--store", required=True, type=opt.path, help="activation store folder (rosetta extract)")
    t.add_argument("--hook", default=None, help="hook point in the store (optional when it holds one)")
    t.add_argument("--arch", required=True, help="topk | batchtopk | jumprelu | relu")
    t.add_argument("--width", required=True, help="number of latents (a comma list trains several)")
    t.add_argument("--k", default=None, help="active latents per token for topk/batchtopk (a comma list too)")
    t.add_argument("--out", required=True, type=opt.path, help="output folder (SAELens format)")
    t.add_argument(
        "--d-in",
        type=opt.positive_int,
        default=None,
        help="expected activation width (checked against the store)",
    )
    t.add_argument(
        "--tokens", type=opt.positive_int, default=None, help="training tokens (default: one pass)"
    )
    t.add_argument("--batch-size", type=opt.positive_int, default=4096)
    t.add_argument("--lr", type=opt.positive_float, default=None, help="default 2e-4 * sqrt(16384 / width)")
    t.add_argument("--l1-coeff", type=opt.nonneg_float, default=2.0, help="relu: L1 coefficient")
    t.add_argument("--l0-coeff", type=opt.nonneg_float, default=1.0, help="jumprelu: L0 coefficient")
    t.add_argument(
        "--heldout", type=opt.fraction_closed, default=0.05, help="fraction of rows (the last ones) held out"
    )
    t.add_argument(
        "--min-pos",
        type=opt.nonneg_int,
        default=0,
        help="train and evaluate on tokens at position >= P of their document only (1: leave out the "
        "first token, whose residual norm is often 100x the others')",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", type=opt.device, default=None)
    t.add_argument(
        "--checkpoint-every", type=opt.nonneg_int, default=0, help="steps between checkpoints (0: none)"
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out as a whole")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate an SAE on a model and data (FVU, L0, dead %%, splice metrics)")
    e.add_argument(
        "--sae",
        required=True,
        type=opt.path,
        help="SAE folder (ours, SAELens, sparsify) or hub id owner/repo[/sub]",
    )
    e.add_argument("--model", required=True, type=opt.path)
    e.add_argument(
        "--data", required=True, type=opt.data_spec, help="built-in dataset, .txt/.jsonl file or hf:<id>"
    )
    e.add_argument("--hook", default=None, help="default: the hook recorded in the SAE")
    e.add_argument("--max-tokens", type=opt.positive_int, default=4096)
    e.add_argument("--max-length", type=opt.positive_int, default=256)
    e.add_argument(
        "--min-pos",
        type=opt.nonneg_int,
        default=0,
        help="FVU/L0/dead on tokens at position >= P only (1: without documents' first tokens); the "
        "splice metrics use every real token, as SAELens does",
    )
    e.add_argument("--batch-size", type=opt.positive_int, default=8)
    e.add_argument("--device", type=opt.device, default=None)
    e.add_argument("--dtype", type=opt.dtype, default=None)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)


def main(argv=None) -> int:
    """``python -m rosettalens.sae.cli ARGS`` = ``rosetta sae ARGS`` (e.g. under torchrun)."""
    from rosettalens.cli import main as rosetta

    argv = list(sys.argv[1:] if argv is None else argv)
    return rosetta(argv if argv[:1] == ["sae"] else ["sae", *argv])


if __name__ == "__main__":
    sys.exit(main())
