"""Sparse autoencoders: four architectures, a one-pass multi-SAE trainer, evaluation, SAELens/sparsify interop.

Stable API (used by ``rosetta run sae-universality``)::

    from rosettalens.sae import SAE, SAEConfig, TrainConfig, train_saes, train_sae, evaluate_sae, splice_metrics

    cfgs = [SAEConfig(d_in=576, width=4096, arch="topk", k=k) for k in (16, 32, 64)]
    saes = train_saes(store, cfgs, TrainConfig(batch_size=4096), hook="resid_post.12")  # one pass, 3 SAEs
    sae = train_sae(x, SAEConfig(d_in=576, width=4096, arch="jumprelu"))                 # x: [n, d_in]
    z = sae.encode(x)                # [n, width] latents (raw activations in, latents in input units)
    x_hat = sae.decode(z)            # [n, d_in];  sae(x) == sae.decode(sae.encode(x))
    evaluate_sae(sae, x_heldout, positions=pos)  # SAEBench core: fvu, explained_variance, l0, alive_fraction, ...
    splice_metrics(sae, hm, "resid_post.12", texts)  # {ce_loss_score, kl_div_score, ce_*, kl_*, n_tokens}
    best_decoder_cosine(sae_a, sae_b).median()       # agreement of two SAEs (e.g. two seeds)
    keep_mask(acts, attention_mask)  # [batch, pos] bool: the sink rule (first positions, outlier norms)
    sae.save("out/sae"); SAE.load("out/sae")         # SAELens's format; SAE.load also reads sparsify folders
    load_sae("EleutherAI/sae-pythia-70m-32k/layers.3")  # hub id (online), SAELens or sparsify layout

* ``SAEConfig(d_in, width, arch in {"relu", "topk", "batchtopk", "jumprelu"}, k, l1_coeff, l0_coeff,
  jumprelu_bandwidth, jumprelu_init_threshold, aux_coeff, aux_k, lr, seed, model, hook)``.
* ``SAE``: parameters ``W_enc [d_in, width]``, ``b_enc [width]``, ``W_dec [width, d_in]`` (rows unit-norm
  for SAEs trained here; loaded peer SAEs keep their weights), ``b_dec [d_in]``, ``threshold [width]``
  (jumprelu, batchtopk; else ``None``); ``input_scale`` (the input normalisation of training, folded into
  the weights), ``info`` (training record and metrics, saved in ``cfg.json``).
* ``TrainConfig(batch_size, tokens, lr, lr_warmup_steps, lr_decay_frac, ..., seed, device,
  checkpoint_dir, checkpoint_every)``; ``train_saes(data, cfgs, tcfg, hook=, rows=, positions=,
  progress=, on_log=)``: ``data`` an ``ActivationStore`` (an SAE config's own ``hook`` picks its hook
  point, so several layers train from one pass) or a tensor ``[n, d_in]`` (``positions [n]``: each
  row's position in its document, for the sink rule); ``rows`` a ``(start, stop)`` range or an index
  tensor.
* The sink rule (:mod:`rosettalens.sae.sinks`): the first ``skip_first`` positions of each document
  and tokens whose norm exceeds ``norm_ratio`` x the median are left out of training, evaluation and
  splicing; it lives in ``SAEConfig`` (``skip_first``, ``norm_ratio``, ``median_norm``) and is saved
  with the SAE.
* FVU is the fraction of variance unexplained with the variance taken about the mean
  (:mod:`rosettalens.sae.evaluate`).

Errors: a store of another width than ``d_in`` raises :class:`~rosettalens.errors.ShapeError`; ``k >=
width`` or a bad option :class:`~rosettalens.errors.ConfigError`; a missing or inconsistent ``cfg.json``
:class:`~rosettalens.errors.DataError`. See docs/sae.md.
"""

from rosettalens.sae.evaluate import best_decoder_cosine, evaluate_sae, fvu, splice_metrics
from rosettalens.sae.interop import load_sae
from rosettalens.sae.model import ARCHS, SAE, SAEConfig
from rosettalens.sae.sinks import SinkRule, keep_mask, keep_rows, sae_rule
from rosettalens.sae.train import TrainConfig, train_sae, train_saes

__all__ = [
    "ARCHS",
    "SAE",
    "SAEConfig",
    "SinkRule",
    "TrainConfig",
    "best_decoder_cosine",
    "evaluate_sae",
    "fvu",
    "keep_mask",
    "keep_rows",
    "load_sae",
    "sae_rule",
    "splice_metrics",
    "train_sae",
    "train_saes",
]
