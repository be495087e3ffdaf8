"""Layer x layer comparison of two sets of paired activations, with permutation nulls and heatmaps.

:func:`compare_layers` is the core of ``rosetta compare``; it works on in-memory tensors so that it
can be used (and tested) without activation stores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosettalens.errors import ConfigError, ShapeError
from rosettalens.io import atomic_savefig, atomic_write_json, json_safe
from rosettalens.similarity._tensor import as_f64
from rosettalens.similarity.metrics import PREPARED
from rosettalens.similarity.permutation import metric_names, run_permutations, small_problem_threads

__all__ = ["compare_layers", "write_json_atomic", "plot_heatmap", "METRIC_OPTIONS"]

# keyword arguments each metric accepts from the CLI options
METRIC_OPTIONS: dict[str, tuple[str, ...]] = {
    "svcca": ("keep_variance",),
    "linear_cka": ("debiased",),
    "rbf_cka": ("sigma", "debiased"),
    "rsa": ("inner", "outer"),
    "mutual_knn": ("k", "metric"),
    "jaccard_knn": ("k", "metric"),
}


def _flat(x: Any, name: str) -> Any:
    """``[n, ...]`` -> ``[n, prod(...)]`` (per-head hooks are compared as one flat vector per row)."""
    if isinstance(x, torch.Tensor | np.ndarray) and x.ndim > 2:
        return x.reshape(x.shape[0], -1)
    if getattr(x, "ndim", 2) < 2:
        raise ShapeError(f"{name}: activations must be [n, d], got shape {tuple(x.shape)}")
    return x


def compare_layers(
    acts_a: Mapping[str, Any],
    acts_b: Mapping[str, Any],
    metrics: Sequence[str] = ("svcca", "linear_cka", "rsa"),
    n_permutations: int = 100,
    seed: int = 0,
    metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every metric for every pair ``(hook_a, hook_b)``, each with a permutation p-value.

    Args:
        acts_a: ``{hook: [n, d_hook]}`` activations of representation A (numpy or torch).
        acts_b: ``{hook: [n, d_hook]}`` of representation B, rows paired with A's.
        metrics: names from :func:`~rosettalens.similarity.metric_names`. ``procrustes`` reports its
            angular similarity and ``cca`` the mean canonical correlation, so larger = more similar.
        n_permutations: shuffles of the row pairing per (pair, metric); 0 = no null, p-values are None.
        seed: permutation seed (the same permutations are used for every pair).
        metric_kwargs: ``{metric: {option: value}}``, e.g. ``{"svcca": {"keep_variance": 0.95}}``.
        device: device to compute on (default: where the tensors are, CPU for numpy).
        progress: a tqdm bar on stderr.

    Returns:
        JSON-ready dict: ``hooks_a``, ``hooks_b``, ``n_rows``, ``n_permutations``, ``seed``,
        ``metrics[name] = {"value", "p_value", "null_mean", "null_std"}`` as ``[len(hooks_a)][len(hooks_b)]``
        nested lists, and ``pairs``: one flat record per (hook_a, hook_b, metric).
    """
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in PREPARED]
    if not metrics or unknown:
        raise ConfigError(
            f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(metric_names())}"
        )
    if n_permutations < 0:
        raise ConfigError(f"the number of permutations must be >= 0, got {n_permutations}")
    if not acts_a or not acts_b:
        raise ConfigError("both sides need at least one hook's activations")
    kwargs = {m: dict((metric_kwargs or {}).get(m, {})) for m in metrics}
    hooks_a, hooks_b = list(acts_a), list(acts_b)
    xs = {h: as_f64(_flat(acts_a[h], h), f"A[{h}]", device) for h in hooks_a}
    ys = {h: as_f64(_flat(acts_b[h], h), f"B[{h}]", device) for h in hooks_b}
    rows = {t.shape[0] for t in [*xs.values(), *ys.values()]}
    if len(rows) != 1:
        raise ShapeError(f"all activations must have the same (paired) rows; got row counts {sorted(rows)}")
    n = rows.pop()

    shape = (len(hooks_a), len(hooks_b))
    tables = {
        m: {k: np.full(shape, np.nan) for k in ("value", "p_value", "null_mean", "null_std")} for m in metrics
    }
    pairs: list[dict[str, Any]] = []
    total = shape[0] * shape[1] * len(metrics)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="compare", unit="pair", leave=False)
    for i, ha in enumerate(hooks_a):
        for j, hb in enumerate(hooks_b):
            for m in metrics:
                _, prep, min_rows = PREPARED[m]
                if n < min_rows:
                    raise ShapeError(f"{m} needs at least {min_rows} paired rows, got {n}")
                width = max(xs[ha].shape[1], ys[hb].shape[1])
                rec: dict[str, Any] = {"hook_a": ha, "hook_b": hb, "metric": m}
                with small_problem_threads(n, width, xs[ha].device):
                    fn = prep(xs[ha], ys[hb], **kwargs[m])
                    if n_permutations > 0:
                        res = run_permutations(fn, n, n_permutations, seed, "greater", xs[ha].device, width)
                        rec.update(
                            value=res.observed,
                            p_value=res.p_value,
                            null_mean=res.null_mean,
                            null_std=res.null_std,
                        )
                    else:
                        rec.update(value=fn(None), p_value=None, null_mean=None, null_std=None)
                for key in ("value", "p_value", "null_mean", "null_std"):
                    if rec[key] is not None:
                        tables[m][key][i, j] = rec[key]
                pairs.append(rec)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()

    def listify(a: np.ndarray) -> list[list[float | None]]:
        return [[None if math.isnan(v) else float(v) for v in row] for row in a]

    return {
        "hooks_a": hooks_a,
        "hooks_b": hooks_b,
        "n_rows": n,
        "n_permutations": n_permutations,
        "seed": seed,
        "metric_kwargs": kwargs,
        "metrics": {m: {k: listify(v) for k, v in tables[m].items()} for m in metrics},
        "pairs": pairs,
    }


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON atomically (:func:`rosettalens.io.atomic_write_json`; NaN/inf as null)."""
    atomic_write_json(path, json_safe(obj))
    return Path(path)


def plot_heatmap(
    values: Sequence[Sequence[float | None]],
    hooks_a: Sequence[str],
    hooks_b: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    p_values: Sequence[Sequence[float | None]] | None = None,
    alpha: float = 0.05,
    label_a: str = "A",
    label_b: str = "B",
) -> Path:
    """Save a ``[len(hooks_a), len(hooks_b)]`` heatmap PNG atomically (Agg backend).

    Cells whose p-value is >= ``alpha`` are hatched (not significant against the permutation null).
    """
    from matplotlib.figure import Figure  # object API: no pyplot state, renders with Agg
    from matplotlib.patches import Rectangle

    arr = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64)
    h, w = arr.shape
    fig = Figure(figsize=(max(4.0, 1.0 + 0.45 * w), max(3.5, 1.0 + 0.4 * h)), dpi=110)
    ax = fig.add_subplot()
    im = ax.imshow(arr, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(w), labels=list(hooks_b), rotation=90, fontsize=7)
    ax.set_yticks(range(h), labels=list(hooks_a), fontsize=7)
    ax.set_xlabel(label_b)
    ax.set_ylabel(label_a)
    if title:
        ax.set_title(title)
    if p_values is not None:
        pv = np.array([[np.nan if v is None else v for v in row] for row in p_values], dtype=np.float64)
        for i, j in zip(*np.nonzero(pv >= alpha)):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="white", lw=0))
    if h * w <= 144:
        for i in range(h):
            for j in range(w):
                if not np.isnan(arr[i, j]):
                    ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white")
    fig.tight_layout()
    return atomic_savefig(fig, path)
