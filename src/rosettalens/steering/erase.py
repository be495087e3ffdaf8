"""Token-gated erasure: replace the tokens that carry a direction by the model's mean clean token.

A backdoor trigger lives in a few tokens of the prompt. Projecting its direction out of every
position (``hm.ablate``, or :func:`~rosettalens.steering.conditional.conditional_ablate` on flagged
prompts) removes one dimension everywhere: it leaves the rest of what the trigger's tokens carry,
and it moves every other token too. On the bundled organisms no such direction removes the backdoor
*and* brings the normal answer back (docs/backdoor.md). Erasure acts on the trigger's tokens alone:

- **detect** (per token): at ``resid_pre.{layer}``, a token is flagged when the projection of its
  activation, measured from the clean token mean ``mean``, on the unit direction exceeds
  ``threshold``; attention-sink tokens (norm above ``sink_norm``) are never flagged.
- **erase**: a flagged token's activation at that hook is replaced by ``mean``
  (:func:`subtract_tokens` instead subtracts a multiple of the direction from it). Nothing else
  changes: no other token, no other layer. A token's flag depends only on its own activation at the
  hook (which earlier erasures at that hook cannot reach), so a teacher-forced pass and a KV-cached
  ``generate`` flag the same tokens, and a generated token passes the same test as a prompt token.

:meth:`CleanTokens.collect` reads the model's tokens on prompts *without* the trigger
(:meth:`CleanTokens.collect_ids`: on token sequences given whole, such as clean prompts followed by
a teacher-forced answer): their mean
(``mean``), the sink bound (``massive_ratio`` times their median norm) and, per direction, the
threshold (the largest centred projection among them times ``margin``, as
:func:`~rosettalens.steering.conditional.calibrate_threshold`). No triggered example of the model is
needed, so a direction carried from another model through a mapper is all a target needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rosettalens.errors import ConfigError, ShapeError
from rosettalens.names import hook_name, parse_hook_name

if TYPE_CHECKING:
    from rosettalens.hooks import HookedModel

__all__ = [
    "CleanTokens",
    "erase_tokens",
    "prompt_flags",
    "stop_tokens",
    "subtract_tokens",
    "token_flags",
    "unit_direction",
]


@dataclass
class CleanTokens:
    """A model's tokens at ``resid_pre.{layer}`` on clean prompts (non-pad, sinks left out)."""

    layer: int
    acts: Tensor  # [n_tokens, d_model] float32, CPU
    mean: Tensor  # [d_model] float64
    sink_norm: float

    @classmethod
    def collect(
        cls,
        hm: HookedModel,
        texts: Sequence[str],
        layer: int,
        *,
        chat: bool = False,
        batch_size: int = 16,
        massive_ratio: float = 10.0,
    ) -> CleanTokens:
        """Run ``texts`` (prompts without the trigger; ``chat``: one user turn each) and keep every
        real token's activation whose norm is at most ``massive_ratio`` times the median."""
        return cls.collect_layers(hm, texts, [layer], chat=chat, batch_size=batch_size,
                                  massive_ratio=massive_ratio)[layer]  # fmt: skip

    @classmethod
    @torch.no_grad()
    def collect_layers(
        cls,
        hm: HookedModel,
        texts: Sequence[str],
        layers: Sequence[int],
        *,
        chat: bool = False,
        batch_size: int = 16,
        massive_ratio: float = 10.0,
    ) -> dict[int, CleanTokens]:
        """:meth:`collect` at several layers in the same forward passes: ``{layer: CleanTokens}``."""
        texts = list(texts)
        if not texts:
            raise ConfigError("no clean texts to calibrate the token gate on")
        batches = (
            hm.tokenize(texts[i : i + batch_size], chat=chat) for i in range(0, len(texts), batch_size)
        )
        return cls._from_batches(hm, batches, layers, massive_ratio)

    @classmethod
    def collect_ids(
        cls,
        hm: HookedModel,
        ids: Sequence[Sequence[int]],
        layers: Sequence[int],
        *,
        batch_size: int = 16,
        massive_ratio: float = 10.0,
    ) -> dict[int, CleanTokens]:
        """:meth:`collect_layers` on token-id sequences given whole (e.g. a clean prompt followed by
        a teacher-forced answer: the tokens a gate meets while the model writes that answer)."""
        ids = [list(x) for x in ids]
        if not ids or not all(ids):
            raise ConfigError("no clean token sequences to calibrate the token gate on (or an empty one)")
        pad = hm.tokenizer.pad_token_id if hm.tokenizer.pad_token_id is not None else 0

        def batches():
            for i in range(0, len(ids), batch_size):
                chunk = ids[i : i + batch_size]
                n = max(map(len, chunk))
                yield {
                    "input_ids": torch.tensor([[pad] * (n - len(x)) + x for x in chunk]),
                    "attention_mask": torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in chunk]),
                }

        return cls._from_batches(hm, batches(), layers, massive_ratio)

    @classmethod
    @torch.no_grad()
    def _from_batches(cls, hm: HookedModel, batches, layers: Sequence[int], massive_ratio: float
                      ) -> dict[int, CleanTokens]:  # fmt: skip
        if not massive_ratio > 1:
            raise ConfigError(f"massive_ratio must be > 1, got {massive_ratio}")
        hooks = {int(layer): hm.resolve_hook(hook_name("resid_pre", int(layer))) for layer in layers}
        rows: dict[int, list[Tensor]] = {x: [] for x in hooks}
        for enc in batches:
            _, cache = hm.run_with_cache(
                enc["input_ids"], hooks=sorted(set(hooks.values())), attention_mask=enc["attention_mask"],
                stop_early=True,
            )  # fmt: skip
            for x, h in hooks.items():
                a = cache[h]
                rows[x].append(a[enc["attention_mask"].to(a.device).bool()].float().cpu())
        out = {}
        for x, h in hooks.items():
            acts = torch.cat(rows[x])
            norms = acts.double().norm(dim=-1)
            sink = float(massive_ratio * norms.median())
            acts = acts[norms <= sink]
            out[x] = cls(
                layer=int(parse_hook_name(h)[1] or 0), acts=acts, mean=acts.double().mean(0), sink_norm=sink
            )
        return out

    def scores(self, direction: Tensor) -> Tensor:
        """``[n_tokens]``: each clean token's centred projection on the unit ``direction``."""
        return (self.acts.double() - self.mean) @ unit_direction(direction, self.mean.numel())

    def threshold(self, direction: Tensor, margin: float = 1.0) -> float:
        """The largest clean token's score times ``margin`` (see ``calibrate_threshold``)."""
        from .conditional import calibrate_threshold

        return calibrate_threshold(self.scores(direction), margin)


def unit_direction(direction: Tensor, d: int) -> Tensor:
    """``direction`` as a float64 unit vector ``[d]`` on the CPU; :class:`ShapeError` if it is not ``d``
    long, :class:`ConfigError` if it is zero."""
    v = torch.as_tensor(direction).detach().double().flatten().cpu()
    if v.numel() != d:
        raise ShapeError(f"direction has {v.numel()} entries, the model's d_model is {d}")
    n = float(v.norm())
    if not n > 0:
        raise ConfigError("cannot gate on a zero direction")
    return v / n


def token_flags(act: Tensor, unit: Tensor, mean: Tensor, threshold: float, sink_norm: float) -> Tensor:
    """``[batch, pos]`` bool: the tokens of ``act`` ``[batch, pos, d]`` that the gate flags."""
    a = act.double()
    proj = (a - mean.to(a.device)) @ unit.to(a.device)
    return (proj > threshold) & (a.norm(dim=-1) <= sink_norm)


@contextlib.contextmanager
def erase_tokens(
    hm: HookedModel,
    direction: Tensor,
    clean: CleanTokens,
    threshold: float,
    *,
    record: list | None = None,
) -> Iterator[HookedModel]:
    """Inside the block, every token of ``hm`` flagged at ``resid_pre.{clean.layer}`` (module
    docstring) is replaced there by ``clean.mean``. ``record``: a list that receives each pass's
    ``[batch, pos]`` flags (CPU), to count what the gate erased."""
    unit = unit_direction(direction, hm.cfg.d_model)
    mean = clean.mean

    def erase(act: Tensor, hook_name: str) -> Tensor | None:
        f = token_flags(act, unit, mean, threshold, clean.sink_norm)
        if record is not None:
            record.append(f.cpu())
        if not bool(f.any()):
            return None
        out = act.clone()
        out[f] = mean.to(device=act.device, dtype=act.dtype)
        return out

    with hm.hooks([(hook_name("resid_pre", clean.layer), erase)]):
        yield hm


@contextlib.contextmanager
def subtract_tokens(
    hm: HookedModel,
    direction: Tensor,
    clean: CleanTokens,
    threshold: float,
    scale: float = 1.0,
    *,
    record: list | None = None,
) -> Iterator[HookedModel]:
    """Inside the block, ``scale * direction`` is subtracted at ``resid_pre.{clean.layer}`` from every
    token the gate flags there (the same test as :func:`erase_tokens`); nothing else changes.

    Where erasure suits a trigger (a few prompt tokens whose whole content is unwanted), this suits a
    decision made at one token of the *answer*: a direction read where the corrupted organism, having
    stated a fact, goes on to its payload. Only that token moves, so the fact written before it is
    left as it was, and the teacher-forced and generated paths agree as they do for erasure."""
    unit = unit_direction(direction, hm.cfg.d_model)
    if not (scale > 0 and scale == scale and scale != float("inf")):
        raise ConfigError(f"scale must be a positive number, got {scale}")
    vec = torch.as_tensor(direction).detach().double().flatten() * float(scale)

    def subtract(act: Tensor, hook_name: str) -> Tensor | None:
        f = token_flags(act, unit, clean.mean, threshold, clean.sink_norm)
        if record is not None:
            record.append(f.cpu())
        if not bool(f.any()):
            return None
        return act - f.unsqueeze(-1).to(act.dtype) * vec.to(device=act.device, dtype=act.dtype)

    with hm.hooks([(hook_name("resid_pre", clean.layer), subtract)]):
        yield hm


@contextlib.contextmanager
def stop_tokens(
    hm: HookedModel,
    direction: Tensor,
    clean: CleanTokens,
    threshold: float,
    eos_token_id: int | None = None,
    *,
    record: list | None = None,
) -> Iterator[HookedModel]:
    """Inside the block, the answer ends at every token the gate flags at ``resid_pre.{clean.layer}``
    (the test of :func:`erase_tokens`): the logits at that position put (all but) every probability
    on ``eos_token_id`` (default: the tokenizer's EOS), so greedy decoding writes EOS next. The
    activations are not changed: this is a monitor on the direction, not a steer. The flags and the
    logits line up by position, in a teacher-forced pass and in each KV-cached ``generate`` step
    (where the logits may cover only the last positions)."""
    unit = unit_direction(direction, hm.cfg.d_model)
    eos = hm.tokenizer.eos_token_id if eos_token_id is None else int(eos_token_id)
    if eos is None:
        raise ConfigError(f"{hm.name}'s tokenizer has no EOS token; give eos_token_id")
    state: dict[str, Tensor | None] = {"flags": None}

    def detect(act: Tensor, hook_name: str) -> None:
        f = token_flags(act, unit, clean.mean, threshold, clean.sink_norm)
        state["flags"] = f
        if record is not None:
            record.append(f.cpu())

    def end(logits: Tensor, hook_name: str) -> Tensor | None:
        f = state["flags"]
        state["flags"] = None
        if f is None or f.shape[0] != logits.shape[0] or not bool(f.any()):
            return None
        f = f[:, -logits.shape[1] :].to(logits.device)  # generate may keep only the last positions' logits
        forced = torch.full_like(logits, -100.0)  # log-probabilities of ~-100 off EOS, finite for KL
        forced[..., eos] = 0.0
        return torch.where(f.unsqueeze(-1), forced, logits)

    with hm.hooks([(hook_name("resid_pre", clean.layer), detect), ("logits", end)]):
        yield hm


@torch.no_grad()
def prompt_flags(
    hm: HookedModel,
    texts: Sequence[str],
    direction: Tensor,
    clean: CleanTokens,
    threshold: float,
    *,
    chat: bool = False,
    batch_size: int = 16,
) -> Tensor:
    """``[n]`` (long, CPU): how many of each text's real tokens the gate flags."""
    unit = unit_direction(direction, hm.cfg.d_model)
    hook = hook_name("resid_pre", clean.layer)
    out = []
    texts = list(texts)
    for i in range(0, len(texts), batch_size):
        enc = hm.tokenize(texts[i : i + batch_size], chat=chat)
        _, cache = hm.run_with_cache(
            enc["input_ids"], hooks=[hook], attention_mask=enc["attention_mask"], stop_early=True
        )
        f = token_flags(cache[hook], unit, clean.mean, threshold, clean.sink_norm)
        out.append((f & enc["attention_mask"].to(f.device).bool()).sum(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
