"""Hook-point names: one builder, one parser, one check (the bottom layer; imports nothing of ours).

A hook point is ``embed``, ``logits`` or ``KIND.L`` with ``KIND`` one of :data:`LAYER_HOOKS` and ``L``
a layer index (negative counts from the end). Build names with :func:`hook_name`, never by hand::

    hook_name("resid_pre", 6)    # "resid_pre.6"
    hook_name("embed")           # "embed"
    parse_hook_name("mlp_out.-1")  # ("mlp_out", -1)
"""

from __future__ import annotations

import re

from .errors import HookPointError

#: Per-layer hook kinds; shapes and the HF tensor each one is are in ``hooks.py`` / ``models/adapters.py``.
LAYER_HOOKS = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_in",
    "mlp_out",
    "head_z",
    "q",
    "k",
    "v",
    "attn_pattern",
)
#: Hook points without a layer.
GLOBAL_HOOKS = ("embed", "logits")

_NAME_RE = re.compile(r"^([a-z_]+)\.(-?\d+)$")


def _valid_names() -> str:
    return ", ".join(("embed", *(f"{k}.L" for k in LAYER_HOOKS), "logits"))


def hook_name(kind: str, layer: int | None = None) -> str:
    """The hook-point name of ``kind`` at ``layer`` (``None`` for ``embed`` / ``logits``).

    Raises :class:`HookPointError` for an unknown kind, a layer given to a global hook, or a layer
    missing for a per-layer one. Whether the layer exists is checked once a model is known
    (:meth:`rosettalens.HookedModel.resolve_hook`)."""
    if kind in GLOBAL_HOOKS:
        if layer is not None:
            raise HookPointError(f"hook point {kind!r} takes no layer (got {layer})")
        return kind
    if kind not in LAYER_HOOKS:
        raise HookPointError(f"unknown hook kind {kind!r}; valid names: {_valid_names()} (L may be negative)")
    if layer is None or isinstance(layer, bool) or not isinstance(layer, int):
        raise HookPointError(f"hook point {kind!r} needs an integer layer, got {layer!r}")
    return f"{kind}.{layer}"


def parse_hook_name(name: str) -> tuple[str, int | None]:
    """``(kind, layer)`` of a hook-point name as written (``layer`` is ``None`` for ``embed`` / ``logits``).

    Raises :class:`HookPointError` for a name that is not a hook point."""
    if name in GLOBAL_HOOKS:
        return name, None
    m = _NAME_RE.match(name) if isinstance(name, str) else None
    if m is None or m.group(1) not in LAYER_HOOKS:
        raise HookPointError(
            f"unknown hook point {name!r}; valid names: {_valid_names()} (L may be negative)"
        )
    return m.group(1), int(m.group(2))


def hook_layer(name: str) -> int:
    """The layer of a per-layer hook-point name as written (``"mlp_out.3"`` -> ``3``).

    Raises :class:`HookPointError` for a name that is not a hook point or has no layer."""
    kind, layer = parse_hook_name(name)
    if layer is None:
        raise HookPointError(f"hook point {kind!r} has no layer")
    return layer


def check_hook_name(name: str) -> None:
    """A hook-point name as written, without a model (``resid_post.3``, ``attn_out.-1``, ``embed``).
    Whether layer ``L`` exists is checked by :meth:`HookedModel.resolve_hook` once the model is known.
    Raises :class:`HookPointError`."""
    parse_hook_name(name)
