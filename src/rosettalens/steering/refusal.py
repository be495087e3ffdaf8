"""Refusal-direction selection as in Arditi et al. 2024 ("Refusal in language models is mediated by a
single direction").

1. Candidates: for every layer ``L`` (and every requested position offset ``-k`` of the prompt's end,
   default only the last token), ``r = mean(harmful) - mean(harmless)`` of ``resid_pre.L`` over the
   *train* prompts, chat-formatted.
2. Each candidate is scored on *validation* prompts without generating text:

   - ``bypass``: mean refusal score of harmful prompts with the candidate's unit direction ablated at
     every layer (``hm.ablate``: ``resid_pre``, ``attn_out``, ``mlp_out``) -- lower is better;
   - ``kl``: mean KL(unsteered || ablated) of the next-token distribution at the last position of
     harmless prompts -- must be below ``kl_threshold`` (default 0.1, Arditi's bound);
   - ``induce`` (optional, ``induce_check=True``): mean refusal score of harmless prompts with ``r``
     added at ``resid_pre.L`` at every position -- must be above 0;
   - layers at or beyond ``max_layer_frac * n_layers`` are discarded (Arditi: 0.8).

3. The candidate with the lowest ``bypass`` among those that pass the filters is chosen (if none
   passes, the lowest ``bypass`` overall, with ``passed_filters=False``).

The refusal score of a prompt is the log-odds ``log p - log(1 - p)`` where ``p`` is the summed
next-token probability, at the first generated position, of the first tokens of
:data:`REFUSAL_START_WORDS` ("I", "As", "Sorry", "Unfortunately"). It needs one forward pass, no
generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rosettalens.errors import ConfigError, DataError
from rosettalens.names import hook_name, parse_hook_name
from rosettalens.steering.vectors import SteeringVector, collect_activations, diff_of_means, progress_bar

if TYPE_CHECKING:
    from rosettalens.hooks import HookedModel

__all__ = [
    "REFUSAL_START_WORDS",
    "RefusalSelection",
    "kl_divergence",
    "last_token_logprobs",
    "refusal_scores",
    "refusal_token_ids",
    "select_refusal_direction",
]

REFUSAL_START_WORDS: tuple[str, ...] = ("I", "As", "Sorry", "Unfortunately")


def refusal_token_ids(tokenizer: Any, words: Sequence[str] = REFUSAL_START_WORDS) -> list[int]:
    """First token id of each word (as it starts an assistant turn: no leading space), deduplicated."""
    ids: set[int] = set()
    for w in words:
        toks = tokenizer.encode(w, add_special_tokens=False)
        if toks:
            ids.add(int(toks[0]))
    if not ids:
        raise ConfigError(f"none of the refusal words {list(words)} tokenizes to a token")
    return sorted(ids)


@torch.no_grad()
def last_token_logprobs(
    hm: HookedModel, prompts: Sequence[str], *, chat: bool = True, batch_size: int = 16
) -> Tensor:
    """Log-softmax of the next-token logits after each prompt ``[n, vocab]`` (float32, CPU).

    Active intervention contexts on ``hm`` (ablate / steer / patch) apply.
    """
    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts to score")
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = hm.tokenize(prompts[i : i + batch_size], chat=chat)
        logits, _ = hm.run_with_cache(enc["input_ids"], hooks=[], attention_mask=enc["attention_mask"])
        assert logits is not None
        out.append(logits[:, -1, :].double().log_softmax(-1).float().cpu())
    return torch.cat(out, 0)


def _log_odds(logprobs: Tensor, token_ids: Sequence[int]) -> Tensor:
    """``log p - log(1-p)`` with ``p`` the total probability of ``token_ids``; ``[n, vocab] -> [n]``."""
    lp = logprobs.double()
    log_p = torch.logsumexp(lp[:, list(token_ids)], -1)
    p = log_p.exp().clamp(max=1 - 1e-12)
    return (log_p - torch.log1p(-p)).float()


def refusal_scores(
    hm: HookedModel,
    prompts: Sequence[str],
    *,
    token_ids: Sequence[int] | None = None,
    chat: bool = True,
    batch_size: int = 16,
) -> Tensor:
    """Refusal log-odds at the first generated position for each prompt ``[n]`` (see module doc)."""
    ids = token_ids if token_ids is not None else refusal_token_ids(hm.tokenizer)
    return _log_odds(last_token_logprobs(hm, prompts, chat=chat, batch_size=batch_size), ids)


def kl_divergence(base: Tensor, new: Tensor) -> Tensor:
    """KL(base || new) per row of two log-probability matrices ``[n, vocab]`` -> ``[n]`` (float32)."""
    b, n = base.double(), new.double()
    return (b.exp() * (b - n)).sum(-1).float()


@dataclass
class RefusalSelection:
    """Result of :func:`select_refusal_direction`.

    vector: the chosen raw diff-of-means at ``resid_pre.{layer}`` (kind ``"refusal"``);
    candidates: one dict per (layer, position) with ``bypass``, ``kl``, ``induce``, ``norm``,
    ``passed``; baselines: unsteered mean refusal scores on the validation prompts.
    """

    vector: SteeringVector
    layer: int
    position: int
    candidates: list[dict[str, Any]]
    baseline_harmful_score: float
    baseline_harmless_score: float
    passed_filters: bool = True
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "position": self.position,
            "hook": self.vector.hook,
            "norm": self.vector.norm,
            "passed_filters": self.passed_filters,
            "baseline_harmful_score": self.baseline_harmful_score,
            "baseline_harmless_score": self.baseline_harmless_score,
            "candidates": self.candidates,
            "settings": self.settings,
        }


def select_refusal_direction(
    hm: HookedModel,
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] = (-1,),
    kl_threshold: float = 0.1,
    induce_check: bool = False,
    max_layer_frac: float = 0.8,
    batch_size: int = 16,
    progress: bool = False,
    source: dict[str, Any] | None = None,
) -> RefusalSelection:
    """Choose the refusal direction of ``hm`` (Arditi et al. 2024; see the module docstring).

    layers: candidate layers (default every layer below ``max_layer_frac * n_layers``);
    positions: negative offsets of prompt positions for candidates (default ``(-1,)``: last token).
    """
    n_layers = int(hm.cfg.n_layers)
    if layers is None:
        cut = max(1, int(max_layer_frac * n_layers))
        layers = list(range(cut))
    layers = [int(parse_hook_name(hm.resolve_hook(hook_name("resid_pre", L)))[1] or 0) for L in layers]
    positions = [int(p) for p in positions]
    if not layers or not positions:
        raise ConfigError("need at least one candidate layer and position")
    for name, s in (
        ("harmful_train", harmful_train),
        ("harmless_train", harmless_train),
        ("harmful_val", harmful_val),
        ("harmless_val", harmless_val),
    ):
        if not len(s):
            raise DataError(f"{name} is empty")
    hooks = [hook_name("resid_pre", L) for L in layers]
    kw: dict[str, Any] = dict(positions=positions, batch_size=batch_size, progress=progress)
    acts_h = collect_activations(hm, harmful_train, hooks, desc="harmful train", **kw)  # [n, k, d]
    acts_s = collect_activations(hm, harmless_train, hooks, desc="harmless train", **kw)
    tok_ids = refusal_token_ids(hm.tokenizer)
    base_harmful = _log_odds(last_token_logprobs(hm, harmful_val, batch_size=batch_size), tok_ids)
    base_harmless_lp = last_token_logprobs(hm, harmless_val, batch_size=batch_size)
    base_harmless = _log_odds(base_harmless_lp, tok_ids)

    candidates: list[dict[str, Any]] = []
    vectors: dict[tuple[int, int], Tensor] = {}
    bar = progress_bar(len(layers) * len(positions), "refusal candidates", progress)
    try:
        for L, hook in zip(layers, hooks):
            name = hm.resolve_hook(hook)
            for j, pos in enumerate(positions):
                r = diff_of_means(acts_h[name][:, j], acts_s[name][:, j])  # [d_model]
                vectors[(L, pos)] = r
                if not bool(r.norm() > 0):  # e.g. resid_pre.0 at a template token: identical embeddings
                    candidates.append(
                        dict(layer=L, position=pos, norm=0.0, bypass=None, kl=None, induce=None, passed=False)
                    )
                    bar.update(1)
                    continue
                unit = (r / r.norm()).float()
                with hm.ablate(unit):
                    bypass = _log_odds(last_token_logprobs(hm, harmful_val, batch_size=batch_size), tok_ids)
                    abl_lp = last_token_logprobs(hm, harmless_val, batch_size=batch_size)
                kl = kl_divergence(base_harmless_lp, abl_lp)
                cand: dict[str, Any] = {
                    "layer": L,
                    "position": pos,
                    "norm": float(r.norm()),
                    "bypass": float(bypass.mean()),
                    "kl": float(kl.mean()),
                    "induce": None,
                }
                if induce_check:
                    with hm.steer(name, r.float(), scale=1.0, positions="all"):
                        induce = _log_odds(
                            last_token_logprobs(hm, harmless_val, batch_size=batch_size), tok_ids
                        )
                    cand["induce"] = float(induce.mean())
                cand["passed"] = bool(
                    cand["kl"] < kl_threshold
                    and L < max_layer_frac * n_layers
                    and (cand["induce"] is None or cand["induce"] > 0)
                )
                candidates.append(cand)
                bar.update(1)
    finally:
        bar.close()
    passing = [c for c in candidates if c["passed"]]
    pool = passing or [c for c in candidates if c["bypass"] is not None]
    if not pool:
        raise DataError(
            "every candidate refusal direction is zero: harmful and harmless activations coincide"
        )
    best = min(pool, key=lambda c: c["bypass"])
    L, pos = best["layer"], best["position"]
    settings = {
        "layers": layers,
        "positions": positions,
        "kl_threshold": kl_threshold,
        "induce_check": induce_check,
        "max_layer_frac": max_layer_frac,
        "refusal_token_ids": tok_ids,
        "n_harmful_train": len(harmful_train),
        "n_harmless_train": len(harmless_train),
        "n_harmful_val": len(harmful_val),
        "n_harmless_val": len(harmless_val),
    }
    sv = SteeringVector(
        vector=vectors[(L, pos)],
        model=hm.name,
        hook=hook_name("resid_pre", L),
        kind="refusal",
        source={
            **(source or {}),
            "method": "diff_of_means",
            "selection": "arditi2024",
            "positions": pos,
            "chat": True,
            "layer": L,
            "bypass": best["bypass"],
            "kl": best["kl"],
            "induce": best["induce"],
            "baseline_harmful_score": float(base_harmful.mean()),
            "passed_filters": bool(passing),
            **settings,
        },
    )
    return RefusalSelection(
        vector=sv,
        layer=L,
        position=pos,
        candidates=candidates,
        baseline_harmful_score=float(base_harmful.mean()),
        baseline_harmless_score=float(base_harmless.mean()),
        passed_filters=bool(passing),
        settings=settings,
    )
