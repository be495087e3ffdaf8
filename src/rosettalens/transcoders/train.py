"""Training per-layer transcoders in one pass over a model's activations (streamed, never stored).

Documents are tokenised (at most ``max_length`` tokens each), a ``heldout`` fraction is kept aside for
evaluation, and the rest is run through the model ``docs_per_forward`` documents at a time. Each forward
records ``mlp_in.L`` and ``mlp_out.L`` of every chosen layer; each layer's transcoder then takes Adam
steps of ``batch_size`` rows on that forward's tokens (rows shuffled; the fewer than ``batch_size`` rows
left over wait for the next forward), until it has trained on ``max_tokens`` tokens: every layer takes
``ceil(max_tokens / batch_size)`` steps, all full but the last. Memory is one forward's activations,
whatever the corpus size.

Left out of training (and of evaluation, and of the replaced forward passes, where those positions keep
the model's own MLP output): the attention-sink rule (:mod:`rosettalens.transcoders.sinks`): the first
``skip_first`` positions of each document, and tokens whose MLP input or output norm exceeds
``norm_ratio`` times its median.

Losses, per token, with inputs and outputs scaled so that ``E||x - mean||^2 = d_in`` and
``E||y - mean||^2 = d_out`` (measured on the first forward; folded into the saved weights):

* ``||y - y_hat||^2 / d_out`` (the FVU of the batch, up to the batch's own variance);
* topk: ``+ aux_coeff * AuxK`` (Gao et al. 2024): the ``aux_k`` largest pre-activations of the dead
  features reconstruct the error ``y - y_hat`` (normalised by its variance), scaled by
  ``min(n_dead / aux_k, 1)``; a feature is dead when it has not fired for ``dead_tokens`` tokens;
* relu: ``+ l1_coeff * sum_i f_i ||W_dec_i||``.

Learning rate: the schedule of the SAE trainer (:func:`rosettalens.sae.train.lr_factor`) over that number
of steps: linear warm-up over the first ``round(warmup_frac * steps)`` steps, linear decay over the last
``decay_frac`` of the steps (with ``decay_frac > 0`` the last step runs at ``1 / int(decay_frac * steps)``
of the peak: no step at 0). A corpus that holds fewer training tokens than ``max_tokens`` (after the sink rule, which is known
only as the forwards run) ends training early, before the decay is complete; the training record keeps
``steps`` and ``steps_planned``. The TopK encoder's backward touches only the ``k`` selected
pre-activations per row.

Checkpoints (every ``checkpoint_every`` forward passes, into ``checkpoint_dir``): ``state.safetensors``
(every layer's weights, Adam moments, dead-feature counters and the rows waiting for the next batch; the
batch generator's state) + ``state.json`` (the forward passes done, scales, medians, counters, running
sums, and a key of the training config, model, layers and training tokens). A run with the same key
resumes after the last forward saved and ends with the same weights, bit for bit, as an uninterrupted
one; a checkpoint with another key is refused. The checkpoint is removed when training ends.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rosettalens.config import option
from rosettalens.errors import ConfigError, DataError
from rosettalens.io import atomic_dir, read_checkpoint_meta, sha256_bytes
from rosettalens.io import check_checkpoint_dir as check_dir
from rosettalens.names import hook_name
from rosettalens.sae.train import lr_factor
from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet
from rosettalens.transcoders.sinks import NORM_RATIO, SKIP_FIRST, keep_mask

__all__ = ["TrainConfig", "train_transcoders", "split_documents", "tokenize_documents"]

CKPT_FORMAT = "rosettalens.transcoders_checkpoint/1"
CKPT_STATE = "state.safetensors"
CKPT_META = "state.json"
#: TrainConfig fields that do not change what is trained (left out of the checkpoint key and the record)
_NOT_IN_KEY = ("checkpoint_dir", "checkpoint_every")


@dataclass
class TrainConfig:
    """Transcoder training: architecture, budget, optimiser and the sink rule."""

    layers: list[int] | None = option(None, "layers to train (negative counts from the end)", shown="all")
    width: int = option(2048, "features per transcoder")
    k: int = option(32, "active features per token (topk)")
    arch: Literal["topk", "relu"] = option(
        "topk", "sparsity rule: TopK per token, or ReLU with an L1 penalty"
    )
    skip: bool = option(
        True,
        "add a linear skip connection x @ W_skip (on SmolLM2 it halves the KL with every MLP replaced:"
        " docs/transcoders.md)",
    )
    max_tokens: int = option(40_000, "training tokens (every layer trains on each of them once)")
    max_length: int = option(128, "tokens per document (longer documents are cut)")
    docs_per_forward: int = option(16, "documents per model forward pass")
    batch_size: int = option(128, "tokens per Adam step")
    lr: float = option(2e-3, "peak learning rate")
    warmup_frac: float = option(0.05, "fraction of the steps of linear learning-rate warm-up (rounded)")
    decay_frac: float = option(
        0.3, "fraction of the steps, at the end, over which the learning rate decays linearly towards 0"
    )
    aux_coeff: float = option(1 / 32, "weight of the AuxK dead-feature loss (topk)")
    aux_k: int = option(256, "dead features used by the AuxK loss")
    dead_tokens: int = option(2000, "a feature is dead when it has not fired for this many tokens")
    l1_coeff: float = option(1e-3, "L1 penalty (relu)")
    skip_first: int = option(SKIP_FIRST, "positions at the start of each document left out (attention sinks)")
    norm_ratio: float = option(
        NORM_RATIO, "leave out tokens whose MLP input/output norm exceeds this x median (0: off)"
    )
    heldout: float = option(0.1, "fraction of the documents held out for evaluation")
    seed: int = option(0, "random seed (initialisation, document order, batches)")
    checkpoint_dir: str | None = option(
        None,
        "folder for a training checkpoint; a run with the same config, model and data resumes from it"
        " (removed when training ends)",
        shown="none",
        metavar="DIR",
    )
    checkpoint_every: int = option(0, "save a checkpoint every N model forward passes (0: never)")

    def validate(self) -> None:
        ints = {"width": self.width, "k": self.k, "max_tokens": self.max_tokens, "max_length": self.max_length,
                "docs_per_forward": self.docs_per_forward, "batch_size": self.batch_size, "aux_k": self.aux_k,
                "dead_tokens": self.dead_tokens}  # fmt: skip
        for name, v in ints.items():
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.arch not in ("topk", "relu"):
            raise ConfigError(f"arch must be topk or relu, got {self.arch!r}")
        if self.arch == "topk" and self.k > self.width:
            raise ConfigError(f"k={self.k} is larger than width={self.width}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("warmup_frac", "decay_frac"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
        if self.warmup_frac + self.decay_frac > 1:
            raise ConfigError("warmup_frac + decay_frac must be <= 1")
        if not 0 <= self.heldout < 1:
            raise ConfigError(f"heldout must be in [0, 1), got {self.heldout}")
        if self.skip_first < 0:
            raise ConfigError(f"skip_first must be >= 0, got {self.skip_first}")
        if not (math.isfinite(self.norm_ratio) and (self.norm_ratio == 0 or self.norm_ratio > 1)):
            raise ConfigError(f"norm_ratio must be 0 (off) or > 1, got {self.norm_ratio}")
        for name in ("aux_coeff", "l1_coeff"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be >= 0, got {v}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("checkpoint_every needs a checkpoint_dir")
        if self.checkpoint_dir:
            check_checkpoint_dir(self.checkpoint_dir)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- data
def split_documents(documents: Sequence[str], heldout: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` documents: a seeded shuffle, the last ``heldout`` fraction (at least one
    document when ``heldout > 0`` and there are two or more) held out."""
    docs = [d for d in documents if d.strip()]
    if not docs:
        raise DataError("no non-empty documents to train on")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    docs = [docs[i] for i in order]
    n_held = 0 if heldout == 0 or len(docs) < 2 else max(1, round(heldout * len(docs)))
    return docs[: len(docs) - n_held], docs[len(docs) - n_held :]


def tokenize_documents(
    tokenizer: Any,
    documents: Sequence[str],
    max_length: int,
    max_tokens: int | None = None,
    skip_first: int = 0,
) -> list[list[int]]:
    """Token ids of each document (the tokenizer's special tokens added), cut to ``max_length``;
    documents of fewer than 2 tokens are dropped. With ``max_tokens``, documents are taken in order
    until they hold that many tokens at positions ``>= skip_first`` (a large corpus is not tokenised whole)."""
    out = []
    total = 0
    for doc in documents:
        if max_tokens is not None and total >= max_tokens:
            break
        ids = tokenizer(doc, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            out.append(list(ids))
            total += max(0, len(ids) - skip_first)
    return out


def pad_batch(docs: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` ``[batch, pos]`` of token-id lists."""
    n = max(len(d) for d in docs)
    ids = torch.full((len(docs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), n), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d, dtype=torch.long)
        mask[i, : len(d)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def pad_id(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


def token_batches(hm: Any, docs: Sequence[Sequence[int]], per_forward: int):
    """Padded batches of ``per_forward`` documents on ``hm``'s device."""
    pid = pad_id(hm.tokenizer)
    for s in range(0, len(docs), per_forward):
        yield pad_batch(docs[s : s + per_forward], pid, hm.device)


def mlp_hooks(layers: Sequence[int]) -> list[str]:
    """``[mlp_in.L, mlp_out.L, ...]`` of ``layers``."""
    return [h for L in layers for h in (hook_name("mlp_in", L), hook_name("mlp_out", L))]


def resolve_layers(hm: Any, layers: Sequence[int] | None) -> list[int]:
    n = hm.cfg.n_layers
    if layers is None:
        return list(range(n))
    out = []
    for L in layers:
        if not -n <= L < n:
            raise ConfigError(f"layer {L} out of range for {hm.name} ({n} layers: 0..{n - 1} or -{n}..-1)")
        out.append(L % n)
    if len(set(out)) != len(out):
        raise ConfigError(f"a layer is listed twice: {list(layers)}")
    return sorted(out)


# ----------------------------------------------------------------------------------- sparse encoder
class _GatherPre(torch.autograd.Function):
    """``pre[b, idx[b, j]]`` with ``pre = x @ W_enc + b_enc`` given (computed without grad): the
    backward touches only the selected ``[n, k]`` entries, never the dense ``[n, width]`` block."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(x, idx)
        ctx.width = W_enc.shape[1]
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        (g,) = grads
        x, idx = ctx.saved_tensors
        n, k = idx.shape
        w = ctx.width
        cols, vals = idx.reshape(-1), g.reshape(-1)
        gb = torch.zeros(w, dtype=g.dtype, device=g.device).index_add_(0, cols, vals)
        rows = torch.arange(n, device=idx.device).repeat_interleave(k)
        Gt = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (w, n), check_invariants=False)
        gW = torch.sparse.mm(Gt, x).t()
        return None, gW, gb, None, None


def _sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """``sum_j vals[b, j] * W_dec[idx[b, j]]`` ``[n, d_out]``."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


@dataclass
class _Run:
    """One layer's transcoder while it trains (normalised units)."""

    tc: Transcoder
    opt: torch.optim.Optimizer
    since_fired: Tensor  # tokens since each feature last fired [width]
    s_in: float = 1.0
    s_out: float = 1.0
    median_in: float | None = None
    median_out: float | None = None
    tokens: int = 0  # rows trained on
    taken: int = 0  # rows taken from the forwards: ``tokens`` + the rows waiting in ``x_wait``
    steps: int = 0
    x_wait: Tensor | None = None  # rows left over from the last forward, fewer than a batch [n, d_in]
    y_wait: Tensor | None = None  # their targets [n, d_out]
    sums: dict[str, float] = field(
        default_factory=lambda: {"loss": 0.0, "fvu_num": 0.0, "fvu_den": 0.0, "l0": 0.0, "n": 0.0}
    )


def _step(run: _Run, x: Tensor, y: Tensor, cfg: TrainConfig, lr: float) -> None:
    tc = run.tc
    for group in run.opt.param_groups:
        group["lr"] = lr
    n = x.shape[0]
    if cfg.arch == "topk":
        with torch.no_grad():
            pre = x @ tc.W_enc + tc.b_enc
            _, idx = pre.topk(cfg.k, dim=-1, sorted=False)
        vals = _GatherPre.apply(x, tc.W_enc, tc.b_enc, pre, idx).relu()
        y_hat = _sparse_decode(vals, idx, tc.W_dec) + tc.b_dec
        fired = torch.zeros(tc.width, dtype=torch.bool, device=x.device)
        fired[idx[vals.detach() > 0]] = True
        l0 = float((vals.detach() > 0).sum()) / n
        sparsity = None
    else:
        f = (x @ tc.W_enc + tc.b_enc).relu()
        y_hat = f @ tc.W_dec + tc.b_dec
        fired = (f.detach() > 0).any(0)
        l0 = float((f.detach() > 0).sum()) / n
        sparsity = cfg.l1_coeff * (f * tc.W_dec.norm(dim=1)).sum(-1).mean()
    if tc.W_skip is not None:
        y_hat = y_hat + x @ tc.W_skip
    err = y - y_hat
    mse = err.pow(2).sum(-1).mean()
    loss = mse / y.shape[1]
    if sparsity is not None:
        loss = loss + sparsity
    run.since_fired += n
    run.since_fired[fired] = 0
    dead = run.since_fired >= cfg.dead_tokens
    n_dead = int(dead.sum())
    if cfg.arch == "topk" and n_dead and cfg.aux_coeff > 0:
        k_aux = min(cfg.aux_k, n_dead)
        with torch.no_grad():
            pre_d = pre.masked_fill(~dead, float("-inf"))
            _, idx_d = pre_d.topk(k_aux, dim=-1, sorted=False)
        vals_d = _GatherPre.apply(x, tc.W_enc, tc.b_enc, pre, idx_d).relu()
        e = err.detach()
        e_hat = _sparse_decode(vals_d, idx_d, tc.W_dec)
        den = (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        aux = (e - e_hat).pow(2).sum(-1).mean() / den
        loss = loss + cfg.aux_coeff * min(n_dead / cfg.aux_k, 1.0) * aux
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    with torch.no_grad():
        s = run.sums
        s["loss"] += float(loss) * n
        s["fvu_num"] += float(mse) * n
        s["fvu_den"] += float((y - y.mean(0)).pow(2).sum(-1).mean()) * n
        s["l0"] += l0 * n
        s["n"] += n
    run.tokens += n
    run.steps += 1


def _transcoder_config(L: int, hm: Any, cfg: TrainConfig, d_in: int, d_out: int) -> TranscoderConfig:
    return TranscoderConfig(
        layer=L, d_in=d_in, d_out=d_out, width=cfg.width, arch=cfg.arch, k=cfg.k, skip=cfg.skip,
        hook_in=hook_name("mlp_in", L), hook_out=hook_name("mlp_out", L), model=hm.name,
        skip_first=cfg.skip_first, norm_ratio=cfg.norm_ratio, seed=cfg.seed + L,
    )  # fmt: skip


def _adam(tc: Transcoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(tc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))


def _init_run(L: int, hm: Any, cfg: TrainConfig, x: Tensor, y: Tensor, medians: tuple[float, float]) -> _Run:
    """A fresh transcoder for layer ``L``; its normalisation from the first kept rows ``x``, ``y``."""
    d_in, d_out = x.shape[1], y.shape[1]
    tc = Transcoder(_transcoder_config(L, hm, cfg, d_in, d_out), device=x.device)
    x64, y64 = x.double(), y.double()
    var_in = float((x64 - x64.mean(0)).pow(2).sum(-1).mean())
    var_out = float((y64 - y64.mean(0)).pow(2).sum(-1).mean())
    s_in = math.sqrt(d_in / var_in) if var_in > 0 else 1.0
    s_out = math.sqrt(d_out / var_out) if var_out > 0 else 1.0
    with torch.no_grad():
        tc.b_dec.copy_((y64.mean(0) * s_out).float())
        # encoder columns and decoder rows of norm ~1 in normalised units; pre-activations start centred
        tc.b_enc.copy_(-(x64.mean(0) * s_in).float() @ tc.W_enc)
        tc.W_dec.mul_(0.1)
    since = torch.zeros(cfg.width, dtype=torch.long, device=x.device)
    return _Run(tc, _adam(tc, cfg), since, s_in, s_out, medians[0], medians[1])


# ---------------------------------------------------------------------------------------- checkpoints
def check_checkpoint_dir(d: str | Path) -> None:
    """ConfigError unless ``d`` is absent, an empty folder or a checkpoint folder (it is replaced whole at
    each save and removed at the end: a folder holding anything else is refused)."""
    check_dir(d, (CKPT_STATE, CKPT_META), "a transcoder checkpoint")


def _checkpoint_key(hm: Any, cfg: TrainConfig, layers: Sequence[int], ids: Sequence[Sequence[int]]) -> str:
    """What a checkpoint must match to be resumed: the training config, the model, the layers and the
    training tokens in their order."""
    train = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_KEY}
    data = sha256_bytes(json.dumps([list(d) for d in ids]).encode())
    model = {"name": hm.name, "n_layers": hm.cfg.n_layers, "d_model": hm.cfg.d_model}
    return json.dumps(
        {"train": train, "model": model, "layers": list(layers), "tokens": data}, sort_keys=True
    )


def _save_checkpoint(
    d: Path, key: str, runs: dict[int, _Run], gen: torch.Generator, forwards: int, seen: int, seconds: float
) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {"generator": gen.get_state()}
    meta_runs: dict[str, Any] = {}
    for L, run in runs.items():
        for name, t in run.tc.state_dict().items():
            tensors[f"{L}.tc.{name}"] = t.detach().cpu().contiguous()
        for pid, st in run.opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"{L}.opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors[f"{L}.since_fired"] = run.since_fired.cpu()
        if run.x_wait is not None and run.y_wait is not None:
            tensors[f"{L}.x_wait"] = run.x_wait.cpu().contiguous()
            tensors[f"{L}.y_wait"] = run.y_wait.cpu().contiguous()
        meta_runs[str(L)] = {"s_in": run.s_in, "s_out": run.s_out, "median_in": run.median_in,
                             "median_out": run.median_out, "tokens": run.tokens, "taken": run.taken,
                             "steps": run.steps, "sums": run.sums}  # fmt: skip
    meta = {"format": CKPT_FORMAT, "key": key, "forwards": forwards, "tokens": seen, "seconds": seconds,
            "runs": meta_runs}  # fmt: skip
    with atomic_dir(d, overwrite=True) as tmp:  # the previous checkpoint is replaced whole
        save_file(tensors, str(tmp / CKPT_STATE))
        (tmp / CKPT_META).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def _load_checkpoint(
    d: Path, key: str, hm: Any, cfg: TrainConfig, gen: torch.Generator
) -> tuple[dict[int, _Run], int, int, float] | None:
    """``(runs, forwards done, tokens seen, seconds)`` of the checkpoint in ``d`` (``gen`` restored), or
    ``None`` when there is none; ConfigError when it was written by a run with another key."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(d, CKPT_STATE, CKPT_META)
    if meta is None:
        return None
    if meta.get("format") != CKPT_FORMAT or meta.get("key") != key:
        raise ConfigError(
            f"checkpoint {d} was written by a run with another training config, model, layers or data; "
            "remove it or choose another checkpoint_dir"
        )
    t = load_file(str(d / CKPT_STATE))
    gen.set_state(t["generator"])
    runs: dict[int, _Run] = {}
    for name, m in meta["runs"].items():
        L = int(name)
        sd = {n[len(f"{L}.tc.") :]: v for n, v in t.items() if n.startswith(f"{L}.tc.")}
        tc = Transcoder(_transcoder_config(L, hm, cfg, sd["W_enc"].shape[0], sd["W_dec"].shape[1]))
        tc.load_state_dict(sd)
        tc.to(hm.device)
        opt = _adam(tc, cfg)
        osd = opt.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for n, v in t.items():
            if n.startswith(f"{L}.opt."):
                _, _, pid, k = n.split(".", 3)
                state.setdefault(int(pid), {})[k] = v
        osd["state"] = state
        opt.load_state_dict(osd)
        run = _Run(tc, opt, t[f"{L}.since_fired"].to(hm.device), m["s_in"], m["s_out"], m["median_in"],
                   m["median_out"], m["tokens"], m["taken"], m["steps"], sums=dict(m["sums"]))  # fmt: skip
        if f"{L}.x_wait" in t:
            run.x_wait, run.y_wait = t[f"{L}.x_wait"].to(hm.device), t[f"{L}.y_wait"].to(hm.device)
        runs[L] = run
    return runs, int(meta["forwards"]), int(meta["tokens"]), float(meta["seconds"])


def train_transcoders(
    hm: Any,
    documents: Sequence[str],
    cfg: TrainConfig | None = None,
    *,
    progress: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TranscoderSet, list[str]]:
    """Train one transcoder per chosen layer of ``hm`` on ``documents`` (module docstring).

    Returns ``(set, heldout_documents)``: the trained :class:`TranscoderSet` (raw units, sink rule and
    training record in each config) and the documents held out for evaluation. ``on_log(record)`` is
    called after each forward pass with ``{forwards, tokens, seconds}`` (``tokens``: the fewest any layer
    has taken). With ``cfg.checkpoint_dir`` a checkpoint there is resumed (module docstring).
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    layers = resolve_layers(hm, cfg.layers)
    train_docs, held = split_documents(documents, cfg.heldout, cfg.seed)
    # a margin over the budget: the norm test leaves out a few more tokens than the first positions
    ids = tokenize_documents(
        hm.tokenizer, train_docs, cfg.max_length, cfg.max_tokens * 11 // 10, cfg.skip_first
    )
    if not ids:
        raise DataError("no training document has 2 or more tokens")
    kept_est = sum(max(0, len(d) - cfg.skip_first) for d in ids)
    if kept_est == 0:
        raise DataError(f"every training token is among the first {cfg.skip_first} of its document")
    budget = min(cfg.max_tokens, kept_est)
    # every layer trains on `budget` tokens in full batches but the last: the number of optimiser steps is
    # known before the first one (fewer only when the sink rule leaves fewer than `budget` tokens)
    steps_total = max(1, math.ceil(budget / cfg.batch_size))
    warmup = round(cfg.warmup_frac * steps_total)

    def train_on(run: _Run, x: Tensor, y: Tensor) -> None:
        for s in range(0, x.shape[0], cfg.batch_size):
            lr = cfg.lr * lr_factor(run.steps, steps_total, warmup, cfg.decay_frac)
            _step(run, x[s : s + cfg.batch_size], y[s : s + cfg.batch_size], cfg, lr)

    hooks = mlp_hooks(layers)
    gen = torch.Generator().manual_seed(cfg.seed)
    runs: dict[int, _Run] = {}
    seen = start = 0
    before = 0.0  # seconds spent by the run(s) that wrote the checkpoint
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    key = _checkpoint_key(hm, cfg, layers, ids) if ckpt is not None else ""
    if ckpt is not None:
        got = _load_checkpoint(ckpt, key, hm, cfg, gen)
        if got is not None:
            runs, start, seen, before = got
    t0 = time.time() - before
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=budget, initial=seen, unit="tok", desc=f"transcoders x{len(layers)}", file=sys.stderr,
                   leave=False)  # fmt: skip
    per = cfg.docs_per_forward
    try:
        for forward, enc in enumerate(token_batches(hm, ids[start * per :], per), start=start + 1):
            if len(runs) == len(layers) and all(r.taken >= budget for r in runs.values()):
                break
            with torch.no_grad():
                _, cache = hm.run_with_cache(enc, hooks=hooks, stop_early=True)
            mask = enc["attention_mask"]
            for L in layers:
                run = runs.get(L)
                if run is not None and run.taken >= budget:
                    continue
                x_all = cache[hook_name("mlp_in", L)].float()
                y_all = cache[hook_name("mlp_out", L)].float()
                keep = keep_mask(x_all, y_all, mask, cfg.skip_first, cfg.norm_ratio,
                                 None if run is None else (run.median_in, run.median_out))  # fmt: skip
                x, y = x_all[keep.mask], y_all[keep.mask]
                if run is None:
                    run = runs[L] = _init_run(L, hm, cfg, x, y, keep.medians)
                n = min(x.shape[0], budget - run.taken)
                perm = torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)
                x, y = x[perm] * run.s_in, y[perm] * run.s_out
                if run.x_wait is not None and run.y_wait is not None:
                    x, y = torch.cat([run.x_wait, x]), torch.cat([run.y_wait, y])
                run.taken += n
                # the last batch of the budget may be short; before it, a partial batch waits
                full = x.shape[0] if run.taken >= budget else x.shape[0] // cfg.batch_size * cfg.batch_size
                train_on(run, x[:full], y[:full])
                run.x_wait, run.y_wait = x[full:], y[full:]
            del cache
            n_batch = min((r.taken for r in runs.values()), default=0) - seen
            seen += n_batch
            if bar is not None:
                bar.update(n_batch)
                fvus = [r.sums["fvu_num"] / max(r.sums["fvu_den"], 1e-12) for r in runs.values()]
                bar.set_postfix(fvu=f"{sum(fvus) / len(fvus):.3f}")
            if ckpt is not None and cfg.checkpoint_every and forward % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, key, runs, gen, forward, seen, time.time() - t0)
            if on_log is not None:
                on_log({"forwards": forward, "tokens": seen, "seconds": time.time() - t0})
    finally:
        if bar is not None:
            bar.close()
    if not runs:
        raise DataError("no training tokens were left after the attention-sink rule")
    for run in runs.values():  # the corpus ran out before the budget: the rows left over take one last step
        if run.x_wait is not None and run.y_wait is not None and run.x_wait.shape[0]:
            train_on(run, run.x_wait, run.y_wait)
        run.x_wait = run.y_wait = None
    elapsed = time.time() - t0
    tcs: dict[int, Transcoder] = {}
    for L, run in runs.items():
        tc = run.tc
        tc.eval()
        for p in tc.parameters():
            p.requires_grad_(False)
        tc.fold_scales(run.s_in, run.s_out)
        sums = run.sums
        tc.cfg.tokens = run.tokens
        tc.cfg.median_norm_in = run.median_in
        tc.cfg.median_norm_out = run.median_out
        tc.cfg.info = {
            "train_fvu": sums["fvu_num"] / max(sums["fvu_den"], 1e-12),
            "train_l0": sums["l0"] / max(sums["n"], 1),
            "steps": run.steps,
            "steps_planned": steps_total,
            "dead_fraction_train": float((run.since_fired >= cfg.dead_tokens).double().mean()),
        }
        tcs[L] = tc
    if ckpt is not None and ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)  # finished: the set is the result
    train = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_KEY}
    info = {"train": train, "tokens": seen, "seconds": elapsed, "n_train_documents": len(ids),
            "n_heldout_documents": len(held)}  # fmt: skip
    return TranscoderSet(hm.name, tcs, info=info), held
