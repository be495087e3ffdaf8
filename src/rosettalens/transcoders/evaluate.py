"""Evaluating a transcoder set: per layer, and the model with every MLP replaced at once.

Per layer, on the kept tokens (the attention-sink rule of each transcoder):

* ``explained_variance`` = ``1 - FVU``, ``FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` with
  ``y = mlp_out.L`` of the clean forward and ``y_hat`` the transcoder of the clean ``mlp_in.L``;
* ``l0``: mean active features per token; ``dead_fraction``: features that never fire on the tokens.

The replaced model (:func:`replace_mlps`): every MLP of the set's layers is replaced by its transcoder in
one forward (each transcoder reads the MLP input of that forward, so errors compound); positions left out
by the sink rule keep the MLP's own output. Against it, the clean model and the model with the same MLP
outputs zeroed (at the same positions). Next-token CE loss and ``KL(clean || other)`` are averaged over
real tokens at positions ``>= skip_first``; ``ce_loss_score = (ce_zero - ce_replaced) / (ce_zero -
ce_clean)`` (1: as good as the real MLPs; 0: no better than none).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rosettalens.errors import DataError, ShapeError
from rosettalens.names import hook_name
from rosettalens.transcoders.model import TranscoderSet
from rosettalens.transcoders.sinks import positions_of
from rosettalens.transcoders.train import mlp_hooks, token_batches, tokenize_documents

__all__ = ["check_set", "evaluate_transcoders", "replace_mlps"]


def check_set(tset: TranscoderSet, hm: Any) -> None:
    """Refuse a set whose layers or widths do not fit ``hm`` (:class:`ShapeError`)."""
    n = hm.cfg.n_layers
    for L in tset.layers:
        if not 0 <= L < n:
            raise ShapeError(f"the transcoder set has layer {L} but {hm.name} has {n} layers")
        tc = tset[L]
        d_in, d_out = hm.hook_width(hook_name("mlp_in", L)), hm.hook_width(hook_name("mlp_out", L))
        if (tc.cfg.d_in, tc.cfg.d_out) != (d_in, d_out):
            raise ShapeError(
                f"transcoder of layer {L} maps {tc.cfg.d_in} -> {tc.cfg.d_out} but {hm.name}'s MLP there is "
                f"{d_in} -> {d_out}; was it trained on another model ({tset.model!r})?"
            )


@contextlib.contextmanager
def replace_mlps(
    hm: Any, tset: TranscoderSet, keep: dict[int, Tensor] | None = None, mode: str = "transcoder"
) -> Iterator[Any]:
    """Inside the block, every layer ``L`` of ``tset`` has its MLP output replaced, at the positions
    ``keep[L] [batch, pos]`` (default: all), by its transcoder of the MLP input of the same forward
    (``mode="transcoder"``), or by zero (``mode="zero"``). Other positions keep the MLP's own output."""
    stash: dict[int, Tensor] = {}
    fwd: list[tuple[str, Any, str]] = []
    for L in tset.layers:
        tc = tset[L]

        def read(act: Tensor, name: str, L: int = L) -> None:
            stash[L] = act

        def write(act: Tensor, name: str, L: int = L, tc: Any = tc) -> Tensor:
            if mode == "zero":
                new = torch.zeros_like(act)
            else:
                x = stash.pop(L)
                new = tc(x.to(tc.device, torch.float32)).to(act.device, act.dtype)
            k = None if keep is None else keep.get(L)
            if k is None:
                return new
            return torch.where(k.to(act.device)[..., None], new, act)

        if mode != "zero":
            fwd.append((hook_name("mlp_in", L), read, "plain"))
        fwd.append((hook_name("mlp_out", L), write, "plain"))
    with hm.intervene(fwd):
        yield hm


@dataclass
class _Acc:
    """Running sums of one layer's evaluation."""

    sum: Tensor  # sum of y [d_out] (float64)
    sse: float = 0.0
    sumsq: float = 0.0
    n: int = 0
    nnz: float = 0.0


def _ce_kl(
    logits: Tensor, clean_logp: Tensor, ids: Tensor, ce_mask: Tensor, kl_mask: Tensor
) -> tuple[float, float]:
    logp = F.log_softmax(logits.float(), -1)
    ce = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return float(ce[ce_mask].double().sum()), float(kl[kl_mask].double().sum())


@torch.no_grad()
def evaluate_transcoders(
    tset: TranscoderSet,
    hm: Any,
    documents: Sequence[str],
    *,
    max_tokens: int = 8192,
    max_length: int = 128,
    docs_per_forward: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-layer and replaced-model metrics (module docstring) on ``documents`` (up to ``max_tokens``
    tokens, documents cut to ``max_length``). Returns ``{"layers": {L: {...}}, "explained_variance_min"
    / "_mean" / "_max", "l0_mean", "dead_fraction_mean", "ce_clean", "ce_replaced", "ce_zero",
    "ce_loss_score", "kl_replaced", "kl_zero", "n_tokens"}``."""
    check_set(tset, hm)
    ids = tokenize_documents(hm.tokenizer, [d for d in documents if d.strip()], max_length, max_tokens)
    if not ids:
        raise DataError("no evaluation document has 2 or more tokens")
    layers = tset.layers
    acc = {L: _Acc(torch.zeros(tset[L].cfg.d_out, dtype=torch.float64)) for L in layers}
    fires = {L: torch.zeros(tset[L].width, dtype=torch.bool) for L in layers}
    tot = {"ce_clean": 0.0, "ce_replaced": 0.0, "ce_zero": 0.0, "kl_replaced": 0.0, "kl_zero": 0.0}
    n_ce = n_kl = seen = 0
    skip = max(tset[L].cfg.skip_first for L in layers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=min(max_tokens, sum(map(len, ids))),
            unit="tok",
            desc="evaluate",
            file=sys.stderr,
            leave=False,
        )
    try:
        for enc in token_batches(hm, ids, docs_per_forward):
            if seen >= max_tokens:
                break
            mask = enc["attention_mask"]
            logits, cache = hm.run_with_cache(enc, hooks=mlp_hooks(layers))
            assert logits is not None
            keep: dict[int, Tensor] = {}
            for L in layers:
                tc = tset[L]
                x = cache[hook_name("mlp_in", L)].float()
                y = cache[hook_name("mlp_out", L)].float()
                k = tc.keep_mask(x, y, mask)
                keep[L] = k
                xk, yk = x[k].to(tc.device), y[k].to(tc.device).double()
                f = tc.encode(xk)
                y_hat = tc(xk).double()
                a = acc[L]
                a.sse += float((yk - y_hat).pow(2).sum())
                a.sum += yk.sum(0).cpu()
                a.sumsq += float(yk.pow(2).sum())
                a.n += yk.shape[0]
                a.nnz += float((f != 0).sum())
                fires[L] |= (f != 0).any(0).cpu()
            del cache
            clean_logp = F.log_softmax(logits.float(), -1)
            real = mask.bool()
            scored = real & (positions_of(real) >= skip)
            ce_mask = scored[:, :-1] & real[:, 1:]
            ids_t = enc["input_ids"]
            with replace_mlps(hm, tset, keep):
                c, k_ = _ce_kl(hm.forward(enc), clean_logp, ids_t, ce_mask, scored)
            tot["ce_replaced"] += c
            tot["kl_replaced"] += k_
            with replace_mlps(hm, tset, keep, mode="zero"):
                c, k_ = _ce_kl(hm.forward(enc), clean_logp, ids_t, ce_mask, scored)
            tot["ce_zero"] += c
            tot["kl_zero"] += k_
            c, _ = _ce_kl(logits, clean_logp, ids_t, ce_mask, scored)
            tot["ce_clean"] += c
            n_ce += int(ce_mask.sum())
            n_kl += int(scored.sum())
            n = int(real.sum())
            seen += n
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if n_ce == 0 or n_kl == 0:
        raise DataError(f"no tokens to score: every document is shorter than {skip + 2} tokens")
    out: dict[str, Any] = {k: v / (n_ce if k.startswith("ce") else n_kl) for k, v in tot.items()}
    den = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_score"] = (out["ce_zero"] - out["ce_replaced"]) / den if den != 0 else float("nan")
    per: dict[int, dict[str, float]] = {}
    for L in layers:
        a = acc[L]
        n = max(a.n, 1)
        sst = a.sumsq - float(a.sum.pow(2).sum()) / n
        fvu = a.sse / sst if sst > 0 else float("nan")
        per[L] = {
            "explained_variance": 1.0 - fvu,
            "fvu": fvu,
            "l0": a.nnz / n,
            "dead_fraction": float((~fires[L]).double().mean()),
            "n_tokens": a.n,
        }
    evs = [p["explained_variance"] for p in per.values()]
    out.update(
        explained_variance_min=min(evs),
        explained_variance_mean=sum(evs) / len(evs),
        explained_variance_max=max(evs),
        l0_mean=sum(p["l0"] for p in per.values()) / len(per),
        dead_fraction_mean=sum(p["dead_fraction"] for p in per.values()) / len(per),
        n_tokens=n_kl,
        layers=per,
    )
    return out
