"""Faithfulness, MIB areas and circuits from scores (rosettalens.circuits.faithfulness)."""

from __future__ import annotations

import random

import pytest
import torch

from rosettalens.circuits.attribution import EdgeAttribution, attribute_nodes, logit_diff_metric
from rosettalens.circuits.faithfulness import (
    MIB_FRACTIONS,
    Circuit,
    Faithfulness,
    circuit_from_scores,
    cmd,
    component_names,
    cpr,
    edges_from_scores,
)
from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model
from rosettalens.names import hook_name

N, POS = 8, 7
PLANTED = Circuit(heads=["0.1", "2.3"], mlps=[1])


# ------------------------------------------------------------------------------------ areas
def test_cpr_cmd_on_hand_computed_curves():
    x = list(MIB_FRACTIONS)
    width = 1.0 - 0.001
    assert cpr(x, [1.0] * 10) == pytest.approx(width)
    assert cmd(x, [1.0] * 10) == 0.0
    # f = x: the trapezoid rule is exact on a line: (1 - 0.001^2) / 2
    assert cpr(x, x) == pytest.approx((1 - 0.001**2) / 2)
    assert cmd(x, x) == pytest.approx(width - (1 - 0.001**2) / 2)
    # only the last point is 1: one trapezoid from 0.5 to 1 of height 1/2
    step = [0.0] * 9 + [1.0]
    assert cpr(x, step) == pytest.approx(0.25)
    assert cmd(x, step) == pytest.approx(width - 0.25)
    # overshoot counts in CMD both ways: f = 2 everywhere is as far from 1 as f = 0
    assert cmd(x, [2.0] * 10) == pytest.approx(cmd(x, [0.0] * 10)) == pytest.approx(width)
    with pytest.raises(ShapeError):
        cpr([0.5], [1.0])


def test_circuit_from_scores():
    scores = {"0.0": -3.0, "0.1": 0.5, "1.0": 4.0, "mlp.0": -1.0, "mlp.1": 0.0}
    assert circuit_from_scores(scores, 2).components() == ["0.0", "mlp.0"]  # most negative first
    assert circuit_from_scores(scores, 2, absolute=True).components() == ["0.0", "1.0"]
    assert circuit_from_scores(scores, 0.6, absolute=True).components() == ["0.0", "1.0", "mlp.0"]
    assert len(circuit_from_scores(scores, 1.0)) == 5 and len(circuit_from_scores(scores, 0)) == 0
    assert Circuit.from_components(["2.1", "mlp.3", "0.4"]).to_dict() == {
        "heads": ["0.4", "2.1"],
        "mlps": [3],
    }
    with pytest.raises(ConfigError):
        circuit_from_scores(scores, 6)
    ea = EdgeAttribution(
        scores=torch.tensor([[-3.0, float("nan")], [0.5, 4.0]], dtype=torch.float64),
        senders=["embed", "0.0"],
        receivers=["1.0.q", "logits"],
        method="eap",
        steps=1,
        n_prompts=1,
        clean_metric=0.0,
        corrupted_metric=0.0,
    )
    assert edges_from_scores(ea, 2) == ["embed->1.0.q", "0.0->1.0.q"]
    assert edges_from_scores(ea, 2, absolute=True) == ["0.0->logits", "embed->1.0.q"]
    assert len(edges_from_scores(ea, 1.0)) == 3
    with pytest.raises(ConfigError):
        circuit_from_scores(scores, 1.5)


# ------------------------------------------------------------------------------------ planted circuit
@pytest.fixture(scope="module")
def planted() -> HookedModel:
    """Tiny Llama where only heads 0.1, 2.3 and MLP 1 write more than 1% of their output."""
    model, tok = tiny_model("llama", seed=11)
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            w = block.self_attn.o_proj.weight  # [d_model, n_heads * d_head]
            dh = w.shape[1] // model.config.num_attention_heads
            keep = [int(h.split(".")[1]) for h in PLANTED.heads if int(h.split(".")[0]) == layer]
            for h in range(model.config.num_attention_heads):
                if h not in keep:
                    w[:, h * dh : (h + 1) * dh] *= 0.01
            if layer not in PLANTED.mlps:
                block.mlp.down_proj.weight.mul_(0.01)
            else:
                block.mlp.down_proj.weight.mul_(3.0)
    return HookedModel.from_hf(model, tok, name="tiny-planted")


def _data(seed: int = 12):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(10, 300, (N, POS), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:6] = torch.randint(10, 300, (N, 5), generator=g)
    good = torch.randint(10, 300, (N,), generator=g)
    bad = torch.randint(10, 300, (N,), generator=g)
    return clean, corrupted, logit_diff_metric(good, bad)


def _mean(hm, metric, ids):
    return float(metric(hm.forward(ids), torch.arange(ids.shape[0])).double().mean())


def _metric_with_complement_patched(hm, clean, corrupted, metric, circuit: Circuit) -> float:
    """Independent reference: every head / MLP outside ``circuit`` takes its corrupted activation."""
    L, H = hm.cfg.n_layers, hm.cfg.n_heads
    hooks = [hook_name("head_z", i) for i in range(L)] + [hook_name("mlp_out", i) for i in range(L)]
    _, cx = hm.run_with_cache(corrupted, hooks=hooks)
    patches = {}
    for layer in range(L):
        drop = [h for h in range(H) if f"{layer}.{h}" not in circuit.heads]

        def fn(act, name, drop=drop, src=cx[hook_name("head_z", layer)]):
            out = act.clone()
            out[:, :, drop] = src[:, :, drop]
            return out

        patches[hook_name("head_z", layer)] = fn
        if layer not in circuit.mlps:
            patches[hook_name("mlp_out", layer)] = cx[hook_name("mlp_out", layer)]
    with hm.patch(patches):
        return _mean(hm, metric, clean)


def test_faithfulness_matches_a_direct_patching_loop(planted):
    hm = planted
    clean, corrupted, metric = _data()
    F = Faithfulness(hm, clean, metric, corrupted_ids=corrupted, batch_size=3)
    assert F.m_full == pytest.approx(_mean(hm, metric, clean), rel=1e-5)
    assert F.m_empty == pytest.approx(
        _metric_with_complement_patched(hm, clean, corrupted, metric, Circuit()), rel=1e-5
    )
    rng = random.Random(0)
    for _ in range(2):
        c = Circuit.from_components(rng.sample(component_names(hm), 7))
        ref = _metric_with_complement_patched(hm, clean, corrupted, metric, c)
        assert F.metric_of(c) == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert F(c) == pytest.approx((ref - F.m_empty) / (F.m_full - F.m_empty), rel=1e-4, abs=1e-6)
    everything = Circuit.from_components(component_names(hm))
    assert F(everything) == pytest.approx(1.0, abs=1e-6) and F(Circuit()) == pytest.approx(0.0, abs=1e-6)
    assert hm.active_hook_count() == 0


def test_planted_circuit_is_recovered_and_faithful(planted):
    hm = planted
    clean, corrupted, metric = _data()
    F = Faithfulness(hm, clean, metric, corrupted_ids=corrupted)
    assert F(PLANTED) == pytest.approx(1.0, abs=0.1)
    for method in ("eap", "eap-ig"):
        att = attribute_nodes(hm, clean, corrupted, metric, method=method, steps=4)
        found = circuit_from_scores(att, len(PLANTED), absolute=True)
        assert found.to_dict() == PLANTED.to_dict(), method
    # random circuits of the planted size are not faithful
    rng = random.Random(1)
    others = []
    while len(others) < 4:
        c = Circuit.from_components(rng.sample(component_names(hm), len(PLANTED)))
        if c.to_dict() != PLANTED.to_dict():
            others.append(abs(1.0 - F(c)))
    assert min(others) > 0.2
    summary = F.evaluate(att, n_random=3)
    assert summary["cmd"] < summary["random_cmd"]
    assert summary["cpr"] > summary["random_cpr"]
    assert summary["curve_absolute"]["sizes"] == [int(p * 21) for p in MIB_FRACTIONS]
    assert summary["curve_absolute"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-6)


def test_mean_and_zero_ablation_evaluators(planted):
    hm = planted
    clean, corrupted, metric = _data()
    for ablation, kw in (
        ("mean", {"reference": corrupted}),
        ("zero", {}),
        ("resample", {"corrupted_ids": corrupted}),
    ):
        F = Faithfulness(hm, clean, metric, ablation=ablation, **kw)
        assert F(Circuit.from_components(component_names(hm))) == pytest.approx(1.0, abs=1e-6)
        assert F(PLANTED) == pytest.approx(1.0, abs=0.15), ablation


def test_faithfulness_bad_input(planted):
    hm = planted
    clean, corrupted, metric = _data()
    with pytest.raises(ConfigError):
        Faithfulness(hm, clean, metric, ablation="optimal", corrupted_ids=corrupted)
    with pytest.raises(ConfigError):
        Faithfulness(hm, clean, metric)  # patching needs corrupted prompts
    with pytest.raises(ShapeError):
        Faithfulness(hm, clean, metric, corrupted_ids=corrupted[:, :5])
    with pytest.raises(DataError):  # a metric no ablation can move
        Faithfulness(hm, clean, lambda logits: torch.zeros(logits.shape[0]), corrupted_ids=corrupted)
    F = Faithfulness(hm, clean, metric, ablation="zero")
    with pytest.raises(DataError):
        F.curve({"0.0": 1.0})
    with pytest.raises(ConfigError):
        F.curve({k: 0.0 for k in component_names(hm)}, fractions=[0.5, 0.2])


# ------------------------------------------------------------------------------------ edge circuits
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_edge_faithfulness_exact_cases(family):
    from rosettalens.circuits.attribution import attribute_edges
    from rosettalens.circuits.faithfulness import EdgeFaithfulness

    model, tok = tiny_model(family, seed=13)
    hm = HookedModel.from_hf(model, tok, name=f"tiny-{family}")
    clean, corrupted, metric = _data(seed=14)
    F = EdgeFaithfulness(hm, clean, corrupted, metric, batch_size=5)
    # every edge kept: the clean run; none: the corrupted run (the residual is the sum of the writes)
    assert F.m_full == pytest.approx(_mean(hm, metric, clean), rel=1e-5, abs=1e-6)
    assert F.m_empty == pytest.approx(_mean(hm, metric, corrupted), rel=1e-4, abs=1e-5)
    L = hm.cfg.n_layers
    _, cx = hm.run_with_cache(corrupted, hooks=[hook_name("head_z", i) for i in range(L)])

    def head_patch(layer, h):
        def fn(act, name):
            out = act.clone()
            out[:, :, h] = cx[hook_name("head_z", layer)][:, :, h]
            return out

        return fn

    # all out-edges of head 1.2 patched == patching the node
    keep = [e for e in F.edge_names if not e.startswith("1.2->")]
    with hm.patch({"head_z.1": head_patch(1, 2)}):
        ref = _mean(hm, metric, clean)
    assert F.metric_of(keep) == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # one edge 0.4 -> logits patched == the head's corrupted write added to the final residual only
    _, cc = hm.run_with_cache(clean, hooks=["attn_out.0"])
    with hm.patch({"head_z.0": head_patch(0, 4)}):
        _, cp = hm.run_with_cache(clean, hooks=["attn_out.0"])
    delta = cp["attn_out.0"] - cc["attn_out.0"]
    with hm.patch({hook_name("resid_post", L - 1): lambda act, name: act + delta}):
        ref = _mean(hm, metric, clean)
    keep = [e for e in F.edge_names if e != "0.4->logits"]
    assert F.metric_of(keep) == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # a curve from edge attribution ends at f = 1 and beats random circuits on CMD
    ea = attribute_edges(hm, clean, corrupted, metric, batch_size=5)
    ev = F.evaluate(ea, n_random=1, fractions=(0.01, 0.1, 0.5, 1.0))
    assert ev["curve_absolute"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-5)
    assert ev["n_edges"] == len(ea.edges()) == int(F.graph.sum())
    assert ev["cmd"] < ev["random_cmd"]
    with pytest.raises(ConfigError):
        F.metric_of(["1.0->0.0.q"])  # not an edge: a later head into an earlier layer
    assert hm.active_hook_count() == 0


def test_edge_faithfulness_refuses_unsupported_models():
    from rosettalens.circuits.faithfulness import EdgeFaithfulness

    clean, corrupted, metric = _data()
    for family in ("gemma3", "gpt2"):
        model, tok = tiny_model(family)
        hm = HookedModel.from_hf(model, tok)
        with pytest.raises(ConfigError):
            EdgeFaithfulness(hm, clean, corrupted, metric)


def test_random_baseline_of_equal_size(planted):
    """Random circuits have the circuit's number of heads and MLPs; the p-value is the permutation
    formula over the values returned (recomputed here from F itself, seeded draws reproduced)."""
    hm = planted
    clean, corrupted, metric = _data()
    F = Faithfulness(hm, clean, metric, corrupted_ids=corrupted)
    out = F.random_baseline(PLANTED, n=6, seed=3)
    assert out["n_heads"] == 2 and out["n_mlps"] == 1 and len(out["random"]) == 6
    assert out["faithfulness"] == pytest.approx(F(PLANTED))
    rng = random.Random(3)
    heads = [c for c in component_names(hm) if not c.startswith("mlp.")]
    mlps = [c for c in component_names(hm) if c.startswith("mlp.")]
    for r in out["random"]:
        c = Circuit.from_components(rng.sample(heads, 2) + rng.sample(mlps, 1))
        assert len(c.heads) == 2 and len(c.mlps) == 1
        assert r == pytest.approx(F(c), abs=1e-9)
    assert out["p_value"] == pytest.approx((1 + sum(r >= out["faithfulness"] for r in out["random"])) / 7)
    assert out["p_value"] == pytest.approx(1 / 7)  # the planted circuit beats every random one
    # a random circuit scored against random circuits of its own size is no outlier
    worst = Circuit(heads=["1.0", "1.2"], mlps=[0])
    assert F.random_baseline(worst, n=6, seed=3)["p_value"] > 1 / 7
    with pytest.raises(ConfigError):
        F.random_baseline(PLANTED, n=0)
