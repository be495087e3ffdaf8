"""``rosetta map train | eval``.

::

    rosetta map train --source M:HOOK --target M:HOOK --data D --mapper affine|orthogonal|lowrank|autoencoder
                      --out DIR [--max-tokens N] [--pairing auto|all|aligned|last] [--heldout F]
                      [--rank R] [--alpha A] [--hidden H] [--epochs E] [--patience P] [--lr LR] [--json]
    rosetta map train --source M:HOOK --target M:HOOK --source-store DIR --target-store DIR --mapper K --out DIR
    rosetta map eval  --mapper-dir DIR --data D [--source M:HOOK] [--target M:HOOK] [--json]

``train`` extracts paired activations in memory (``hm.run_with_cache``) from the documents of ``D``
(or reads them from two activation stores), holds out a fraction of the documents, fits the mapper,
and saves it to ``DIR`` with its held-out FVU / R² / cosine in ``config.json``. ``eval`` loads the
models recorded in the mapper (or given), and reports held-out activation metrics and fidelity
inside the target (next-token KL, loss recovered, greedy token match). Bad input: one line on
stderr, exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rosettalens import options as opt
from rosettalens.errors import ConfigError, DataError

__all__ = ["register"]

KINDS = ("affine", "orthogonal", "lowrank", "autoencoder")


def _model_hook(spec: str | None, what: str) -> tuple[str, str]:
    if not spec or ":" not in spec:
        raise ConfigError(
            f"--{what} must be MODEL:HOOK (e.g. smollm2-135m-instruct:resid_post.12), got {spec!r}"
        )
    model, hook = spec.rsplit(":", 1)
    if not model or not hook:
        raise ConfigError(f"--{what} must be MODEL:HOOK, got {spec!r}")
    return model, hook


def _load_models(args, src_name: str, tgt_name: str):
    import rosettalens

    kw = dict(device=args.device, dtype=args.dtype, progress=not args.no_progress)
    src = rosettalens.load(src_name, **kw)
    tgt = src if tgt_name == src_name else rosettalens.load(tgt_name, **kw)
    return src, tgt


def _documents(spec: str) -> tuple[list[str], dict]:
    from rosettalens.data import load_documents

    corpus = load_documents(spec)
    docs = [d for d in corpus.documents if d and d.strip()]
    if not docs:
        raise DataError(f"data {spec!r} holds no non-empty documents")
    return docs, corpus.describe()


def _make_mapper(args):
    from rosettalens.mapping import AffineMapper, AutoencoderMapper, LowRankMapper, OrthogonalMapper

    if args.kind == "affine":
        return AffineMapper(alpha=args.alpha, seed=args.seed)
    if args.kind == "orthogonal":
        return OrthogonalMapper()
    if args.kind == "lowrank":
        return LowRankMapper(rank=args.rank, alpha=args.alpha or 0.0)
    return AutoencoderMapper(
        hidden=args.hidden,
        lr=args.lr,
        max_epochs=args.epochs,
        patience=args.patience,
        batch_size=args.train_batch_size,
        seed=args.seed,
    )


# ---------------------------------------------------------------------------------------------- train
def _default_checkpoint(out: Path) -> Path:
    """Where an autoencoder fit checkpoints by default: a hidden sibling of ``OUT`` (removed on success),
    so ``OUT`` appears only whole and an interrupted run resumes with the same command."""
    return out.parent / f".{out.name}.checkpoint"


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from rosettalens.mapping.base import is_mapper_dir
    from rosettalens.mapping.evaluate import activation_metrics

    if args.kind not in KINDS:
        raise ConfigError(f"unknown --mapper {args.kind!r}; expected one of {', '.join(KINDS)}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    src_name, src_hook = _model_hook(args.source, "source")
    tgt_name, tgt_hook = _model_hook(args.target, "target")
    opt.check_hooks([src_hook], "--source")
    opt.check_hooks([tgt_hook], "--target")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a folder for the mapper")
    opt.check_output(out_dir, args.overwrite, "mapper folder", replaceable=is_mapper_dir)  # before training
    stores = args.source_store or args.target_store
    if stores:
        if not (args.source_store and args.target_store) or args.data:
            raise ConfigError("give either --data, or both --source-store and --target-store")
    else:
        if not args.data:
            raise ConfigError("--data is required (or --source-store and --target-store)")
        opt.check_models([src_name, tgt_name])
        opt.check_hook_layers(src_name, [src_hook], "--source")
        opt.check_hook_layers(tgt_name, [tgt_hook], "--target")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    progress = not args.no_progress
    mapper = _make_mapper(args)  # validates hyper-parameters before any heavy work
    if stores:
        X, Y, Xh, Yh, data_info = _pairs_from_stores(args, src_name, src_hook, tgt_name, tgt_hook)
    else:
        X, Y, Xh, Yh, data_info, src_hook, tgt_hook = _pairs_from_models(
            args, src_name, src_hook, tgt_name, tgt_hook, progress
        )
    if args.kind == "lowrank" and args.rank > min(X.shape[1], Y.shape[1]):
        raise ConfigError(f"--rank {args.rank} exceeds min(d_src, d_tgt) = {min(X.shape[1], Y.shape[1])}")
    if args.kind == "autoencoder":
        ckpt = Path(args.checkpoint) if args.checkpoint else _default_checkpoint(out_dir)
        dev = (
            args.device
            if args.device not in (None, "auto")
            else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        mapper.fit(X, Y, checkpoint_dir=ckpt, progress=progress, device=dev)
    else:
        mapper.fit(X, Y)
    heldout = activation_metrics(mapper, Xh, Yh)
    mapper.fit_info["heldout"] = heldout
    mapper.fit_info["data"] = data_info
    out = mapper.save(
        args.out,
        source_model=src_name,
        target_model=tgt_name,
        source_hook=src_hook,
        target_hook=tgt_hook,
        overwrite=args.overwrite,
    )
    if args.kind == "autoencoder" and not args.checkpoint:
        import shutil

        shutil.rmtree(_default_checkpoint(out_dir), ignore_errors=True)
    fit_summary = {k: v for k, v in mapper.fit_info.items() if k not in ("history", "heldout", "data")}
    result = {
        "out": str(out),
        "kind": mapper.kind,
        "source": f"{src_name}:{src_hook}",
        "target": f"{tgt_name}:{tgt_hook}",
        "d_src": mapper.d_src,
        "d_tgt": mapper.d_tgt,
        "n_train": int(X.shape[0]),
        "n_heldout": int(Xh.shape[0]),
        "pairing": data_info.get("pairing"),
        "heldout": heldout,
        "fit": fit_summary,
    }
    if args.json:
        opt.print_json(result)
    else:
        print(
            f"{mapper.kind} mapper {src_name}:{src_hook} -> {tgt_name}:{tgt_hook} ({mapper.d_src} -> {mapper.d_tgt})"
        )
        print(f"  trained on {X.shape[0]} pairs ({data_info.get('pairing')}), held out {Xh.shape[0]}")
        print(
            f"  held-out FVU {heldout['fvu']:.4f}  R2 {heldout['r2']:.4f}  mean cos {heldout['mean_cosine']:.4f}"
            f" (shuffled {heldout['mean_cosine_shuffled']:.4f})"
        )
        print(f"  saved to {out}")
    return 0


def _pairs_from_models(args, src_name, src_hook, tgt_name, tgt_hook, progress):
    import torch

    from rosettalens.mapping.pairs import paired_activations

    docs, desc = _documents(args.data)
    if len(docs) < 2:
        raise DataError(f"data {args.data!r} has {len(docs)} document(s); need at least 2 (train + held out)")
    g = torch.Generator().manual_seed(args.seed or 0)
    perm = torch.randperm(len(docs), generator=g).tolist()
    n_held = min(max(1, round(len(docs) * args.heldout)), len(docs) - 1)
    held_docs = [docs[i] for i in sorted(perm[:n_held])]
    train_docs = [docs[i] for i in sorted(perm[n_held:])]
    src_hm, tgt_hm = _load_models(args, src_name, tgt_name)
    src_hook, tgt_hook = src_hm.resolve_hook(src_hook), tgt_hm.resolve_hook(tgt_hook)
    kw = dict(pairing=args.pairing, max_length=args.max_length, batch_size=args.batch_size, progress=progress)
    X, Y, info = paired_activations(
        src_hm, tgt_hm, train_docs, src_hook, tgt_hook, max_tokens=args.max_tokens, **kw
    )
    held_max = max(2, (args.max_tokens or X.shape[0]) // 4)
    Xh, Yh, hinfo = paired_activations(
        src_hm, tgt_hm, held_docs, src_hook, tgt_hook, max_tokens=held_max, **kw
    )
    data_info = {
        "source": "models",
        "data": {k: desc.get(k) for k in ("spec", "n_documents", "sha256")},
        "pairing": info["pairing"],
        "n_train_documents": len(train_docs),
        "n_heldout_documents": len(held_docs),
        "heldout_seed": args.seed or 0,
        "train": info,
        "heldout": hinfo,
    }
    return X, Y, Xh, Yh, data_info, src_hook, tgt_hook


def _pairs_from_stores(args, src_name, src_hook, tgt_name, tgt_hook):
    import torch

    from rosettalens.align import PairedStores
    from rosettalens.store import ActivationStore

    a = ActivationStore.open(args.source_store)
    b = ActivationStore.open(args.target_store)
    from rosettalens.models.loading import display_name

    for store, name, what in ((a, src_name, "source"), (b, tgt_name, "target")):
        stored = store.manifest.get("model", {}).get("name")
        if stored is not None and display_name(name) != stored:
            raise ConfigError(
                f"--{what} names model {name!r} but the {what} store {store.path} holds activations of "
                f"{stored!r}; give --{what} {stored}:HOOK"
            )
    for store, hook, what in ((a, src_hook, "source"), (b, tgt_hook, "target")):
        if hook not in store.hooks:
            raise ConfigError(
                f"{what} store {store.path} has no hook {hook!r} (it has {', '.join(store.hooks)})"
            )
    mode = "last" if args.pairing == "last" else "aligned"
    pair = PairedStores(a, b, mode=mode)
    n = len(pair)
    if n < 4:
        raise DataError(f"only {n} paired rows between {a.path} and {b.path}; need at least 4")
    g = torch.Generator().manual_seed(args.seed or 0)
    perm = torch.randperm(n, generator=g)
    n_held = min(max(1, round(n * args.heldout)), n - 2)
    held, train = perm[:n_held].sort().values, perm[n_held:].sort().values
    if args.max_tokens:
        train = train[: args.max_tokens]
    X, Y = pair.read(src_hook, tgt_hook, rows=train)
    Xh, Yh = pair.read(src_hook, tgt_hook, rows=held)
    info = {
        "source": "stores",
        "source_store": str(a.path),
        "target_store": str(b.path),
        "pairing": mode,
        "paired_fraction": pair.paired_fraction,
        "n_pairs": n,
    }
    return X.float(), Y.float(), Xh.float(), Yh.float(), info


# ---------------------------------------------------------------------------------------------- eval
def _cmd_eval(args: argparse.Namespace) -> int:
    from rosettalens.mapping import load_mapper
    from rosettalens.mapping.evaluate import check_widths, evaluate

    if args.out:
        if Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a folder; give a .json file name")
        opt.check_output(args.out, args.overwrite, "results file")
    mapper = load_mapper(args.mapper)
    meta = mapper.meta
    src: tuple[str | None, str | None]
    tgt: tuple[str | None, str | None]
    src = (
        _model_hook(args.source, "source")
        if args.source
        else (meta.get("source_model"), meta.get("source_hook"))
    )
    tgt = (
        _model_hook(args.target, "target")
        if args.target
        else (meta.get("target_model"), meta.get("target_hook"))
    )
    (src_name, src_hook), (tgt_name, tgt_hook) = src, tgt
    if not (src_name and src_hook and tgt_name and tgt_hook):
        raise ConfigError(
            f"mapper {args.mapper} does not record its source/target model and hook; give --source M:HOOK --target M:HOOK"
        )
    opt.check_models([src_name, tgt_name])
    docs, desc = _documents(args.data)
    src_hm, tgt_hm = _load_models(args, src_name, tgt_name)
    src_hook, tgt_hook = src_hm.resolve_hook(src_hook), tgt_hm.resolve_hook(tgt_hook)
    check_widths(mapper, src_hm, tgt_hm, src_hook, tgt_hook)
    res = evaluate(
        mapper,
        src_hm,
        tgt_hm,
        docs,
        src_hook,
        tgt_hook,
        pairing=args.pairing,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        fidelity_texts=args.fidelity_texts,
        n_generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    res["mapper"]["dir"] = str(args.mapper)
    res["mapper"]["source_model"], res["mapper"]["target_model"] = src_name, tgt_name
    res["data"] = {k: desc.get(k) for k in ("spec", "n_documents", "sha256")}
    res = opt.json_safe(res)
    if args.out:
        from rosettalens.io import atomic_write_json

        atomic_write_json(Path(args.out), res, overwrite=args.overwrite)
    if args.json:
        opt.print_json(res)
        return 0
    a, f = res["activations"], res["fidelity"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"{mapper.kind} mapper {src_name}:{src_hook} -> {tgt_name}:{tgt_hook} on {args.data}")
    print(
        f"  activations ({a['n']} pairs, {res['pairs']['pairing']}): FVU {fmt(a['fvu'])}  R2 {fmt(a['r2'])}",
        end="",
    )
    print(f"  mean cos {fmt(a['mean_cosine'])} (shuffled {fmt(a['mean_cosine_shuffled'])})")
    print(
        f"  in target ({f['n_positions']} positions): KL {fmt(f['kl'])} nats"
        f" (zero-abl {fmt(f['kl_zero_ablation'])}, mean-abl {fmt(f['kl_mean_ablation'])})"
    )
    if "loss_clean" in f:
        print(
            f"  loss clean {fmt(f['loss_clean'])}  patched {fmt(f['loss_patched'])}  "
            f"recovered vs zero {fmt(f['loss_recovered_zero'])}  vs mean {fmt(f['loss_recovered_mean'])}"
        )
    gen = f.get("generation")
    if gen:
        print(f"  greedy token match {fmt(gen['token_match_rate'])} over {gen['n_prompts']} prompts")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    opt.add_option(p, "--pairing", default="auto", choices=("auto", "all", "aligned", "last"),
                   help="position pairing: all (same tokenizer), aligned (tokens ending at the same character), "
                   "last (each document's last token); auto picks (default: auto)")  # fmt: skip
    opt.add_max_length(p, 128)
    opt.add_batch_size(p, 8)
    opt.add_device(p)
    opt.add_dtype(p)
    opt.add_overwrite(p)
    opt.add_seed(p, 0, "seed of the held-out split and of the fit")
    opt.add_json(p)
    opt.add_no_progress(p)


def register(subparsers) -> None:
    """Add ``rosetta map train`` and ``rosetta map eval``."""
    mp = subparsers.add_parser("map", help="fit and evaluate mappers between two models' activation spaces")
    sub = mp.add_subparsers(dest="map_command", required=True, parser_class=type(mp))

    t = sub.add_parser("train", help="fit a mapper from source to target activations",
                       description="Fit a mapper from paired activations and save it (safetensors + config.json).")  # fmt: skip
    opt.add_option(t, "--source", required=True, metavar="MODEL:HOOK",
                   help="the source model and hook, e.g. smollm2-135m-instruct:resid_post.12")  # fmt: skip
    opt.add_option(t, "--target", required=True, metavar="MODEL:HOOK", help="the target model and hook")
    opt.add_data(t, required=False, help="documents: built-in dataset name, .txt, .jsonl or hf:<id> "
                 "(or --source-store and --target-store)")  # fmt: skip
    opt.add_option(t, "--source-store", type=opt.path, metavar="DIR",
                   help="read source activations from this store instead of --data")  # fmt: skip
    opt.add_option(t, "--target-store", type=opt.path, metavar="DIR",
                   help="read target activations from this store instead of --data")  # fmt: skip
    opt.add_option(t, "--mapper", dest="kind", default="affine", choices=KINDS, aliases=("--kind",),
                   help="mapper kind fitted from source to target (default: affine)")  # fmt: skip
    opt.add_out(t, "output folder for the mapper")
    opt.add_max_tokens(t, 20000, "paired training rows to extract")
    opt.add_heldout(t, 0.1)
    opt.add_option(t, "--rank", type=opt.positive_int, default=32, metavar="R",
                   help="--mapper lowrank: rank (default: 32)")  # fmt: skip
    opt.add_option(t, "--alpha", type=opt.nonneg_float, default=None, metavar="X",
                   help="--mapper affine/lowrank: fixed relative ridge (default: chosen on held-out rows)")  # fmt: skip
    opt.add_option(t, "--hidden", type=opt.positive_int, default=None, metavar="H",
                   help="--mapper autoencoder: hidden width (default: sqrt(d_src * d_tgt))")  # fmt: skip
    opt.add_option(t, "--epochs", type=opt.positive_int, default=100, metavar="N",
                   help="--mapper autoencoder: most epochs (default: 100)")  # fmt: skip
    opt.add_option(t, "--patience", type=opt.positive_int, default=5, metavar="N",
                   help="--mapper autoencoder: epochs without improvement before stopping (default: 5)")  # fmt: skip
    opt.add_option(t, "--lr", type=opt.positive_float, default=1e-3, metavar="X",
                   help="--mapper autoencoder: AdamW learning rate (default: 0.001)")  # fmt: skip
    opt.add_option(t, "--train-batch-size", type=opt.positive_int, default=256, metavar="B",
                   help="--mapper autoencoder: rows per training step (default: 256)")  # fmt: skip
    opt.add_option(t, "--checkpoint", default=None, metavar="DIR",
                   help="--mapper autoencoder: checkpoint folder; an interrupted fit resumes from it "
                   "(default: .OUT.checkpoint beside OUT, removed on success)")  # fmt: skip
    _common(t)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a mapper on held-out data and inside the target model",
                       description="Held-out FVU/R2/cosine, and next-token KL, loss recovered and greedy token "
                                   "match with mapped activations spliced into the target.")  # fmt: skip
    opt.add_option(e, "--mapper-dir", dest="mapper", required=True, type=opt.path, metavar="DIR",
                   help="mapper folder written by `rosetta map train`", aliases=("--mapper",))  # fmt: skip
    opt.add_data(e, help="held-out documents: built-in dataset name, .txt, .jsonl or hf:<id>")
    opt.add_option(e, "--source", default=None, metavar="MODEL:HOOK",
                   help="override the mapper's recorded source model and hook (default: the mapper's)")  # fmt: skip
    opt.add_option(e, "--target", default=None, metavar="MODEL:HOOK",
                   help="override the mapper's recorded target model and hook (default: the mapper's)")  # fmt: skip
    opt.add_max_tokens(e, 5000, "paired rows for the activation metrics")
    opt.add_option(e, "--fidelity-texts", type=opt.nonneg_int, default=32, metavar="N",
                   help="documents whose mapped activations are spliced into the target (default: 32)")  # fmt: skip
    opt.add_option(e, "--generate", type=opt.nonneg_int, default=4, metavar="N",
                   help="prompts for greedy completions with and without the mapper, 0 to skip (default: 4)")  # fmt: skip
    opt.add_max_new_tokens(e, 16)
    opt.add_out(e, "also write the results JSON to this file", required=False, metavar="FILE")
    _common(e)
    e.set_defaults(func=_cmd_eval)
