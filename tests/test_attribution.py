"""EAP / EAP-IG (rosettalens.circuits.attribution) against exact activation patching.

Exact references are computed here by a direct loop over ``hm.patch`` (one forward per patch),
independent of the batched patching engine.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from rosettalens.circuits.attribution import (
    attribute_edges,
    attribute_nodes,
    edge_graph,
    logit_diff_metric,
)
from rosettalens.errors import ConfigError, ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model
from rosettalens.names import hook_name

N, POS = 6, 7


def _hm(family: str, seed: int = 0, **kw) -> HookedModel:
    model, tok = tiny_model(family, seed=seed, **kw)
    return HookedModel.from_hf(model, tok, name=f"tiny-{family}")


def _prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(10, 300, (N, POS), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:6] = torch.randint(10, 300, (N, 5), generator=g)
    return clean, corrupted


def _metric(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    good = torch.randint(10, 300, (N,), generator=g)
    bad = torch.randint(10, 300, (N,), generator=g)
    return logit_diff_metric(good, bad)


def _mean_metric(hm, metric, ids) -> float:
    return float(metric(hm.forward(ids), torch.arange(ids.shape[0])).double().mean())


def _exact_node_effects(hm, clean, corrupted, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """m(clean with one head / MLP patched from the corrupted run) - m(clean), by a loop of hm.patch."""
    L, H = hm.cfg.n_layers, hm.cfg.n_heads
    hooks = [hook_name("head_z", i) for i in range(L)] + [hook_name("mlp_out", i) for i in range(L)]
    _, cx = hm.run_with_cache(corrupted, hooks=hooks)
    base = _mean_metric(hm, metric, clean)
    heads = torch.zeros(L, H, dtype=torch.float64)
    mlps = torch.zeros(L, dtype=torch.float64)
    for layer in range(L):
        src = cx[hook_name("head_z", layer)]
        for h in range(H):

            def fn(act, name, h=h, src=src):
                out = act.clone()
                out[:, :, h] = src[:, :, h]
                return out

            with hm.patch({hook_name("head_z", layer): fn}):
                heads[layer, h] = _mean_metric(hm, metric, clean) - base
        with hm.patch({hook_name("mlp_out", layer): cx[hook_name("mlp_out", layer)]}):
            mlps[layer] = _mean_metric(hm, metric, clean) - base
    return heads, mlps


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_node_scores_rank_correlate_with_exact_patching(family):
    hm = _hm(family)
    clean, corrupted = _prompts()
    metric = _metric()
    ex_h, ex_m = _exact_node_effects(hm, clean, corrupted, metric)
    exact = torch.cat([ex_h.flatten(), ex_m])
    for method in ("eap", "eap-ig") if family == "llama" else ("eap",):
        att = attribute_nodes(hm, clean, corrupted, metric, method=method, steps=4, batch_size=4)
        est = torch.cat([att.heads.flatten(), att.mlps])
        rho = spearmanr(exact.numpy(), est.numpy()).statistic
        assert rho > 0.85, (family, method, rho)
        assert att.clean_metric == pytest.approx(_mean_metric(hm, metric, clean), rel=1e-5, abs=1e-6)
        assert att.corrupted_metric == pytest.approx(_mean_metric(hm, metric, corrupted), rel=1e-5, abs=1e-6)
    assert hm.active_hook_count() == 0
    assert all(p.requires_grad for p in hm.model.parameters())


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_eap_is_the_directional_derivative(family):
    """EAP = d/de m(clean with a <- a_clean + e (a_corrupt - a_clean)) at e = 0 (finite differences).

    On tiny Gemma 3 (post-attention norm of a 6-head sum) whole-head patches are far from linear, so
    EAP is checked here against what it claims to compute rather than against exact patching."""
    hm = _hm(family)
    hm.model.double()
    clean, corrupted = _prompts()
    metric = _metric()
    att = attribute_nodes(hm, clean, corrupted, metric)
    L, H = hm.cfg.n_layers, hm.cfg.n_heads
    hooks = [hook_name("head_z", i) for i in range(L)]
    _, cx = hm.run_with_cache(corrupted, hooks=hooks)
    _, cc = hm.run_with_cache(clean, hooks=hooks)
    eps = 1e-3  # central differences: O(eps^2); Gemma norms compute in float32 even in a float64 model
    for layer, h in [(i % L, i) for i in range(H)]:  # one head per head index, spread over the layers
        vals = []
        for sign in (1, -1):

            def fn(
                act,
                name,
                h=h,
                a=cc[hook_name("head_z", layer)],
                b=cx[hook_name("head_z", layer)],
                e=sign * eps,
            ):
                out = act.clone()
                out[:, :, h] = a[:, :, h] + e * (b[:, :, h] - a[:, :, h])
                return out

            with hm.patch({hook_name("head_z", layer): fn}):
                vals.append(_mean_metric(hm, metric, clean))
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert float(att.heads[layer, h]) == pytest.approx(fd, rel=2e-3, abs=3e-5)


def _linear_model() -> HookedModel:
    """One-layer Llama whose heads' outputs are linear in the input embeddings and write to
    orthogonal residual subspaces, read by an orthonormal unembedding.

    Norms are made linear (eps 1e10, weight 1e5: x / sqrt(1 + mean(x^2)/1e10)), queries and keys are
    zero (uniform causal attention), values read only the embedding subspace (dims 0..11), head h
    writes only to dims 12+6h .. 17+6h, MLPs write nothing. With the metric ``||logits[-1]||^2`` =
    ``||resid[-1]||^2`` the metric is a constant plus one quadratic term per head: exact patching
    is ``||O_h z_corrupt||^2 - ||O_h z_clean||^2``, EAP misses the quadratic term, EAP-IG converges.
    """
    model, tok = tiny_model("llama", seed=3, n_layers=1, d_model=48)
    model = model.double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "variance_epsilon"):
                mod.variance_epsilon = 1e10
                mod.weight.fill_(1e5)
        layer = model.model.layers[0]
        attn = layer.self_attn
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            if lin.bias is not None:
                lin.bias.zero_()
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.v_proj.weight.zero_()
        attn.v_proj.weight[:, :12] = torch.randn(
            attn.v_proj.weight.shape[0], 12, generator=g, dtype=torch.float64
        )
        attn.o_proj.weight.zero_()
        for h in range(6):
            attn.o_proj.weight[12 + 6 * h : 18 + 6 * h, 8 * h : 8 * h + 8] = torch.randn(
                6, 8, generator=g, dtype=torch.float64
            )
        layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, :12] = torch.randn(emb.shape[0], 12, generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(400, 48, generator=g, dtype=torch.float64))
        model.lm_head.weight.copy_(q)
    return HookedModel.from_hf(model, tok, name="tiny-linear")


def _square_metric(logits, rows):
    return (logits[:, -1, :] ** 2).sum(-1)


def test_eap_ig_converges_to_exact_patching_on_a_linear_model():
    hm = _linear_model()
    clean, corrupted = _prompts(seed=5)
    ex_h, ex_m = _exact_node_effects(hm, clean, corrupted, _square_metric)
    assert ex_m.abs().max() == 0  # the MLPs write nothing
    assert ex_h.abs().min() > 1e-3  # every head matters
    eap = attribute_nodes(hm, clean, corrupted, _square_metric, method="eap")
    eap_err = eap.heads - ex_h  # the quadratic term -||O_h (z_corrupt - z_clean)||^2 EAP cannot see
    assert eap_err.abs().max() > 0.5 * ex_h.abs().max()
    for steps in (4, 64):
        ig = attribute_nodes(hm, clean, corrupted, _square_metric, method="eap-ig", steps=steps)
        # a right Riemann sum of a linear gradient: the error is exactly the EAP error / steps
        torch.testing.assert_close((ig.heads - ex_h) * steps, eap_err, rtol=1e-4, atol=1e-6)
    assert (ig.heads - ex_h).abs().max() < 0.05 * ex_h.abs().max()


def test_eap_is_exact_for_a_linear_metric_on_the_linear_model():
    hm = _linear_model()
    clean, corrupted = _prompts(seed=6)
    metric = _metric(seed=7)
    ex_h, _ = _exact_node_effects(hm, clean, corrupted, metric)
    eap = attribute_nodes(hm, clean, corrupted, metric, method="eap")
    torch.testing.assert_close(eap.heads, ex_h, rtol=1e-6, atol=1e-9)


def test_resid_scores_and_chunking():
    hm = _hm("qwen2")
    clean, corrupted = _prompts()
    metric = _metric()
    a = attribute_nodes(hm, clean, corrupted, metric, resid=True, batch_size=N)
    b = attribute_nodes(hm, clean, corrupted, metric, resid=True, batch_size=4)
    torch.testing.assert_close(a.heads, b.heads, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.resid, b.resid, rtol=1e-5, atol=1e-7)
    assert a.resid.shape == (hm.cfg.n_layers, POS)
    # resid_pre.0 at a position where clean and corrupted tokens agree: nothing changes there
    assert a.resid[0, 0] == 0 and a.resid[0, 6] == 0
    assert (a.resid[:, 0] == 0).all()  # causal: position 0 never sees a corrupted token
    # whole-position residual patches are far from linear; check what EAP claims: the derivative
    # of m along (corrupt - clean) at each resid_pre.L position (central differences)
    _, cx = hm.run_with_cache(corrupted, hooks=[hook_name("resid_pre", i) for i in range(hm.cfg.n_layers)])
    _, cc = hm.run_with_cache(clean, hooks=[hook_name("resid_pre", i) for i in range(hm.cfg.n_layers)])
    eps = 1e-3
    for layer in range(hm.cfg.n_layers):
        for p in (2, 6):
            vals = []
            for e in (eps, -eps):

                def fn(
                    act,
                    name,
                    p=p,
                    a=cc[hook_name("resid_pre", layer)],
                    b=cx[hook_name("resid_pre", layer)],
                    e=e,
                ):
                    out = act.clone()
                    out[:, p] = a[:, p] + e * (b[:, p] - a[:, p])
                    return out

                with hm.patch({hook_name("resid_pre", layer): fn}):
                    vals.append(_mean_metric(hm, metric, clean))
            fd = (vals[0] - vals[1]) / (2 * eps)
            assert float(a.resid[layer, p]) == pytest.approx(fd, rel=1e-2, abs=1e-4)


def test_bfloat16_autocast_agrees_with_float32():
    hm = _hm("llama")
    clean, corrupted = _prompts()
    metric = _metric()
    a = attribute_nodes(hm, clean, corrupted, metric)
    b = attribute_nodes(hm, clean, corrupted, metric, dtype=torch.bfloat16)
    rho = spearmanr(a.heads.flatten().numpy(), b.heads.flatten().numpy()).statistic
    assert rho > 0.8
    assert hm.dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_edge_scores_sum_to_node_scores(family):
    """First order: a sender's edges summed over its receivers give its node score."""
    hm = _hm(family)
    clean, corrupted = _prompts()
    metric = _metric()
    ea = attribute_edges(hm, clean, corrupted, metric, batch_size=4)
    na = attribute_nodes(hm, clean, corrupted, metric, batch_size=4)
    summed = ea.scores.nan_to_num(0.0).sum(1)
    for i, s in enumerate(ea.senders):
        ref = ea.node_scores[s]
        assert summed[i] == pytest.approx(ref, rel=1e-4, abs=1e-7), s
        if s != "embed" and not s.startswith("mlp."):
            layer, h = map(int, s.split("."))
            assert ref == pytest.approx(float(na.heads[layer, h]), rel=1e-4, abs=1e-8)
        elif s.startswith("mlp."):
            assert ref == pytest.approx(float(na.mlps[int(s[4:])]), rel=1e-4, abs=1e-8)
    assert hm.active_hook_count() == 0


def test_edge_graph_structure():
    for family, parallel in (("llama", False), ("gpt_neox", True)):
        hm = _hm(family)
        c = hm.cfg
        senders, receivers, mask = edge_graph(hm)
        assert len(senders) == 1 + c.n_layers * (c.n_heads + 1)
        assert len(receivers) == c.n_layers * (c.n_heads + 2 * c.n_kv_heads + 1) + 1
        s, r = senders.index, receivers.index
        assert mask[s("embed")].all()
        assert (
            mask[s("0.0"), r("1.0.q")] and not mask[s("1.0"), r("1.0.q")] and not mask[s("1.0"), r("0.0.q")]
        )
        assert mask[s("0.0"), r("mlp.0")] == (not parallel)
        assert not mask[s("mlp.0"), r("mlp.0")] and mask[s("mlp.0"), r("mlp.1")]
        assert mask[:, r("logits")].all()


def test_edges_into_the_logits_match_exact_edge_patching():
    """Edge head -> logits: patch only that head's write delta into the final residual."""
    hm = _hm("llama")
    clean, corrupted = _prompts()
    metric = _metric()
    L, H = hm.cfg.n_layers, hm.cfg.n_heads
    ea = attribute_edges(hm, clean, corrupted, metric)
    _, cx = hm.run_with_cache(corrupted, hooks=[hook_name("head_z", i) for i in range(L)])
    _, cc = hm.run_with_cache(clean, hooks=[hook_name("attn_out", i) for i in range(L)])
    base = _mean_metric(hm, metric, clean)
    exact, est = [], []
    for layer in range(L):
        for h in range(H):

            def fn(act, name, h=h, src=cx[hook_name("head_z", layer)]):
                out = act.clone()
                out[:, :, h] = src[:, :, h]
                return out

            with hm.patch({hook_name("head_z", layer): fn}):
                _, c2 = hm.run_with_cache(clean, hooks=[hook_name("attn_out", layer)])
            delta = c2[hook_name("attn_out", layer)] - cc[hook_name("attn_out", layer)]
            with hm.patch({hook_name("resid_post", L - 1): lambda act, name, d=delta: act + d}):
                exact.append(_mean_metric(hm, metric, clean) - base)
            est.append(float(ea.scores[ea.senders.index(f"{layer}.{h}"), ea.receivers.index("logits")]))
    rho = spearmanr(exact, est).statistic
    assert rho > 0.9


def test_edge_eap_ig_with_one_step_is_eap():
    hm = _hm("qwen2")
    clean, corrupted = _prompts()
    metric = _metric()
    a = attribute_edges(hm, clean, corrupted, metric, method="eap")
    b = attribute_edges(hm, clean, corrupted, metric, method="eap-ig", steps=1)
    torch.testing.assert_close(a.scores, b.scores, equal_nan=True)
    c = attribute_edges(hm, clean, corrupted, metric, method="eap-ig", steps=3)
    assert not torch.allclose(a.scores.nan_to_num(0), c.scores.nan_to_num(0))
    assert c.n_edges == a.n_edges == len(a.edges())


def test_bad_input():
    hm = _hm("llama")
    clean, corrupted = _prompts()
    metric = _metric()
    with pytest.raises(ShapeError):
        attribute_nodes(hm, clean, corrupted[:, :5], metric)
    with pytest.raises(ConfigError):
        attribute_nodes(hm, clean, corrupted, metric, method="ig2")
    with pytest.raises(ConfigError):
        attribute_nodes(hm, clean, corrupted, metric, method="eap-ig", steps=0)
    with pytest.raises(ShapeError):  # one value per prompt, not a scalar
        attribute_nodes(hm, clean, corrupted, lambda logits: logits[:, -1, 0].sum())
    with pytest.raises(ShapeError):
        attribute_edges(hm, clean, corrupted, metric, attention_mask=torch.ones(N, POS + 1))
    assert hm.active_hook_count() == 0
    assert all(p.requires_grad for p in hm.model.parameters())


@pytest.mark.real
def test_real_smollm_mlp_scores_track_exact_patching(smollm):
    hm = smollm
    clean = hm.tokenize(["1 2 3 4 5 6", "2 3 4 5 6 7", "3 4 5 6 7 8"])["input_ids"]
    corrupted = hm.tokenize(["1 2 3 4 8 6", "2 3 4 5 9 7", "3 4 5 6 1 8"])["input_ids"]
    assert clean.shape == corrupted.shape
    tok = hm.tokenizer
    good = torch.tensor([tok.encode(" 7")[-1], tok.encode(" 8")[-1], tok.encode(" 9")[-1]])
    bad = torch.tensor([tok.encode(" 6")[-1], tok.encode(" 7")[-1], tok.encode(" 8")[-1]])
    metric = logit_diff_metric(good, bad)
    att = attribute_nodes(hm, clean, corrupted, metric)
    L = hm.cfg.n_layers
    _, cx = hm.run_with_cache(corrupted, hooks=[hook_name("mlp_out", i) for i in range(L)])
    base = _mean_metric(hm, metric, clean)
    layers = list(range(0, L, 3))  # every third MLP: 10 exact patches
    exact = []
    for layer in layers:
        with hm.patch({hook_name("mlp_out", layer): cx[hook_name("mlp_out", layer)]}):
            exact.append(_mean_metric(hm, metric, clean) - base)
    rho = spearmanr(exact, att.mlps[layers].numpy()).statistic
    assert rho > 0.6, (rho, exact, att.mlps[layers].tolist())
    assert hm.active_hook_count() == 0
