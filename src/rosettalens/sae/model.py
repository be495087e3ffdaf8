"""The SAE module: four architectures in one class, and its on-disk format (SAELens's own).

Shapes: ``x [n, d_in]`` activations, ``z [n, width]`` latents, ``W_enc [d_in, width]``,
``W_dec [width, d_in]`` (rows unit-norm), ``b_enc [width]``, ``b_dec [d_in]``, ``threshold [width]``.

Encoder (every architecture)::

    pre = (x * scale - b_dec) @ W_enc + b_enc
    relu       z = relu(pre)
    topk       z = the k largest entries of pre per row, relu'd, the rest 0
    batchtopk  z = relu(pre) * (pre > threshold)    (training: the k * batch largest of relu(pre) in the batch)
    jumprelu   z = relu(pre) * (pre > threshold)    (threshold per latent, learned by a straight-through estimator)
    x_hat = (z @ W_dec + b_dec) / scale

``scale`` is the input normalisation (activations are scaled so that ``E ||(x - mean) * scale||^2 = d_in``
during training). A trained SAE has it folded into its weights (``scale == 1``, latents in the units of the input
and ``input_scale`` records the value that was folded), so the saved SAE takes raw activations, as
SAELens's SAEs do.

Folders read by :func:`load_folder` (as the peers write them):

* SAELens (>= 6, and the older schema it still reads): ``cfg.json`` (``architecture`` standard | topk |
  jumprelu, ``d_in``, ``d_sae``, ``k``, ``apply_b_dec_to_input``, ``normalize_activations``,
  ``metadata.hook_name`` ...) + ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold [d_sae]`` for jumprelu). A BatchTopK SAE is saved
  as jumprelu with its learned threshold in every entry. Pre-6 configs (``hook_point``,
  ``activation_fn_str``, ``activation_fn_kwargs.k``) are read too.
* sparsify: ``cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``, ``activation``) +
  ``sae.safetensors`` (``encoder.weight [num_latents, d_in]``, ``encoder.bias``, ``W_dec [num_latents,
  d_in]``, ``b_dec [d_in]``); latents are the top k of ``relu(encoder(x - b_dec))``.
* ours is SAELens's, with our own record under ``cfg.json["rosettalens"]``.

Loaded weights are kept as they are (a peer's decoder rows need not be unit-norm), so latents equal the
peer's own. Hub ids: :func:`rosettalens.sae.interop.load_sae`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rosettalens.errors import ConfigError, DataError
from rosettalens.io import atomic_dir, atomic_write_json, json_safe
from rosettalens.sae.sinks import NORM_RATIO, SKIP_FIRST, SinkRule

__all__ = ["ARCHS", "SAEConfig", "SAE", "FORMAT", "load_folder"]

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
FORMAT = "rosettalens.sae/1"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens's file name
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"  # EleutherAI sparsify's file name
SAELENS_VERSION_TAG = "6.0.0"  # the cfg.json schema we write (SAELens >= 6)


@dataclass
class SAEConfig:
    """One SAE: its shape, architecture and sparsity hyper-parameters.

    ``k``: active latents per token (``topk``), or on average per token over a batch (``batchtopk``).
    ``l1_coeff``: L1 penalty ``sum_i z_i * ||W_dec_i||`` per token (``relu``; inputs normalised to
    ``E||x - mean||^2 = d_in``). ``l0_coeff``: L0 penalty (``jumprelu``).
    ``aux_coeff`` / ``aux_k``: AuxK loss for dead latents (default 1/32 and ``d_in // 2`` for
    ``topk``/``batchtopk``, off for the others). ``lr``: overrides :class:`TrainConfig`'s learning rate.
    ``model`` / ``hook``: recorded in the saved config (SAELens metadata).
    ``skip_first`` / ``norm_ratio`` / ``median_norm``: the positions left out of training, evaluation
    and splicing (:mod:`rosettalens.sae.sinks`: the first ``skip_first`` positions of each document and
    tokens whose norm exceeds ``norm_ratio`` x ``median_norm``; the trainer measures ``median_norm``).
    """

    d_in: int
    width: int
    arch: str = "topk"
    k: int | None = None
    l1_coeff: float = 2.0
    l0_coeff: float = 1.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.1
    aux_coeff: float | None = None
    aux_k: int | None = None
    lr: float | None = None
    seed: int = 0
    model: str | None = None
    hook: str | None = None
    skip_first: int = SKIP_FIRST
    norm_ratio: float = NORM_RATIO
    median_norm: float | None = None

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown SAE architecture {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.d_in < 1 or self.width < 1:
            raise ConfigError(f"d_in and width must be >= 1, got d_in={self.d_in}, width={self.width}")
        if self.arch in ("topk", "batchtopk"):
            if self.k is None:
                raise ConfigError(f"arch {self.arch} needs k (active latents per token), e.g. --k 32")
            if not 1 <= self.k < self.width:
                raise ConfigError(f"k must be in [1, width) = [1, {self.width}), got k={self.k}")
        elif self.k is not None and not 1 <= self.k < self.width:
            raise ConfigError(f"k must be in [1, width) = [1, {self.width}), got k={self.k}")
        for name in ("l1_coeff", "l0_coeff", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v}")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            raise ConfigError("jumprelu_bandwidth and jumprelu_init_threshold must be > 0")
        if self.aux_coeff is not None and not (math.isfinite(self.aux_coeff) and self.aux_coeff >= 0):
            raise ConfigError(f"aux_coeff must be >= 0, got {self.aux_coeff}")
        if self.aux_k is not None and self.aux_k < 1:
            raise ConfigError(f"aux_k must be >= 1, got {self.aux_k}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        self.sink_rule()  # raises ConfigError on a bad rule

    def sink_rule(self) -> SinkRule:
        """The positions this SAE leaves out (:class:`rosettalens.sae.sinks.SinkRule`)."""
        return SinkRule(int(self.skip_first), float(self.norm_ratio), self.median_norm)

    @property
    def aux_coeff_(self) -> float:
        if self.aux_coeff is not None:
            return self.aux_coeff
        return 1 / 32 if self.arch in ("topk", "batchtopk") else 0.0

    @property
    def aux_k_(self) -> int:
        return min(self.aux_k or max(1, self.d_in // 2), self.width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------------ activations
def topk_relu(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``pre [n, width]``, relu'd: ``(values [n, k], indices [n, k])``."""
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return vals.relu(), idx


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; d/dthreshold by the rectangle-kernel straight-through estimator
    (Rajamanoharan et al. 2024): ``-(threshold / bandwidth) * rect((pre - threshold) / bandwidth)``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        g_pre = (pre > threshold).to(pre.dtype) * g
        g_thr = (-(threshold / bw) * _rect((pre - threshold) / bw) * g).sum(0)
        return g_pre, g_thr, None


class _Step(torch.autograd.Function):
    """Heaviside ``(pre > threshold)``; d/dthreshold ``= -(1 / bandwidth) * rect((pre - threshold) / bandwidth)``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        g_thr = (-(1.0 / bw) * _rect((pre - threshold) / bw) * g).sum(0)
        return None, g_thr, None


jumprelu = _JumpReLU.apply
step = _Step.apply


# ------------------------------------------------------------------------------------------------ SAE
class SAE(nn.Module):
    """A sparse autoencoder ``x [n, d_in] -> z [n, width] -> x_hat [n, d_in]`` (see the module docstring).

    ``encode`` / ``decode`` / ``forward`` take and return raw activations (the input normalisation is
    applied inside). ``save(dir)`` writes SAELens's format; ``SAE.load(dir)`` reads ours, SAELens's and
    sparsify's folders.
    """

    threshold: Tensor | None
    scale: Tensor

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, w = cfg.d_in, cfg.width
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(w, d, generator=g, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if cfg.arch == "relu":
            W_dec *= 0.1  # Anthropic (April 2024): small decoder norms at init, L1 weighted by them
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(w))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.arch == "jumprelu":
            self.threshold = nn.Parameter(torch.full((w,), float(cfg.jumprelu_init_threshold)))
        elif cfg.arch == "batchtopk":
            self.register_buffer("threshold", torch.zeros(w))
        else:
            self.threshold = None
        self.register_buffer("scale", torch.tensor(1.0))
        self.input_scale: float = 1.0  # the normalisation folded into the weights (1.0: none)
        self.info: dict[str, Any] = {}  # training record, metrics: saved in cfg.json
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def arch(self) -> str:
        return self.cfg.arch

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        return f"arch={self.arch}, d_in={self.d_in}, width={self.width}{k}"

    # ------------------------------------------------------------------ forward
    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``[n, width]`` of raw ``x [n, d_in]``."""
        x = x.to(self.W_enc.dtype)
        return (x * self.scale - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Latents ``[n, width]`` from pre-activations (the inference rule of each architecture)."""
        arch = self.cfg.arch
        if arch == "relu":
            return pre.relu()
        if arch == "topk":
            vals, idx = topk_relu(pre, int(self.cfg.k))  # type: ignore[arg-type]
            return torch.zeros_like(pre).scatter_(-1, idx, vals)
        assert self.threshold is not None
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Latents ``z [n, width]`` of activations ``x [n, d_in]`` (any leading dims are kept)."""
        shape = x.shape
        z = self.activate(self.pre_acts(x.reshape(-1, shape[-1])))
        return z.reshape(*shape[:-1], self.width)

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction ``x_hat [n, d_in]`` of latents ``z [n, width]``."""
        return (z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.scale

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``x_hat`` of ``x [..., d_in]``, in ``x``'s dtype."""
        return self.decode(self.encode(x)).to(x.dtype)

    # ------------------------------------------------------------------ folding
    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make decoder rows unit-norm without changing ``forward``: ``z_i`` is scaled by ``||W_dec_i||``."""
        n = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(n[:, None])
        self.W_enc.mul_(n[None, :])
        self.b_enc.mul_(n)
        if self.threshold is not None:
            self.threshold.mul_(n)

    @torch.no_grad()
    def fold_scale(self) -> None:
        """Fold the input normalisation into the weights (``scale -> 1``); ``forward`` is unchanged and
        latents are divided by the scale (they become the coefficients of unit decoder rows in raw units)."""
        s = float(self.scale)
        if s == 1.0:
            return
        self.b_dec.div_(s)
        self.b_enc.div_(s)
        if self.threshold is not None:
            self.threshold.div_(s)
        self.scale.fill_(1.0)
        self.input_scale *= s

    # ------------------------------------------------------------------ save / load
    def saelens_config(self) -> dict[str, Any]:
        """``cfg.json`` in SAELens's (>= 6) schema, with our own record under ``"rosettalens"``."""
        arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[
            self.arch
        ]
        cfg: dict[str, Any] = {
            "architecture": arch,
            "d_in": self.d_in,
            "d_sae": self.width,
            "dtype": str(self.W_enc.dtype).replace("torch.", ""),
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_VERSION_TAG,
                "sae_lens_training_version": SAELENS_VERSION_TAG,
                "model_name": self.cfg.model,
                "hook_name": self.cfg.hook,
            },
        }
        if arch == "topk":
            cfg["k"] = int(self.cfg.k)  # type: ignore[arg-type]
            cfg["rescale_acts_by_decoder_norm"] = False
        cfg["rosettalens"] = {
            "format": FORMAT,
            "config": self.cfg.to_dict(),
            "input_scale": self.input_scale,
            "info": self.info,
        }
        return cfg

    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors of ``sae_weights.safetensors`` (normalisation folded; SAELens's names and shapes)."""
        sae = self
        if float(self.scale) != 1.0:
            sae = self.copy()
            sae.fold_scale()
        t = {
            "W_enc": sae.W_enc.detach(),
            "b_enc": sae.b_enc.detach(),
            "W_dec": sae.W_dec.detach(),
            "b_dec": sae.b_dec.detach(),
        }
        if sae.threshold is not None:
            t["threshold"] = sae.threshold.detach()
        return {k: v.to("cpu").contiguous() for k, v in t.items()}

    def copy(self) -> SAE:
        new = SAE(SAEConfig.from_dict(self.cfg.to_dict()))
        new.load_state_dict(self.state_dict())
        new.input_scale = self.input_scale
        new.info = json.loads(json.dumps(self.info))
        return new.to(self.device)

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the folder ``path``: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens's format).

        The folder is built beside ``path`` and swapped in whole. An existing SAE folder is replaced
        only with ``overwrite`` (default, as before); a folder holding other files is refused.
        """
        from safetensors.torch import save_file

        out = Path(path)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out} exists and is not a directory")
        src = self
        if float(self.scale) != 1.0:
            src = self.copy()
            src.fold_scale()
        with atomic_dir(out, overwrite=overwrite, what="SAE folder", replaceable=is_sae_dir) as tmp:
            cfg = src.saelens_config()
            save_file(src.state_tensors(), str(tmp / WEIGHTS_FILE))
            atomic_write_json(tmp / CFG_FILE, json_safe(cfg), indent=1)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> SAE:
        """Load an SAE folder: ours / SAELens's (``cfg.json`` + ``sae_weights.safetensors``) or
        EleutherAI sparsify's (``cfg.json`` + ``sae.safetensors``). See :func:`load_sae` for hub ids."""
        sae = load_folder(Path(path))
        return sae.to(device) if device is not None else sae


def is_sae_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of one saved SAE: nothing in it but ``cfg.json``, an SAE weights
    file (SAELens's or sparsify's name) and ``training.png``. :meth:`SAE.save` replaces only such a folder (or an empty one)."""
    try:
        entries = list(Path(path).iterdir())
    except OSError:
        return False
    return all(e.is_file() and e.name in _SAE_FILES for e in entries)


def is_sae_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is what ``rosetta sae train`` writes: one SAE folder (:func:`is_sae_dir`), or
    folders of one SAE each (several widths / k); ``--overwrite`` replaces nothing else."""
    if is_sae_dir(path):
        return True
    try:
        entries = list(Path(path).iterdir())
    except OSError:
        return False
    return all(e.is_dir() and not e.is_symlink() and is_sae_dir(e) for e in entries)


_SAE_FILES = (CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE, "training.png")


# ------------------------------------------------------------------------------------------ reading
def _read_cfg(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise DataError(f"SAE folder {path} does not exist")
    p = path / CFG_FILE
    if not p.is_file():
        raise DataError(f"SAE folder {path} has no {CFG_FILE}")
    try:
        cfg = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{p} must hold a JSON object")
    return cfg


def _tensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        t = load_file(str(p))
    except Exception as e:  # safetensors raises its own error types
        raise DataError(f"{p} is not a readable safetensors file ({e})") from None
    return {k: v.float() for k, v in t.items()}


def _int(cfg: dict, key: str, where: Path) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise DataError(f"{where / CFG_FILE}: {key!r} must be an integer, got {v!r}")
    return v


def _expect(t: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: Path) -> torch.Tensor:
    if name not in t:
        raise DataError(f"{where}: the weights have no {name!r} (have: {', '.join(sorted(t))})")
    if tuple(t[name].shape) != shape:
        raise DataError(
            f"{where}: {name} has shape {tuple(t[name].shape)} but cfg.json implies {shape} (inconsistent cfg.json)"
        )
    return t[name]


def _build(cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None) -> SAE:
    try:
        sae = SAE(cfg)
    except ConfigError as e:
        raise DataError(f"inconsistent SAE config: {e}") from None
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if sae.threshold is not None:
            sae.threshold.copy_(threshold)
    return sae


def load_folder(path: Path) -> SAE:
    """An SAE from a local folder in any of the formats above."""
    cfg = _read_cfg(path)
    if (path / WEIGHTS_FILE).is_file():
        return _load_saelens(path, cfg)
    if (path / SPARSIFY_WEIGHTS_FILE).is_file():
        return _load_sparsify(path, cfg)
    raise DataError(
        f"SAE folder {path} has {CFG_FILE} but neither {WEIGHTS_FILE} nor {SPARSIFY_WEIGHTS_FILE}"
    )


def _load_saelens(path: Path, cfg: dict[str, Any]) -> SAE:
    ours = cfg.get("rosettalens")
    meta: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    d_in, d_sae = _int(cfg, "d_in", path), _int(cfg, "d_sae", path)
    arch_peer = cfg.get("architecture") or "standard"
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    k = cfg.get("k")
    if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):
        k = cfg["activation_fn_kwargs"].get("k")
    if arch_peer == "standard" and act == "topk" and k is not None:
        arch_peer = "topk"  # pre-6 topk schema
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise DataError(f"{path}: normalize_activations={norm!r} is not supported (only none)")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise DataError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")

    if isinstance(ours, dict):
        if ours.get("format") != FORMAT:
            raise DataError(
                f"{path}: unknown rosettalens SAE format {ours.get('format')!r} (expected {FORMAT})"
            )
        try:
            scfg = SAEConfig.from_dict(ours.get("config") or {})
        except TypeError as e:
            raise DataError(f"{path / CFG_FILE}: bad rosettalens config ({e})") from None
        if (scfg.d_in, scfg.width) != (d_in, d_sae):
            raise DataError(
                f"{path / CFG_FILE} is inconsistent: d_in/d_sae {d_in}/{d_sae} vs its rosettalens config "
                f"{scfg.d_in}/{scfg.width}"
            )
        want = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}.get(
            scfg.arch
        )
        if want != arch_peer:
            raise DataError(
                f"{path / CFG_FILE} is inconsistent: architecture {arch_peer!r} vs rosettalens arch {scfg.arch!r}"
            )
        if scfg.arch == "topk" and k != scfg.k:
            raise DataError(f"{path / CFG_FILE} is inconsistent: k={k} vs rosettalens k={scfg.k}")
    else:
        if arch_peer == "standard":
            if act != "relu":
                raise DataError(f"{path}: activation {act!r} is not supported (relu, topk, jumprelu)")
            arch = "relu"
        elif arch_peer in ("topk", "jumprelu"):
            arch = arch_peer
        else:
            raise DataError(
                f"{path}: SAELens architecture {arch_peer!r} is not supported (standard, topk, jumprelu)"
            )
        if arch == "topk" and not isinstance(k, int):
            raise DataError(f"{path / CFG_FILE}: a topk SAE needs an integer k, got {k!r}")
        scfg = SAEConfig(
            d_in=d_in,
            width=d_sae,
            arch=arch,
            k=int(k) if arch == "topk" else None,  # type: ignore[arg-type]
            model=meta.get("model_name", cfg.get("model_name")),
            hook=meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point"))),
        )
    t = _tensors(path / WEIGHTS_FILE)
    W_enc = _expect(t, "W_enc", (d_in, d_sae), path)
    b_enc = _expect(t, "b_enc", (d_sae,), path)
    W_dec = _expect(t, "W_dec", (d_sae, d_in), path)
    b_dec = _expect(t, "b_dec", (d_in,), path)
    thr = None
    if scfg.arch in ("jumprelu", "batchtopk"):
        if "threshold" in t:
            thr = _expect(t, "threshold", (d_sae,), path)
        elif "log_threshold" in t:
            thr = _expect(t, "log_threshold", (d_sae,), path).exp()
        else:
            raise DataError(f"{path}: a jumprelu SAE needs 'threshold' in {WEIGHTS_FILE}")
    if not cfg.get("apply_b_dec_to_input", True):  # SAELens then encodes x, not x - b_dec
        b_enc = b_enc + b_dec @ W_enc
    sae = _build(scfg, W_enc, b_enc, W_dec, b_dec, thr)
    if isinstance(ours, dict):
        sae.input_scale = float(ours.get("input_scale") or 1.0)
        sae.info = dict(ours.get("info") or {})
    sae.info.setdefault(
        "source", {"format": "rosettalens" if isinstance(ours, dict) else "saelens", "path": str(path)}
    )
    return sae


def _load_sparsify(path: Path, cfg: dict[str, Any]) -> SAE:
    d_in = _int(cfg, "d_in", path)
    n = cfg.get("num_latents") or 0
    if not n:
        ef = cfg.get("expansion_factor")
        if not isinstance(ef, int) or ef < 1:
            raise DataError(f"{path / CFG_FILE}: needs num_latents or expansion_factor")
        n = d_in * ef
    k = cfg.get("k")
    if not isinstance(k, int):
        raise DataError(f"{path / CFG_FILE}: 'k' must be an integer, got {k!r}")
    if cfg.get("activation", "topk") != "topk":
        raise DataError(f"{path}: sparsify activation {cfg.get('activation')!r} is not supported (topk only)")
    if cfg.get("transcode"):
        raise DataError(f"{path}: a sparsify transcoder is not an autoencoder; not supported")
    t = _tensors(path / SPARSIFY_WEIGHTS_FILE)
    if "W_skip" in t:
        raise DataError(f"{path}: sparsify skip connections (W_skip) are not supported")
    enc = _expect(t, "encoder.weight", (n, d_in), path)
    b_enc = _expect(t, "encoder.bias", (n,), path)
    W_dec = _expect(t, "W_dec", (n, d_in), path)
    b_dec = _expect(t, "b_dec", (d_in,), path)
    scfg = SAEConfig(d_in=d_in, width=n, arch="topk", k=k)
    sae = _build(scfg, enc.t(), b_enc, W_dec, b_dec)
    sae.info["source"] = {"format": "sparsify", "path": str(path)}
    return sae
