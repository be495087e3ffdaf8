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
from ..names import hook_layer, hook_name
from .ablation import Ablator
from .patching import row_bytes

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
    hooks = [hook_name(k, L) for L in range(hm.cfg.n_layers) for k in ("head_z", "mlp_out")]
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
        m = means[hook_name("head_z", L)]

        def fz(act: Tensor, name: str, idx: Tensor = idx, m: Tensor = m) -> Tensor:
            if act.shape[1] != m.shape[0]:
                raise ShapeError(f"mean ablation built for {m.shape[0]} positions, got {act.shape[1]}")
            out = act.clone()
            out[:, :, idx] = m[:, idx].to(act.dtype)
            return out

        fwd.append((hook_name("head_z", L), fz))
    for L in sorted(set(int(x) for x in mlps)):
        m = means[hook_name("mlp_out", L)]

        def fm(act: Tensor, name: str, m: Tensor = m) -> Tensor:
            if act.shape[1] != m.shape[0]:
                raise ShapeError(f"mean ablation built for {m.shape[0]} positions, got {act.shape[1]}")
            return m.to(act.dtype).expand_as(act).clone()

        fwd.append((hook_name("mlp_out", L), fm))
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
    (mean metric), ``ratio`` = circuit / full, ``trace``: one entry per tested removal.

    n_forward: circuits scored (one per tested removal, plus the full model and the final circuit),
    the same for the sequential and the batched algorithm. n_model_calls: forward passes of the model
    actually run; rows_scored: circuits scored including the batched path's speculative rows that
    were thrown away (``rows_scored - n_forward + 2`` is the speculation's waste)."""

    heads: list[str]
    mlps: list[int]
    score_full: float
    score_circuit: float
    ratio: float
    threshold: float
    n_forward: int
    trace: list[dict[str, Any]] = field(default_factory=list)
    ablation: str = "mean"
    batched: bool = False
    n_model_calls: int = 0
    rows_scored: int = 0
    batches: list[tuple[int, int]] = field(default_factory=list)  # (rows, steps decided) per forward
    layer_rows: int = 0  # decoder layers run x prompt rows, over all circuits scored (the compute)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "mlps": self.mlps, "score_full": self.score_full,
                "score_circuit": self.score_circuit, "ratio": self.ratio, "threshold": self.threshold,
                "n_forward": self.n_forward, "ablation": self.ablation, "batched": self.batched,
                "n_model_calls": self.n_model_calls, "rows_scored": self.rows_scored,
                "layer_rows": self.layer_rows}  # fmt: skip


# one step of the pruning program: (sweep, kind, layer, head); kind "layer" | "heads" | "mlp" | "head"
_Step = tuple[str, str, int, int]


def _program(n_layers: int, n_heads: int, sweeps: Sequence[str], group_first: bool) -> list[_Step]:
    """The paper's order of tested removals; a step applies only to what is still in the circuit."""
    steps: list[_Step] = []
    for sweep in sweeps:
        if sweep == "backward":
            for L in range(n_layers - 1, -1, -1):
                if group_first:
                    steps.append((sweep, "layer", L, -1))
                steps.append((sweep, "mlp", L, -1))
                if group_first:
                    steps.append((sweep, "heads", L, -1))
                steps += [(sweep, "head", L, h) for h in range(n_heads)]
        elif sweep == "forward":
            for L in range(n_layers):
                if group_first:
                    steps.append((sweep, "layer", L, -1))
                    steps.append((sweep, "heads", L, -1))
                steps += [(sweep, "head", L, h) for h in range(n_heads)]
                steps.append((sweep, "mlp", L, -1))
        else:
            raise ShapeError(f"unknown sweep {sweep!r}; use 'backward' and/or 'forward'")
    return steps


def _removal(
    step: _Step, heads: set[Head], mlps: set[int], n_heads: int
) -> tuple[set[Head], set[int], str | int] | None:
    """What ``step`` removes from the circuit ``(heads, mlps)`` and its trace label; None: skipped.

    Mirrors the sequential rules: a whole layer only when >= 2 of its parts are left; a layer's heads
    as a group only when >= 2 of them are left; a single head or MLP only while it is in the circuit."""
    _, kind, L, h = step
    if kind == "layer":
        ph, pm = {(L, x) for x in range(n_heads) if (L, x) in heads}, {L} & mlps
        return (ph, pm, f"layer.{L}") if len(ph) + len(pm) >= 2 else None
    if kind == "heads":
        ph = {(L, x) for x in range(n_heads) if (L, x) in heads}
        return (ph, set(), f"heads.{L}") if len(ph) > 1 else None
    if kind == "mlp":
        return (set(), {L}, L) if L in mlps else None
    return ({(L, h)}, set(), head_name(L, h)) if (L, h) in heads else None


class _Scorer:
    """Scores circuits (mean metric over the prompts, every component outside ablated): one circuit
    per forward (the sequential reference, through :class:`~rosettalens.circuits.ablation.Ablator`)
    or many per forward (``batch``: the batch grows inside the forward; see :func:`prune_nodes`)."""

    def __init__(self, hm: Any, clean_ids: Tensor, metric: Metric, ref_ids: Tensor | None, ablation: str,
                 include_mlps: bool, batch_size: int, seed: int) -> None:  # fmt: skip
        self.hm, self.ids, self.metric, self.kind = hm, clean_ids, metric, ablation
        self.batch_size = batch_size
        self.ab = Ablator(
            hm, ablation, None if ablation == "zero" else ref_ids, batch_size=batch_size, seed=seed
        )
        n = clean_ids.shape[0]
        # resample: one reference row per prompt for the whole run (the same in both paths)
        self.rows = (
            torch.randint(0, self.ab.n_ref, (n,), generator=torch.Generator().manual_seed(seed))
            if ablation == "resample"
            else None
        )
        self.n_layers, self.n_heads = hm.cfg.n_layers, hm.cfg.n_heads
        self.include_mlps = include_mlps
        self.model_calls = 0
        self.rows_scored = 0
        self.layer_rows = 0  # decoder layers run x prompt rows (the compute, for a CPU)

    def _ablated(self, heads: set[Head], mlps: set[int]) -> tuple[list[Head], list[int]]:
        abl_h = [x for x in all_heads(self.hm) if x not in heads]
        abl_m = [L for L in range(self.n_layers) if L not in mlps] if self.include_mlps else []
        return abl_h, abl_m

    def score(self, heads: set[Head], mlps: set[int]) -> float:
        """One circuit, the sequential way: the complement ablated, prompts in chunks of batch_size."""
        abl_h, abl_m = self._ablated(heads, mlps)
        outs = []
        for i in range(0, self.ids.shape[0], self.batch_size):
            rows = None if self.rows is None else self.rows[i : i + self.batch_size]
            with self.ab.ablate(abl_h, abl_m, rows=rows):
                outs.append(run_last_logits(self.hm, self.ids[i : i + self.batch_size], self.batch_size))
            self.model_calls += 1
        self.rows_scored += 1
        self.layer_rows += self.n_layers * self.ids.shape[0]
        return float(self.metric(torch.cat(outs)).mean())

    def _masks(self, heads: set[Head], mlps: set[int]) -> tuple[Tensor, Tensor]:
        """Ablated components as masks ``([n_layers, n_heads], [n_layers])`` (True = ablated)."""
        mh = torch.ones(self.n_layers, self.n_heads, dtype=torch.bool)
        for L, h in heads:
            mh[L, h] = False
        mm = torch.zeros(self.n_layers, dtype=torch.bool)
        if self.include_mlps:
            mm[:] = True
            for L in mlps:
                mm[L] = False
        return mh, mm

    def _value(self, store: dict[int, Tensor], L: int, prompt: int) -> Tensor:
        if self.kind == "zero":
            return torch.zeros((), dtype=self.hm.dtype, device=self.hm.device)
        v = store[L]
        return v[0] if self.kind == "mean" else v[int(self.rows[prompt])]  # type: ignore[index]

    @torch.no_grad()
    def stacked(self, circuits: list[tuple[set[Head], set[int]]]) -> list[float]:
        """Mean metric of each circuit: every circuit's copy of all prompts stacked into one forward
        from the embedding on (``len(circuits) * n`` rows; fewer, larger forwards than :meth:`batch`,
        for a GPU, where rows are nearly free and forwards are not)."""
        k, n = len(circuits), self.ids.shape[0]
        masks = [self._masks(h, m) for h, m in circuits]
        dev = self.hm.device
        hmask = torch.stack([mh for mh, _ in masks], 1).repeat_interleave(n, 1).to(dev)  # [L, k*n, H]
        mmask = torch.stack([mm for _, mm in masks], 1).repeat_interleave(n, 1).to(dev)  # [L, k*n]
        handlers: list[tuple[str, Callable, str]] = []
        for L in range(self.n_layers):
            for name, msk, store in ((hook_name("head_z", L), hmask[L][:, None, :, None], self.ab.head_values),
                                     (hook_name("mlp_out", L), mmask[L][:, None, None], self.ab.mlp_values)):  # fmt: skip
                if not msk.any():
                    continue
                if self.kind == "zero":
                    val = torch.zeros((), dtype=self.hm.dtype, device=dev)
                elif self.kind == "mean":
                    val = store[L][0]
                else:  # each row takes its prompt's reference row
                    val = store[L][self.rows].repeat(k, *([1] * (store[L].dim() - 1)))
                handlers.append((name, _masked(msk, val), "plain"))
        x = self.ids.repeat(k, 1).to(dev)
        with self.hm.intervene(handlers):
            try:
                out = self.hm.model(input_ids=x, use_cache=False, logits_to_keep=1).logits
            except TypeError:  # a model class without logits_to_keep
                out = self.hm.model(input_ids=x, use_cache=False).logits[:, -1:]
        self.model_calls += 1
        self.rows_scored += k
        self.layer_rows += self.n_layers * k * n
        out = out[:, -1:].float().view(k, n, 1, -1)
        return [float(self.metric(out[j]).mean()) for j in range(k)]

    @torch.no_grad()
    def batch(
        self, base: tuple[set[Head], set[int]], circuits: list[tuple[set[Head], set[int]]]
    ) -> list[float]:
        """Mean metric of each circuit, all of them in one forward per prompt.

        The forward starts with one row (the prompt under ``base``'s ablations, the trunk); a circuit
        whose ablations first differ from ``base``'s at layer ``d`` gets a copy of the trunk row at
        ``resid_pre.d`` (the layers below are the same for both, so they run once), and from there
        each row carries its own per-row head and MLP masks; the trunk is dropped once the last row has
        its copy. Rows per forward: at most ``1 + len(circuits)``.
        """
        bh, bm = self._masks(*base)
        masks = [self._masks(h, m) for h, m in circuits]
        start = []
        for mh, mm in masks:
            diff = (mh != bh).any(1) | (mm != bm)
            start.append(int(diff.nonzero()[0]) if diff.any() else self.n_layers)
        order = sorted(range(len(circuits)), key=lambda r: start[r])
        hmask = torch.stack([bh] + [masks[r][0] for r in order], 1)  # [n_layers, 1 + k, n_heads]
        mmask = torch.stack([bm] + [masks[r][1] for r in order], 1)  # [n_layers, 1 + k]
        if any(d >= self.n_layers for d in start):  # pragma: no cover - a circuit equal to the base
            raise ShapeError("a circuit to score equals the base circuit")
        grow: dict[int, int] = {}
        for r in order:
            grow[start[r]] = grow.get(start[r], 0) + 1
        # rows alive at layer L: the trunk (dropped at the last growth layer `top`, where every row
        # has its copy) and every row started at or below L
        top = max(grow)
        lo = [1 if L >= top else 0 for L in range(self.n_layers)]
        hi = [1 + sum(k for d, k in grow.items() if d <= L) for L in range(self.n_layers)]
        dev = self.hm.device
        hms = [hmask[L, lo[L] : hi[L]].to(dev) for L in range(self.n_layers)]
        mms = [mmask[L, lo[L] : hi[L]].to(dev) for L in range(self.n_layers)]
        n = self.ids.shape[0]
        per_prompt: list[Tensor] = []
        for i in range(n):
            handlers: list[tuple[str, Callable, str]] = []
            for d, k in grow.items():
                handlers.append((hook_name("resid_pre", d), _grow_rows(k, drop_first=d == top), "resize"))
            for L in range(self.n_layers):
                if hms[L].any():
                    val = self._value(self.ab.head_values, L, i)
                    handlers.append((hook_name("head_z", L), _masked(hms[L][:, None, :, None], val), "plain"))
                if mms[L].any():
                    val = self._value(self.ab.mlp_values, L, i)
                    handlers.append((hook_name("mlp_out", L), _masked(mms[L][:, None, None], val), "plain"))
            x = self.ids[i : i + 1].to(dev)
            with self.hm.intervene(handlers):
                try:
                    out = self.hm.model(input_ids=x, use_cache=False, logits_to_keep=1).logits
                except TypeError:  # a model class without logits_to_keep
                    out = self.hm.model(input_ids=x, use_cache=False).logits[:, -1:]
            self.model_calls += 1
            if out.shape[0] != len(circuits):  # pragma: no cover - an architecture that does not broadcast
                raise ShapeError(f"batched pruning got {out.shape[0]} rows, expected {len(circuits)}")
            per_prompt.append(out[:, -1:].float())
        stacked = torch.stack(per_prompt, 1)  # [k, n, 1, vocab], rows in `order`
        self.rows_scored += len(circuits)
        self.layer_rows += n * (top + sum(self.n_layers - d for d in start))
        scores = [0.0] * len(circuits)
        for j, r in enumerate(order):
            scores[r] = float(self.metric(stacked[j]).mean())
        return scores


def _grow_rows(k: int, drop_first: bool = False) -> Callable:
    """Append ``k`` copies of row 0 (the trunk); ``drop_first``: the trunk's last use, drop it."""

    def grow(act: Tensor, name: str) -> Tensor:
        return torch.cat([act[1:] if drop_first else act, act[:1].expand(k, *act.shape[1:])])

    return grow


def _masked(mask: Tensor, val: Tensor) -> Callable:
    def f(act: Tensor, name: str) -> Tensor:
        return torch.where(mask, val.to(act.dtype), act)

    return f


@torch.no_grad()
def prune_nodes(
    hm: Any,
    clean_ids: Tensor,
    metric: Metric,
    ref_ids: Tensor | None,
    threshold: float = 0.8,
    include_mlps: bool = True,
    sweeps: Sequence[str] = ("backward", "forward"),
    group_first: bool = False,
    batch_size: int = 64,
    progress: bool = False,
    *,
    ablation: str = "mean",
    batched: bool = True,
    memory_budget: float = 2**30,
    max_rows: int | None = 16,
    seed: int = 0,
    grow: bool | None = None,
) -> PruneResult:
    """Node pruning by iterative ablation (see module docstring).

    clean_ids ``[n, pos]``: the prompts the circuit must keep working on; ref_ids ``[m, pos]`` (same
    ``pos``): the set whose per-position means (``ablation="mean"``, the paper) or activations
    (``"resample"``: one reference row per prompt, drawn once with ``seed``) replace removed components
    (the corrupted prompts in the paper); ``None`` for ``"zero"``. ``metric(logits [batch, pos, vocab])
    -> [batch]``, higher = better. Raises ShapeError when the full model's mean metric is not positive
    (nothing to keep a share of).

    batched: score many candidate removals per forward (the same circuit and decisions as the
    sequential algorithm, ``batched=False``, which scores one per forward). Each removal changes the
    scores after it, so the batch is *speculative*: it holds the next removals along a predicted path
    (predicted from earlier scores; unknown ones predicted removable), each scored on top of the circuit
    the path reaches; the decisions are then taken in order exactly as the sequential algorithm would,
    and the rows after the first wrong prediction are discarded (their scores only improve the next
    predictions). Every forward decides at least one step. Rows per forward: ``max_rows`` and
    ``memory_budget`` bytes (an upper-bound estimate per row). grow (default: on a CPU): one prompt
    per forward, its rows sharing the layers below their first difference from the current circuit
    (fewer FLOPs); else (default on a GPU) every circuit's copy of all prompts stacked into one
    forward from the embedding (fewer, larger forwards).
    """
    if ref_ids is not None and clean_ids.shape[1] != ref_ids.shape[1]:
        raise ShapeError(f"clean ids have {clean_ids.shape[1]} positions, reference ids {ref_ids.shape[1]}")
    if ablation != "zero" and ref_ids is None:
        raise ShapeError(f"{ablation} ablation needs reference ids [m, pos]")
    if not 0 < threshold <= 1:
        raise ShapeError(f"threshold must be in (0, 1], got {threshold}")
    n_layers, n_heads = hm.cfg.n_layers, hm.cfg.n_heads
    program = _program(n_layers, n_heads, sweeps, group_first)
    sc = _Scorer(hm, clean_ids, metric, ref_ids, ablation, include_mlps, batch_size, seed)
    full = float(metric(run_last_logits(hm, clean_ids, batch_size)).mean())
    sc.model_calls += -(-clean_ids.shape[0] // batch_size)
    if not full > 0:
        raise ShapeError(f"the full model's mean metric is {full:.4g} (not positive): no share of it to keep")
    heads = set(all_heads(hm))
    mlps = set(range(n_layers)) if include_mlps else set()
    excluded_mlps = set() if include_mlps else set(range(n_layers))
    trace: list[dict[str, Any]] = []
    batches: list[tuple[int, int]] = []
    need = threshold * full
    bar = tqdm(total=len(program), desc=f"pruning {hm.name}", unit="step", leave=False, disable=not progress)

    def next_step(i: int, h: set[Head], m: set[int]) -> tuple[int, set[Head], set[int], str | int] | None:
        while i < len(program):
            rem = _removal(program[i], h, m, n_heads)
            if rem is not None:
                return (i, *rem)
            i += 1
        return None

    i = 0
    if not batched:
        while (req := next_step(i, heads, mlps)) is not None:
            i, rh, rm, label = req
            s = sc.score(heads - rh, mlps - rm)
            ok = s >= need
            trace.append({"sweep": program[i][0], "component": label, "ratio": s / full, "removed": ok})
            if ok:
                heads -= rh
                mlps -= rm
            i += 1
            bar.n = i
            bar.refresh()
    else:
        if grow is None:
            grow = torch.device(hm.device).type == "cpu"
        per = row_bytes(hm, clean_ids.shape[1]) * (1 if grow else clean_ids.shape[0])
        row_cap = max(1, int(memory_budget // per) - (1 if grow else 0))
        k_max = max(1, min(row_cap, max_rows) if max_rows is not None else row_cap)
        # each step's effect on the score (score after removal - score before), last seen: the
        # prediction of a step is "removable" when the predicted score after it keeps the threshold;
        # a step never scored is predicted as most steps of its kind in this sweep were decided
        # (removable when none was yet)
        effect: dict[str | int, float] = {}
        votes: dict[tuple[str, str], int] = {}  # (sweep, kind) -> removed - kept
        current = full  # the score of the circuit so far
        k = k_max
        while True:
            plan: list[tuple[int, set[Head], set[int], str | int, bool]] = []
            h, m, j, est = set(heads), set(mlps), i, current
            while len(plan) < k and (req := next_step(j, h, m)) is not None:
                j, rh, rm, label = req
                e = effect.get(label)
                pred = votes.get(program[j][:2], 0) >= 0 if e is None else est + e >= need
                plan.append((j, h - rh, m - rm, label, pred))
                if pred:
                    h, m, est = h - rh, m - rm, est + (e or 0.0)
                j += 1
            if not plan:
                break
            cs = [(p[1], p[2]) for p in plan]
            scores = sc.batch((heads, mlps), cs) if grow else sc.stacked(cs)
            n_before = len(trace)
            before = current
            for (_, _, _, label, pred), s in zip(plan, scores):
                effect[label] = s - before  # `before`: the score of the row's own starting circuit
                if pred:
                    before = s
            missed = False
            for (j, kh, km, label, pred), s in zip(plan, scores):
                ok = s >= need
                trace.append({"sweep": program[j][0], "component": label, "ratio": s / full, "removed": ok})
                votes[program[j][:2]] = votes.get(program[j][:2], 0) + (1 if ok else -1)
                if ok:
                    heads, mlps, current = kh, km, s
                i = j + 1
                if ok != pred:  # the later rows start from a circuit this decision makes wrong
                    missed = True
                    break
            batches.append((len(plan), len(trace) - n_before))
            # fewer rows after a wrong prediction (less to throw away), more after a right batch
            k = max(min(4, k_max), k // 2) if missed else min(k_max, 2 * k)
            bar.n = i
            bar.refresh()
    bar.close()
    final = sc.score(heads, mlps) if trace else full
    kept_mlps = sorted(mlps) + sorted(excluded_mlps)
    return PruneResult(
        heads=[head_name(*h) for h in sorted(heads)], mlps=kept_mlps, score_full=full, score_circuit=final,
        ratio=final / full, threshold=threshold, n_forward=len(trace) + 2 if trace else 1, trace=trace,
        ablation=ablation, batched=batched, n_model_calls=sc.model_calls, rows_scored=sc.rows_scored + 1, batches=batches,
        layer_rows=sc.layer_rows + n_layers * clean_ids.shape[0],
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
    need = [hook_name(k, L) for L in range(n_layers) for k in ("head_z", "mlp_out")]
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
                val = recorded[hook_name("mlp_out", rL)]
                jobs.append(("mlp_in", [(hook_name("mlp_out", rL), _const(val))], None))
            else:
                for inp in inputs:
                    kinds = ("q", "k", "v") if inp == "qkv" else (inp,)
                    hooks_ = []
                    kv_group: list[str] | None = None
                    for k in kinds:
                        idx = rH if k == "q" else rH // group
                        if k != "q":
                            kv_group = [head_name(rL, idx * group + j) for j in range(group)]
                        hooks_.append((hook_name(k, rL), _slice_patch(recorded[hook_name(k, rL)], idx)))
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
        L = hook_layer(name)
        if s_kind == "head" and L == sL:
            out = act.clone()  # same layer: inputs unchanged; set the sender only
            out[:, :, sH] = corr_cache[name][:, :, sH].to(act.dtype)
            return out
        return clean_cache[name].to(act.dtype).clone()

    def fm(act: Tensor, name: str) -> Tensor:
        recorded[name] = act.detach()
        if s_kind == "mlp" and hook_layer(name) == sL:
            return corr_cache[name].to(act.dtype).clone()
        return clean_cache[name].to(act.dtype).clone()

    def fr(act: Tensor, name: str) -> None:
        recorded[name] = act.detach()

    for L in range(sL, hm.cfg.n_layers):
        if L > sL or s_kind == "head":
            fwd.append((hook_name("head_z", L), fz))
        fwd.append((hook_name("mlp_out", L), fm))
    fwd += [(hook_name(k, L), fr) for L in rec_layers for k in ("q", "k", "v")]
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
