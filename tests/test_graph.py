"""Attribution graphs: edges against an explicitly perturbed replacement model, scores on hand graphs."""

from __future__ import annotations

import pytest
import torch

from rosettalens.circuits.graph import (
    AttributionGraph,
    build_graph,
    frozen_norm_linear,
    graph_scores,
    norm_kind,
    prune_graph,
)
from rosettalens.circuits.graph_checks import intervention_agreement, replacement_model
from rosettalens.errors import ConfigError, DataError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import FAMILIES, tiny_model
from rosettalens.names import hook_name
from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet

PROMPT = "One two three four five"


def _setup(family: str, dtype: torch.dtype = torch.float64, width: int = 24, k: int = 3):
    model, tok = tiny_model(family)
    model = model.to(dtype)
    hm = HookedModel.from_hf(model, tok, name=family)
    d = hm.cfg.d_model
    tcs = {}
    for L in range(hm.cfg.n_layers):
        cfg = TranscoderConfig(layer=L, d_in=d, d_out=d, width=width, k=k, skip=L == 1, seed=10 + L)
        tc = Transcoder(cfg)
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.1)
            tc.b_dec.normal_(0, 0.1)
            if tc.W_skip is not None:
                tc.W_skip.normal_(0, 0.05)
        tcs[L] = tc.to(dtype)
    return hm, TranscoderSet(family, tcs)


def _norm_inputs(hm: HookedModel, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The clean input of every norm module (by id)."""
    seen: dict[int, torch.Tensor] = {}
    handles = []

    def rec(mod, args, out):
        seen[id(mod)] = args[0].detach().clone()

    for m in hm.model.modules():
        if norm_kind(m) is not None:
            handles.append(m.register_forward_hook(rec))
    try:
        with torch.no_grad():
            hm.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


class FrozenReference:
    """The replacement model built explicitly, forward only: queries and keys patched to their clean
    values (frozen attention patterns), each norm ``y0 + linear(x - x0)`` with the clean scale, each
    MLP output its clean value plus a source perturbation plus the skip term of the input change."""

    def __init__(self, hm: HookedModel, tset: TranscoderSet, ids: torch.Tensor):
        self.hm, self.tset, self.ids = hm, tset, ids
        n = hm.cfg.n_layers
        hooks = ["embed"]
        for L in range(n):
            hooks += [hook_name(k, L) for k in ("q", "k", "mlp_in", "mlp_out")]
        _, self.cache = hm.run_with_cache(ids, hooks=hooks)
        self.x0 = _norm_inputs(hm, ids)
        self.skip_mod = set()
        if hm.adapter.post_block_norms:
            for block in hm.layers:
                self.skip_mod.add(id(block.post_feedforward_layernorm))
        self.clean_norm_outputs()

    @torch.no_grad()
    def run(self, d_embed: torch.Tensor, d_out: torch.Tensor, logit_dirs: torch.Tensor):
        """Feature pre-activations ``{L: [pos, width]}`` and demeaned logits ``[n_logits]`` with the
        contributions ``d_embed [pos, d]`` / ``d_out [n_layers, pos, d]`` added."""
        hm, c = self.hm, self.cache
        pre: dict[int, torch.Tensor] = {}
        final: list[torch.Tensor] = []
        final_norm = hm.model
        for part in hm.adapter.final_norm.split("."):
            final_norm = getattr(final_norm, part)

        def norm_hook(mod, args, out):
            if id(mod) in self.skip_mod:
                return None
            x0 = self.x0[id(mod)]
            y = self._y0[id(mod)] + frozen_norm_linear(mod, x0, args[0] - x0)
            if mod is final_norm:
                final.append(y)
            return y

        fwd = [("embed", lambda a, n: c["embed"] + d_embed, "plain")]
        for L in range(hm.cfg.n_layers):
            fwd.append((hook_name("q", L), lambda a, n: c[n].clone(), "plain"))
            fwd.append((hook_name("k", L), lambda a, n: c[n].clone(), "plain"))

            def grab(a, n, L=L):
                pre[L] = self.tset[L].pre_acts(a)[0]
                self._x[L] = a

            def put(a, n, L=L):
                y = c[n] + d_out[L]
                s = self.tset[L].skip_out(self._x[L] - c[hook_name("mlp_in", L)])
                return y if s is None else y + s

            fwd.append((hook_name("mlp_in", L), grab, "plain"))
            fwd.append((hook_name("mlp_out", L), put, "plain"))
        self._x: dict[int, torch.Tensor] = {}
        handles = [m.register_forward_hook(norm_hook) for m in hm.model.modules() if norm_kind(m) is not None]
        try:
            with hm.intervene(fwd):
                hm.model(input_ids=self.ids)
        finally:
            for h in handles:
                h.remove()
        return pre, final[-1][0, -1] @ logit_dirs.T

    def clean_norm_outputs(self) -> None:
        outs: dict[int, torch.Tensor] = {}
        handles = []
        for m in self.hm.model.modules():
            if norm_kind(m) is not None:
                handles.append(
                    m.register_forward_hook(lambda mod, a, o: outs.__setitem__(id(mod), o.detach()))
                )
        try:
            with torch.no_grad():
                self.hm.model(input_ids=self.ids)
        finally:
            for h in handles:
                h.remove()
        self._y0 = outs


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_norm_is_the_module_at_its_own_input(family):
    """The frozen-scale linear map applied to the clean input gives the module's output (bias aside):
    ties the weight convention ((1 + w) for Gemma, LayerNorm's centring) to the real module."""
    hm, _ = _setup(family)
    ids = hm.tokenize(PROMPT)["input_ids"]
    xs = _norm_inputs(hm, ids)
    n = 0
    for m in hm.model.modules():
        if norm_kind(m) is None or id(m) not in xs:
            continue
        x0 = xs[id(m)]
        bias = getattr(m, "bias", None)
        want = m(x0) - (bias if bias is not None else 0)
        torch.testing.assert_close(frozen_norm_linear(m, x0, x0), want, rtol=1e-5, atol=1e-5)
        # linear in its second argument
        d1, d2 = torch.randn_like(x0), torch.randn_like(x0)
        torch.testing.assert_close(
            frozen_norm_linear(m, x0, 2 * d1 - d2),
            2 * frozen_norm_linear(m, x0, d1) - frozen_norm_linear(m, x0, d2),
        )
        n += 1
    assert n >= 2 * hm.cfg.n_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_edges_are_exact_effects_in_the_replacement_model(family):
    """Every edge equals the change of its target when the source's contribution is added in the
    explicitly built frozen model (linear, so one perturbation per source is exact)."""
    hm, tset = _setup(family)
    g = build_graph(hm, tset, PROMPT, max_feature_nodes=None, batch_size=5)
    assert g.n_features == g.info["n_active_features"] > 0
    assert int(g.active_features[:, 1].min()) >= 1  # no feature at the attention sink (skip_first = 1)
    ids = g.input_ids[None]
    ref = FrozenReference(hm, tset, ids)
    n_layers, n_pos, d = hm.cfg.n_layers, g.n_pos, hm.cfg.d_model
    W_U = hm.model.get_output_embeddings().weight.detach()
    dirs = W_U[g.logit_tokens] - W_U.mean(0)
    zero_e, zero_o = (
        torch.zeros(n_pos, d, dtype=torch.float64),
        torch.zeros(n_layers, n_pos, d, dtype=torch.float64),
    )
    pre0, log0 = ref.run(zero_e, zero_o, dirs)
    # the unperturbed frozen model is the real model (logits before any soft-capping)
    if getattr(hm.model.config, "final_logit_softcapping", None) is None:
        real = hm.forward(ids)[0, -1]
        torch.testing.assert_close(log0, real[g.logit_tokens] - real.mean(), rtol=1e-6, atol=1e-6)

    def target_values(pre, logits):
        vals = []
        for i in range(g.n_features):
            L, p, f = (int(v) for v in g.active_features[g.selected[i]])
            vals.append(pre[L][p, f])
        return torch.stack(vals + list(logits))

    base = target_values(pre0, log0)
    _, clean_cache = hm.run_with_cache(
        ids, hooks=["embed"] + [hook_name("mlp_in", L) for L in range(n_layers)]
    )
    want = torch.zeros_like(g.edges, dtype=torch.float64)
    rng = torch.Generator().manual_seed(0)
    # every token source and a random sample of feature and error sources (one forward each)
    feats = torch.randperm(g.n_features, generator=rng)[:12].tolist()
    errs = (g.error_start + torch.randperm(g.token_start - g.error_start, generator=rng)[:6]).tolist()
    errs += [g.error_start + L * g.n_pos for L in range(n_layers)]  # position 0, left out by the sink rule
    checked = sorted(feats + errs + list(range(g.token_start, g.logit_start)))
    for s in checked:
        de, do = zero_e.clone(), zero_o.clone()
        node = g.node(s)
        if node["kind"] == "feature":
            L, p, f = node["layer"], node["pos"], node["feature"]
            do[L, p] = node["activation"] * tset[L].W_dec[f].detach()
        elif node["kind"] == "error":
            L, p = node["layer"], node["pos"]
            xs = clean_cache[hook_name("mlp_in", L)]
            _, cache = hm.run_with_cache(ids, hooks=[hook_name("mlp_out", L)])
            ys = cache[hook_name("mlp_out", L)]
            recon = tset[L](xs[0, p])
            if not tset[L].keep_mask(xs, ys)[0, p]:  # a position the sink rule leaves out: no features
                recon = recon - tset[L].decode(tset[L].encode(xs[0, p])) + tset[L].b_dec
            do[L, p] = ys[0, p] - recon
        else:
            p = node["pos"]
            de[p] = clean_cache["embed"][0, p]
        pre, logits = ref.run(de, do, dirs)
        want[:, s] = target_values(pre, logits) - base
    got = g.edges.to(torch.float64)[:, checked]
    torch.testing.assert_close(got, want[:, checked], rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert want[:, checked].abs().max() > 1e-2  # the check is not vacuous


def test_chunked_equals_one_batch():
    hm, tset = _setup("llama")
    a = build_graph(hm, tset, PROMPT, max_feature_nodes=None, batch_size=3)
    b = build_graph(hm, tset, PROMPT, max_feature_nodes=None, chunked=False)
    pa, pb = torch.argsort(a.selected), torch.argsort(b.selected)
    cols_a = torch.cat([pa, torch.arange(a.n_features, a.n_nodes)])
    cols_b = torch.cat([pb, torch.arange(b.n_features, b.n_nodes)])
    rows_a = torch.cat([pa, torch.arange(a.n_features, a.edges.shape[0])])
    rows_b = torch.cat([pb, torch.arange(b.n_features, b.edges.shape[0])])
    torch.testing.assert_close(a.edges[rows_a][:, cols_a], b.edges[rows_b][:, cols_b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_identity(family):
    """Transcoders plus their error terms reproduce the real logits; without the errors they do not."""
    hm, tset = _setup(family)
    ids = hm.tokenize(PROMPT)["input_ids"]
    hooks = [hook_name(k, L) for L in range(hm.cfg.n_layers) for k in ("mlp_in", "mlp_out")]
    real, cache = hm.run_with_cache(ids, hooks=hooks)
    errors = torch.stack(
        [
            cache[hook_name("mlp_out", L)][0] - tset[L](cache[hook_name("mlp_in", L)][0])
            for L in range(hm.cfg.n_layers)
        ]
    )
    with replacement_model(hm, tset, errors):
        rep = hm.forward(ids)
    torch.testing.assert_close(rep, real, rtol=1e-6, atol=1e-6)
    with replacement_model(hm, tset):
        bare = hm.forward(ids)
    assert (bare - real).abs().max() > 1e-3
    assert hm.active_hook_count() == 0


def _hand_graph(edges: torch.Tensor, n_features: int, n_layers: int, n_pos: int, probs) -> AttributionGraph:
    n_active = n_features
    return AttributionGraph(
        prompt="",
        input_ids=torch.arange(n_pos),
        tokens=[str(i) for i in range(n_pos)],
        model="hand",
        n_layers=n_layers,
        active_features=torch.tensor([[0, 0, i] for i in range(n_active)]).reshape(-1, 3),
        activations=torch.ones(n_active),
        selected=torch.arange(n_features),
        edges=edges,
        logit_tokens=torch.arange(len(probs)),
        logit_probs=torch.tensor(probs),
        logit_strs=[str(i) for i in range(len(probs))],
    )


def test_scores_on_a_hand_graph():
    """One feature F fed by token T (weight 3) and error E (weight -1); the logit is fed by F (2)
    and E (2). Nodes: F, E (1 layer x 1 pos), T, logit.

    Normalised rows: F <- T 3/4, E 1/4; logit <- F 1/2, E 1/2. Influence: F 1/2, E 1/2 + 1/2*1/4 =
    5/8, T 1/2*3/4 = 3/8. Replacement = 3/8 / (3/8 + 5/8) = 3/8. Completeness: non-error shares
    F 3/4, logit 1/2, E 1, T 1; weights (influence + logit weight) F 1/2, E 5/8, T 3/8, logit 1:
    (3/8 + 5/8 + 3/8 + 1/2) / (1/2 + 5/8 + 3/8 + 1) = 1.875 / 2.5 = 0.75.
    """
    edges = torch.tensor([[0.0, -1.0, 3.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    g = _hand_graph(edges, 1, 1, 1, [1.0])
    infl = g.influence()
    torch.testing.assert_close(infl, torch.tensor([0.5, 0.625, 0.375, 0.0]))
    rep, comp = graph_scores(g)
    assert rep == pytest.approx(3 / 8)
    assert comp == pytest.approx(0.75)
    # total effect of T on the logit: 3 * 2 = 6 (through F), of E: 2 + (-1) * 2 = 0
    torch.testing.assert_close(g.total_effects(0), torch.tensor([2.0, 0.0, 6.0, 0.0]))


def test_total_effects_match_matrix_inverse():
    hm, tset = _setup("qwen2", dtype=torch.float32)
    g = build_graph(hm, tset, PROMPT, max_feature_nodes=None)
    A = g.adjacency.double()
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    want = (torch.linalg.inv(eye - A) - eye)[g.logit_start]
    torch.testing.assert_close(
        g.total_effects(0).double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item()
    )


def test_prune_keeps_tokens_logits_and_connected_features():
    hm, tset = _setup("gemma3", dtype=torch.float32)
    g = build_graph(hm, tset, PROMPT, max_feature_nodes=None)
    full = prune_graph(g, 1.0, 1.0)
    assert bool(full.node_mask[g.token_start :].all())
    pr = prune_graph(g, 0.5, 0.9)
    assert bool(pr.node_mask[g.token_start :].all())
    assert int(pr.node_mask[: g.n_features].sum()) < int(full.node_mask[: g.n_features].sum())
    rows = g.row_nodes
    feats = pr.node_mask[: g.n_features].nonzero().flatten()
    for f in feats.tolist():  # a kept feature has a kept incoming and a kept outgoing edge
        assert bool(pr.edge_mask[f].any()) and bool(pr.edge_mask[:, f].any())
    assert not bool(pr.edge_mask[~pr.node_mask[rows]].any())
    with pytest.raises(ConfigError):
        prune_graph(g, 1.5, 0.9)


def test_feature_cap_keeps_the_most_influential():
    hm, tset = _setup("llama", dtype=torch.float32)
    full = build_graph(hm, tset, PROMPT, max_feature_nodes=None)
    capped = build_graph(hm, tset, PROMPT, max_feature_nodes=10, batch_size=4, update_interval=1)
    assert capped.n_features == 10
    # the first feature row chosen is the feature with the largest direct effect share on the logits
    logit_rows = full.edges[full.n_features :]
    direct = (full.logit_probs[:, None] * (logit_rows.abs() / logit_rows.abs().sum(1, keepdim=True))).sum(0)
    best = int(torch.argmax(direct[: full.n_features]))
    assert int(capped.selected[0]) == int(full.selected[best])


def test_intervention_agreement_reports_each_feature():
    hm, tset = _setup("llama", dtype=torch.float32)
    g = build_graph(hm, tset, PROMPT, max_feature_nodes=None)
    out = intervention_agreement(hm, tset, g, n_features=6)
    assert out["n"] == 6 and len(out["features"]) == 6
    assert -1.0 <= out["spearman"] <= 1.0
    # steering a feature whose contribution is removed: the graph's prediction is linear in scale
    half = intervention_agreement(hm, tset, g, n_features=6, scale=0.5)
    for a, b in zip(out["features"], half["features"], strict=True):
        assert b["predicted"] == pytest.approx(0.5 * a["predicted"], rel=1e-5, abs=1e-7)
    assert hm.active_hook_count() == 0


def test_frozen_norm_agreement_is_exact_for_last_layer_features():
    """With the norms frozen as in the graph, a last-layer feature at the last position acts on the logits
    only through the (now linear) final norm and the unembedding: measured == predicted, while the real
    model's final norm changes the effect."""
    hm, tset = _setup("llama")
    g = build_graph(hm, tset, PROMPT, max_feature_nodes=None)
    out = intervention_agreement(hm, tset, g, n_features=g.n_features)
    last = f"{hm.cfg.n_layers - 1}_"
    direct = [
        r
        for r in out["features"]
        if r["node_id"].startswith(last) and r["node_id"].endswith(f"_{g.n_pos - 1}")
    ]
    assert len(direct) >= 2 and -1.0 <= out["spearman_frozen_norms"] <= 1.0
    for r in direct:
        assert r["measured_frozen_norms"] == pytest.approx(r["predicted"], rel=1e-6, abs=1e-9)
        assert r["measured_frozen_attention"] == pytest.approx(r["predicted"], rel=1e-6, abs=1e-9)
    assert max(abs(r["measured"] - r["predicted"]) for r in direct) > 1e-4  # the real norm is not linear
    # an early feature reaches the logits through attention: freezing the patterns changes its effect
    early = [r for r in out["features"] if not r["node_id"].endswith(f"_{g.n_pos - 1}")]
    assert max(abs(r["measured_frozen_attention"] - r["measured_frozen_norms"]) for r in early) > 1e-6
    assert -1.0 <= out["spearman_frozen_attention"] <= 1.0
    n_norm_hooks = sum(len(m._forward_hooks) for m in hm.model.modules())
    assert n_norm_hooks == 0  # every hook removed


def test_bad_input_is_typed():
    hm, tset = _setup("llama", dtype=torch.float32)
    with pytest.raises(DataError):
        build_graph(hm, tset, "   ")
    with pytest.raises(ConfigError):
        build_graph(hm, tset, PROMPT, batch_size=0)
