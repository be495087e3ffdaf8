"""Circuit discovery by node pruning (iterative mean-ablation) and path patching for edges.

Components are attention heads (``"L.H"``, the head's slice of ``head_z.L``) and MLPs (``L``, the whole
``mlp_out.L``). A *circuit* keeps some components; every other component is **mean-ablated**: its
activation is replaced, at each position, by its mean over a reference set of prompts of the same
token length (the corrupted prompts by default, as in Lan, Torr, Barez 2024).

Node pruning (the paper's procedure): start from the full model; walk the layers backward (last
layer first; in each layer the MLP, then the heads) and remove a component whenever the circuit
without it still keeps at least ``threshold`` of the full model's score (mean metric over the
prompts: ``score(circuit) >= threshold * score(full)``); then walk forward (first layer first; heads,
then the MLP) over what is left. ``group_first=True`` first tries to drop a whole layer (its remaining
heads and MLP) in one step, then all of its remaining heads in one step, before testing components one
by one (a few forwards per unimportant layer instead of ``n_heads + 1``); it keeps the same guarantee
(each removal keeps the threshold) and may find a different, equally valid circuit.

Bugs of the paper's code that this implementation does not have (``loop_node_ablation_fns.py`` and
the edge-pruning notebooks of ``apartresearch/seqcont_circuits``): its forward sweep stores head scores
under the MLP's key and MLP scores under ``(layer, head)`` (keys swapped, so the per-component trace
is mislabelled), and its edge hooks are added inside a loop without being removed, so each candidate
is evaluated with the hooks of all earlier candidates still attached (accumulating). Here every
score is keyed by the component it belongs to, and every intervention is a context manager whose
hooks are gone when it exits (tested).

Path patching (Wang et al. 2023) scores an edge ``sender -> receiver input``: the sender's output is
set to its value on the corrupted prompts while every other head and MLP downstream of it is frozen at
its clean value, so the change reaches the receiver only along the direct path; the receiver's input
(``q``/``k``/``v`` of a head, or an MLP's input, read through its output) computed that way is patched
into a clean run and the metric drop is the edge's effect. With GQA, ``k``/``v`` belong to a key-value
head shared by a group of query heads: patching them patches the whole group (stated in the result).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ShapeError

Metric = Callable[[Tensor], Tensor]
Head = tuple[int, int]

__all__ = [
    "component_means",
    "mean_ablate",
    "circuit_score",
    "prune_nodes",
    "PruneResult",
    "path_patch_edges",
    "head_name",
    "parse_head",
    "all_heads",
]


def head_name(layer: int, head: int) -> str:
    return f"{layer}.{head}"


def parse_head(s: str | Head) -> Head:
    if isinstance(s, tuple):
        return int(s[0]), int(s[1])
    a, b = str(s).split(".")
    return int(a), int(b)


def all_heads(hm: Any) -> list[Head]:
    return [(L, h) for L in range(hm.cfg.n_layers) for h in range(hm.cfg.n_heads)]


@torch.no_grad()
def run_last_logits(hm: Any, ids: Tensor, batch_size: int = 64) -> Tensor:
    """Logits at the last position ``[batch, 1, vocab]`` of unpadded ``ids [batch, pos]``, with the
    active intervention contexts applied (only the last position is unembedded)."""
    outs = []
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i : i + batch_size].to(hm.device)
        kw: dict[str, Any] = {"input_ids": x, "attention_mask": torch.ones_like(x), "use_cache": False}
        try:
            out = hm.model(**kw, logits_to_keep=1).logits
        except TypeError:  # a model class without logits_to_keep
            out = hm.model(**kw).logits[:, -1:]
        outs.append(out.float())
    return torch.cat(outs)


@torch.no_grad()
def component_means(hm: Any, ref_ids: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
    """Per-position means over ``ref_ids [n, pos]`` (equal length, no padding): ``{"head_z.L":
    [pos, n_heads, d_head], "mlp_out.L": [pos, d_model]}`` for every layer."""
    hooks = [f"{k}.{L}" for L in range(hm.cfg.n_layers) for k in ("head_z", "mlp_out")]
    sums: dict[str, Tensor] = {}
    n = 0
    for i in range(0, ref_ids.shape[0], batch_size):
        x = ref_ids[i : i + batch_size]
        _, cache = hm.run_with_cache(x, hooks=hooks, stop_early=True)
        for k, v in cache.items():
            s = v.double().sum(0)
            sums[k] = sums[k] + s if k in sums else s
        n += x.shape[0]
    return {k: (v / n).to(hm.dtype) for k, v in sums.items()}


@contextlib.contextmanager
def mean_ablate(
    hm: Any,
    means: dict[str, Tensor],
    heads: Sequence[Head | str] = (),
    mlps: Sequence[int] = (),
) -> Iterator[Any]:
    """Mean-ablate the given heads and MLPs (everything else untouched) inside the ``with`` block.

    ``means`` from :func:`component_means`; inputs must have the means' token length."""
    by_layer: dict[int, list[int]] = {}
    for h in heads:
        L, H = parse_head(h)
        by_layer.setdefault(L, []).append(H)
    fwd: list[tuple[str, Callable]] = []
    for L, hs in by_layer.items():
        idx = torch.tensor(sorted(set(hs)))
        m = means[f"head_z.{L}"]

        def fz(act: Tensor, name: str, idx: Tensor = idx, m: Tensor = m) -> Tensor:
            if act.shape[1] != m.shape[0]:
                raise ShapeError(f"mean ablation built for {m.shape[0]} positions, got {act.shape[1]}")
            out = act.clone()
            out[:, :, idx] = m[:, idx].to(act.dtype)
            return out

        fwd.append((f"head_z.{L}", fz))
    for L in sorted(set(int(x) for x in mlps)):
        m = means[f"mlp_out.{L}"]

        def fm(act: Tensor, name: str, m: Tensor = m) -> Tensor:
            if act.shape[1] != m.shape[0]:
                raise ShapeError(f"mean ablation built for {m.shape[0]} positions, got {act.shape[1]}")
            return m.to(act.dtype).expand_as(act).clone()

        fwd.append((f"mlp_out.{L}", fm))
    with hm.hooks(fwd):
        yield hm


def circuit_score(
    hm: Any,
    ids: Tensor,
    metric: Metric,
    means: dict[str, Tensor],
    heads: Sequence[Head | str],
    mlps: Sequence[int],
    batch_size: int = 64,
) -> Tensor:
    """Metric per prompt ``[n]`` with only ``heads``/``mlps`` kept and every other component
    mean-ablated."""
    keep_h = {parse_head(h) for h in heads}
    keep_m = {int(m) for m in mlps}
    abl_h = [h for h in all_heads(hm) if h not in keep_h]
    abl_m = [L for L in range(hm.cfg.n_layers) if L not in keep_m]
    with mean_ablate(hm, means, abl_h, abl_m):
        return metric(run_last_logits(hm, ids, batch_size)).cpu()


@dataclass
class PruneResult:
    """A pruned circuit: ``heads`` (``"L.H"``), ``mlps`` (layer ints), ``score_full`` / ``score_circuit``
    (mean metric), ``ratio`` = circuit / full, ``trace``: one entry per tested removal."""

    heads: list[str]
    mlps: list[int]
    score_full: float
    score_circuit: float
    ratio: float
    threshold: float
    n_forward: int
    trace: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "mlps": self.mlps, "score_full": self.score_full,
                "score_circuit": self.score_circuit, "ratio": self.ratio, "threshold": self.threshold,
                "n_forward": self.n_forward}  # fmt: skip


@torch.no_grad()
def prune_nodes(
    hm: Any,
    clean_ids: Tensor,
    metric: Metric,
    ref_ids: Tensor,
    threshold: float = 0.8,
    include_mlps: bool = True,
    sweeps: Sequence[str] = ("backward", "forward"),
    group_first: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> PruneResult:
    """Node pruning by iterative mean-ablation (see module docstring).

    clean_ids ``[n, pos]``: the prompts the circuit must keep working on; ref_ids ``[m, pos]`` (same
    ``pos``): the set whose per-position means replace removed components (the corrupted prompts in
    the paper); ``metric(logits [batch, pos, vocab]) -> [batch]``, higher = better. Raises ShapeError
    when the full model's mean metric is not positive (nothing to keep a share of).
    """
    if clean_ids.shape[1] != ref_ids.shape[1]:
        raise ShapeError(f"clean ids have {clean_ids.shape[1]} positions, reference ids {ref_ids.shape[1]}")
    if not 0 < threshold <= 1:
        raise ShapeError(f"threshold must be in (0, 1], got {threshold}")
    means = component_means(hm, ref_ids, batch_size)
    n_layers, n_heads = hm.cfg.n_layers, hm.cfg.n_heads
    full = float(metric(run_last_logits(hm, clean_ids, batch_size)).mean())
    if not full > 0:
        raise ShapeError(f"the full model's mean metric is {full:.4g} (not positive): no share of it to keep")
    heads = set(all_heads(hm))
    mlps = set(range(n_layers)) if include_mlps else set()
    excluded_mlps = set() if include_mlps else set(range(n_layers))
    trace: list[dict[str, Any]] = []
    count = [1]

    def score(h: set[Head], m: set[int]) -> float:
        count[0] += 1
        abl_h = [x for x in all_heads(hm) if x not in h]
        abl_m = [L for L in range(n_layers) if L not in m and L not in excluded_mlps]
        with mean_ablate(hm, means, abl_h, abl_m):
            return float(metric(run_last_logits(hm, clean_ids, batch_size)).mean())

    current = full
    total = len(sweeps) * n_layers
    bar = tqdm(total=total, desc=f"pruning {hm.name}", unit="layer", leave=False, disable=not progress)

    def try_heads(L: int, sweep: str) -> None:
        nonlocal current
        layer_heads = [(L, h) for h in range(n_heads) if (L, h) in heads]
        if group_first and len(layer_heads) > 1:
            s = score(heads - set(layer_heads), mlps)
            ok = s >= threshold * full
            trace.append({"sweep": sweep, "component": f"heads.{L}", "ratio": s / full, "removed": ok})
            if ok:
                heads.difference_update(layer_heads)
                current = s
                return
        for c in layer_heads:
            s = score(heads - {c}, mlps)
            ok = s >= threshold * full
            trace.append({"sweep": sweep, "component": head_name(*c), "ratio": s / full, "removed": ok})
            if ok:
                heads.discard(c)
                current = s

    def try_mlp(L: int, sweep: str) -> None:
        nonlocal current
        if L not in mlps:
            return
        s = score(heads, mlps - {L})
        ok = s >= threshold * full
        trace.append({"sweep": sweep, "component": L, "ratio": s / full, "removed": ok})
        if ok:
            mlps.discard(L)
            current = s

    def try_layer(L: int, sweep: str) -> bool:
        """group_first: drop the whole layer (heads and MLP) in one step when the threshold allows."""
        nonlocal current
        parts_h = {(L, h) for h in range(n_heads) if (L, h) in heads}
        parts_m = {L} & mlps
        if not group_first or len(parts_h) + len(parts_m) < 2:
            return False
        s = score(heads - parts_h, mlps - parts_m)
        ok = s >= threshold * full
        trace.append({"sweep": sweep, "component": f"layer.{L}", "ratio": s / full, "removed": ok})
        if ok:
            heads.difference_update(parts_h)
            mlps.difference_update(parts_m)
            current = s
        return ok

    for sweep in sweeps:
        if sweep == "backward":
            for L in range(n_layers - 1, -1, -1):
                if not try_layer(L, sweep):
                    try_mlp(L, sweep)
                    try_heads(L, sweep)
                bar.update()
        elif sweep == "forward":
            for L in range(n_layers):
                if not try_layer(L, sweep):
                    try_heads(L, sweep)
                    try_mlp(L, sweep)
                bar.update()
        else:
            raise ShapeError(f"unknown sweep {sweep!r}; use 'backward' and/or 'forward'")
    bar.close()
    final = score(heads, mlps) if trace else full
    kept_mlps = sorted(mlps) + sorted(excluded_mlps)
    return PruneResult(
        heads=[head_name(*h) for h in sorted(heads)], mlps=kept_mlps, score_full=full, score_circuit=final,
        ratio=final / full, threshold=threshold, n_forward=count[0], trace=trace,
    )  # fmt: skip


# ------------------------------------------------------------------------------------- path patching
def _node(x: str | int) -> tuple[str, int, int]:
    """("head", L, H) | ("mlp", L, -1) | ("logits", -1, -1)."""
    if isinstance(x, str) and x == "logits":
        return ("logits", -1, -1)
    if isinstance(x, int) or (isinstance(x, str) and x.isdigit()):
        return ("mlp", int(x), -1)
    L, H = parse_head(x)
    return ("head", L, H)


def _label(x: tuple[str, int, int]) -> str | int:
    kind, L, H = x
    return "logits" if kind == "logits" else (L if kind == "mlp" else head_name(L, H))


@torch.no_grad()
def path_patch_edges(
    hm: Any,
    clean_ids: Tensor,
    corrupted_ids: Tensor,
    metric: Metric,
    senders: Sequence[str | int],
    receivers: Sequence[str | int],
    inputs: Sequence[str] = ("q", "k", "v"),
    batch_size: int = 64,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Path-patching effects of edges ``sender -> receiver``.

    senders / receivers: heads ``"L.H"``, MLP layers ``L`` and (receivers only) ``"logits"``; an edge is
    scored when the sender's layer is below the receiver's (a head may also feed the MLP of its own
    layer). inputs: which inputs of a receiver head to patch: any of ``"q"``, ``"k"``, ``"v"`` (one
    edge each) and ``"qkv"`` (all three at once). Returns dicts ``{sender, receiver, input, effect,
    patched, clean, kv_group}``: ``effect = mean clean metric - mean patched metric`` (positive: the
    edge carries what the metric needs); ``kv_group`` lists the query heads sharing a patched k/v.
    clean_ids / corrupted_ids: ``[n, pos]`` of one shape (the patched runs take all ``n`` rows in one
    batch; ``batch_size`` bounds only the caching runs).
    """
    if clean_ids.shape != corrupted_ids.shape:
        raise ShapeError(
            f"clean and corrupted ids must have one shape, got {tuple(clean_ids.shape)} and "
            f"{tuple(corrupted_ids.shape)}"
        )
    for i in inputs:
        if i not in ("q", "k", "v", "qkv"):
            raise ShapeError(f"unknown receiver input {i!r}; use q, k, v or qkv")
    n_layers, n_heads, n_kv = hm.cfg.n_layers, hm.cfg.n_heads, hm.cfg.n_kv_heads
    group = n_heads // n_kv
    snd = [_node(s) for s in senders]
    rcv = [_node(r) for r in receivers]
    if any(s[0] == "logits" for s in snd):
        raise ShapeError("'logits' can only be a receiver")
    need = [f"{k}.{L}" for L in range(n_layers) for k in ("head_z", "mlp_out")]
    clean_logits, clean_cache = _cached_run(hm, clean_ids, need, batch_size)
    clean_metric = float(metric(clean_logits).mean())
    _, corr_cache = _cached_run(hm, corrupted_ids, need, batch_size)
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(snd), desc="path patching", unit="sender", leave=False, disable=not progress)
    for s_kind, sL, sH in snd:
        targets = [
            r
            for r in rcv
            if r[0] == "logits" or r[1] > sL or (r[0] == "mlp" and s_kind == "head" and r[1] == sL)
        ]
        if not targets:
            bar.update()
            continue
        # step 2: sender corrupted, everything downstream frozen at clean; record receivers' inputs
        rec_layers = sorted({r[1] for r in targets if r[0] == "head"})
        direct_logits, recorded = _frozen_run(
            hm, (s_kind, sL, sH), clean_cache, corr_cache, rec_layers, clean_ids
        )
        # step 3: each receiver input patched into a clean run
        for r in targets:
            r_kind, rL, rH = r
            jobs: list[tuple[str, list[tuple[str, Callable]], list[str] | None]] = []
            if r_kind == "logits":
                patched = float(metric(direct_logits).mean())
                results.append(_edge(s_kind, sL, sH, r, "resid", clean_metric, patched, None))
                continue
            if r_kind == "mlp":
                val = recorded[f"mlp_out.{rL}"]
                jobs.append(("mlp_in", [(f"mlp_out.{rL}", _const(val))], None))
            else:
                for inp in inputs:
                    kinds = ("q", "k", "v") if inp == "qkv" else (inp,)
                    hooks_ = []
                    kv_group: list[str] | None = None
                    for k in kinds:
                        idx = rH if k == "q" else rH // group
                        if k != "q":
                            kv_group = [head_name(rL, idx * group + j) for j in range(group)]
                        hooks_.append((f"{k}.{rL}", _slice_patch(recorded[f"{k}.{rL}"], idx)))
                    jobs.append((inp, hooks_, kv_group if group > 1 else None))
            for inp, hooks_, kv_group in jobs:
                with hm.hooks(hooks_):  # recorded values cover the whole set: one batch
                    patched = float(metric(run_last_logits(hm, clean_ids, clean_ids.shape[0])).mean())
                results.append(_edge(s_kind, sL, sH, r, inp, clean_metric, patched, kv_group))
        bar.update()
    bar.close()
    return results


@torch.no_grad()
def _frozen_run(
    hm: Any,
    sender: tuple[str, int, int],
    clean_cache: dict[str, Tensor],
    corr_cache: dict[str, Tensor],
    rec_layers: list[int],
    clean_ids: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clean run with the sender at its corrupted value and every head and MLP downstream frozen at its
    clean value; returns (last-position logits, {"q.L"/"k.L"/"v.L"/"mlp_out.L": value computed from
    the changed input, before freezing})."""
    s_kind, sL, sH = sender
    recorded: dict[str, Tensor] = {}
    fwd: list[tuple[str, Callable]] = []

    def fz(act: Tensor, name: str) -> Tensor:
        L = int(name.split(".")[1])
        if s_kind == "head" and L == sL:
            out = act.clone()  # same layer: inputs unchanged; set the sender only
            out[:, :, sH] = corr_cache[name][:, :, sH].to(act.dtype)
            return out
        return clean_cache[name].to(act.dtype).clone()

    def fm(act: Tensor, name: str) -> Tensor:
        recorded[name] = act.detach()
        if s_kind == "mlp" and int(name.split(".")[1]) == sL:
            return corr_cache[name].to(act.dtype).clone()
        return clean_cache[name].to(act.dtype).clone()

    def fr(act: Tensor, name: str) -> None:
        recorded[name] = act.detach()

    for L in range(sL, hm.cfg.n_layers):
        if L > sL or s_kind == "head":
            fwd.append((f"head_z.{L}", fz))
        fwd.append((f"mlp_out.{L}", fm))
    fwd += [(f"{k}.{L}", fr) for L in rec_layers for k in ("q", "k", "v")]
    with hm.hooks(fwd):
        logits = run_last_logits(hm, clean_ids, clean_ids.shape[0])
    return logits, recorded


def _edge(s_kind: str, sL: int, sH: int, r: tuple[str, int, int], inp: str, clean: float, patched: float,
          kv_group: list[str] | None) -> dict[str, Any]:  # fmt: skip
    return {"sender": _label((s_kind, sL, sH)), "receiver": _label(r), "input": inp,
            "effect": clean - patched, "patched": patched, "clean": clean, "kv_group": kv_group}  # fmt: skip


def _const(val: Tensor) -> Callable:
    def f(act: Tensor, name: str) -> Tensor:
        return val.to(act.dtype).clone()

    return f


def _slice_patch(val: Tensor, idx: int) -> Callable:
    def f(act: Tensor, name: str) -> Tensor:
        out = act.clone()
        out[:, :, idx] = val[:, :, idx].to(act.dtype)
        return out

    return f


@torch.no_grad()
def _cached_run(hm: Any, ids: Tensor, hooks: list[str], batch_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    logits, caches = [], []
    for i in range(0, ids.shape[0], batch_size):
        lg, c = hm.run_with_cache(ids[i : i + batch_size], hooks=hooks)
        logits.append(lg[:, -1:].float())
        caches.append(c)
    return torch.cat(logits), {k: torch.cat([c[k] for c in caches]) for k in hooks}
