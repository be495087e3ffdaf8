"""Minimal, dependency-light HTML reports: a run's numbers, its plots and example completions."""

from __future__ import annotations

import html
import json
import shlex
from pathlib import Path
from typing import Any

from rosettalens.io import atomic_savefig, atomic_write_text


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def html_table(rows: list[tuple[str, Any]]) -> str:
    return kv_table(rows)


def write_report(run_dir: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write ``report.html`` (atomic) from ``(heading, html body)`` sections."""
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:left;vertical-align:top}th{background:#f4f4f4}pre{white-space:pre-wrap;margin:0}"
        "table.sub{margin:0;font-size:.92em}figure{margin:1em 0}figcaption{color:#444;font-size:.9em}"
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


def refusal_report(run_dir: Path, results: dict, examples: dict[str, list[dict]], ctx: Any = None) -> Path:
    """Plots and ``report.html`` for a refusal-transfer run (``ctx``: its RunContext, for what was run)."""
    from types import SimpleNamespace

    rates_plot(run_dir, results)
    sweep_plot(run_dir, results.get("sweep") or [], results["source"], results["target"])
    if ctx is None:
        ctx = SimpleNamespace(run_dir=run_dir, results=results)
    headline = headline_table(results, [
        ("refusal rate on held-out harmful prompts (unsteered baseline, native ablated, transferred ablated, "
         "random-direction control)", "refusal_rate"),
        ("transferred fraction of the native drop", "transferred_fraction_of_native_drop"),
        ("induced refusal on harmless prompts (transferred direction added)", "induced_refusal_rate"),
        ("induced refusal on harmless prompts (random direction added: baseline)", "induced_refusal_rate_random"),
        ("harmless prompts with the transferred direction ablated", "harmless"),
        ("second judge (rates per condition; agreement with the substring judge)", "model_judge"),
    ])  # fmt: skip
    comps = read_json(run_dir / "completions.json") or {}
    prompts = read_json(run_dir / "prompts.json") or {}
    ex = []
    harmful = {k.removeprefix("harmful_"): v for k, v in comps.items() if k.startswith("harmful_")}
    if harmful:
        ex.append("<h3>Harmful prompts: refusal before and after ablating the direction</h3>"
                  + completions_grid(prompts.get("harmful_test", []), harmful))  # fmt: skip
    harmless = {k.removeprefix("harmless_"): v for k, v in comps.items() if k.startswith("harmless_")}
    if harmless:
        ex.append("<h3>Harmless prompts: before and after adding the transferred direction</h3>"
                  + completions_grid(prompts.get("harmless_test", []), harmless))  # fmt: skip
    if not ex:
        ex.append(completions_html(examples))
    details = [
        (
            "Layers and pairing",
            kv_table([("layers", results.get("layers")), ("pairing", results.get("pairing"))]),
        ),
        (
            f"Mapper ({results['mapper']['kind']}) on held-out pairs",
            kv_table(list(results["mapper"].items())),
        ),
        ("Vectors", kv_table(list(results["vectors"].items()))),
    ]
    if results.get("sweep"):
        details.append(("Per-layer sweep", records_table(results["sweep"])))
    defaults = {}
    if getattr(ctx, "config", None) is not None:
        defaults = config_defaults(type(ctx.config))
    return experiment_report(
        ctx, "refusal-transfer", "rosettalens: refusal transfer", defaults, headline, "".join(ex),
        captions={"refusal_rates.png": "refusal rate on held-out harmful prompts per condition, and induced "
                  "refusal on harmless prompts", "sweep.png": "per source layer: mapper FVU, cos(transferred, "
                  "native) and the refusal log-odds after ablation"},
        details=details,
    )  # fmt: skip


# ------------------------------------------------------------------------- the structured report
SECTION_RUN = "What was run"
SECTION_HEADLINE = "Headline results"
SECTION_PLOTS = "Plots"
SECTION_EXAMPLES = "Examples"
SECTION_DETAILS = "Details"
SECTION_ORDER = (SECTION_RUN, SECTION_HEADLINE, SECTION_PLOTS, SECTION_EXAMPLES, SECTION_DETAILS)


def fmt_number(v: Any) -> str:
    """How a report writes a number: ints as they are, floats to 4 significant digits."""
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    return f"{v:.4g}"


def value_html(v: Any, depth: int = 0) -> str:
    """Escaped HTML for a value: a dict becomes a sub-table, a list of scalars a comma list, a list of
    dicts a table with one column per key; never raw JSON."""
    if isinstance(v, dict):
        if not v:
            return "—"
        if depth >= 3:
            return html.escape("; ".join(f"{k}: {_flat(x)}" for k, x in v.items()))
        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{value_html(x, depth + 1)}</td></tr>"
            for k, x in v.items()
        )
        return f"<table class='sub'>{rows}</table>"
    if isinstance(v, list | tuple):
        if v and all(isinstance(x, dict) for x in v) and depth < 3:
            return records_table(list(v), depth + 1)
        return html.escape(", ".join(_flat(x) for x in v)) if v else "—"
    if v is None:
        return "—"
    return html.escape(fmt_number(v))


def _flat(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + "; ".join(f"{k}: {_flat(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_flat(x) for x in v) + "]"
    return fmt_number(v)


def records_table(records: list[dict], depth: int = 0, columns: list[str] | None = None) -> str:
    """A table with one row per record and one column per key (the union of the keys, in order)."""
    if not records:
        return "<p>none</p>"
    cols = columns or list(dict.fromkeys(k for r in records for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{value_html(r.get(c), depth + 1)}</td>" for c in cols) + "</tr>"
        for r in records
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def kv_table(rows: list[tuple[str, Any]]) -> str:
    """A two-column table ``label | value`` (nested values as sub-tables)."""
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{value_html(v, 1)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def command_line(name: str, config: dict[str, Any], defaults: dict[str, Any]) -> str:
    """``rosetta run NAME --opt value ...`` from a run's config: the options that differ from the defaults."""
    parts = ["rosetta", "run", name]
    for key, value in config.items():
        if key == "experiment" or (key in defaults and defaults[key] == value):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(x) for x in value)
        parts += [flag, shlex.quote(str(value)) if value is not None else "none"]
    return " ".join(parts)


def config_models(config: dict[str, Any]) -> list[str]:
    """The models a run names (its ``source``/``target``, ``models`` or ``model`` fields)."""
    out: list[str] = []
    for key in ("source", "target", "models", "model"):
        value = config.get(key)
        if key == "model" and config.get("models"):
            continue
        if isinstance(value, str) and value:
            out += [m.strip() for m in value.split(",") if m.strip()]
    return list(dict.fromkeys(out))


def peak_memory_mb() -> float:
    """This process's peak resident memory so far in MB (``ru_maxrss``; KB on Linux, bytes on macOS)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def run_section(ctx: Any, name: str, defaults: dict[str, Any], models: list[str] | None = None) -> str:
    """The "what was run" table: command line, models, wall time and peak memory (measured now)."""
    config = {}
    cfg_file = Path(ctx.run_dir) / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        config = dict(defaults)
    timings = ctx.results.get("timings_s") or {}
    total = timings.get("total")
    stages = {k: v for k, v in timings.items() if k != "total"}
    peak = peak_memory_mb()
    rows: list[tuple[str, Any]] = [
        ("command", f"<code>{html.escape(command_line(name, config, defaults))}</code>"),
        ("models", html.escape(", ".join(models if models is not None else config_models(config)) or "—")),
        ("wall time", html.escape(f"{fmt_number(float(total))} s" if isinstance(total, int | float) else "—")),
        ("stages (s)", value_html(stages, 1)),
        ("peak memory", f"<span class='peak-rss' data-mb='{peak:.1f}'>{peak:.0f} MB</span> (peak resident "
                        "memory of the process that wrote this report)"),
    ]  # fmt: skip
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def plots_section(run_dir: Path, captions: dict[str, str] | None = None) -> str:
    """Every PNG in ``run_dir`` (recursively), each with its caption (default: its file name)."""
    captions = captions or {}
    pngs = sorted(p.relative_to(run_dir).as_posix() for p in Path(run_dir).rglob("*.png"))
    if not pngs:
        return "<p>This run wrote no plots.</p>"
    figs = []
    for rel in pngs:
        cap = captions.get(rel) or captions.get(Path(rel).name) or Path(rel).stem.replace("_", " ")
        figs.append(
            f"<figure><img src='{html.escape(rel, quote=True)}' style='max-width:100%'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        )
    return "".join(figs)


def completions_html(groups: dict[str, list[dict]], limit: int = 4, keys: tuple[str, ...] = ()) -> str:
    """Example completions per condition: ``{condition: [{"prompt": ..., "completion": ...}, ...]}``."""
    out = []
    for cond, items in groups.items():
        if not isinstance(items, list) or not items:
            continue
        rows = []
        for it in items[:limit]:
            if isinstance(it, dict):
                prompt = str(it.get("prompt", it.get("instruction", "")))
                comp = str(it.get("completion", it.get("text", "")))
                extra = "; ".join(f"{k}: {_flat(it[k])}" for k in keys if k in it)
            else:
                prompt, comp, extra = "", str(it), ""
            rows.append(
                f"<tr><td>{html.escape(prompt)}</td><td><pre>{html.escape(comp)}</pre></td>"
                f"<td>{html.escape(extra)}</td></tr>"
            )
        out.append(
            f"<h3>{html.escape(str(cond))}</h3><table><tr><th>prompt</th><th>completion</th><th></th></tr>"
            + "".join(rows)
            + "</table>"
        )
    return "".join(out) or "<p>no completions saved</p>"


def experiment_report(
    ctx: Any,
    name: str,
    title: str,
    defaults: dict[str, Any],
    headline: str,
    examples: str = "",
    captions: dict[str, str] | None = None,
    details: list[tuple[str, str]] | None = None,
    models: list[str] | None = None,
) -> Path:
    """Write a run's ``report.html`` in the one layout every experiment uses: what was run (command,
    models, time, memory), the headline table, the plots (every PNG of the run, captioned), examples,
    then optional details (``(heading, html)`` pairs, shown as sub-headings)."""
    sections = [
        (SECTION_RUN, run_section(ctx, name, defaults, models)),
        (SECTION_HEADLINE, headline),
        (SECTION_PLOTS, plots_section(Path(ctx.run_dir), captions)),
        (SECTION_EXAMPLES, examples or "<p>This experiment has no examples to show.</p>"),
    ]
    if details:
        sections.append((SECTION_DETAILS, "".join(f"<h3>{html.escape(h)}</h3>{body}" for h, body in details)))
    return write_report(Path(ctx.run_dir), title, sections)


def config_defaults(config_cls: type) -> dict[str, Any]:
    """A config class's default values (``{}`` when it cannot be built without arguments)."""
    import dataclasses

    try:
        return dataclasses.asdict(config_cls())  # type: ignore[call-overload]
    except Exception:
        return {}


def completions_grid(prompts: list[str], columns: dict[str, list[str]], limit: int = 4) -> str:
    """Greedy completions of the same prompts under several conditions: one row per prompt, one column
    per condition (e.g. unsteered, then steered)."""
    cols = {k: v for k, v in columns.items() if isinstance(v, list) and v}
    if not cols:
        return "<p>no completions saved</p>"
    n = min(limit, max(len(v) for v in cols.values()))
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in cols) + "</tr>"
    rows = []
    for i in range(n):
        prompt = prompts[i] if i < len(prompts) else ""
        cells = "".join(
            f"<td><pre>{html.escape(str(v[i]) if i < len(v) else '')}</pre></td>" for v in cols.values()
        )
        rows.append(f"<tr><td>{html.escape(str(prompt))}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def headline_table(results: dict[str, Any], keys: list[tuple[str, str]]) -> str:
    """The headline table: ``(label, results key)`` rows for the keys present (nested values as sub-tables)."""
    return kv_table([(label, results[key]) for label, key in keys if key in results])


def read_json(path: Path) -> Any:
    """A JSON file of the run, or None when it is missing or unreadable (a report never fails on it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
