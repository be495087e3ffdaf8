"""The SAE trainer: several SAEs from one pass over an activation store (or a tensor), one file.

Per step, one global batch of ``batch_size`` rows is drawn (see *Data* below) and every SAE takes an
Adam step on it. Under ``torchrun`` rank ``r`` computes the loss on its slice of the same global batch
(its own reads only), gradients are summed with ``all_reduce`` and everything else that spans the batch
(BatchTopK's cutoff and threshold, dead-latent counts) is reduced too, so ``world`` ranks give the same
SAEs as one rank up to float rounding.

Data: rows are visited in chunks of ``chunk_rows`` contiguous rows in a seeded random order; the rows of
``buffer_size // chunk_rows`` chunks form a shuffle buffer whose rows are permuted and cut into batches
(what does not fill a batch carries over). Only row *indices* are buffered; each batch's rows are read
from the memory-mapped store when needed, so memory is one batch, whatever the store's size. The plan is
a pure function of the seed, so a resumed run sees exactly the batches of an uninterrupted one.

Losses, per token. Inputs are scaled so that ``E||x - mean||^2 = d_in`` (the variance about the mean, not
``E||x||^2``: residual streams have large means, which ``b_dec`` takes, and the sparsity penalty should
not depend on them); the scale is measured on ``norm_rows`` rows, ``b_dec`` starts at their mean, and the
scale is folded into the saved weights:

* relu: ``||x - x_hat||^2 + l1 * sum_i z_i ||W_dec_i||`` (the L1 coefficient ramps up over the first
  ``l1_warmup_frac`` of steps); decoder norms are free in training and folded at the end.
* topk / batchtopk: ``||x - x_hat||^2 + aux_coeff * AuxK`` (Gao et al. 2024): the ``aux_k`` largest
  pre-activations of the dead latents reconstruct the residual ``x - x_hat``; scaled down by
  ``min(n_dead / aux_k, 1)``. Decoder rows are kept unit-norm (the gradient's component along each row
  is removed before the step, rows renormalised after). BatchTopK keeps the ``k * batch`` largest
  ``relu(pre)`` of the batch and learns its inference threshold as a bias-corrected running mean of the
  smallest kept activation per batch.
* jumprelu: ``||x - x_hat||^2 + l0 * ||z||_0`` with straight-through threshold gradients (rectangle
  kernel, ``jumprelu_bandwidth``); decoder rows unit-norm.

A latent is dead when it has not fired for ``dead_tokens`` tokens; dense when it fires on more than
``dense_threshold`` of the tokens of the last log window. Learning rate: linear warm-up over
``lr_warmup_steps``, constant, linear decay to 0 over the last ``lr_decay_frac`` of steps.
Checkpoints (every ``checkpoint_every`` steps, into ``checkpoint_dir``): ``state.safetensors``
(weights, Adam moments, trackers) + ``state.json``; a run with the same configs resumes from it.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.io import atomic_dir, check_checkpoint_dir, read_checkpoint_meta, sha256_bytes
from rosettalens.sae.model import SAE, SAEConfig

__all__ = ["TrainConfig", "train_saes", "train_sae"]

CKPT_STATE = "state.safetensors"
CKPT_META = "state.json"


@dataclass
class TrainConfig:
    """How to train (shared by every SAE of one run). ``tokens=None``: one pass over the data.

    ``lr=None``: ``2e-4 * sqrt(16384 / width)`` per SAE (Gao et al.'s scaling; an SAE's own ``lr`` wins).
    ``dead_tokens=None``: ``min(2_000_000, max(batch_size, tokens // 5))``.
    """

    batch_size: int = 4096
    tokens: int | None = None
    lr: float | None = None
    lr_warmup_steps: int | None = None
    lr_decay_frac: float = 0.2
    l1_warmup_frac: float = 0.05
    adam_betas: tuple[float, float] = (0.9, 0.999)
    chunk_rows: int = 2048
    buffer_size: int = 131072
    dead_tokens: int | None = None
    dense_threshold: float = 0.1
    norm_rows: int = 32768
    batchtopk_threshold_lr: float = 0.01
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    log_every: int = 0  # 0: about 100 log points per run

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError(f"tokens must be >= 1, got {self.tokens}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_decay_frac <= 1 or not 0 <= self.l1_warmup_frac <= 1:
            raise ConfigError("lr_decay_frac and l1_warmup_frac must be in [0, 1]")
        if self.chunk_rows < 1 or self.buffer_size < 1 or self.norm_rows < 1:
            raise ConfigError("chunk_rows, buffer_size and norm_rows must be >= 1")
        if self.checkpoint_every < 0 or (self.checkpoint_every and not self.checkpoint_dir):
            raise ConfigError("checkpoint_every needs a checkpoint_dir (and must be >= 0)")
        if self.checkpoint_dir:  # replaced whole at each save and removed at the end: refuse other files
            check_checkpoint_dir(self.checkpoint_dir, (CKPT_STATE, CKPT_META), "an SAE checkpoint")
        if not 0 < self.dense_threshold <= 1:
            raise ConfigError(f"dense_threshold must be in (0, 1], got {self.dense_threshold}")


# ------------------------------------------------------------------------------------------------ data
class _Source:
    """Rows ``[n, d]`` to train on: a store's hook (optionally a row range) or a tensor."""

    def __init__(self, data: Any, hook: str | None, rows: Any):
        from rosettalens.store import ActivationStore

        self.store: ActivationStore | None
        self.hook: str | None
        self.tensor: Tensor | None
        if isinstance(data, ActivationStore):
            if hook is None:
                if len(data.hooks) != 1:
                    raise ConfigError(
                        f"store {data.path} holds several hooks ({', '.join(data.hooks)}); name one"
                    )
                hook = data.hooks[0]
            if hook not in data.hooks:
                raise DataError(
                    f"store {data.path} has no hook {hook!r}; stored hooks: {', '.join(data.hooks)}"
                )
            shape = data.manifest["hook_shapes"][hook]
            self.d = int(math.prod(shape))
            self.store, self.hook, self.tensor = data, hook, None
            total = len(data)
        elif isinstance(data, Tensor):
            if data.dim() != 2:
                raise ShapeError(f"training data must be [n, d_in], got shape {tuple(data.shape)}")
            self.d = int(data.shape[1])
            self.store, self.hook, self.tensor = None, hook, data
            total = int(data.shape[0])
        else:
            raise ConfigError(
                f"training data must be an ActivationStore or a tensor, got {type(data).__name__}"
            )
        self.index: Tensor | None = None  # the rows trained on, when a subset (sorted, unique)
        if isinstance(rows, Tensor) or (rows is not None and not isinstance(rows, tuple)):
            index = torch.as_tensor(rows).long().reshape(-1).unique(sorted=True)
            if len(index) == 0 or int(index[0]) < 0 or int(index[-1]) >= total:
                raise ConfigError(f"training rows must be a non-empty subset of the data's {total} rows")
            self.index, self.r0, self.n = index, 0, len(index)
            return
        r0, r1 = rows if rows is not None else (0, total)
        if not 0 <= r0 < r1 <= total:
            raise ConfigError(f"row range {rows} is outside the data's {total} rows")
        self.r0, self.n = r0, r1 - r0

    def all_rows(self) -> Tensor:
        """Indices ``[n]`` of the rows trained on, in the data."""
        return self.index if self.index is not None else torch.arange(self.r0, self.r0 + self.n)

    def norms(self, chunk: int = 16384) -> Tensor:
        """Norms ``[n]`` (float64) of the rows trained on."""
        out = torch.empty(self.n, dtype=torch.float64)
        for s in range(0, self.n, chunk):
            e = min(self.n, s + chunk)
            out[s:e] = self.read(torch.arange(s, e)).double().norm(dim=1)
        return out

    def positions(self, given: Tensor | None) -> Tensor | None:
        """Position in its document ``[n]`` of each row trained on (a store's ``pos_index``; for a tensor,
        ``given`` positions of all its rows, or ``None``)."""
        if self.store is not None:
            return self.store.pos_index[self.all_rows()]
        if given is None:
            return None
        given = torch.as_tensor(given).long().reshape(-1)
        if self.tensor is not None and len(given) != self.tensor.shape[0]:
            raise ShapeError(
                f"positions has {len(given)} entries but the data has {self.tensor.shape[0]} rows"
            )
        return given[self.all_rows()]

    def restrict(self, keep: Tensor) -> None:
        """Train only on the rows trained on where ``keep [n]`` is true."""
        index = self.all_rows()[keep]
        if len(index) == 0:
            raise DataError(
                "the sink rule leaves no row to train on (every row is a first position or an outlier)"
            )
        self.index, self.r0, self.n = index, 0, len(index)

    def _rows(self, idx: Tensor) -> Tensor:
        return self.index[idx] if self.index is not None else idx + self.r0

    def read(self, idx: Tensor) -> Tensor:
        """Float32 rows ``[len(idx), d]`` (``idx`` into the rows trained on)."""
        if self.tensor is not None:
            return self.tensor[self._rows(idx)].float()
        assert self.store is not None and self.hook is not None
        return self.store.read(self.hook, self._rows(idx).numpy()).float().reshape(len(idx), self.d)

    def describe(self) -> dict[str, Any]:
        if self.index is not None:
            h = sha256_bytes(self.index.numpy().tobytes())[:16]
            rows: Any = {"subset": self.n, "sha256": h}
        else:
            rows = [self.r0, self.r0 + self.n]
        if self.store is not None:
            return {"store": str(self.store.path), "hook": self.hook, "rows": rows}
        return {"tensor": True, "rows": rows}


def batch_plan(n: int, batch_size: int, chunk_rows: int, buffer_size: int, seed: int) -> Iterator[Tensor]:
    """Endless global batches of row indices ``[batch_size]`` over ``range(n)`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    n_chunks = (n + chunk_rows - 1) // chunk_rows
    per_buf = max(1, buffer_size // chunk_rows)
    carry = torch.zeros(0, dtype=torch.long)
    while True:
        order = torch.randperm(n_chunks, generator=g)
        for s in range(0, n_chunks, per_buf):
            parts = [carry] + [
                torch.arange(int(c) * chunk_rows, min((int(c) + 1) * chunk_rows, n))
                for c in order[s : s + per_buf]
            ]
            rows = torch.cat(parts)
            rows = rows[torch.randperm(len(rows), generator=g)]
            nb = len(rows) // batch_size
            for b in range(nb):
                yield rows[b * batch_size : (b + 1) * batch_size]
            carry = rows[nb * batch_size :]


# ------------------------------------------------------------------------------------------ distributed
class _Dist:
    def __init__(self) -> None:
        from rosettalens.store import init_distributed

        self.rank, self.world, _ = init_distributed()

    def sum_(self, t: Tensor) -> Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def min_(self, t: Tensor) -> Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def gather_cat(self, t: Tensor, length: int, fill: float) -> Tensor:
        """Concatenate every rank's 1-d ``t`` (each padded to ``length`` with ``fill``)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        pad = torch.full((length,), fill, dtype=t.dtype, device=t.device)
        pad[: len(t)] = t
        out = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(out, pad)
        return torch.cat(out)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# --------------------------------------------------------------------------------------- sparse encoder
class _GatherPre(torch.autograd.Function):
    """``pre[b, idx[b, j]]`` with ``pre = (x - b_dec) @ W_enc + b_enc`` given (computed without grad); the
    backward touches only the selected ``[n, k]`` entries (one sparse product), never the dense
    ``[n, width]`` pre-activations. ``x`` itself gets no gradient (it is data); ``b_dec`` gets
    ``-W_enc @ grad_b_enc``."""

    @staticmethod
    def forward(ctx, x_in: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, idx: Tensor):
        ctx.save_for_backward(x_in, W_enc, idx)
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, g: Tensor):
        x_in, W_enc, idx = ctx.saved_tensors
        n, k = idx.shape
        w = W_enc.shape[1]
        cols = idx.reshape(-1)
        vals = g.reshape(-1)
        gW = gbd = None
        gb = torch.zeros(w, dtype=g.dtype, device=g.device).index_add_(0, cols, vals)
        if ctx.needs_input_grad[2]:
            rows = torch.arange(n, device=idx.device).repeat_interleave(k)
            Gt = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (w, n), check_invariants=False)
            gW = torch.sparse.mm(Gt, x_in).t()
        if ctx.needs_input_grad[1]:
            gbd = -(W_enc @ gb)
        return None, gbd, gW, gb if ctx.needs_input_grad[3] else None, None, None


def _sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """``sum_j vals[b, j] * W_dec[idx[b, j]]`` ``[n, d_in]`` (embedding bag: sparse forward and backward)."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


# ------------------------------------------------------------------------------------------- one SAE
class _Run:
    """One SAE's training state: the module, Adam, trackers."""

    def __init__(self, sae: SAE, lr: float, tcfg: TrainConfig, dead_tokens: int):
        self.sae = sae
        self.cfg = sae.cfg
        self.lr = lr
        self.opt = torch.optim.Adam(
            sae.parameters(), lr=lr, betas=(float(tcfg.adam_betas[0]), float(tcfg.adam_betas[1]))
        )
        w = sae.width
        self.since_fired = torch.zeros(w, dtype=torch.long)
        self.fire_count = torch.zeros(w, dtype=torch.float64)
        self.window_tokens = 0
        self.thr_ema = 0.0  # batchtopk: running threshold (bias-corrected by thr_decay)
        self.thr_decay = 1.0
        self.dead_tokens = dead_tokens
        self.stats = {"sse": 0.0, "var": 0.0, "l0": 0.0, "n": 0.0, "aux": 0.0}
        self.last: dict[str, float] = {}

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.dead_tokens


def _unit_norm_arch(arch: str) -> bool:
    return arch in ("topk", "batchtopk", "jumprelu")


def _step_loss(
    run: _Run, x: Tensor, B: int, dist: _Dist, l1_scale: float, thr_lr: float
) -> tuple[Tensor, Tensor]:
    """Loss on this rank's rows ``x [b, d_in]`` (normalised; summed, divided by the global batch ``B``)
    and the per-latent fire counts ``[width]`` of these rows."""
    sae, cfg = run.sae, run.cfg
    arch = cfg.arch
    dead = run.dead_mask().to(x.device)
    n_dead = int(dead.sum())
    aux_coeff = cfg.aux_coeff_
    with torch.no_grad():
        x_in_ng = x - sae.b_dec
        # TopK needs the pre-activations only without grad (its backward is sparse); the others with grad
        pre_ng = torch.addmm(sae.b_enc, x_in_ng, sae.W_enc) if arch == "topk" else None
    if arch == "topk":
        assert pre_ng is not None
        _, idx = pre_ng.topk(int(cfg.k), dim=-1, sorted=False)  # type: ignore[arg-type]
        vals = _GatherPre.apply(x_in_ng, sae.b_dec, sae.W_enc, sae.b_enc, pre_ng, idx).relu()
        x_hat = _sparse_decode(vals, idx, sae.W_dec) + sae.b_dec
        fired = torch.zeros(sae.width, dtype=torch.float64, device=x.device).index_add_(
            0, idx.reshape(-1), (vals.detach() > 0).reshape(-1).double()
        )
        nnz = float((vals.detach() > 0).sum())
        penalty = None
    else:
        pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
        pre_ng = pre.detach()
        if arch == "relu":
            z = pre.relu()
            penalty = cfg.l1_coeff * l1_scale * (z * sae.W_dec.norm(dim=1)).sum()
        elif arch == "jumprelu":
            assert sae.threshold is not None
            z = _jumprelu(pre, sae.threshold, cfg.jumprelu_bandwidth)
            penalty = cfg.l0_coeff * _step(pre, sae.threshold, cfg.jumprelu_bandwidth).sum()
        else:  # batchtopk: the k * B largest relu(pre) of the global batch
            r = pre.relu()
            kk = int(cfg.k) * B  # type: ignore[arg-type]
            with torch.no_grad():
                flat = r.detach().reshape(-1)
                local = flat.topk(min(kk, flat.numel()), sorted=False).values
                allv = dist.gather_cat(local, kk, -1.0)
                cutoff = allv.topk(min(kk, allv.numel()), sorted=False).values.min()
                keep = (r.detach() >= cutoff) & (r.detach() > 0)
                kept_min = torch.where(keep, r.detach(), torch.full_like(r, float("inf"))).min().reshape(1)
                kept_min = dist.min_(kept_min.double())
            z = r * keep.to(r.dtype)
            if math.isfinite(float(kept_min)):
                run.thr_ema = (1 - thr_lr) * run.thr_ema + thr_lr * float(kept_min)
                run.thr_decay *= 1 - thr_lr
                with torch.no_grad():
                    assert sae.threshold is not None
                    sae.threshold.fill_(run.thr_ema / (1 - run.thr_decay))
            penalty = None
        x_hat = z @ sae.W_dec + sae.b_dec
        fired = (z.detach() > 0).sum(0).double()
        nnz = float(fired.sum())
    e = x - x_hat
    sse = e.pow(2).sum()
    loss = sse / B
    if penalty is not None:
        loss = loss + penalty / B
    aux_val = 0.0
    if aux_coeff > 0 and n_dead > 0:
        k_aux = min(cfg.aux_k_, n_dead)
        masked = pre_ng.masked_fill(~dead[None, :], float("-inf"))
        _, aidx = masked.topk(k_aux, dim=-1, sorted=False)
        avals = _GatherPre.apply(x_in_ng, sae.b_dec, sae.W_enc, sae.b_enc, pre_ng, aidx).relu()
        e_hat = _sparse_decode(avals, aidx, sae.W_dec)
        aux = (e_hat - e.detach()).pow(2).sum() / B
        loss = loss + aux_coeff * min(n_dead / cfg.aux_k_, 1.0) * aux
        aux_val = float(aux.detach())
    with torch.no_grad():
        xc = x - x.mean(0)
        st = run.stats
        st["sse"] += float(sse)
        st["var"] += float(xc.pow(2).sum())
        st["l0"] += nnz
        st["n"] += x.shape[0]
        st["aux"] += aux_val * x.shape[0]
    return loss, fired


def _jumprelu(pre: Tensor, thr: Tensor, bw: float) -> Tensor:
    from rosettalens.sae.model import jumprelu

    return jumprelu(pre, thr, bw)


def _step(pre: Tensor, thr: Tensor, bw: float) -> Tensor:
    from rosettalens.sae.model import step

    return step(pre, thr, bw)


def lr_factor(step: int, steps: int, warmup: int, decay_frac: float) -> float:
    """The learning-rate multiplier at ``step`` of ``steps``: linear warm-up over ``warmup`` steps, linear
    decay to 0 over the last ``decay_frac`` of the steps (the smaller of the two where they overlap)."""
    f = 1.0
    if warmup > 0 and step < warmup:
        f = (step + 1) / warmup
    decay = int(steps * decay_frac)
    if decay > 0 and step >= steps - decay:
        f = min(f, (steps - step) / decay)
    return f


# ---------------------------------------------------------------------------------------- checkpoints
def _config_key(cfgs: Sequence[SAEConfig], tcfg: TrainConfig, src: dict[Any, _Source]) -> str:
    t = {
        k: v
        for k, v in asdict(tcfg).items()
        if k not in ("checkpoint_dir", "checkpoint_every", "device", "log_every")
    }
    return json.dumps(
        {"saes": [c.to_dict() for c in cfgs], "train": t, "data": [s.describe() for s in src.values()]},
        sort_keys=True,
    )


def _save_checkpoint(d: Path, runs: list[_Run], step: int, key: str, history: list) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    meta_runs = []
    for i, run in enumerate(runs):
        for name, t in run.sae.state_dict().items():
            tensors[f"{i}.sae.{name}"] = t.detach().cpu().contiguous()
        osd = run.opt.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"{i}.opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors[f"{i}.since_fired"] = run.since_fired.cpu()
        tensors[f"{i}.fire_count"] = run.fire_count.cpu()
        meta_runs.append(
            {
                "thr_ema": run.thr_ema,
                "thr_decay": run.thr_decay,
                "window_tokens": run.window_tokens,
                "input_scale": run.sae.input_scale,
                "stats": run.stats,
            }
        )
    meta = {
        "format": "rosettalens.sae_checkpoint/1",
        "step": step,
        "key": key,
        "runs": meta_runs,
        "history": history,
    }
    with atomic_dir(d, overwrite=True) as tmp:  # the previous checkpoint is replaced whole
        save_file(tensors, str(tmp / CKPT_STATE))
        (tmp / CKPT_META).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def _load_checkpoint(d: Path, runs: list[_Run], key: str) -> tuple[int, list] | None:
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(d, CKPT_STATE, CKPT_META)
    if meta is None:
        return None
    if meta.get("key") != key:
        raise ConfigError(
            f"checkpoint {d} was written by a run with other SAE/training configs or data; "
            "remove it or choose another checkpoint_dir"
        )
    t = load_file(str(d / CKPT_STATE))
    for i, run in enumerate(runs):
        sd = {name[len(f"{i}.sae.") :]: v for name, v in t.items() if name.startswith(f"{i}.sae.")}
        run.sae.load_state_dict(sd)
        osd = run.opt.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for name, v in t.items():
            if name.startswith(f"{i}.opt."):
                _, _, pid, k = name.split(".", 3)
                state.setdefault(int(pid), {})[k] = v
        osd["state"] = state
        run.opt.load_state_dict(osd)
        run.since_fired = t[f"{i}.since_fired"].clone()
        run.fire_count = t[f"{i}.fire_count"].clone()
        m = meta["runs"][i]
        run.thr_ema, run.thr_decay, run.window_tokens = m["thr_ema"], m["thr_decay"], m["window_tokens"]
        run.sae.input_scale = m["input_scale"]
        run.stats = m["stats"]
    return int(meta["step"]), list(meta.get("history", []))


# ------------------------------------------------------------------------------------------- training
def train_saes(
    data: Any,
    cfgs: Sequence[SAEConfig],
    tcfg: TrainConfig | None = None,
    *,
    hook: str | None = None,
    rows: tuple[int, int] | Tensor | None = None,
    positions: Tensor | None = None,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
) -> list[SAE]:
    """Train every SAE of ``cfgs`` on the same batches, from one pass over ``data``.

    data: an :class:`~rosettalens.store.ActivationStore` (``hook`` names the hook point; optional when the
    store holds one; an SAE whose config names its own ``hook`` reads that hook point, so SAEs of several
    layers train from one pass) or a tensor ``[n, d_in]``; ``rows=(start, stop)`` restricts training to a
    row range (e.g. to hold out the rest), a tensor of row indices a subset (e.g. ``torch.nonzero(
    store.pos_index > 0)`` leaves out the first token of every document, whose residual norm is often
    100 times the others' and would dominate the input scale and the FVU).

    Positions left out (:mod:`rosettalens.sae.sinks`): the SAE configs' sink rule (``skip_first``,
    ``norm_ratio``; every config of one call must share it) removes, from the rows above, the first
    positions of every document (a store's ``pos_index``; for a tensor, ``positions [n]`` when given)
    and rows whose norm exceeds ``norm_ratio`` x the median norm (per hook, over the rows at positions
    ``>= skip_first``; a row left out at one hook is left out at all). Each SAE records its hook's
    median as ``cfg.median_norm``, so that evaluation and splicing apply the same threshold.

    Returns the trained SAEs (normalisation and, for relu, decoder norms folded; ``sae.info`` holds the
    training record). Under ``torchrun`` every rank returns the same SAEs.
    ``on_log(record)`` is called at each log point with ``{step, tokens, saes: [{fvu, l0, dead_fraction,
    dense_fraction, lr}]}``.
    """
    tcfg = tcfg or TrainConfig()
    tcfg.validate()
    cfgs = list(cfgs)
    if not cfgs:
        raise ConfigError("no SAE configs to train")
    for c in cfgs:
        c.validate()
    from rosettalens.store import ActivationStore

    srcs: dict[Any, _Source] = {}
    keys = []
    for c in cfgs:  # on a store, an SAE's own hook (if set) names its hook point: one pass, several layers
        h = (c.hook or hook) if isinstance(data, ActivationStore) else hook
        if h not in srcs:
            srcs[h] = _Source(data, h, rows)
        src = srcs[h]
        keys.append(h)
        if c.d_in != src.d:
            what = f"store {src.store.path} hook {src.hook}" if src.store is not None else "the training data"
            raise ShapeError(f"{what} has width {src.d} but the SAE config has d_in={c.d_in}")
        if src.hook and c.hook is None:
            c.hook = src.hook
        if src.store is not None and c.model is None:
            c.model = src.store.manifest.get("model", {}).get("name")
    rule = cfgs[0].sink_rule()
    if any((c.skip_first, c.norm_ratio) != (rule.skip_first, rule.norm_ratio) for c in cfgs):
        raise ConfigError("SAEs trained in one pass must share their sink rule (skip_first, norm_ratio)")
    sinks = _apply_sinks(srcs, cfgs, keys, rule, positions)
    src = next(iter(srcs.values()))
    B = tcfg.batch_size
    if src.n < B:
        raise DataError(f"the data has {src.n} rows, fewer than one batch ({B}); lower batch_size")
    tokens = tcfg.tokens if tcfg.tokens is not None else src.n
    steps = tokens // B
    if steps < 1:
        raise ConfigError(f"tokens={tokens} is less than one batch ({B})")
    dead_tokens = tcfg.dead_tokens or min(2_000_000, max(B, tokens // 5))
    warmup = tcfg.lr_warmup_steps if tcfg.lr_warmup_steps is not None else min(1000, max(1, steps // 20))
    log_every = tcfg.log_every or max(1, steps // 100)
    device = torch.device(tcfg.device)

    dist = _Dist()
    saes = _train(
        srcs, keys, cfgs, tcfg, dist, B, steps, dead_tokens, warmup, log_every, device, progress, on_log
    )
    for sae in saes:
        sae.info["train"]["sinks"] = sinks
    return saes


def _apply_sinks(
    srcs: dict[Any, _Source], cfgs: list[SAEConfig], keys: list, rule: Any, positions: Tensor | None
) -> dict[str, Any]:
    """Restrict every source to the rows kept under ``rule`` (the same rows for every hook) and record
    each hook's median norm in the SAE configs; returns the record for ``sae.info``."""
    first = next(iter(srcs.values()))
    n_before = first.n
    keep = torch.ones(n_before, dtype=torch.bool)
    pos = first.positions(positions)
    if pos is not None and rule.skip_first > 0:
        keep &= pos >= rule.skip_first
    medians: dict[Any, float | None] = {}
    for h, src in srcs.items():
        if rule.norm_ratio == 0:
            medians[h] = None
            continue
        norms = src.norms()
        ref = norms[keep] if keep.any() else norms
        med = rule.median_norm if rule.median_norm is not None else float(ref.median())
        medians[h] = med
        if med > 0:
            keep &= norms <= rule.norm_ratio * med
    if not bool(keep.all()):
        for src in srcs.values():
            src.restrict(keep)
    for c, h in zip(cfgs, keys, strict=True):
        c.median_norm = medians[h]
    return {
        "skip_first": rule.skip_first,
        "norm_ratio": rule.norm_ratio,
        "positions_known": pos is not None,
        "rows_left_out": int(n_before - int(keep.sum())),
        "rows_kept": int(keep.sum()),
        "median_norm": {str(h): m for h, m in medians.items()},
    }


def _train(srcs, keys, cfgs, tcfg, dist, B, steps, dead_tokens, warmup, log_every, device, progress, on_log):
    rank, world = dist.rank, dist.world
    n = next(iter(srcs.values())).n
    # input normalisation per hook: E||(x - mean) * scale||^2 = d_in on a seeded sample of rows
    g = torch.Generator().manual_seed(tcfg.seed + 1)
    sample_idx = torch.randperm(n, generator=g)[: min(n, tcfg.norm_rows)].sort().values
    norm: dict[Any, tuple[float, Tensor]] = {}
    for h, src in srcs.items():
        sample = src.read(sample_idx).double()
        mu = sample.mean(0)
        var = float((sample - mu).pow(2).sum(1).mean())
        if not math.isfinite(var) or var <= 0:
            raise DataError(f"the training activations{f' of {h}' if h else ''} are constant or not finite")
        scale = math.sqrt(src.d / var)
        norm[h] = (scale, (mu * scale).float())
        del sample

    runs: list[_Run] = []
    for c, h in zip(cfgs, keys, strict=True):
        sae = SAE(c).to(device)
        with torch.no_grad():
            sae.scale.fill_(norm[h][0])
            sae.b_dec.copy_(norm[h][1])
        lr = c.lr or tcfg.lr or 2e-4 * math.sqrt(16384 / c.width)
        runs.append(_Run(sae, lr, tcfg, dead_tokens))

    key = _config_key(cfgs, tcfg, srcs)
    ckpt = Path(tcfg.checkpoint_dir) if tcfg.checkpoint_dir else None
    start, history = 0, []
    if ckpt is not None:
        got = _load_checkpoint(ckpt, runs, key)
        if got is not None:
            start, history = got
            for run in runs:
                run.sae.to(device)

    from tqdm import tqdm

    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"train {len(runs)} SAE{'s' if len(runs) > 1 else ''}",
        unit="step",
        disable=not progress or rank != 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    plan = batch_plan(n, B, tcfg.chunk_rows, tcfg.buffer_size, tcfg.seed)
    for _ in range(start):
        next(plan)
    n_sae = len(runs)
    for step in range(start, steps):
        idx = next(plan)
        lo, hi = rank * B // world, (rank + 1) * B // world
        xs = {h: src.read(idx[lo:hi]).to(device) for h, src in srcs.items()}
        f_lr = lr_factor(step, steps, warmup, tcfg.lr_decay_frac)
        l1_scale = (
            min(1.0, (step + 1) / max(1, int(steps * tcfg.l1_warmup_frac))) if tcfg.l1_warmup_frac else 1.0
        )
        for run, h in zip(runs, keys, strict=True):
            sae = run.sae
            x = xs[h] * sae.scale
            for pg in run.opt.param_groups:
                pg["lr"] = run.lr * f_lr
            run.opt.zero_grad(set_to_none=True)
            loss, fired = _step_loss(run, x, B, dist, l1_scale, tcfg.batchtopk_threshold_lr)
            loss.backward()
            for p in sae.parameters():
                if p.grad is not None:
                    dist.sum_(p.grad)
            if _unit_norm_arch(sae.arch) and sae.W_dec.grad is not None:
                with torch.no_grad():
                    W, G = sae.W_dec, sae.W_dec.grad
                    G -= (G * W).sum(1, keepdim=True) * W
            run.opt.step()
            with torch.no_grad():
                if _unit_norm_arch(sae.arch):
                    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
                if sae.arch == "jumprelu":
                    assert sae.threshold is not None
                    sae.threshold.clamp_(min=1e-6)
            fired = dist.sum_(fired.cpu())
            run.since_fired += B
            run.since_fired[fired > 0] = 0
            run.fire_count += fired
            run.window_tokens += B
        done = step + 1
        if done % log_every == 0 or done == steps:
            rec = {"step": done, "tokens": done * B, "saes": []}
            for run in runs:
                st = run.stats
                sums = torch.tensor([st["sse"], st["var"], st["l0"], st["n"]], dtype=torch.float64)
                sums = dist.sum_(sums)
                freq = run.fire_count / max(1, run.window_tokens)
                run.last = {
                    "fvu": float(sums[0] / sums[1]) if sums[1] > 0 else float("nan"),
                    "l0": float(sums[2] / sums[3]) if sums[3] > 0 else float("nan"),
                    "dead_fraction": float(run.dead_mask().double().mean()),
                    "dense_fraction": float((freq > tcfg.dense_threshold).double().mean()),
                    "lr": run.lr * f_lr,
                }
                rec["saes"].append(dict(run.last))
                run.stats = {k: 0.0 for k in st}
                run.fire_count.zero_()
                run.window_tokens = 0
            history.append(rec)
            if on_log is not None and rank == 0:
                on_log(rec)
            if progress and rank == 0:
                shown = rec["saes"][: min(3, n_sae)]
                bar.set_postfix_str(
                    "fvu={} l0={} dead={}{}".format(
                        "/".join(f"{r['fvu']:.3f}" for r in shown),
                        "/".join(f"{r['l0']:.1f}" for r in shown),
                        "/".join(f"{100 * r['dead_fraction']:.0f}%" for r in shown),
                        f" (+{n_sae - 3} SAEs)" if n_sae > 3 else "",
                    ),
                    refresh=False,
                )
        if ckpt is not None and tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0 and done < steps:
            if rank == 0:
                _save_checkpoint(ckpt, runs, done, key, history)
            dist.barrier()
        bar.update(1)
    bar.close()

    out = []
    for i, run in enumerate(runs):
        sae = run.sae
        sae.zero_grad(set_to_none=True)
        if sae.arch == "relu":
            sae.fold_decoder_norms()
        sae.fold_scale()
        sae.eval()
        sae.info = {
            "train": {
                **{k: v for k, v in asdict(tcfg).items() if k not in ("checkpoint_dir",)},
                "lr": run.lr,
                "steps": steps,
                "tokens": steps * B,
                "lr_warmup_steps": warmup,
                "dead_tokens": dead_tokens,
                "world_size": world,
                "data": srcs[keys[i]].describe(),
            },
            "final": dict(run.last),
            "history": [{"step": h["step"], "tokens": h["tokens"], **h["saes"][i]} for h in history],
        }
        out.append(sae)
    if ckpt is not None and rank == 0 and ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)  # finished: the SAEs are the result
    dist.barrier()
    return out


def train_sae(data: Any, cfg: SAEConfig, tcfg: TrainConfig | None = None, **kw) -> SAE:
    """Train one SAE (see :func:`train_saes`)."""
    return train_saes(data, [cfg], tcfg, **kw)[0]
