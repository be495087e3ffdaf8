"""Steering: contrastive vectors (difference of means, PCA), refusal-direction selection (Arditi et al.
2024), application by addition, directional ablation (gated per prompt) or token erasure, transfer through mappers, refusal judges and
refusal evaluation.

>>> from rosettalens.steering import compute_vector, select_refusal_direction, ablate_vector
>>> sv = compute_vector(hm, harmful, harmless, "resid_pre.10")       # SteeringVector [d_model]
>>> sv.save("refusal.safetensors"); SteeringVector.load("refusal.safetensors", hm=hm)
>>> with ablate_vector(hm, sv): hm.generate(prompts, chat=True)

See docs/steering.md.
"""

from rosettalens.steering.apply import MODES, ablate_vector, add_vector, apply_vector, direction_intervention
from rosettalens.steering.conditional import calibrate_threshold, conditional_ablate, gate_scores
from rosettalens.steering.erase import CleanTokens, erase_tokens, stop_tokens, subtract_tokens, unit_direction
from rosettalens.steering.evaluate import evaluate_refusal, generate_completions, random_like
from rosettalens.steering.judge import (
    REFUSAL_SUBSTRINGS,
    agreement,
    cohen_kappa,
    is_refusal,
    judge_with_model,
    refusal_rate,
)
from rosettalens.steering.refusal import (
    REFUSAL_START_WORDS,
    RefusalSelection,
    kl_divergence,
    last_token_logprobs,
    refusal_scores,
    refusal_token_ids,
    select_refusal_direction,
)
from rosettalens.steering.transfer import transfer
from rosettalens.steering.vectors import (
    SteeringVector,
    SteeringVectorError,
    collect_activations,
    compute_vector,
    compute_vectors,
    cosine,
    diff_of_means,
    pca_direction,
)

__all__ = [
    "MODES",
    "CleanTokens",
    "erase_tokens",
    "stop_tokens",
    "subtract_tokens",
    "REFUSAL_START_WORDS",
    "REFUSAL_SUBSTRINGS",
    "RefusalSelection",
    "SteeringVector",
    "SteeringVectorError",
    "ablate_vector",
    "add_vector",
    "calibrate_threshold",
    "conditional_ablate",
    "gate_scores",
    "agreement",
    "apply_vector",
    "cohen_kappa",
    "collect_activations",
    "compute_vector",
    "compute_vectors",
    "cosine",
    "diff_of_means",
    "direction_intervention",
    "evaluate_refusal",
    "generate_completions",
    "is_refusal",
    "judge_with_model",
    "kl_divergence",
    "last_token_logprobs",
    "pca_direction",
    "random_like",
    "refusal_rate",
    "refusal_scores",
    "refusal_token_ids",
    "select_refusal_direction",
    "transfer",
    "unit_direction",
]
