"""Attribution graphs over transcoder features (Ameisen et al. 2025, "circuit tracing").

For one prompt the *local replacement model* is the real Hugging Face forward pass with

* every attention pattern frozen (queries and keys are detached, so only values carry gradient),
* every norm scale frozen (the RMSNorm / LayerNorm denominator is a constant; the centring of
  LayerNorm and the weight stay linear),
* every MLP replaced by its transcoder, whose feature activations are constants (the nonlinearity
  is stopped), plus an *error node* per layer and position: ``mlp_out - transcoder(mlp_in)``, frozen.
  A layer without a transcoder is all error. A skip connection (``x @ W_skip``) stays linear.
  At the positions a transcoder's attention-sink rule leaves out (the first ``skip_first`` positions
  and norm outliers, which it was not trained on) its features are zero, so the MLP output there is
  error (circuit-tracer zeroes the first position's features likewise).

With these stops the model is linear from the nodes' contributions to every feature's
pre-activation and to every logit, and its forward value is exactly the real model's. Nodes, in the
order of the adjacency matrix (as circuit-tracer): selected active features ``(layer, pos, feature)``,
error nodes ``(layer, pos)`` layer-major, token embeddings ``(pos)``, and the output logits (the top
tokens at the last position up to a cumulative probability, as ``logit - mean logit``; for models with
logit soft-capping the logit before the cap). ``adjacency[target, source]`` is the direct effect of the
source's whole contribution on the target: for a feature source ``a_s * (W_dec[s] . g)``, for an error
``err . g``, for a token ``embed . g``, where ``g`` is the gradient of the target's pre-activation
(``x @ W_enc[:, t]``) or demeaned logit with respect to the source's place in the residual stream,
taken through the linearised model.

Gradients for many targets come from one forward pass of the prompt whose graph is kept and reused:
each backward pass is batched over ``batch_size`` targets (``torch.autograd.grad`` with
``is_grads_batched``), so memory holds one forward's saved tensors plus ``batch_size`` gradients of
the residual stream, not a copy of the forward per target. Which features get rows is chosen as in
circuit-tracer: the logits first, then repeatedly the not-yet-expanded features with the largest
influence on the logits through the rows known so far, up to ``max_feature_nodes``.

Pruning and scores follow circuit-tracer's definitions: rows of ``|adjacency|`` normalised to sum 1,
influence = logit-probability-weighted ``A + A^2 + ...``, keep the nodes carrying ``node_threshold``
of the influence and the edges carrying ``edge_threshold``; the *replacement score* is the share of
the tokens' and errors' influence that comes from tokens, the *completeness score* the
influence-weighted share of every node's normalised input that does not come from error nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError, ShapeError
from ..names import hook_name

__all__ = [
    "AttributionGraph",
    "GraphPruning",
    "build_graph",
    "compute_influence",
    "frozen_norm_linear",
    "linearised",
    "norm_kind",
    "norm_modules",
    "normalize_adjacency",
    "prune_graph",
    "graph_scores",
]


# --------------------------------------------------------------------------------------------- norms
def norm_kind(module: nn.Module) -> str | None:
    """``"layernorm"``, ``"rms"`` (``x / rms * w``), ``"rms1p"`` (Gemma: ``x / rms * (1 + w)``) or ``None``."""
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    name = type(module).__name__
    if name.endswith("RMSNorm"):
        return "rms1p" if name.startswith("Gemma") else "rms"
    return None


def _norm_eps(module: nn.Module) -> float:
    for attr in ("eps", "variance_epsilon"):
        v = getattr(module, attr, None)
        if v is not None:
            return float(v)
    raise ConfigError(f"cannot find the epsilon of norm module {type(module).__name__}")


def frozen_norm_linear(module: nn.Module, x0: Tensor, dx: Tensor) -> Tensor:
    """The norm's map with its scale frozen at ``x0``, applied to ``dx`` (both ``[..., d]``), bias left out.

    RMSNorm: ``dx / rms(x0) * w``; LayerNorm: ``(dx - mean(dx)) / std(x0) * w``. Linear in ``dx``;
    ``frozen_norm_linear(m, x0, x0)`` equals ``m(x0)`` (minus LayerNorm's bias).
    """
    kind = norm_kind(module)
    eps = _norm_eps(module)
    x0f = x0.detach().to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
    weight = getattr(module, "weight", None)
    if kind == "layernorm":
        inv = torch.rsqrt(x0f.var(-1, keepdim=True, unbiased=False) + eps).to(dx.dtype)
        out = (dx - dx.mean(-1, keepdim=True)) * inv
        return out * weight.detach().to(dx.dtype) if weight is not None else out
    if kind in ("rms", "rms1p"):
        inv = torch.rsqrt(x0f.pow(2).mean(-1, keepdim=True) + eps).to(dx.dtype)
        out = dx * inv
        if weight is None:
            return out
        w = weight.detach().to(dx.dtype)
        return out * (1.0 + w) if kind == "rms1p" else out * w
    raise ConfigError(f"{type(module).__name__} is not a supported norm module")


def norm_modules(hm: Any) -> list[tuple[str, nn.Module]]:
    """Every norm module of the model except the Gemma post-MLP norm (replaced with the MLP)."""
    skip: set[int] = set()
    if hm.adapter.post_block_norms:
        for block in hm.layers:
            mod: Any = block
            for part in hm.adapter.mlp_out.split("."):
                mod = getattr(mod, part)
            skip.add(id(mod))
    return [(n, m) for n, m in hm.model.named_modules() if norm_kind(m) is not None and id(m) not in skip]


# ----------------------------------------------------------------------------- the linearised forward
@dataclass
class _Clean:
    """What the clean forward pass gives the graph (batch 1, float of the model's dtype).

    ``mlp_in[L]`` / ``mlp_out[L]`` ``[pos, d_model]``; ``acts[L]`` ``[pos, width]`` (``None`` without a
    transcoder); ``errors`` ``[n_layers, pos, d_model]``; ``embed`` ``[pos, d_model]``; ``logits``
    ``[vocab]`` at the last position.
    """

    ids: Tensor
    mlp_in: list[Tensor]
    mlp_out: list[Tensor]
    acts: list[Tensor | None]
    errors: Tensor
    embed: Tensor
    logits: Tensor


@torch.no_grad()
def _clean_pass(hm: Any, transcoders: Any, ids: Tensor) -> _Clean:
    n_layers = hm.cfg.n_layers
    hooks = ["embed"] + [hook_name(k, L) for L in range(n_layers) for k in ("mlp_in", "mlp_out")]
    logits, cache = hm.run_with_cache(ids, hooks=hooks)
    mlp_in, mlp_out, acts, errors = [], [], [], []
    for L in range(n_layers):
        x = cache[hook_name("mlp_in", L)][0]
        y = cache[hook_name("mlp_out", L)][0]
        mlp_in.append(x)
        mlp_out.append(y)
        if L in transcoders:
            tc = transcoders[L]
            keep = tc.keep_mask(x[None], y[None])[0]  # [pos]: the positions the transcoder stands for
            f = tc.encode(x) * keep[:, None].to(x.dtype)
            s = tc.skip_out(x)
            recon = (tc.decode(f) if s is None else tc.decode(f) + s).to(y.dtype)
            acts.append(f)
            errors.append(y - recon)
        else:
            acts.append(None)
            errors.append(y.clone())
    return _Clean(
        ids=ids,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        acts=acts,
        errors=torch.stack(errors),
        embed=cache["embed"][0],
        logits=logits[0, -1],
    )


@dataclass
class _Linear:
    """Tensors of one linearised forward pass of the prompt.

    ``embed`` and ``out[L]`` are leaves ``[1, pos, d_model]`` (gradients w.r.t. them are read);
    ``mlp_in[L]`` and ``final`` (the final norm's output) ``[1, pos, d_model]`` carry the graph.
    """

    embed: Tensor | None = None
    out: dict[int, Tensor] = field(default_factory=dict)
    mlp_in: dict[int, Tensor] = field(default_factory=dict)
    final: Tensor | None = None


@contextlib.contextmanager
def linearised(hm: Any, transcoders: Any, ids: Tensor) -> Iterator[_Linear]:
    """Run the local replacement model (see the module docstring) on ``ids [1, pos]`` with gradients
    enabled; yields the tensors to inject and read gradients at (the graph is kept for many backward
    passes, each batched over targets with ``torch.autograd.grad(..., is_grads_batched=True)``).

    Parameters stop requiring gradients inside the block; every hook is removed on exit.
    """
    n_layers = hm.cfg.n_layers
    lin = _Linear()
    final_norm: Any = hm.model
    for part in hm.adapter.final_norm.split("."):
        final_norm = getattr(final_norm, part)

    def embed_fn(act: Tensor, name: str) -> Tensor:
        leaf = act.detach().requires_grad_(True)
        lin.embed = leaf
        return leaf

    def detach_fn(act: Tensor, name: str) -> Tensor:
        return act.detach()

    def mlp_in_fn(act: Tensor, name: str) -> Tensor:
        lin.mlp_in[int(name.split(".")[1])] = act
        return act.detach()  # the real MLP runs without a graph: its output is replaced

    def mlp_out_fn(act: Tensor, name: str) -> Tensor:
        L = int(name.split(".")[1])
        leaf = act.detach().requires_grad_(True)
        lin.out[L] = leaf
        if L in transcoders and transcoders[L].W_skip is not None:
            x = lin.mlp_in[L]
            skip = transcoders[L].skip_out(x - x.detach())
            return leaf + skip.to(leaf.dtype)
        return leaf

    def norm_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        y = output.detach()
        if x.requires_grad:
            y = y + frozen_norm_linear(mod, x, x - x.detach()).to(y.dtype)
        if mod is final_norm:
            lin.final = y
        return y

    handles = []
    grads = [(p, p.requires_grad) for p in hm.model.parameters()]
    tc_grads = [(p, p.requires_grad) for L in transcoders.layers for p in transcoders[L].parameters()]
    fwd: list[tuple[str, Any, str]] = [("embed", embed_fn, "plain")]
    for L in range(n_layers):
        fwd += [(hook_name("q", L), detach_fn, "plain"), (hook_name("k", L), detach_fn, "plain")]
        fwd += [(hook_name("mlp_in", L), mlp_in_fn, "plain"), (hook_name("mlp_out", L), mlp_out_fn, "plain")]
    try:
        for p, _ in grads + tc_grads:
            p.requires_grad_(False)
        for _, mod in norm_modules(hm):  # registered first: they run before the replacement hooks
            handles.append(mod.register_forward_hook(norm_hook))
        with hm.intervene(fwd), torch.enable_grad():
            batch = ids.reshape(1, -1)
            hm.model(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                use_cache=False,
                logits_to_keep=1,
            )
        if lin.embed is None or lin.final is None or len(lin.out) != n_layers:  # pragma: no cover
            raise ShapeError(f"the linearised forward of {hm.name} did not reach every hook point")
        yield lin
    finally:
        for h in handles:
            h.remove()
        for p, req in grads + tc_grads:
            p.requires_grad_(req)


# ------------------------------------------------------------------------------------- the graph
@dataclass
class AttributionGraph:
    """A prompt's attribution graph.

    Nodes (adjacency order, as circuit-tracer): ``n_features`` selected features, ``n_layers * n_pos``
    error nodes (layer-major), ``n_pos`` token embeddings, ``n_logits`` logits. Only feature and logit
    nodes have incoming edges, so the graph keeps just their rows: ``edges [n_features + n_logits,
    n_nodes]`` (row ``i`` is node ``row_nodes[i]``; column = source node); :attr:`adjacency` is the
    full ``[n_nodes, n_nodes]`` matrix. ``active_features [n_active, 3]`` (layer, pos, feature) and
    ``activations [n_active]`` list every active feature; ``selected [n_features]`` indexes the ones
    that are nodes. ``logit_tokens`` / ``logit_probs`` ``[n_logits]``; ``input_ids`` ``[pos]``.
    """

    prompt: str
    input_ids: Tensor
    tokens: list[str]
    model: str
    n_layers: int
    active_features: Tensor
    activations: Tensor
    selected: Tensor
    edges: Tensor
    logit_tokens: Tensor
    logit_probs: Tensor
    logit_strs: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_features(self) -> int:
        return int(self.selected.numel())

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def row_nodes(self) -> Tensor:
        """The node of each row of :attr:`edges` ``[n_features + n_logits]``."""
        return torch.cat([torch.arange(self.n_features), torch.arange(self.logit_start, self.n_nodes)])

    @property
    def adjacency(self) -> Tensor:
        """The full adjacency matrix ``[n_nodes, n_nodes]`` (row = target, column = source)."""
        A = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.edges.dtype)
        A[self.row_nodes] = self.edges
        return A

    def logit_weights(self) -> Tensor:
        w = torch.zeros(self.n_nodes, dtype=self.edges.dtype)
        w[self.logit_start :] = self.logit_probs.to(w.dtype)
        return w

    def node(self, i: int) -> dict[str, Any]:
        """The node at adjacency index ``i``: ``{"kind", "layer", "pos", "feature", ...}``."""
        if i < self.n_features:
            layer, pos, feat = (int(v) for v in self.active_features[self.selected[i]])
            act = float(self.activations[self.selected[i]])
            return {"kind": "feature", "layer": layer, "pos": pos, "feature": feat, "activation": act}
        if i < self.token_start:
            layer, pos = divmod(i - self.n_features, self.n_pos)
            return {"kind": "error", "layer": layer, "pos": pos}
        if i < self.logit_start:
            pos = i - self.token_start
            return {
                "kind": "token",
                "pos": pos,
                "token_id": int(self.input_ids[pos]),
                "token": self.tokens[pos],
            }
        j = i - self.logit_start
        return {
            "kind": "logit",
            "pos": self.n_pos - 1,
            "token_id": int(self.logit_tokens[j]),
            "token": self.logit_strs[j] if j < len(self.logit_strs) else str(int(self.logit_tokens[j])),
            "prob": float(self.logit_probs[j]),
        }

    def node_id(self, i: int) -> str:
        """circuit-tracer's node id: ``{layer}_{feature}_{pos}``, ``{layer}_-1_{pos}`` (error),
        ``E_{token}_{pos}`` (embedding), ``{n_layers + 1}_{token}_{pos}`` (logit)."""
        n = self.node(i)
        if n["kind"] == "feature":
            return f"{n['layer']}_{n['feature']}_{n['pos']}"
        if n["kind"] == "error":
            return f"{n['layer']}_-1_{n['pos']}"
        if n["kind"] == "token":
            return f"E_{n['token_id']}_{n['pos']}"
        return f"{self.n_layers + 1}_{n['token_id']}_{n['pos']}"

    def influence(self) -> Tensor:
        """Each node's influence on the logits ``[n_nodes]`` (normalised adjacency, logit-weighted)."""
        return compute_influence(normalize_adjacency(self.edges), self.row_nodes, self.logit_weights())

    def total_effects(self, logit: int = 0) -> Tensor:
        """Signed total effect ``[n_nodes]`` of each node's contribution on logit target ``logit`` through
        the linear graph (direct + through features): that row of ``A + A^2 + ...``."""
        nf = self.n_features
        v = self.edges[nf + logit].to(torch.float64)
        feats = self.edges[:nf].to(torch.float64)
        total = v.clone()
        for _ in range(10_000):
            v = v[:nf] @ feats
            if not bool(v.any()):
                return total.to(self.edges.dtype)
            total += v
        raise ShapeError("total effects did not converge: the graph has a cycle")  # pragma: no cover

    def top_features(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` feature nodes of largest influence, with their influence and node id."""
        infl = self.influence()[: self.n_features]
        order = torch.argsort(infl, descending=True)[:n]
        out = []
        for i in order.tolist():
            d = self.node(i)
            d.update(node_id=self.node_id(i), influence=float(infl[i]), token=self.tokens[d["pos"]])
            out.append(d)
        return out

    def scores(self) -> tuple[float, float]:
        """``(replacement_score, completeness_score)`` (see :func:`graph_scores`)."""
        return graph_scores(self)


def normalize_adjacency(rows: Tensor) -> Tensor:
    """``|rows|`` with each row divided by its sum (rows of zeros stay zero)."""
    a = rows.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(
    normalized: Tensor, row_nodes: Tensor, weights: Tensor, max_iter: int = 10_000
) -> Tensor:
    """``w @ (A + A^2 + ...)`` ``[n_nodes]`` where ``A`` has the rows ``normalized [r, n_nodes]`` at
    nodes ``row_nodes [r]`` and zeros elsewhere (an acyclic graph); ``weights [n_nodes]``."""
    current = weights[row_nodes] @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = current[row_nodes] @ normalized
        total += current
    raise ShapeError("influence did not converge: the graph has a cycle")


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """circuit-tracer's ``(replacement_score, completeness_score)``.

    replacement = token influence / (token + error influence); completeness = sum over nodes of
    (1 - the share of the node's normalised input from error nodes) * (its influence + logit weight),
    divided by the sum of the weights.
    """
    An = normalize_adjacency(graph.edges)
    rows = graph.row_nodes
    w = graph.logit_weights()
    infl = compute_influence(An, rows, w)
    tok = infl[graph.token_start : graph.logit_start].sum()
    err = infl[graph.error_start : graph.token_start].sum()
    replacement = float(tok / (tok + err)) if float(tok + err) > 0 else float("nan")
    non_error = torch.ones(graph.n_nodes, dtype=An.dtype)
    non_error[rows] = 1 - An[:, graph.error_start : graph.token_start].sum(dim=-1)
    out_infl = infl + w
    completeness = float((non_error * out_infl).sum() / out_infl.sum())
    return replacement, completeness


def _threshold(scores: Tensor, fraction: float) -> Tensor:
    """The score above which the largest scores sum to ``fraction`` of the total."""
    s = torch.sort(scores.flatten(), descending=True).values
    if not s.numel() or float(s.sum()) <= 0:
        return torch.tensor(float("inf"))
    cum = torch.cumsum(s, 0) / s.sum()
    idx = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))), s.numel() - 1)
    return s[idx]


@dataclass
class GraphPruning:
    """Which nodes ``[n_nodes]`` and edges (``[n_rows, n_nodes]``, the layout of ``graph.edges``) survive
    pruning; ``cumulative [n_nodes]``: each node's cumulative influence share, nodes sorted by influence."""

    node_mask: Tensor
    edge_mask: Tensor
    cumulative: Tensor
    influence: Tensor


def prune_graph(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> GraphPruning:
    """Keep the nodes carrying ``node_threshold`` of the logit influence and the edges carrying
    ``edge_threshold`` of it (tokens and logits always kept; features need an incoming and an
    outgoing edge, errors an outgoing one), as circuit-tracer prunes."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    rows = graph.row_nodes
    w = graph.logit_weights()
    infl = compute_influence(normalize_adjacency(graph.edges), rows, w)
    node_mask = infl >= _threshold(infl, node_threshold)
    node_mask[graph.token_start :] = True
    pruned = graph.edges.clone()
    pruned[~node_mask[rows]] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize_adjacency(pruned)
    edge_infl = compute_influence(norm, rows, w) + w
    edge_scores = norm * edge_infl[rows][:, None]
    edge_mask = (edge_scores >= _threshold(edge_scores, edge_threshold)) & (edge_scores > 0)
    nf, ts = graph.n_features, graph.token_start
    while True:
        old = node_mask.clone()
        edge_mask[~node_mask[rows]] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:ts] &= edge_mask[:, :ts].any(0)  # features and errors need an outgoing edge
        node_mask[:nf] &= edge_mask[:nf].any(1)  # features need an incoming edge
        if torch.equal(old, node_mask):
            break
    s, order = torch.sort(infl, descending=True)
    cum = torch.zeros_like(infl)
    cum[order] = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
    return GraphPruning(node_mask, edge_mask, cum, infl)


# ----------------------------------------------------------------------------------- construction
def _logit_targets(logits: Tensor, max_n_logits: int, desired_prob: float) -> tuple[Tensor, Tensor]:
    """The most likely next tokens until their probability sums to ``desired_prob`` (at most
    ``max_n_logits``): ``(token ids [n], probabilities [n])``."""
    probs = torch.softmax(logits.double(), dim=-1)
    p, idx = probs.sort(descending=True)
    n = int((torch.cumsum(p, 0) < desired_prob).sum()) + 1
    n = max(1, min(n, max_n_logits))
    return idx[:n].cpu(), p[:n].to(torch.float32).cpu()


class _Layout:
    """Column layout of the attribution rows while building: every active feature, then errors
    (layer-major), tokens and logits; plus each layer's active features grouped by position."""

    def __init__(self, clean: _Clean, n_logits: int):
        n_layers, n_pos = clean.errors.shape[:2]
        parts, vals = [], []
        for L, f in enumerate(clean.acts):
            if f is None:
                continue
            nz = f.nonzero().cpu()  # [n, 2] (pos, feature), sorted by pos
            if nz.numel():
                parts.append(torch.cat([torch.full((nz.shape[0], 1), L, dtype=torch.long), nz], 1))
                vals.append(f[nz[:, 0], nz[:, 1]].float().cpu())
        self.active = torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.long)
        self.values = torch.cat(vals) if vals else torch.zeros(0)
        self.n_active = int(self.active.shape[0])
        self.n_layers, self.n_pos, self.n_logits = int(n_layers), int(n_pos), n_logits
        self.error_start = self.n_active
        self.token_start = self.n_active + self.n_layers * self.n_pos
        self.logit_start = self.token_start + self.n_pos
        self.n_cols = self.logit_start + n_logits
        # per layer: column, feature and activation ``[pos, kmax]`` (padded), and the valid mask
        self.per_layer: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        for L in range(self.n_layers):
            idx = (self.active[:, 0] == L).nonzero().flatten()
            if not idx.numel():
                continue
            pos = self.active[idx, 1]
            counts = torch.bincount(pos, minlength=self.n_pos)
            kmax = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(idx.numel()) - starts[pos]
            col = torch.full((self.n_pos, kmax), -1, dtype=torch.long)
            feat = torch.zeros((self.n_pos, kmax), dtype=torch.long)
            act = torch.zeros((self.n_pos, kmax))
            col[pos, slot] = idx
            feat[pos, slot] = self.active[idx, 2]
            act[pos, slot] = self.values[idx]
            self.per_layer[L] = (col, feat, act, col >= 0)


Target = tuple[str, int, int, int]  # ("feature", layer, pos, feature) or ("logit", -1, -1, token)


def _rows(
    lin: _Linear,
    clean: _Clean,
    layout: _Layout,
    transcoders: Any,
    targets: Sequence[Target],
    unembed: Tensor,
    dest: Tensor,
) -> None:
    """Write the attribution rows of ``targets`` into ``dest [len(targets), n_cols]`` from one backward
    pass through the kept linearised forward, batched over the targets."""
    n_layers, n_pos = layout.n_layers, layout.n_pos
    dtype, d = clean.embed.dtype, clean.embed.shape[-1]
    k = len(targets)
    inject: dict[int, Tensor] = {}
    final_inj: Tensor | None = None
    for b, (kind, L, p, f) in enumerate(targets):  # one target per row: [k, 1, pos, d_model]
        if kind == "feature":
            if L not in inject:
                inject[L] = torch.zeros(k, 1, n_pos, d, dtype=dtype, device=clean.embed.device)
            inject[L][b, 0, p] = transcoders[L].W_enc[:, f].detach().to(dtype)
        else:
            if final_inj is None:
                final_inj = torch.zeros(k, 1, n_pos, d, dtype=dtype, device=clean.embed.device)
            final_inj[b, 0, -1] = unembed[f]
    outputs = [lin.mlp_in[L] for L in inject]
    grad_outputs = list(inject.values())
    if final_inj is not None:
        assert lin.final is not None
        outputs.append(lin.final)
        grad_outputs.append(final_inj)
    assert lin.embed is not None
    inputs = [lin.embed] + [lin.out[L] for L in range(n_layers)]
    grads = _batched_grad(outputs, inputs, grad_outputs)
    dest = dest[:k]
    dest.zero_()
    g_emb = grads[0]
    if g_emb is not None:
        dest[:, layout.token_start : layout.logit_start] = (g_emb[:, 0] * clean.embed).sum(-1).float().cpu()
    for L in range(n_layers):
        g = grads[1 + L]
        if g is None:
            continue
        g = g[:, 0]  # [k, pos, d_model]
        s = layout.error_start + L * n_pos
        dest[:, s : s + n_pos] = (g * clean.errors[L]).sum(-1).float().cpu()
        if L in layout.per_layer:
            col, feat, act, valid = layout.per_layer[L]
            W = transcoders[L].W_dec.detach().to(dtype)[feat.to(g.device)]  # [pos, kmax, d]
            vals = torch.bmm(g.transpose(0, 1), W.transpose(1, 2))  # [pos, k, kmax]
            vals = (vals * act.to(device=g.device, dtype=dtype)[:, None, :]).float().cpu()
            dest[:, col[valid]] = vals.permute(1, 0, 2)[:, valid]


def _batched_grad(
    outputs: list[Tensor], inputs: list[Tensor], grad_outputs: list[Tensor]
) -> list[Tensor | None]:
    """Vector-Jacobian products batched over the first axis of ``grad_outputs`` (``[k, *output.shape]``);
    a row-by-row loop where an operation has no batching rule."""
    try:
        return list(
            torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        )
    except RuntimeError:
        k = grad_outputs[0].shape[0]
        per_row = [
            torch.autograd.grad(
                outputs, inputs, [g[b] for g in grad_outputs], retain_graph=True, allow_unused=True
            )
            for b in range(k)
        ]
        return [
            None if per_row[0][i] is None else torch.stack([r[i] for r in per_row])  # type: ignore[misc]
            for i in range(len(inputs))
        ]


def _partial_influence(rows: Tensor, row_nodes: Tensor, weights: Tensor, chunk: int = 1 << 16) -> Tensor:
    """Influence ``[n_cols]`` of every column on the logits through the rows known so far, without a
    normalised copy of ``rows [r, n_cols]`` (``row_nodes [r]``: each row's column; ``weights [n_cols]``)."""
    n_cols = rows.shape[1]
    denom = torch.zeros(rows.shape[0])
    for c in range(0, n_cols, chunk):
        denom += rows[:, c : c + chunk].abs().sum(1)
    denom = denom.clamp(min=1e-10)
    cur, total = weights, torch.zeros(n_cols)
    for _ in range(10_000):
        v = cur[row_nodes] / denom
        cur = torch.cat([v @ rows[:, c : c + chunk].abs() for c in range(0, n_cols, chunk)])
        if not bool(cur.any()):
            return total
        total += cur
    raise ShapeError("influence did not converge")  # pragma: no cover


def build_graph(
    hm: Any,
    transcoders: Any,
    prompt: str | Tensor,
    *,
    max_feature_nodes: int | None = 512,
    batch_size: int = 16,
    update_interval: int = 4,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    chunked: bool = True,
    progress: bool = False,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` (a string, tokenised with special tokens, or ids ``[pos]``
    / ``[1, pos]``) for ``hm`` (a HookedModel) and a TranscoderSet.

    ``max_feature_nodes``: how many features get rows, chosen by influence (``None``: every active
    feature); ``batch_size``: targets per batched backward pass, the memory bound (each holds
    ``batch_size`` gradients of every layer's residual stream); influence is re-estimated every
    ``update_interval`` passes.
    ``chunked=False`` is the reference implementation: every row in one batch (features chosen by
    their influence through the logit rows alone when ``max_feature_nodes`` cuts), memory growing
    with the number of rows.
    """
    if batch_size < 1 or update_interval < 1:
        raise ConfigError(f"batch_size and update_interval must be >= 1, got {batch_size}, {update_interval}")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ConfigError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}")
    if not 0 < desired_logit_prob <= 1 or max_n_logits < 1:
        raise ConfigError("desired_logit_prob must be in (0, 1] and max_n_logits >= 1")
    for L in transcoders.layers:
        if not 0 <= L < hm.cfg.n_layers:
            raise ConfigError(f"transcoder for layer {L}, but {hm.name} has {hm.cfg.n_layers} layers")
        tc = transcoders[L]
        if tc.cfg.d_in != hm.cfg.d_model or tc.cfg.d_out != hm.cfg.d_model:
            raise ShapeError(
                f"transcoder of layer {L} maps {tc.cfg.d_in} -> {tc.cfg.d_out}, but {hm.name} has d_model "
                f"{hm.cfg.d_model}"
            )
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError("the prompt is empty")
        ids = hm.tokenize(prompt)["input_ids"][:1]
        text = prompt
    else:
        ids = torch.as_tensor(prompt).long().reshape(1, -1).to(hm.device)
        text = hm.tokenizer.decode(ids[0]) if hm.tokenizer is not None else ""
    if ids.shape[1] < 1:
        raise DataError("the prompt has no tokens")
    transcoders.to(hm.device)
    clean = _clean_pass(hm, transcoders, ids)
    logit_tokens, logit_probs = _logit_targets(clean.logits, max_n_logits, desired_logit_prob)
    n_logits = int(logit_tokens.numel())
    layout = _Layout(clean, n_logits)
    W_U = _unembed(hm).to(clean.embed.dtype)
    unembed = W_U[logit_tokens.to(W_U.device)] - W_U.mean(0)  # demeaned logit directions [n_logits, d]

    cap = layout.n_active if max_feature_nodes is None else min(max_feature_nodes, layout.n_active)
    per_pass = batch_size if chunked else n_logits + cap
    buf = torch.zeros(n_logits + cap, layout.n_cols)  # rows: logits, then features in chosen order
    row_nodes = torch.zeros(n_logits + cap, dtype=torch.long)
    row_nodes[:n_logits] = torch.arange(n_logits) + layout.logit_start
    weights = torch.zeros(layout.n_cols)
    weights[layout.logit_start :] = logit_probs
    chosen: list[int] = []
    with linearised(hm, transcoders, ids) as lin:
        logit_targets: list[Target] = [("logit", -1, -1, j) for j in range(n_logits)]
        if chunked or cap == 0:
            for i in range(0, n_logits, per_pass):
                _rows(
                    lin,
                    clean,
                    layout,
                    transcoders,
                    logit_targets[i : i + per_pass],
                    unembed,
                    buf[i : i + per_pass],
                )
        else:  # one pass: logits and every feature row; features chosen through the logit rows
            if cap < layout.n_active:
                _rows(lin, clean, layout, transcoders, logit_targets, unembed, buf[:n_logits])
                infl = _partial_influence(buf[:n_logits], row_nodes[:n_logits], weights)[: layout.n_active]
                pick = torch.argsort(infl, descending=True, stable=True)[:cap]
            else:
                pick = torch.arange(layout.n_active)
            feats: list[Target] = [("feature", *(int(v) for v in layout.active[j])) for j in pick]  # type: ignore[misc]
            _rows(lin, clean, layout, transcoders, logit_targets + feats, unembed, buf)
            chosen = pick.tolist()
        visited = torch.zeros(layout.n_active, dtype=torch.bool)
        bar = _progress(cap, progress and chunked)
        while chunked and len(chosen) < cap:
            r = n_logits + len(chosen)
            infl = _partial_influence(buf[:r], row_nodes[:r], weights)[: layout.n_active]
            infl[visited] = -1.0
            want = min(per_pass * update_interval, cap - len(chosen))
            pick = torch.argsort(infl, descending=True, stable=True)[:want]
            for s in range(0, pick.numel(), per_pass):
                sub = pick[s : s + per_pass]
                targets: list[Target] = [("feature", *(int(v) for v in layout.active[j])) for j in sub]  # type: ignore[misc]
                r0 = n_logits + len(chosen)
                _rows(lin, clean, layout, transcoders, targets, unembed, buf[r0 : r0 + sub.numel()])
                row_nodes[r0 : r0 + sub.numel()] = sub
                visited[sub] = True
                chosen += sub.tolist()
                bar(len(chosen))
    sel = torch.tensor(chosen, dtype=torch.long)
    src_cols = torch.cat([sel, torch.arange(layout.error_start, layout.n_cols)])
    edges = torch.cat([buf[n_logits:], buf[:n_logits]])[:, src_cols]  # features first, then logits
    tok = hm.tokenizer
    tokens = [tok.decode([int(t)]) for t in ids[0]] if tok is not None else [str(int(t)) for t in ids[0]]
    logit_strs = [tok.decode([int(t)]) for t in logit_tokens] if tok is not None else []
    return AttributionGraph(
        prompt=text,
        input_ids=ids[0].cpu(),
        tokens=tokens,
        model=hm.name,
        n_layers=hm.cfg.n_layers,
        active_features=layout.active,
        activations=layout.values,
        selected=sel,
        edges=edges,
        logit_tokens=logit_tokens,
        logit_probs=logit_probs,
        logit_strs=logit_strs,
        info={
            "n_active_features": layout.n_active,
            "max_feature_nodes": max_feature_nodes,
            "batch_size": per_pass,
            "chunked": chunked,
            "transcoder_layers": list(transcoders.layers),
        },
    )


def _unembed(hm: Any) -> Tensor:
    """The unembedding ``[vocab, d_model]`` (the LM head's weight)."""
    return hm.model.get_output_embeddings().weight.detach()


def _progress(total: int, show: bool) -> Any:
    if not show or total == 0:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="feature rows", leave=False)

    def update(n: int) -> None:
        bar.update(n - bar.n)
        if n >= total:
            bar.close()

    return update
