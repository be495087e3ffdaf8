"""HookedModel: named hook points on an unmodified Hugging Face causal LM.

The model is the HF module itself; rosettalens only adds PyTorch hooks, and only while something
asked for them. A forward pass with no intervention returns exactly the plain HF logits.

Hook points (one name for one place, used by the API, the CLI, stores and reports): ``embed``,
``resid_pre.L``, ``resid_mid.L``, ``resid_post.L``, ``attn_out.L``, ``mlp_in.L`` (the MLP's input
after its norm), ``mlp_out.L`` (all
``[batch, pos, d_model]``), ``head_z.L`` (input of the attention output projection,
``[batch, pos, n_heads, d_head]``), ``q.L`` ``[batch, pos, n_heads, d_head]``, ``k.L``/``v.L``
``[batch, pos, n_kv_heads, d_head]`` (GQA groups are never silently repeated), ``attn_pattern.L``
``[batch, n_heads, query_pos, key_pos]`` (eager attention, switched on for that call only) and
``logits``. ``L`` may be negative (from the end); every spelling resolves to one canonical name
(``resid_post.-1`` -> ``resid_post.29`` on a 30-layer model), and a cache answers every spelling.
The exact conventions (which HF tensor each name is) are in ``models/adapters.py``.

Every hook point is a *site*: a module, whether the value is that module's input (pre-hook) or
output (forward hook), and how to view the raw tensor as the activation and put a changed
activation back. Handlers (interventions first, then recorders) are registered per hook name; one
PyTorch hook per (module, pre/post) is installed while at least one handler needs it and removed as
soon as none does (also on error).

Interventions never alias: a user function (``hooks``, ``patch`` with a callable) gets a private
copy of the activation, so it may edit it in place (returning it or ``None``) without touching the
model's tensors or any cached activation; a tensor patch is copied into a fresh tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ChatTemplateError, HookPointError, ShapeError
from .models.adapters import Adapter, ModelConfig, adapter_for, model_config
from .names import hook_layer, hook_name, parse_hook_name

HookFn = Callable[[Tensor, str], Tensor | None]
Selector = None | int | slice | Sequence[int] | Tensor


_INTERVENE, _RECORD = 0, 1


class _StopForward(Exception):
    """Raised by a recorder to end a forward pass once every requested hook is cached."""


@dataclass
class _Site:
    name: str
    module: nn.Module
    pre: bool  # value is the module's first input (True) or its output (False)
    slot: int  # which element of a tuple output
    get: Callable[[Tensor], Tensor]
    put: Callable[[Tensor, Tensor], Tensor]
    order: int  # position among the sites sharing the same torch hook


_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier 5.x). Passing the other name is silently swallowed by ``**kwargs``."""
    key = type(model)
    if key not in _CACHE_KWARG:
        import inspect

        params = inspect.signature(model.forward).parameters
        _CACHE_KWARG[key] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[key]


def _identity(raw: Tensor) -> Tensor:
    return raw


def _replace(raw: Tensor, new: Tensor) -> Tensor:
    return new


def _get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)  # type: ignore[index]
    return mod


class HookedModel:
    """A Hugging Face causal LM with named hook points (see the module docstring).

    ``run_with_cache`` records activations; ``patch``, ``steer``, ``ablate`` and ``hooks`` are
    context managers that change them for every forward (and ``generate``) inside the block.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, name: str | None = None):
        self.model: Any = model  # a transformers PreTrainedModel
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.adapter: Adapter = adapter_for(model.config)
        self.cfg: ModelConfig = model_config(model.config, self.name)
        self.layers: Any = _get_module(model, self.adapter.layers)  # the decoder blocks (nn.ModuleList)
        self._handlers: dict[str, list[tuple[int, HookFn, str]]] = {}  # (priority, fn, mode)
        self._torch_handles: dict[tuple[int, bool], Any] = {}
        self._sites: dict[str, _Site] = {}
        self._stash: dict[int, Tensor] = {}  # layer -> latest resid_pre (for resid_mid)
        self.kv_offset = 0  # read-only: tokens in the KV cache during the current forward (track_offset)
        self._offset_handle: Any = None
        self._offset_users = 0
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer: Any, name: str | None = None) -> HookedModel:
        """Wrap a model the user already has (any adapted architecture)."""
        return cls(model.eval(), tokenizer, name=name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"HookedModel({self.name!r}, family={c.family}, layers={c.n_layers}, d_model={c.d_model}, "
            f"heads={c.n_heads}({c.n_kv_heads}))"
        )

    # ------------------------------------------------------------------ hook names
    def resolve_hook(self, name: str) -> str:
        """Canonical name (negative layers resolved). Raises HookPointError."""
        if name in ("embed", "logits"):
            return name
        kind, layer = parse_hook_name(name)
        assert layer is not None
        n = self.cfg.n_layers
        if not -n <= layer < n:
            raise HookPointError(
                f"layer {layer} out of range for {self.name} ({n} layers: valid 0..{n - 1} or -{n}..-1)"
            )
        canonical = hook_name(kind, layer % n)
        if canonical not in self.cfg.hook_points:
            raise HookPointError(f"hook point {canonical!r} does not exist in {self.cfg.family} models")
        return canonical

    def _site(self, name: str) -> _Site:
        site = self._sites.get(name)
        if site is None:
            site = self._build_site(name)
            self._sites[name] = site
        return site

    def _build_site(self, name: str) -> _Site:
        a, c = self.adapter, self.cfg
        if name == "embed":
            return _Site(name, _get_module(self.model, a.embed), False, 0, _identity, _replace, 0)
        if name == "logits":  # the model's final output (after any logit soft-capping, e.g. Gemma 2)
            return _Site(name, self.model, False, -1, _identity, _replace, 0)
        kind, layer_s = name.split(".")
        layer = int(layer_s)
        block = self.layers[layer]
        if kind == "resid_pre":
            return _Site(name, block, True, 0, _identity, _replace, 0)
        if kind == "resid_post":
            return _Site(name, block, False, 0, _identity, _replace, 0)
        if kind == "attn_out":
            return _Site(name, _get_module(block, a.attn_out), False, 0, _identity, _replace, 0)
        if kind == "resid_mid":

            def get_mid(raw: Tensor, layer: int = layer) -> Tensor:
                return self._stash[layer] + raw

            def put_mid(raw: Tensor, new: Tensor, layer: int = layer) -> Tensor:
                return new - self._stash[layer]

            return _Site(name, _get_module(block, a.attn_out), False, 0, get_mid, put_mid, 1)
        if kind == "mlp_out":
            return _Site(name, _get_module(block, a.mlp_out), False, 0, _identity, _replace, 0)
        if kind == "mlp_in":  # the MLP's input, after its pre-MLP norm
            return _Site(name, _get_module(block, a.mlp), True, 0, _identity, _replace, 0)
        if kind == "attn_pattern":
            return _Site(name, _get_module(block, a.attn), False, 1, _identity, _replace, 0)
        if kind == "head_z":
            h, dh = c.n_heads, c.d_head

            def get_z(raw: Tensor) -> Tensor:
                return raw.view(*raw.shape[:-1], h, dh)

            def put_z(raw: Tensor, new: Tensor) -> Tensor:
                return new.reshape(raw.shape)

            return _Site(name, _get_module(block, a.o_proj), True, 0, get_z, put_z, 0)
        if kind in ("q", "k", "v"):
            idx = "qkv".index(kind)
            heads = c.n_heads if kind == "q" else c.n_kv_heads
            dh = c.d_head
            if a.qkv_fused is None:
                path = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj}[kind]
                assert path is not None

                def get_sep(raw: Tensor, heads: int = heads) -> Tensor:
                    return raw.view(*raw.shape[:-1], heads, dh)

                def put_sep(raw: Tensor, new: Tensor) -> Tensor:
                    return new.reshape(raw.shape)

                return _Site(name, _get_module(block, path), False, 0, get_sep, put_sep, 0)
            fused = _get_module(block, a.qkv_fused)
            if a.qkv_layout == "gpt2":  # [q | k | v], each d_model wide

                def get_f(raw: Tensor, idx: int = idx, heads: int = heads) -> Tensor:
                    d = raw.shape[-1] // 3
                    return raw[..., idx * d : (idx + 1) * d].view(*raw.shape[:-1], heads, dh)

                def put_f(raw: Tensor, new: Tensor, idx: int = idx) -> Tensor:
                    d = raw.shape[-1] // 3
                    parts = list(raw.split(d, dim=-1))
                    parts[idx] = new.reshape(*raw.shape[:-1], d)
                    return torch.cat(parts, dim=-1)

                return _Site(name, fused, False, 0, get_f, put_f, idx)

            # neox: per head [q k v], each d_head wide
            def get_nx(raw: Tensor, idx: int = idx, heads: int = heads) -> Tensor:
                return raw.view(*raw.shape[:-1], heads, 3 * dh)[..., idx * dh : (idx + 1) * dh]

            def put_nx(raw: Tensor, new: Tensor, idx: int = idx, heads: int = heads) -> Tensor:
                parts = list(raw.view(*raw.shape[:-1], heads, 3 * dh).split(dh, dim=-1))
                parts[idx] = new
                return torch.cat(parts, dim=-1).reshape(raw.shape)

            return _Site(name, fused, False, 0, get_nx, put_nx, idx)
        raise HookPointError(f"unknown hook point {name!r}")  # pragma: no cover

    # ------------------------------------------------------------------ handler registry
    def _add_handler(self, name: str, fn: HookFn, priority: int, mode: str = "plain") -> Callable[[], None]:
        """Register ``fn`` at hook ``name``; returns a function that removes it.

        mode ``"copy"`` (user functions): ``fn`` gets a private copy of the activation, and an
        in-place edit of that copy (with ``None`` or the copy returned) counts as the new value.
        ``"plain"``: rosettalens' own functions that never mutate their input. ``"resize"``: like
        plain, but the result may have another batch size (the batched patching engine grows the
        batch at a ``resid_pre`` point; every other input of the layer must broadcast over it).
        """
        site = self._site(name)
        entry = (priority, fn, mode)
        handlers = self._handlers.setdefault(name, [])
        handlers.append(entry)
        handlers.sort(key=lambda e: e[0])  # stable: interventions (0) before recorders (1)
        removers = []
        if name.startswith("resid_mid."):
            layer = hook_layer(name)
            pre = hook_name("resid_pre", layer)
            removers.append(self._add_handler(pre, self._stasher(layer), _RECORD + 1))
        self._ensure_torch_hook(site)

        def remove() -> None:
            if entry in handlers:
                handlers.remove(entry)
            if not handlers:
                self._handlers.pop(name, None)
            for r in removers:
                r()
            self._maybe_remove_torch_hook(site)

        return remove

    def _stasher(self, layer: int) -> HookFn:
        def stash(act: Tensor, name: str) -> None:
            self._stash[layer] = act

        return stash

    def _names_at(self, module: nn.Module, pre: bool) -> list[_Site]:
        sites = [
            self._sites[n]
            for n in self._handlers
            if self._sites[n].module is module and self._sites[n].pre == pre
        ]
        return sorted(sites, key=lambda s: s.order)

    def _ensure_torch_hook(self, site: _Site) -> None:
        key = (id(site.module), site.pre)
        if key in self._torch_handles:
            return
        module = site.module
        if site.pre:

            def pre_hook(mod: nn.Module, args: tuple, kwargs: dict):
                if args:
                    raw = args[0]
                else:
                    raw = kwargs["hidden_states"]
                new = self._dispatch(mod, True, raw)
                if new is raw:
                    return None
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def post_hook(mod: nn.Module, args: tuple, output: Any):
                if mod is self.model:  # the `logits` hook point: a ModelOutput
                    new = self._dispatch(mod, False, output.logits, slot=-1)
                    if new is not output.logits:
                        output.logits = new
                    return output
                if isinstance(output, Tensor):
                    new = self._dispatch(mod, False, output, slot=0)
                    return None if new is output else new
                out = list(output) if isinstance(output, tuple) else None
                if out is None:
                    return None
                changed = False
                for slot in sorted({s.slot for s in self._names_at(mod, False)}):
                    if out[slot] is None:
                        raise HookPointError(
                            "attention patterns need eager attention: ask for attn_pattern hooks through "
                            "run_with_cache, which switches to eager for that call"
                        )
                    new = self._dispatch(mod, False, out[slot], slot=slot)
                    if new is not out[slot]:
                        out[slot] = new
                        changed = True
                return tuple(out) if changed else None

            handle = module.register_forward_hook(post_hook)
        self._torch_handles[key] = handle

    def _maybe_remove_torch_hook(self, site: _Site) -> None:
        if self._names_at(site.module, site.pre):
            return
        handle = self._torch_handles.pop((id(site.module), site.pre), None)
        if handle is not None:
            handle.remove()

    def _dispatch(self, module: nn.Module, pre: bool, raw: Tensor, slot: int = 0) -> Tensor:
        for site in self._names_at(module, pre):
            if site.slot != slot:
                continue
            act = site.get(raw)
            changed = False
            for _, fn, mode in list(self._handlers.get(site.name, ())):
                if mode == "copy":
                    out = _call_on_copy(fn, act, site.name)
                else:
                    out = fn(act, site.name)
                if out is not None and out is not act:
                    resized = mode == "resize" and site.put is _replace and out.shape[1:] == act.shape[1:]
                    if out.shape != act.shape and not resized:
                        raise ShapeError(
                            f"intervention at {site.name} returned shape {tuple(out.shape)}, expected {tuple(act.shape)}"
                        )
                    act = out.to(act.dtype)
                    changed = True
            if changed:
                raw = site.put(raw, act)
        return raw

    # ------------------------------------------------------------------ KV offset (prompt vs generated)
    @property
    def tracking_offset(self) -> bool:
        """A :meth:`track_offset` block is open (``kv_offset`` follows the KV cache)."""
        return self._offset_users > 0

    @contextlib.contextmanager
    def track_offset(self) -> Iterator[None]:
        """While open, position selectors of :meth:`patch` / :meth:`steer` count prompt positions
        across cached generation steps (the KV-cache length is read before each forward)."""
        if self._offset_users == 0:

            def top_pre(mod: nn.Module, args: tuple, kwargs: dict):
                kv = kwargs.get("cache", None)
                if kv is None:
                    kv = kwargs.get("past_key_values", None)
                self.kv_offset = (
                    int(kv.get_seq_length()) if kv is not None and hasattr(kv, "get_seq_length") else 0
                )

            self._offset_handle = self.model.register_forward_pre_hook(top_pre, with_kwargs=True)
        self._offset_users += 1
        try:
            yield
        finally:
            self._offset_users -= 1
            if self._offset_users == 0 and self._offset_handle is not None:
                self._offset_handle.remove()
                self._offset_handle = None
                self.kv_offset = 0

    # ------------------------------------------------------------------ interventions
    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[HookedModel]:
        """Generic intervention context: ``fn(act, hook_name) -> new act or None``.

        ``fn`` gets its own copy of the activation: returning a new tensor, or editing the copy in
        place (returning it or ``None``), replaces the activation; nothing else sees the edit.
        """
        with self.intervene([(n, fn, "copy") for n, fn in fwd_hooks]):
            yield self

    @contextlib.contextmanager
    def intervene(self, fwd_hooks: Sequence[tuple[str, HookFn, str]]) -> Iterator[HookedModel]:
        """The intervention primitive: ``with hm.intervene([(hook, fn, mode), ...]):``.

        ``fn(act, hook_name) -> new act or None`` runs at ``hook`` while the block is open; every
        handler is removed on exit, also on error. ``mode`` says what ``fn`` may do:

        - ``"copy"``: ``fn`` gets a private copy and may edit it in place (what :meth:`hooks` uses);
        - ``"plain"``: ``fn`` never mutates its input and returns a tensor of the same shape (no copy);
        - ``"resize"``: like ``"plain"``, but the result may have another batch size (batched patching
          grows the batch at a ``resid_pre`` point; every other input of the layer must broadcast).

        Activations are ``[batch, pos, ...]`` as listed in the module docstring.
        """
        removers = []
        try:
            for name, fn, mode in fwd_hooks:
                removers.append(self._add_handler(self.resolve_hook(name), fn, _INTERVENE, mode=mode))
            yield self
        finally:
            for r in reversed(removers):
                r()

    @contextlib.contextmanager
    def patch(
        self,
        hook: str | dict[str, Tensor | HookFn],
        value: Tensor | HookFn | None = None,
        *,
        positions: Selector = None,
        rows: Selector = None,
        heads: Selector = None,
    ) -> Iterator[HookedModel]:
        """Replace an activation inside the block: ``with hm.patch("resid_pre.3", clean, positions=[-1]):``.

        hook: a hook name, or a dict ``{hook: value}`` to patch several points at once.
        value: a tensor, or ``fn(act, hook) -> new act or None`` (which gets its own copy of ``act``
        and may edit it in place). A tensor either broadcasts to the whole activation (e.g. a cached
        ``[batch, pos, d_model]`` activation of another prompt of the same length, or a ``[d_model]``
        vector): then the selected entries are read from it at the same indices; or it has the shape
        of the selection (e.g. ``[batch, len(positions), d_model]``).
        positions / rows / heads: select what is replaced (int, list, slice, bool or index tensor;
        negative counts from the end); ``None`` = all. ``positions`` index the sequence axis (the
        query axis of ``attn_pattern``) of the prompt forward only: forwards that continue a KV cache
        inside ``generate`` are left alone. ``heads`` needs a per-head hook point (``head_z``, ``q``,
        ``k``, ``v``, ``attn_pattern``); for ``k``/``v`` it counts key-value heads.
        Everything not selected keeps the model's own value.
        """
        patches = hook if isinstance(hook, dict) else {hook: value}
        if not isinstance(hook, dict) and value is None:
            raise ShapeError(f"patch({hook!r}) needs a value: a tensor or a function fn(act, hook)")
        selective = positions is not None or rows is not None or heads is not None
        fwd: list[tuple[str, HookFn, str]] = []
        for name, val in patches.items():
            canonical = self.resolve_hook(name)
            if not selective:
                if callable(val) and not isinstance(val, Tensor):
                    fwd.append((canonical, val, "copy"))
                else:
                    fwd.append((canonical, _tensor_patch(canonical, val), "plain"))
            else:
                fwd.append(
                    (canonical, self._selective_patch(canonical, val, positions, rows, heads), "plain")
                )
        with contextlib.ExitStack() as stack:
            if positions is not None:
                stack.enter_context(self.track_offset())
            stack.enter_context(self.intervene(fwd))
            yield self

    def _selective_patch(
        self, name: str, value: Any, positions: Selector, rows: Selector, heads: Selector
    ) -> HookFn:
        kind = name.split(".")[0]
        per_head = kind in ("head_z", "q", "k", "v", "attn_pattern")
        if heads is not None and not per_head:
            raise ShapeError(
                f"heads= needs a per-head hook point (head_z, q, k, v, attn_pattern), not {name}"
            )
        # axis of each selector in the activation
        axes = {"rows": 0, "positions": 2 if kind == "attn_pattern" else 1}
        if per_head:
            axes["heads"] = 1 if kind == "attn_pattern" else 2
        sel = {"rows": rows, "positions": positions, "heads": heads}
        is_fn = callable(value) and not isinstance(value, Tensor)
        tensor = None if is_fn else torch.as_tensor(value).detach()

        def fn(act: Tensor, hook_name: str) -> Tensor | None:
            if positions is not None and self.kv_offset != 0:
                return None  # a generated token's forward: positions index the prompt only
            index = _index_tuple(act, {axes[k]: (k, v) for k, v in sel.items() if v is not None}, hook_name)
            new = act.clone()
            if is_fn:
                out = _call_on_copy(value, act, hook_name)
                src = act if out is None else out
                if src.shape != act.shape:
                    raise ShapeError(
                        f"intervention at {hook_name} returned shape {tuple(src.shape)}, expected {tuple(act.shape)}"
                    )
                new[index] = src.to(act.dtype)[index]
                return new
            assert tensor is not None
            v = tensor.to(device=act.device, dtype=act.dtype)
            try:
                full = v.expand_as(act)
            except RuntimeError:
                full = None
            if full is not None:
                new[index] = full[index]
                return new
            target = new[index].shape
            try:
                new[index] = v.expand(target)
            except RuntimeError as e:
                raise ShapeError(
                    f"patch for {hook_name} has shape {tuple(v.shape)}: it broadcasts neither to the "
                    f"activation {tuple(act.shape)} nor to the selection {tuple(target)}"
                ) from e
            return new

        return fn

    @contextlib.contextmanager
    def steer(
        self,
        hook: str,
        vector: Tensor,
        scale: float = 1.0,
        positions: None | str | int | Sequence[int] | slice = None,
    ) -> Iterator[HookedModel]:
        """Add ``scale * vector`` at ``hook``.

        positions: ``None``/``"all"`` every position of every forward; ``"prompt"`` only the prompt
        (the forward with an empty KV cache); ``"generated"`` only tokens generated afterwards; an int,
        list or slice indexes positions of the prompt forward (negative = from the end of the prompt,
        which is the same for every row under left padding).
        """
        name = self.resolve_hook(hook)
        vec = torch.as_tensor(vector).detach()
        width = self.hook_width(name)
        if vec.shape[-1:] != (width,) or vec.dim() != 1:
            raise ShapeError(
                f"steering vector has shape {tuple(vec.shape)}, but {name} of {self.name} is [{width}]"
            )
        if isinstance(positions, str) and positions not in ("all", "prompt", "generated"):
            raise ShapeError(
                f"positions must be all|prompt|generated, an int, a list or a slice, got {positions!r}"
            )

        def add(act: Tensor, hook_name: str) -> Tensor | None:
            v = (scale * vec).to(device=act.device, dtype=act.dtype)
            prompt = self.kv_offset == 0
            if positions is None or positions == "all":
                return act + v
            if positions == "prompt":
                return act + v if prompt else None
            if positions == "generated":
                return None if prompt else act + v
            if not prompt:
                return None
            out = act.clone()
            idx: Any = [positions] if isinstance(positions, int) else positions
            out[:, idx] += v
            return out

        with self.track_offset(), self.intervene([(name, add, "plain")]):
            yield self

    def unit_direction(self, direction: Tensor) -> Tensor:
        """``direction`` as a float64 unit vector of width ``d_model`` (:class:`ShapeError` otherwise)."""
        d = torch.as_tensor(direction).detach().to(torch.float64)
        if d.dim() != 1 or d.shape[0] != self.cfg.d_model:
            raise ShapeError(
                f"direction has shape {tuple(d.shape)}, but {self.name} has d_model {self.cfg.d_model}"
            )
        if not torch.isfinite(d).all() or d.norm() == 0:
            raise ShapeError("direction must be finite and non-zero")
        return d / d.norm()

    @contextlib.contextmanager
    def ablate(self, direction: Tensor, hooks: Sequence[str] | None = None) -> Iterator[HookedModel]:
        """Directional ablation: remove the component along ``direction`` (normalised) at ``hooks``.

        Default: ``resid_pre.L``, ``attn_out.L`` and ``mlp_out.L`` of every layer (Arditi et al. 2024),
        so no component along the direction is written to or read from the residual stream.
        """
        unit = self.unit_direction(direction)
        kinds = ("resid_pre", "attn_out", "mlp_out")
        every = [hook_name(k, layer) for layer in range(self.cfg.n_layers) for k in kinds]
        names = every if hooks is None else [self.resolve_hook(h) for h in hooks]
        for n in names:
            if self.hook_width(n) != self.cfg.d_model:
                raise ShapeError(f"cannot ablate a d_model direction at {n}")

        def project_out(act: Tensor, hook_name: str) -> Tensor:
            u = unit.to(device=act.device, dtype=act.dtype)
            return act - (act @ u).unsqueeze(-1) * u

        with self.intervene([(n, project_out, "plain") for n in names]):
            yield self

    def hook_width(self, name: str) -> int:
        """The last dimension of the activation at hook ``name`` (``d_model`` for the residual stream)."""
        kind = name.split(".")[0]
        if kind in ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out"):
            return self.cfg.d_model
        if kind == "logits":
            return self.model.config.get_text_config().vocab_size
        raise ShapeError(f"{name} is not a vector-valued hook point")

    # ------------------------------------------------------------------ tokenisation
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_chat(
        self, texts: Sequence[str], system: str | None = None, add_generation_prompt: bool = True
    ) -> list[str]:
        if not self.has_chat_template():
            raise ChatTemplateError(
                f"{self.name}'s tokenizer has no chat template; use an instruct model or pass chat=False"
            )
        out = []
        for t in texts:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": t}
            ]
            out.append(
                self.tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            )
        return out

    def tokenize(
        self,
        texts: str | Sequence[str],
        chat: bool = False,
        system: str | None = None,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask`` ``[batch, pos]`` on the model's device.

        With ``chat=True`` each text becomes one user turn in the chat template (the template supplies
        its own special tokens, so none are added again).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ShapeError("no texts to tokenize")
        if chat:
            texts = self.format_chat(texts, system=system, add_generation_prompt=add_generation_prompt)
            add_special_tokens = False
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(
                texts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
                truncation=max_length is not None,
                max_length=max_length,
            )
        finally:
            tok.padding_side = old_side
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }

    def _inputs(self, inputs: Any, attention_mask: Tensor | None, chat: bool) -> dict[str, Tensor]:
        if isinstance(inputs, Tensor):
            ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
            mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
            return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if isinstance(inputs, dict):
            return {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return self.tokenize(inputs, chat=chat)

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def forward(self, inputs: Any, attention_mask: Tensor | None = None, chat: bool = False) -> Tensor:
        """Logits ``[batch, pos, vocab]``; with any active intervention contexts applied."""
        logits, _ = self.run_with_cache(inputs, hooks=None, attention_mask=attention_mask, chat=chat)
        assert logits is not None
        return logits

    @torch.no_grad()
    def run_with_cache(
        self,
        inputs: Any,
        hooks: Sequence[str] | None = None,
        attention_mask: Tensor | None = None,
        chat: bool = False,
        stop_early: bool = False,
    ) -> tuple[Tensor | None, ActivationCache]:
        """Run the model and cache activations at ``hooks``.

        inputs: a string, a list of strings (left-padded batch) or token ids ``[batch, pos]`` with an
        optional ``attention_mask``. Returns ``(logits [batch, pos, vocab], {hook: activation})``.
        Padded positions get position ids from the mask, so a left-padded row matches its unpadded run.
        ``stop_early`` ends the forward after the last requested hook (logits is then ``None``).
        The cache is keyed by canonical names and answers every spelling (``cache["resid_post.-1"]``).
        """
        enc = self._inputs(inputs, attention_mask, chat)
        names = [self.resolve_hook(h) for h in (hooks or [])]
        if len(set(names)) != len(names):
            raise HookPointError(f"a hook point is requested twice: {names}")
        cache: dict[str, Tensor] = {}
        want = len(names)

        def recorder(act: Tensor, name: str) -> None:
            cache[name] = act.detach()
            if stop_early and len(cache) == want:
                raise _StopForward

        mask = enc["attention_mask"]
        kwargs: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": mask, "use_cache": False}
        if (mask == 0).any():
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        eager = any(n.startswith("attn_pattern.") for n in names)
        removers = []
        logits: Tensor | None = None
        try:
            for n in names:
                removers.append(self._add_handler(n, recorder, _RECORD))
            with self._attn_impl("eager" if eager else None):
                try:
                    logits = self.model(**kwargs).logits
                except _StopForward:
                    logits = None
        finally:
            for r in reversed(removers):
                r()
        missing = [n for n in names if n not in cache]
        if missing:  # pragma: no cover - would be an adapter bug
            raise HookPointError(f"hook points {missing} did not fire for {self.name}")
        return logits, ActivationCache({n: cache[n] for n in names}, self.resolve_hook)

    @contextlib.contextmanager
    def _attn_impl(self, impl: str | None) -> Iterator[None]:
        if impl is None or self.model.config._attn_implementation == impl:
            yield
            return
        old = self.model.config._attn_implementation
        self.model.set_attn_implementation(impl)
        try:
            yield
        finally:
            self.model.set_attn_implementation(old)

    @torch.no_grad()
    def generate(
        self,
        inputs: Any,
        max_new_tokens: int = 32,
        chat: bool = False,
        do_sample: bool = False,
        attention_mask: Tensor | None = None,
        skip_special_tokens: bool = True,
        **kwargs: Any,
    ) -> list[str]:
        """Generate from a prompt (batch); returns only the new text of each row.

        Active intervention contexts (patch/steer/ablate) apply to every step.
        """
        enc = self._inputs(inputs, attention_mask, chat)
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if not do_sample:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        gen_kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        gen_kwargs.update(kwargs)
        with self.track_offset():
            out = self.model.generate(**enc, **gen_kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=skip_special_tokens)

    def active_hook_count(self) -> int:
        """Number of PyTorch hooks rosettalens currently holds on the model (0 outside contexts)."""
        return len(self._torch_handles) + (self._offset_handle is not None)


class ActivationCache(dict):
    """``{canonical hook name: activation}`` that also answers every other spelling of a name.

    ``cache["resid_post.-1"]`` is ``cache["resid_post.29"]`` on a 30-layer model; ``"x" in cache``,
    ``cache.get(x)`` resolve the same way. Iteration and ``keys()`` give the canonical names.
    """

    def __init__(self, data: dict[str, Tensor], resolve: Callable[[str], str]):
        super().__init__(data)
        self._resolve = resolve

    def _canonical(self, name: Any) -> Any:
        if not isinstance(name, str) or dict.__contains__(self, name):
            return name
        return self._resolve(name)  # HookPointError (a KeyError) for a name that is no hook point

    def __getitem__(self, name: Any) -> Tensor:
        key = self._canonical(name)
        if not dict.__contains__(self, key):
            alias = f" ({key})" if key != name else ""
            raise HookPointError(f"{name!r}{alias} was not cached; cached: {', '.join(self)}")
        return dict.__getitem__(self, key)

    def __contains__(self, name: Any) -> bool:
        try:
            return dict.__contains__(self, self._canonical(name))
        except HookPointError:
            return False

    def get(self, name: Any, default: Any = None) -> Any:
        return self[name] if name in self else default


def _call_on_copy(fn: HookFn, act: Tensor, name: str) -> Tensor | None:
    """Call a user function on a private copy of ``act``; an in-place edit of the copy is the result."""
    given = act.clone()
    try:
        version: int | None = given._version
    except RuntimeError:  # inference-mode tensors have no version counter
        version = None
    out = fn(given, name)
    if out is not None and out is not given:
        return out
    if version is not None:
        edited = given._version != version
    else:
        edited = not torch.equal(given, act)
    return given if edited else None


def _index(sel: Selector, size: int, what: str, name: str) -> Tensor:
    """A selector (int, slice, list, bool or index tensor; negative from the end) as indices ``[k]``."""
    if isinstance(sel, slice):
        return torch.arange(size)[sel]
    t = torch.as_tensor(sel)
    if t.dtype == torch.bool:
        if t.shape != (size,):
            raise ShapeError(f"{what} mask for {name} has shape {tuple(t.shape)}, expected ({size},)")
        return t.nonzero().flatten()
    if t.dtype.is_floating_point or t.dim() > 1:
        raise ShapeError(f"{what} for {name} must be an int, a slice, a list of ints or a bool mask")
    t = t.long().flatten().cpu()
    if ((t < -size) | (t >= size)).any():
        raise ShapeError(f"{what} {t.tolist()} out of range for {name} (size {size})")
    return t % size


def _index_tuple(act: Tensor, selectors: dict[int, tuple[str, Selector]], name: str) -> tuple:
    """Advanced-indexing tuple selecting the product of ``{axis: (what, selector)}`` in ``act``."""
    last = max(selectors)
    idx = []
    for axis in range(last + 1):
        size = act.shape[axis]
        if axis in selectors:
            what, sel = selectors[axis]
            i = _index(sel, size, what, name)
        else:
            i = torch.arange(size)
        shape = [1] * (last + 1)
        shape[axis] = -1
        idx.append(i.to(act.device).view(shape))
    return tuple(idx)


def _tensor_patch(name: str, value: Any) -> HookFn:
    value = torch.as_tensor(value).detach()

    def patch(act: Tensor, hook_name: str) -> Tensor:
        try:  # a fresh tensor: the model never holds a view of the caller's value
            return torch.empty_like(act).copy_(value.to(device=act.device, dtype=act.dtype).expand_as(act))
        except RuntimeError as e:
            raise ShapeError(
                f"patch for {name} has shape {tuple(value.shape)}, not broadcastable to {tuple(act.shape)}"
            ) from e

    return patch
