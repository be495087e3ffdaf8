"""The crosscoder trainer: one file, read top to bottom.

Data: row-aligned paired activations, either two tensors ``x_a [n, d_a]``, ``x_b [n, d_b]`` or a
:class:`rosettalens.align.PairedStores` with its two hooks. Each epoch visits the rows in a seeded
random order, ``batch_size`` rows per step, so a run is a pure function of its seed.

Data parallel (``torchrun --nproc_per_node N``, as the SAE trainer): every rank draws the same global
batch and computes the loss on its slice of it (rows ``[r B / N, (r + 1) B / N)``, its own reads only);
the gradients are summed with ``all_reduce`` and everything that spans the batch is reduced too
(BatchTopK's ``k * batch`` cutoff from every rank's largest activations, the smallest kept activation
behind the threshold, fire counts behind the dead latents, the logged statistics), so ``N`` ranks train
the crosscoder of one rank up to float rounding and every rank returns it. (BatchTopK's cutoff is a
step: over many steps a rounding-level difference can flip a few near-cutoff activations and move a few
latents, exactly as a rounding-level change of the inputs does on one rank.) gloo on CPU, NCCL on GPU
(:func:`rosettalens.store.init_distributed`).

Scaling: each model's activations are multiplied by ``scale_m`` so that ``E ||(x_m - mean_m) scale_m||^2
= (d_a + d_b) / 2`` (measured on ``norm_rows`` rows); ``b_dec_m`` starts at the scaled mean.

Losses, per token, in the scaled space:

* batchtopk (default): ``||u_a - u_hat_a||^2 + ||u_b - u_hat_b||^2 + aux_coeff * AuxK``. The batch keeps
  its ``k * batch`` largest ``relu(pre)`` (Bussmann et al. 2024; for crosscoders Minder et al. 2025
  rank ``z_j (||d_a_j|| + ||d_b_j||)``, which is ``z_j`` here since every latent's decoder norms sum to
  one: the gradient's component that changes that sum is removed before each step and the rows are
  rescaled after it). The inference threshold is a bias-corrected running mean of the smallest kept
  activation per batch. AuxK (Gao et al. 2024): the ``aux_k`` largest pre-activations of dead latents
  reconstruct both models' residual errors, scaled by ``min(n_dead / aux_k, 1)``.
* l1 (Anthropic 2024, for comparison): ``||u_a - u_hat_a||^2 + ||u_b - u_hat_b||^2 + l1 * sum_j z_j
  (||d_a_j|| + ||d_b_j||)``, decoder norms free (small at init), the coefficient ramped up over the
  first ``l1_warmup_frac`` of steps; the norms are folded into the encoder at the end.

Learning rate: Adam, ``2e-3`` unless given (:data:`DEFAULT_LR`), linear warm-up, linear decay over the
last ``lr_decay_frac`` of steps. Every latent starts shared (``rho = 0.5``) and becomes model-only only as
fast as its unused decoder shrinks: on planted data (512 shared, 128 A-only, 128 B-only atoms, width
1024, ~200 steps of 512) the SAE rule ``2e-4 * sqrt(16384 / width)`` (8e-4) leaves every latent at
``rho ~ 0.5``, 2e-3 to 3e-3 recovers most model-only atoms (113 A-only, 58 B-only at 2e-3), and 1e-2
recovers none (FVU up too); longer runs may lower it. A latent is dead when it has not fired for ``dead_tokens`` tokens.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rosettalens.crosscoder.model import CrossCoder, CrossCoderConfig
from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.sae.train import lr_factor

__all__ = ["DEFAULT_LR", "CrossCoderTrainConfig", "train_crosscoder"]

DEFAULT_LR = 2e-3  # measured on planted data at ~200 steps (module docstring)


@dataclass
class CrossCoderTrainConfig:
    """How to train. ``tokens=None``: ``epochs`` passes over the data. ``lr=None``: :data:`DEFAULT_LR`.
    ``dead_tokens=None``: ``min(2_000_000, max(batch_size, tokens // 5))``."""

    batch_size: int = 1024
    tokens: int | None = None
    epochs: int = 1
    lr: float | None = None
    lr_warmup_steps: int | None = None
    lr_decay_frac: float = 0.2
    l1_warmup_frac: float = 0.05
    dead_tokens: int | None = None
    norm_rows: int = 32768
    threshold_lr: float = 0.01
    seed: int = 0
    device: str = "cpu"
    log_every: int = 0  # 0: about 50 log points per run

    def validate(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or self.norm_rows < 1:
            raise ConfigError("batch_size, epochs and norm_rows must be >= 1")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError(f"tokens must be >= 1, got {self.tokens}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_decay_frac <= 1 or not 0 <= self.l1_warmup_frac <= 1:
            raise ConfigError("lr_decay_frac and l1_warmup_frac must be in [0, 1]")
        if not 0 < self.threshold_lr <= 1:
            raise ConfigError(f"threshold_lr must be in (0, 1], got {self.threshold_lr}")


class _Ranks:
    """This process's place under ``torchrun`` (``rank``, ``world``) and the sums over ranks (no-ops alone)."""

    def __init__(self) -> None:
        from rosettalens.store import init_distributed

        self.rank, self.world, _ = init_distributed()

    def reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        """``t`` summed (``op="sum"``) or minimised (``"min"``) over the ranks, in place."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
        return t

    def cat(self, t: Tensor) -> Tensor:
        """Every rank's 1-d ``t`` (of one length on every rank), concatenated in rank order."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients over the ranks (one ``all_reduce`` of them all, flattened)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = self.reduce_(torch.cat([g.reshape(-1) for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))


class _Pairs:
    """Paired rows to train on: two tensors or a PairedStores (read by pair index)."""

    def __init__(self, data: Any, hooks: tuple[str, str] | None):
        from rosettalens.align import PairedStores

        self.tensors: tuple[Tensor, Tensor] | None = None
        self.stores: PairedStores | None = None
        if isinstance(data, PairedStores):
            if hooks is None:
                raise ConfigError("training on PairedStores needs hooks=(hook_a, hook_b)")
            self.stores, self.hooks = data, hooks
            self.n = len(data)
            xa, xb = data.read(hooks[0], hooks[1], rows=torch.zeros(1, dtype=torch.long))
            self.d_a, self.d_b = int(xa[0].numel()), int(xb[0].numel())
        elif isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            xa, xb = data
            if xa.dim() != 2 or xb.dim() != 2:
                raise ShapeError(
                    f"paired activations must be [n, d_a] and [n, d_b], got {tuple(xa.shape)}, {tuple(xb.shape)}"
                )
            if xa.shape[0] != xb.shape[0]:
                raise ShapeError(
                    f"paired activations have {xa.shape[0]} and {xb.shape[0]} rows; they must match"
                )
            self.tensors = (xa, xb)
            self.n, self.d_a, self.d_b = int(xa.shape[0]), int(xa.shape[1]), int(xb.shape[1])
        else:
            raise ConfigError(
                f"training data must be a pair of tensors (x_a, x_b) or a PairedStores, got {type(data).__name__}"
            )

    def read(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Float32 ``(x_a [len(idx), d_a], x_b [len(idx), d_b])``."""
        if self.tensors is not None:
            return self.tensors[0][idx].float(), self.tensors[1][idx].float()
        assert self.stores is not None
        xa, xb = self.stores.read(self.hooks[0], self.hooks[1], rows=idx)
        return xa.float().reshape(len(idx), -1), xb.float().reshape(len(idx), -1)


def _batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless batches of row indices: one seeded permutation per epoch (a short tail carries over)."""
    g = torch.Generator().manual_seed(seed)
    carry = torch.zeros(0, dtype=torch.long)
    while True:
        rows = torch.cat([carry, torch.randperm(n, generator=g)])
        nb = len(rows) // batch_size
        for b in range(nb):
            yield rows[b * batch_size : (b + 1) * batch_size]
        carry = rows[nb * batch_size :]


def _scales(
    data: _Pairs, cfg: CrossCoderConfig, n_rows: int, seed: int
) -> tuple[float, Tensor, float, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(data.n, generator=g)[: min(data.n, n_rows)].sort().values
    xa, xb = data.read(idx)
    out: list[Any] = []
    for name, x in (("A", xa), ("B", xb)):
        x = x.double()
        mu = x.mean(0)
        var = float((x - mu).pow(2).sum(1).mean())
        if not math.isfinite(var) or var <= 0:
            raise DataError(f"model {name}'s training activations are constant or not finite")
        s = math.sqrt(cfg.norm_target / var)
        out += [s, (mu * s).float()]
    return out[0], out[1], out[2], out[3]


def train_crosscoder(
    data: Any,
    cfg: CrossCoderConfig,
    tcfg: CrossCoderTrainConfig | None = None,
    *,
    hooks: tuple[str, str] | None = None,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
) -> CrossCoder:
    """Train a crosscoder on paired activations.

    data: ``(x_a [n, d_a], x_b [n, d_b])`` (row ``i`` of both is one paired token) or a
    :class:`~rosettalens.align.PairedStores` with ``hooks=(hook_a, hook_b)``. Returns the crosscoder
    (decoder norms folded to sum one per latent; ``cc.info`` holds the training record:
    ``train``, ``final`` ``{fvu_a, fvu_b, l0, dead_fraction}``, ``history``). Under ``torchrun`` every
    rank passes the same data and returns the same crosscoder (``on_log`` is called on rank 0); the process
    group is left in place for the next trainer (:func:`rosettalens.store.init_distributed`).
    """
    tcfg = tcfg or CrossCoderTrainConfig()
    tcfg.validate()
    cfg.validate()
    src = _Pairs(data, hooks)
    if (src.d_a, src.d_b) != (cfg.d_a, cfg.d_b):
        raise ShapeError(
            f"the paired activations have widths ({src.d_a}, {src.d_b}) but the crosscoder config has "
            f"d_a={cfg.d_a}, d_b={cfg.d_b}"
        )
    B = tcfg.batch_size
    if src.n < B:
        raise DataError(f"the data has {src.n} paired rows, fewer than one batch ({B}); lower batch_size")
    tokens = tcfg.tokens if tcfg.tokens is not None else src.n * tcfg.epochs
    steps = tokens // B
    if steps < 1:
        raise ConfigError(f"tokens={tokens} is less than one batch ({B})")
    ranks = _Ranks()
    if B < ranks.world:
        raise ConfigError(f"batch_size ({B}) is smaller than the number of torchrun ranks ({ranks.world})")
    return _train(src, cfg, tcfg, ranks, steps, progress, on_log)


def _train(
    src: _Pairs,
    cfg: CrossCoderConfig,
    tcfg: CrossCoderTrainConfig,
    ranks: _Ranks,
    steps: int,
    progress: bool,
    on_log: Callable[[dict], None] | None,
) -> CrossCoder:
    B = tcfg.batch_size
    tokens = steps * B
    dead_tokens = tcfg.dead_tokens or min(2_000_000, max(B, (tcfg.tokens or src.n * tcfg.epochs) // 5))
    warmup = tcfg.lr_warmup_steps if tcfg.lr_warmup_steps is not None else min(1000, max(1, steps // 20))
    log_every = tcfg.log_every or max(1, steps // 50)
    device = torch.device(tcfg.device)
    lo, hi = ranks.rank * B // ranks.world, (ranks.rank + 1) * B // ranks.world  # this rank's slice

    cc = CrossCoder(cfg)
    sa, mua, sb, mub = _scales(src, cfg, tcfg.norm_rows, tcfg.seed)
    with torch.no_grad():
        cc.scale_a.fill_(sa)
        cc.scale_b.fill_(sb)
        cc.b_dec_a.copy_(mua)
        cc.b_dec_b.copy_(mub)
    cc.to(device)
    lr = tcfg.lr or DEFAULT_LR
    params = list(cc.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    topk = cfg.arch == "batchtopk"
    W = cfg.width
    since_fired = torch.zeros(W, dtype=torch.long, device=device)
    thr_ema, thr_decay = 0.0, 1.0
    stats = {"sse_a": 0.0, "var_a": 0.0, "sse_b": 0.0, "var_b": 0.0, "l0": 0.0, "n": 0.0}
    history: list[dict[str, Any]] = []
    last: dict[str, float] = {}

    from tqdm import tqdm

    bar = tqdm(
        total=steps,
        desc="train crosscoder",
        unit="step",
        disable=not progress or ranks.rank != 0,
        file=sys.stderr,
    )
    plan = _batches(src.n, B, tcfg.seed)
    for step in range(steps):
        xa, xb = src.read(next(plan)[lo:hi])
        ua, ub = xa.to(device) * cc.scale_a, xb.to(device) * cc.scale_b
        f_lr = lr_factor(step, steps, warmup, tcfg.lr_decay_frac)
        for pg in opt.param_groups:
            pg["lr"] = lr * f_lr
        opt.zero_grad(set_to_none=True)
        # (u_a - b_dec_a) W_enc_a + (u_b - b_dec_b) W_enc_b + b_enc, with the decoder biases folded into one
        # [width] bias, so that their gradients are vector-matrix products, not [batch, d] ones
        bias = cc.b_enc - cc.b_dec_a @ cc.W_enc_a - cc.b_dec_b @ cc.W_enc_b
        pre = torch.addmm(bias, ua, cc.W_enc_a).addmm_(ub, cc.W_enc_b)
        r = pre.relu()
        if topk:
            with torch.no_grad():
                rd = r.detach()
                kk = int(cfg.k) * B  # type: ignore[arg-type]
                top = rd.reshape(-1).topk(min(kk, rd.numel()), sorted=False).values
                if ranks.world > 1:  # the k * B largest of the global batch, from every rank's largest
                    mine = torch.full((kk,), -1.0, dtype=top.dtype, device=top.device)
                    mine[: len(top)] = top
                    every = ranks.cat(mine)
                    top = every.topk(kk, sorted=False).values
                cutoff = top.min()
                keep = (rd >= cutoff) & (rd > 0)
                kept = torch.where(keep, rd, torch.full_like(rd, math.inf)).min()
                kept_min = (
                    float(ranks.reduce_(kept.reshape(1).double(), "min")) if ranks.world > 1 else float(kept)
                )
            z = r * keep.to(r.dtype)
            penalty = None
            if math.isfinite(kept_min):
                thr_ema = (1 - tcfg.threshold_lr) * thr_ema + tcfg.threshold_lr * kept_min
                thr_decay *= 1 - tcfg.threshold_lr
                assert cc.threshold is not None
                cc.threshold.fill_(thr_ema / (1 - thr_decay))
        else:
            z = r
            l1_scale = (
                min(1.0, (step + 1) / max(1, int(steps * tcfg.l1_warmup_frac)))
                if tcfg.l1_warmup_frac
                else 1.0
            )
            norms = cc.W_dec_a.norm(dim=1) + cc.W_dec_b.norm(dim=1)
            penalty = cfg.l1_coeff * l1_scale * (z * norms).sum()
        ha = z @ cc.W_dec_a + cc.b_dec_a
        hb = z @ cc.W_dec_b + cc.b_dec_b
        ea, eb = ua - ha, ub - hb
        sse_a, sse_b = ea.pow(2).sum(), eb.pow(2).sum()
        loss = (sse_a + sse_b) / B  # this rank's rows, per token of the global batch
        if penalty is not None:
            loss = loss + penalty / B
        dead = since_fired >= dead_tokens
        n_dead = int(dead.sum())
        if cfg.aux_coeff_ > 0 and n_dead > 0:
            k_aux = min(cfg.aux_k_, n_dead)
            avals, aidx = pre.masked_fill(~dead[None, :], -math.inf).topk(k_aux, dim=-1, sorted=False)
            avals = avals.relu()
            ra = F.embedding_bag(aidx, cc.W_dec_a, per_sample_weights=avals, mode="sum")
            rb = F.embedding_bag(aidx, cc.W_dec_b, per_sample_weights=avals, mode="sum")
            aux = ((ra - ea.detach()).pow(2).sum() + (rb - eb.detach()).pow(2).sum()) / B
            loss = loss + cfg.aux_coeff_ * min(n_dead / cfg.aux_k_, 1.0) * aux
        loss.backward()
        ranks.sum_grads(params)
        if topk:  # keep ||d_a_j|| + ||d_b_j|| = 1: remove the gradient's component along its normal
            with torch.no_grad():
                Wa, Wb = cc.W_dec_a, cc.W_dec_b
                na = Wa / Wa.norm(dim=1, keepdim=True).clamp_min(1e-12)
                nb = Wb / Wb.norm(dim=1, keepdim=True).clamp_min(1e-12)
                Ga, Gb = Wa.grad, Wb.grad
                assert Ga is not None and Gb is not None
                c = ((Ga * na).sum(1, keepdim=True) + (Gb * nb).sum(1, keepdim=True)) / 2
                Ga -= c * na
                Gb -= c * nb
        opt.step()
        cc.enforce_structure()  # dedicated latents and tied shared rows (no-op for a plain crosscoder)
        with torch.no_grad():
            if topk:
                s = (cc.W_dec_a.norm(dim=1) + cc.W_dec_b.norm(dim=1)).clamp_min(1e-12)[:, None]
                cc.W_dec_a.div_(s)
                cc.W_dec_b.div_(s)
            fired = (z.detach() > 0).sum(0)
            if ranks.world > 1:  # fire counts and the batch means, over the global batch
                sums = ranks.reduce_(torch.cat([fired.double(), ua.double().sum(0), ub.double().sum(0)]))
                fired = sums[:W]
                mean_a, mean_b = sums[W : W + cfg.d_a].float() / B, sums[W + cfg.d_a :].float() / B
            else:
                mean_a, mean_b = ua.mean(0), ub.mean(0)
            since_fired += B
            since_fired[fired > 0] = 0
            stats["sse_a"] += float(sse_a)
            stats["sse_b"] += float(sse_b)
            stats["var_a"] += float((ua - mean_a).pow(2).sum())
            stats["var_b"] += float((ub - mean_b).pow(2).sum())
            stats["l0"] += float((z.detach() > 0).sum())
            stats["n"] += hi - lo
        done = step + 1
        if done % log_every == 0 or done == steps:
            sums = ranks.reduce_(torch.tensor([stats[k] for k in stats], dtype=torch.float64, device=device))
            tot = dict(zip(stats, sums.tolist(), strict=True))
            last = {
                "fvu_a": tot["sse_a"] / max(tot["var_a"], 1e-30),
                "fvu_b": tot["sse_b"] / max(tot["var_b"], 1e-30),
                "l0": tot["l0"] / max(tot["n"], 1),
                "dead_fraction": float((since_fired >= dead_tokens).double().mean()),
                "lr": lr * f_lr,
            }
            history.append({"step": done, "tokens": done * B, **last})
            stats = {k: 0.0 for k in stats}
            if on_log is not None and ranks.rank == 0:
                on_log(history[-1])
            bar.set_postfix_str(
                f"fvu {last['fvu_a']:.3f}/{last['fvu_b']:.3f} l0 {last['l0']:.1f} "
                f"dead {100 * last['dead_fraction']:.0f}%",
                refresh=False,
            )
        bar.update(1)
    bar.close()
    cc.zero_grad(set_to_none=True)
    cc.fold_decoder_norms()
    cc.eval()
    cc.info = {
        "train": {
            **asdict(tcfg),
            "lr": lr,
            "steps": steps,
            "tokens": tokens,
            "lr_warmup_steps": warmup,
            "dead_tokens": dead_tokens,
            "n_pairs": src.n,
            "world_size": ranks.world,
        },
        "final": last,
        "history": history,
    }
    return cc
