"""Hook-point names: the one builder and parser, and the ``mlp_in`` point against a plain torch hook."""

import pytest
import torch

from rosettalens.errors import HookPointError
from rosettalens.names import LAYER_HOOKS, check_hook_name, hook_name, parse_hook_name


def test_hook_name_round_trips_every_kind():
    for kind in LAYER_HOOKS:
        for layer in (0, 5, -1):
            name = hook_name(kind, layer)
            assert name == f"{kind}.{layer}"
            assert parse_hook_name(name) == (kind, layer)
            check_hook_name(name)
    assert hook_name("embed") == "embed" and parse_hook_name("logits") == ("logits", None)


@pytest.mark.parametrize(
    "call",
    [
        lambda: hook_name("resid", 3),
        lambda: hook_name("resid_pre"),
        lambda: hook_name("embed", 2),
        lambda: hook_name("mlp_out", 1.5),
        lambda: parse_hook_name("resid_pre.x"),
        lambda: parse_hook_name("blocks.3.hook_resid_pre"),
    ],
)
def test_bad_hook_names_raise(call):
    with pytest.raises(HookPointError):
        call()


def test_mlp_in_is_the_mlp_modules_input(tiny_hm):
    """``mlp_in.L`` equals what a plain PyTorch pre-hook on the MLP module receives (after its norm)."""
    ids = torch.randint(0, 50, (2, 7), device=tiny_hm.device)
    got = {}
    handle = tiny_hm.layers[1].mlp.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].clone()))
    try:
        _, cache = tiny_hm.run_with_cache(ids, hooks=["mlp_in.1"])
    finally:
        handle.remove()
    assert torch.equal(cache["mlp_in.1"], got["x"])
    assert tiny_hm.hook_width("mlp_in.1") == tiny_hm.cfg.d_model
