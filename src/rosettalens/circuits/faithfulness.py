"""Faithfulness of node circuits, faithfulness curves with their MIB areas, and circuits from scores.

A circuit ``C`` is a set of components (heads ``"L.H"``, MLPs ``L``; ``Circuit``). Its metric
``m(C)`` is the task metric (mean over prompts) with every component *outside* ``C`` ablated;
``m(full)`` is the unablated model and ``m(empty)`` the model with every head and MLP ablated
(the embeddings and norms are not components and stay). Faithfulness is

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

(Wang et al. 2023; MIB, Mueller et al. 2025). The ablation of the complement is one of
``patch`` (the activation of the aligned corrupted prompt: MIB's default "patching"), ``mean``
(per-position mean over a reference set, as in Lan, Torr, Barez 2024), ``zero`` or ``resample``
(``rosettalens.circuits.ablation``).

Faithfulness curve and its areas, as the MIB circuit-localization track computes them
(``MIB_circuit_track/evaluation.py::evaluate_area_under_curve`` in the MIB repository): circuits of
``int(p * N)`` components for ``p`` in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
(0.1% .. 100% of the ``N`` scored components), top-``n`` by score; the x axis is ``p`` itself (linear,
not log), no point is added at 0, and the area is the trapezoidal rule over consecutive points:
CPR = area under ``f``, CMD = area under ``|1 - f|``. In MIB, CPR (higher is better) ranks components
by their signed scores and CMD (lower is better) by absolute scores; ``evaluate`` does both. Our
scores estimate the effect of *corrupting* a component (negative = the component supports the
metric), so the signed ranking takes the most negative scores first.
A random baseline draws random circuits of the same sizes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, ShapeError
from ..hooks import HookedModel
from ..names import hook_layer, hook_name, parse_hook_name
from .ablation import KINDS, Ablator, layer_module, parse_head, parse_mlp
from .attribution import (
    EdgeAttribution,
    Metric,
    NodeAttribution,
    edge_graph,
    metric_values,
    parallel_residual,
)

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ABLATIONS = ("patch", *KINDS)


# ---------------------------------------------------------------------------------------- circuits
@dataclass
class Circuit:
    """A node circuit: heads ``["L.H", ...]`` and MLP layers ``[L, ...]``."""

    heads: list[str] = field(default_factory=list)
    mlps: list[int] = field(default_factory=list)

    @classmethod
    def from_components(cls, components: Iterable[str]) -> Circuit:
        """From component keys ``"L.H"`` (head) and ``"mlp.L"`` (MLP)."""
        heads, mlps = [], []
        for c in components:
            if c.startswith("mlp."):
                mlps.append(int(c[4:]))
            else:
                heads.append(c)
        return cls(sorted(heads, key=_head_key), sorted(mlps))

    def components(self) -> list[str]:
        return list(self.heads) + [f"mlp.{m}" for m in self.mlps]

    def __len__(self) -> int:
        return len(self.heads) + len(self.mlps)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": list(self.heads), "mlps": list(self.mlps)}


def _head_key(h: str) -> tuple[int, int]:
    a, b = h.split(".")
    return int(a), int(b)


def component_names(hm: HookedModel) -> list[str]:
    """Every scored component of ``hm``: ``"L.H"`` for each head, ``"mlp.L"`` for each MLP."""
    c = hm.cfg
    return [f"{layer}.{h}" for layer in range(c.n_layers) for h in range(c.n_heads)] + [
        f"mlp.{layer}" for layer in range(c.n_layers)
    ]


def circuit_from_scores(
    scores: Mapping[str, float] | NodeAttribution, size: int | float, *, absolute: bool = False
) -> Circuit:
    """The top-``size`` components by score (``size``: a count, or a float in (0, 1] = share of all).

    absolute=False: most negative scores first (the components whose corruption lowers the metric
    most, our sign convention; MIB's signed ranking); absolute=True: largest ``|score|``. Ties are
    broken by component order (layer, then head, MLPs after heads of a layer).
    """
    table = scores.scores() if isinstance(scores, NodeAttribution) else dict(scores)
    if not table:
        raise DataError("no component scores to build a circuit from")
    n = _size(size, len(table))
    keys = list(table)
    order = sorted(
        range(len(keys)),
        key=lambda i: (-abs(table[keys[i]]) if absolute else table[keys[i]], i),
    )
    return Circuit.from_components(keys[i] for i in order[:n])


def edges_from_scores(scores: EdgeAttribution, size: int | float, *, absolute: bool = False) -> list[str]:
    """The top-``size`` edges (``"sender->receiver"``) by score, ranked as :func:`circuit_from_scores`."""
    table = scores.edges()
    if not table:
        raise DataError("no edge scores to build a circuit from")
    keys = list(table)
    n = _size(size, len(keys))
    order = sorted(range(len(keys)), key=lambda i: (-abs(table[keys[i]]) if absolute else table[keys[i]], i))
    return [keys[i] for i in order[:n]]


def _size(size: int | float, total: int) -> int:
    if isinstance(size, float):
        if not 0.0 <= size <= 1.0:
            raise ConfigError(f"a circuit size as a share must be in [0, 1], got {size}")
        return int(size * total)
    n = int(size)
    if not 0 <= n <= total:
        raise ConfigError(f"circuit size {n} out of range 0..{total}")
    return n


# ---------------------------------------------------------------------------------------- areas
def _trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) != len(y) or len(x) < 2:
        raise ShapeError("an area needs at least two points and one y per x")
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def cpr(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """MIB CPR: trapezoidal area under ``f`` over the fractions (linear x axis)."""
    return _trapezoid(fractions, faithfulness)


def cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """MIB CMD: trapezoidal area under ``|1 - f|`` over the fractions (linear x axis)."""
    return _trapezoid(fractions, [abs(1.0 - f) for f in faithfulness])


@dataclass
class FaithfulnessCurve:
    """Faithfulness at circuit sizes ``int(fraction * n_components)``."""

    fractions: list[float]
    sizes: list[int]
    faithfulness: list[float]
    metrics: list[float]

    @property
    def cpr(self) -> float:
        return cpr(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        return cmd(self.fractions, self.faithfulness)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fractions": self.fractions,
            "sizes": self.sizes,
            "faithfulness": self.faithfulness,
            "metrics": self.metrics,
            "cpr": self.cpr,
            "cmd": self.cmd,
        }


# ---------------------------------------------------------------------------------------- evaluator
class Faithfulness:
    """Evaluate node circuits of ``hm`` on a prompt set.

    clean_ids ``[n, pos]`` (optional ``attention_mask``), metric ``logits -> [batch]`` (or
    ``(logits, rows) -> [batch]``, see ``attribution.metric_values``). ablation: ``patch`` (needs
    ``corrupted_ids`` ``[n, pos]``, row-aligned with the clean prompts), ``mean`` / ``resample`` (need
    ``reference`` ids ``[n_ref, pos]``; default: the corrupted prompts), ``zero``.
    ``m(full)`` and ``m(empty)`` are computed once here.
    """

    def __init__(
        self,
        hm: HookedModel,
        clean_ids: Tensor,
        metric: Metric,
        *,
        ablation: str = "patch",
        corrupted_ids: Tensor | None = None,
        reference: Tensor | None = None,
        attention_mask: Tensor | None = None,
        batch_size: int = 16,
        seed: int = 0,
    ):
        if ablation not in ABLATIONS:
            raise ConfigError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
        clean = torch.as_tensor(clean_ids)
        if clean.dim() != 2 or clean.numel() == 0:
            raise ShapeError(f"clean token ids must be [n, pos], got {tuple(clean.shape)}")
        self.hm, self.clean, self.metric, self.ablation = hm, clean, metric, ablation
        self.mask = torch.ones_like(clean) if attention_mask is None else torch.as_tensor(attention_mask)
        if self.mask.shape != clean.shape:
            raise ShapeError(
                f"attention_mask {tuple(self.mask.shape)} does not match ids {tuple(clean.shape)}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.components = component_names(hm)
        if ablation == "patch":
            if corrupted_ids is None:
                raise ConfigError("patch ablation needs corrupted_ids (row-aligned with the clean prompts)")
            corr = torch.as_tensor(corrupted_ids)
            if corr.shape != clean.shape:
                raise ShapeError(
                    f"corrupted ids {tuple(corr.shape)} do not match clean ids {tuple(clean.shape)}"
                )
            self.ablator = Ablator(hm, "resample", corr, seed=seed, batch_size=batch_size)
        elif ablation == "zero":
            self.ablator = Ablator(hm, "zero")
        else:
            ref = reference if reference is not None else corrupted_ids
            if ref is None:
                raise ConfigError(f"{ablation} ablation needs reference (or corrupted_ids) token ids")
            self.ablator = Ablator(hm, ablation, torch.as_tensor(ref), seed=seed, batch_size=batch_size)
        self.m_full = self._run(None)
        self.m_empty = self._run(Circuit())
        if abs(self.m_full - self.m_empty) < 1e-12 * max(1.0, abs(self.m_full)):
            raise DataError(
                f"the metric is the same with every component ablated ({self.m_empty:.6g}) as without "
                f"({self.m_full:.6g}): faithfulness is undefined on these prompts"
            )

    def _run(self, circuit: Circuit | None) -> float:
        """Mean metric with the complement of ``circuit`` ablated (``None``: nothing ablated)."""
        hm = self.hm
        heads: list[str] = []
        mlps: list[int] = []
        if circuit is not None:
            keep_h = {parse_head(hm, h) for h in circuit.heads}
            keep_m = {parse_mlp(hm, m) for m in circuit.mlps}
            heads = [
                f"{layer}.{h}"
                for layer in range(hm.cfg.n_layers)
                for h in range(hm.cfg.n_heads)
                if (layer, h) not in keep_h
            ]
            mlps = [layer for layer in range(hm.cfg.n_layers) if layer not in keep_m]
        total = 0.0
        n = self.clean.shape[0]
        for s in range(0, n, self.batch_size):
            rows = torch.arange(s, min(n, s + self.batch_size))
            ids, m = self.clean[rows], self.mask[rows]
            if circuit is None:
                logits = hm.forward(ids, attention_mask=m)
            else:
                kw = {"rows": rows} if self.ablation == "patch" else {}
                with self.ablator.ablate(heads, mlps, **kw):
                    logits = hm.forward(ids, attention_mask=m)
            total += float(metric_values(self.metric, logits, rows).double().sum())
        return total / n

    def metric_of(self, circuit: Circuit) -> float:
        """``m(C)``: the mean metric with every component outside ``circuit`` ablated."""
        return self._run(circuit)

    def __call__(self, circuit: Circuit) -> float:
        """``f(C) = (m(C) - m(empty)) / (m(full) - m(empty))``."""
        return (self._run(circuit) - self.m_empty) / (self.m_full - self.m_empty)

    def curve(
        self,
        scores: Mapping[str, float] | NodeAttribution,
        *,
        absolute: bool = False,
        fractions: Sequence[float] = MIB_FRACTIONS,
    ) -> FaithfulnessCurve:
        """Faithfulness of the top-``int(p * N)`` components by score, for each ``p`` in ``fractions``."""
        table = scores.scores() if isinstance(scores, NodeAttribution) else dict(scores)
        missing = set(self.components) - set(table)
        if missing:
            raise DataError(f"scores lack {len(missing)} components, e.g. {sorted(missing)[:3]}")
        table = {k: table[k] for k in self.components}
        fr = _check_fractions(fractions)
        sizes = [int(p * len(table)) for p in fr]
        ms = [self._run(circuit_from_scores(table, n, absolute=absolute)) for n in sizes]
        return self._curve(fr, sizes, ms)

    def _curve(self, fr: list[float], sizes: list[int], ms: list[float]) -> FaithfulnessCurve:
        f = [(m - self.m_empty) / (self.m_full - self.m_empty) for m in ms]
        return FaithfulnessCurve(fr, sizes, f, ms)

    def random_curve(self, *, fractions: Sequence[float] = MIB_FRACTIONS, seed: int = 0) -> FaithfulnessCurve:
        """Faithfulness of one random circuit per size (uniform without replacement, seeded)."""
        fr = _check_fractions(fractions)
        rng = random.Random(seed)
        sizes = [int(p * len(self.components)) for p in fr]
        ms = [self._run(Circuit.from_components(rng.sample(self.components, n))) for n in sizes]
        return self._curve(fr, sizes, ms)

    def random_baseline(self, circuit: Circuit, *, n: int = 20, seed: int = 0) -> dict[str, Any]:
        """``f(circuit)`` against ``n`` random circuits of its size: as many heads (drawn uniformly
        without replacement from all heads) and as many MLPs (from all MLPs), seeded.

        Returns ``faithfulness``, ``random`` (the ``n`` values), their ``random_mean`` / ``random_std``
        and ``p_value = (1 + #{random >= f(circuit)}) / (1 + n)``: the one-sided permutation p-value of
        "a random circuit of this size is at least as faithful" (its smallest value is ``1 / (1 + n)``).
        """
        if n < 1:
            raise ConfigError(f"n must be >= 1 random circuits, got {n}")
        heads = [c for c in self.components if not c.startswith("mlp.")]
        mlps = [c for c in self.components if c.startswith("mlp.")]
        nh, nm = len(circuit.heads), len(circuit.mlps)
        f = self(circuit)
        rng = random.Random(seed)
        rand = [self(Circuit.from_components(rng.sample(heads, nh) + rng.sample(mlps, nm))) for _ in range(n)]
        mean = sum(rand) / n
        std = (sum((r - mean) ** 2 for r in rand) / max(1, n - 1)) ** 0.5
        return {
            "faithfulness": f,
            "n_heads": nh,
            "n_mlps": nm,
            "random": rand,
            "random_mean": mean,
            "random_std": std,
            "p_value": (1 + sum(r >= f for r in rand)) / (1 + n),
        }

    def evaluate(
        self,
        scores: Mapping[str, float] | NodeAttribution,
        *,
        n_random: int = 3,
        fractions: Sequence[float] = MIB_FRACTIONS,
        seed: int = 0,
    ) -> dict[str, Any]:
        """MIB-style summary: CPR (signed ranking), CMD (absolute ranking) and the random baseline's
        mean CPR / CMD over ``n_random`` random curves; plus the curves themselves."""
        signed = self.curve(scores, absolute=False, fractions=fractions)
        absolute = self.curve(scores, absolute=True, fractions=fractions)
        rand = [self.random_curve(fractions=fractions, seed=seed + i) for i in range(n_random)]
        return {
            "m_full": self.m_full,
            "m_empty": self.m_empty,
            "ablation": self.ablation,
            "n_components": len(self.components),
            "cpr": signed.cpr,
            "cmd": absolute.cmd,
            "random_cpr": sum(r.cpr for r in rand) / max(1, len(rand)),
            "random_cmd": sum(r.cmd for r in rand) / max(1, len(rand)),
            "curve_signed": signed.to_dict(),
            "curve_absolute": absolute.to_dict(),
            "random_curves": [r.to_dict() for r in rand],
        }


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(p) for p in fractions]
    if len(fr) < 2 or any(not 0.0 < p <= 1.0 for p in fr) or fr != sorted(fr):
        raise ConfigError(f"fractions must be >= 2 increasing values in (0, 1], got {fr}")
    return fr


# ---------------------------------------------------------------------------------------- edge circuits
class EdgeFaithfulness:
    """Faithfulness of *edge* circuits (edges of ``attribution.edge_graph``) by exact edge patching.

    An edge outside the circuit carries its sender's *corrupted* output to its receiver (MIB's
    "patching" for edges): every receiver reads ``resid - sum over its ablated in-edges (w_u - w_u')``,
    with ``w_u`` the sender's write in the current run and ``w_u'`` in the aligned corrupted run. Head
    writes are the head's share of ``o_proj`` (``o_proj(z masked to the head) - o_proj(0)``; the shared
    bias is in both runs), MLP writes ``mlp_out``, the embedding ``embed``. Receivers are rebuilt by the
    model's own modules, called directly: a head's q/k/v from the layer's ``input_layernorm`` and its
    projection; an MLP's input by shifting ``attn_out.L`` and giving the shift back at ``mlp_out.L``
    (so only the MLP sees it); the logits by shifting the last ``resid_post``.
    With every edge in the circuit nothing changes; with none, the run is the corrupted run.

    Supported: models with separate q/k/v projections, a sequential residual and no post-block norms
    (Llama, Mistral, Qwen 2/3); Gemma's normed sum of heads has no per-head write to patch, and
    GPT-2/Pythia (fused projections, Pythia's parallel residual) are not wired here.
    """

    def __init__(
        self,
        hm: HookedModel,
        clean_ids: Tensor,
        corrupted_ids: Tensor,
        metric: Metric,
        *,
        batch_size: int = 16,
    ):
        a = hm.adapter
        if a.post_block_norms or a.qkv_fused is not None or parallel_residual(hm):
            raise ConfigError(
                f"edge faithfulness supports Llama/Mistral/Qwen-style models, not {hm.cfg.family} "
                "(post-block norms, fused q/k/v or a parallel residual); evaluate node circuits instead"
            )
        clean, corr = torch.as_tensor(clean_ids), torch.as_tensor(corrupted_ids)
        if clean.dim() != 2 or clean.shape != corr.shape or clean.numel() == 0:
            raise ShapeError(
                f"clean and corrupted ids must be [n, pos] of one shape, got {tuple(clean.shape)}, {tuple(corr.shape)}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.hm, self.clean, self.corrupted, self.metric, self.batch_size = (
            hm,
            clean,
            corr,
            metric,
            batch_size,
        )
        self.senders, self.receivers, self.graph = edge_graph(hm)
        self._s_index = {s: i for i, s in enumerate(self.senders)}
        self._r_index = {r: j for j, r in enumerate(self.receivers)}
        self.edge_names = [
            f"{s}->{r}"
            for i, s in enumerate(self.senders)
            for j, r in enumerate(self.receivers)
            if self.graph[i, j]
        ]
        self._corrupt_writes: list[Tensor] = []
        for s in range(0, clean.shape[0], batch_size):
            self._corrupt_writes.append(self._writes_of(corr[s : s + batch_size]))
        self.m_full = self._run(self.graph.clone())
        self.m_empty = self._run(torch.zeros_like(self.graph))
        if abs(self.m_full - self.m_empty) < 1e-12 * max(1.0, abs(self.m_full)):
            raise DataError(
                "the metric is the same with every edge ablated as without: faithfulness is undefined"
            )

    # ------------------------------------------------------------------ plumbing
    def _head_writes(self, layer: int, z: Tensor) -> Tensor:
        """``[n_heads, batch, pos, d_model]``: each head's share of ``o_proj`` (bias excluded)."""
        o = layer_module(self.hm, layer, self.hm.adapter.o_proj)
        H = self.hm.cfg.n_heads
        b, p = z.shape[:2]
        eye = torch.eye(H, dtype=z.dtype, device=z.device).view(H, 1, 1, H, 1)
        zs = (z.unsqueeze(0) * eye).reshape(H * b, p, -1)
        out = o.forward(zs) - o.forward(torch.zeros_like(zs[:1]))  # .forward: no hooks re-entered
        return out.view(H, b, p, -1)

    def _writes_of(self, ids: Tensor) -> Tensor:
        """``[n_senders, batch, pos, d_model]``: every sender's write on ``ids`` (no intervention)."""
        L = self.hm.cfg.n_layers
        hooks = (
            ["embed"]
            + [hook_name("head_z", i) for i in range(L)]
            + [hook_name("mlp_out", i) for i in range(L)]
        )
        _, cache = self.hm.run_with_cache(ids, hooks=hooks)
        rows = [cache["embed"].unsqueeze(0)]
        with torch.no_grad():
            for layer in range(L):
                rows.append(self._head_writes(layer, cache[hook_name("head_z", layer)]))
                rows.append(cache[hook_name("mlp_out", layer)].unsqueeze(0))
        return torch.cat(rows)

    def _run(self, keep: Tensor) -> float:
        """Mean metric with the edges outside ``keep`` (bool ``[n_senders, n_receivers]``) patched."""
        ablate = (self.graph & ~keep).to(self.hm.dtype)  # [S, R]
        total = 0.0
        n = self.clean.shape[0]
        for ci, s in enumerate(range(0, n, self.batch_size)):
            rows = torch.arange(s, min(n, s + self.batch_size))
            total += self._run_chunk(rows, self._corrupt_writes[ci], ablate)
        return total / n

    def _run_chunk(self, rows: Tensor, corr_w: Tensor, ablate: Tensor) -> float:
        hm = self.hm
        c = hm.cfg
        L, H, KV = c.n_layers, c.n_heads, c.n_kv_heads
        ri = self._r_index
        corr_w = corr_w.to(hm.device)
        cur: list[Tensor] = []  # current-run writes, in sender order (embed, per layer: heads, MLP)
        state: dict[str, Any] = {}

        def shift(cols: list[int]) -> Tensor | None:
            """``[len(cols), batch, pos, d]``: sum over ablated in-edges of (current - corrupted)."""
            k = len(cur)
            a = ablate[:k, cols]
            if not bool(a.any()):
                return None
            delta = torch.stack(cur) - corr_w[:k].to(cur[0].dtype)
            return torch.einsum("sr,sbpd->rbpd", a.to(delta.dtype), delta)

        def on_embed(act: Tensor, name: str) -> None:
            cur.append(act)

        def on_resid_pre(act: Tensor, name: str) -> None:
            state["x"] = act

        def on_proj(act: Tensor, name: str) -> Tensor | None:
            kind, layer = parse_hook_name(name)[0], hook_layer(name)
            nh = H if kind == "q" else KV
            d = shift([ri[f"{layer}.{h}.{kind}"] for h in range(nh)])
            if d is None:
                return None
            block = hm.layers[layer]
            norm = block.input_layernorm
            proj = getattr(block.self_attn, f"{kind}_proj")
            out = act.clone()
            for h in range(nh):
                if bool((d[h] != 0).any()):  # .forward: the model's own modules, no hooks re-entered
                    y = proj.forward(norm.forward(state["x"] - d[h]))
                    out[:, :, h] = y.view(*y.shape[:-1], nh, -1)[:, :, h]
            return out

        def on_head_z(act: Tensor, name: str) -> None:
            cur.extend(self._head_writes(hook_layer(name), act).unbind(0))

        def on_attn_out(act: Tensor, name: str) -> Tensor | None:
            d = shift([ri[f"mlp.{name.split('.')[1]}"]])
            state["mlp_shift"] = d
            return None if d is None else act - d[0]

        def on_mlp_out(act: Tensor, name: str) -> Tensor | None:
            d = state.pop("mlp_shift", None)
            cur.append(act)  # the MLP's own write (the shift is given back to the residual only)
            return None if d is None else act + d[0]

        def on_last(act: Tensor, name: str) -> Tensor | None:
            d = shift([ri["logits"]])
            return None if d is None else act - d[0]

        hooks: list[tuple[str, Any]] = [("embed", on_embed)]
        for layer in range(L):
            hooks += [(hook_name("resid_pre", layer), on_resid_pre)]
            hooks += [(hook_name(k, layer), on_proj) for k in ("q", "k", "v")]
            hooks += [(hook_name("head_z", layer), on_head_z), (hook_name("attn_out", layer), on_attn_out)]
            hooks += [(hook_name("mlp_out", layer), on_mlp_out)]
        hooks.append((hook_name("resid_post", L - 1), on_last))
        with hm.hooks(hooks):
            logits = hm.forward(self.clean[rows])
        return float(metric_values(self.metric, logits, rows).double().sum())

    # ------------------------------------------------------------------ public
    def mask_of(self, edges: Iterable[str]) -> Tensor:
        """Bool ``[n_senders, n_receivers]`` of ``"sender->receiver"`` names (must be graph edges)."""
        keep = torch.zeros_like(self.graph)
        for e in edges:
            s, _, r = e.partition("->")
            if (
                s not in self._s_index
                or r not in self._r_index
                or not self.graph[self._s_index[s], self._r_index[r]]
            ):
                raise ConfigError(f"{e!r} is not an edge of {self.hm.name}'s graph")
            keep[self._s_index[s], self._r_index[r]] = True
        return keep

    def metric_of(self, edges: Iterable[str]) -> float:
        return self._run(self.mask_of(edges))

    def __call__(self, edges: Iterable[str]) -> float:
        """``f(C)`` of the edge circuit ``edges`` (``"sender->receiver"`` names)."""
        return (self.metric_of(edges) - self.m_empty) / (self.m_full - self.m_empty)

    def curve(
        self, scores: EdgeAttribution, *, absolute: bool = False, fractions: Sequence[float] = MIB_FRACTIONS
    ) -> FaithfulnessCurve:
        """Faithfulness of the top-``int(p * n_edges)`` edges by score (most negative first, or by |score|)."""
        table = scores.edges()
        if set(table) != set(self.edge_names):
            raise DataError("edge scores are for another graph (other model?)")
        fr = _check_fractions(fractions)
        sizes = [int(p * len(self.edge_names)) for p in fr]
        ms = [self.metric_of(edges_from_scores(scores, n, absolute=absolute)) for n in sizes]
        return FaithfulnessCurve(fr, sizes, [self._f(m) for m in ms], ms)

    def random_curve(self, *, fractions: Sequence[float] = MIB_FRACTIONS, seed: int = 0) -> FaithfulnessCurve:
        fr = _check_fractions(fractions)
        rng = random.Random(seed)
        sizes = [int(p * len(self.edge_names)) for p in fr]
        ms = [self.metric_of(rng.sample(self.edge_names, n)) for n in sizes]
        return FaithfulnessCurve(fr, sizes, [self._f(m) for m in ms], ms)

    def _f(self, m: float) -> float:
        return (m - self.m_empty) / (self.m_full - self.m_empty)

    def evaluate(
        self,
        scores: EdgeAttribution,
        *,
        n_random: int = 3,
        fractions: Sequence[float] = MIB_FRACTIONS,
        seed: int = 0,
    ) -> dict[str, Any]:
        """As :meth:`Faithfulness.evaluate`, over edges."""
        signed = self.curve(scores, absolute=False, fractions=fractions)
        absolute = self.curve(scores, absolute=True, fractions=fractions)
        rand = [self.random_curve(fractions=fractions, seed=seed + i) for i in range(n_random)]
        return {
            "m_full": self.m_full,
            "m_empty": self.m_empty,
            "ablation": "patch",
            "n_edges": len(self.edge_names),
            "cpr": signed.cpr,
            "cmd": absolute.cmd,
            "random_cpr": sum(r.cpr for r in rand) / max(1, len(rand)),
            "random_cmd": sum(r.cmd for r in rand) / max(1, len(rand)),
            "curve_signed": signed.to_dict(),
            "curve_absolute": absolute.to_dict(),
            "random_curves": [r.to_dict() for r in rand],
        }
