"""Similarity metrics between two representations of the same rows.

Every metric takes ``X [n, d1]`` and ``Y [n, d2]`` whose row ``i`` describes the same token (or
stimulus) in both spaces. Inputs may be numpy arrays or torch tensors on any device; all arithmetic
is done in float64 with torch on the device of ``X``. Rows containing NaN/inf raise
:class:`~rosettalens.similarity.errors.NonFiniteError`.

Conventions (stated once, here):

* CCA-family metrics centre each column. Directions whose variance is below ``1e-11 x`` the largest
  (times ``max(n, d)``) are numerically null and dropped.
* ``svcca`` keeps, per input, the fewest principal directions whose squared singular values reach
  ``keep_variance`` of the total, then averages the canonical correlations.
* ``pwcca`` weights the canonical correlations by how much of the *smaller* input (fewer directions)
  each canonical variate accounts for (Morcos et al. 2018), using centred activations.
* CKA bandwidth for the RBF kernel is ``sigma x`` the median distance, as Kornblith et al.'s code:
  the median over all ``n^2`` squared distances (diagonal zeros included), then square-rooted
  (``median="pairs"`` takes pairs i<j only). Debiased CKA uses the unbiased HSIC estimator of Song et
  al. (2012); it may be negative and is never clamped.
* RSA compares the upper triangles (i < j) of the two representational dissimilarity matrices.
"""

from __future__ import annotations

from collections.abc import Callable

from rosettalens.similarity._linalg import Prepared
from rosettalens.similarity.cca import (
    PWCCAResult,
    SVCCAResult,
    cca,
    prepare_cca,
    prepare_pwcca,
    prepare_svcca,
    pwcca,
    svcca,
)
from rosettalens.similarity.cka import MinibatchCKA, linear_cka, prepare_linear_cka, prepare_rbf_cka, rbf_cka
from rosettalens.similarity.knn import jaccard_knn, mutual_knn, prepare_knn
from rosettalens.similarity.procrustes import ProcrustesResult, prepare_procrustes, procrustes
from rosettalens.similarity.rsa import prepare_rsa, rdm, rsa

__all__ = [
    "cca",
    "svcca",
    "pwcca",
    "linear_cka",
    "rbf_cka",
    "MinibatchCKA",
    "rsa",
    "rdm",
    "procrustes",
    "mutual_knn",
    "jaccard_knn",
    "SVCCAResult",
    "PWCCAResult",
    "ProcrustesResult",
]

# name -> (public function, prepare(x, y, **kwargs), minimum rows)
PREPARED: dict[str, tuple[Callable[..., object], Callable[..., Prepared], int]] = {
    "cca": (cca, prepare_cca, 2),
    "svcca": (svcca, prepare_svcca, 2),
    "pwcca": (pwcca, prepare_pwcca, 2),
    "linear_cka": (linear_cka, prepare_linear_cka, 2),
    "rbf_cka": (rbf_cka, prepare_rbf_cka, 2),
    "rsa": (rsa, prepare_rsa, 3),
    "procrustes": (procrustes, prepare_procrustes, 2),
    "mutual_knn": (mutual_knn, prepare_knn, 2),
    "jaccard_knn": (jaccard_knn, lambda x, y, **kw: prepare_knn(x, y, jaccard=True, **kw), 2),
}
