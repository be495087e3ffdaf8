"""Representation similarity (SVCCA, PWCCA, CKA, RSA, Procrustes, kNN), permutation nulls, and
SAE feature matching.

All metrics take paired rows ``X [n, d1]``, ``Y [n, d2]`` (numpy or torch, any device) and compute
in float64. See ``docs/similarity.md``.
"""

from rosettalens.similarity.categories import BUILTIN_CATEGORIES
from rosettalens.similarity.errors import BatchSizeError, DegenerateInputError, NonFiniteError
from rosettalens.similarity.matching import (
    FeatureMatch,
    is_nonconcept_text,
    match_features,
    paired_rows,
    semantic_subspaces,
)
from rosettalens.similarity.metrics import (
    MinibatchCKA,
    ProcrustesResult,
    PWCCAResult,
    SVCCAResult,
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
from rosettalens.similarity.permutation import (
    PermutationResult,
    metric_names,
    permutation_test,
    prepare_metric,
)

__all__ = [
    "BUILTIN_CATEGORIES",
    "FeatureMatch",
    "is_nonconcept_text",
    "match_features",
    "paired_rows",
    "semantic_subspaces",
    "BatchSizeError",
    "DegenerateInputError",
    "NonFiniteError",
    "MinibatchCKA",
    "ProcrustesResult",
    "PWCCAResult",
    "SVCCAResult",
    "PermutationResult",
    "cca",
    "jaccard_knn",
    "linear_cka",
    "metric_names",
    "mutual_knn",
    "permutation_test",
    "prepare_metric",
    "procrustes",
    "pwcca",
    "rbf_cka",
    "rdm",
    "rsa",
    "svcca",
]
