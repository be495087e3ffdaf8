"""Similarity metrics against the numbers their cited references print on the references' own data.

Each test names where its reference numbers come from. Textbook re-implementations on other data
live in ``test_similarity.py``; here only published outputs count.

References that publish no reproducible number on example data (so they are tested against
textbook formulas in ``test_similarity.py`` instead):

* SVCCA and PWCCA (google/svcca, ``tutorials/001_Introduction.ipynb``): the toy example draws
  ``np.random.randn`` without a seed and prints plots only; the other tutorials read pickled
  activations of trained networks.
* RSA (Kriegeskorte et al. 2008) and mutual kNN (Huh et al. 2024): no seeded example with values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.spatial

from rosettalens.similarity import MinibatchCKA, cca, linear_cka, procrustes, rbf_cka


@pytest.fixture(scope="module")
def kornblith_demo():
    """The data of Kornblith et al.'s demo notebook (google-research/google-research,
    ``representation_similarity/Demo.ipynb``, cell "First, we generate some random data")::

        np.random.seed(1337)
        X = np.random.randn(100, 10)
        Y = np.random.randn(100, 10) + X

    then (cell "Invariance Properties") ``transform = np.random.randn(10, 10)`` from the same stream.
    The legacy global RNG is used on purpose: its stream is what the notebook's numbers came from.
    """
    state = np.random.get_state()
    try:
        np.random.seed(1337)
        x = np.random.randn(100, 10)
        y = np.random.randn(100, 10) + x
        transform = np.random.randn(10, 10)
    finally:
        np.random.set_state(state)
    return x, y, transform


# The notebook prints 5 decimals; a value within 5e-6 of the printed one rounds to it.
PRINTED = 5e-6


def test_data_stream_is_the_notebooks(kornblith_demo):
    # guards the RNG stream itself (numpy's legacy MT19937 after seed(1337)): if these first/last
    # values changed, the notebook's numbers below would no longer be comparable
    x, y, _ = kornblith_demo
    assert x.shape == (100, 10) and y.shape == (100, 10)
    assert x[0, 0] == -0.7031873098624105
    assert y[99, 9] == -0.885086217722774


def test_linear_cka_reproduces_kornblith_demo(kornblith_demo):
    # Demo.ipynb prints "Linear CKA from Examples: 0.55761" and "... from Features: 0.55761"
    x, y, _ = kornblith_demo
    assert abs(linear_cka(x, y) - 0.55761) < PRINTED
    # the Gram path (taken when d > n) too: zero columns change no inner product
    wide = np.pad(x, ((0, 0), (0, 300)))
    assert abs(linear_cka(wide, y) - 0.55761) < PRINTED


def test_debiased_linear_cka_reproduces_kornblith_demo(kornblith_demo):
    # Demo.ipynb prints "Linear CKA from Examples (Debiased): 0.51346" (and the same from features)
    x, y, _ = kornblith_demo
    assert abs(linear_cka(x, y, debiased=True) - 0.51346) < PRINTED
    # MinibatchCKA (Nguyen et al. 2021) over one batch is the same unbiased-HSIC estimator
    mb = MinibatchCKA()
    mb.update(x, y)
    assert abs(mb.compute() - 0.51346) < PRINTED


def test_rbf_cka_reproduces_kornblith_demo(kornblith_demo):
    # Demo.ipynb prints "RBF CKA: 0.65483" for cka(gram_rbf(X, 0.5), gram_rbf(Y, 0.5)), whose
    # bandwidth is 0.5 x sqrt(np.median(sq_distances)) over the whole n x n matrix
    x, y, _ = kornblith_demo
    assert abs(rbf_cka(x, y, sigma=0.5) - 0.65483) < PRINTED
    # the documented alternative (median over pairs i < j) is a different number: 0.65401
    assert abs(rbf_cka(x, y, sigma=0.5, median="pairs") - 0.65401) < PRINTED


def test_cca_against_kornblith_demo(kornblith_demo):
    # Demo.ipynb prints "Mean Squared CCA Correlation: 0.54312", computed by QR of the raw columns
    # (no centring; the demo's data are drawn with mean zero). Our cca centres each column, as CCA is
    # defined and as google/svcca's cca_core does, so on the same data the mean squared correlation
    # is 0.54540; the reference's own formula applied to centred columns gives it too.
    x, y, _ = kornblith_demo
    rho = cca(x, y)
    assert rho.shape == (10,)
    assert abs(float(np.mean(rho**2)) - 0.54540) < PRINTED

    def notebook_formula(a, b):  # || Qa^T Qb ||_F^2 / min(width)
        qa, _ = np.linalg.qr(a)
        qb, _ = np.linalg.qr(b)
        return np.linalg.norm(qa.T @ qb) ** 2 / min(a.shape[1], b.shape[1])

    assert abs(notebook_formula(x, y) - 0.54312) < PRINTED  # the printed number, raw columns
    xc, yc = x - x.mean(0), y - y.mean(0)
    assert abs(float(np.mean(rho**2)) - notebook_formula(xc, yc)) < 1e-12


def test_kornblith_demo_invariances(kornblith_demo):
    # Demo.ipynb, "Invariance Properties": CKA is invariant to an orthogonal transform and to
    # isotropic scaling but not to a general linear one; CCA is invariant to all three
    x, y, transform = kornblith_demo
    _, orthogonal = np.linalg.eigh(transform.T @ transform)
    base = linear_cka(x, y)
    assert abs(linear_cka(x @ orthogonal, y) - base) < 1e-12
    assert not math.isclose(linear_cka(x @ transform, y), base, abs_tol=1e-3)
    assert abs(linear_cka(x * 1.337, y) - base) < 1e-12
    rho = cca(x, y)
    for xt in (x @ orthogonal, x @ transform, x * 1.337):
        assert np.allclose(cca(xt, y), rho, atol=1e-10)


def test_procrustes_reproduces_scipy_docstring_example():
    # scipy.spatial.procrustes docstring: b is a (reflected, scaled, shifted) copy of a, and
    # "round(disparity)" prints 0.0
    a = np.array([[1, 3], [1, 2], [1, 1], [2, 1]], dtype=float)
    b = np.array([[4, -2], [4, -4], [4, -6], [2, -6]], dtype=float)
    res = procrustes(a, b)
    assert abs(res.similarity - 1.0) < 1e-12 and res.distance < 1e-6


def test_procrustes_disparity_matches_scipy():
    # scipy's disparity (sum of squared residuals of unit-norm, centred inputs after the best
    # rotation and scaling) is 1 - similarity^2; an implementation independent of ours
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    y = x @ rng.normal(size=(4, 4)) + 0.5 * rng.normal(size=(50, 4))
    _, _, disparity = scipy.spatial.procrustes(x, y)
    assert abs(disparity - (1.0 - procrustes(x, y).similarity ** 2)) < 1e-10
