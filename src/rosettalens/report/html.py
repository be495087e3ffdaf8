"""Minimal, dependency-light HTML reports: a run's numbers, its plots and example completions."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rosettalens.io import atomic_savefig, atomic_write_text


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def html_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def write_report(run_dir: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write ``report.html`` (atomic) from ``(heading, html body)`` sections."""
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:left;vertical-align:top}th{background:#f4f4f4}pre{white-space:pre-wrap}"
    )
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style>",
             f"<h1>{html.escape(title)}</h1>"]  # fmt: skip
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    out = run_dir / "report.html"
    atomic_write_text(out, "\n".join(parts))
    return out


def sweep_plot(run_dir: Path, sweep: list[dict], source: str, target: str) -> Path | None:
    if not sweep:
        return None
    plt = pyplot()
    xs = [s["source_layer"] for s in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(xs, [s["fvu"] for s in sweep], "o-")
    axes[0].set(title="mapper FVU (held out)", xlabel=f"{source} resid_pre layer", ylabel="FVU")
    axes[1].plot(xs, [s["cos_transferred_native"] for s in sweep], "o-", color="C2")
    axes[1].set(title="cos(transferred, native)", xlabel=f"{source} resid_pre layer", ylim=(-0.1, 1.0))
    axes[2].plot(xs, [s["score_baseline"] for s in sweep], "k--", label="unsteered")
    axes[2].plot(xs, [s["score_native_ablated"] for s in sweep], "o-", label="native ablated")
    axes[2].plot(xs, [s["score_transferred_ablated"] for s in sweep], "s-", label="transferred ablated")
    axes[2].set(title=f"{target}: refusal log-odds (harmful val)", xlabel=f"{source} resid_pre layer")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, run_dir / "sweep.png", dpi=110)
    finally:
        plt.close(fig)


def rates_plot(run_dir: Path, results: dict) -> Path:
    plt = pyplot()
    r = results["refusal_rate"]
    labels = [
        "baseline",
        "native\nablated",
        "transferred\nablated",
        "random\nablated",
        "harmless +\ntransferred",
    ]
    vals = [r["baseline"], r["native"], r["transferred"], r["random"], results["induced_refusal_rate"]]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(labels, vals, color=["0.5", "C0", "C2", "C3", "C1"])
    ax.set(
        ylim=(0, 1.05), ylabel="refusal rate", title=f"{results['target']} (vector from {results['source']})"
    )
    for i, v in enumerate(vals):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    fig.tight_layout()
    try:
        return atomic_savefig(fig, run_dir / "refusal_rates.png", dpi=110)
    finally:
        plt.close(fig)


def refusal_report(run_dir: Path, results: dict, examples: dict[str, list[dict]]) -> Path:
    """Plots and ``report.html`` for a refusal-transfer run."""
    rates_plot(run_dir, results)
    sweep_png = sweep_plot(run_dir, results.get("sweep") or [], results["source"], results["target"])
    r = results["refusal_rate"]
    summary = html_table([
        ("source → target", f"{results['source']} → {results['target']}"),
        ("layers", f"{results['layers']['source']} → {results['layers']['target']}"),
        ("mapper", f"{results['mapper']['kind']}, held-out FVU {results['mapper']['fvu']:.3f}"),
        ("refusal rate, harmful (baseline / native / transferred / random)",
         f"{r['baseline']:.2f} / {r['native']:.2f} / {r['transferred']:.2f} / {r['random']:.2f}"),
        ("transferred fraction of the native drop", results.get("transferred_fraction_of_native_drop")),
        ("harmless refusal (baseline / transferred ablated)",
         f"{results['harmless']['refusal_rate_baseline']:.2f} / {results['harmless']['refusal_rate_transferred']:.2f}"),
        ("harmless KL (transferred ablated)", results["harmless"]["kl_transferred"]),
        ("induced refusal on harmless (transferred added / random added)",
         f"{results['induced_refusal_rate']:.2f} / {results.get('induced_refusal_rate_random', float('nan')):.2f}"),
        ("cos(transferred, native)", results["vectors"]["cos_transferred_native"]),
        ("model judge (rates per condition; agreement with the substring judge)", results.get("model_judge")),
        ("pairing", results.get("pairing")),
        ("timings (s)", results.get("timings_s")),
    ])  # fmt: skip
    # every number of results.json's mapper and vectors, named as there (r2_per_dim: the mean over
    # target dimensions of each dimension's R²; n: held-out pairs)
    mapper_rows = [(k, v) for k, v in results["mapper"].items() if k != "kind"]
    vector_rows = list(results["vectors"].items())
    sections = [
        ("Summary", summary),
        ("Refusal rates", "<img src='refusal_rates.png' width='640'>"),
        (f"Mapper ({results['mapper']['kind']}) on held-out pairs", html_table(mapper_rows)),
        ("Vectors", html_table(vector_rows)),
    ]
    if sweep_png is not None:
        rows = "".join(
            f"<tr><td>{s['source_layer']}</td><td>{s['target_layer']}</td><td>{s['fvu']:.3f}</td>"
            f"<td>{s['cos_transferred_native']:.3f}</td><td>{s['score_baseline']:.2f}</td>"
            f"<td>{s['score_native_ablated']:.2f}</td><td>{s['score_transferred_ablated']:.2f}</td></tr>"
            for s in results["sweep"]
        )
        head = ("<tr><th>source layer</th><th>target layer</th><th>FVU</th><th>cos</th><th>score unsteered</th>"
                "<th>native ablated</th><th>transferred ablated</th></tr>")  # fmt: skip
        sections.append(("Per-layer sweep", f"<img src='sweep.png' width='960'><table>{head}{rows}</table>"))
    ex_html = []
    for cond, items in examples.items():
        lis = "".join(
            f"<tr><td>{html.escape(it['prompt'])}</td><td><pre>{html.escape(it['completion'])}</pre></td></tr>"
            for it in items
        )
        ex_html.append(
            f"<h3>{html.escape(cond)}</h3><table><tr><th>prompt</th><th>completion</th></tr>{lis}</table>"
        )
    sections.append(("Example completions (greedy)", "".join(ex_html)))
    return write_report(run_dir, "rosettalens: refusal transfer", sections)
