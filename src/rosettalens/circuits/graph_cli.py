"""``rosetta graph``: the attribution graph of one prompt over a model's transcoders.

::

    rosetta graph --model M --transcoders DIR (--prompt TEXT | --task NAME) --out DIR [--json]

Writes ``graph.json`` (the pruned graph in circuit-tracer's graph file layout, with the scores),
``graph.safetensors`` (every edge) and ``graph.html`` (an SVG view of the pruned graph) into
``--out``; ``--json`` prints ``n_nodes``, ``n_edges``, ``replacement_score``, ``completeness_score``,
``intervention_agreement``, ``top_features`` and more. See docs/graphs.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rosettalens import options as opt
from rosettalens.errors import ConfigError, DataError

__all__ = ["register", "graph_summary"]


def graph_summary(hm: Any, tset: Any, graph: Any, gj: dict[str, Any], agreement: dict[str, Any]) -> dict:
    """The ``--json`` object of a graph: sizes, scores, agreement and the top features."""
    return {
        "model": hm.name,
        "prompt": graph.prompt,
        "n_tokens": graph.n_pos,
        "n_active_features": graph.info.get("n_active_features"),
        "n_feature_nodes": graph.n_features,
        "n_nodes_full": graph.n_nodes,
        "n_nodes": len(gj["nodes"]),
        "n_edges": len(gj["links"]),
        "replacement_score": gj["scores"]["replacement_score"],
        "completeness_score": gj["scores"]["completeness_score"],
        "intervention_agreement": agreement["spearman"],
        "intervention_agreement_frozen_norms": agreement["spearman_frozen_norms"],
        "intervention_agreement_frozen_attention": agreement["spearman_frozen_attention"],
        "intervention_features": agreement["n"],
        "intervention_scale": agreement.get("scale", 1.0),
        "logits": [
            {"token": s, "prob": float(p)}
            for s, p in zip(graph.logit_strs, graph.logit_probs.tolist(), strict=False)
        ],
        "top_features": graph.top_features(10),
    }


def _cmd_graph(args: argparse.Namespace) -> int:
    import torch

    import rosettalens
    from rosettalens.circuits.graph import build_graph, graph_scores, prune_graph
    from rosettalens.circuits.graph_checks import intervention_agreement
    from rosettalens.circuits.graph_view import graph_json, is_graph_dir, save_graph
    from rosettalens.io import atomic_dir
    from rosettalens.transcoders.model import SET_FILE, TranscoderSet

    if (args.prompt is None) == (args.task is None):
        raise ConfigError("give either --prompt TEXT or --task NAME")
    if args.prompt is not None and not args.prompt.strip():
        raise DataError("--prompt is empty")
    if not (Path(args.transcoders) / SET_FILE).is_file():
        raise DataError(
            f"--transcoders {args.transcoders} is not a transcoder set (no {SET_FILE}); "
            "train one with `rosetta transcoders train`"
        )
    if args.task is not None:
        from rosettalens.circuits.tasks import load_task

        load_task(args.task)
    opt.check_output(args.out, args.overwrite, "graph folder", replaceable=is_graph_dir)
    opt.check_models([args.model])
    tset = TranscoderSet.load(args.transcoders)  # read (and checked) before the model loads
    torch.manual_seed(args.seed)
    show = not (args.json or args.no_progress)
    hm = rosettalens.load(args.model, device=args.device, dtype=args.dtype, progress=show)
    for tc in tset.transcoders.values():
        tc.to(device=hm.device, dtype=hm.dtype)
    if args.task is not None:
        from rosettalens.circuits.tasks import load_task, make_prompts

        ps = make_prompts(hm, load_task(args.task), n=1, seed=args.seed)
        prompt = ps.clean_ids[0]  # the task's own ids (a trailing space token where digits split it off)
    else:
        prompt = args.prompt
    t0 = time.perf_counter()
    graph = build_graph(
        hm,
        tset,
        prompt,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        max_n_logits=args.max_logits,
        desired_logit_prob=args.logit_prob,
        progress=show,
    )
    build_s = time.perf_counter() - t0
    rep, comp = graph_scores(graph)
    pruning = prune_graph(graph, args.node_threshold, args.edge_threshold)
    agreement = intervention_agreement(
        hm, tset, graph, n_features=args.agreement_features, scale=args.agreement_scale
    )
    scores = {
        "replacement_score": rep,
        "completeness_score": comp,
        "intervention_agreement": agreement["spearman"],
        "intervention_agreement_frozen_norms": agreement["spearman_frozen_norms"],
        "intervention_agreement_frozen_attention": agreement["spearman_frozen_attention"],
        "intervention_features": agreement["features"],
        "build_seconds": round(build_s, 3),
    }
    gj = graph_json(
        graph,
        pruning,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        scores=scores,
    )
    out = Path(args.out)
    with atomic_dir(
        out.resolve(), overwrite=args.overwrite, what="graph folder", replaceable=is_graph_dir
    ) as tmp:
        save_graph(graph, tmp, gj, title=f"{hm.name}: attribution graph")
    payload = graph_summary(hm, tset, graph, gj, agreement)
    payload.update(build_seconds=round(build_s, 3), out=str(out.resolve()))
    if args.json:
        opt.print_json(payload)
        return 0
    print(
        f"{hm.name}: {graph.n_pos} tokens, {graph.info['n_active_features']} active features, "
        f"{graph.n_features} feature nodes; pruned to {payload['n_nodes']} nodes, {payload['n_edges']} edges "
        f"({build_s:.1f} s)"
    )
    print(
        f"replacement score {rep:.3f}, completeness score {comp:.3f}, "
        f"intervention agreement {agreement['spearman']:.3f} (Spearman over {agreement['n']} features; "
        f"{agreement['spearman_frozen_norms']:.3f} with the norms frozen as in the graph, "
        f"{agreement['spearman_frozen_attention']:.3f} with the attention patterns frozen too)"
    )
    for f in payload["top_features"][:5]:
        print(f"  {f['node_id']:>14}  influence {f['influence']:.4f}  at {f['token']!r}")
    print(f"wrote {out.resolve()}/graph.json, graph-metadata.json, graph.html, graph.safetensors")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``graph``."""
    from rosettalens.circuits.tasks import BUILTIN_TASKS

    p = subparsers.add_parser("graph", help="attribution graph of a prompt over transcoder features")
    opt.add_model(p)
    opt.add_option(p, "--transcoders", required=True, type=opt.path, metavar="DIR",
                   help="transcoder set folder of this model (rosetta transcoders train --out)")  # fmt: skip
    opt.add_option(p, "--prompt", default=None, metavar="TEXT", help="the prompt to attribute")
    opt.add_option(p, "--task", default=None, choices=list(BUILTIN_TASKS),
                   help="instead of --prompt: the first prompt of a built-in sequence task")  # fmt: skip
    opt.add_out(p, "folder for graph.json, graph.safetensors and graph.html")
    opt.add_overwrite(p, "an existing graph folder")
    opt.add_option(p, "--max-feature-nodes", type=opt.positive_int, default=512, metavar="N",
                   help="features that get rows, chosen by influence on the logits (default: 512)")  # fmt: skip
    opt.add_option(p, "--batch-size", type=opt.positive_int, default=16, metavar="N",
                   help="target nodes per backward pass; memory grows with it (default: 16)")  # fmt: skip
    opt.add_option(p, "--max-logits", type=opt.positive_int, default=10, metavar="N",
                   help="most logit nodes (default: 10)")  # fmt: skip
    opt.add_option(p, "--logit-prob", type=opt.fraction_upto1, default=0.95, metavar="P",
                   help="logit nodes until their probabilities sum to P (default: 0.95)")  # fmt: skip
    opt.add_option(p, "--node-threshold", type=opt.fraction_upto1, default=0.8, metavar="F",
                   help="pruning: keep the nodes carrying this share of the influence (default: 0.8)")  # fmt: skip
    opt.add_option(p, "--edge-threshold", type=opt.fraction_upto1, default=0.98, metavar="F",
                   help="pruning: keep the edges carrying this share of the influence (default: 0.98)")  # fmt: skip
    opt.add_option(p, "--agreement-features", type=opt.positive_int, default=20, metavar="N",
                   help="most influential features steered down for intervention_agreement (default: 20)")  # fmt: skip
    opt.add_option(p, "--agreement-scale", type=opt.positive_float, default=1.0, metavar="S",
                   help="intervention_agreement: subtract S x activation x decoder row (default: 1.0, the "
                   "whole feature)")  # fmt: skip
    opt.add_json(p)
    opt.add_no_progress(p)
    opt.add_device(p)
    opt.add_dtype(p)
    opt.add_seed(p, 0, "random seed (--task prompt choice)")
    p.set_defaults(func=_cmd_graph)
