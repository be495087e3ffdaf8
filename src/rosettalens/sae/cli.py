"""``rosetta sae train | eval``.

::

    rosetta sae train --store DIR --hook H --arch topk|batchtopk|jumprelu|relu --width N[,N..] [--k K[,K..]]
                      --out DIR [--max-tokens N] [--batch-size B] [--lr LR] [--l1-coeff C] [--l0-coeff C]
                      [--heldout F] [--skip-first P] [--norm-ratio R] [--splice-docs N] [--model M]
                      [--seed S] [--device D] [--checkpoint-every STEPS] [--overwrite] [--json]
    rosetta sae eval  --sae DIR|HUB_ID --model M --data D [--hook H] [--max-tokens N] [--figure FILE] [--json]

``train`` trains one SAE per (width, k) from one pass over the store's rows (the last ``--heldout``
fraction of rows is held out and the SAEs are evaluated on it, SAEBench's core metrics: FVU, explained
variance, L0, dead/alive fraction and, splicing the SAE into the store's model on ``--splice-docs``
held-out documents, CE loss score and KL score); one SAE is written to ``--out`` itself, several to
``--out/<arch>-w<width>[-k<k>]``, in SAELens's format, each with ``training.png`` (loss curves). The
positions left out (attention sinks: the first ``--skip-first`` positions of each document and tokens
whose norm exceeds ``--norm-ratio`` x the median) are recorded in the SAE and used by ``eval``. Runs
under ``torchrun`` (data parallel; rank 0 writes). ``eval`` runs the model over ``D``'s documents and
reports the same metrics. Bad input: one line on stderr, exit status 2, nothing half-written.
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
    from rosettalens.sae import SAEConfig, TrainConfig, train_saes
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
    model_name = args.model or store.manifest.get("model", {}).get("name")
    if args.splice_docs:
        try:
            opt.check_models([model_name])
        except Exception as e:
            raise ConfigError(
                f"the store's model {model_name!r} cannot be found for the splice metrics ({opt.one_line(e)}); "
                "pass --model, or --splice-docs 0 to skip them"
            ) from None
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
                skip_first=args.skip_first,
                norm_ratio=args.norm_ratio,
            )
            c.validate()
            cfgs.append(c)
    n = len(store)
    n_train = n - int(round(n * args.heldout))
    if n_train < args.batch_size:
        raise DataError(
            f"store {store.path} has {n} rows; {n_train} for training is less than one batch ({args.batch_size})"
        )
    ckpt = out.parent / f".{out.name}.checkpoint" if args.checkpoint_every else None
    tcfg = TrainConfig(
        batch_size=args.batch_size,
        tokens=args.max_tokens if args.max_tokens is not None else max(n_train, MIN_TOKENS),
        lr=args.lr,
        seed=args.seed,
        device=args.device or "cpu",
        checkpoint_dir=str(ckpt) if ckpt else None,
        checkpoint_every=args.checkpoint_every or 0,
    )
    saes = train_saes(store, cfgs, tcfg, hook=hook, rows=(0, n_train), progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    held_idx = torch.arange(n_train, n)[:65536]
    held = pos = None
    if len(held_idx):
        held = store.read(hook, held_idx.numpy()).float().reshape(-1, d_in)
        pos = store.pos_index[held_idx]
    splice_docs: list[str] = []
    hm = None
    if args.splice_docs and len(held_idx):
        docs = store.documents()
        first_doc = int(store.doc_index[n_train]) + 1 if n_train < n else len(docs)
        splice_docs = [d for d in docs[first_doc:] if d.strip()][: args.splice_docs]
        if splice_docs:
            import rosettalens

            hm = rosettalens.load(model_name, device=args.device, progress=not args.no_progress)
    rows_summary: list[dict[str, Any]] = []
    names = [_name(c) for c in cfgs]
    # built in a temp sibling and swapped in whole (an earlier --out is replaced only with --overwrite)
    with atomic_dir(out, overwrite=args.overwrite, what="SAE folder", replaceable=is_sae_output) as tmp:
        for sae, name in zip(saes, names, strict=True):
            if held is not None:
                sae.info["heldout"] = core_metrics(sae, held, pos, hm, hook, splice_docs)
            target = tmp if len(saes) == 1 else tmp / name  # (one SAE: the folder itself)
            sae.to(torch.device("cpu")).save(target)
            training_figure(sae, target / FIGURE)
            m = sae.info.get("heldout") or sae.info.get("final") or {}
            rows_summary.append(
                {
                    "path": str(out if len(saes) == 1 else out / name),
                    "arch": sae.arch,
                    "width": sae.width,
                    "k": sae.cfg.k,
                    **{key: m.get(key) for key in CORE_KEYS},
                }
            )
    info = saes[0].info["train"]
    summary = {
        "out": str(out),
        "store": str(store.path),
        "hook": hook,
        "train_rows": info["sinks"]["rows_kept"],
        "rows_left_out": info["sinks"]["rows_left_out"],
        "sinks": {k: info["sinks"][k] for k in ("skip_first", "norm_ratio")},
        "heldout_rows": 0 if held is None else int(held.shape[0]),
        "splice_docs": len(splice_docs),
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
                + "  "
                + _line(r)
            )
    return 0


FIGURE = "training.png"
MIN_TOKENS = 1_000_000  # default budget: one pass over the training rows, at least this many tokens
CORE_KEYS = (
    "fvu",
    "explained_variance",
    "l0",
    "dead_fraction",
    "alive_fraction",
    "dense_fraction",
    "cossim",
    "ce_loss_score",
    "kl_div_score",
)


def core_metrics(sae, x, positions, hm, hook: str, docs: list[str]) -> dict[str, Any]:
    """SAEBench's core metrics of ``sae``: reconstruction and sparsity on ``x [n, d_in]`` (rows at
    ``positions [n]``) and, with a model and documents, the splice metrics (CE loss score, KL score)."""
    from rosettalens.sae import evaluate_sae, splice_metrics

    m: dict[str, Any] = dict(evaluate_sae(sae, x.to(sae.device), positions=positions))
    if hm is not None and docs:
        sae_dev = sae.device
        sae.to(hm.device)
        s = splice_metrics(sae, hm, hook, docs)
        sae.to(sae_dev)
        m.update({k: v for k, v in s.items() if k != "n_tokens"})
        m["splice_tokens"] = s["n_tokens"]
    return m


def _line(r: dict[str, Any]) -> str:
    parts = [f"fvu {r['fvu']:.4f}", f"l0 {r['l0']:.1f}", f"dead {100 * r['dead_fraction']:.1f}%"]
    if r.get("ce_loss_score") is not None:
        parts += [f"CE loss score {r['ce_loss_score']:.3f}", f"KL score {r['kl_div_score']:.3f}"]
    return "  ".join(parts)


def training_figure(sae, path: Path) -> Path | None:
    """Training curves of ``sae`` (loss proxy FVU, L0, dead fraction vs tokens) from its recorded
    history, written to ``path`` (PNG); ``None`` when the SAE records no history."""
    hist = (getattr(sae, "info", {}) or {}).get("history") or []
    if not hist:
        return None
    from rosettalens.io import atomic_savefig
    from rosettalens.report.html import pyplot

    plt = pyplot()
    t = [h["tokens"] for h in hist]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, title in (
        (axes[0], "fvu", "FVU (training batches)"),
        (axes[1], "l0", "L0"),
        (axes[2], "dead_fraction", "dead fraction"),
    ):
        ax.plot(t, [h.get(key) for h in hist])
        ax.set(title=title, xlabel="training tokens")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    k = f" k={sae.cfg.k}" if sae.cfg.k else ""
    fig.suptitle(f"{sae.arch} width {sae.width}{k} {sae.cfg.hook or ''}", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)
    return path


def _name(c) -> str:
    return f"{c.arch}-w{c.width}" + (f"-k{c.k}" if c.k is not None else "")


# ----------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    import rosettalens
    from rosettalens.data import load_documents
    from rosettalens.sae import load_sae

    opt.check_hooks([args.hook] if args.hook else None, "--hook")
    opt.check_models([args.model])
    sae = load_sae(args.sae)
    if args.skip_first is not None:
        sae.cfg.skip_first = args.skip_first
    if args.norm_ratio is not None:
        sae.cfg.norm_ratio = args.norm_ratio
    sae.cfg.sink_rule()  # a bad override: one line
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
    acts, poss = [], []
    spec = torch.tensor(sorted(special), dtype=torch.long)
    for s in range(0, len(chosen), args.batch_size):
        enc = hm.tokenize(chosen[s : s + args.batch_size], max_length=args.max_length)
        _, cache = hm.run_with_cache(enc, hooks=[hook], stop_early=True)
        a = cache[hook]
        mask = enc["attention_mask"]
        real = mask.bool() & ~torch.isin(enc["input_ids"], spec.to(enc["input_ids"].device))
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # position in the (left-padded) document
        acts.append(a.reshape(*a.shape[:2], -1)[real].float().cpu())
        poss.append(pos[real].cpu())
    x, positions = torch.cat(acts), torch.cat(poss)
    metrics = core_metrics(sae, x, positions, hm, hook, [])
    from rosettalens.sae import splice_metrics

    splice = splice_metrics(sae, hm, hook, chosen, batch_size=args.batch_size, max_length=args.max_length)
    result = {
        "sae": str(args.sae),
        "model": hm.name,
        "hook": hook,
        "data": corpus.spec,
        "arch": sae.arch,
        "width": sae.width,
        "k": sae.cfg.k,
        "sinks": sae.cfg.sink_rule().to_dict(),
        **{
            k: metrics[k]
            for k in (
                "fvu",
                "explained_variance",
                "mse",
                "cossim",
                "l2_ratio",
                "l0",
                "dead_fraction",
                "alive_fraction",
                "dense_fraction",
            )
        },  # fmt: skip
        **{k: v for k, v in splice.items() if k != "n_tokens"},
        "n_tokens": metrics["n_tokens"],
        "n_left_out": metrics["n_left_out"],
        "splice_tokens": splice["n_tokens"],
    }
    if args.figure:
        result["figure"] = str(training_figure(sae, Path(args.figure)) or "")
    if args.json:
        opt.print_json(result)
    else:
        print(f"{args.sae} on {hm.name} {hook} ({result['n_tokens']} tokens): " + _line(result))
    return 0


# ------------------------------------------------------------------------------------------- register
def _add_sink_options(p, default_skip: int | None, default_ratio: float | None, what: str) -> None:
    from rosettalens.sae.sinks import NORM_RATIO

    if default_skip is None:
        opt.add_option(p, "--skip-first", type=opt.nonneg_int, default=None, metavar="P", aliases=("--min-pos",),
                       help=f"leave out the first P positions of each document {what} (default: the SAE's)")  # fmt: skip
    else:
        opt.add_skip_first(p, default_skip)
    opt.add_option(p, "--norm-ratio", type=opt.nonneg_float, default=default_ratio, metavar="R",
                   help="leave out tokens whose norm exceeds R x the median token norm (0: off; default: "
                   + (f"{NORM_RATIO:g})" if default_ratio is not None else "the SAE's)"))  # fmt: skip


def register(subparsers) -> None:
    from rosettalens.sae.model import ARCHS
    from rosettalens.sae.sinks import NORM_RATIO, SKIP_FIRST

    p = subparsers.add_parser(
        "sae", help="train and evaluate sparse autoencoders", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="sae_command", required=True, parser_class=type(p))

    t = sub.add_parser("train", help="train SAEs on an activation store (several from one pass)")
    opt.add_option(t, "--store", required=True, type=opt.path, metavar="DIR",
                   help="activation store folder (rosetta extract)")  # fmt: skip
    opt.add_hook(t, required=False, help="hook point in the store (optional when it holds one)")
    opt.add_option(t, "--arch", required=True, choices=ARCHS, help="SAE architecture")
    opt.add_option(t, "--width", required=True, metavar="N[,N..]",
                   help="number of latents (a comma list trains several from one pass)")  # fmt: skip
    opt.add_option(t, "--k", default=None, metavar="K[,K..]",
                   help="active latents per token for topk/batchtopk (a comma list too)")  # fmt: skip
    opt.add_out(t, "output folder (SAELens format, with training.png)")
    opt.add_option(t, "--d-in", type=opt.positive_int, default=None, metavar="N",
                   help="expected activation width (checked against the store)")  # fmt: skip
    opt.add_option(t, "--max-tokens", type=opt.positive_int, default=None, metavar="N", aliases=("--tokens",),
                   help=f"training tokens (default: one pass over the training rows, at least {MIN_TOKENS:,}: "
                   "a small store is passed over several times)")  # fmt: skip
    opt.add_option(t, "--batch-size", type=opt.positive_int, default=4096, metavar="B",
                   help="tokens per training step (default: 4096)")  # fmt: skip
    opt.add_option(t, "--lr", type=opt.positive_float, default=None, metavar="LR",
                   help="Adam learning rate (default: 2e-4 * sqrt(16384 / width))")  # fmt: skip
    opt.add_option(t, "--l1-coeff", type=opt.nonneg_float, default=2.0, metavar="C",
                   help="relu: L1 coefficient (default: 2.0)")  # fmt: skip
    opt.add_option(t, "--l0-coeff", type=opt.nonneg_float, default=1.0, metavar="C",
                   help="jumprelu: L0 coefficient (default: 1.0)")  # fmt: skip
    opt.add_option(t, "--heldout", type=opt.fraction_closed, default=0.05, metavar="F",
                   help="fraction of the store's rows (the last ones) held out for evaluation (default: 0.05)")  # fmt: skip
    _add_sink_options(t, SKIP_FIRST, NORM_RATIO, "")
    opt.add_option(t, "--splice-docs", type=opt.nonneg_int, default=16, metavar="N",
                   help="held-out documents for the CE loss / KL scores (loads the store's model; 0: skip; default: 16)")  # fmt: skip
    opt.add_model(t, required=False, help="model for the splice metrics (default: the store's model)")
    opt.add_seed(t, 0, "seed of the SAE initialisation and the batch order")
    opt.add_device(t, "cpu")
    opt.add_option(t, "--checkpoint-every", type=opt.nonneg_int, default=0, metavar="STEPS",
                   help="steps between checkpoints; a rerun resumes from the last (0: none)")  # fmt: skip
    opt.add_overwrite(t)
    opt.add_no_progress(t)
    opt.add_json(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate an SAE on a model and data (FVU, L0, dead %%, splice metrics)")
    opt.add_option(e, "--sae", required=True, type=opt.path, metavar="DIR",
                   help="SAE folder (ours, SAELens, sparsify) or hub id owner/repo[/sub]")  # fmt: skip
    opt.add_model(e)
    opt.add_data(e)
    opt.add_hook(e, required=False, help="hook point (default: the hook recorded in the SAE)")
    opt.add_max_tokens(e, 4096, help="evaluate on documents up to this many tokens")
    opt.add_max_length(e, 256)
    _add_sink_options(e, None, None, "(overrides the rule recorded in the SAE)")
    opt.add_option(e, "--figure", type=opt.path, default=None, metavar="FILE",
                   help="also write the SAE's training curves (PNG) to FILE")  # fmt: skip
    opt.add_batch_size(e, 8)
    opt.add_device(e)
    opt.add_dtype(e)
    opt.add_no_progress(e)
    opt.add_json(e)
    e.set_defaults(func=cmd_eval)


def main(argv=None) -> int:
    """``python -m rosettalens.sae.cli ARGS`` = ``rosetta sae ARGS`` (e.g. under torchrun)."""
    from rosettalens.cli import main as rosetta

    argv = list(sys.argv[1:] if argv is None else argv)
    return rosetta(argv if argv[:1] == ["sae"] else ["sae", *argv])


if __name__ == "__main__":
    sys.exit(main())
