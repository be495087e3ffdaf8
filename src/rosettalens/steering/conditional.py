"""Conditional directional ablation: remove a direction only from the rows (prompts) that carry it.

Ablating a backdoor direction from every prompt (``hm.ablate``) also moves clean prompts, and on some
models every direction that reaches the backdoor breaks the model that way (docs/backdoor.md: Qwen
0.5B). A trigger is a property of the *prompt*, so the intervention can be made conditional, as
conditional activation steering does (Lee et al. 2024, "Programming Refusal with Conditional
Activation Steering"): a detector reads the prompt, and only the rows it flags are ablated.

``conditional_ablate(hm, direction, layer, threshold)``:

- **detect**: on the prompt's forward pass (no KV cache yet), at ``resid_pre.{layer}``, each row's
  score is the projection of its activation on the unit direction, pooled over positions:
  ``pool="max"`` the largest over the real (unpadded) positions (a trigger shows up at its own
  tokens, wherever it sits: for directions read at the trigger's tokens), ``pool="last"`` the last
  prompt token's (for directions read there). A row is flagged when its score exceeds ``threshold``;
  the flags hold for the generated tokens of that batch.
- **ablate**: in flagged rows only, the direction is projected out of ``resid_pre``, ``attn_out`` and
  ``mlp_out`` of layer ``layer`` and every later layer (every position). Earlier layers run before
  the detector has read the prompt, so they are left alone, also for generated tokens (the same
  intervention on every forward pass). Unflagged rows are untouched: bit for bit the unsteered model.

``calibrate_threshold`` sets the threshold from prompts *without* the trigger only (the largest score
among them times ``margin``), so no triggered example of the target is needed to place it;
``gate_scores`` gives the scores themselves (to report how many held-out prompts are flagged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rosettalens.errors import ConfigError
from rosettalens.names import hook_name, parse_hook_name

if TYPE_CHECKING:
    from rosettalens.hooks import HookedModel

__all__ = ["POOLS", "Gate", "calibrate_threshold", "conditional_ablate", "gate_scores"]

POOLS = ("max", "last")


def _layer(hm: HookedModel, layer: int) -> int:
    return int(
        parse_hook_name(hm.resolve_hook(hook_name("resid_pre", layer)))[1] or 0
    )  # HookPointError: bad layer


def _pool(pool: str) -> str:
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return pool


def _scores(act: Tensor, unit: Tensor, mask: Tensor | None, pool: str) -> Tensor:
    """``[batch]``: the projection on ``unit`` at the last position (left padding: always a real
    token) or the largest over the unpadded positions."""
    proj = act.double() @ unit.to(device=act.device)
    if pool == "last":
        return proj[:, -1]
    if mask is not None and mask.shape == proj.shape:
        proj = proj.masked_fill(mask.to(proj.device) == 0, float("-inf"))
    return proj.max(dim=1).values


@torch.no_grad()
def gate_scores(
    hm: HookedModel,
    texts: Sequence[str],
    direction: Tensor,
    layer: int,
    *,
    pool: str = "max",
    chat: bool = False,
    batch_size: int = 16,
) -> Tensor:
    """``[n]`` (float64, CPU): each text's detector score, the projection of its ``resid_pre.{layer}``
    activation on the unit ``direction`` pooled over positions (``pool``: max | last; the score
    :func:`conditional_ablate` thresholds). ``chat``: format each text as one user turn."""
    _pool(pool)
    texts = list(texts)
    if not texts:
        raise ConfigError("no texts to score")
    unit = hm.unit_direction(direction)
    hook = hook_name("resid_pre", _layer(hm, layer))
    out = []
    for i in range(0, len(texts), batch_size):
        enc = hm.tokenize(texts[i : i + batch_size], chat=chat)
        _, cache = hm.run_with_cache(
            enc["input_ids"], hooks=[hook], attention_mask=enc["attention_mask"], stop_early=True
        )
        out.append(_scores(cache[hook], unit, enc["attention_mask"], pool).cpu())
    return torch.cat(out)


def calibrate_threshold(scores: Tensor, margin: float = 1.0) -> float:
    """The detector threshold from the scores of prompts *without* the trigger: their maximum times
    ``margin`` (>= 1 leaves room above every calibration prompt; a negative maximum is moved up by
    ``(margin - 1) * |max|`` instead, so a larger margin is always stricter)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.numel() == 0 or not torch.isfinite(s).all():
        raise ConfigError("calibration needs finite scores of at least one prompt")
    if margin < 1:
        raise ConfigError(f"margin must be >= 1, got {margin}")
    top = float(s.max())
    return top + (margin - 1) * abs(top)


class Gate:
    """The state of one :func:`conditional_ablate` context (what the ``with`` statement yields).

    ``flags``: the rows flagged by the last prompt pass. A teacher-forced pass (prompt + response in
    one forward) must not let the response tokens vote: :meth:`decide` runs the prompt alone first
    and holds its flags for the next forward pass (``rosettalens.organisms.clean_kl`` does this)."""

    def __init__(self, hm: HookedModel) -> None:
        self.hm = hm
        self.flags: Tensor | None = None
        self.hold = False
        self.history: list[Tensor] = []

    @torch.no_grad()
    def decide(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Flag the rows of a *left-padded* prompt batch and hold the flags for the next pass."""
        self.hold = False
        self.hm.forward(input_ids, attention_mask=attention_mask)
        self.hold = True
        assert self.flags is not None
        return self.flags

    def release(self) -> None:
        self.hold = False


@contextlib.contextmanager
def conditional_ablate(
    hm: HookedModel,
    direction: Tensor,
    layer: int,
    threshold: float,
    *,
    pool: str = "max",
    record: list | None = None,
) -> Iterator[Gate]:
    """Project ``direction`` out of layer ``layer`` and later (``resid_pre``, ``attn_out``, ``mlp_out``)
    in the rows whose prompt scores above ``threshold`` at ``resid_pre.{layer}`` (module docstring).

    ``record``: a list that receives each prompt pass's flags (a ``[batch]`` bool tensor), to count
    how often the detector fired. Yields a :class:`Gate`."""
    _pool(pool)
    unit = hm.unit_direction(direction)
    first = _layer(hm, layer)
    state: dict[str, Any] = {"mask": None}
    gate = Gate(hm)

    def pre(mod: Any, args: tuple, kwargs: dict) -> None:
        state["mask"] = kwargs.get("attention_mask")

    def ablate(act: Tensor, hook_name: str) -> Tensor | None:
        flags = gate.flags
        if flags is None or flags.shape[0] != act.shape[0] or not bool(flags.any()):
            return None
        u = unit.to(device=act.device, dtype=act.dtype)
        f = flags.to(device=act.device, dtype=act.dtype).view(-1, *([1] * (act.dim() - 1)))
        return act - f * (act @ u).unsqueeze(-1) * u

    def detect(act: Tensor, hook_name: str) -> Tensor | None:
        if hm.kv_offset == 0 and not gate.hold:  # a prompt pass decides (generated tokens keep it)
            mask = state["mask"]
            if mask is not None and mask.dim() == 2 and mask.shape[1] != act.shape[1]:
                mask = mask[:, -act.shape[1] :]
            gate.flags = (_scores(act, unit, mask, pool) > threshold).cpu()
            gate.history.append(gate.flags.clone())
            if record is not None:
                record.append(gate.flags.clone())
        return ablate(act, hook_name)

    names = [(hook_name("resid_pre", first), detect)]
    names += [(hook_name(k, first), ablate) for k in ("attn_out", "mlp_out")]
    names += [
        (hook_name(k, L), ablate)
        for L in range(first + 1, hm.cfg.n_layers)
        for k in ("resid_pre", "attn_out", "mlp_out")
    ]
    handle = hm.model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        # the KV-cache offset (0 on a prompt pass) as the model's own position-selective hooks track it
        with hm.track_offset(), hm.hooks(names):
            yield gate
    finally:
        handle.remove()
