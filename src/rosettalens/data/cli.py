"""``rosetta extract`` (activations into a store, see rosettalens.store) and ``rosetta data list|generate``."""

from __future__ import annotations

import argparse
import os

from rosettalens import options as opt


def _emit(args: argparse.Namespace, obj: dict, text: str) -> None:
    if getattr(args, "json", False):
        opt.print_json(obj)
    else:
        print(text)


def cmd_extract(args: argparse.Namespace) -> int:
    from rosettalens.store import extract

    opt.check_hooks(args.hooks, "--hooks")
    opt.check_models([args.model])
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

    # a corpus this command wrote (it has a .meta.json sidecar) is reused when the options match;
    # any other existing file is the user's: refused unless --overwrite
    check_corpus_out(args.out, args.overwrite)
    opt.check_models([args.model])
    hm = load(args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    res = generate_to_file(
        hm,
        args.out,
        args.n_tokens,
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
    p.add_argument("--model", required=True, type=opt.path, help="zoo name, HF folder, .gguf file or hub id")
    p.add_argument(
        "--hooks", required=True, help="comma-separated hook points, e.g. resid_post.10,resid_post.-1"
    )
    p.add_argument(
        "--data", required=True, type=opt.data_spec, help="built-in dataset name, .txt/.jsonl file or hf:<id>"
    )
    p.add_argument("--out", required=True, type=opt.path, help="store directory")
    p.add_argument("--field", default=None, help="text field of a .jsonl file or dataset (default: text)")
    p.add_argument(
        "--max-tokens", type=opt.positive_int, default=None, help="stop after this many stored tokens"
    )
    p.add_argument(
        "--max-length",
        type=opt.positive_int,
        default=None,
        help="truncate documents to this many tokens (default 1024)",
    )
    p.add_argument("--batch-size", type=opt.positive_int, default=8, help="documents per forward pass")
    p.add_argument("--positions", choices=["all", "last"], default="all")
    p.add_argument("--keep-special", action="store_true", help="also store BOS and other special tokens")
    p.add_argument("--shard-size", type=opt.positive_int, default=16384, help="rows per shard")
    p.add_argument("--store-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--dtype", type=opt.dtype, default=None, help="model compute dtype (default float32)")
    p.add_argument("--device", type=opt.device, default=None)
    p.add_argument(
        "--device-map", type=opt.device_map, default=None, help="'auto' spreads a large model with accelerate"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store written with another config (the same command again resumes)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_extract)

    d = subparsers.add_parser("data", help="built-in datasets and model-generated corpora")
    dsub = d.add_subparsers(dest="data_command", required=True)
    lp = dsub.add_parser("list", help="list the built-in datasets")
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=cmd_data_list)
    g = dsub.add_parser("generate", help="sample a diverse, deduplicated corpus from a base model")
    g.add_argument("--model", type=opt.path, default="gemma-3-270m")
    g.add_argument("--n-tokens", type=opt.positive_int, required=True)
    g.add_argument("--out", required=True, type=opt.path, help=".jsonl (keeps metadata) or .txt file")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=opt.positive_int, default=96)
    g.add_argument("--batch-size", type=opt.positive_int, default=8)
    g.add_argument("--device", type=opt.device, default=None)
    g.add_argument("--dtype", type=opt.dtype, default=None)
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (a rerun with the same options reuses the corpus this command wrote)",
    )
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_data_generate)
    from rosettalens.data.corpus import register_cli as register_corpus

    register_corpus(dsub)  # rosetta data corpus build
