"""``rosetta data corpus build``: the offline corpus of :mod:`rosettalens.data.corpus` into the cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from rosettalens import options as opt
from rosettalens.data.corpus import DEFAULT_NAME, SOURCES, build_corpus, corpus_dir

__all__ = ["cmd_corpus_build", "register_cli"]


def cmd_corpus_build(args: argparse.Namespace) -> int:
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    m = build_corpus(args.name, sources, out=args.out, overwrite=args.overwrite, max_chars=args.max_chars,
                     progress=not args.no_progress)  # fmt: skip
    path = str(Path(args.out) if args.out else corpus_dir(args.name))
    summary = {"path": path, **{k: m[k] for k in ("name", "n_docs", "chars", "tokens", "dedup", "sources")}}
    if args.json:
        opt.print_json(summary)
    else:
        toks = ", ".join(f"{k} {v['total']}" for k, v in m["tokens"].items()) or "no cached tokenizer"
        print(f"{path}: {m['n_docs']} documents, {m['chars']} characters; tokens: {toks}")
    return 0


def register_cli(data_subparsers) -> None:
    """Add ``rosetta data corpus build`` to the ``data`` command's subparsers."""
    c = data_subparsers.add_parser("corpus", help="a real-text corpus built offline (stdlib, installed docs)")
    csub = c.add_subparsers(dest="corpus_command", required=True)
    b = csub.add_parser("build", help="build the corpus into the cache (once; --data corpus reads it)")
    opt.add_option(b, "--name", default=DEFAULT_NAME, metavar="NAME",
                   help=f"corpus name; --data corpus:NAME reads it (default: {DEFAULT_NAME})")  # fmt: skip
    opt.add_option(b, "--sources", default=",".join(SOURCES), metavar="S[,S..]",
                   help=f"sources to read: {', '.join(SOURCES)} (default: all)")  # fmt: skip
    opt.add_option(b, "--max-chars", type=opt.positive_int, default=1500, metavar="N",
                   help="documents are cut at blank lines into pieces of at most N characters (default: 1500)")  # fmt: skip
    opt.add_out(b, "folder to write (default: $ROSETTA_CACHE/corpus/NAME)", required=False)
    opt.add_overwrite(b, "an existing corpus")
    opt.add_no_progress(b)
    opt.add_json(b)
    b.set_defaults(func=cmd_corpus_build)
