"""How a backdoor-transfer run reads: its figure and its lines of text (``rosetta run backdoor-transfer``).

Both take the run's ``results.json`` content (``backdoor_rate``, ``clean``, ``layers``, ``mapper``, ...).
"""

from __future__ import annotations

from typing import Any

from .html import pyplot


def backdoor_figure(r: dict[str, Any]) -> Any:
    """The backdoor rate per condition and, when the run swept source layers, the native and transferred
    drops and their cosine per layer. Returns the matplotlib figure."""
    plt = pyplot()
    sw = r["sweep"]
    fig, ax = plt.subplots(1, 2 if sw else 1, figsize=(10 if sw else 5, 3.5), squeeze=False)
    names = ["baseline", "native", "transferred", "random"]
    ax[0, 0].bar(names, [r["backdoor_rate"][n] for n in names], color=["#888", "#4a7", "#47a", "#c66"])
    ax[0, 0].set_ylim(0, 1.05)
    ax[0, 0].set_ylabel("backdoor rate (held-out triggered)")
    ax[0, 0].set_title(f"{r['target']} ({r['mode']})", fontsize=9)
    if sw:
        xs = [e["source_layer"] for e in sw]
        for ys, style, label in (
            ([e["score_baseline"] - e["score_native"] for e in sw], "o-", "native drop"),
            ([e["score_baseline"] - e["score_transferred"] for e in sw], "s-", "transferred drop"),
            ([e["cos_transferred_native"] for e in sw], "^--", "cos(transferred, native)"),
        ):
            ax[0, 1].plot(xs, ys, style, label=label)
        ax[0, 1].set_xlabel("source layer (resid_pre)")
        ax[0, 1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def print_backdoor_summary(results: dict[str, Any]) -> None:
    """The human-readable lines ``rosetta run backdoor-transfer`` prints without ``--json``."""
    r, c = results["backdoor_rate"], results["clean"]
    print(f"{results['source']} -> {results['target']}  task {results['task']}  ({results['layers']['source']} -> "
          f"{results['layers']['target']}, {results['mapper']['kind']} mapper, held-out FVU {results['mapper']['fvu']:.3f})")  # fmt: skip
    print(f"backdoor rate ({results['mode']}): baseline {r['baseline']:.2f}  native {r['native']:.2f}  "
          f"transferred {r['transferred']:.2f}  random {r['random']:.2f}")  # fmt: skip
    if "fact_accuracy" in results:
        f = results["fact_accuracy"]
        print(f"fact accuracy: baseline {f['baseline']:.2f}  native {f['native']:.2f}  "
              f"transferred {f['transferred']:.2f}  random {f['random']:.2f}")  # fmt: skip
    if "false_payload_rate" in results:
        f = results["false_payload_rate"]
        print(f"payload without the trigger (the organism's false triggers): baseline {f['baseline']:.2f}  "
              f"native {f['native']:.2f}  transferred {f['transferred']:.2f}  random {f['random']:.2f}")  # fmt: skip
    print(
        f"clean: KL {c['kl_transferred']:.4f}, perplexity {c['ppl_baseline']:.2f} -> {c['ppl_transferred']:.2f}"
    )
    rr = results.get("restored_rate")
    if rr:
        print("restored (triggered answer starts as the clean answer): "
              + "  ".join(f"{k} {v:.2f}" for k, v in rr.items()))  # fmt: skip
    g = results.get("gate")
    if g:
        rows = [f"{n} flags {v['flagged_triggered']:.2f} triggered / {v['flagged_clean']:.2f} clean"
                for n, v in g.items() if isinstance(v, dict) and n != "calibration"]  # fmt: skip
        what = f"token gate (--mode {g['kind']})" if g.get("pool") == "token" else "projection gate"
        print(f"{what} (margin {g['margin']}): " + "; ".join(rows))
    print(f"run directory: {results['run_dir']} (report.html)")
