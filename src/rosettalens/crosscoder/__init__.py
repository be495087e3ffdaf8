"""Crosscoders: one sparse code read from two models' paired activations, one decoder per model.

Stable API (used by ``rosetta crosscoder`` and ``rosetta run crosscoder-diff``)::

    from rosettalens.crosscoder import (CrossCoder, CrossCoderConfig, CrossCoderTrainConfig, extract_pairs,
                                        train_crosscoder, evaluate_crosscoder, latent_stats, splice_metrics)

    pairs = extract_pairs(hm_a, hm_b, texts, "resid_post.12", "resid_post.12")   # same or different tokenizers
    cfg = CrossCoderConfig(d_a=pairs.x_a.shape[1], d_b=pairs.x_b.shape[1], width=2048, k=32)  # batchtopk
    cc = train_crosscoder((pairs.x_a, pairs.x_b), cfg, CrossCoderTrainConfig(epochs=5))
    z = cc.encode(x_a, x_b)              # [n, width] from x_a [n, d_a], x_b [n, d_b] (raw activations)
    x_hat_a, x_hat_b = cc.decode(z)      # [n, d_a], [n, d_b]
    evaluate_crosscoder(cc, x_a, x_b)    # {a: {explained_variance, fvu, mse}, b: {...}, l0, dead_fraction}
    latent_stats(cc, x_a, x_b)           # rho, classes, n_shared / n_a_only / n_b_only, cosine, latent scaling
    splice_metrics(cc, hm_a, hm_b, texts)  # {a: {ce_loss_recovered, kl_score, ...}, b: {...}}
    cc.save("out/cc"); CrossCoder.load("out/cc")   # crosscoder.json + crosscoder.safetensors

Pairing is by position with one tokenizer and by character ends with two (:mod:`rosettalens.align`);
the first ``skip_first`` positions of every document and norm outliers are left out of training,
evaluation and splicing (:mod:`rosettalens.crosscoder.data`). Classes of latents by the relative
decoder norm ``rho = ||d_b|| / (||d_a|| + ||d_b||)``: A-only ``rho < 0.1``, B-only ``rho > 0.9``, shared
``0.3 <= rho <= 0.7`` (:mod:`rosettalens.crosscoder.evaluate`). See docs/crosscoder.md.

Errors: mismatched pair counts or widths raise :class:`~rosettalens.errors.ShapeError`; a bad option
:class:`~rosettalens.errors.ConfigError`; a missing or inconsistent folder
:class:`~rosettalens.errors.DataError`.
"""

from rosettalens.crosscoder.data import PairedActivations, extract_pairs, random_init_copy
from rosettalens.crosscoder.evaluate import (
    auroc,
    classify_latents,
    evaluate_crosscoder,
    latent_scaling,
    latent_stats,
    prompt_max_latents,
    splice_metrics,
    summarize,
)
from rosettalens.crosscoder.model import ARCHS, CrossCoder, CrossCoderConfig, load_crosscoder
from rosettalens.crosscoder.train import CrossCoderTrainConfig, train_crosscoder

__all__ = [
    "ARCHS",
    "CrossCoder",
    "CrossCoderConfig",
    "CrossCoderTrainConfig",
    "PairedActivations",
    "auroc",
    "classify_latents",
    "evaluate_crosscoder",
    "extract_pairs",
    "latent_scaling",
    "latent_stats",
    "load_crosscoder",
    "prompt_max_latents",
    "random_init_copy",
    "splice_metrics",
    "summarize",
    "train_crosscoder",
]
