"""``rosetta extract`` (activations into a store, see rosettalens.store) and ``rosetta data list|generate``."""

from __future__ import annotations

import argparse
import os

from rosettalens import options as opt
from rosettalens.errors import ConfigError


def _emit(args: argparse.Namespace, obj: dict, text: str) -> None:
    if getattr(args, "json", False):
        opt.print_json(obj)
    else:
        print(text)


def cmd_extract(args: argparse.Namespace) -> int:
    from rosettalens.store import extract

    opt.check_hooks(args.hooks, "--hooks")
    opt.check_models([args.model])
    opt.check_hook_layers(args.model, args.hooks, "--hooks")
    store = extract(
        args.model,
        args.hooks,
        args.data,
        args.out,
        field=args.field,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        positions=args.positions,
        keep_special=args.keep_special,
        shard_size=args.shard_size,
        dtype=args.store_dtype,
        overwrite=args.overwrite,
        device=args.device,
        model_dtype=args.dtype,
        device_map=args.device_map,
        progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    m = store.manifest
    summary = {
        "path": str(store.path),
        "model": m["model"]["name"],
        "hooks": store.hooks,
        "rows": len(store),
        "documents": m["n_documents"],
        "shards": len(m["shards"]),
        "dtype": m["dtype"],
        "positions": m["positions"],
    }
    _emit(
        args,
        summary,
        f"{store.path}: {len(store)} rows x {len(store.hooks)} hooks ({', '.join(store.hooks)})",
    )
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from rosettalens.data import builtin_datasets

    rows = builtin_datasets()
    if args.json:
        opt.print_json({"datasets": rows})
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['n_documents']:>5} docs  {r['description']}")
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    from rosettalens.data.generate import check_corpus_out, generate_to_file
    from rosettalens.models.loading import load

    if args.max_tokens is None:
        raise ConfigError("data generate: --max-tokens N is required (the tokens of text to generate)")
    # a corpus this command wrote (it has a .meta.json sidecar) is reused when the options match;
    # any other existing file is the user's: refused unless --overwrite
    check_corpus_out(args.out, args.overwrite)
    opt.check_models([args.model])
    hm = load(args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    res = generate_to_file(
        hm,
        args.out,
        args.max_tokens,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    note = " (cached)" if res["cached"] else ""
    _emit(args, res, f"{res['path']}: {res['n_documents']} documents, {res['n_tokens']} tokens{note}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="run a model over documents and store activations (sharded safetensors)",
        description="Store activations of one or more hook points at every token (or the last token) of "
        "every document. Resumes an interrupted run with the same command; runs under torchrun "
        "(torchrun ... -m rosettalens.cli extract ...).",
    )
    opt.add_model(p)
    opt.add_hook(p, "--hooks", help="comma-separated hook points, e.g. resid_post.10,resid_post.-1")
    opt.add_data(p)
    opt.add_out(p, "store folder (sharded safetensors + manifest.json)")
    opt.add_option(p, "--field", default=None, metavar="NAME",
                   help="text field of a .jsonl file or dataset (default: text)")  # fmt: skip
    opt.add_max_tokens(p, None, "stop after this many stored tokens (default: every document)")
    opt.add_max_length(p, 1024)
    p.set_defaults(max_length=None)  # the store's own default (1024) applies
    opt.add_batch_size(p, 8)
    opt.add_option(p, "--positions", choices=["all", "last"], default="all",
                   help="store every token, or only each document's last token (default: all)")  # fmt: skip
    opt.add_option(p, "--keep-special", action="store_true", help="also store BOS and other special tokens")
    opt.add_option(p, "--shard-size", type=opt.positive_int, default=16384, metavar="N",
                   help="rows per shard file (default: 16384)")  # fmt: skip
    opt.add_option(p, "--store-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the stored activations (default: float32)")  # fmt: skip
    opt.add_dtype(p)
    opt.add_device(p)
    opt.add_device_map(p)
    opt.add_overwrite(p, "a store written with another config (the same command again resumes)")
    opt.add_no_progress(p)
    opt.add_json(p)
    p.set_defaults(func=cmd_extract)

    d = subparsers.add_parser("data", help="built-in datasets and model-generated corpora")
    dsub = d.add_subparsers(dest="data_command", required=True)
    lp = dsub.add_parser("list", help="list the built-in datasets")
    opt.add_json(lp)
    lp.set_defaults(func=cmd_data_list)
    g = dsub.add_parser("generate", help="sample a diverse, deduplicated corpus from a base model")
    opt.add_model(g, required=False, default="gemma-3-270m", help="the model that writes the corpus")
    opt.add_max_tokens(g, None, "tokens of text to generate in all (required)", aliases=("--n-tokens",))
    opt.add_out(g, ".jsonl (keeps metadata) or .txt file", metavar="FILE")
    opt.add_seed(g)
    opt.add_max_new_tokens(g, 96)
    opt.add_batch_size(g, 8, "prompts")
    opt.add_device(g)
    opt.add_dtype(g)
    opt.add_overwrite(
        g, "an existing --out (a rerun with the same options reuses the corpus this command wrote)"
    )
    opt.add_no_progress(g)
    opt.add_json(g)
    g.set_defaults(func=cmd_data_generate)
    from rosettalens.data.corpus_cli import register_cli as register_corpus

    register_corpus(dsub)  # rosetta data corpus build
