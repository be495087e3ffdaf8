"""Steering vectors: the :class:`SteeringVector` artifact and the math that makes one.

Conventions (stated once, tested in ``tests/test_steering.py``):

- Activations are read with ``hm.run_with_cache`` on chat-formatted prompts (``chat=True`` by default)
  at residual-width hook points (``embed``, ``resid_pre/mid/post.L``, ``attn_out.L``, ``mlp_out.L``).
- ``positions="last"``: the activation at the last prompt token (the end of the chat template's
  generation prompt; prompts are left-padded, so this is position ``-1`` of every row).
  ``positions="mean"``: per prompt, the mean over its non-pad positions (the attention mask is the
  weight, so padding never enters a mean), then the mean over prompts -- every prompt weighs the
  same whatever its length. An int (``-k``) takes the k-th position from the end of each prompt.
- Difference of means: ``v = mean(pos) - mean(neg)`` (not normalised; its norm is meaningful for
  addition). PCA: the first principal component of the pooled, centred activations of both sets,
  oriented so that the positive set projects higher than the negative one and scaled to the length
  of the difference of means projected on it.
- Everything is computed in float64 and stored as float32.

On disk a vector is ``NAME.safetensors`` (tensor ``vector`` ``[d_model]``, with the JSON metadata
also in the safetensors header) plus a readable ``NAME.json`` sidecar; both written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.io import atomic_write_bytes, atomic_write_json, check_output, json_safe, sha256_bytes
from rosettalens.names import parse_hook_name

if TYPE_CHECKING:
    from rosettalens.hooks import HookedModel

__all__ = [
    "FORMAT",
    "RESIDUAL_KINDS",
    "SteeringVector",
    "SteeringVectorError",
    "collect_activations",
    "compute_vector",
    "compute_vectors",
    "cosine",
    "diff_of_means",
    "pca_direction",
    "progress_bar",
]

FORMAT = "rosettalens.steering_vector"
FORMAT_VERSION = 1
RESIDUAL_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
METHODS = ("diff_of_means", "pca")


class SteeringVectorError(DataError):
    """A steering-vector file is missing, corrupt, or not a rosettalens vector."""


# ---------------------------------------------------------------------------------------------- math
def _as_2d(X: Tensor | Sequence, name: str) -> Tensor:
    X = torch.as_tensor(X)
    if X.dim() != 2 or X.shape[0] == 0:
        raise ShapeError(f"{name} must be a non-empty matrix [n, d_model], got shape {tuple(X.shape)}")
    return X.to(torch.float64)


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors of any shape (flattened, float64); 0 when either is zero."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def diff_of_means(pos: Tensor, neg: Tensor) -> Tensor:
    """``mean(pos, 0) - mean(neg, 0)``.

    pos: ``[n_pos, d_model]``, neg: ``[n_neg, d_model]`` -> ``[d_model]`` (float64).
    """
    P, N = _as_2d(pos, "positive activations"), _as_2d(neg, "negative activations")
    if P.shape[1] != N.shape[1]:
        raise ShapeError(f"positive width {P.shape[1]} != negative width {N.shape[1]}")
    return P.mean(0) - N.mean(0)


def pca_direction(pos: Tensor, neg: Tensor) -> Tensor:
    """First principal component of the pooled, centred activations ``[pos; neg]``.

    Oriented so that ``mean(pos) - mean(neg)`` has a positive projection on it, and scaled to that
    projection's length (so adding it moves the negative mean to the positive mean along the PC).
    pos: ``[n_pos, d_model]``, neg: ``[n_neg, d_model]`` -> ``[d_model]`` (float64).
    """
    P, N = _as_2d(pos, "positive activations"), _as_2d(neg, "negative activations")
    if P.shape[1] != N.shape[1]:
        raise ShapeError(f"positive width {P.shape[1]} != negative width {N.shape[1]}")
    X = torch.cat([P, N], 0)
    if X.shape[0] < 2:
        raise ShapeError("PCA needs at least two activations")
    Xc = X - X.mean(0, keepdim=True)
    # right singular vector of the centred data == top eigenvector of the covariance
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    pc = Vh[0]
    proj = float((P.mean(0) - N.mean(0)) @ pc)
    if proj < 0:
        pc, proj = -pc, -proj
    return pc * proj


# ---------------------------------------------------------------------------------------------- artifact
@dataclass
class SteeringVector:
    """A direction in one model's activation space at one hook point.

    vector: ``[d_model]`` float32 (raw, not normalised). kind: ``diff_of_means | pca | refusal |
    transferred | random``. source: free-form provenance (prompt sets, counts, positions, layer
    selection, transfer details) saved with the vector.
    """

    vector: Tensor
    model: str
    hook: str
    kind: str = "diff_of_means"
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vector).detach()
        if v.dim() != 1 or v.numel() == 0:
            raise ShapeError(f"a steering vector must be 1-D [d_model], got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ShapeError("steering vector contains NaN or inf")
        self.vector = v.to(device="cpu", dtype=torch.float32).contiguous()

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.double().norm())

    def unit(self) -> Tensor:
        """The vector normalised to length 1 ``[d_model]`` (raises ShapeError for a zero vector)."""
        n = self.vector.double().norm()
        if n == 0:
            raise ShapeError("cannot normalise a zero steering vector")
        return (self.vector.double() / n).float()

    def check_compatible(self, hm: HookedModel, hook: str | None = None) -> str:
        """Check this vector fits ``hm`` at ``hook`` (default: its own hook); returns the resolved hook.

        Raises :class:`ShapeError` when the hook's width differs from the vector's ``d_model``.
        """
        name = hm.resolve_hook(hook if hook is not None else self.hook)
        kind = parse_hook_name(name)[0]
        if kind not in RESIDUAL_KINDS:
            raise ShapeError(f"cannot use a steering vector at {name}: not a residual-width hook point")
        width = int(hm.cfg.d_model)
        if width != self.d_model:
            raise ShapeError(
                f"steering vector from {self.model} at {self.hook} has d_model {self.d_model}, but "
                f"{name} of {hm.name} has width {width}; transfer it with a mapper "
                "(rosetta steer transfer) or compute a vector for this model"
            )
        return name

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "hook": self.hook,
            "d_model": self.d_model,
            "kind": self.kind,
            "norm": self.norm,
            "source": self.source,
            "versions": {"torch": torch.__version__, "rosettalens": _version()},
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write ``path`` (safetensors; ``.safetensors`` appended if missing) and a ``.json`` sidecar.

        Both files are written atomically. An existing vector (or sidecar) is refused
        (:class:`~rosettalens.errors.OutputExistsError`) unless ``overwrite``, before anything is
        written; a folder given as ``path`` is a :class:`ConfigError`. Returns the safetensors path.
        """
        from safetensors.torch import save as st_save

        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{p} is a folder; give the vector a file name ending in .safetensors")
        if p.suffix == ".json":
            raise ConfigError(f"{p}: give the .safetensors path of the vector, not its .json sidecar")
        if p.suffix != ".safetensors":
            p = p.with_name(p.name + ".safetensors")
        sidecar = p.with_suffix(".json")
        for f in (p, sidecar):
            if f.is_dir():
                raise ConfigError(f"{f} is a folder; give the vector another file name")
            check_output(f, overwrite, "steering vector")
        meta = self.metadata()
        data = st_save({"vector": self.vector}, metadata={"rosettalens": json.dumps(meta)})
        meta = {**meta, "file": p.name, "sha256": sha256_bytes(data)}
        atomic_write_bytes(p, data, overwrite=overwrite)
        atomic_write_json(sidecar, json_safe(meta), overwrite=True)  # the sidecar follows its vector
        return p

    @classmethod
    def load(
        cls, path: str | os.PathLike, hm: HookedModel | None = None, hook: str | None = None
    ) -> SteeringVector:
        """Load a vector saved by :meth:`save`; with ``hm``, check it fits ``hm`` at ``hook``.

        Raises :class:`SteeringVectorError` for missing/corrupt files and :class:`ShapeError` when
        the vector does not fit the model.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        p = Path(path)
        if p.suffix == ".json":
            p = p.with_suffix(".safetensors")
        if not p.is_file() and p.with_name(p.name + ".safetensors").is_file():
            p = p.with_name(p.name + ".safetensors")
        if not p.is_file():
            raise SteeringVectorError(f"steering vector file not found: {p}")
        raw = p.read_bytes()
        try:
            tensors = st_load(raw)
            header_len = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8 : 8 + header_len])
            meta = json.loads(header.get("__metadata__", {}).get("rosettalens", "null"))
        except (SafetensorError, ValueError, json.JSONDecodeError) as e:
            raise SteeringVectorError(f"{p} is not a valid safetensors steering vector ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "vector" not in tensors:
            raise SteeringVectorError(f"{p} is a safetensors file but not a rosettalens steering vector")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise SteeringVectorError(f"{p} was written by a newer rosettalens")
        sv = cls(
            vector=tensors["vector"],
            model=str(meta.get("model")),
            hook=str(meta.get("hook")),
            kind=str(meta.get("kind", "diff_of_means")),
            source=dict(meta.get("source") or {}),
        )
        if sv.d_model != int(meta.get("d_model", sv.d_model)):
            raise SteeringVectorError(
                f"{p}: vector length {sv.d_model} != recorded d_model {meta['d_model']}"
            )
        if hm is not None:
            sv.check_compatible(hm, hook)
        return sv

    def __repr__(self) -> str:
        return f"SteeringVector(kind={self.kind!r}, model={self.model!r}, hook={self.hook!r}, d_model={self.d_model}, norm={self.norm:.4g})"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("rosettalens")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


# ---------------------------------------------------------------------------------------------- collection
def _check_hooks(hm: HookedModel, hooks: Sequence[str]) -> list[str]:
    names = [hm.resolve_hook(h) for h in hooks]
    for n in names:
        if parse_hook_name(n)[0] not in RESIDUAL_KINDS:
            raise ConfigError(
                f"steering vectors live at residual-width hooks ({', '.join(RESIDUAL_KINDS)}), not {n}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"a hook point is requested twice: {names}")
    return names


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm progress bar on stderr with ``total`` steps (cleared when done); silent unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


@torch.no_grad()
def collect_activations(
    hm: HookedModel,
    prompts: Sequence[str],
    hooks: Sequence[str],
    *,
    positions: str | int | Sequence[int] = "last",
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "activations",
) -> dict[str, Tensor]:
    """Activations of ``prompts`` at ``hooks``, reduced over positions.

    positions: ``"last"`` -> ``{hook: [n, d_model]}`` (last prompt token); ``"mean"`` -> ``[n, d_model]``
    (mean over each prompt's non-pad positions); an int ``-k`` -> ``[n, d_model]`` (k-th position from
    the end); a list of negative ints -> ``[n, len(list), d_model]``. Values are float32 on the CPU.
    Keys are the resolved hook names. Raises :class:`DataError` for an empty prompt list and
    :class:`~rosettalens.errors.ChatTemplateError` (from ``hm.tokenize``) for ``chat=True`` on a
    model without a chat template.
    """
    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts to collect activations from")
    names = _check_hooks(hm, hooks)
    if isinstance(positions, str) and positions not in ("last", "mean"):
        raise ConfigError(
            f"positions must be 'last', 'mean', a negative int or a list of them, got {positions!r}"
        )
    offsets: list[int] | None = None
    if not isinstance(positions, str):
        offsets = [positions] if isinstance(positions, int) else [int(p) for p in positions]
        if not offsets or any(o >= 0 for o in offsets):
            raise ConfigError(
                f"position offsets must be negative (from the end of the prompt), got {positions!r}"
            )
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    bar = progress_bar(len(prompts), desc, progress)
    try:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            enc = hm.tokenize(batch, chat=chat, system=system)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            _, cache = hm.run_with_cache(ids, hooks=names, attention_mask=mask, stop_early=True)
            lengths = mask.sum(-1)
            for n in names:
                act = cache[n].double()  # [batch, pos, d_model]
                if positions == "last":
                    red = act[:, -1]
                elif positions == "mean":
                    m = mask.to(act.dtype).unsqueeze(-1)  # [batch, pos, 1]
                    red = (act * m).sum(1) / m.sum(1).clamp(min=1)
                else:
                    assert offsets is not None
                    if int(lengths.min()) < max(-o for o in offsets):
                        raise ConfigError(
                            f"position offset {min(offsets)} is longer than the shortest prompt "
                            f"({int(lengths.min())} tokens)"
                        )
                    red = act[:, offsets]  # [batch, k, d_model]
                    if isinstance(positions, int):
                        red = red[:, 0]
                out[n].append(red.float().cpu())
            bar.update(len(batch))
    finally:
        bar.close()
    return {n: torch.cat(v, 0) for n, v in out.items()}


def _reduce(method: str, pos: Tensor, neg: Tensor) -> Tensor:
    if method == "diff_of_means":
        return diff_of_means(pos, neg)
    if method == "pca":
        return pca_direction(pos, neg)
    raise ConfigError(f"unknown steering-vector method {method!r}; expected one of {', '.join(METHODS)}")


def compute_vectors(
    hm: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    hooks: Sequence[str],
    *,
    method: str = "diff_of_means",
    positions: str | int = "last",
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
    source: dict[str, Any] | None = None,
) -> dict[str, SteeringVector]:
    """Contrastive steering vectors at several hooks from one pass over the prompts.

    ``positive``/``negative``: prompt texts (the vector points from negative to positive).
    Returns ``{resolved hook: SteeringVector}``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown steering-vector method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(positions, list | tuple):
        raise ConfigError("compute_vectors takes one position rule ('last', 'mean' or a negative int)")
    kw: dict[str, Any] = dict(
        positions=positions, chat=chat, system=system, batch_size=batch_size, progress=progress
    )
    acts_pos = collect_activations(hm, positive, hooks, desc="positive prompts", **kw)
    acts_neg = collect_activations(hm, negative, hooks, desc="negative prompts", **kw)
    out: dict[str, SteeringVector] = {}
    for name in acts_pos:
        v = _reduce(method, acts_pos[name], acts_neg[name])
        src = {
            **(source or {}),
            "method": method,
            "positions": positions,
            "chat": chat,
            "n_positive": len(positive),
            "n_negative": len(negative),
        }
        out[name] = SteeringVector(vector=v, model=hm.name, hook=name, kind=method, source=src)
    return out


def compute_vector(
    hm: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    hook: str,
    **kwargs: Any,
) -> SteeringVector:
    """One contrastive steering vector at ``hook`` (see :func:`compute_vectors`)."""
    return next(iter(compute_vectors(hm, positive, negative, [hook], **kwargs).values()))
