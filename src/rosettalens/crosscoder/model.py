"""The crosscoder module: one latent code read from two models' paired activations, one decoder per model.

Shapes: ``x_a [n, d_a]``, ``x_b [n, d_b]`` paired activations (row ``i`` of both is the same token, or
the same character end of the same text), ``z [n, width]`` latents, ``W_enc_a [d_a, width]``,
``W_enc_b [d_b, width]``, ``b_enc [width]``, ``W_dec_a [width, d_a]``, ``W_dec_b [width, d_b]``,
``b_dec_a [d_a]``, ``b_dec_b [d_b]``, ``threshold [width]`` (batchtopk).

Encoder and decoders::

    u_a = x_a * scale_a,  u_b = x_b * scale_b                    (each model scaled to a common norm)
    pre = (u_a - b_dec_a) @ W_enc_a + (u_b - b_dec_b) @ W_enc_b + b_enc
    batchtopk  z = relu(pre) * (pre > threshold)   (training: the k * batch largest relu(pre) of the batch)
    l1         z = relu(pre)
    x_hat_a = (z @ W_dec_a + b_dec_a) / scale_a,  x_hat_b = (z @ W_dec_b + b_dec_b) / scale_b

Common norm: ``scale_m`` makes ``E ||(x_m - mean_m) * scale_m||^2 = (d_a + d_b) / 2`` on the training
data, so both models weigh alike in the loss whatever their widths and residual norms (for one model
against itself this is the SAE trainer's ``E ||x - mean||^2 = d_in``). The scales are kept as buffers
(``scale_a``, ``scale_b``) and saved; latents and decoder norms live in the scaled space, where the
two models are comparable.

Decoder norms: every latent's decoder norms sum to one, ``||W_dec_a[j]|| + ||W_dec_b[j]|| = 1`` (kept
during BatchTopK training, folded at the end of L1 training), so the relative decoder norm
``rho_j = ||W_dec_b[j]|| / (||W_dec_a[j]|| + ||W_dec_b[j]||)`` is simply ``||W_dec_b[j]||``, and the L1
penalty of Anthropic's crosscoders, ``sum_j z_j (||W_dec_a[j]|| + ||W_dec_b[j]||)``, is ``sum_j z_j``.

Files: ``crosscoder.json`` (format, config, scales, training record) and ``crosscoder.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.io import atomic_dir, atomic_write_json, json_safe

__all__ = ["ARCHS", "CrossCoder", "CrossCoderConfig", "FORMAT", "load_crosscoder", "is_crosscoder_dir"]

ARCHS = ("batchtopk", "l1")
FORMAT = "rosettalens.crosscoder/1"
CONFIG_FILE = "crosscoder.json"
WEIGHTS_FILE = "crosscoder.safetensors"
_TENSORS = ("W_enc_a", "W_enc_b", "b_enc", "W_dec_a", "W_dec_b", "b_dec_a", "b_dec_b", "scale_a", "scale_b")


@dataclass
class CrossCoderConfig:
    """One crosscoder: its shape, architecture and sparsity hyper-parameters.

    ``k``: active latents per token on average over a batch (``batchtopk``). ``l1_coeff``: the weight of
    the penalty ``sum_j z_j (||W_dec_a[j]|| + ||W_dec_b[j]||)`` per token (``l1``). ``aux_coeff`` /
    ``aux_k``: AuxK loss reviving dead latents (``batchtopk``; default 1/32 and ``(d_a + d_b) // 4``).
    ``model_a`` / ``model_b`` / ``hook_a`` / ``hook_b`` / ``pairing``: recorded where the crosscoder
    came from (``pairing``: ``"all"`` same tokenizer by position, ``"aligned"`` by character ends).
    ``skip_first`` / ``norm_ratio`` / ``median_norm_a`` / ``median_norm_b``: the sink rule of
    :mod:`rosettalens.sae.sinks` for each model (positions before ``skip_first`` and tokens whose norm
    exceeds ``norm_ratio`` times the model's median training norm are left out of training, evaluation
    and splicing; spliced runs keep the model's own activation there).
    ``dedicated_a`` / ``dedicated_b``: latents only model A / B can use (the last ``dedicated_b``
    latents read and write B only, the ``dedicated_a`` before them A only: their other encoder column
    and decoder row are held at zero). ``tie_shared`` (one width): the other latents have one decoder
    row for both models, so a shared latent means the same direction in both and whatever B adds
    (or A keeps) must go to the dedicated latents; model diffing of a fine-tune (a dedicated-latent
    crosscoder).
    """

    d_a: int
    d_b: int
    width: int
    arch: Literal["batchtopk", "l1"] = "batchtopk"
    k: int | None = 32
    l1_coeff: float = 1.0
    aux_coeff: float | None = None
    aux_k: int | None = None
    seed: int = 0
    model_a: str | None = None
    model_b: str | None = None
    hook_a: str | None = None
    hook_b: str | None = None
    pairing: str | None = None
    skip_first: int = 1
    norm_ratio: float = 10.0
    median_norm_a: float | None = None
    median_norm_b: float | None = None
    dedicated_a: int = 0
    dedicated_b: int = 0
    tie_shared: bool = False

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(
                f"unknown crosscoder architecture {self.arch!r}; expected one of {', '.join(ARCHS)}"
            )
        if self.d_a < 1 or self.d_b < 1 or self.width < 1:
            raise ConfigError(
                f"d_a, d_b and width must be >= 1, got d_a={self.d_a}, d_b={self.d_b}, width={self.width}"
            )
        if self.arch == "batchtopk":
            if self.k is None:
                raise ConfigError("arch batchtopk needs k (active latents per token), e.g. --k 32")
            if not 1 <= self.k < self.width:
                raise ConfigError(f"k must be in [1, width) = [1, {self.width}), got k={self.k}")
        if not (math.isfinite(self.l1_coeff) and self.l1_coeff >= 0):
            raise ConfigError(f"l1_coeff must be a finite number >= 0, got {self.l1_coeff}")
        if self.aux_coeff is not None and not (math.isfinite(self.aux_coeff) and self.aux_coeff >= 0):
            raise ConfigError(f"aux_coeff must be >= 0, got {self.aux_coeff}")
        if self.aux_k is not None and self.aux_k < 1:
            raise ConfigError(f"aux_k must be >= 1, got {self.aux_k}")
        if self.dedicated_a < 0 or self.dedicated_b < 0 or self.dedicated_a + self.dedicated_b >= self.width:
            raise ConfigError(
                f"dedicated_a and dedicated_b must be >= 0 and leave shared latents: got {self.dedicated_a} + "
                f"{self.dedicated_b} of width {self.width}"
            )
        if self.tie_shared and self.d_a != self.d_b:
            raise ConfigError(
                f"tie_shared needs one width for both models (a shared decoder row serves both), got "
                f"d_a={self.d_a}, d_b={self.d_b}"
            )
        self.rule("a"), self.rule("b")  # the sink rule checks skip_first, norm_ratio and the medians

    def rule(self, side: str):
        """The sink rule (:class:`rosettalens.sae.sinks.SinkRule`) of model ``side`` (``"a"`` or ``"b"``)."""
        from rosettalens.sae.sinks import SinkRule

        med = self.median_norm_a if side == "a" else self.median_norm_b
        return SinkRule(self.skip_first, self.norm_ratio, med)

    @property
    def aux_coeff_(self) -> float:
        if self.aux_coeff is not None:
            return self.aux_coeff
        return 1 / 32 if self.arch == "batchtopk" else 0.0

    @property
    def aux_k_(self) -> int:
        return min(self.aux_k or max(1, (self.d_a + self.d_b) // 4), self.width)

    @property
    def norm_target(self) -> float:
        """``E ||(x_m - mean_m) * scale_m||^2`` of both models after scaling: ``(d_a + d_b) / 2``."""
        return (self.d_a + self.d_b) / 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrossCoderConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DataError(f"crosscoder config has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**d)


class CrossCoder(nn.Module):
    """A crosscoder ``(x_a [n, d_a], x_b [n, d_b]) -> z [n, width] -> (x_hat_a, x_hat_b)`` (module docstring).

    ``encode`` / ``decode`` / ``forward`` take and return raw activations (the scales are applied inside).
    """

    threshold: Tensor | None
    scale_a: Tensor
    scale_b: Tensor

    def __init__(self, cfg: CrossCoderConfig, device: str | torch.device | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        da, db, w = cfg.d_a, cfg.d_b, cfg.width
        g = torch.Generator().manual_seed(cfg.seed)
        Wa = torch.randn(w, da, generator=g)
        Wb = torch.randn(w, db, generator=g)
        # each model's decoder row starts with norm 1/2 (sum 1: rho = 0.5 at init); L1 starts smaller
        init = 0.5 if cfg.arch == "batchtopk" else 0.05
        Wa *= init / Wa.norm(dim=1, keepdim=True)
        Wb *= init / Wb.norm(dim=1, keepdim=True)
        self.W_dec_a = nn.Parameter(Wa)
        self.W_dec_b = nn.Parameter(Wb)
        self.W_enc_a = nn.Parameter(Wa.t().clone())
        self.W_enc_b = nn.Parameter(Wb.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(w))
        self.b_dec_a = nn.Parameter(torch.zeros(da))
        self.b_dec_b = nn.Parameter(torch.zeros(db))
        if cfg.arch == "batchtopk":
            self.register_buffer("threshold", torch.zeros(w))
        else:
            self.threshold = None
        self.register_buffer("scale_a", torch.tensor(1.0))
        self.register_buffer("scale_b", torch.tensor(1.0))
        self.info: dict[str, Any] = {}  # training record and metrics: saved in crosscoder.json
        self.enforce_structure()
        if cfg.arch == "batchtopk" and (cfg.dedicated_a or cfg.dedicated_b or cfg.tie_shared):
            # decoder norms sum to one from the start, as for a plain crosscoder
            with torch.no_grad():
                s = (self.W_dec_a.norm(dim=1) + self.W_dec_b.norm(dim=1)).clamp_min(1e-12)[:, None] / (
                    2 * init
                )
                self.W_dec_a.div_(s)
                self.W_dec_b.div_(s)
        if device is not None:
            self.to(device)

    def dedicated_masks(self) -> tuple[Tensor, Tensor]:
        """``(only_a [width], only_b [width])``: boolean masks of the latents dedicated to one model."""
        w, na, nb = self.cfg.width, self.cfg.dedicated_a, self.cfg.dedicated_b
        idx = torch.arange(w, device=self.W_dec_a.device)
        only_b = idx >= w - nb
        only_a = (idx >= w - nb - na) & ~only_b
        return only_a, only_b

    @torch.no_grad()
    def enforce_structure(self) -> None:
        """Hold dedicated latents' other-model weights at zero and tie shared decoder rows (their mean)
        when ``tie_shared``; a no-op for a plain crosscoder. Called at init and after every training step."""
        c = self.cfg
        if not (c.dedicated_a or c.dedicated_b or c.tie_shared):
            return
        only_a, only_b = self.dedicated_masks()
        if c.tie_shared:
            shared = ~(only_a | only_b)
            mean = (self.W_dec_a[shared] + self.W_dec_b[shared]) / 2
            self.W_dec_a[shared] = mean
            self.W_dec_b[shared] = mean
        self.W_dec_a[only_b] = 0.0
        self.W_enc_a[:, only_b] = 0.0
        self.W_dec_b[only_a] = 0.0
        self.W_enc_b[:, only_a] = 0.0

    # ------------------------------------------------------------------ properties
    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def device(self) -> torch.device:
        return self.W_enc_a.device

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.arch == "batchtopk" else f", l1_coeff={self.cfg.l1_coeff}"
        return f"arch={self.cfg.arch}, d_a={self.cfg.d_a}, d_b={self.cfg.d_b}, width={self.width}{k}"

    def decoder_norms(self) -> tuple[Tensor, Tensor]:
        """``(||W_dec_a[j]||, ||W_dec_b[j]||)``, each ``[width]``, in the scaled space."""
        return self.W_dec_a.detach().norm(dim=1), self.W_dec_b.detach().norm(dim=1)

    def relative_norms(self) -> Tensor:
        """``rho [width]``: ``||W_dec_b[j]|| / (||W_dec_a[j]|| + ||W_dec_b[j]||)`` (0: A-only, 1: B-only)."""
        na, nb = self.decoder_norms()
        return nb / (na + nb).clamp_min(1e-12)

    # ------------------------------------------------------------------ forward
    def _check(self, x_a: Tensor, x_b: Tensor) -> None:
        if x_a.shape[-1] != self.cfg.d_a or x_b.shape[-1] != self.cfg.d_b:
            raise ShapeError(
                f"the crosscoder takes widths ({self.cfg.d_a}, {self.cfg.d_b}), got "
                f"({x_a.shape[-1]}, {x_b.shape[-1]})"
            )
        if x_a.shape[:-1] != x_b.shape[:-1]:
            raise ShapeError(
                f"paired activations must have equally many rows, got {tuple(x_a.shape)} and {tuple(x_b.shape)}"
            )

    def pre_acts(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        """Encoder pre-activations ``[n, width]`` of raw ``x_a [n, d_a]``, ``x_b [n, d_b]``."""
        ua = x_a.to(self.W_enc_a.dtype) * self.scale_a - self.b_dec_a
        ub = x_b.to(self.W_enc_b.dtype) * self.scale_b - self.b_dec_b
        return ua @ self.W_enc_a + ub @ self.W_enc_b + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Latents ``[n, width]`` from pre-activations (the inference rule)."""
        if self.threshold is None:
            return pre.relu()
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def encode(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        """Latents ``z [..., width]`` of paired activations ``x_a [..., d_a]``, ``x_b [..., d_b]``."""
        self._check(x_a, x_b)
        lead = x_a.shape[:-1]
        z = self.activate(self.pre_acts(x_a.reshape(-1, self.cfg.d_a), x_b.reshape(-1, self.cfg.d_b)))
        return z.reshape(*lead, self.width)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstructions ``(x_hat_a [..., d_a], x_hat_b [..., d_b])`` of latents ``z [..., width]`` (raw units)."""
        z = z.to(self.W_dec_a.dtype)
        xa = (z @ self.W_dec_a + self.b_dec_a) / self.scale_a
        xb = (z @ self.W_dec_b + self.b_dec_b) / self.scale_b
        return xa, xb

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_hat_a, x_hat_b)`` of paired raw activations, in their dtypes."""
        xa, xb = self.decode(self.encode(x_a, x_b))
        return xa.to(x_a.dtype), xb.to(x_b.dtype)

    # ------------------------------------------------------------------ folding
    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make every latent's decoder norms sum to one without changing ``forward``
        (``z_j`` is multiplied by ``||W_dec_a[j]|| + ||W_dec_b[j]||``)."""
        na, nb = self.decoder_norms()
        s = (na + nb).clamp_min(1e-12)
        self.W_dec_a.div_(s[:, None])
        self.W_dec_b.div_(s[:, None])
        self.W_enc_a.mul_(s[None, :])
        self.W_enc_b.mul_(s[None, :])
        self.b_enc.mul_(s)
        if self.threshold is not None:
            self.threshold.mul_(s)

    # ------------------------------------------------------------------ save / load
    def state_tensors(self) -> dict[str, Tensor]:
        t = {name: getattr(self, name).detach() for name in _TENSORS}
        if self.threshold is not None:
            t["threshold"] = self.threshold.detach()
        return {k: v.to("cpu").contiguous() for k, v in t.items()}

    def config_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": self.cfg.to_dict(),
            "scale_a": float(self.scale_a),
            "scale_b": float(self.scale_b),
            "info": self.info,
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the folder ``path``: ``crosscoder.json`` + ``crosscoder.safetensors``, swapped in whole.

        An existing crosscoder folder is replaced only with ``overwrite``; a folder holding other
        files is refused.
        """
        from safetensors.torch import save_file

        out = Path(path)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out} exists and is not a directory")
        with atomic_dir(
            out, overwrite=overwrite, what="crosscoder folder", replaceable=is_crosscoder_dir
        ) as tmp:
            save_file(self.state_tensors(), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            atomic_write_json(tmp / CONFIG_FILE, json_safe(self.config_json()), indent=1)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> CrossCoder:
        """Load a folder written by :meth:`save` (bit-exact)."""
        return load_crosscoder(path, device)


def is_crosscoder_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds nothing but a saved crosscoder (or nothing at all)."""
    try:
        entries = list(Path(path).iterdir())
    except OSError:
        return False
    return all(e.is_file() and e.name in (CONFIG_FILE, WEIGHTS_FILE) for e in entries)


def load_crosscoder(path: str | os.PathLike, device: str | torch.device | None = None) -> CrossCoder:
    """A crosscoder from its folder; :class:`DataError` when the folder is missing or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / CONFIG_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise DataError(f"{p} is not a crosscoder folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads((p / CONFIG_FILE).read_text("utf-8"))
        tensors = load_file(str(p / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise DataError(f"cannot read crosscoder {p}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{p / CONFIG_FILE} is not a {FORMAT} file")
    cfg = CrossCoderConfig.from_dict(meta["config"])
    cc = CrossCoder(cfg)
    want = set(_TENSORS) | ({"threshold"} if cc.threshold is not None else set())
    if set(tensors) != want:
        raise DataError(f"crosscoder {p}: tensors {sorted(tensors)} do not match its config ({sorted(want)})")
    with torch.no_grad():
        for name, t in tensors.items():
            target = getattr(cc, name)
            if tuple(t.shape) != tuple(target.shape):
                raise DataError(
                    f"crosscoder {p}: {name} has shape {tuple(t.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(t)
    cc.info = meta.get("info") or {}
    cc.eval()
    return cc.to(device) if device is not None else cc
