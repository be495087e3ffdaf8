"""HookedModel against independent references: the plain HF forward on tiny random models."""

import pytest
import torch

from rosettalens.errors import HookPointError, ShapeError
from rosettalens.hooks import _get_module
from rosettalens.names import hook_name

PROMPTS = ["The quick brown fox", "January February March April May", "0 1 2"]


def _no_hooks_left(hm) -> bool:
    """No rosettalens hook on any module (HF installs its own permanent output-capturing hooks)."""
    for mod in hm.model.modules():
        for fn in [*mod._forward_hooks.values(), *mod._forward_pre_hooks.values()]:
            if "HookedModel" in getattr(fn, "__qualname__", ""):
                return False
    return hm.active_hook_count() == 0


def _all_points(hm):
    return [h for h in hm.cfg.hook_points if not h.startswith("attn_pattern")]


def test_cache_every_point_logits_identical(tiny_hm):
    enc = tiny_hm.tokenize(PROMPTS)
    plain = tiny_hm.model(**enc, position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    logits, cache = tiny_hm.run_with_cache(enc, hooks=_all_points(tiny_hm))
    assert torch.equal(logits, plain)  # max abs difference 0
    assert torch.equal(cache["logits"], plain)
    assert set(cache) == set(_all_points(tiny_hm))
    assert _no_hooks_left(tiny_hm)


def test_resid_convention_matches_hf_hidden_states(tiny_hm):
    enc = tiny_hm.tokenize(PROMPTS[0])
    hs = tiny_hm.model(**enc, output_hidden_states=True).hidden_states
    n = tiny_hm.cfg.n_layers
    hooks = (
        ["resid_pre.0"]
        + [hook_name("resid_post", i) for i in range(n)]
        + [hook_name("resid_pre", i) for i in range(1, n)]
    )
    _, cache = tiny_hm.run_with_cache(enc, hooks=hooks)
    assert torch.equal(cache["resid_pre.0"], hs[0])
    for i in range(n - 1):
        assert torch.equal(cache[hook_name("resid_post", i)], hs[i + 1]), i
        assert torch.equal(cache[hook_name("resid_pre", i + 1)], cache[hook_name("resid_post", i)])
    # HF's last hidden state is after the final norm; resid_post.{n-1} is before it
    final_norm = _get_module(tiny_hm.model, tiny_hm.adapter.final_norm)
    assert torch.equal(final_norm(cache[hook_name("resid_post", n - 1)]), hs[n])


def test_shapes_and_negative_layers(tiny_hm):
    c = tiny_hm.cfg
    enc = tiny_hm.tokenize(PROMPTS[:2])
    b, p = enc["input_ids"].shape
    _, cache = tiny_hm.run_with_cache(
        enc, hooks=["head_z.-1", "q.0", "k.0", "v.0", "attn_pattern.1", "embed"]
    )
    assert cache[hook_name("head_z", c.n_layers - 1)].shape == (b, p, c.n_heads, c.d_head)
    assert cache["q.0"].shape == (b, p, c.n_heads, c.d_head)
    assert cache["k.0"].shape == (b, p, c.n_kv_heads, c.d_head)
    assert cache["v.0"].shape == (b, p, c.n_kv_heads, c.d_head)
    pat = cache["attn_pattern.1"]
    assert pat.shape == (b, c.n_heads, p, p)
    # rows of an attention pattern are distributions over earlier (unpadded) positions
    last = pat[:, :, -1, :]
    assert torch.allclose(last.sum(-1), torch.ones_like(last.sum(-1)), atol=1e-5)
    longest = int(enc["attention_mask"].sum(-1).argmax())  # the unpadded row is causal everywhere
    assert torch.all(torch.triu(pat[longest, 0], diagonal=1) == 0)
    assert _no_hooks_left(tiny_hm)


def test_attention_impl_restored_after_pattern(tiny_hm):
    before = tiny_hm.model.config._attn_implementation
    tiny_hm.run_with_cache(PROMPTS[0], hooks=["attn_pattern.0"])
    assert tiny_hm.model.config._attn_implementation == before


def test_o_proj_of_head_z_reproduces_attention_output(tiny_hm):
    a = tiny_hm.adapter
    enc = tiny_hm.tokenize(PROMPTS[:2])
    layer = 1
    attn_mod = _get_module(tiny_hm.layers[layer], a.attn)
    o_mod = _get_module(tiny_hm.layers[layer], a.o_proj)
    seen = {}
    h = attn_mod.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o[0]))
    try:
        _, cache = tiny_hm.run_with_cache(enc, hooks=[hook_name("head_z", layer)])
    finally:
        h.remove()
    z = cache[hook_name("head_z", layer)]
    flat = z.reshape(*z.shape[:2], -1)
    assert torch.allclose(o_mod(flat), seen["attn"], atol=1e-6)


def test_resid_mid_is_pre_plus_attn_out_and_post_is_mid_plus_mlp(tiny_hm):
    if tiny_hm.adapter.parallel_residual:
        assert "resid_mid.0" not in tiny_hm.cfg.hook_points
        return
    _, c = tiny_hm.run_with_cache(
        PROMPTS[1], hooks=["resid_pre.1", "attn_out.1", "resid_mid.1", "mlp_out.1", "resid_post.1"]
    )
    assert torch.equal(c["resid_mid.1"], c["resid_pre.1"] + c["attn_out.1"])
    assert torch.allclose(c["resid_post.1"], c["resid_mid.1"] + c["mlp_out.1"], atol=1e-6)


def test_patch_own_cache_changes_nothing(tiny_hm):
    enc = tiny_hm.tokenize(PROMPTS)
    points = [h for h in _all_points(tiny_hm) if h != "logits"]
    logits, cache = tiny_hm.run_with_cache(enc, hooks=points)
    with tiny_hm.patch({h: cache[h] for h in points}):
        patched = tiny_hm.forward(enc)
    assert torch.allclose(patched, logits, atol=1e-5)
    assert _no_hooks_left(tiny_hm)


def test_patch_changes_downstream_and_q_patch_roundtrips(tiny_hm):
    enc = tiny_hm.tokenize(PROMPTS[0])
    base = tiny_hm.forward(enc)
    with tiny_hm.patch({"resid_post.0": lambda act, name: act * 0}):
        zeroed = tiny_hm.forward(enc)
    assert not torch.allclose(zeroed, base)
    # a q/k/v patch through a fused or separate projection: identity fn must change nothing
    with tiny_hm.patch({"q.1": lambda act, name: act.clone(), "v.1": lambda act, name: act + 0}):
        same = tiny_hm.forward(enc)
    assert torch.allclose(same, base, atol=1e-6)
    with tiny_hm.patch({"v.1": lambda act, name: act * 0}):
        changed = tiny_hm.forward(enc)
    assert not torch.allclose(changed, base)


def test_ablation_leaves_no_component(tiny_hm):
    torch.manual_seed(0)
    d = torch.randn(tiny_hm.cfg.d_model)
    u = (d / d.norm()).to(tiny_hm.device)  # ablate() itself gets the CPU vector
    n = tiny_hm.cfg.n_layers
    hooks = [hook_name("resid_post", i) for i in range(n)] + [hook_name("attn_out", i) for i in range(n)]
    _, before = tiny_hm.run_with_cache(PROMPTS[0], hooks=hooks)
    assert before["resid_post.0"].matmul(u).abs().max() > 1e-3
    with tiny_hm.ablate(d):
        _, after = tiny_hm.run_with_cache(PROMPTS[0], hooks=hooks)
    for h in hooks:
        assert after[h].matmul(u).abs().max() < 1e-5, h
    assert _no_hooks_left(tiny_hm)


def test_steer_adds_exactly_at_positions(tiny_hm):
    d = tiny_hm.cfg.d_model
    v = torch.randn(d)
    enc = tiny_hm.tokenize(PROMPTS[1])
    _, base = tiny_hm.run_with_cache(enc, hooks=["resid_pre.1"])
    with tiny_hm.steer("resid_pre.1", v, scale=2.0, positions=[-1]):
        _, steered = tiny_hm.run_with_cache(enc, hooks=["resid_pre.1"])
    diff = steered["resid_pre.1"] - base["resid_pre.1"]
    assert torch.allclose(diff[0, -1], 2.0 * v.to(diff.device), atol=1e-5)
    assert torch.all(diff[0, :-1] == 0)
    with pytest.raises(ShapeError):
        with tiny_hm.steer("resid_pre.1", torch.randn(d + 1)):
            pass
    assert _no_hooks_left(tiny_hm)


def test_hooks_removed_after_exception(tiny_hm):
    with pytest.raises(RuntimeError, match="boom"):
        with (
            tiny_hm.steer("resid_pre.0", torch.zeros(tiny_hm.cfg.d_model)),
            tiny_hm.ablate(torch.ones(tiny_hm.cfg.d_model)),
        ):
            assert tiny_hm.active_hook_count() > 0
            raise RuntimeError("boom")
    assert _no_hooks_left(tiny_hm)

    def bad(act, name):
        raise ValueError("inside hook")

    with pytest.raises(ValueError, match="inside hook"):
        with tiny_hm.patch({"mlp_out.0": bad}):
            tiny_hm.forward(PROMPTS[0])
    assert _no_hooks_left(tiny_hm)


def test_left_padding_matches_unpadded(tiny_hm):
    short, long = "0 1 2", "January February March April May June"
    _, single = tiny_hm.run_with_cache(short, hooks=["resid_post.-1"])
    _, batch = tiny_hm.run_with_cache([long, short], hooks=["resid_post.-1"])
    n = single[hook_name("resid_post", tiny_hm.cfg.n_layers - 1)].shape[1]
    key = hook_name("resid_post", tiny_hm.cfg.n_layers - 1)
    assert torch.allclose(batch[key][1, -n:], single[key][0], atol=1e-4)


def test_stop_early_returns_same_activation(tiny_hm):
    _, full = tiny_hm.run_with_cache(PROMPTS[0], hooks=["resid_post.0"])
    logits, early = tiny_hm.run_with_cache(PROMPTS[0], hooks=["resid_post.0"], stop_early=True)
    assert logits is None
    assert torch.equal(full["resid_post.0"], early["resid_post.0"])
    assert _no_hooks_left(tiny_hm)


def test_steer_inside_generate_prompt_vs_generated(tiny_hm):
    v = 50 * torch.randn(tiny_hm.cfg.d_model)
    base = tiny_hm.generate(PROMPTS[0], max_new_tokens=4)
    with tiny_hm.steer("resid_pre.0", torch.zeros(tiny_hm.cfg.d_model)):
        same = tiny_hm.generate(PROMPTS[0], max_new_tokens=4)
    assert same == base
    calls = []
    with (
        tiny_hm.steer("resid_pre.0", v, positions="generated"),
        tiny_hm.hooks([("resid_pre.0", lambda act, name: calls.append((tiny_hm.kv_offset, act.shape[1])))]),
    ):
        tiny_hm.generate(PROMPTS[0], max_new_tokens=3)
    assert calls[0][0] == 0 and all(off > 0 and p == 1 for off, p in calls[1:])
    assert _no_hooks_left(tiny_hm)


def test_bad_hook_names(tiny_hm):
    n = tiny_hm.cfg.n_layers
    with pytest.raises(HookPointError, match="valid names"):
        tiny_hm.resolve_hook("resid_middle.0")
    with pytest.raises(HookPointError, match="out of range"):
        tiny_hm.resolve_hook(hook_name("resid_post", n))
    assert tiny_hm.resolve_hook("resid_post.-1") == hook_name("resid_post", n - 1)
    with pytest.raises(HookPointError):
        tiny_hm.run_with_cache("x", hooks=[hook_name("mlp_out", -n - 1)])


def test_cfg_facts_read_from_config(tiny_hm):
    c = tiny_hm.cfg
    assert c.n_heads * c.d_head == tiny_hm.model.config.get_text_config().num_attention_heads * c.d_head
    assert c.n_layers == 3 and c.d_model == 48
    assert c.hook_points[0] == "embed" and c.hook_points[-1] == "logits"


def test_chat_template_missing_is_clear():
    from rosettalens.errors import ChatTemplateError
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_model, tiny_tokenizer

    model, _ = tiny_model("llama")
    hm = HookedModel.from_hf(model, tiny_tokenizer(chat_template=False))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        hm.tokenize("hi", chat=True)


# ---------------------------------------------------------------------------------- patch selectors
def _reference_patch(hm, enc, hook, fn):
    """One forward with a hand-written closure (the reference the selectors must reproduce)."""
    with hm.hooks([(hook, fn)]):
        return hm.forward(enc)


def test_patch_positions_equals_hand_written_closure(tiny_hm):
    enc_clean = tiny_hm.tokenize(["0 1 2 3 4 5 6", "The quick brown fox jumps"])
    enc_corr = tiny_hm.tokenize(["6 5 4 3 2 1 0", "The lazy brown dog jumps"])
    # the premise of the test (equal lengths) holds on every tiny tokenizer: fail loudly, never skip
    assert enc_clean["input_ids"].shape == enc_corr["input_ids"].shape
    enc_corr["attention_mask"] = enc_clean["attention_mask"]
    _, cache = tiny_hm.run_with_cache(enc_clean, hooks=["resid_pre.1"])
    clean = cache["resid_pre.1"]

    def hand(act, name):
        out = act.clone()
        out[:, [2, -1]] = clean[:, [2, -1]]
        return out

    want = _reference_patch(tiny_hm, enc_corr, "resid_pre.1", hand)
    with tiny_hm.patch("resid_pre.1", clean, positions=[2, -1]):
        got = tiny_hm.forward(enc_corr)
    assert torch.equal(got, want)
    # a value shaped like the selection gives the same
    with tiny_hm.patch("resid_pre.1", clean[:, [2, -1]], positions=[2, -1]):
        assert torch.equal(tiny_hm.forward(enc_corr), want)
    base = tiny_hm.forward(enc_corr)
    assert not torch.allclose(got, base)

    def hand_row(act, name):
        out = act.clone()
        out[1, 3:] = clean[1, 3:]
        return out

    want_row = _reference_patch(tiny_hm, enc_corr, "resid_pre.1", hand_row)
    with tiny_hm.patch("resid_pre.1", clean, rows=1, positions=slice(3, None)):
        got_row = tiny_hm.forward(enc_corr)
    assert torch.equal(got_row, want_row)
    assert torch.equal(got_row[0], base[0])  # the other row is untouched
    assert _no_hooks_left(tiny_hm)


def test_patch_heads_selector_and_function_value(tiny_hm):
    enc = tiny_hm.tokenize("January February March April")
    _, cache = tiny_hm.run_with_cache(enc, hooks=["head_z.1", "v.0"])
    z = cache["head_z.1"]

    def hand(act, name):
        out = act.clone()
        out[:, -1, 2] = 0
        return out

    want = _reference_patch(tiny_hm, enc, "head_z.1", hand)
    with tiny_hm.patch("head_z.1", torch.zeros_like(z), positions=-1, heads=2):
        assert torch.equal(tiny_hm.forward(enc), want)
    # a function: only the selected entries of its output are used
    with tiny_hm.patch("head_z.1", lambda act, name: act * 0, positions=-1, heads=[2]):
        assert torch.equal(tiny_hm.forward(enc), want)
    # k/v count key-value heads
    kv = tiny_hm.cfg.n_kv_heads

    def hand_v(act, name):
        out = act.clone()
        out[:, :, kv - 1] = 0
        return out

    want_v = _reference_patch(tiny_hm, enc, "v.0", hand_v)
    with tiny_hm.patch("v.0", torch.zeros(tiny_hm.cfg.d_head), heads=-1):
        assert torch.equal(tiny_hm.forward(enc), want_v)
    assert _no_hooks_left(tiny_hm)


def test_patch_selector_errors(tiny_hm):
    enc = tiny_hm.tokenize("0 1 2")
    p = enc["input_ids"].shape[1]
    d = tiny_hm.cfg.d_model
    with pytest.raises(ShapeError, match="per-head"):
        with tiny_hm.patch("resid_pre.0", torch.zeros(d), heads=0):
            pass
    with pytest.raises(ShapeError, match="out of range"):
        with tiny_hm.patch("resid_pre.0", torch.zeros(d), positions=p):
            tiny_hm.forward(enc)
    with pytest.raises(ShapeError, match="broadcasts neither"):
        with tiny_hm.patch("resid_pre.0", torch.zeros(1, 2, d + 1), positions=[0]):
            tiny_hm.forward(enc)
    with pytest.raises(ShapeError, match="needs a value"):
        with tiny_hm.patch("resid_pre.0"):
            pass
    assert _no_hooks_left(tiny_hm)


def test_patch_positions_only_in_prompt_forward_of_generate(tiny_hm):
    d = tiny_hm.cfg.d_model
    seen = []
    with (
        tiny_hm.patch("resid_pre.0", torch.full((d,), 3.0), positions=0),
        tiny_hm.hooks([("resid_pre.0", lambda act, name: seen.append(act[:, 0].clone()))]),
    ):
        tiny_hm.generate("0 1 2", max_new_tokens=3)
    assert torch.all(seen[0] == 3.0)  # prompt forward: position 0 patched
    assert all(not torch.all(s == 3.0) for s in seen[1:])  # generated tokens untouched
    assert _no_hooks_left(tiny_hm)


# ---------------------------------------------------------------------------------- cache spellings
def test_cache_answers_every_spelling(tiny_hm):
    n = tiny_hm.cfg.n_layers
    _, cache = tiny_hm.run_with_cache("0 1 2", hooks=["resid_post.-1", "mlp_out.0"])
    assert list(cache) == [hook_name("resid_post", n - 1), "mlp_out.0"]
    assert cache["resid_post.-1"] is cache[hook_name("resid_post", n - 1)]
    assert cache[hook_name("mlp_out", -n)] is cache["mlp_out.0"]
    assert "resid_post.-1" in cache and hook_name("mlp_out", -n) in cache
    assert "resid_post.0" not in cache and "nonsense" not in cache
    assert cache.get("resid_post.-1") is cache[hook_name("resid_post", n - 1)]
    assert cache.get("attn_out.0") is None
    with pytest.raises(KeyError, match="was not cached"):
        cache["attn_out.-1"]
    with pytest.raises(HookPointError, match="valid names"):
        cache["resid_middle.0"]


# ---------------------------------------------------------------------------------- no aliasing
def test_in_place_edit_takes_effect_and_aliases_nothing(tiny_hm):
    enc = tiny_hm.tokenize("The quick brown fox")

    def new_tensor(act, name):
        return act * 0.5

    def in_place_none(act, name):
        act.mul_(0.5)

    def in_place_return(act, name):
        act[:] = act * 0.5
        return act

    want = _reference_patch(tiny_hm, enc, "resid_pre.1", new_tensor)
    for fn in (in_place_none, in_place_return):
        with tiny_hm.patch({"resid_pre.1": fn}):
            assert torch.equal(tiny_hm.forward(enc), want)
        with tiny_hm.hooks([("resid_pre.1", fn)]):
            assert torch.equal(tiny_hm.forward(enc), want)
    # a view-shaped hook point (head_z is a view of the o_proj input) edited in place
    want_z = _reference_patch(tiny_hm, enc, "head_z.0", lambda a, n: a * 0)
    with tiny_hm.patch({"head_z.0": lambda a, n: a.zero_()}):
        assert torch.equal(tiny_hm.forward(enc), want_z)

    # resid_post.0 and resid_pre.1 are the same tensor in the model: an in-place edit at
    # resid_pre.1 must not change what was cached at resid_post.0 earlier in the same forward
    _, plain = tiny_hm.run_with_cache(enc, hooks=["resid_post.0"])
    with tiny_hm.patch({"resid_pre.1": in_place_none}):
        _, cached = tiny_hm.run_with_cache(enc, hooks=["resid_post.0", "resid_pre.1"])
    assert torch.equal(cached["resid_post.0"], plain["resid_post.0"])
    assert torch.allclose(cached["resid_pre.1"], 0.5 * plain["resid_post.0"])

    # a tensor patched in is copied: a later in-place edit downstream leaves the caller's tensor alone
    value = plain["resid_post.0"].clone()
    keep = value.clone()
    with tiny_hm.patch({"resid_post.0": value, "resid_pre.1": in_place_none}):
        tiny_hm.forward(enc)
    assert torch.equal(value, keep)
    assert _no_hooks_left(tiny_hm)


def test_hook_layer_round_trips_hook_name():
    from rosettalens.errors import HookPointError
    from rosettalens.names import LAYER_HOOKS, hook_layer

    for kind in LAYER_HOOKS:
        for layer in (0, 7, -1):
            assert hook_layer(hook_name(kind, layer)) == layer
    for bad in ("embed", "logits", "resid_pre", "resid_pre.x", "blocks.3.hook_resid_pre"):
        with pytest.raises(HookPointError):
            hook_layer(bad)
