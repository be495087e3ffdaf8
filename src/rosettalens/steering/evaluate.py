"""Refusal evaluation of a steering vector with greedy generation, against a random baseline.

:func:`evaluate_refusal` generates greedy completions (chat template) for held-out harmful and
harmless prompts (default: the built-in sets' ``test`` split) under three conditions:

- ``baseline``: the unsteered model;
- ``steered``: the vector applied (``mode="add"`` with ``scale``, or ``mode="ablate"``);
- ``random``: a random direction of equal norm (seeded), applied the same way.

and reports the substring judge's refusal rate for each, plus, on harmless prompts, the mean
KL(unsteered || steered) of the next-token distribution after the prompt (damage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rosettalens.errors import ChatTemplateError, ConfigError, DataError
from rosettalens.steering.apply import MODES, apply_vector
from rosettalens.steering.judge import REFUSAL_SUBSTRINGS, is_refusal
from rosettalens.steering.refusal import kl_divergence, last_token_logprobs
from rosettalens.steering.vectors import SteeringVector, progress_bar

if TYPE_CHECKING:
    from rosettalens.hooks import HookedModel

__all__ = ["evaluate_refusal", "generate_completions", "random_like"]


def random_like(sv: SteeringVector, seed: int = 0) -> SteeringVector:
    """A random direction (isotropic Gaussian, seeded) with the same norm, model and hook as ``sv``."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn(sv.d_model, generator=g, dtype=torch.float64)
    r = r / r.norm() * sv.norm
    return SteeringVector(
        vector=r, model=sv.model, hook=sv.hook, kind="random", source={"seed": int(seed), "norm_of": sv.kind}
    )


@torch.no_grad()
def generate_completions(
    hm: HookedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    chat: bool = True,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions (new text only) for ``prompts``; active steering contexts apply."""
    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts to generate from")
    out: list[str] = []
    bar = progress_bar(len(prompts), desc, progress)
    try:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            out.extend(hm.generate(batch, max_new_tokens=max_new_tokens, chat=chat, do_sample=False))
            bar.update(len(batch))
    finally:
        bar.close()
    return out


def evaluate_refusal(
    hm: HookedModel,
    sv: SteeringVector,
    *,
    mode: str = "ablate",
    scale: float = 1.0,
    positions: Any = "all",
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    random_baseline: bool = True,
    judge: Callable[[str], bool] = is_refusal,
    n_examples: int = 3,
    progress: bool = False,
) -> dict[str, Any]:
    """Refusal rates with and without the vector (and a random one), see the module docstring.

    ``harmful``/``harmless``: prompt texts; default the built-in sets' ``split`` (``limit`` per set,
    balanced over categories). Returns a JSON-able dict::

        {"model", "vector": {...}, "mode", "scale", "n_harmful", "n_harmless", "max_new_tokens",
         "harmful": {"baseline", "steered", "random"}, "harmless": {"baseline", "steered", "random"},
         "kl_harmless": {"steered", "random"}, "examples": {...}, "judge": "substring"}
    """
    from rosettalens.data.tasks import load_prompts

    if mode not in MODES:
        raise ConfigError(f"unknown steering mode {mode!r}; expected 'add' or 'ablate'")
    sv.check_compatible(hm)
    if not hm.has_chat_template():
        raise ChatTemplateError(
            f"{hm.name} has no chat template; the refusal task needs an instruct (chat) model"
        )
    harmful = list(harmful) if harmful is not None else load_prompts("harmful", split, limit=limit)
    harmless = list(harmless) if harmless is not None else load_prompts("harmless", split, limit=limit)
    if not harmful or not harmless:
        raise DataError("refusal evaluation needs at least one harmful and one harmless prompt")
    rnd = random_like(sv, seed=seed) if random_baseline else None

    def ctx(cond: str) -> contextlib.AbstractContextManager:
        if cond == "baseline":
            return contextlib.nullcontext()
        vec = sv if cond == "steered" else rnd
        assert vec is not None
        return apply_vector(hm, vec, mode, scale=scale, positions=positions)

    conds = ["baseline", "steered"] + (["random"] if random_baseline else [])
    res: dict[str, Any] = {
        "model": hm.name,
        "vector": {
            "kind": sv.kind,
            "model": sv.model,
            "hook": sv.hook,
            "d_model": sv.d_model,
            "norm": sv.norm,
        },
        "mode": mode,
        "scale": float(scale) if mode == "add" else None,
        "positions": positions if mode == "add" else None,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "max_new_tokens": max_new_tokens,
        "judge": "substring",
        "judge_substrings": len(REFUSAL_SUBSTRINGS),
        "seed": seed,
        "harmful": {},
        "harmless": {},
        "kl_harmless": {},
        "examples": {},
    }
    base_lp = last_token_logprobs(hm, harmless, batch_size=batch_size)
    for cond in conds:
        for set_name, prompts in (("harmful", harmful), ("harmless", harmless)):
            with ctx(cond):
                comps = generate_completions(
                    hm,
                    prompts,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    progress=progress,
                    desc=f"{cond} / {set_name}",
                )
            flags = [bool(judge(c)) for c in comps]
            res[set_name][cond] = sum(flags) / len(flags)
            res["examples"].setdefault(set_name, {})[cond] = [
                {"prompt": p, "completion": c, "refusal": f}
                for p, c, f in list(zip(prompts, comps, flags))[:n_examples]
            ]
        if cond != "baseline":
            with ctx(cond):
                lp = last_token_logprobs(hm, harmless, batch_size=batch_size)
            res["kl_harmless"][cond] = float(kl_divergence(base_lp, lp).mean())
    return res
