"""The non-linear mapper of Oozeer et al. (2025): ``Linear(d_src, h) -> ReLU -> Linear(h, d_tgt)``.

Training: AdamW on ``MSE + cos_weight * (1 - cosine)``, mini-batches shuffled per epoch, early
stopping on a validation split (the best-validation weights are kept), a tqdm bar on stderr, and
checkpoint/resume: with ``fit(..., checkpoint_dir=DIR)`` the full training state (weights,
optimizer moments, best weights, counters) is written atomically after every epoch; calling
``fit`` again with the same data, hyper-parameters and ``DIR`` continues from the last complete
epoch and ends with exactly the weights an uninterrupted fit would have produced (every random
choice is derived from ``seed``: the initial weights, the validation split, and epoch ``e``'s
shuffle from ``seed`` and ``e``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rosettalens.errors import ConfigError
from rosettalens.io import atomic_write_json
from rosettalens.mapping.base import (
    Mapper,
    MapperError,
    check_pair,
    read_json,
    read_tensors,
    register_kind,
    save_tensors,
    split_indices,
)

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_JSON = "checkpoint.json"


class _TrainState(TypedDict):
    """Training counters, saved in the checkpoint's JSON after every epoch."""

    epoch: int  # epochs completed
    best_val: float
    best_epoch: int  # -1 before the first epoch
    bad_epochs: int  # epochs since the last improvement
    history: list[dict[str, float]]  # {"epoch", "train_loss", "val_loss"} per epoch
    done: bool
    stopped_early: NotRequired[bool]


class _Net(nn.Module):
    """``y = my + sy * net((x - mx) / sx)``; ``mx/my`` are mean vectors, ``sx/sy`` scalar RMS scales."""

    # buffers (registered in __init__; declared so their type is known)
    mx: torch.Tensor  # [d_src]
    sx: torch.Tensor  # []
    my: torch.Tensor  # [d_tgt]
    sy: torch.Tensor  # []

    def __init__(self, d_src: int, hidden: int, d_tgt: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_src, hidden), nn.ReLU(), nn.Linear(hidden, d_tgt))
        self.register_buffer("mx", torch.zeros(d_src))
        self.register_buffer("sx", torch.ones(()))
        self.register_buffer("my", torch.zeros(d_tgt))
        self.register_buffer("sy", torch.ones(()))

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised-space prediction ``[n, d_tgt]`` from raw ``x [n, d_src]``."""
        return self.net((x - self.mx) / self.sx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.my + self.sy * self.normalized(x)


def _init_weights(net: _Net, seed: int) -> None:
    """PyTorch's default ``nn.Linear`` init, drawn from a private generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for layer in (net.net[0], net.net[2]):
            assert isinstance(layer, nn.Linear)
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=g) * 2 * bound - bound)


def _fingerprint(X: torch.Tensor, Y: torch.Tensor) -> dict[str, Any]:
    """Cheap identity of a training set, to refuse resuming a checkpoint on other data."""
    return {
        "n": int(X.shape[0]),
        "d_src": int(X.shape[1]),
        "d_tgt": int(Y.shape[1]),
        "sum_src": repr(float(X.to(torch.float64).sum())),
        "sum_tgt": repr(float(Y.to(torch.float64).sum())),
        "sumsq_src": repr(float(X.to(torch.float64).square().sum())),
    }


@register_kind
class AutoencoderMapper(Mapper):
    """``Linear(d_src, h) -> ReLU -> Linear(h, d_tgt)`` trained with MSE + cosine loss.

    ``hidden`` defaults to ``round(sqrt(d_src * d_tgt))``. Inputs and targets are centred and
    divided by a scalar RMS scale (from the training rows) inside the network, so ``lr`` does not
    depend on activation scale; the MSE term is measured in that normalised target space and the
    cosine term between raw predicted and raw target activations. Training stops after
    ``patience`` epochs without a relative validation-loss improvement of ``min_delta`` (or at
    ``max_epochs``) and keeps the best-validation weights. ``fit_info`` records ``epochs_run``,
    ``best_epoch``, ``stopped_early``, ``best_val_loss`` and the per-epoch ``history``.
    """

    kind = "autoencoder"
    linear = False

    def __init__(
        self,
        hidden: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        batch_size: int = 256,
        max_epochs: int = 100,
        patience: int = 5,
        min_delta: float = 1e-4,
        val_fraction: float = 0.1,
        cos_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if hidden is not None and int(hidden) < 1:
            raise ConfigError(f"hidden must be >= 1, got {hidden}")
        if int(batch_size) < 1 or int(max_epochs) < 1 or int(patience) < 1:
            raise ConfigError("batch_size, max_epochs and patience must be >= 1")
        if lr <= 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        self.hidden = None if hidden is None else int(hidden)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.max_epochs = int(max_epochs)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.val_fraction = float(val_fraction)
        self.cos_weight = float(cos_weight)
        self.seed = int(seed)
        self.net: _Net | None = None

    def _hparams(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "val_fraction": self.val_fraction,
            "cos_weight": self.cos_weight,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ training

    def _loss(self, net: _Net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred_n = net.normalized(x)
        mse = F.mse_loss(pred_n, (y - net.my) / net.sy)
        if self.cos_weight == 0.0:
            return mse
        cos = F.cosine_similarity(net.my + net.sy * pred_n, y, dim=-1, eps=1e-8)
        return mse + self.cos_weight * (1.0 - cos).mean()

    @torch.no_grad()
    def _eval_loss(self, net: _Net, X: torch.Tensor, Y: torch.Tensor, rows: torch.Tensor, device) -> float:
        total = 0.0
        for i in range(0, len(rows), 8192):
            r = rows[i : i + 8192]
            x, y = X[r].to(device, torch.float32), Y[r].to(device, torch.float32)
            total += float(self._loss(net, x, y)) * len(r)
        return total / len(rows)

    def fit(
        self,
        X_src: torch.Tensor,
        X_tgt: torch.Tensor,
        *,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        callback: Callable[[int, dict[str, float]], None] | None = None,
        device: str | torch.device | None = None,
    ) -> AutoencoderMapper:
        """Train on ``X_src [n, d_src]``, ``X_tgt [n, d_tgt]``.

        ``checkpoint_dir``: write the training state there after every epoch and resume from it
        when it already holds a checkpoint of this same fit (same data and hyper-parameters;
        otherwise :class:`MapperError`). ``callback(epoch, {"train_loss", "val_loss"})`` runs after
        each epoch's checkpoint is written (an exception there interrupts the fit; calling ``fit``
        again resumes). ``device``: where to train (default: ``X_src``'s device).
        """
        X, Y = check_pair(X_src, X_tgt, min_rows=4)
        dev = torch.device(device) if device is not None else X.device
        n, d_src = X.shape
        d_tgt = Y.shape[1]
        hidden = self.hidden or max(1, round(math.sqrt(d_src * d_tgt)))
        tr, va = split_indices(n, self.val_fraction, self.seed)

        net = _Net(d_src, hidden, d_tgt)
        _init_weights(net, self.seed)
        with torch.no_grad():
            Xt, Yt = X[tr].to(torch.float64), Y[tr].to(torch.float64)
            mx, my = Xt.mean(0), Yt.mean(0)
            sx = ((Xt - mx).square().sum(1).mean() / d_src).sqrt().clamp_min(1e-12)
            sy = ((Yt - my).square().sum(1).mean() / d_tgt).sqrt().clamp_min(1e-12)
            net.mx.copy_(mx), net.my.copy_(my), net.sx.copy_(sx), net.sy.copy_(sy)
            del Xt, Yt
        net.to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

        state: _TrainState = {
            "epoch": 0,
            "best_val": math.inf,
            "best_epoch": -1,
            "bad_epochs": 0,
            "history": [],
            "done": False,
        }
        best = {k: v.detach().clone() for k, v in net.state_dict().items()}
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        ident = {"hparams": self._hparams(), "data": _fingerprint(X, Y), "hidden": hidden}
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)
            if (ckpt / CKPT_JSON).exists():
                state, best = self._load_checkpoint(ckpt, ident, net, opt, dev)

        bar = tqdm(
            total=self.max_epochs,
            initial=state["epoch"],
            desc="autoencoder",
            unit="epoch",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        )
        try:
            while not state["done"] and state["epoch"] < self.max_epochs:
                epoch = state["epoch"]
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
                order = tr[torch.randperm(len(tr), generator=g)]
                net.train()
                run, seen = 0.0, 0
                for i in range(0, len(order), self.batch_size):
                    r = order[i : i + self.batch_size]
                    x, y = X[r].to(dev, torch.float32), Y[r].to(dev, torch.float32)
                    loss = self._loss(net, x, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    run += float(loss.detach()) * len(r)
                    seen += len(r)
                net.eval()
                val = self._eval_loss(net, X, Y, va, dev)
                rec = {"epoch": epoch, "train_loss": run / seen, "val_loss": val}
                state["history"].append(rec)
                if val < state["best_val"] * (1.0 - self.min_delta) or state["best_epoch"] < 0:
                    state["best_val"], state["best_epoch"], state["bad_epochs"] = val, epoch, 0
                    best = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    state["bad_epochs"] += 1
                state["epoch"] = epoch + 1
                if state["bad_epochs"] >= self.patience or state["epoch"] >= self.max_epochs:
                    state["done"] = True
                    state["stopped_early"] = state["bad_epochs"] >= self.patience
                if ckpt is not None:
                    self._save_checkpoint(ckpt, ident, state, net, opt, best)
                bar.update(1)
                bar.set_postfix(train=f"{rec['train_loss']:.4g}", val=f"{val:.4g}")
                if callback is not None:
                    callback(epoch, {"train_loss": rec["train_loss"], "val_loss": val})
        finally:
            bar.close()

        net.load_state_dict(best)
        net.to("cpu").eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.d_src, self.d_tgt = d_src, d_tgt
        self.fit_info = {
            "hidden": hidden,
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val"],
            "stopped_early": bool(state.get("stopped_early", False)),
            "n_val": len(va),
            "history": state["history"],
        }
        self._record_norms(X, Y)
        return self

    def _save_checkpoint(
        self,
        d: Path,
        ident: dict[str, Any],
        state: _TrainState,
        net: _Net,
        opt: torch.optim.Optimizer,
        best: dict[str, torch.Tensor],
    ) -> None:
        tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best.items()})
        for idx, st in opt.state_dict()["state"].items():
            for name, val in st.items():
                tensors[f"opt.{idx}.{name}"] = val if torch.is_tensor(val) else torch.tensor(val)
        digest = save_tensors(d / CKPT_TENSORS, tensors)
        # the training state may hold inf (no best loss yet): allow_nan, read back exactly by json.load
        atomic_write_json(d / CKPT_JSON, {**ident, "state": state, "sha256": digest}, allow_nan=True)

    def _load_checkpoint(
        self, d: Path, ident: dict[str, Any], net: _Net, opt: torch.optim.Optimizer, dev: torch.device
    ) -> tuple[_TrainState, dict[str, torch.Tensor]]:
        meta = read_json(d / CKPT_JSON, "autoencoder checkpoint")
        for key in ("hparams", "data", "hidden"):
            if meta.get(key) != ident[key]:
                raise MapperError(
                    f"checkpoint in {d} was written for a different fit ({key} differs); "
                    "use a fresh --checkpoint directory or the same data and settings"
                )
        tensors = read_tensors(d / CKPT_TENSORS, "autoencoder checkpoint", sha256=meta.get("sha256"))
        try:
            net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            best = {k[5:]: v.to(dev) for k, v in tensors.items() if k.startswith("best.")}
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, idx, name = k.split(".", 2)
                    opt_state.setdefault(int(idx), {})[name] = v.to(dev) if name != "step" else v
            opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
        except (RuntimeError, KeyError, ValueError) as e:
            raise MapperError(f"checkpoint in {d} is corrupt ({e})") from None
        return meta["state"], best

    # ------------------------------------------------------------------ inference

    def _params(self, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        assert self.net is not None
        return {k: v.detach().to(device, dtype) for k, v in self.net.state_dict().items()}

    def _transform(self, X: torch.Tensor) -> torch.Tensor:
        p = self._params(X.dtype, X.device)
        h = torch.relu(((X - p["mx"]) / p["sx"]) @ p["net.0.weight"].T + p["net.0.bias"])
        return p["my"] + p["sy"] * (h @ p["net.2.weight"].T + p["net.2.bias"])

    def _active(self, X: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """ReLU gates ``[n, hidden]`` (1.0 where the hidden unit is active) at anchors ``X [n, d_src]``."""
        pre = ((X - p["mx"]) / p["sx"]) @ p["net.0.weight"].T + p["net.0.bias"]
        return (pre > 0).to(X.dtype)

    def jvp(self, X: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Directional derivative ``J(x_i) v`` at each anchor: ``X [n, d_src]``, ``v [d_src]`` -> ``[n, d_tgt]``.

        Exact for the ReLU network: ``J(x) v = (sy / sx) * W2 (g(x) * (W1 v))`` with ``g(x)`` the
        ReLU gates at ``x`` (the derivative at a unit exactly at 0 is taken as 0).
        """
        self._require_fitted()
        p = self._params(X.dtype, X.device)
        g = self._active(X, p)
        w1v = p["net.0.weight"] @ v.to(X.device, X.dtype)
        return (p["sy"] / p["sx"]) * ((g * w1v) @ p["net.2.weight"].T)

    def mean_jacobian(self, X: torch.Tensor) -> torch.Tensor:
        """Mean Jacobian over anchors ``X [n, d_src]``: ``(sy/sx) * W2 diag(mean_i g(x_i)) W1`` ``[d_tgt, d_src]``."""
        self._require_fitted()
        p = self._params(X.dtype, X.device)
        gbar = self._active(X, p).mean(0)
        return (p["sy"] / p["sx"]) * (p["net.2.weight"] * gbar) @ p["net.0.weight"]

    def _state(self) -> dict[str, torch.Tensor]:
        assert self.net is not None
        return {k: v.detach() for k, v in self.net.state_dict().items()}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.d_src is None or self.d_tgt is None:
            raise MapperError("autoencoder mapper: d_src and d_tgt must be set before its weights are loaded")
        hidden = int(tensors["net.0.weight"].shape[0])
        net = _Net(self.d_src, hidden, self.d_tgt)
        net.load_state_dict(tensors)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
