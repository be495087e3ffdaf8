"""Attribution graph files: ``graph.json`` in circuit-tracer's graph file layout, ``graph.safetensors``
(every edge, to reload the graph whole) and a self-contained HTML view of the pruned graph.

``graph.json`` (what circuit-tracer's viewer reads, plus ``scores``)::

    {"metadata": {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
                  "schema_version": 1, "info": {...}},
     "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
     "nodes": [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
                "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence",
                "activation"}, ...],
     "links": [{"source", "target", "weight"}, ...],
     "scores": {"replacement_score", "completeness_score", ...}}

Node ids as circuit-tracer writes them: feature ``{layer}_{feature}_{pos}``, error ``{layer}_-1_{pos}``,
embedding ``E_{token}_{pos}``, logit ``{n_layers + 1}_{token}_{pos}``; ``feature_type`` is
``"cross layer transcoder"`` (the viewer's name for transcoder features), ``"mlp reconstruction
error"``, ``"embedding"`` or ``"logit"``; ``influence`` is the node's cumulative influence share.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from .graph import AttributionGraph, GraphPruning, graph_scores, prune_graph

__all__ = ["GRAPH_FILES", "graph_html", "graph_json", "is_graph_dir", "load_graph", "save_graph"]

GRAPH_FILES = ("graph.json", "graph-metadata.json", "graph.safetensors", "graph.html")
_FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node_record(graph: AttributionGraph, i: int, cumulative: float) -> dict[str, Any]:
    n = graph.node(i)
    kind = n["kind"]
    rec: dict[str, Any] = {
        "node_id": graph.node_id(i),
        "layer": str(n.get("layer", "E" if kind == "token" else graph.n_layers + 1)),
        "ctx_idx": n["pos"],
        "feature_type": _FEATURE_TYPES[kind],
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "clerp": "",
        "influence": cumulative,
        "activation": None,
    }
    if kind == "feature":
        rec.update(feature=_cantor(n["layer"], n["feature"]), activation=n["activation"])
        rec["jsNodeId"] = f"{n['layer']}_{n['feature']}-0"
        rec["clerp"] = f"L{n['layer']} feature {n['feature']} at {graph.tokens[n['pos']]!r}"
    elif kind == "error":
        rec.update(feature=-1, jsNodeId=f"{n['layer']}_-1-{n['pos']}")
        rec["clerp"] = f"L{n['layer']} MLP error at {graph.tokens[n['pos']]!r}"
    elif kind == "token":
        rec.update(feature=n["pos"], jsNodeId=f"E_{n['token_id']}-{n['pos']}", clerp=repr(n["token"]))
    else:
        rec.update(feature=n["token_id"], jsNodeId=f"L_{n['token_id']}-{n['pos']}", token_prob=n["prob"])
        rec["influence"] = None  # a logit has no influence on the logits (circuit-tracer leaves it out)
        rec["is_target_logit"] = i == graph.logit_start
        rec["clerp"] = f'Output "{n["token"]}" (p={n["prob"]:.3f})'
    return rec


def graph_json(
    graph: AttributionGraph,
    pruning: GraphPruning | None = None,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    slug: str = "graph",
    scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The pruned graph as circuit-tracer's graph file (a dict; see the module docstring)."""
    pr = pruning if pruning is not None else prune_graph(graph, node_threshold, edge_threshold)
    keep = pr.node_mask.nonzero().flatten().tolist()
    nodes = {i: _node_record(graph, i, float(pr.cumulative[i])) for i in keep}
    rows = graph.row_nodes
    links = []
    r_idx, c_idx = pr.edge_mask.nonzero(as_tuple=True)
    for r, c in zip(r_idx.tolist(), c_idx.tolist(), strict=True):
        tgt, src = int(rows[r]), c
        if src in nodes and tgt in nodes:
            links.append(
                {
                    "source": nodes[src]["node_id"],
                    "target": nodes[tgt]["node_id"],
                    "weight": float(graph.edges[r, c]),
                }
            )
    used = {x["source"] for x in links} | {x["target"] for x in links}
    node_list = [
        n for n in nodes.values() if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")
    ]
    if scores is None:
        rep, comp = graph_scores(graph)
        scores = {"replacement_score": rep, "completeness_score": comp}
    return {
        "metadata": {
            "slug": slug,
            "scan": graph.info.get("scan", graph.model),
            "transcoder_list": [],
            "prompt_tokens": list(graph.tokens),
            "prompt": graph.prompt,
            "node_threshold": node_threshold,
            "schema_version": 1,
            "info": {
                "model": graph.model,
                "n_layers": graph.n_layers,
                "edge_threshold": edge_threshold,
                "n_nodes_full": graph.n_nodes,
                "n_features_full": graph.n_features,
                **graph.info,
            },
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": node_list,
        "links": links,
        "scores": scores,
    }


_COLORS = {
    "cross layer transcoder": "#4e79a7",
    "mlp reconstruction error": "#9c9c9c",
    "embedding": "#59a14f",
    "logit": "#e15759",
}


def graph_html(gj: dict[str, Any], title: str = "attribution graph") -> str:
    """A self-contained HTML page: the pruned graph as an SVG (x = token position, y = layer;
    edges blue positive / red negative, width by |weight|), with every node's details on hover."""
    meta = gj["metadata"]
    tokens = meta["prompt_tokens"]
    n_layers = int(meta["info"]["n_layers"])
    nodes, links = gj["nodes"], gj["links"]
    col_w, row_h, left, top = 70, 36, 60, 30
    width = left + col_w * max(len(tokens), 1) + 40
    height = top + row_h * (n_layers + 2) + 70

    def y_of(layer: str) -> float:
        lv = -1 if layer == "E" else int(layer)
        return top + row_h * (n_layers + 1 - (lv + 1))

    # spread nodes sharing a (layer, position) cell
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for n in nodes:
        cells.setdefault((n["layer"], int(n["ctx_idx"])), []).append(n)
    xy: dict[str, tuple[float, float]] = {}
    for (layer, pos), group in cells.items():
        for j, n in enumerate(group):
            off = (j - (len(group) - 1) / 2) * min(12.0, (col_w - 10) / max(len(group), 1))
            xy[n["node_id"]] = (left + col_w * pos + col_w / 2 + off, y_of(layer))
    wmax = max((abs(x["weight"]) for x in links), default=1.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for lv in range(-1, n_layers + 1):
        label = "emb" if lv == -1 else ("logit" if lv == n_layers else f"L{lv}")
        ly = top + row_h * (n_layers + 1 - (lv + 1))
        parts.append(f'<text x="4" y="{ly + 4}" fill="#666">{label}</text>')
        parts.append(f'<line x1="{left}" y1="{ly}" x2="{width - 20}" y2="{ly}" stroke="#eee"/>')
    for e in sorted(links, key=lambda e: abs(e["weight"])):
        if e["source"] not in xy or e["target"] not in xy:
            continue
        (x1, y1), (x2, y2) = xy[e["source"]], xy[e["target"]]
        w = 0.3 + 3.5 * abs(e["weight"]) / wmax
        color = "#2b6cb0" if e["weight"] >= 0 else "#c53030"
        parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
            f'stroke-opacity="0.55" stroke-width="{w:.2f}"><title>{html.escape(e["source"])} -&gt; '
            f"{html.escape(e['target'])}: {e['weight']:.4g}</title></line>"
        )
    for n in nodes:
        x, y = xy[n["node_id"]]
        color = _COLORS.get(n["feature_type"], "#333")
        shape = (
            f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="{color}"'
            if n["feature_type"] in ("mlp reconstruction error", "logit")
            else f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"'
        )
        tip = (
            f"{n['node_id']}  {n['clerp']}  influence {n['influence'] if n['influence'] is not None else ''}"
        )
        if n.get("activation") is not None:
            tip += f"  activation {n['activation']:.4g}"
        parts.append(f'{shape} stroke="#222" stroke-width="0.5"><title>{html.escape(tip)}</title>')
        parts[-1] += "</rect>" if shape.startswith("<rect") else "</circle>"
    base = top + row_h * (n_layers + 2) + 10
    for i, t in enumerate(tokens):
        tx = left + col_w * i + col_w / 2
        parts.append(
            f'<text x="{tx:.1f}" y="{base}" text-anchor="end" transform="rotate(-40 {tx:.1f} {base})">'
            f"{html.escape(repr(t)[1:-1][:14])}</text>"
        )
    parts.append("</svg>")
    sc = gj.get("scores", {})
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in sc.items()
        if not isinstance(v, list | dict)
    )
    legend = " ".join(f'<span style="color:{c}">&#9632; {html.escape(k)}</span>' for k, c in _COLORS.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:20px} td{padding:2px 10px} "
        ".svg{overflow-x:auto;border:1px solid #ddd}</style></head><body>"
        f"<h2>{html.escape(title)}</h2><p><b>prompt</b>: {html.escape(meta['prompt'])}</p>"
        f"<p>{len(nodes)} nodes, {len(links)} edges after pruning (node threshold "
        f"{meta['node_threshold']}, edge threshold {meta['info'].get('edge_threshold')}). {legend}. "
        "Edges: blue positive, red negative, width by |weight|; hover for details.</p>"
        f"<table>{rows}</table><div class='svg'>{''.join(parts)}</div></body></html>"
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def save_graph(
    graph: AttributionGraph, folder: Path, gj: dict[str, Any], title: str = "attribution graph"
) -> None:
    """Write ``graph.json`` (``gj``), ``graph-metadata.json`` (the list of graphs circuit-tracer's viewer
    reads, naming this one; its slug must be the file's name, ``graph``), ``graph.safetensors`` (the whole
    graph) and ``graph.html`` into ``folder`` (which must exist; the caller builds it aside and swaps it
    in)."""
    from safetensors.torch import save_file

    tensors = {
        "edges": graph.edges.contiguous(),
        "active_features": graph.active_features.contiguous(),
        "activations": graph.activations.contiguous(),
        "selected": graph.selected.contiguous(),
        "input_ids": graph.input_ids.contiguous(),
        "logit_tokens": graph.logit_tokens.contiguous(),
        "logit_probs": graph.logit_probs.contiguous(),
    }
    meta = {
        "prompt": graph.prompt,
        "tokens": graph.tokens,
        "model": graph.model,
        "n_layers": graph.n_layers,
        "logit_strs": graph.logit_strs,
        "info": graph.info,
    }
    save_file(tensors, str(folder / "graph.safetensors"), metadata={"graph": json.dumps(meta)})
    (folder / "graph.json").write_text(json.dumps(gj, indent=1) + "\n")
    listing = {"graphs": [{**gj["metadata"], "slug": "graph"}]}
    (folder / "graph-metadata.json").write_text(json.dumps(listing, indent=2) + "\n")
    (folder / "graph.html").write_text(graph_html(gj, title))


def load_graph(folder: str | os.PathLike[str]) -> AttributionGraph:
    """Reload the :class:`AttributionGraph` saved by :func:`save_graph`."""
    from safetensors import safe_open

    p = Path(folder) / "graph.safetensors"
    if not p.is_file():
        raise DataError(f"{folder} has no graph.safetensors; build one with `rosetta graph`")
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("graph", "{}"))
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return AttributionGraph(
        prompt=meta.get("prompt", ""),
        input_ids=t["input_ids"],
        tokens=list(meta.get("tokens", [])),
        model=meta.get("model", ""),
        n_layers=int(meta.get("n_layers", 0)),
        active_features=t["active_features"],
        activations=t["activations"],
        selected=t["selected"],
        edges=t["edges"],
        logit_tokens=t["logit_tokens"],
        logit_probs=t["logit_probs"],
        logit_strs=list(meta.get("logit_strs", [])),
        info=dict(meta.get("info", {})),
    )


def is_graph_dir(path: Path) -> bool:
    """A folder that ``rosetta graph --out`` wrote (what ``--overwrite`` may replace)."""
    return path.is_dir() and {p.name for p in path.iterdir()} <= set(GRAPH_FILES)
