"""Batched activation patching on the Hugging Face model: ``patch_sweep``.

Activation patching (Meng et al. 2022; Wang et al. 2023): run the *corrupted* prompt, replace one
component's activation by its value on the *clean* prompt, and read a metric of the logits. A sweep
does this for every layer x position (``resid_pre``, ``attn_out``, ``mlp_out``), every layer x head
(``heads``: the head's output ``head_z``; ``q``, ``k``, ``v``: its query / key / value, where with
GQA ``k``/``v`` have one entry per key-value head, which serves a group of query heads), optionally
per position for the per-head sweeps.

Many patches share one forward pass: the batch grows inside the forward. The forward starts with
one row (the corrupted prompt); at ``resid_pre.L`` the hook appends one copy of that row for every
patch at layer ``L`` and the patch hooks write the clean values into their own rows. A patch at
layer ``L`` therefore costs only the layers from ``L`` on (everything before it is the shared
corrupted row), about half of the work of stacking the patches into a batch from the embedding on.
Every other input of a layer (masks, rotary tables) has batch 1 and broadcasts; this is why each
forward holds one prompt. Rows per forward are bounded by a memory budget. The result equals one
forward per patch to float tolerance (tests/test_patching.py, on every tiny architecture).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..hooks import cache_kwarg
from ..names import hook_name

__all__ = ["SWEEPS", "PatchResult", "patch_sweep"]

Metric = Callable[[Tensor], Tensor]

#: sweep kind -> hook point kind it patches
SWEEPS = {
    "resid_pre": "resid_pre",
    "attn_out": "attn_out",
    "mlp_out": "mlp_out",
    "heads": "head_z",
    "q": "q",
    "k": "k",
    "v": "v",
}
_POSITION_SWEEPS = ("resid_pre", "attn_out", "mlp_out")


@dataclass
class PatchResult:
    """The metric with each component patched from the clean into the corrupted run.

    values: ``[n_layers, n_positions]`` (``resid_pre``/``attn_out``/``mlp_out``), ``[n_layers,
    n_heads]`` (``heads``, ``q``; ``n_kv_heads`` for ``k``/``v``) or ``[n_layers, n_positions,
    n_heads]`` with ``by_position``; the mean over prompts of ``per_prompt [n_prompts, *values.shape]``.
    axes / labels: the name of each axis of ``values`` and its labels (layer and head numbers,
    positions as indices into the prompt, ``tokens`` the clean prompt's tokens at those positions).
    clean / corrupted: the metric of the unpatched runs per prompt ``[n_prompts]``.
    kv_groups: for ``k``/``v`` sweeps, key-value head -> the query heads that read it.
    """

    sweep: str
    hook: str
    values: Tensor
    per_prompt: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list]
    clean: Tensor
    corrupted: Tensor
    kv_groups: dict[int, list[int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def clean_metric(self) -> float:
        return float(self.clean.mean())

    @property
    def corrupted_metric(self) -> float:
        return float(self.corrupted.mean())

    def normalized(self) -> Tensor:
        """``(values - corrupted) / (clean - corrupted)``: 0 = no effect, 1 = restores the clean metric."""
        denom = self.clean_metric - self.corrupted_metric
        if denom == 0:
            raise ShapeError(
                "clean and corrupted metrics are equal: the patching effect cannot be normalised"
            )
        return (self.values - self.corrupted_metric) / denom

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (values as nested lists)."""
        out: dict[str, Any] = {
            "sweep": self.sweep,
            "hook": self.hook,
            "axes": list(self.axes),
            "shape": list(self.values.shape),
            "labels": self.labels,
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "values": self.values.tolist(),
            "n_prompts": int(self.per_prompt.shape[0]),
        }
        try:
            out["normalized"] = self.normalized().tolist()
        except ShapeError:
            out["normalized"] = None
        if self.kv_groups is not None:
            out["kv_groups"] = {str(k): v for k, v in self.kv_groups.items()}
        out.update(self.meta)
        return out

    def top(self, k: int = 5) -> list[tuple[dict[str, int], float]]:
        """The ``k`` entries whose patch moves the metric most towards the clean run."""
        eff = self.values - self.corrupted_metric
        sign = 1.0 if self.clean_metric >= self.corrupted_metric else -1.0
        flat = (sign * eff).flatten()
        order = flat.argsort(descending=True)[:k]
        out = []
        for i in order.tolist():
            idx = torch.unravel_index(torch.tensor(i), self.values.shape)
            where = {ax: self.labels[ax][int(j)] for ax, j in zip(self.axes, idx)}
            out.append((where, float(self.values.flatten()[i])))
        return out


def _as_ids(x: Any, name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.dtype.is_floating_point:
        raise ShapeError(f"{name} must be token ids [batch, pos], got shape {tuple(t.shape)} ({t.dtype})")
    return t.long().to(device)


def _select(sel: Sequence[int] | None, size: int, what: str) -> list[int]:
    if sel is None:
        return list(range(size))
    out = []
    for i in sel:
        i = int(i)
        if not -size <= i < size:
            raise ConfigError(f"{what} {i} out of range (0..{size - 1}, or negative from the end)")
        out.append(i % size)
    if not out:
        raise ConfigError(f"no {what}s to sweep")
    if len(set(out)) != len(out):
        raise ConfigError(f"a {what} is listed twice: {list(sel)}")
    return out


def row_bytes(hm: Any, n_pos: int) -> int:
    """A rough upper bound of the memory one extra row costs in a forward (activations + logits)."""
    c = hm.cfg
    text = hm.model.config.get_text_config()
    d_ff = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * c.d_model)
    itemsize = torch.empty((), dtype=hm.dtype).element_size()
    per_pos = 2 * c.vocab_size + 8 * c.d_model + 4 * d_ff + 3 * c.n_heads * (c.d_head + n_pos)
    return itemsize * n_pos * per_pos


@torch.no_grad()
def patch_sweep(
    hm: Any,
    clean_ids: Any,
    corrupted_ids: Any,
    metric: Metric,
    sweep: str = "resid_pre",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    by_position: bool = False,
    memory_budget: float = 2**30,
    max_rows: int | None = None,
    reuse_prefix: bool = True,
    last_logits_only: bool = False,
    progress: bool = False,
) -> PatchResult:
    """Activation patching of every component of one kind, many patches per forward pass.

    hm: a :class:`~rosettalens.hooks.HookedModel`.
    clean_ids, corrupted_ids: token ids ``[n_prompts, pos]`` (or ``[pos]``) of equal shape, no
    padding (prompts of equal token length).
    metric: ``metric(logits [n_prompts, pos, vocab]) -> [n_prompts]``, called with the logits of the
    ``n_prompts`` corrupted prompts with one patch applied (row ``i`` is prompt ``i``).
    sweep: ``resid_pre`` | ``attn_out`` | ``mlp_out`` (layer x position), ``heads`` (``head_z``,
    layer x head), ``q`` | ``k`` | ``v`` (layer x head; ``k``/``v`` per key-value head).
    layers / positions: the layers / positions to sweep (default all; negative from the end).
    by_position: for ``heads``/``q``/``k``/``v``, patch each head at each position separately
    (``[n_layers, n_positions, n_heads]``) instead of at all positions at once.
    memory_budget: bytes for the rows of one forward (and the logits they return); ``max_rows``
    caps the patches per forward directly.
    reuse_prefix: for sweeps where every patch has a position, run the corrupted tokens before the
    earliest patched position of a forward once (batch 1, KV cache) and only the rest with the
    grown batch: the positions before a patch are the corrupted run's (attention is causal).
    last_logits_only: the metric reads only the last position: the LM head runs there only and
    every metric call gets ``[n_prompts, 1, vocab]`` (``logits[:, -1]`` metrics work unchanged).

    Returns a :class:`PatchResult` (``values`` ``[n_layers, n_positions]`` / ``[n_layers, n_heads]``
    / ``[n_layers, n_positions, n_heads]``, the mean over prompts).
    """
    if sweep not in SWEEPS:
        raise ConfigError(f"unknown sweep {sweep!r}; choose from {', '.join(SWEEPS)}")
    kind = SWEEPS[sweep]
    c = hm.cfg
    clean = _as_ids(clean_ids, "clean_ids", hm.device)
    corrupted = _as_ids(corrupted_ids, "corrupted_ids", hm.device)
    if clean.shape != corrupted.shape:
        raise ShapeError(
            f"clean and corrupted prompts must have the same shape [n_prompts, pos] (equal token length), "
            f"got {tuple(clean.shape)} and {tuple(corrupted.shape)}"
        )
    n_prompts, n_pos = clean.shape
    layer_list = _select(layers, c.n_layers, "layer")
    pos_list = _select(positions, n_pos, "position")
    per_head = sweep not in _POSITION_SWEEPS
    if by_position and not per_head:
        raise ConfigError(f"by_position is for the per-head sweeps (heads, q, k, v), not {sweep}")
    n_heads = c.n_kv_heads if kind in ("k", "v") else c.n_heads

    # the grid of patches, in layer order: (layer, position or None, head or None)
    grid: list[tuple[int, int | None, int | None]]
    if not per_head:
        grid = [(lay, p, None) for lay in layer_list for p in pos_list]
        axes: tuple[str, ...] = ("layer", "position")
        shape: tuple[int, ...] = (len(layer_list), len(pos_list))
    elif by_position:
        grid = [(lay, p, h) for lay in layer_list for p in pos_list for h in range(n_heads)]
        axes = ("layer", "position", "kv_head" if kind in ("k", "v") else "head")
        shape = (len(layer_list), len(pos_list), n_heads)
    else:
        grid = [(lay, None, h) for lay in layer_list for h in range(n_heads)]
        axes = ("layer", "kv_head" if kind in ("k", "v") else "head")
        shape = (len(layer_list), n_heads)

    # clean activations and the two unpatched metrics
    names = [hook_name(kind, lay) for lay in layer_list]
    clean_logits, cache = hm.run_with_cache(clean, hooks=names)
    keep = slice(-1, None) if last_logits_only else slice(None)
    clean_m = _metric_rows(metric, clean_logits[:, keep], n_prompts)
    del clean_logits
    corrupted_logits = hm.forward(corrupted)
    corrupted_m = _metric_rows(metric, corrupted_logits[:, keep], n_prompts)

    row_cost = row_bytes(hm, n_pos) * n_prompts
    rows = max(1, int(memory_budget // row_cost))
    if max_rows is not None:
        rows = max(1, min(rows, int(max_rows)))
    prefix = reuse_prefix and all(p is not None for _, p, _ in grid) and not hm.tracking_offset
    chunks = _chunks(grid, rows, prefix)
    values = torch.empty(len(grid), n_prompts, dtype=torch.float64)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), desc=f"patch {sweep}", unit="patch", file=sys.stderr, leave=False)
    tokens_run = 0
    try:
        for chunk in chunks:
            items = [grid[j] for j in chunk]
            start = min(int(p) for _, p, _ in items if p is not None) if prefix else 0
            chunk_logits = []
            for i in range(n_prompts):
                handlers = _chunk_handlers(items, kind, {n: cache[n][i] for n in names}, offset=start)
                logits = _forward_rows(
                    hm,
                    corrupted[i : i + 1],
                    corrupted_logits[i : i + 1],
                    items,
                    start,
                    handlers,
                    last_logits_only,
                )
                chunk_logits.append(logits[1:])
                tokens_run += logits.shape[0] * (n_pos - start)
            stacked = torch.stack(chunk_logits, dim=1)  # [k, n_prompts, pos, vocab]
            del chunk_logits
            for j, g in enumerate(chunk):
                values[g] = _metric_rows(metric, stacked[j], n_prompts)
            del stacked
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    del corrupted_logits

    per_prompt = values.T.reshape(n_prompts, *shape)
    tokens = [hm.tokenizer.decode([int(t)]) for t in clean[0]] if hm.tokenizer is not None else []
    labels: dict[str, list] = {"layer": layer_list}
    if "position" in axes:
        labels["position"] = pos_list
        if tokens:
            labels["tokens"] = [tokens[p] for p in pos_list]
    if per_head:
        labels[axes[-1]] = list(range(n_heads))
    kv_groups = None
    if kind in ("k", "v"):
        g = c.n_heads // c.n_kv_heads
        kv_groups = {h: list(range(h * g, (h + 1) * g)) for h in range(c.n_kv_heads)}
    meta = {
        "model": hm.name,
        "n_positions": n_pos,
        "patches": len(grid),
        "forwards": len(chunks) * n_prompts,
        "shared_prefix": prefix,
        "last_logits_only": last_logits_only,
        "token_rows": tokens_run,
        "rows_per_forward": rows,
    }
    if kv_groups is not None:
        meta["group_size"] = c.n_heads // c.n_kv_heads
    return PatchResult(
        sweep=sweep,
        hook=kind,
        values=per_prompt.mean(0),
        per_prompt=per_prompt,
        axes=axes,
        labels=labels,
        clean=clean_m,
        corrupted=corrupted_m,
        kv_groups=kv_groups,
        meta=meta,
    )


def _metric_rows(metric: Metric, logits: Tensor, n: int) -> Tensor:
    out = torch.as_tensor(metric(logits))
    if out.shape != (n,):
        raise ShapeError(
            f"metric must return one value per prompt row, shape ({n},), got {tuple(out.shape)}; "
            "e.g. metric = lambda logits: logits[:, -1, answer] - logits[:, -1, wrong]"
        )
    return out.detach().double().cpu()


def _chunk_handlers(
    chunk: list[tuple[int, int | None, int | None]], kind: str, clean: dict[str, Tensor], offset: int = 0
) -> list[tuple[str, Callable, str]]:
    """Hook handlers for one forward: grow the batch at each layer's ``resid_pre``, patch its rows.

    clean: ``{hook name: clean activation of this prompt}`` (``[pos, ...]``, no batch axis).
    offset: the forward runs positions ``offset ..`` only (the rest comes from the KV cache).
    Row 0 stays the corrupted run; the patches of layer ``L`` get rows ``start_L .. start_L + k_L``.
    """
    by_layer: dict[int, list[tuple[int | None, int | None]]] = {}
    for lay, p, h in chunk:
        by_layer.setdefault(lay, []).append((p, h))
    handlers: list[tuple[str, Callable, str]] = []
    start = 1
    for lay, items in by_layer.items():
        k = len(items)
        rows = torch.arange(start, start + k)
        pos = torch.tensor([p - offset if p is not None else -1 for p, _ in items])
        head = torch.tensor([h if h is not None else -1 for _, h in items])
        src = clean[hook_name(kind, lay)][offset:]
        write = _writer(rows, pos, head, src, all_pos=items[0][0] is None)
        if kind == "resid_pre":
            handlers.append((hook_name("resid_pre", lay), _grow(k, write), "resize"))
        else:
            handlers.append((hook_name("resid_pre", lay), _grow(k, None), "resize"))
            handlers.append((hook_name(kind, lay), write, "plain"))
        start += k
    return handlers


def _chunks(grid: list[tuple[int, int | None, int | None]], rows: int, prefix: bool) -> list[list[int]]:
    """Indices into ``grid`` per forward (each sorted by layer, for the growing batch), ``<= rows`` each.

    With a shared prefix a forward costs its rows times the positions from its earliest patch on, so
    the patches go in position order and a forward takes one position's patches (splitting those
    over ``rows``), merging the next positions only while it has fewer than ``_MIN_ROWS`` rows.
    """
    if not prefix:
        chunks = [list(range(i, min(i + rows, len(grid)))) for i in range(0, len(grid), rows)]
    else:
        by_pos: dict[int, list[int]] = {}
        for j, (_, p, _) in enumerate(grid):
            by_pos.setdefault(int(p), []).append(j)  # type: ignore[arg-type]
        chunks = []
        cur: list[int] = []
        for p in sorted(by_pos):
            group = by_pos[p]
            if cur and (len(cur) >= _MIN_ROWS or len(cur) + len(group) > rows):
                chunks.append(cur)
                cur = []
            while len(cur) + len(group) > rows:
                take = rows - len(cur)
                chunks.append(cur + group[:take])
                cur, group = [], group[take:]
            cur = cur + group
        if cur:
            chunks.append(cur)
    return [sorted(c, key=lambda j: grid[j][0]) for c in chunks]


_MIN_ROWS = 64


def _forward_rows(
    hm: Any, ids: Tensor, full_logits: Tensor, items: list, start: int, handlers: list, last: bool = False
) -> Tensor:
    """Logits ``[1 + k, pos, vocab]`` of one prompt ``ids [1, pos]`` with the chunk's patches in rows 1..k
    (``[1 + k, 1, vocab]``, the last position only, with ``last``).

    ``start > 0``: positions ``< start`` are the corrupted run's: their keys/values come from a batch-1
    forward over the prefix (expanded per layer to the rows alive there, a view), their logits from
    ``full_logits [1, pos, vocab]``; only positions ``start ..`` run with the grown batch.
    """
    keep = {"logits_to_keep": 1} if last else {}
    if start == 0:
        with hm.intervene(handlers):
            logits = hm.model(input_ids=ids, use_cache=False, **keep).logits
    else:
        pkv = _kv_cache(hm.model(input_ids=ids[:, :start], use_cache=True))
        alive = 1
        counts: dict[int, int] = {}
        for lay, _, _ in items:
            counts[lay] = counts.get(lay, 0) + 1
        for lay, layer in enumerate(pkv.layers):
            alive += counts.get(lay, 0)
            if alive > 1:
                layer.keys = layer.keys.expand(alive, *layer.keys.shape[1:])
                layer.values = layer.values.expand(alive, *layer.values.shape[1:])
        with hm.intervene(handlers):
            kv = {cache_kwarg(hm.model): pkv}
            tail = hm.model(input_ids=ids[:, start:], use_cache=True, **kv, **keep).logits
        if last:
            logits = tail
        else:
            head = full_logits[:, :start].to(tail.dtype).expand(tail.shape[0], -1, -1)
            logits = torch.cat([head, tail], dim=1)
    if logits.shape[0] != len(items) + 1:  # pragma: no cover - an architecture that does not broadcast
        raise ShapeError(f"batched patching got {logits.shape[0]} rows, expected {len(items) + 1}")
    return logits


def _kv_cache(out: Any) -> Any:
    kv = getattr(out, "cache", None)
    return kv if kv is not None else out.past_key_values


def _grow(k: int, write: Callable | None) -> Callable:
    def grow(act: Tensor, name: str) -> Tensor:
        new = torch.cat([act, act[:1].expand(k, *act.shape[1:])])
        return write(new, name, inplace=True) if write is not None else new

    return grow


def _writer(rows: Tensor, pos: Tensor, head: Tensor, src: Tensor, all_pos: bool) -> Callable:
    """Write the clean values into rows ``rows``: at (pos) / (pos, head) / (all positions, head)."""
    has_head = bool((head >= 0).all())
    cache: dict[torch.device, tuple] = {}

    def index(act: Tensor) -> tuple:
        if act.device not in cache:
            r, p, h = rows.to(act.device), pos.to(act.device), head.to(act.device)
            s = src.to(device=act.device, dtype=act.dtype)
            dst: tuple[Tensor, ...]
            if has_head and all_pos:
                ar = torch.arange(act.shape[1], device=act.device)
                dst = (r[:, None], ar[None, :], h[:, None])
                val = s[ar[None, :], h[:, None]]  # [k, pos, d_head]
            elif has_head:
                dst = (r, p, h)
                val = s[p, h]  # [k, d_head]
            else:
                dst = (r, p)
                val = s[p]  # [k, d_model]
            cache[act.device] = (dst, val)
        return cache[act.device]

    def write(act: Tensor, name: str, inplace: bool = False) -> Tensor:
        if act.shape[0] <= int(rows.max()):
            raise ShapeError(
                f"batched patching: {name} has {act.shape[0]} rows, rows {rows.tolist()} expected"
            )
        dst, val = index(act)
        new = act if inplace else act.clone()
        new[dst] = val
        return new

    return write
