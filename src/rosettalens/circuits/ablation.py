"""Ablating a set of components (attention heads, MLPs) of a HookedModel: zero, mean, resample.

Components are named as everywhere in ``rosettalens.circuits``: a head is the string ``"L.H"`` (its
slice of ``head_z.L``, the input of the attention output projection, ``[batch, pos, n_heads, d_head]``),
an MLP is the integer ``L`` (its output ``mlp_out.L``, ``[batch, pos, d_model]``). Ablating a head
replaces its ``head_z`` slice, so the head's contribution through ``o_proj`` is replaced (the shared
``o_proj`` bias, where a model has one, is kept); ablating an MLP replaces ``mlp_out.L``. For Gemma 2/3
``mlp_out`` is after the post-feedforward norm, while a head is replaced before ``o_proj`` and the
post-attention norm (which then normalises the sum of real and replaced heads).

Kinds of ablation:

* ``zero``: the activation is set to 0.
* ``mean``: the mean over a reference set of prompts, **per position** by default (Lan, Torr, Barez 2024
  mean-ablate with the mean over their prompt set at each position; prompts of a task share a token
  length). ``per_position=False`` takes one mean over every unpadded position of the reference set.
* ``resample``: the activation of another prompt: each row of the batch gets the activation of a
  reference row drawn at random (seeded), or, with ``rows=``, of given reference rows, e.g. the aligned
  corrupted prompt (``rows = the batch's row indices``), which is activation patching.

All are context managers over ``hm.hooks`` (hooks are removed on exit, also on error)::

    ab = Ablator(hm, "mean", reference=ref_ids)
    with ab.ablate(heads=["3.1", "5.0"], mlps=[2]):
        logits = hm.forward(ids)
    with zero_ablate(hm, heads=["0.0"]):
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..hooks import HookedModel
from ..names import hook_layer, hook_name

KINDS = ("zero", "mean", "resample")


# ---------------------------------------------------------------------------------------- components
def parse_head(hm: HookedModel, head: str | tuple[int, int]) -> tuple[int, int]:
    """``"L.H"`` (or ``(L, H)``; negative L allowed) -> ``(layer, head)`` with range checks."""
    if isinstance(head, tuple):
        layer, h = head
    else:
        parts = str(head).split(".")
        if len(parts) != 2:
            raise ConfigError(f"a head is named 'L.H' (layer.head), got {head!r}")
        try:
            layer, h = int(parts[0]), int(parts[1])
        except ValueError as e:
            raise ConfigError(f"a head is named 'L.H' with integers, got {head!r}") from e
    n, nh = hm.cfg.n_layers, hm.cfg.n_heads
    if not -n <= layer < n:
        raise ConfigError(f"head {head!r}: layer {layer} out of range for {hm.name} ({n} layers)")
    if not 0 <= h < nh:
        raise ConfigError(f"head {head!r}: head {h} out of range for {hm.name} ({nh} heads per layer)")
    return layer % n, h


def parse_mlp(hm: HookedModel, mlp: int | str) -> int:
    """MLP layer ``L`` (int, ``"L"`` or ``"mlp.L"``; negative allowed) -> layer index."""
    s = str(mlp)
    if s.startswith("mlp."):
        s = s[4:]
    try:
        layer = int(s)
    except ValueError as e:
        raise ConfigError(f"an MLP is named by its layer index L, got {mlp!r}") from e
    n = hm.cfg.n_layers
    if not -n <= layer < n:
        raise ConfigError(f"MLP {mlp!r}: layer out of range for {hm.name} ({n} layers)")
    return layer % n


def layer_module(hm: HookedModel, layer: int, path: str) -> Any:
    """The submodule at ``path`` (an adapter path relative to a decoder layer) of layer ``layer``."""
    mod: Any = hm.layers[layer]
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def all_heads(hm: HookedModel) -> list[str]:
    """Every head of the model, ``["0.0", "0.1", ...]`` in layer-major order."""
    return [f"{layer}.{h}" for layer in range(hm.cfg.n_layers) for h in range(hm.cfg.n_heads)]


def _group_heads(hm: HookedModel, heads: Iterable[str | tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for head in heads:
        layer, h = parse_head(hm, head)
        by_layer.setdefault(layer, [])
        if h not in by_layer[layer]:
            by_layer[layer].append(h)
    return by_layer


# ---------------------------------------------------------------------------------------- the ablator
class Ablator:
    """Replacement values for components of ``hm``; ``ablate(heads, mlps)`` is the context manager.

    kind: ``zero`` | ``mean`` | ``resample``.
    reference: token ids ``[n_ref, pos]`` (``mean`` and ``resample``), with an optional
    ``reference_mask`` ``[n_ref, pos]`` (1 = real token). The reference activations of every layer are
    computed once here (in chunks of ``batch_size`` rows): per-position means ``[pos, ...]`` for
    ``mean``, the activations themselves ``[n_ref, pos, ...]`` for ``resample``.
    Per-position means and resampled rows require the ablated batch to have the reference's ``pos``.
    """

    def __init__(
        self,
        hm: HookedModel,
        kind: str = "mean",
        reference: Tensor | None = None,
        reference_mask: Tensor | None = None,
        *,
        per_position: bool = True,
        seed: int = 0,
        batch_size: int = 16,
        layers: Sequence[int] | None = None,
    ):
        if kind not in KINDS:
            raise ConfigError(f"unknown ablation {kind!r}; choose from {', '.join(KINDS)}")
        self.hm, self.kind, self.per_position, self.seed = hm, kind, per_position, seed
        self.layers = (
            list(range(hm.cfg.n_layers)) if layers is None else sorted({x % hm.cfg.n_layers for x in layers})
        )
        self.head_values: dict[int, Tensor] = {}  # layer -> [pos|1|n_ref, ...] head_z values
        self.mlp_values: dict[int, Tensor] = {}
        self.n_ref = 0
        self.pos: int | None = None
        if kind == "zero":
            if reference is not None:
                raise ConfigError("zero ablation takes no reference set")
            return
        if reference is None:
            raise ConfigError(f"{kind} ablation needs a reference set of prompts (token ids [n_ref, pos])")
        ref = torch.as_tensor(reference)
        if ref.dim() != 2 or ref.shape[0] == 0 or ref.shape[1] == 0:
            raise ShapeError(
                f"reference token ids must be [n_ref, pos] with n_ref, pos > 0, got {tuple(ref.shape)}"
            )
        mask = torch.ones_like(ref) if reference_mask is None else torch.as_tensor(reference_mask)
        if mask.shape != ref.shape:
            raise ShapeError(
                f"reference_mask {tuple(mask.shape)} does not match reference {tuple(ref.shape)}"
            )
        if kind == "resample" and (mask == 0).any():
            raise ShapeError("resample ablation needs unpadded reference prompts of one token length")
        self.n_ref, self.pos = ref.shape
        self._collect(ref, mask, batch_size)

    def _collect(self, ref: Tensor, mask: Tensor, batch_size: int) -> None:
        hm = self.hm
        hooks = [hook_name("head_z", layer) for layer in self.layers] + [
            hook_name("mlp_out", layer) for layer in self.layers
        ]
        sums: dict[str, Tensor] = {}
        counts: Tensor | None = None
        chunks: dict[str, list[Tensor]] = {h: [] for h in hooks}
        for start in range(0, ref.shape[0], batch_size):
            ids, m = ref[start : start + batch_size], mask[start : start + batch_size]
            _, cache = hm.run_with_cache(ids, hooks=hooks, attention_mask=m)
            w = m.to(device=hm.device, dtype=torch.float64)
            for name, act in cache.items():
                if self.kind == "resample":
                    chunks[name].append(act)
                    continue
                wa = w.view(*w.shape, *([1] * (act.dim() - 2)))
                s = (act.double() * wa).sum(0) if self.per_position else (act.double() * wa).sum((0, 1))
                sums[name] = s if name not in sums else sums[name] + s
            c = w.sum(0) if self.per_position else w.sum()
            counts = c if counts is None else counts + c
        for layer in self.layers:
            for name, store in (
                (hook_name("head_z", layer), self.head_values),
                (hook_name("mlp_out", layer), self.mlp_values),
            ):
                if self.kind == "resample":
                    store[layer] = torch.cat(chunks[name])
                    continue
                assert counts is not None
                if (counts == 0).any():
                    raise ShapeError("a reference position is padding in every prompt: no mean to take there")
                extra = sums[name].dim() - counts.dim()
                mean = sums[name] / counts.view(*counts.shape, *([1] * extra))
                store[layer] = mean.to(hm.dtype).unsqueeze(0)  # [1, pos, ...] or [1, ...]

    # ------------------------------------------------------------------ values for a batch
    def _value(self, store: dict[int, Tensor], layer: int, act: Tensor, rows: Tensor | None) -> Tensor:
        if self.kind == "zero":
            return torch.zeros((), device=act.device, dtype=act.dtype)
        if layer not in store:
            raise ConfigError(f"this Ablator was built for layers {self.layers}, not layer {layer}")
        val = store[layer]
        if self.kind == "mean":
            if self.per_position:
                if act.shape[1] != val.shape[1]:
                    raise ShapeError(
                        f"per-position mean ablation: the batch has {act.shape[1]} positions, the reference "
                        f"set {val.shape[1]}; use prompts of one token length or per_position=False"
                    )
                return val.to(device=act.device, dtype=act.dtype)
            return val.unsqueeze(1).to(device=act.device, dtype=act.dtype)
        # resample
        if act.shape[1] != val.shape[1]:
            raise ShapeError(
                f"resample ablation: the batch has {act.shape[1]} positions, the reference set {val.shape[1]}"
            )
        assert rows is not None
        if rows.shape[0] != act.shape[0]:
            raise ShapeError(
                f"resample ablation: {rows.shape[0]} reference rows for a batch of {act.shape[0]}"
            )
        return val[rows.to(val.device)].to(device=act.device, dtype=act.dtype)

    @contextlib.contextmanager
    def ablate(
        self,
        heads: Iterable[str | tuple[int, int]] = (),
        mlps: Iterable[int | str] = (),
        rows: Tensor | Sequence[int] | None = None,
    ) -> Iterator[HookedModel]:
        """Ablate ``heads`` (``"L.H"``) and ``mlps`` (layer ints) inside the ``with`` block.

        rows (resample only): reference row per batch row ``[batch]``; default: drawn uniformly at
        random (with replacement) for every forward pass, from a generator seeded with ``seed`` when the
        block is entered, so a block is reproducible. The same rows serve every ablated component of one
        forward pass.
        """
        hm = self.hm
        by_layer = _group_heads(hm, heads)
        mlp_layers = sorted({parse_mlp(hm, m) for m in mlps})
        fixed_rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if fixed_rows is not None:
            if self.kind != "resample":
                raise ConfigError("rows= is only for resample ablation")
            if fixed_rows.dim() != 1 or (fixed_rows < 0).any() or (fixed_rows >= self.n_ref).any():
                raise ShapeError(f"rows must be a 1-d list of reference rows in 0..{self.n_ref - 1}")
        gen = torch.Generator().manual_seed(self.seed)
        state: dict[str, Any] = {"rows": None, "batch": None}

        def rows_for(batch: int) -> Tensor | None:
            if self.kind != "resample":
                return None
            if fixed_rows is not None:
                return fixed_rows
            # one draw per forward pass: the first hook of a pass draws, the others reuse it
            if state["rows"] is None or state["batch"] != batch or state["fresh"]:
                state["rows"] = torch.randint(0, self.n_ref, (batch,), generator=gen)
                state["batch"], state["fresh"] = batch, False
            return state["rows"]

        fwd: list[tuple[str, Any]] = []
        for layer, hs in sorted(by_layer.items()):
            idx = torch.tensor(hs)

            def head_fn(act: Tensor, name: str, layer: int = layer, idx: Tensor = idx) -> Tensor:
                val = self._value(self.head_values, layer, act, rows_for(act.shape[0]))
                mask = torch.zeros(act.shape[-2], dtype=torch.bool, device=act.device)
                mask[idx.to(act.device)] = True
                return torch.where(mask.view(-1, 1), val, act)

            fwd.append((hook_name("head_z", layer), head_fn))
        for layer in mlp_layers:

            def mlp_fn(act: Tensor, name: str, layer: int = layer) -> Tensor:
                val = self._value(self.mlp_values, layer, act, rows_for(act.shape[0]))
                return torch.zeros_like(act) + val

            fwd.append((hook_name("mlp_out", layer), mlp_fn))
        # the first hook of a forward pass (head_z.L fires before mlp_out.L) marks a fresh draw
        order = sorted((hook_layer(n), n.startswith("mlp_out"), n) for n, _ in fwd)
        first_name = order[0][2] if order else None

        def mark_fresh(act: Tensor, name: str) -> None:
            state["fresh"] = True

        state["fresh"] = True
        hooks = list(fwd)
        if first_name is not None and self.kind == "resample" and fixed_rows is None:
            hooks.insert(0, (first_name, mark_fresh))
        with hm.hooks(hooks):
            yield hm


def zero_ablate(
    hm: HookedModel, heads: Iterable[str | tuple[int, int]] = (), mlps: Iterable[int | str] = ()
) -> contextlib.AbstractContextManager:
    """Context manager: set the given heads' ``head_z`` slices and MLPs' ``mlp_out`` to zero."""
    return Ablator(hm, "zero").ablate(heads, mlps)


def mean_ablate(
    hm: HookedModel,
    heads: Iterable[str | tuple[int, int]] = (),
    mlps: Iterable[int | str] = (),
    *,
    reference: Tensor,
    reference_mask: Tensor | None = None,
    per_position: bool = True,
) -> contextlib.AbstractContextManager:
    """Context manager: replace the components by their mean over ``reference`` ``[n_ref, pos]``."""
    heads, mlps = list(heads), list(mlps)
    layers = sorted({parse_head(hm, h)[0] for h in heads} | {parse_mlp(hm, m) for m in mlps})
    ab = Ablator(hm, "mean", reference, reference_mask, per_position=per_position, layers=layers)
    return ab.ablate(heads, mlps)


def resample_ablate(
    hm: HookedModel,
    heads: Iterable[str | tuple[int, int]] = (),
    mlps: Iterable[int | str] = (),
    *,
    reference: Tensor,
    rows: Tensor | Sequence[int] | None = None,
    seed: int = 0,
) -> contextlib.AbstractContextManager:
    """Context manager: replace the components by their activations on reference prompts ``[n_ref, pos]``

    (random rows, seeded, or the given ``rows`` ``[batch]``)."""
    heads, mlps = list(heads), list(mlps)
    layers = sorted({parse_head(hm, h)[0] for h in heads} | {parse_mlp(hm, m) for m in mlps})
    ab = Ablator(hm, "resample", reference, seed=seed, layers=layers)
    return ab.ablate(heads, mlps, rows=rows)
