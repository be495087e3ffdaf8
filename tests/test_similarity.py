"""Similarity metrics against plain textbook numpy/scipy implementations and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from scipy.spatial.distance import pdist, squareform

from rosettalens.errors import RosettaError, ShapeError
from rosettalens.similarity import (
    BatchSizeError,
    DegenerateInputError,
    MinibatchCKA,
    NonFiniteError,
    cca,
    jaccard_knn,
    linear_cka,
    mutual_knn,
    procrustes,
    pwcca,
    rbf_cka,
    rdm,
    rsa,
    svcca,
)

TOL = 1e-10


# ------------------------------------------------------------------------------ textbook references


def tb_center(x):
    return x - x.mean(0)


def tb_inv_sqrt(c):
    w, v = np.linalg.eigh(c)
    return v @ np.diag(1.0 / np.sqrt(w)) @ v.T


def tb_cca(x, y):
    """Canonical correlations: singular values of Sxx^-1/2 Sxy Syy^-1/2 (full-rank inputs)."""
    xc, yc = tb_center(x), tb_center(y)
    n = x.shape[0]
    sxx, syy, sxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    return np.linalg.svd(tb_inv_sqrt(sxx) @ sxy @ tb_inv_sqrt(syy), compute_uv=False)


def tb_svd_keep(x, keep):
    xc = tb_center(x)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(energy >= keep - 1e-12)) + 1  # (rounding: the last entry may be 1 - 1e-16)
    return u[:, :k] * s[:k], k


def tb_svcca(x, y, keep=0.99):
    xr, kx = tb_svd_keep(x, keep)
    yr, ky = tb_svd_keep(y, keep)
    qx, _ = np.linalg.qr(xr)
    qy, _ = np.linalg.qr(yr)
    return float(np.linalg.svd(qx.T @ qy, compute_uv=False).mean()), kx, ky


def tb_pwcca(x, y):
    """Morcos et al. (2018): weights from the canonical variates of the input with fewer neurons."""
    xc, yc = tb_center(x), tb_center(y)
    n = x.shape[0]
    sxx, syy, sxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    ix, iy = tb_inv_sqrt(sxx), tb_inv_sqrt(syy)
    u, rho, vt = np.linalg.svd(ix @ sxy @ iy, full_matrices=False)
    if x.shape[1] <= y.shape[1]:
        variates, acts = xc @ (ix @ u), xc
    else:
        variates, acts = yc @ (iy @ vt.T), yc
    p, _ = np.linalg.qr(variates)
    w = np.abs(p.T @ acts).sum(axis=1)
    w = w / w.sum()
    return float(np.sum(w * rho))


def tb_hsic(k, l):  # noqa: E741
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def tb_hsic_unbiased(k, l):  # noqa: E741
    """Song et al. (2012), eq. 5, with zeroed diagonals."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    t = (
        np.trace(k @ l)
        + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ k @ l @ one)
    )
    return t / (n * (n - 3))


def tb_cka(k, l, debiased=False):  # noqa: E741
    f = tb_hsic_unbiased if debiased else tb_hsic
    return f(k, l) / math.sqrt(f(k, k) * f(l, l))


def tb_rbf(x, sigma, median="all"):
    d2 = squareform(pdist(x, "sqeuclidean"))
    # "all": median of the whole n x n matrix, diagonal zeros included (Kornblith et al.'s code)
    med = np.median(d2) if median == "all" else np.median(pdist(x, "sqeuclidean"))
    return np.exp(-d2 / (2 * sigma**2 * med))


def rand(n, d, seed):
    return np.random.default_rng(seed).normal(size=(n, d))


def related(n=300, d1=12, d2=20, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1))
    y = x @ rng.normal(size=(d1, d2)) + noise * rng.normal(size=(n, d2))
    return x, y


def orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ------------------------------------------------------------------------------ CCA family


def test_cca_matches_textbook_and_is_invariant_to_invertible_maps():
    x, y = related()
    rho = cca(x, y)
    np.testing.assert_allclose(rho, tb_cca(x, y)[: rho.size], atol=TOL)
    assert rho.size == 12 and np.all(np.diff(rho) <= 1e-12)
    a = np.random.default_rng(5).normal(size=(12, 12)) + 3 * np.eye(12)  # invertible, not orthogonal
    b = np.random.default_rng(6).normal(size=(20, 20)) + 3 * np.eye(20)
    np.testing.assert_allclose(cca(x @ a + 7.0, y @ b - 2.0), rho, atol=1e-9)


def test_svcca_matches_textbook_on_random_data():
    x, y = related(n=400, d1=30, d2=45, noise=2.0, seed=1)
    for keep in (0.5, 0.9, 0.99, 1.0):
        ref, kx, ky = tb_svcca(x, y, keep)
        res = svcca(x, y, keep_variance=keep, return_details=True)
        assert abs(res.value - ref) < TOL
        assert (res.dims_x, res.dims_y) == (kx, ky)


def test_svcca_invariance():
    x, y = related(seed=2)
    a = np.random.default_rng(7).normal(size=(12, 12)) + 3 * np.eye(12)
    # keep_variance=1: SVCCA is CCA, invariant to any invertible map
    assert abs(svcca(x @ a, y, keep_variance=1.0) - svcca(x, y, keep_variance=1.0)) < 1e-9
    # default truncation: invariant to rotation, isotropic scaling and translation
    q = orthogonal(12, 3)
    assert abs(svcca(5.0 * x @ q + 1.0, y) - svcca(x, y)) < 1e-9


def test_svcca_keeps_right_number_of_directions_when_total_variance_is_large():
    """Planted spectrum: 5 directions with variance 1e6, 45 with 1 -> 99% needs exactly 5 directions."""
    rng = np.random.default_rng(0)
    n, d = 500, 50
    u, _ = np.linalg.qr(tb_center(rng.normal(size=(n, d))))
    v = orthogonal(d, 1)
    s = np.sqrt(np.r_[np.full(5, 1e6), np.ones(45)])
    x = (u * s) @ v.T
    y = rng.normal(size=(n, 8))
    res = svcca(x, y, keep_variance=0.99, return_details=True)
    assert res.dims_x == 5
    assert res.dims_x == tb_svd_keep(x, 0.99)[1]
    big = svcca(x * 1e3, y, keep_variance=0.99, return_details=True)  # total variance even larger
    assert big.dims_x == 5 and abs(big.value - res.value) < 1e-9


@pytest.mark.parametrize("d1,d2", [(6, 25), (25, 6), (10, 10)])
def test_pwcca_matches_textbook_either_input_wider(d1, d2):
    x, y = related(n=400, d1=d1, d2=d2, noise=1.5, seed=4)
    res = pwcca(x, y, return_details=True)
    assert abs(res.value - tb_pwcca(x, y)) < 1e-9
    assert abs(res.weights.sum() - 1) < 1e-12 and np.all(res.weights >= 0)
    assert res.weighted_side == ("X" if d1 <= d2 else "Y")
    if d1 != d2:  # the narrower input is weighted whichever argument it is
        assert abs(pwcca(y, x) - res.value) < 1e-9


# ------------------------------------------------------------------------------ CKA


@pytest.mark.parametrize("n,d1,d2", [(200, 10, 15), (20, 80, 60)])  # feature-space path, Gram path
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_textbook_on_both_paths(n, d1, d2, debiased):
    x, y = related(n=n, d1=d1, d2=d2, noise=3.0, seed=n)
    ref = tb_cka(x @ x.T, y @ y.T, debiased)
    assert abs(linear_cka(x, y, debiased=debiased) - ref) < TOL


@pytest.mark.parametrize("median", ["all", "pairs"])
@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_cka_matches_textbook(debiased, median):
    # n = 60 (even number of pairs and of entries) and n = 61 (odd): both median branches
    for n in (60, 61):
        x, y = related(n=n, d1=5, d2=9, noise=1.0, seed=8)
        for sigma in (0.5, 1.0):
            ref = tb_cka(tb_rbf(x, sigma, median), tb_rbf(y, sigma, median), debiased)
            assert abs(rbf_cka(x, y, sigma=sigma, debiased=debiased, median=median) - ref) < TOL


def test_rbf_cka_default_median_includes_the_diagonal():
    x, y = related(n=40, d1=5, d2=9, noise=1.0, seed=3)
    assert rbf_cka(x, y) == rbf_cka(x, y, median="all")
    assert abs(rbf_cka(x, y) - rbf_cka(x, y, median="pairs")) > 1e-6  # the two choices differ
    with pytest.raises(RosettaError, match="median"):
        rbf_cka(x, y, median="upper")


def test_cka_of_identical_inputs_is_one():
    x = rand(50, 7, 0)
    for f in (linear_cka, rbf_cka):
        for deb in (False, True):
            assert abs(f(x, x, debiased=deb) - 1.0) < 1e-12


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, y = related(n=120, d1=9, d2=9, seed=9)
    q = orthogonal(9, 10)
    for f in (linear_cka, rbf_cka):
        for deb in (False, True):
            base = f(x, y, debiased=deb)
            assert abs(f(x @ q * 3.7, y, debiased=deb) - base) < 1e-10
            assert abs(f(x, 0.01 * y @ q.T, debiased=deb) - base) < 1e-10


def test_debiased_cka_near_zero_on_independent_data_where_biased_is_not():
    pairs = [(rand(100, 500, s), rand(100, 600, s + 100)) for s in range(8)]  # independent, d >> n
    biased = [linear_cka(x, y) for x, y in pairs]
    debiased = [linear_cka(x, y, debiased=True) for x, y in pairs]
    assert min(biased) > 0.5  # the biased estimator is far from 0 here
    assert max(abs(v) for v in debiased) < 0.1 and abs(np.mean(debiased)) < 0.03
    assert min(debiased) < 0  # negative estimates are reported, never clamped


def test_minibatch_cka():
    x, y = related(n=512, d1=16, d2=24, noise=2.0, seed=11)
    one = MinibatchCKA()
    one.update(x, y)
    assert abs(one.compute() - linear_cka(x, y, debiased=True)) < TOL  # single batch = debiased CKA
    mb = MinibatchCKA()
    for s in range(0, 512, 64):
        mb.update(torch.from_numpy(x[s : s + 64]), y[s : s + 64])
    hs = [
        (tb_hsic_unbiased(kx, ly), tb_hsic_unbiased(kx, kx), tb_hsic_unbiased(ly, ly))
        for kx, ly in (
            (x[s : s + 64] @ x[s : s + 64].T, y[s : s + 64] @ y[s : s + 64].T) for s in range(0, 512, 64)
        )
    ]
    xy, xx, yy = (sum(h[i] for h in hs) for i in range(3))
    assert abs(mb.compute() - xy / math.sqrt(xx * yy)) < TOL
    assert mb.n_batches == 8 and mb.n_rows == 512
    with pytest.raises(BatchSizeError, match="at least|>= 4"):
        mb.update(x[:3], y[:3])
    with pytest.raises(BatchSizeError):
        MinibatchCKA().compute()
    with pytest.raises(ShapeError):
        mb.update(x[:10, :5], y[:10])


# ------------------------------------------------------------------------------ RSA, Procrustes, kNN


@pytest.mark.parametrize("inner", ["correlation", "cosine", "euclidean", "sqeuclidean"])
def test_rdm_matches_scipy_pdist(inner):
    x = rand(30, 6, 2)
    np.testing.assert_allclose(rdm(x, inner), squareform(pdist(x, inner)), atol=1e-10)


@pytest.mark.parametrize(
    "outer,ref",
    [
        ("spearman", lambda a, b: scipy.stats.spearmanr(a, b).statistic),
        ("pearson", lambda a, b: scipy.stats.pearsonr(a, b).statistic),
        ("kendall", lambda a, b: scipy.stats.kendalltau(a, b).statistic),
    ],
)
def test_rsa_matches_textbook(outer, ref):
    x, y = related(n=80, d1=6, d2=9, noise=2.0, seed=12)
    expect = ref(pdist(x, "correlation"), pdist(y, "correlation"))
    assert abs(rsa(x, y, outer=outer) - expect) < TOL


def test_rsa_spearman_averages_tied_ranks():
    x = np.repeat(rand(10, 4, 3), 3, axis=0)  # duplicated rows: many tied (zero) distances
    y = x + 0.1 * rand(30, 4, 4)
    expect = scipy.stats.spearmanr(pdist(x, "euclidean"), pdist(y, "euclidean")).statistic
    assert abs(rsa(x, y, inner="euclidean") - expect) < TOL


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(0).normal(size=3000),  # distinct values
        np.round(np.random.default_rng(1).normal(size=3000), 2),  # many ties
        # values closer than the sort key's quantisation step (set by the 1e10 outlier), with ties
        np.r_[0.5 + 1e-9 * np.random.default_rng(2).integers(0, 50, size=2000), 1e10, -3.0],
        np.r_[np.zeros(10), 1e-300, 5e-324],  # a range too small to quantise: the argsort fallback
        np.ones(5),
    ],
    ids=["distinct", "ties", "below-quantisation", "denormal-range", "constant"],
)
def test_rank_average_matches_scipy_rankdata(values):
    from rosettalens.similarity.rsa import rank_average

    np.testing.assert_array_equal(
        rank_average(torch.from_numpy(values)).numpy(), scipy.stats.rankdata(values)
    )


def test_procrustes_matches_scipy_and_is_not_invariant_to_general_linear_maps():
    x, y = related(n=100, d1=6, d2=9, noise=1.0, seed=13)

    def prep(m, width):
        m = tb_center(m)
        m = m / np.linalg.norm(m)
        return np.pad(m, ((0, 0), (0, width - m.shape[1])))

    xp, yp = prep(x, 9), prep(y, 9)  # zero-pad X to Y's width
    r, scale = scipy.linalg.orthogonal_procrustes(xp, yp)
    res = procrustes(x, y)
    assert abs(res.similarity - scale) < TOL
    assert abs(res.distance - np.linalg.norm(xp @ r - yp)) < 1e-9
    assert abs(res.angular_distance - math.acos(scale)) < 1e-9
    q = orthogonal(6, 14)
    same = procrustes(x, 2.5 * x @ q + 4.0)
    assert abs(same.similarity - 1) < 1e-10 and same.distance < 1e-5
    a = np.diag([10.0, 5.0, 1.0, 1.0, 0.2, 0.1]) @ orthogonal(6, 15)  # invertible, far from orthogonal
    warped = procrustes(x, x @ a)
    assert warped.similarity < 0.9 and warped.distance > 0.3
    assert abs(linear_cka(x, x @ orthogonal(6, 16)) - 1) < 1e-10  # (CKA would call those equal)


def tb_knn_sets(x, k):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k]) for row in s]


def test_mutual_and_jaccard_knn_match_brute_force():
    x, y = related(n=150, d1=8, d2=12, noise=2.0, seed=17)
    for k in (1, 5, 10):
        ax, ay = tb_knn_sets(x, k), tb_knn_sets(y, k)
        inter = np.array([len(a & b) for a, b in zip(ax, ay)])
        assert abs(mutual_knn(x, y, k=k) - inter.mean() / k) < 1e-12
        assert abs(jaccard_knn(x, y, k=k) - np.mean(inter / (2 * k - inter))) < 1e-12
    assert mutual_knn(x, x @ orthogonal(8, 1) * 2, k=5) == 1.0


def test_knn_ties_are_deterministic():
    x = np.repeat(rand(20, 3, 0), 4, axis=0)  # every row has 3 exact duplicates: ties at distance 0
    assert mutual_knn(x, x, k=5) == 1.0
    assert mutual_knn(x, x.copy(), k=5, metric="euclidean") == 1.0


# ------------------------------------------------------------------------------ input handling


def test_torch_and_float32_inputs_computed_in_float64():
    x, y = related(n=200, d1=10, d2=10, seed=18)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    expect = tb_cka(
        x32.astype(np.float64) @ x32.astype(np.float64).T, y32.astype(np.float64) @ y32.astype(np.float64).T
    )
    assert abs(linear_cka(torch.from_numpy(x32), torch.from_numpy(y32)) - expect) < TOL
    assert abs(svcca(torch.from_numpy(x), y) - svcca(x, y)) < 1e-12
    assert abs(rsa(torch.from_numpy(x).float(), y32) - rsa(x32, y32)) < 1e-12


@pytest.mark.parametrize("metric", [cca, svcca, pwcca, linear_cka, rbf_cka, rsa, procrustes, mutual_knn])
def test_nonfinite_rows_rejected(metric):
    x, y = related(n=50, d1=4, d2=4, seed=19)
    for bad in (np.nan, np.inf):
        xb = x.copy()
        xb[7, 2] = bad
        with pytest.raises(NonFiniteError, match="row") as ei:
            metric(xb, y)
        assert isinstance(ei.value, RosettaError)
        with pytest.raises(NonFiniteError):
            metric(x, torch.from_numpy(xb))


def test_bad_shapes_and_degenerate_inputs():
    x = rand(20, 3, 0)
    with pytest.raises(ShapeError, match="paired rows"):
        linear_cka(x, x[:10])
    with pytest.raises(ShapeError, match="2-D"):
        svcca(x[:, 0], x)
    with pytest.raises(DegenerateInputError):
        linear_cka(np.ones((20, 3)), x)
    with pytest.raises(DegenerateInputError):
        svcca(np.ones((20, 3)), x)
    with pytest.raises(BatchSizeError):
        linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(RosettaError):
        svcca(x, x, keep_variance=1.5)
    with pytest.raises(RosettaError):
        mutual_knn(x, x, k=20)


def test_cca_warns_when_directions_outnumber_rows():
    with pytest.warns(RuntimeWarning, match="trivially"):
        cca(rand(10, 6, 0), rand(10, 6, 1))
