"""Permutation tests: +1-corrected p-values, uniform under the null, small for a planted relation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from rosettalens.errors import RosettaError
from rosettalens.similarity import (
    cca,
    jaccard_knn,
    linear_cka,
    metric_names,
    mutual_knn,
    permutation_test,
    procrustes,
    pwcca,
    rbf_cka,
    rsa,
    svcca,
)


def related(n=60, d1=5, d2=7, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1))
    return x, x @ rng.normal(size=(d1, d2)) + noise * rng.normal(size=(n, d2))


FUNCS = {
    "cca": lambda x, y: float(cca(x, y).mean()),
    "svcca": svcca,
    "pwcca": pwcca,
    "linear_cka": linear_cka,
    "rbf_cka": rbf_cka,
    "rsa": rsa,
    "procrustes": lambda x, y: procrustes(x, y).similarity,
    "mutual_knn": mutual_knn,
    "jaccard_knn": jaccard_knn,
}


def test_every_named_metric_has_a_reference_here():
    assert sorted(FUNCS) == metric_names()


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_fast_null_equals_recomputing_the_metric_on_shuffled_rows(name):
    """The precomputed (fast) path must give exactly metric(X, Y[perm]) for every permutation."""
    x, y = related(n=40, seed=1)
    fast = permutation_test(name, x, y, n_permutations=15, seed=3)
    slow = permutation_test(lambda a, b: FUNCS[name](a, b), x, y, n_permutations=15, seed=3)
    np.testing.assert_allclose(fast.null, slow.null, atol=1e-10)
    assert abs(fast.observed - FUNCS[name](x, y)) < 1e-10
    # and the shuffles are of the row pairing: a few nulls recomputed by hand
    rng = np.random.default_rng(3)
    for i in range(3):
        perm = rng.permutation(40)
        assert abs(fast.null[i] - FUNCS[name](x, y[perm])) < 1e-10


def test_result_fields_and_plus_one_correction():
    x, y = related(n=50, seed=2)
    res = permutation_test("linear_cka", x, y, n_permutations=199, seed=0)
    assert res.n_permutations == 199 and res.null.shape == (199,)
    assert res.p_value == pytest.approx((1 + np.sum(res.null >= res.observed)) / 200)
    assert res.null_mean == pytest.approx(res.null.mean()) and res.null_std == pytest.approx(
        res.null.std(ddof=1)
    )
    assert set(res.to_dict()) >= {"observed", "null_mean", "null_std", "p_value"}


@pytest.mark.parametrize("name", ["svcca", "linear_cka", "rsa", "procrustes", "mutual_knn"])
def test_planted_relation_gives_small_p(name):
    x, y = related(n=60, noise=0.3, seed=4)
    res = permutation_test(name, x, y, n_permutations=199, seed=1)
    assert res.p_value < 0.01
    assert res.p_value == pytest.approx(1 / 200)  # never 0: +1 correction
    assert res.observed > res.null_mean + 3 * res.null_std


def test_p_values_uniform_under_the_null():
    """Independent X, Y: p-values of 300 seeded tests are uniform (KS test)."""
    rng = np.random.default_rng(123)
    ps = []
    for rep in range(300):
        x, y = rng.normal(size=(30, 3)), rng.normal(size=(30, 4))
        ps.append(permutation_test("linear_cka", x, y, n_permutations=99, seed=rep).p_value)
    ps = np.array(ps)
    assert scipy.stats.kstest(ps, "uniform").pvalue > 0.01
    assert ps.min() >= 1 / 100
    assert 0.03 < np.mean(ps < 0.1) < 0.2  # about 10% of nulls below 0.1


def test_alternatives_and_custom_metric():
    x, y = related(n=40, seed=5)
    dist = permutation_test(lambda a, b: procrustes(a, b).distance, x, y, 99, seed=0, alternative="less")
    assert dist.p_value == pytest.approx(0.01)
    two = permutation_test("linear_cka", x, y, 99, seed=0, alternative="two-sided")
    assert two.p_value == pytest.approx(0.01)
    # seeds reproduce, torch and numpy inputs agree
    a = permutation_test("svcca", x, y, 20, seed=7)
    b = permutation_test("svcca", torch.from_numpy(x), torch.from_numpy(y), 20, seed=7)
    np.testing.assert_allclose(a.null, b.null, atol=1e-12)
    # metric options pass through
    k3 = permutation_test("mutual_knn", x, y, 5, seed=0, k=3)
    assert abs(k3.observed - mutual_knn(x, y, k=3)) < 1e-12


def test_bad_arguments():
    x, y = related()
    with pytest.raises(RosettaError, match="unknown metric"):
        permutation_test("nope", x, y)
    with pytest.raises(RosettaError):
        permutation_test("svcca", x, y, n_permutations=0)
    with pytest.raises(RosettaError):
        permutation_test("svcca", x, y, alternative="bigger")
