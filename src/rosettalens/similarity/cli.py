"""``rosetta compare``: every similarity metric for every layer pair of two activation stores."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from rosettalens import options as opt
from rosettalens.errors import ConfigError, StoreError

_HOOK = re.compile(r"^([a-z_]+)\.(-?\d+)$")


def _split(s: str | None) -> list[str]:
    return [h.strip() for h in (s or "").split(",") if h.strip()]


def _resolve_hooks(store: Any, names: list[str], side: str) -> list[str]:
    """Hook names as stored (negative layers counted from the end of the store's model)."""
    if not names:
        return list(store.hooks)
    n_layers = store.manifest.get("model", {}).get("n_layers")
    out = []
    for name in names:
        m = _HOOK.match(name)
        if m and int(m.group(2)) < 0 and n_layers is not None:
            name = f"{m.group(1)}.{int(m.group(2)) + int(n_layers)}"
        if name not in store.hooks:
            raise ConfigError(
                f"store {side} ({store.path}) has no hook {name!r}; stored hooks: {', '.join(store.hooks)}"
            )
        out.append(name)
    return out


def _same_rows(a: Any, b: Any) -> bool:
    ta = a.manifest.get("tokenizer", {}).get("sha256")
    tb = b.manifest.get("tokenizer", {}).get("sha256")
    if ta is None or ta != tb or len(a) != len(b):
        return False
    import torch

    return bool(torch.equal(a.token_ids, b.token_ids) and torch.equal(a.doc_index, b.doc_index))


def load_paired(
    path_a: str, path_b: str, hooks_a: list[str], hooks_b: list[str], pairing: str, max_rows: int, seed: int
) -> tuple[dict, dict, dict]:
    """Read two stores' hooks with paired rows: ``({hook: [n, d]}, {hook: [n, d]}, info)``."""
    import numpy as np
    import torch

    from rosettalens.store import ActivationStore

    sa, sb = ActivationStore.open(path_a), ActivationStore.open(path_b)
    ha, hb = _resolve_hooks(sa, hooks_a, "A"), _resolve_hooks(sb, hooks_b, "B")
    if _same_rows(sa, sb):
        rows_a = rows_b = torch.arange(len(sa))
        how = "row-by-row (same tokenizer and tokens)"
    else:
        try:
            from rosettalens.align import PairedStores
        except ImportError:
            raise StoreError(
                "the stores have different tokenizers or tokens and rosettalens.align.PairedStores is not "
                "available to pair them; compare stores extracted with the same tokenizer from the same data"
            ) from None
        pair = PairedStores(sa, sb, mode=pairing)
        rows_a, rows_b = pair.rows_a, pair.rows_b
        how = f"PairedStores(mode={pairing!r}), paired fraction {pair.paired_fraction:.3f}"
    n_all = int(rows_a.shape[0])
    if n_all < 4:
        raise StoreError(
            f"only {n_all} paired rows between {path_a} and {path_b}; need at least 4 to compare"
        )
    if max_rows and n_all > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(n_all, size=max_rows, replace=False))
        sel = torch.from_numpy(pick)
        rows_a, rows_b = rows_a[sel], rows_b[sel]
    xa = {h: sa.read(h, rows=rows_a) for h in ha}
    xb = {h: sb.read(h, rows=rows_b) for h in hb}
    info = {
        "store_a": str(sa.path),
        "store_b": str(sb.path),
        "model_a": sa.manifest.get("model", {}).get("name"),
        "model_b": sb.manifest.get("model", {}).get("name"),
        "pairing": how,
        "paired_rows": n_all,
        "rows_used": int(rows_a.shape[0]),
    }
    return xa, xb, info


def is_compare_dir(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``rosetta compare`` output (its ``config.json`` says so):
    the only non-empty folder that ``--overwrite`` replaces."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("command") == "compare"


def run_compare(args: argparse.Namespace) -> int:
    from rosettalens.io import atomic_dir
    from rosettalens.similarity.compare import compare_layers, plot_heatmap, write_json_atomic
    from rosettalens.similarity.permutation import metric_names

    # every option before the stores are read
    metrics = _split(args.metrics)
    bad = [m for m in metrics if m not in metric_names()]
    if not metrics or bad:
        raise ConfigError(
            f"--metrics: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(metric_names())}"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    opt.check_output(out, args.overwrite, "compare folder", replaceable=is_compare_dir)
    hooks_a = _split(args.hooks_a) or _split(args.hooks)
    hooks_b = _split(args.hooks_b) or _split(args.hooks)
    xa, xb, info = load_paired(args.a, args.b, hooks_a, hooks_b, args.pairing, args.max_rows, args.seed)
    kwargs = {
        "svcca": {"keep_variance": args.keep_variance},
        "linear_cka": {"debiased": args.debiased},
        "rbf_cka": {"sigma": args.sigma, "debiased": args.debiased},
        "mutual_knn": {"k": args.k},
        "jaccard_knn": {"k": args.k},
    }
    res = compare_layers(
        xa,
        xb,
        metrics,
        n_permutations=args.permutations,
        seed=args.seed,
        metric_kwargs={m: kwargs.get(m, {}) for m in metrics},
        device=args.device,
        progress=not args.json and not args.no_progress,
    )
    config = {
        "command": "compare",
        "a": args.a,
        "b": args.b,
        "hooks_a": res["hooks_a"],
        "hooks_b": res["hooks_b"],
        "metrics": metrics,
        "permutations": args.permutations,
        "max_rows": args.max_rows,
        "pairing": args.pairing,
        "seed": args.seed,
        "keep_variance": args.keep_variance,
        "sigma": args.sigma,
        "debiased": args.debiased,
        "k": args.k,
        "device": args.device,
    }
    results = {**info, **res}
    plots = {}
    # the run folder is built beside --out and swapped in whole: no stale plot of an earlier run survives
    with atomic_dir(out, overwrite=args.overwrite, what="compare folder", replaceable=is_compare_dir) as tmp:
        for m in metrics:
            png = plot_heatmap(
                res["metrics"][m]["value"],
                res["hooks_a"],
                res["hooks_b"],
                tmp / f"{m}.png",
                title=f"{m} (hatched: p >= 0.05)" if args.permutations else m,
                p_values=res["metrics"][m]["p_value"] if args.permutations else None,
                label_a=f"A: {info['model_a'] or args.a}",
                label_b=f"B: {info['model_b'] or args.b}",
            )
            plots[m] = png.name
        results["plots"] = plots
        write_json_atomic(opt.json_safe(config), tmp / "config.json")
        write_json_atomic(opt.json_safe(results), tmp / "results.json")
    if args.json:
        opt.print_json({"out": str(out), **results})
    else:
        print(
            f"{out}/results.json: {len(metrics)} metric(s) x {len(res['hooks_a'])} x {len(res['hooks_b'])} "
            f"hook pairs on {res['n_rows']} rows ({info['pairing']}); heatmaps: {', '.join(plots.values())}"
        )
    return 0


def register(subparsers: Any) -> None:
    """Add ``rosetta compare``."""
    p = subparsers.add_parser(
        "compare",
        help="similarity (SVCCA, CKA, RSA, ...) of every layer pair of two activation stores, with p-values",
        description="Compare two activation stores layer by layer: every metric for every (hook_a, hook_b) "
        "pair, each against a permutation null (shuffled row pairing). Stores from the same tokenizer and "
        "data are paired row by row; otherwise rows are paired by character offsets (rosettalens.align). "
        "Writes results.json, config.json and one heatmap PNG per metric under --out.",
    )
    opt.add_option(p, "--a", required=True, type=opt.path, metavar="STORE",
                   help="activation store of representation A (rosetta extract)")  # fmt: skip
    opt.add_option(p, "--b", required=True, type=opt.path, metavar="STORE",
                   help="activation store of representation B")  # fmt: skip
    opt.add_hook(
        p,
        "--hooks",
        required=False,
        help="comma-separated hooks for both stores (default: every stored hook)",
    )
    opt.add_hook(p, "--hooks-a", required=False, help="hooks of store A (overrides --hooks)")
    opt.add_hook(p, "--hooks-b", required=False, help="hooks of store B (overrides --hooks)")
    opt.add_option(p, "--metrics", default="svcca,linear_cka,rsa", metavar="M[,M..]",
                   help="comma-separated, from: cca, svcca, pwcca, linear_cka, rbf_cka, rsa, procrustes, "
                   "mutual_knn, jaccard_knn (default: svcca,linear_cka,rsa)")  # fmt: skip
    opt.add_option(p, "--permutations", type=opt.nonneg_int, default=100, metavar="N",
                   help="permutation-null size per pair, 0 for none (default: 100)")  # fmt: skip
    opt.add_out(p, "run folder for config.json, results.json and one heatmap per metric")
    opt.add_option(p, "--max-rows", type=opt.nonneg_int, default=10000, metavar="N",
                   help="use a seeded random subset of this many paired rows, 0 for all; RSA and RBF-CKA need "
                   "O(rows^2) memory (default: 10000)")  # fmt: skip
    opt.add_option(p, "--pairing", choices=["aligned", "last"], default="aligned",
                   help="pairing of rows across tokenizers: tokens ending at the same character, or each "
                   "document's last token (default: aligned)")  # fmt: skip
    opt.add_option(p, "--keep-variance", type=opt.fraction_upto1, default=0.99, metavar="F",
                   help="SVCCA: variance kept per input (default: 0.99)")  # fmt: skip
    opt.add_option(p, "--sigma", type=opt.positive_float, default=0.5, metavar="X",
                   help="RBF-CKA bandwidth as a fraction of the median distance (default: 0.5)")  # fmt: skip
    opt.add_option(p, "--debiased", action="store_true", help="debiased (unbiased HSIC) CKA")
    opt.add_option(p, "--k", type=opt.positive_int, default=10, metavar="K",
                   help="neighbours for mutual_knn and jaccard_knn (default: 10)")  # fmt: skip
    opt.add_seed(p, 0, "seed for row subsampling and permutations")
    opt.add_device(p, "cpu")
    opt.add_overwrite(p, "an earlier compare run in --out as a whole")
    opt.add_no_progress(p)
    opt.add_json(p)
    p.set_defaults(func=run_compare)
