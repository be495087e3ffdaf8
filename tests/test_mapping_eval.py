"""Mapper evaluation: metrics vs textbook formulas; fidelity inside a tiny target vs known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rosettalens.errors import ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.mapping import AffineMapper
from rosettalens.mapping.evaluate import activation_metrics, fidelity, fvu, mean_cosine, r2_per_dim
from rosettalens.mapping.pairs import pair_texts, paired_activations
from rosettalens.models.tiny import tiny_model

HOOK = "resid_post.1"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "January February March April May June",
    "How do I bake bread at home? Sure, here is how you do it.",
    "Activation spaces of different language models can be mapped.",
    "One two three four five six seven eight nine ten.",
    "Café naïve résumé and runs of whitespace.",
    "def main():\n    return 42",
    "Monday Tuesday Wednesday Thursday Friday",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def llama():
    return HookedModel.from_hf(*tiny_model("llama", seed=0), name="tiny-llama")


@pytest.fixture(scope="module")
def qwen():
    return HookedModel.from_hf(*tiny_model("qwen2", seed=1), name="tiny-qwen2")


# ----------------------------------------------------------------------------------- textbook metrics
def test_metrics_match_textbook_formulas():
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(200, 7, generator=g, dtype=torch.float64) * torch.arange(1, 8) + 3
    P = Y + torch.randn(200, 7, generator=g, dtype=torch.float64)
    y, p = Y.numpy(), P.numpy()
    ref_fvu = np.sum((y - p) ** 2) / np.sum((y - y.mean(axis=0)) ** 2)
    assert fvu(P, Y) == pytest.approx(ref_fvu, rel=1e-12)
    per_dim = [
        1 - np.sum((y[:, j] - p[:, j]) ** 2) / np.sum((y[:, j] - y[:, j].mean()) ** 2) for j in range(7)
    ]
    assert r2_per_dim(P, Y) == pytest.approx(np.mean(per_dim), rel=1e-12)
    cos = [np.dot(p[i], y[i]) / np.linalg.norm(p[i]) / np.linalg.norm(y[i]) for i in range(200)]
    assert mean_cosine(P, Y) == pytest.approx(np.mean(cos), rel=1e-12)
    # a planted affine map evaluated on held-out rows: FVU 0, R2 1, cosine 1
    X = torch.randn(300, 5, generator=g, dtype=torch.float64)
    W = torch.randn(4, 5, generator=g, dtype=torch.float64)
    m = AffineMapper().fit(X[:200], X[:200] @ W.T + 1)
    met = activation_metrics(m, X[200:], X[200:] @ W.T + 1)
    assert met["fvu"] < 1e-20 and met["r2"] == pytest.approx(1.0) and met["mean_cosine"] == pytest.approx(1.0)
    assert met["mean_cosine_shuffled"] < 0.99
    assert m.score(X[200:], X[200:] @ W.T + 1) == met
    with pytest.raises(ShapeError):
        activation_metrics(m, X[:10, :3], X[:10, :4])


# ----------------------------------------------------------------------------------- fidelity
def _identity_mapper(hm):
    X, _, _ = paired_activations(hm, hm, TEXTS, HOOK, HOOK, progress=False)
    m = AffineMapper(alpha=0.0).fit(X, X).set_meta(source_hook=HOOK, target_hook=HOOK)
    assert torch.allclose(m.weight, torch.eye(X.shape[1], dtype=torch.float64), atol=1e-10)
    return m


@pytest.mark.parametrize("pairing", ["all", "aligned", "last"])
def test_identity_mapper_has_zero_kl_and_full_loss_recovered(llama, pairing):
    m = _identity_mapper(llama)
    r = fidelity(m, llama, llama, TEXTS, pairing=pairing, n_generate=2, max_new_tokens=4, progress=False)
    assert r["pairing"] == pairing
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["kl_zero_ablation"] > 1e-4  # the ablations do change the output, so the ratio is meaningful
    assert r["loss_zero_ablation"] != pytest.approx(r["loss_clean"], abs=1e-6)
    assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-3)
    assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-3)
    assert r["top1_agreement"] == 1.0
    assert r["generation"]["token_match_rate"] == 1.0
    if pairing == "last":
        assert r["n_patched"] == r["n_texts"] == r["n_positions"]


def test_fidelity_matches_unbatched_reference(llama):
    """KL and loss recovered vs a direct per-text computation (no padding, no batching)."""
    hm = llama
    g = torch.Generator().manual_seed(1)
    X, _, _ = paired_activations(hm, hm, TEXTS, HOOK, HOOK, progress=False)
    shift = 0.5 * X.std() * torch.randn(X.shape[1], generator=g)
    m = AffineMapper(alpha=0.0).fit(X, X + shift).set_meta(source_hook=HOOK, target_hook=HOOK)
    r = fidelity(m, hm, hm, TEXTS, pairing="all", batch_size=3, n_generate=0, progress=False)

    special = set(hm.tokenizer.all_special_ids)
    runs = []
    for text in TEXTS:
        ids = torch.tensor([hm.tokenizer(text)["input_ids"]])
        keep = torch.tensor([t not in special for t in ids[0].tolist()])
        logits, cache = hm.run_with_cache(ids, hooks=[HOOK])
        runs.append((ids, keep, logits[0].log_softmax(-1), cache[HOOK][0]))
    mean_act = torch.cat([act[keep] for _, keep, _, act in runs]).mean(0)

    def patched_logp(ids, keep, new_rows):
        def fn(act, name):
            out = act.clone()
            out[0, keep] = new_rows
            return out

        with hm.patch({HOOK: fn}):
            return hm.forward(ids)[0].log_softmax(-1)

    kl, ce = {"p": [], "z": [], "m": []}, {"c": [], "p": [], "z": [], "m": []}
    for ids, keep, clean, act in runs:
        first = int(keep.nonzero()[0])
        variants = {
            "p": patched_logp(ids, keep, act[keep] + shift),
            "z": patched_logp(ids, keep, torch.zeros_like(act[keep])),
            "m": patched_logp(ids, keep, mean_act.expand(int(keep.sum()), -1)),
        }
        n = ids.shape[1]
        labels = ids[0, first + 1 :]
        ce["c"].append(-clean[first : n - 1].gather(1, labels[:, None]).squeeze(1))
        for k, lp in variants.items():
            kl[k].append((clean[first:].exp() * (clean[first:] - lp[first:])).sum(-1))
            ce[k].append(-lp[first : n - 1].gather(1, labels[:, None]).squeeze(1))
    kl = {k: torch.cat(v).mean().item() for k, v in kl.items()}
    ce = {k: torch.cat(v).mean().item() for k, v in ce.items()}
    assert r["kl"] == pytest.approx(kl["p"], rel=1e-3, abs=1e-7)
    assert r["kl_zero_ablation"] == pytest.approx(kl["z"], rel=1e-3)
    assert r["loss_clean"] == pytest.approx(ce["c"], rel=1e-5)
    assert r["loss_patched"] == pytest.approx(ce["p"], rel=1e-5)
    lr_zero = (ce["z"] - ce["p"]) / (ce["z"] - ce["c"])
    lr_mean = (ce["m"] - ce["p"]) / (ce["m"] - ce["c"])
    assert r["loss_recovered_zero"] == pytest.approx(lr_zero, rel=1e-2, abs=1e-3)
    assert r["loss_recovered_mean"] == pytest.approx(lr_mean, rel=1e-2, abs=1e-3)
    assert r["kl"] > 0


def test_different_tokenizers_pair_aligned_positions(llama, qwen):
    pt = pair_texts(llama.tokenizer, qwen.tokenizer, TEXTS)
    assert pt.pairing == "aligned"  # the llama tokenizer adds BOS, the qwen2 one does not
    for a, b, ps, pq in zip(pt.ids_src, pt.ids_tgt, pt.pos_src, pt.pos_tgt):
        assert len(ps) == len(pq) > 0
        # same byte-level BPE underneath: aligned pairs are the same token
        assert [a[i] for i in ps] == [b[j] for j in pq]
    X, Y, info = paired_activations(llama, qwen, TEXTS, HOOK, HOOK, progress=False)
    m = AffineMapper().fit(X, Y).set_meta(source_hook=HOOK, target_hook=HOOK)
    r = fidelity(m, llama, qwen, TEXTS, pairing="last", n_generate=1, max_new_tokens=3, progress=False)
    assert r["n_patched"] == len(TEXTS) and r["kl"] >= 0 and np.isfinite(r["loss_recovered_zero"])
    assert 0.0 <= r["generation"]["token_match_rate"] <= 1.0


def test_width_mismatch_is_shape_error(llama):
    m = (
        AffineMapper()
        .fit(torch.randn(50, 10), torch.randn(50, 10))
        .set_meta(source_hook=HOOK, target_hook=HOOK)
    )
    with pytest.raises(ShapeError, match="width"):
        fidelity(m, llama, llama, TEXTS, progress=False)
