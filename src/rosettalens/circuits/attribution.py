"""Attribution patching on the Hugging Face model: EAP and EAP-IG, at node and edge level.

What is estimated (one convention throughout ``rosettalens.circuits``): the *effect of corrupting* a
component in the clean run, ``m(clean with a <- a_corrupt) - m(clean)``, averaged over prompts, where
``m`` is the metric (``metric(logits [batch, pos, vocab]) -> [batch]``). Important components for a
metric that the clean prompt makes large get large *negative* scores.

* **EAP** (attribution patching; Nanda 2023, Syed et al. 2023): the first-order Taylor estimate
  ``(a_corrupt - a_clean) . dm/da`` with the gradient at the clean run: one forward and one backward
  per batch for every component at once.
* **EAP-IG** (Hanna, Pezzelle, Belinkov 2024, "inputs" variant as in their code and MIB): the gradient
  is averaged over ``steps`` forward/backward passes whose *input embeddings* are interpolated,
  ``e_corrupt + k/steps (e_clean - e_corrupt)`` for ``k = 1..steps`` (a right Riemann sum that ends at
  the clean run; ``steps=1`` is EAP). Where every component's activation is linear in the input
  embeddings and the metric is a sum of per-component terms, the sum converges to exact patching
  (integrated-gradients completeness); elsewhere it is a better-behaved estimate than EAP.

Nodes: attention heads (``head_z.L``, per head, summed over positions and ``d_head``), MLPs
(``mlp_out.L``) and optionally the residual stream by position (``resid_pre.L``, ``[n_layers, pos]``).

Edges: a sender writes into the residual stream; a receiver reads it. Senders: the token embedding
(``embed``), every head (``"L.H"``) and every MLP (``"mlp.L"``). Receivers: the query, key and value
input of every head (``"L.H.q"``; keys and values per key-value head under GQA: ``"L.G.k"``,
``"L.G.v"`` where G is the key-value head, shared by query heads ``G*group .. (G+1)*group-1``), every
MLP's input (``"mlp.L"``) and the logits (``"logits"``, the final residual). The score of an edge is

    (delta of the sender's residual write) . (gradient of m w.r.t. the receiver's residual input)

where the receiver's input gradient is the gradient of ``m`` flowing back *only through that
receiver* (for ``L.H.q``: through the layer's input norm and head H's slice of ``q_proj``; for an MLP:
through its pre-norm and the MLP; for the logits: the final norm and unembedding), obtained with
autograd on the HF modules (one vector-Jacobian product per receiver). The sender's write delta is
exact for the embedding and MLPs (``mlp_out`` corrupt - clean) and, for a head, the head's share of
the attention block's output change, ``J (z_corrupt - z_clean)`` restricted to that head, with ``J``
the Jacobian of ``attn_out.L`` w.r.t. ``head_z.L`` at the clean run. For Llama/Qwen/Mistral/GPT-2/Pythia
``J`` is the output projection (linear), so this is the head's exact contribution; for **Gemma 2/3**
``attn_out`` is ``post_attention_layernorm(o_proj(z))``: the norm of the *sum* makes per-head
contributions non-additive, and the linearisation at the clean run is what an edge score can use
(it is exact to first order, like the rest of EAP). At first order the edge scores of a sender sum
over its receivers to its node score (tested); edges are summed over positions.
Edge EAP-IG averages the receivers' gradients over the same interpolation steps.

Memory: prompts are processed in chunks of ``batch_size`` rows; model parameters are frozen during the
call (no weight gradients are kept); ``dtype=torch.bfloat16`` runs the forward/backward under
autocast (activations in bfloat16, scores accumulated in float64) -- faster on CPU, but over float32
weights it keeps bfloat16 weight copies for the backward (+2 bytes per parameter); a model loaded in
bfloat16 (``rosettalens.load(name, dtype=torch.bfloat16)``) halves memory instead.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..hooks import HookedModel
from ..names import hook_layer, hook_name, parse_hook_name

Metric = Callable[..., Tensor]  # (logits [batch, pos, vocab]) or (logits, rows [batch]) -> [batch]
METHODS = ("eap", "eap-ig")


# ---------------------------------------------------------------------------------------- results
@dataclass
class NodeAttribution:
    """Estimated effect of corrupting each node (mean over prompts).

    heads ``[n_layers, n_heads]``, mlps ``[n_layers]``, resid ``[n_layers, pos]`` (``resid_pre.L`` by
    position, when asked for) -- all float64 on the CPU.
    """

    heads: Tensor
    mlps: Tensor
    resid: Tensor | None
    method: str
    steps: int
    n_prompts: int
    clean_metric: float
    corrupted_metric: float
    seconds: float = 0.0

    def scores(self) -> dict[str, float]:
        """``{"L.H": score, ..., "mlp.L": score, ...}`` for every head and MLP."""
        out = {
            f"{layer}.{h}": float(self.heads[layer, h])
            for layer in range(self.heads.shape[0])
            for h in range(self.heads.shape[1])
        }
        out.update({f"mlp.{layer}": float(self.mlps[layer]) for layer in range(self.mlps.shape[0])})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "n_prompts": self.n_prompts,
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "heads": self.heads.tolist(),
            "mlps": self.mlps.tolist(),
            "resid": None if self.resid is None else self.resid.tolist(),
            "seconds": self.seconds,
        }


@dataclass
class EdgeAttribution:
    """Estimated effect of corrupting each edge (sender -> receiver), mean over prompts.

    scores ``[n_senders, n_receivers]`` float64, NaN where there is no edge (a receiver before its
    sender); ``senders``/``receivers`` name the rows/columns (module docstring).
    """

    scores: Tensor
    senders: list[str]
    receivers: list[str]
    method: str
    steps: int
    n_prompts: int
    clean_metric: float
    corrupted_metric: float
    seconds: float = 0.0
    node_scores: dict[str, float] = field(default_factory=dict)

    def edges(self) -> dict[str, float]:
        """``{"sender->receiver": score}`` for every edge of the graph."""
        out = {}
        for i, s in enumerate(self.senders):
            for j, r in enumerate(self.receivers):
                v = float(self.scores[i, j])
                if v == v:  # not NaN
                    out[f"{s}->{r}"] = v
        return out

    @property
    def n_edges(self) -> int:
        return int((~torch.isnan(self.scores)).sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "n_prompts": self.n_prompts,
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "senders": self.senders,
            "receivers": self.receivers,
            "n_edges": self.n_edges,
            "edges": self.edges(),
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------------------------------- plumbing
def _check_inputs(
    hm: HookedModel, clean: Tensor, corrupted: Tensor, mask: Tensor | None, method: str, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    if method not in METHODS:
        raise ConfigError(f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    clean, corrupted = torch.as_tensor(clean), torch.as_tensor(corrupted)
    if clean.dim() != 2 or clean.shape != corrupted.shape or clean.numel() == 0:
        raise ShapeError(
            f"clean and corrupted token ids must be [batch, pos] of one shape, got {tuple(clean.shape)} "
            f"and {tuple(corrupted.shape)} (pad or filter prompts to one token length)"
        )
    m = torch.ones_like(clean) if mask is None else torch.as_tensor(mask)
    if m.shape != clean.shape:
        raise ShapeError(f"attention_mask {tuple(m.shape)} does not match the ids {tuple(clean.shape)}")
    return clean, corrupted, m


@contextlib.contextmanager
def _frozen(hm: HookedModel) -> Iterator[None]:
    """Parameters stop requiring grad for the call (no weight gradients, fewer saved tensors)."""
    params = [p for p in hm.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _autocast(hm: HookedModel, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == hm.dtype:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype must be None, bfloat16 or float16, got {dtype}")
    # autocast over float32 weights saves a bfloat16 copy of every weight for the backward pass
    # (+2 bytes per parameter: +3.2 GB measured on Qwen2.5-1.5B); without the cast cache the copies
    # are at least freed after each backward. For less memory, load the model in bfloat16 instead.
    return torch.autocast(device_type=hm.device.type, dtype=dtype, cache_enabled=False)


def _takes_rows(metric: Metric) -> bool:
    try:
        params = [
            p
            for p in inspect.signature(metric).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def metric_values(metric: Metric, logits: Tensor, rows: Tensor) -> Tensor:
    """Call ``metric`` on a chunk: ``metric(logits)`` or, if it takes two arguments,
    ``metric(logits, rows)`` with ``rows`` ``[batch]`` the chunk's indices into the whole prompt set
    (for metrics that read per-prompt data such as answer tokens). Returns float32 ``[batch]``."""
    batch = logits.shape[0]
    vals = metric(logits, rows) if _takes_rows(metric) else metric(logits)
    if not isinstance(vals, Tensor) or vals.shape != (batch,):
        shape = tuple(vals.shape) if isinstance(vals, Tensor) else type(vals).__name__
        raise ShapeError(
            f"metric must map logits [batch, pos, vocab] of a chunk of {batch} prompts to [{batch}], got "
            f"{shape}; a metric that reads per-prompt data takes (logits, rows) with rows the chunk's "
            "indices into the prompt set"
        )
    return vals.float()


def logit_diff_metric(good: Tensor, bad: Tensor, position: int = -1) -> Callable[[Tensor, Tensor], Tensor]:
    """``logit[good] - logit[bad]`` at ``position`` per prompt; good/bad: token ids ``[n_prompts]``."""
    good, bad = torch.as_tensor(good).long(), torch.as_tensor(bad).long()

    def metric(logits: Tensor, rows: Tensor) -> Tensor:
        last = logits[:, position, :]
        r = rows.to(good.device)
        g, b = good[r].to(logits.device), bad[r].to(logits.device)
        return last.gather(-1, g[:, None])[:, 0] - last.gather(-1, b[:, None])[:, 0]

    return metric


def _model_kwargs(ids: Tensor, mask: Tensor) -> dict[str, Any]:
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if (mask == 0).any():
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return kw


def _grad_forward(
    hm: HookedModel,
    ids: Tensor,
    mask: Tensor,
    rows: Tensor,
    metric: Metric,
    names: list[str],
    embed: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward with grad; returns (metric values [batch], {hook: activation in the graph}).

    ``embed`` replaces the token embeddings (a leaf that requires grad); otherwise the model's own
    embeddings are detached into such a leaf, so the graph exists with frozen parameters.
    """
    acts: dict[str, Tensor] = {}

    def capture(act: Tensor, name: str) -> Tensor:
        out = act.view_as(act)  # a new tensor object in the graph: the model continues from it
        acts[name] = out
        return out

    def embed_fn(act: Tensor, name: str) -> Tensor:
        leaf = (act if embed is None else embed.to(act.dtype)).detach().requires_grad_(True)
        acts["embed"] = leaf
        return leaf

    hooks = [("embed", embed_fn)] + [(n, capture) for n in names if n != "embed"]
    with torch.enable_grad(), hm.hooks(hooks):
        logits = hm.model(**_model_kwargs(ids, mask)).logits
        vals = metric_values(metric, logits, rows)
    return vals, acts


def _grads(total: Tensor, acts: list[Tensor], retain: bool) -> list[Tensor]:
    gs = torch.autograd.grad(total, acts, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(a) if g is None else g for a, g in zip(acts, gs)]


def _chunks(n: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {size}")
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


# ---------------------------------------------------------------------------------------- nodes
def attribute_nodes(
    hm: HookedModel,
    clean_ids: Tensor,
    corrupted_ids: Tensor,
    metric: Metric,
    *,
    method: str = "eap",
    steps: int = 5,
    attention_mask: Tensor | None = None,
    resid: bool = False,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> NodeAttribution:
    """EAP / EAP-IG scores of every head and MLP (and ``resid_pre.L`` by position if ``resid``).

    clean_ids, corrupted_ids: token ids ``[batch, pos]`` of one shape (position ``p`` of a corrupted
    row is patched into position ``p`` of its clean row); attention_mask ``[batch, pos]`` applies to
    both. metric: ``logits [batch, pos, vocab] -> [batch]``. ``steps`` is used by ``eap-ig`` only.
    """
    clean_ids, corrupted_ids, mask = _check_inputs(
        hm, clean_ids, corrupted_ids, attention_mask, method, steps
    )
    t0 = time.perf_counter()
    n_layers, n_heads = hm.cfg.n_layers, hm.cfg.n_heads
    names = [hook_name("head_z", i) for i in range(n_layers)] + [
        hook_name("mlp_out", i) for i in range(n_layers)
    ]
    if resid:
        names += [hook_name("resid_pre", i) for i in range(n_layers)]
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    mlps = torch.zeros(n_layers, dtype=torch.float64)
    res = torch.zeros(n_layers, clean_ids.shape[1], dtype=torch.float64) if resid else None
    ig = method == "eap-ig"
    n_steps = steps if ig else 1
    clean_sum = corr_sum = 0.0
    dev = hm.device
    with _frozen(hm), _autocast(hm, dtype):
        for sl in _chunks(clean_ids.shape[0], batch_size):
            ids_c, ids_x, m = clean_ids[sl].to(dev), corrupted_ids[sl].to(dev), mask[sl].to(dev)
            rows = torch.arange(sl.start, sl.stop)
            logits_x, cache_x = hm.run_with_cache(ids_x, hooks=names + ["embed"], attention_mask=m)
            assert logits_x is not None
            corr_sum += float(metric_values(metric, logits_x, rows).sum())
            e_x = cache_x["embed"]
            grad_sum: dict[str, Tensor] = {}
            clean_acts: dict[str, Tensor] = {}
            e_c: Tensor | None = None
            for k in range(n_steps, 0, -1):  # k = steps first: the clean run itself
                if k == n_steps:
                    vals, acts = _grad_forward(hm, ids_c, m, rows, metric, names, None)
                    e_c = acts["embed"].detach()
                    clean_sum += float(vals.detach().sum())
                    clean_acts = {n: acts[n].detach() for n in names}
                else:
                    assert e_c is not None
                    alpha = k / n_steps
                    vals, acts = _grad_forward(hm, ids_c, m, rows, metric, names, e_x + alpha * (e_c - e_x))
                gs = _grads(vals.sum(), [acts[n] for n in names], retain=False)
                for name, g in zip(names, gs):
                    g = g.detach().double()
                    grad_sum[name] = g if name not in grad_sum else grad_sum[name] + g
                del acts, vals, gs
            for name in names:
                d = (cache_x[name].double() - clean_acts[name].double()) * grad_sum[name] / n_steps
                kind, layer = parse_hook_name(name)[0], hook_layer(name)
                if kind == "head_z":
                    heads[layer] += d.sum((0, 1, 3)).cpu()
                elif kind == "mlp_out":
                    mlps[layer] += d.sum().cpu()
                else:
                    assert res is not None
                    res[layer] += d.sum((0, 2)).cpu()
    n = clean_ids.shape[0]
    return NodeAttribution(
        heads=heads / n,
        mlps=mlps / n,
        resid=None if res is None else res / n,
        method=method,
        steps=n_steps,
        n_prompts=n,
        clean_metric=clean_sum / n,
        corrupted_metric=corr_sum / n,
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------- edges
def edge_graph(hm: HookedModel) -> tuple[list[str], list[str], Tensor]:
    """Sender names, receiver names and the edge mask ``[n_senders, n_receivers]`` (bool) of ``hm``.

    A head or MLP at layer ``l`` sends to every attention receiver at layers ``> l``, to MLPs at layers
    ``>= l`` (heads, unless the model has a parallel residual, where attention and MLP of a layer read
    the same input) or ``> l`` (MLPs), and to the logits; the embedding sends to every receiver.
    """
    c = hm.cfg
    parallel = parallel_residual(hm)
    senders: list[str] = ["embed"]
    s_layer: list[tuple[int, int]] = [(-1, 2)]  # (layer, order within the layer: 0 heads, 1 mlp)
    for layer in range(c.n_layers):
        for h in range(c.n_heads):
            senders.append(f"{layer}.{h}")
            s_layer.append((layer, 0))
        senders.append(f"mlp.{layer}")
        s_layer.append((layer, 1))
    receivers: list[str] = []
    r_layer: list[tuple[int, int]] = []
    for layer in range(c.n_layers):
        receivers += [f"{layer}.{h}.q" for h in range(c.n_heads)]
        receivers += [f"{layer}.{g}.k" for g in range(c.n_kv_heads)]
        receivers += [f"{layer}.{g}.v" for g in range(c.n_kv_heads)]
        r_layer += [(layer, 0)] * (c.n_heads + 2 * c.n_kv_heads)
        receivers.append(f"mlp.{layer}")
        r_layer.append((layer, 0 if parallel else 1))
    receivers.append("logits")
    r_layer.append((c.n_layers, 0))
    mask = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
    for i, (sl, so) in enumerate(s_layer):
        for j, (rl, ro) in enumerate(r_layer):
            if sl < 0:
                mask[i, j] = True
            elif so == 0:  # head: attention inputs of later layers, the MLP of its layer unless parallel
                mask[i, j] = rl > sl or (rl == sl and ro == 1)
            else:  # MLP: later layers
                mask[i, j] = rl > sl
    return senders, receivers, mask


def attribute_edges(
    hm: HookedModel,
    clean_ids: Tensor,
    corrupted_ids: Tensor,
    metric: Metric,
    *,
    method: str = "eap",
    steps: int = 5,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> EdgeAttribution:
    """EAP / EAP-IG scores of every edge of ``edge_graph(hm)`` (see the module docstring).

    Inputs as :func:`attribute_nodes`. Returns scores ``[n_senders, n_receivers]`` (NaN off-graph)
    and, in ``node_scores``, the nodes' own first-order scores for the same passes.
    """
    clean_ids, corrupted_ids, mask = _check_inputs(
        hm, clean_ids, corrupted_ids, attention_mask, method, steps
    )
    t0 = time.perf_counter()
    c = hm.cfg
    L = c.n_layers
    senders, receivers, emask = edge_graph(hm)
    parallel = parallel_residual(hm)
    names = ["embed"]
    for layer in range(L):
        names += [
            hook_name("resid_pre", layer),
            hook_name("q", layer),
            hook_name("k", layer),
            hook_name("v", layer),
        ]
        names += [hook_name("head_z", layer), hook_name("attn_out", layer), hook_name("mlp_out", layer)]
    names.append(hook_name("resid_post", L - 1))
    scores = torch.zeros(len(senders), len(receivers), dtype=torch.float64)
    node = torch.zeros(len(senders), dtype=torch.float64)
    ig = method == "eap-ig"
    n_steps = steps if ig else 1
    clean_sum = corr_sum = 0.0
    dev = hm.device
    with _frozen(hm), _autocast(hm, dtype):
        for sl in _chunks(clean_ids.shape[0], batch_size):
            ids_c, ids_x, m = clean_ids[sl].to(dev), corrupted_ids[sl].to(dev), mask[sl].to(dev)
            rows = torch.arange(sl.start, sl.stop)
            cache_names = (
                ["embed"]
                + [hook_name("head_z", i) for i in range(L)]
                + [hook_name("mlp_out", i) for i in range(L)]
            )
            logits_x, cache_x = hm.run_with_cache(ids_x, hooks=cache_names, attention_mask=m)
            assert logits_x is not None
            corr_sum += float(metric_values(metric, logits_x, rows).sum())
            deltas: Tensor | None = None  # [n_senders, batch*pos*d_model] sender write deltas
            e_c: Tensor | None = None
            for k in range(n_steps, 0, -1):
                if k == n_steps:
                    vals, acts = _grad_forward(hm, ids_c, m, rows, metric, names, None)
                    e_c = acts["embed"].detach()
                    clean_sum += float(vals.detach().sum())
                else:
                    assert e_c is not None
                    alpha = k / n_steps
                    e_x = cache_x["embed"]
                    vals, acts = _grad_forward(hm, ids_c, m, rows, metric, names, e_x + alpha * (e_c - e_x))
                want = (
                    [hook_name("q", i) for i in range(L)]
                    + [hook_name("k", i) for i in range(L)]
                    + [hook_name("v", i) for i in range(L)]
                    + [hook_name("mlp_out", i) for i in range(L)]
                    + [hook_name("resid_post", L - 1), "embed"]
                    + [hook_name("head_z", i) for i in range(L)]
                )
                gl = _grads(vals.sum(), [acts[n] for n in want], retain=True)
                g = dict(zip(want, gl))
                if deltas is None:
                    deltas = _sender_deltas(hm, acts, cache_x, parallel)
                    # the nodes' own first-order scores at the clean run (embed, heads, MLPs)
                node += _node_scores_from(hm, acts, cache_x, g).cpu() / n_steps
                j = 0
                for block in _receiver_grads(hm, acts, g, parallel):  # one layer's receivers at a time
                    G = torch.stack(block)  # [receivers of the layer, batch*pos*d_model]
                    scores[:, j : j + G.shape[0]] += (deltas @ G.T).double().cpu() / n_steps
                    j += G.shape[0]
                    del G, block
                del acts, vals, gl, g
    n = clean_ids.shape[0]
    scores = scores / n
    scores[~emask] = float("nan")
    node_scores = {s: float(v) for s, v in zip(senders, node / n)}
    return EdgeAttribution(
        scores=scores,
        senders=senders,
        receivers=receivers,
        method=method,
        steps=n_steps,
        n_prompts=n,
        clean_metric=clean_sum / n,
        corrupted_metric=corr_sum / n,
        seconds=time.perf_counter() - t0,
        node_scores=node_scores,
    )


def parallel_residual(hm: HookedModel) -> bool:
    """Attention and MLP of a layer read the same residual (GPT-NeoX/Pythia): no resid_mid."""
    return hm.adapter.parallel_residual or hook_name("resid_mid", 0) not in hm.cfg.hook_points


def _sender_deltas(
    hm: HookedModel, acts: dict[str, Tensor], cache_x: dict[str, Tensor], parallel: bool
) -> Tensor:
    """``[n_senders, batch*pos*d_model]`` float32: each sender's residual-write delta (corrupt - clean)."""
    c = hm.cfg
    rows: list[Tensor] = [(cache_x["embed"].float() - acts["embed"].detach().float()).flatten()]
    for layer in range(c.n_layers):
        z = acts[hook_name("head_z", layer)]
        out = acts[hook_name("attn_out", layer)]
        dz = (cache_x[hook_name("head_z", layer)] - z.detach()).to(z.dtype)
        # J (mask_h dz) by the double-backward trick: u(v) = J^T v is linear in v, d<u, w>/dv = J w
        v = torch.zeros_like(out, requires_grad=True)
        (u,) = torch.autograd.grad(out, z, grad_outputs=v, create_graph=True)
        for h in range(c.n_heads):
            w = torch.zeros_like(dz)
            w[:, :, h] = dz[:, :, h]
            (jd,) = torch.autograd.grad(u, v, grad_outputs=w, retain_graph=True)
            rows.append(jd.detach().float().flatten())
        del u, v
        mo = acts[hook_name("mlp_out", layer)]
        rows.append((cache_x[hook_name("mlp_out", layer)].float() - mo.detach().float()).flatten())
    return torch.stack(rows)


def _node_scores_from(
    hm: HookedModel, acts: dict[str, Tensor], cache_x: dict[str, Tensor], g: dict[str, Tensor]
) -> Tensor:
    """``[n_senders]``: first-order node scores (delta . gradient) of the embedding, heads and MLPs."""
    c = hm.cfg
    out: list[Tensor] = [
        ((cache_x["embed"].double() - acts["embed"].detach().double()) * g["embed"].double()).sum()
    ]
    for layer in range(c.n_layers):
        hz, mo_name = hook_name("head_z", layer), hook_name("mlp_out", layer)
        z = acts[hz].detach().double()
        out += list(((cache_x[hz].double() - z) * g[hz].double()).sum((0, 1, 3)))
        mo = acts[mo_name].detach().double()
        out.append(((cache_x[mo_name].double() - mo) * g[mo_name].double()).sum())
    return torch.stack(out)


def _receiver_grads(
    hm: HookedModel, acts: dict[str, Tensor], g: dict[str, Tensor], parallel: bool
) -> Iterator[list[Tensor]]:
    """Per layer, per receiver (order of ``edge_graph``): dm/d(its residual input) through that
    receiver only, flattened ``[batch*pos*d_model]`` float32; the logits receiver comes last."""
    c = hm.cfg
    for layer in range(c.n_layers):
        cols: list[Tensor] = []
        x = acts[hook_name("resid_pre", layer)]
        for kind, nh in (("q", c.n_heads), ("k", c.n_kv_heads), ("v", c.n_kv_heads)):
            a, ga = acts[hook_name(kind, layer)], g[hook_name(kind, layer)]
            for h in range(nh):
                w = torch.zeros_like(ga)
                w[:, :, h] = ga[:, :, h]
                (gx,) = torch.autograd.grad(a, x, grad_outputs=w, retain_graph=True, allow_unused=True)
                cols.append(_flat(gx, x))
        # the MLP reads resid_mid (= resid_pre + attn_out), or resid_pre with a parallel residual
        src = acts[hook_name("resid_pre", layer)] if parallel else acts[hook_name("attn_out", layer)]
        (gm,) = torch.autograd.grad(
            acts[hook_name("mlp_out", layer)],
            src,
            grad_outputs=g[hook_name("mlp_out", layer)],
            retain_graph=True,
            allow_unused=True,
        )
        cols.append(_flat(gm, src))
        yield cols
    yield [g[hook_name("resid_post", c.n_layers - 1)].float().flatten()]


def _flat(grad: Tensor | None, like: Tensor) -> Tensor:
    if grad is None:  # the receiver does not depend on this input (cannot happen in a causal LM)
        return torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
    return grad.float().flatten()
