"""Feature matching: planted permutations, textbook correlations, filters, semantic subspaces."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from rosettalens.errors import RosettaError, ShapeError
from rosettalens.similarity import (
    BUILTIN_CATEGORIES,
    is_nonconcept_text,
    match_features,
    paired_rows,
    permutation_test,
    semantic_subspaces,
)


def sparse_codes(n, f, density=0.04, seed=0):
    """SAE-like codes: non-negative, mostly zero."""
    rng = np.random.default_rng(seed)
    return ((rng.random((n, f)) < density) * rng.exponential(1.0, (n, f))).astype(np.float32)


def planted(n=3000, f=120, seed=0, noise=0.05):
    """B is A with its features permuted (b = perm[a]) plus noise on the active entries."""
    rng = np.random.default_rng(seed)
    a = sparse_codes(n, f, seed=seed)
    perm = rng.permutation(f)
    b = np.zeros_like(a)
    b[:, perm] = a * (1 + noise * rng.random(a.shape, dtype=np.float32))
    return a, b, perm


def chunks(x, size):
    for s in range(0, x.shape[0], size):
        yield x[s : s + size]


@pytest.mark.parametrize("method", ["max", "hungarian"])
def test_planted_permutation_recovered_exactly(method):
    a, b, perm = planted()
    for acts_a, acts_b, kw in [
        (a, b, {"chunk_size": 700}),  # numpy, chunk size not dividing n
        (torch.from_numpy(a), torch.from_numpy(b), {}),
        (sp.csr_matrix(a), sp.csr_matrix(b), {"chunk_size": 1000}),
        (torch.from_numpy(a).to_sparse(), torch.from_numpy(b), {}),
        (chunks(a, 512), chunks(b, 512), {}),  # streamed chunks
    ]:
        m = match_features(acts_a, acts_b, method=method, **kw)
        assert len(m) == a.shape[1]
        np.testing.assert_array_equal(m.b, perm[m.a])
        np.testing.assert_array_equal(m.a, np.arange(a.shape[1]))
        assert m.corr.min() > 0.9 and m.n_tokens == a.shape[0]


def test_correlations_match_numpy_corrcoef_dense_and_sparse_paths():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 12)) + 3.0  # dense, non-zero mean
    b = np.c_[a[:, :5] + rng.normal(size=(500, 5)), rng.normal(size=(500, 9))]
    ref = np.corrcoef(a.T, b.T)[:12, 12:]
    m = match_features(a, b, chunk_size=77, return_corr=True)
    np.testing.assert_allclose(m.corr_matrix, ref, atol=1e-10)
    np.testing.assert_array_equal(m.b, ref.argmax(1))
    np.testing.assert_allclose(m.corr, ref.max(1), atol=1e-10)
    s_a, s_b = sparse_codes(800, 30, seed=2), sparse_codes(800, 20, seed=3)
    s_b[:, 0] += s_a[:, 4]
    ms = match_features(sp.csr_matrix(s_a), s_b, chunk_size=300, return_corr=True)  # sparse x dense chunks
    np.testing.assert_allclose(
        ms.corr_matrix, np.corrcoef(s_a.T.astype(np.float64), s_b.T.astype(np.float64))[:30, 30:], atol=1e-10
    )


def test_dead_features_are_never_matched():
    a, b, perm = planted(n=1000, f=20, seed=3)
    a[:, 3] = 0.0  # dead in A
    b[:, perm[7]] = 0.0  # dead in B (its partner is feature 7)
    m = match_features(a, b)
    assert 3 in m.dead_a and perm[7] in m.dead_b
    assert 3 not in m.a and perm[7] not in m.b
    assert np.all(np.isfinite(m.corr))


def test_one_to_one_keeps_the_best_match_not_the_first():
    rng = np.random.default_rng(4)
    n = 4000
    base = rng.normal(size=n)
    b = np.c_[base, rng.normal(size=(n, 3))]
    a = np.c_[
        base + 1.5 * rng.normal(size=n),  # feature 0: weaker match to B0 (listed first)
        base + 0.3 * rng.normal(size=n),  # feature 1: best match to B0
        b[:, 1] + 0.5 * rng.normal(size=n),
    ]
    m = match_features(a, b)
    assert list(m.b) == [0, 0, 1]
    o = match_features(a, b, one_to_one=True)
    assert list(zip(o.a, o.b)) == [(1, 0), (2, 1)]
    assert o.removed == {"one_to_one": 1}
    assert o.corr[0] == pytest.approx(np.corrcoef(a[:, 1], b[:, 0])[0, 1], abs=1e-10)
    thr = match_features(a, b, min_corr=0.8, one_to_one=True)
    assert list(zip(thr.a, thr.b)) == [(1, 0), (2, 1)] and thr.removed["min_corr"] == 1


class FakeTokenizer:
    vocab = {
        0: "<s>",
        1: ",",
        2: " ",
        3: " January",
        4: " river",
        5: "Ġmother",
        6: " joy",
        7: "\n",
        8: " table",
    }
    all_special_ids = [0]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_token_filters_and_semantic_subspaces():
    rng = np.random.default_rng(5)
    n, f = 2000, 8
    tokens = rng.integers(0, 9, size=n)
    # feature j fires on token j (strongly) and weakly at random elsewhere
    a = (tokens[:, None] == np.arange(f)[None, :]) * 5.0 + 0.1 * rng.random((n, f))
    perm = rng.permutation(f)
    b = np.zeros_like(a)
    b[:, perm] = a + 0.1 * rng.random((n, f))
    tok = FakeTokenizer()
    m = match_features(a, b, token_ids_a=tokens, tokenizer_a=tok, top_k=5)
    np.testing.assert_array_equal(m.b, perm[m.a])
    assert m.top_text_a == ["<s>", ",", "", "january", "river", "mother", "joy", "\n".strip()]
    assert m.top_tokens_a.shape == (f, 5) and np.all(m.top_tokens_a[3] == 3)
    kept = match_features(
        a, b, token_ids_a=tokens, tokenizer_a=tok, drop_nonconcept=True, shared_top_token=True
    )
    assert sorted(kept.a.tolist()) == [3, 4, 5, 6]  # BOS, ",", " ", "\n" features dropped
    assert kept.removed["nonconcept"] == 4 and kept.removed["shared_top_token"] == 0
    subs = semantic_subspaces(kept)
    assert set(subs) == set(BUILTIN_CATEGORIES)
    pairs = {k: kept.a[v].tolist() for k, v in subs.items()}
    assert pairs["Month names"] == [3] and pairs["Nature"] == [4] and pairs["People/Roles"] == [5]
    assert pairs["Emotions"] == [6] and pairs["Biology"] == []
    mine = semantic_subspaces(kept, {"Furniture": ["table", "river"]}, side="both")
    assert kept.a[mine["Furniture"]].tolist() == [4]
    sub = kept.subset(subs["Nature"])
    assert len(sub) == 1 and sub.top_text_a == ["river"]


def test_shared_top_token_across_tokenizers_compares_text():
    rng = np.random.default_rng(6)
    n = 1500
    ta = rng.integers(3, 7, size=n)
    a = (ta[:, None] == np.array([3, 4, 5])[None, :]) * 2.0 + 0.01 * rng.random((n, 3))
    # model B's tokenizer has other ids for the same words; its feature 0 fires on "river", 1 on "January"
    dec_b = {30: " January", 40: "river", 50: " mother", 60: " joy"}
    tb = ta * 10
    b = np.c_[a[:, 1], a[:, 0], a[:, 2] * 0 + (tb == 60) * 2.0] + 0.01 * rng.random((n, 3))
    m = match_features(
        a,
        b,
        token_ids_a=ta,
        token_ids_b=tb,
        tokenizer_a=FakeTokenizer(),
        tokenizer_b=dec_b,
        shared_top_token=True,
    )
    assert list(zip(m.a, m.b)) == [(0, 1), (1, 0)]  # feature 2 (mother) vs B2 (joy): different top token
    assert m.top_text_a == m.top_text_b == ["january", "river"]


def test_subspace_similarity_against_random_pairings():
    """Lan et al.: decoder rows of matched features vs the null of randomly re-paired features."""
    rng = np.random.default_rng(7)
    a, b, perm = planted(n=1500, f=60, seed=7)
    m = match_features(a, b)
    w_a = rng.normal(size=(60, 16))
    w_b = np.zeros((60, 24))
    w_b[perm] = w_a @ rng.normal(size=(16, 24))  # B's decoder is a linear image of A's, permuted
    xa, xb = paired_rows(w_a, w_b, m)
    res = permutation_test("svcca", xa, xb, n_permutations=99, seed=0)
    assert res.observed > 0.99 and res.p_value == pytest.approx(0.01)


def test_bad_inputs():
    a, b, _ = planted(n=200, f=10)
    with pytest.raises(ShapeError):
        match_features(a, b[:150])
    with pytest.raises(ShapeError):
        match_features(chunks(a, 50), chunks(b[:150], 50))
    with pytest.raises(RosettaError):
        match_features(a, b, method="greedy")
    with pytest.raises(RosettaError, match="token_ids_a"):
        match_features(a, b, shared_top_token=True)
    bad = a.copy()
    bad[5, 5] = np.nan
    with pytest.raises(RosettaError, match="NaN"):
        match_features(bad, b)
    m = match_features(a, b)
    with pytest.raises(RosettaError, match="top-token"):
        semantic_subspaces(m)


def test_nonconcept_text():
    for t in ["", " ", "\n", ",", "Ġ.", "...", "▁", "—", "\t;"]:
        assert is_nonconcept_text(t)
    for t in [" river", "Ġthe", "42", "東京"]:
        assert not is_nonconcept_text(t)
