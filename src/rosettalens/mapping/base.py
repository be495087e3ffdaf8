"""Common machinery for mappers: the estimator interface, validation, and on-disk format.

A mapper learns ``f: R^{d_src} -> R^{d_tgt}`` from paired activations
``X_src [n, d_src]`` and ``X_tgt [n, d_tgt]`` (row ``i`` of both is the same token / prompt).

On disk a mapper is a directory holding

* ``mapper.safetensors`` -- its tensors (float64 for the closed-form mappers);
* ``config.json`` -- ``kind``, widths, hyper-parameters, fit statistics, the source/target model
  and hook names when known, and the sha256 of the weights file.

The folder is built beside the target and swapped in whole (:func:`rosettalens.io.atomic_dir`): an
existing mapper is refused unless ``overwrite``, and then replaced entirely, never mixed with new files.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rosettalens.errors import ConfigError, DataError, RosettaError, ShapeError
from rosettalens.io import atomic_dir, atomic_path, atomic_write_json, json_safe, sha256_file

FORMAT = "rosettalens.mapper"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "mapper.safetensors"
META_KEYS = ("source_model", "target_model", "source_hook", "target_hook")

_REGISTRY: dict[str, type[Mapper]] = {}


class MapperError(RosettaError):
    """A mapper directory is missing, corrupt, of an unknown kind, or a mapper was used unfitted."""


def register_kind(cls: type[Mapper]) -> type[Mapper]:
    """Class decorator: make ``cls`` loadable by :func:`load_mapper` under ``cls.kind``."""
    _REGISTRY[cls.kind] = cls
    return cls


def mapper_kinds() -> list[str]:
    """Names of every registered mapper kind (``affine``, ``orthogonal``, ...)."""
    return sorted(_REGISTRY)


def get_mapper_class(kind: str) -> type[Mapper]:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ConfigError(
            f"unknown mapper kind {kind!r}; expected one of {', '.join(mapper_kinds())}"
        ) from None


# --------------------------------------------------------------------------- validation


def as_matrix(X: Any, name: str, width: int | None = None) -> torch.Tensor:
    """Check ``X`` is a finite 2-D float tensor ``[n, d]`` (``width`` = expected ``d``) and return it."""
    if not isinstance(X, torch.Tensor):
        try:
            X = torch.as_tensor(X)
        except Exception as e:  # noqa: BLE001 - anything unconvertible is the user's input
            raise DataError(f"{name}: expected a tensor [n, d], got {type(X).__name__}") from e
    if X.ndim != 2:
        raise ShapeError(f"{name}: expected a 2-D tensor [n, d], got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        X = X.to(torch.float32)
    if X.shape[0] == 0:
        raise DataError(f"{name}: no rows (empty data)")
    if width is not None and X.shape[1] != width:
        raise ShapeError(f"{name}: width {X.shape[1]} does not match the mapper's {width}")
    if not bool(torch.isfinite(X).all()):
        raise DataError(f"{name}: contains NaN or inf")
    return X


def check_pair(X_src: Any, X_tgt: Any, min_rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a paired training set: ``X_src [n, d_src]``, ``X_tgt [n, d_tgt]``."""
    X_src = as_matrix(X_src, "X_src")
    X_tgt = as_matrix(X_tgt, "X_tgt")
    if X_src.shape[0] != X_tgt.shape[0]:
        raise ShapeError(
            f"X_src has {X_src.shape[0]} rows but X_tgt has {X_tgt.shape[0]}; rows must be paired one to one"
        )
    if X_src.shape[0] < min_rows:
        raise DataError(f"need at least {min_rows} paired rows to fit, got {X_src.shape[0]}")
    return X_src, X_tgt


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train/validation split of ``range(n)`` (at least one row on each side)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def mean_row_norm(X: torch.Tensor, chunk: int = 65536) -> float:
    """Mean L2 norm of the rows of ``X [n, d]`` (float64 accumulation)."""
    total = 0.0
    for i in range(0, X.shape[0], chunk):
        total += float(X[i : i + chunk].to(torch.float64).norm(dim=1).sum())
    return total / X.shape[0]


# --------------------------------------------------------------------------- activation metrics
def _f64(a: torch.Tensor) -> torch.Tensor:
    return a.detach().to("cpu", torch.float64)


def fvu(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of variance unexplained: ``Σ||y - ŷ||² / Σ||y - ȳ||²`` over rows ``[n, d]``."""
    p, t = _f64(pred), _f64(target)
    sst = float(((t - t.mean(0)) ** 2).sum())
    return float(((t - p) ** 2).sum()) / sst if sst > 0 else float("nan")


def r2_per_dim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over dimensions of per-dimension R² (dimensions with zero variance skipped)."""
    p, t = _f64(pred), _f64(target)
    sst = ((t - t.mean(0)) ** 2).sum(0)
    ok = sst > 0
    if not bool(ok.any()):
        return float("nan")
    return float((1 - ((t - p) ** 2).sum(0)[ok] / sst[ok]).mean())


def mean_cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over rows of ``cos(ŷ_i, y_i)``."""
    return float(F.cosine_similarity(_f64(pred), _f64(target), dim=-1, eps=1e-12).mean())


def activation_metrics(mapper: Mapper, X_src: Any, X_tgt: Any, seed: int = 0) -> dict[str, Any]:
    """FVU, R², mean cosine (and its shuffled baseline), MSE of ``mapper`` on held-out pairs.

    Defined in :mod:`rosettalens.mapping.evaluate`'s terms (see its docstring); it lives here, beside
    :meth:`Mapper.score`, so that ``evaluate`` imports ``base`` and never the other way round.
    """
    X = as_matrix(X_src, "X_src", mapper.d_src)
    Y = as_matrix(X_tgt, "X_tgt", mapper.d_tgt)
    if X.shape[0] != Y.shape[0]:
        raise ShapeError(f"X_src has {X.shape[0]} rows but X_tgt has {Y.shape[0]}")
    P = mapper.transform(X.to(torch.float64) if X.dtype == torch.float64 else X.float())
    f = fvu(P, Y)
    perm = torch.randperm(Y.shape[0], generator=torch.Generator().manual_seed(seed))
    return {
        "n": int(X.shape[0]),
        "fvu": f,
        "r2": 1.0 - f,
        "r2_per_dim": r2_per_dim(P, Y),
        "mean_cosine": mean_cosine(P, Y),
        "mean_cosine_shuffled": mean_cosine(P, Y[perm]),
        "mse": float(((_f64(P) - _f64(Y)) ** 2).mean()),
    }


# --------------------------------------------------------------------------- files


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as one safetensors file atomically (:func:`rosettalens.io.atomic_path`); return its sha256."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        return sha256_file(tmp)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise MapperError(f"{what}: {path} is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MapperError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise MapperError(f"{what}: {path} does not hold a JSON object")
    return obj


def read_tensors(path: Path, what: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MapperError(f"{what}: {path} is missing")
    if sha256 is not None and sha256_file(path) != sha256:
        raise MapperError(f"{what}: {path} does not match the sha256 recorded in its config (corrupt file)")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise MapperError(f"{what}: {path} is not a readable safetensors file ({e})") from None


def _package_version() -> str:
    try:
        return importlib.metadata.version("rosettalens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


# --------------------------------------------------------------------------- base class


class Mapper:
    """Base class of every mapper: ``fit(X_src, X_tgt)`` then ``transform(X)``; ``save`` / ``load``.

    Subclasses set ``kind``, implement ``fit``, ``_transform`` (float tensor ``[n, d_src]`` ->
    ``[n, d_tgt]``), ``_hparams`` (JSON-able constructor kwargs), ``_state`` (tensors) and
    ``_set_state``.

    Attributes after ``fit``: ``d_src``, ``d_tgt``, ``fit_info`` (dict of fit statistics, including
    ``src_mean_norm`` / ``tgt_mean_norm`` -- the mean L2 row norm of the training activations, used
    for norm calibration when transferring vectors), and ``meta`` (source/target model and hook
    names, when known).
    """

    kind: ClassVar[str] = ""
    linear: ClassVar[bool] = False

    def __init__(self) -> None:
        self.d_src: int | None = None
        self.d_tgt: int | None = None
        self.fit_info: dict[str, Any] = {}
        self.meta: dict[str, str | None] = {k: None for k in META_KEYS}

    # ---- interface
    @property
    def fitted(self) -> bool:
        return self.d_src is not None

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise MapperError(f"this {type(self).__name__} is not fitted; call fit(X_src, X_tgt) first")

    def fit(self, X_src: torch.Tensor, X_tgt: torch.Tensor) -> Mapper:  # pragma: no cover - abstract
        raise NotImplementedError

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """Map source activations ``[..., d_src]`` to target space ``[..., d_tgt]``.

        Float64 input is computed in float64; anything else in float32 and cast back to the
        input's dtype. The result is on ``X``'s device.
        """
        self._require_fitted()
        assert self.d_src is not None and self.d_tgt is not None  # fitted
        if not isinstance(X, torch.Tensor):
            X = torch.as_tensor(X)
        if X.ndim == 0 or X.shape[-1] != self.d_src:
            raise ShapeError(
                f"{self.kind} mapper expects source width {self.d_src}, got tensor of shape {tuple(X.shape)}"
            )
        lead = X.shape[:-1]
        Xf = X.reshape(-1, self.d_src)
        dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
        out = self._transform(Xf.to(dtype))
        out_dtype = X.dtype if X.is_floating_point() else torch.float32
        return out.to(out_dtype).reshape(*lead, self.d_tgt)

    __call__ = transform

    def score(self, X_src: torch.Tensor, X_tgt: torch.Tensor) -> dict[str, float]:
        """Held-out metrics (FVU, R², mean cosine, ...) of this mapper on ``X_src [n, d_src]``, ``X_tgt [n, d_tgt]``.

        See :func:`activation_metrics`.
        """
        return activation_metrics(self, X_src, X_tgt)

    def set_meta(self, **meta: str | None) -> Mapper:
        """Record ``source_model``, ``target_model``, ``source_hook``, ``target_hook`` (None = keep)."""
        for k, v in meta.items():
            if k not in META_KEYS:
                raise ConfigError(f"unknown mapper metadata key {k!r}; expected one of {META_KEYS}")
            if v is not None:
                self.meta[k] = str(v)
        return self

    # ---- subclass hooks
    def _transform(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hparams(self) -> dict[str, Any]:
        return {}

    def _state(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _record_norms(self, X_src: torch.Tensor, X_tgt: torch.Tensor) -> None:
        self.fit_info["n_rows"] = int(X_src.shape[0])
        self.fit_info["src_mean_norm"] = mean_row_norm(X_src)
        self.fit_info["tgt_mean_norm"] = mean_row_norm(X_tgt)

    # ---- persistence
    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "d_src": self.d_src,
            "d_tgt": self.d_tgt,
            "hparams": self._hparams(),
            "fit": self.fit_info,
            **self.meta,
            "weights": WEIGHTS_NAME,
            "versions": {"rosettalens": _package_version(), "torch": torch.__version__},
        }

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = True, **meta: str | None) -> Path:
        """Write the folder ``directory`` holding ``mapper.safetensors`` + ``config.json``.

        The folder is built beside ``directory`` and swapped in whole. An existing ``directory`` is
        refused (:class:`~rosettalens.errors.OutputExistsError`) unless ``overwrite``; with it, an
        existing mapper (or empty folder) is replaced entirely, while a folder holding anything
        else is refused. ``meta`` may give ``source_model``, ``target_model``, ``source_hook``,
        ``target_hook``; they are recorded in the config. Returns the directory path.
        """
        self._require_fitted()
        self.set_meta(**meta)
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise MapperError(f"cannot save mapper: {d} exists and is not a directory")
        with atomic_dir(d, overwrite=overwrite, what="mapper", replaceable=is_mapper_dir) as tmp:
            digest = save_tensors(tmp / WEIGHTS_NAME, self._state(), metadata={"kind": self.kind})
            cfg = self.config()
            cfg["weights_sha256"] = digest
            atomic_write_json(tmp / CONFIG_NAME, json_safe(cfg))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Mapper:
        """Load a mapper saved by :meth:`save`. On a subclass, the saved kind must match it."""
        m = load_mapper(directory)
        if cls is not Mapper and not isinstance(m, cls):
            raise MapperError(f"{directory} holds a {m.kind!r} mapper, not a {cls.kind!r} one")
        return m

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hparams().items())
        shape = f"{self.d_src}->{self.d_tgt}" if self.fitted else "unfitted"
        return f"{type(self).__name__}({hp}) [{shape}]"


def is_mapper_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a saved mapper (its ``config.json`` has the mapper format)."""
    try:
        cfg = json.loads((Path(directory) / CONFIG_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == FORMAT


def read_mapper_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a saved mapper (validated), without loading its weights."""
    d = Path(directory)
    if not d.is_dir():
        raise MapperError(
            f"mapper directory {d} does not exist (expected a folder written by `rosetta map train`)"
        )
    cfg = read_json(d / CONFIG_NAME, f"mapper {d}")
    if cfg.get("format") != FORMAT:
        raise MapperError(
            f"{d / CONFIG_NAME} is not a rosettalens mapper config (format={cfg.get('format')!r})"
        )
    if int(cfg.get("format_version", -1)) > FORMAT_VERSION:
        raise MapperError(f"{d} was written by a newer rosettalens (format_version {cfg['format_version']})")
    for key in ("kind", "d_src", "d_tgt", "weights_sha256"):
        if key not in cfg:
            raise MapperError(f"{d / CONFIG_NAME} lacks {key!r} (corrupt or half-written mapper)")
    if cfg["kind"] not in _REGISTRY:
        raise MapperError(
            f"{d} holds a mapper of unknown kind {cfg['kind']!r}; known: {', '.join(mapper_kinds())}"
        )
    return cfg


def load_mapper(directory: str | os.PathLike[str]) -> Mapper:
    """Load any saved mapper, dispatching on the ``kind`` in its ``config.json``.

    Raises :class:`MapperError` (a ``RosettaError``) for a missing directory, missing or corrupt
    files, a checksum mismatch, or an unknown kind.
    """
    d = Path(directory)
    cfg = read_mapper_config(d)
    cls = _REGISTRY[cfg["kind"]]
    tensors = read_tensors(d / cfg.get("weights", WEIGHTS_NAME), f"mapper {d}", sha256=cfg["weights_sha256"])
    try:
        m = cls(**cfg.get("hparams", {}))
    except TypeError as e:
        raise MapperError(f"{d / CONFIG_NAME}: bad hyper-parameters for {cfg['kind']!r} ({e})") from None
    m.d_src, m.d_tgt = int(cfg["d_src"]), int(cfg["d_tgt"])
    m.fit_info = dict(cfg.get("fit", {}))
    m.set_meta(**{k: cfg.get(k) for k in META_KEYS})
    try:
        m._set_state(tensors)
    except (KeyError, RuntimeError, ValueError) as e:
        raise MapperError(f"mapper {d}: weights do not match its config ({e})") from None
    return m


#: :func:`record_mapper`'s file beside the mapper folder: the mapper's held-out fidelity
METRICS_NAME = "mapper_metrics.json"


def record_mapper(
    run_dir: str | os.PathLike[str],
    mapper: Mapper,
    X_val: torch.Tensor,
    Y_val: torch.Tensor,
    *,
    source_model: str,
    source_hook: str,
    target_model: str,
    target_hook: str,
) -> dict[str, Any]:
    """Save a fitted ``mapper`` as ``run_dir/mapper/`` and its held-out fidelity on ``X_val [n, d_src]``
    -> ``Y_val [n, d_tgt]`` (:func:`activation_metrics`) as ``run_dir/mapper_metrics.json``; returns
    the metrics. :func:`load_recorded_mapper` reads both back."""
    d = Path(run_dir)
    metrics = activation_metrics(mapper, X_val, Y_val)
    mapper.save(d / "mapper", source_model=source_model, source_hook=source_hook, target_model=target_model,
                target_hook=target_hook)  # fmt: skip
    atomic_write_json(d / METRICS_NAME, json_safe(metrics))
    return metrics


def load_recorded_mapper(run_dir: str | os.PathLike[str]) -> tuple[Mapper, dict[str, Any]]:
    """``(mapper, metrics)`` written by :func:`record_mapper` into ``run_dir``."""
    d = Path(run_dir)
    return load_mapper(d / "mapper"), read_json(d / METRICS_NAME, "mapper metrics")
