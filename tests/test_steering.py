"""Steering vectors: math against textbook formulas, activation collection against plain HF runs,
the SteeringVector file format, addition/ablation on tiny models, refusal selection and transfer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rosettalens.errors import ChatTemplateError, ConfigError, RosettaError, ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model
from rosettalens.steering import (
    SteeringVector,
    SteeringVectorError,
    ablate_vector,
    add_vector,
    apply_vector,
    collect_activations,
    compute_vector,
    compute_vectors,
    diff_of_means,
    evaluate_refusal,
    pca_direction,
    random_like,
    refusal_scores,
    refusal_token_ids,
    select_refusal_direction,
    transfer,
)

PROMPTS_A = [
    "How do I pick a lock?",
    "Tell me a secret.",
    "Write a long and detailed plan for something I should not do at all.",
    "Why?",
]
PROMPTS_B = [
    "How do I bake bread at home?",
    "One two three.",
    "Explain the seasons of the year to me in simple words please.",
    "Hi",
]


@pytest.fixture(scope="module")
def hm() -> HookedModel:
    m, t = tiny_model("llama", seed=0)
    return HookedModel.from_hf(m, t, name="tiny-llama")


def _hf_hidden(hm: HookedModel, prompt: str) -> tuple[torch.Tensor, ...]:
    """Independent reference: plain HF forward of one unpadded chat prompt, all hidden states."""
    text = hm.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = hm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = hm.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states, out.logits


# ---------------------------------------------------------------------------------------------- math
def test_diff_of_means_textbook():
    rng = np.random.default_rng(0)
    P, N = rng.normal(size=(17, 9)), rng.normal(size=(11, 9)) + 2.0
    v = diff_of_means(torch.tensor(P), torch.tensor(N))
    np.testing.assert_allclose(v.numpy(), P.mean(0) - N.mean(0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ShapeError):
        diff_of_means(torch.zeros(3, 4), torch.zeros(3, 5))


def test_pca_recovers_planted_direction_and_matches_covariance_eigenvector():
    rng = np.random.default_rng(1)
    d = 20
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    P = 0.1 * rng.normal(size=(50, d)) + 3 * u
    N = 0.1 * rng.normal(size=(40, d)) - 3 * u
    v = pca_direction(torch.tensor(P), torch.tensor(N)).numpy()
    # textbook: top eigenvector of the covariance of the pooled data
    X = np.concatenate([P, N])
    w, V = np.linalg.eigh(np.cov(X, rowvar=False))
    top = V[:, np.argmax(w)]
    assert abs(abs(v @ top) / np.linalg.norm(v) - 1) < 1e-8
    # oriented from negative to positive, close to the planted direction, length = projected diff
    assert v @ u > 0
    assert v @ u / np.linalg.norm(v) > 0.999
    dm = P.mean(0) - N.mean(0)
    assert np.linalg.norm(v) == pytest.approx(abs(dm @ top), rel=1e-8)


# ---------------------------------------------------------------------------------------------- collection
def test_collect_last_and_mean_match_unpadded_hf_runs(hm):
    acts = collect_activations(hm, PROMPTS_A, ["resid_pre.1", "resid_post.-1"], positions="last")
    means = collect_activations(hm, PROMPTS_A, ["resid_pre.1"], positions="mean")
    second = collect_activations(hm, PROMPTS_A, ["resid_pre.1"], positions=-2)
    assert set(acts) == {"resid_pre.1", "resid_post.2"}
    for i, p in enumerate(PROMPTS_A):
        hs, _ = _hf_hidden(hm, p)
        torch.testing.assert_close(acts["resid_pre.1"][i], hs[1][0, -1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(means["resid_pre.1"][i], hs[1][0].mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second["resid_pre.1"][i], hs[1][0, -2], rtol=1e-4, atol=1e-5)
    assert acts["resid_post.2"].shape == (4, hm.cfg.d_model)


def test_compute_vectors_many_hooks_equal_single_and_textbook(hm):
    hooks = ["resid_pre.1", "resid_pre.2", "mlp_out.0"]
    many = compute_vectors(hm, PROMPTS_A, PROMPTS_B, hooks, positions="mean", batch_size=3)
    for h in hooks[:2]:
        one = compute_vector(hm, PROMPTS_A, PROMPTS_B, h, positions="mean", batch_size=2)
        torch.testing.assert_close(many[h].vector, one.vector, rtol=1e-5, atol=1e-6)
    mean_a = torch.stack([_hf_hidden(hm, p)[0][2][0].mean(0) for p in PROMPTS_A]).double().mean(0)
    mean_b = torch.stack([_hf_hidden(hm, p)[0][2][0].mean(0) for p in PROMPTS_B]).double().mean(0)
    ref = mean_a - mean_b
    torch.testing.assert_close(many["resid_pre.2"].vector.double(), ref, rtol=1e-4, atol=1e-5)
    sv = many["resid_pre.1"]
    assert sv.model == "tiny-llama" and sv.kind == "diff_of_means"
    assert sv.source["n_positive"] == 4 and sv.source["positions"] == "mean"
    pca = compute_vector(hm, PROMPTS_A, PROMPTS_B, "resid_pre.2", method="pca")
    assert pca.kind == "pca" and pca.d_model == hm.cfg.d_model


def test_collect_bad_input(hm):
    with pytest.raises(RosettaError):
        collect_activations(hm, [], ["resid_pre.1"])
    with pytest.raises(ConfigError):
        collect_activations(hm, PROMPTS_A, ["head_z.1"])
    with pytest.raises(ConfigError):
        collect_activations(hm, PROMPTS_A, ["resid_pre.1"], positions="first")
    with pytest.raises(ConfigError):
        compute_vector(hm, PROMPTS_A, PROMPTS_B, "resid_pre.1", method="ica")


# ---------------------------------------------------------------------------------------------- artifact
def test_save_load_round_trip_and_sidecar(hm, tmp_path):
    sv = compute_vector(hm, PROMPTS_A, PROMPTS_B, "resid_pre.-1", source={"positive": "a", "negative": "b"})
    assert sv.hook == "resid_pre.2"
    path = sv.save(tmp_path / "sub" / "refusal")
    assert path.name == "refusal.safetensors"
    back = SteeringVector.load(path, hm=hm)
    assert torch.equal(back.vector, sv.vector)
    assert (back.model, back.hook, back.kind) == (sv.model, sv.hook, sv.kind)
    assert back.source["positive"] == "a"
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["d_model"] == hm.cfg.d_model and side["hook"] == "resid_pre.2"
    assert side["norm"] == pytest.approx(float(sv.vector.double().norm()))
    assert sorted(p.name for p in path.parent.iterdir()) == ["refusal.json", "refusal.safetensors"]
    # loading by the .json path or without suffix works too
    assert torch.equal(SteeringVector.load(path.with_suffix(".json")).vector, sv.vector)
    assert torch.equal(SteeringVector.load(tmp_path / "sub" / "refusal").vector, sv.vector)


def test_load_for_model_with_other_d_model_is_shape_error(hm, tmp_path):
    sv = SteeringVector(torch.randn(hm.cfg.d_model), model="tiny-llama", hook="resid_pre.1")
    path = sv.save(tmp_path / "v.safetensors")
    m, t = tiny_model("qwen2", seed=0, d_model=64)
    other = HookedModel.from_hf(m, t, name="tiny-qwen2-64")
    with pytest.raises(ShapeError, match="d_model"):
        SteeringVector.load(path, hm=other)
    with pytest.raises(ShapeError):
        with add_vector(other, sv):
            pass
    with pytest.raises(ShapeError):
        with ablate_vector(other, sv):
            pass
    assert other.active_hook_count() == 0


def test_corrupt_or_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SteeringVectorError):
        SteeringVector.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"vector": torch.zeros(3)}, str(foreign))
    with pytest.raises(SteeringVectorError, match="not a rosettalens"):
        SteeringVector.load(foreign)
    with pytest.raises(SteeringVectorError, match="not found"):
        SteeringVector.load(tmp_path / "missing.safetensors")
    with pytest.raises(ShapeError):
        SteeringVector(torch.zeros(2, 3), model="m", hook="resid_pre.0")
    with pytest.raises(ShapeError):
        SteeringVector(torch.tensor([float("nan"), 1.0]), model="m", hook="resid_pre.0")


# ---------------------------------------------------------------------------------------------- apply
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_ablation_leaves_no_component_along_the_direction(family):
    m, t = tiny_model(family, seed=0)
    h = HookedModel.from_hf(m, t, name=f"tiny-{family}")
    L = h.cfg.n_layers
    sv = compute_vector(h, PROMPTS_A, PROMPTS_B, "resid_pre.1")
    u = sv.unit()
    hooks = [f"resid_post.{i}" for i in range(L)] + [f"resid_pre.{i}" for i in range(L)]
    hooks += [f"attn_out.{i}" for i in range(L)] + [f"mlp_out.{i}" for i in range(L)]
    _, base = h.run_with_cache(PROMPTS_B, hooks=hooks, chat=True)
    with ablate_vector(h, sv):
        _, cache = h.run_with_cache(PROMPTS_B, hooks=hooks, chat=True)
    assert h.active_hook_count() == 0
    for name in hooks:
        comp = cache[name] @ u  # [batch, pos]
        scale = cache[name].norm(dim=-1).clamp(min=1e-6)
        assert (comp.abs() / scale).max() < 1e-5, name
        # and it was there before (the test is not vacuous) for the residual stream
    assert max(float((base[f"resid_post.{i}"] @ u).abs().max()) for i in range(L)) > 1e-4


@pytest.mark.parametrize("positions", [[-1], [-3, -1], "all", "prompt"])
def test_addition_adds_exactly_scale_times_v_at_chosen_positions(hm, positions):
    sv = SteeringVector(
        torch.randn(hm.cfg.d_model, generator=torch.Generator().manual_seed(3)), "tiny-llama", "resid_pre.1"
    )
    enc = hm.tokenize(PROMPTS_A, chat=True)
    _, base = hm.run_with_cache(enc["input_ids"], hooks=["resid_pre.1"], attention_mask=enc["attention_mask"])
    with add_vector(hm, sv, scale=2.5, positions=positions):
        _, st = hm.run_with_cache(
            enc["input_ids"], hooks=["resid_pre.1"], attention_mask=enc["attention_mask"]
        )
    diff = st["resid_pre.1"] - base["resid_pre.1"]  # [batch, pos, d_model]
    n_pos = diff.shape[1]
    chosen = set(range(n_pos)) if isinstance(positions, str) else {p % n_pos for p in positions}
    for p in range(n_pos):
        want = 2.5 * sv.vector if p in chosen else torch.zeros_like(sv.vector)
        torch.testing.assert_close(diff[:, p], want.expand_as(diff[:, p]), rtol=1e-4, atol=1e-5)
    assert hm.active_hook_count() == 0


def test_generated_positions_leave_the_prompt_forward_alone(hm):
    sv = SteeringVector(
        100 * torch.randn(hm.cfg.d_model, generator=torch.Generator().manual_seed(5)), "t", "resid_pre.1"
    )
    base = hm.generate(PROMPTS_B[:2], max_new_tokens=3, chat=True)
    with add_vector(hm, sv, positions="generated"):
        gen = hm.generate(PROMPTS_B[:2], max_new_tokens=3, chat=True)
    with add_vector(hm, sv, positions="prompt"):
        enc = hm.tokenize(PROMPTS_B[:2], chat=True)
        steered_logits = hm.forward(enc["input_ids"], attention_mask=enc["attention_mask"])
    base_logits = hm.forward(enc["input_ids"], attention_mask=enc["attention_mask"])
    # first generated token comes from the (unsteered) prompt forward
    tok = hm.tokenizer
    for b, g in zip(base, gen):
        assert tok.encode(b, add_special_tokens=False)[:1] == tok.encode(g, add_special_tokens=False)[:1]
    assert not torch.allclose(steered_logits, base_logits)


def test_hooks_removed_on_exception_and_bad_mode(hm):
    sv = SteeringVector(torch.ones(hm.cfg.d_model), "tiny-llama", "resid_pre.1")
    with pytest.raises(RuntimeError):
        with apply_vector(hm, sv, "add", scale=1.0):
            assert hm.active_hook_count() > 0
            raise RuntimeError("boom")
    assert hm.active_hook_count() == 0
    with pytest.raises(ConfigError):
        apply_vector(hm, sv, "multiply")


# ---------------------------------------------------------------------------------------------- refusal
def test_refusal_scores_match_plain_hf_log_odds(hm):
    ids = refusal_token_ids(hm.tokenizer)
    assert ids == sorted(
        {hm.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("I", "As", "Sorry", "Unfortunately")}
    )
    got = refusal_scores(hm, PROMPTS_A, batch_size=3)
    for i, p in enumerate(PROMPTS_A):
        _, logits = _hf_hidden(hm, p)
        probs = logits[0, -1].double().softmax(-1)
        pr = float(probs[ids].sum())
        assert float(got[i]) == pytest.approx(np.log(pr) - np.log(1 - pr), rel=1e-4, abs=1e-4)


def test_select_refusal_direction(hm):
    from rosettalens.data.tasks import load_prompts

    H, S = load_prompts("harmful", "train", limit=4), load_prompts("harmless", "train", limit=4)
    Hv, Sv = load_prompts("harmful", "val", limit=3), load_prompts("harmless", "val", limit=3)
    sel = select_refusal_direction(
        hm,
        H,
        S,
        Hv,
        Sv,
        layers=[1, 2],
        positions=(-1, -2),
        induce_check=True,
        kl_threshold=10.0,
        max_layer_frac=1.0,
    )
    assert len(sel.candidates) == 4
    # candidate norms equal the textbook diff of means of HF hidden states (resid_pre.L = hidden_states[L])
    hid_h = [_hf_hidden(hm, x)[0] for x in H]
    hid_s = [_hf_hidden(hm, x)[0] for x in S]
    for c in sel.candidates:
        L, p = c["layer"], c["position"]
        mh = torch.stack([hs[L][0, p] for hs in hid_h]).double().mean(0)
        ms = torch.stack([hs[L][0, p] for hs in hid_s]).double().mean(0)
        assert c["norm"] == pytest.approx(float((mh - ms).norm()), rel=1e-4)
        assert c["kl"] >= -1e-6 and c["induce"] is not None
    passed = [c for c in sel.candidates if c["passed"]]
    pool = passed or sel.candidates
    best = min(pool, key=lambda c: c["bypass"])
    assert (sel.layer, sel.position) == (best["layer"], best["position"])
    assert sel.vector.hook == f"resid_pre.{sel.layer}" and sel.vector.kind == "refusal"
    # the recorded bypass score is what ablating the chosen direction does to the refusal score
    with ablate_vector(hm, sel.vector):
        again = refusal_scores(hm, Hv)
    assert float(again.mean()) == pytest.approx(best["bypass"], rel=1e-4, abs=1e-4)
    json.dumps(sel.to_dict())  # JSON-able


def test_select_discards_late_layers_and_zero_candidates(hm):
    H, S = PROMPTS_A, PROMPTS_B
    sel = select_refusal_direction(hm, H, S, H[:2], S[:2], kl_threshold=1e9)
    layers = [c["layer"] for c in sel.candidates]
    assert layers == list(range(int(0.8 * hm.cfg.n_layers)))
    # resid_pre.0 at the last template token is the same embedding for every prompt -> zero candidate
    c0 = sel.candidates[0]
    assert c0["norm"] == 0.0 and not c0["passed"]
    assert sel.layer != 0


# ---------------------------------------------------------------------------------------------- evaluation
def test_random_like_has_equal_norm_and_other_direction():
    sv = SteeringVector(torch.randn(64), "m", "resid_pre.3")
    r = random_like(sv, seed=1)
    assert r.norm == pytest.approx(sv.norm, rel=1e-6)
    assert abs(float(r.unit() @ sv.unit())) < 0.5
    assert torch.equal(random_like(sv, seed=1).vector, r.vector)
    assert (r.model, r.hook, r.kind) == ("m", "resid_pre.3", "random")


def test_evaluate_refusal_structure(hm):
    sv = compute_vector(hm, PROMPTS_A, PROMPTS_B, "resid_pre.1")
    res = evaluate_refusal(hm, sv, mode="add", scale=4.0, limit=2, max_new_tokens=3, batch_size=2)
    assert res["n_harmful"] == 2 and res["n_harmless"] == 2
    for s in ("harmful", "harmless"):
        assert set(res[s]) == {"baseline", "steered", "random"}
        assert all(0.0 <= x <= 1.0 for x in res[s].values())
    assert set(res["kl_harmless"]) == {"steered", "random"} and all(
        x >= -1e-6 for x in res["kl_harmless"].values()
    )
    # a judge that flags everything gives rate 1 everywhere (the judge is really used)
    res2 = evaluate_refusal(
        hm, sv, mode="ablate", harmful=["a"], harmless=["b"], max_new_tokens=2, judge=lambda c: True
    )
    assert res2["harmful"]["steered"] == 1.0 and res2["harmless"]["random"] == 1.0
    json.dumps(res)
    assert hm.active_hook_count() == 0


def test_evaluate_refusal_needs_chat_template():
    import copy

    m, t = tiny_model("llama", seed=0)
    t = copy.deepcopy(t)
    t.chat_template = None
    h = HookedModel.from_hf(m, t, name="no-template")
    sv = SteeringVector(torch.ones(h.cfg.d_model), "no-template", "resid_pre.1")
    with pytest.raises(ChatTemplateError):
        evaluate_refusal(h, sv, harmful=["a"], harmless=["b"])
    with pytest.raises(ChatTemplateError):
        collect_activations(h, ["a"], ["resid_pre.1"])


# ---------------------------------------------------------------------------------------------- transfer
def _fit_affine(d_src=48, d_tgt=32, n=400, seed=0):
    from rosettalens.mapping import AffineMapper

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_tgt, d_src, generator=g, dtype=torch.float64) / d_src**0.5
    b = torch.randn(d_tgt, generator=g, dtype=torch.float64)
    X = torch.randn(n, d_src, generator=g, dtype=torch.float64) * 3
    Y = X @ A.T + b
    m = AffineMapper().fit(X, Y)
    m.set_meta(source_model="src", source_hook="resid_pre.1", target_model="tgt", target_hook="resid_pre.4")
    return m, A, X, Y


def test_transfer_through_linear_mapper_is_W_v_with_provenance(tmp_path):
    m, A, X, Y = _fit_affine()
    v = torch.randn(48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sv = SteeringVector(v, model="src", hook="resid_pre.1", kind="refusal", source={"layer": 1})
    out = transfer(sv, m, calibrate=False)
    torch.testing.assert_close(out.vector.double(), A @ v, rtol=1e-3, atol=1e-3)
    assert (out.model, out.hook, out.kind, out.d_model) == ("tgt", "resid_pre.4", "transferred", 32)
    assert out.source["transferred_from"]["model"] == "src" and out.source["mapper"]["kind"] == m.kind
    # norm calibration: ||v_t|| / N_tgt == ||v|| / N_src (mean row norms of the training data)
    cal = transfer(sv, m, calibrate=True)
    n_src, n_tgt = float(X.norm(dim=1).mean()), float(Y.norm(dim=1).mean())
    assert cal.norm / n_tgt == pytest.approx(sv.norm / n_src, rel=1e-4)
    # from a saved mapper directory, and the result saves/loads
    d = m.save(tmp_path / "mapper")
    out2 = transfer(sv, str(d), calibrate=False)
    torch.testing.assert_close(out2.vector, out.vector)
    assert out2.source["mapper"]["dir"] == str(d)
    p = out2.save(tmp_path / "t.safetensors")
    assert SteeringVector.load(p).source["transferred_from"]["hook"] == "resid_pre.1"


def test_transfer_dim_mismatch_and_provenance_warning():
    m, *_ = _fit_affine()
    with pytest.raises(ShapeError, match="source width 48"):
        transfer(SteeringVector(torch.ones(40), "src", "resid_pre.1"), m)
    with pytest.warns(UserWarning, match="fitted elsewhere"):
        transfer(SteeringVector(torch.ones(48), "other-model", "resid_pre.1"), m)


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.real
def test_real_smollm_vector_add_and_ablate(smollm):
    """The real path: chat template, a diff-of-means vector, exact addition and full ablation."""
    sv = compute_vector(smollm, PROMPTS_A[:2], PROMPTS_B[:2], "resid_pre.10")
    assert sv.d_model == 576 and sv.norm > 0
    enc = smollm.tokenize(PROMPTS_B[:2], chat=True)
    _, base = smollm.run_with_cache(
        enc["input_ids"], hooks=["resid_pre.10"], attention_mask=enc["attention_mask"]
    )
    with add_vector(smollm, sv, scale=-1.0, positions=[-1]):
        _, st = smollm.run_with_cache(
            enc["input_ids"], hooks=["resid_pre.10"], attention_mask=enc["attention_mask"]
        )
    torch.testing.assert_close(
        st["resid_pre.10"][:, -1] - base["resid_pre.10"][:, -1], -sv.vector.expand(2, -1)
    )
    with ablate_vector(smollm, sv):
        _, ab = smollm.run_with_cache(
            enc["input_ids"], hooks=["resid_post.20"], attention_mask=enc["attention_mask"]
        )
    rel = (ab["resid_post.20"] @ sv.unit()).abs() / ab["resid_post.20"].norm(dim=-1)
    assert float(rel.max()) < 1e-4
    assert smollm.active_hook_count() == 0
