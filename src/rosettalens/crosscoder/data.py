"""Paired activations of two models for a crosscoder, with the positions they came from.

Pairing (:func:`rosettalens.mapping.pairs.pair_texts`): with one tokenizer, every non-special position
pairs with itself (``"all"``); with two tokenizers, positions whose tokens end at the same character of
the text (``"aligned"``, :mod:`rosettalens.align`). Left out, in both models, by the sink rule of
:mod:`rosettalens.sae.sinks`: special tokens, the first ``skip_first`` positions of every document
(attention sinks: without a BOS token the first token's residual norm is often ~100x the median), and
tokens whose norm exceeds ``norm_ratio`` times the median norm of their model (``0``: off); a pair is
kept only when both of its tokens are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rosettalens.errors import DataError

__all__ = ["PairedActivations", "extract_pairs", "keep_positions", "random_init_copy"]


@dataclass
class PairedActivations:
    """Row-aligned ``x_a [n, d_a]``, ``x_b [n, d_b]`` and where each row came from: ``doc [n]`` (text
    index), ``pos_a [n]`` / ``pos_b [n]`` (token position in each model's tokenization)."""

    x_a: Tensor
    x_b: Tensor
    doc: Tensor
    pos_a: Tensor
    pos_b: Tensor
    pairing: str
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x_a.shape[0])

    def subset(self, idx: Tensor) -> PairedActivations:
        """The rows ``idx`` (an index or boolean tensor)."""
        return PairedActivations(
            self.x_a[idx],
            self.x_b[idx],
            self.doc[idx],
            self.pos_a[idx],
            self.pos_b[idx],
            self.pairing,
            dict(self.info),
        )


def keep_positions(pos_a: np.ndarray, pos_b: np.ndarray, skip_first: int) -> np.ndarray:
    """Boolean mask of pairs whose positions are ``>= skip_first`` in both tokenizations."""
    return (np.asarray(pos_a) >= skip_first) & (np.asarray(pos_b) >= skip_first)


def extract_pairs(
    hm_a,
    hm_b,
    texts: Sequence[str],
    hook_a: str,
    hook_b: str,
    *,
    pairing: str = "auto",
    skip_first: int = 1,
    norm_ratio: float = 10.0,
    median_norms: tuple[float | None, float | None] = (None, None),
    max_tokens: int | None = None,
    max_length: int | None = 256,
    batch_size: int = 8,
    progress: bool = True,
    shard: bool = True,
) -> PairedActivations:
    """Paired activations of ``hm_a`` at ``hook_a`` and ``hm_b`` at ``hook_b`` over ``texts`` (module docstring).

    Texts are run in order, ``batch_size`` at a time, until ``max_tokens`` pairs are kept (then cut to
    it). ``median_norms``: each model's median norm for the norm test (``None``: the median of the
    extracted pairs, e.g. when extracting training data; a crosscoder's recorded medians when evaluating
    it). Returns float32 CPU tensors. ``info``: ``pairing``, ``n_pairs``, ``n_texts``, ``paired_fraction``
    (pairs over B's tokens before the sink rule), ``dropped_first``, ``dropped_outliers``,
    ``median_norm_a``, ``median_norm_b``.

    Under ``torchrun`` (``WORLD_SIZE > 1``, ``shard=True``; every rank calls this with the same
    arguments) the ranks share the forward passes: every rank tokenizes and pairs the texts batch by
    batch (which fixes where ``max_tokens`` stops without a forward pass), runs the two models only on
    the batches ``b`` with ``b % world == rank``, and the rows are exchanged, so that every rank returns
    exactly what one process returns (same rows in the same order, medians over all of them, same
    ``info``). No batch is run twice or beyond the ``max_tokens`` stop; what every rank repeats is the
    tokenization. ``shard=False``: this process runs every batch itself (a call made on one rank only).
    """
    import sys

    from tqdm.auto import tqdm

    from rosettalens.mapping.pairs import hook_width, pair_texts, run_positions
    from rosettalens.sae.sinks import SinkRule

    rules = [SinkRule(skip_first, norm_ratio, m) for m in median_norms]  # checks the values
    hook_a, hook_b = hm_a.resolve_hook(hook_a), hm_b.resolve_hook(hook_b)
    d_a, d_b = hook_width(hm_a, hook_a), hook_width(hm_b, hook_b)
    rank, world = _ranks() if shard else (0, 1)
    keep_idx = [i for i, t in enumerate(texts) if t]  # pair_texts drops empty texts: keep their indices
    mine_a: list[Tensor] = []  # [k_b, d_a] per batch this rank runs
    mine_b: list[Tensor] = []  # [k_b, d_b]
    counts: list[int] = []  # pairs per batch, every batch walked (known from the tokenization alone)
    docs, pas, pbs = [], [], []
    n = dropped_first = total_b = 0
    used = 0
    resolved = pairing
    bar = tqdm(total=max_tokens, desc="extract pairs", unit="tok", file=sys.stderr, disable=not progress)
    try:
        # texts are tokenized and paired one batch at a time: a large corpus costs only what is used
        for s in range(0, len(keep_idx), batch_size):
            chunk = keep_idx[s : s + batch_size]
            pt = pair_texts(hm_a.tokenizer, hm_b.tokenizer, [texts[i] for i in chunk], resolved, max_length)
            resolved = pt.pairing  # "auto" is decided once, on the first batch
            keep = [keep_positions(a, b, skip_first) for a, b in zip(pt.pos_src, pt.pos_tgt)]
            pa = [p[k] for p, k in zip(pt.pos_src, keep)]
            pb = [p[k] for p, k in zip(pt.pos_tgt, keep)]
            dropped_first += sum(int((~k).sum()) for k in keep)
            for j in range(len(chunk)):
                docs.append(torch.full((len(pa[j]),), chunk[j], dtype=torch.long))
                pas.append(torch.as_tensor(pa[j], dtype=torch.long))
                pbs.append(torch.as_tensor(pb[j], dtype=torch.long))
            k_batch = sum(len(p) for p in pa)
            if len(counts) % world == rank:  # this rank's batch: run the models
                a = run_positions(hm_a, hook_a, pt.ids_src, pa, batch_size)
                same = (
                    hm_b is hm_a
                    and hook_b == hook_a
                    and all(x == y for x, y in zip(pt.ids_src, pt.ids_tgt))
                    and all(np.array_equal(x, y) for x, y in zip(pa, pb))
                )
                b = a if same else run_positions(hm_b, hook_b, pt.ids_tgt, pb, batch_size)
                mine_a.append(torch.cat([x.reshape(len(x), d_a) for x in a]))
                mine_b.append(torch.cat([x.reshape(len(x), d_b) for x in b]))
            counts.append(k_batch)
            n += k_batch
            used += len(chunk)
            total_b += sum(len(x) for x in pt.ids_tgt)
            bar.update(k_batch)
            if max_tokens and n >= max_tokens:
                break
    finally:
        bar.close()
    if n == 0:
        raise DataError(
            f"no paired positions between {hm_a.name} and {hm_b.name} on these texts "
            f"(after leaving out the first {skip_first} positions of each)"
        )
    if world > 1:
        _check_same_batches(counts, rank, world)
    out = PairedActivations(
        _gather_batches(mine_a, counts, rank, world, d_a),
        _gather_batches(mine_b, counts, rank, world, d_b),
        torch.cat(docs),
        torch.cat(pas),
        torch.cat(pbs),
        resolved,
    )
    n_before = len(out)
    medians = [
        m if m is not None else float(x.double().norm(dim=1).median())
        for m, x in zip(median_norms, (out.x_a, out.x_b))
    ]
    if norm_ratio > 0:
        ka = rules[0].with_median(medians[0]).keep(out.x_a)  # rows already past skip_first
        kb = rules[1].with_median(medians[1]).keep(out.x_b)
        out = out.subset(ka & kb)
    dropped_outliers = n_before - len(out)
    if max_tokens:
        out = out.subset(torch.arange(min(len(out), max_tokens)))
    out.info = {
        "pairing": resolved,
        "n_pairs": len(out),
        "n_texts": used,
        "paired_fraction": (n + dropped_first) / max(total_b, 1),
        "dropped_first": dropped_first,
        "dropped_outliers": dropped_outliers,
        "skip_first": skip_first,
        "norm_ratio": norm_ratio,
        "median_norm_a": medians[0],
        "median_norm_b": medians[1],
    }
    return out


def _ranks() -> tuple[int, int]:
    """(rank, world) under ``torchrun`` (the process group is made on first use; ``(0, 1)`` alone)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from rosettalens.store import init_distributed

    rank, world, _ = init_distributed()
    return rank, world


def _check_same_batches(counts: list[int], rank: int, world: int) -> None:
    """Raise on every rank (none is left waiting) unless all ranks walked the same batches."""
    import torch.distributed as dist

    seen: list[Any] = [None] * world
    dist.all_gather_object(seen, counts)
    if any(c != counts for c in seen):
        raise DataError(
            "the torchrun ranks were given different texts (their batches hold different numbers of "
            "pairs); give every rank the same texts, or shard=False"
        )


def _gather_batches(mine: list[Tensor], counts: list[int], rank: int, world: int, width: int) -> Tensor:
    """All batches' rows ``[sum(counts), width]`` in batch order, from each rank's own batches ``mine``
    (batch ``b`` is run by rank ``b % world``; ``counts[b]`` rows each, known on every rank).

    One ``all_gather`` of each rank's rows, padded to the longest rank's (on the GPU under NCCL)."""
    if world == 1:
        return torch.cat(mine)
    import torch.distributed as dist

    per_rank = [sum(counts[r::world]) for r in range(world)]
    local = torch.cat(mine) if mine else torch.zeros(0, width)
    nccl = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    buf = torch.zeros(max(per_rank), width, dtype=torch.float32, device=dev)
    buf[: len(local)] = local
    got = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(got, buf)
    parts = [list(g[:k].cpu().split(counts[r::world])) for r, (g, k) in enumerate(zip(got, per_rank))]
    return torch.cat([parts[b % world][b // world] for b in range(len(counts))])


def random_init_copy(hm, seed: int = 0):
    """A randomly initialised model of ``hm``'s architecture and size (same tokenizer), as a HookedModel:
    the control a trained model must beat."""
    from transformers import AutoModelForCausalLM

    from rosettalens.hooks import HookedModel

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hm.model.config, dtype=torch.float32).eval().to(hm.device)
    return HookedModel(model, hm.tokenizer, name=f"{hm.name}-random-init")
