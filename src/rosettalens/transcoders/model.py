"""Per-layer transcoders (an MLP's input -> its output, through a sparse feature layer) and their files.

Shapes: ``x [..., d_in]`` the MLP's input (``mlp_in.L``: after the pre-MLP norm), ``f [..., width]``
feature activations, ``y [..., d_out]`` the MLP's output (``mlp_out.L``: what is added to the residual
stream; for Gemma after ``post_feedforward_layernorm``). Weights: ``W_enc [d_in, width]``,
``b_enc [width]``, ``W_dec [width, d_out]``, ``b_dec [d_out]``, ``W_skip [d_in, d_out]`` (optional)::

    pre  = x @ W_enc + b_enc
    topk f = relu of the k largest entries of pre (last dim), the rest 0   (at most k nonzeros)
    relu f = relu(pre)
    jumprelu f = pre * (pre > threshold)   (threshold [width]; loaded from circuit-tracer / Gemma Scope files)
    y_hat = f @ W_dec + b_dec (+ x @ W_skip with a skip connection)

A saved transcoder takes raw activations: the normalisation used in training is folded into the
weights (``TranscoderConfig.input_scale`` / ``output_scale`` record what was folded).

Files (documented in ``docs/transcoders.md``): one transcoder is a folder with ``transcoder.json``
(the config and a training record) and ``transcoder.safetensors``; a :class:`TranscoderSet` (one
transcoder per layer of one model) is a folder with ``transcoders.json`` and ``layer_{L}.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.io import atomic_dir, atomic_write_json, json_safe

__all__ = [
    "ARCHS",
    "FORMAT",
    "SET_FORMAT",
    "Transcoder",
    "TranscoderConfig",
    "TranscoderSet",
    "is_transcoder_set_dir",
]

ARCHS = ("topk", "relu", "jumprelu")
FORMAT = "rosettalens.transcoder/1"
SET_FORMAT = "rosettalens.transcoders/1"
CFG_FILE = "transcoder.json"
WEIGHTS_FILE = "transcoder.safetensors"
SET_FILE = "transcoders.json"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold")


def layer_file(layer: int) -> str:
    """The weights file of ``layer`` in a transcoder-set folder: ``layer_{L}.safetensors``."""
    return f"layer_{layer}.safetensors"


@dataclass
class TranscoderConfig:
    """One transcoder: where it reads and writes, its shape and its sparsity rule.

    ``hook_in`` / ``hook_out``: ``hook_name("mlp_in", layer)`` / ``hook_name("mlp_out", layer)``.
    ``skip_first``, ``norm_ratio``, ``median_norm_in`` / ``median_norm_out``: the attention-sink rule
    (:mod:`rosettalens.transcoders.sinks`): the first ``skip_first`` positions of each document and tokens
    whose MLP input or output norm exceeds ``norm_ratio`` times the training median are left out of
    training and evaluation. ``input_scale`` / ``output_scale``: the normalisation folded into the saved weights.
    ``tokens``: training tokens seen; ``seed``: the initialisation seed.
    """

    layer: int
    d_in: int
    d_out: int
    width: int
    arch: Literal["topk", "relu", "jumprelu"] = "topk"
    k: int = 32
    skip: bool = False
    hook_in: str = ""
    hook_out: str = ""
    model: str = ""
    skip_first: int = 1
    norm_ratio: float = 10.0
    median_norm_in: float | None = None
    median_norm_out: float | None = None
    input_scale: float = 1.0
    output_scale: float = 1.0
    tokens: int = 0
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(
                f"unknown transcoder architecture {self.arch!r}; expected one of {', '.join(ARCHS)}"
            )
        if min(self.d_in, self.d_out, self.width) < 1:
            raise ConfigError(
                f"d_in, d_out and width must be >= 1, got {self.d_in}, {self.d_out}, {self.width}"
            )
        if self.arch == "topk" and not 1 <= self.k <= self.width:
            raise ConfigError(f"k must be in [1, width] = [1, {self.width}], got k={self.k}")
        if self.skip_first < 0:
            raise ConfigError(f"skip_first must be >= 0, got {self.skip_first}")
        if not (math.isfinite(self.norm_ratio) and self.norm_ratio >= 0):
            raise ConfigError(f"norm_ratio must be a finite number >= 0, got {self.norm_ratio}")
        for name in ("input_scale", "output_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TranscoderConfig:
        names = {f.name for f in fields(cls)}
        missing = {"layer", "d_in", "d_out", "width"} - set(d)
        if missing:
            raise DataError(f"transcoder config lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in d.items() if k in names})


class Transcoder(nn.Module):
    """A sparse replacement of one MLP: ``x [..., d_in] -> f [..., width] -> y_hat [..., d_out]``.

    ``encode`` / ``decode`` / ``forward`` take and return raw activations (see the module docstring).
    """

    W_skip: nn.Parameter | None
    threshold: nn.Parameter | None

    def __init__(self, cfg: TranscoderConfig, device: str | torch.device | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d_in, d_out, w = cfg.d_in, cfg.d_out, cfg.width
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(w, d_out, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = torch.randn(d_in, w, generator=g)
        W_enc /= W_enc.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(w))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if cfg.skip else None
        self.threshold = nn.Parameter(torch.zeros(w)) if cfg.arch == "jumprelu" else None
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ properties
    @property
    def layer(self) -> int:
        return self.cfg.layer

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.arch == "topk" else ""
        return (
            f"layer={self.cfg.layer}, arch={self.cfg.arch}, d_in={self.cfg.d_in}, d_out={self.cfg.d_out}, "
            f"width={self.cfg.width}{k}, skip={self.cfg.skip}"
        )

    # ------------------------------------------------------------------ forward
    def _check(self, x: Tensor, d: int, what: str) -> None:
        if x.shape[-1] != d:
            raise ShapeError(
                f"transcoder of layer {self.cfg.layer}: {what} has width {x.shape[-1]}, expected {d}"
            )

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``[..., width]`` of ``x [..., d_in]``: ``x @ W_enc + b_enc``."""
        self._check(x, self.cfg.d_in, "input")
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Feature activations ``[..., width]`` from pre-activations (TopK over the last dim, or ReLU)."""
        if self.cfg.arch == "relu":
            return pre.relu()
        if self.threshold is not None:
            return pre * (pre > self.threshold).to(pre.dtype)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def encode(self, x: Tensor) -> Tensor:
        """Sparse feature activations ``[..., width]`` of ``x [..., d_in]``."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        """``f @ W_dec + b_dec`` ``[..., d_out]`` of features ``f [..., width]`` (the skip term is not included)."""
        self._check(f, self.cfg.width, "feature vector")
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def skip_out(self, x: Tensor) -> Tensor | None:
        """The skip term ``x @ W_skip`` ``[..., d_out]``, or ``None`` without a skip connection."""
        if self.W_skip is None:
            return None
        return x.to(self.W_skip.dtype) @ self.W_skip

    def forward(self, x: Tensor) -> Tensor:
        """The MLP output's reconstruction ``[..., d_out]``: ``decode(encode(x)) (+ x @ W_skip)``."""
        y = self.decode(self.encode(x))
        s = self.skip_out(x)
        return y if s is None else y + s

    def keep_mask(self, x: Tensor, y: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Positions ``[batch, pos]`` this transcoder stands for (``True``) under its attention-sink rule,
        from the MLP's real input ``x [batch, pos, d_in]`` and output ``y [batch, pos, d_out]``
        (:func:`rosettalens.transcoders.sinks.keep_mask` with the training medians)."""
        from rosettalens.transcoders.sinks import keep_mask

        c = self.cfg
        return keep_mask(
            x, y, attention_mask, c.skip_first, c.norm_ratio, (c.median_norm_in, c.median_norm_out)
        ).mask

    # ------------------------------------------------------------------ folding
    @torch.no_grad()
    def fold_scales(self, input_scale: float, output_scale: float) -> None:
        """Fold a normalisation into the weights: a transcoder trained on ``(x * input_scale,
        y * output_scale)`` becomes one on raw ``(x, y)`` with the same feature activations."""
        self.W_enc.mul_(input_scale)
        self.W_dec.div_(output_scale)
        self.b_dec.div_(output_scale)
        if self.W_skip is not None:
            self.W_skip.mul_(input_scale / output_scale)
        self.cfg.input_scale *= input_scale
        self.cfg.output_scale *= output_scale

    # ------------------------------------------------------------------ save / load
    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors of the weights file (names as in circuit-tracer / SAELens, float32 on the CPU)."""
        t = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            t["W_skip"] = self.W_skip
        if self.threshold is not None:
            t["threshold"] = self.threshold
        return {k: v.detach().to("cpu").contiguous() for k, v in t.items()}

    def config_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **json_safe(self.cfg.to_dict())}

    def save(self, folder: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write ``folder/transcoder.json`` + ``folder/transcoder.safetensors`` (built aside, swapped in whole)."""
        from safetensors.torch import save_file

        out = Path(folder)
        with atomic_dir(out, overwrite=overwrite, what="transcoder folder", replaceable=_is_tc_dir) as tmp:
            save_file(self.state_tensors(), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            atomic_write_json(tmp / CFG_FILE, self.config_json(), indent=1)
        return out

    @classmethod
    def from_tensors(cls, cfg: TranscoderConfig, tensors: dict[str, Tensor], where: str = "") -> Transcoder:
        """A transcoder with ``cfg`` and these weights (shapes checked; ``W_skip`` present iff ``cfg.skip``)."""
        tc = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in tc.state_tensors().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items() if k in TENSORS}
        if got != expected:
            raise DataError(
                f"transcoder weights{' in ' + where if where else ''}: shapes {got}, expected {expected}"
            )
        with torch.no_grad():
            for k in expected:
                getattr(tc, k).copy_(tensors[k].to(torch.float32))
        return tc

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> Transcoder:
        """Load a folder written by :meth:`save`."""
        from safetensors.torch import load_file

        p = Path(folder)
        cfg_path, w_path = p / CFG_FILE, p / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise DataError(f"{p} is not a transcoder folder (expected {CFG_FILE} and {WEIGHTS_FILE})")
        cfg = _read_config(cfg_path, FORMAT)
        tc = cls.from_tensors(TranscoderConfig.from_dict(cfg), load_file(str(w_path)), str(w_path))
        return tc.to(device) if device is not None else tc


def _read_config(path: Path, fmt: str) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise DataError(
            f"{path} is not a {fmt} file (format {d.get('format') if isinstance(d, dict) else None!r})"
        )
    return d


def _is_tc_dir(path: Path) -> bool:
    return all(e.is_file() and e.name in (CFG_FILE, WEIGHTS_FILE) for e in path.iterdir())


def is_transcoder_set_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds nothing but a saved :class:`TranscoderSet` (what ``--overwrite`` may replace)."""
    try:
        entries = list(Path(path).iterdir())
    except OSError:
        return False
    return all(
        e.is_file() and (e.name == SET_FILE or (e.name.startswith("layer_") and e.suffix == ".safetensors"))
        for e in entries
    )


class TranscoderSet:
    """One transcoder per chosen layer of one model: ``tset[L]`` is layer ``L``'s :class:`Transcoder`.

    ``info``: the set's training / evaluation record (saved in ``transcoders.json``).
    """

    def __init__(self, model: str, transcoders: dict[int, Transcoder], info: dict[str, Any] | None = None):
        if not transcoders:
            raise ConfigError("a transcoder set needs at least one transcoder")
        for layer, tc in transcoders.items():
            if tc.cfg.layer != layer:
                raise ConfigError(f"transcoder stored under layer {layer} has cfg.layer={tc.cfg.layer}")
        self.model = model
        self.transcoders = dict(sorted(transcoders.items()))
        self.info: dict[str, Any] = info or {}

    def __getitem__(self, layer: int) -> Transcoder:
        try:
            return self.transcoders[layer]
        except KeyError:
            raise ConfigError(f"no transcoder for layer {layer}; this set has layers {self.layers}") from None

    def __contains__(self, layer: object) -> bool:
        return layer in self.transcoders

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.transcoders)

    @property
    def layers(self) -> list[int]:
        return sorted(self.transcoders)

    def to(self, device: str | torch.device) -> TranscoderSet:
        for tc in self.transcoders.values():
            tc.to(device)
        return self

    def __repr__(self) -> str:
        return f"TranscoderSet({self.model!r}, layers={self.layers})"

    def save(self, folder: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write ``folder/transcoders.json`` (format, model, every layer's config) and one
        ``folder/layer_{L}.safetensors`` per layer; the folder is built aside and swapped in whole."""
        from safetensors.torch import save_file

        out = Path(folder)
        with atomic_dir(
            out, overwrite=overwrite, what="transcoder set", replaceable=is_transcoder_set_dir
        ) as tmp:
            for layer, tc in self.transcoders.items():
                save_file(tc.state_tensors(), str(tmp / layer_file(layer)), metadata={"format": FORMAT})
            manifest = {
                "format": SET_FORMAT,
                "model": self.model,
                "layers": self.layers,
                "transcoders": {str(L): json_safe(tc.cfg.to_dict()) for L, tc in self.transcoders.items()},
                "info": json_safe(self.info),
            }
            atomic_write_json(tmp / SET_FILE, manifest, indent=1)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> TranscoderSet:
        """Load a folder written by :meth:`save`."""
        from safetensors.torch import load_file

        p = Path(folder)
        if not (p / SET_FILE).is_file():
            raise DataError(
                f"{p} is not a transcoder set (no {SET_FILE}); train one with `rosetta transcoders train`"
            )
        d = _read_config(p / SET_FILE, SET_FORMAT)
        tcs: dict[int, Transcoder] = {}
        for key, cfg in d.get("transcoders", {}).items():
            w = p / layer_file(int(key))
            if not w.is_file():
                raise DataError(f"transcoder set {p}: {w.name} is missing")
            tcs[int(key)] = Transcoder.from_tensors(
                TranscoderConfig.from_dict(cfg), load_file(str(w)), str(w)
            )
        tset = cls(str(d.get("model", "")), tcs, info=d.get("info") or {})
        return tset.to(device) if device is not None else tset
