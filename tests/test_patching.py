"""patch_sweep against one forward per patch (hm.patch) on tiny models, GQA and Gemma included."""

import itertools

import pytest
import torch

from rosettalens.circuits import PatchResult, patch_sweep
from rosettalens.errors import ConfigError, ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model
from rosettalens.names import hook_name

N_POS = 5
ANS, WRONG = torch.tensor([5, 7]), torch.tensor([9, 11])


def _metric(logits):
    rows = torch.arange(logits.shape[0])
    return logits[rows, -1, ANS] - logits[rows, -1, WRONG]


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt2"])
def hm(request):
    """Llama (GQA 6/2), Gemma 3 (GQA 6/1, post-block norms), GPT-2 (fused qkv, no GQA)."""
    model, tok = tiny_model(request.param, n_layers=2)
    return HookedModel.from_hf(model, tok, name=f"tiny-{request.param}")


def _ids(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 380, (2, N_POS), generator=g)


CLEAN, CORRUPTED = _ids(1), _ids(2)


def _reference(hm, res: PatchResult, clean, corrupted):
    """One forward per patch, each through ``hm.patch`` with selectors (the independent reference)."""
    kind = res.hook
    layers = res.labels["layer"]
    _, cache = hm.run_with_cache(clean, hooks=[hook_name(kind, lay) for lay in layers])
    ref = torch.empty_like(res.values)
    for idx in itertools.product(*[range(s) for s in res.values.shape]):
        lay = layers[idx[0]]
        kw = {}
        if "position" in res.axes:
            kw["positions"] = res.labels["position"][idx[1]]
        if res.axes[-1] in ("head", "kv_head"):
            kw["heads"] = idx[-1]
        with hm.patch(hook_name(kind, lay), cache[hook_name(kind, lay)], **kw):
            ref[idx] = _metric(hm.forward(corrupted)).double().mean()
    return ref


@pytest.mark.parametrize("sweep", ["resid_pre", "attn_out", "mlp_out", "heads", "q", "k", "v"])
def test_sweep_equals_one_forward_per_patch(hm, sweep):
    res = patch_sweep(hm, CLEAN, CORRUPTED, _metric, sweep, max_rows=5)
    c = hm.cfg
    n_heads = c.n_kv_heads if sweep in ("k", "v") else c.n_heads
    want_shape = (
        (c.n_layers, N_POS) if sweep in ("resid_pre", "attn_out", "mlp_out") else (c.n_layers, n_heads)
    )
    assert tuple(res.values.shape) == want_shape
    assert res.per_prompt.shape == (2, *want_shape)
    ref = _reference(hm, res, CLEAN, CORRUPTED)
    assert torch.allclose(res.values, ref, atol=1e-5), (res.values - ref).abs().max()
    # the patches do something (the test could fail), and several patches shared each forward
    assert (ref - res.corrupted_metric).abs().max() > 1e-4
    assert res.meta["forwards"] < res.meta["patches"] * 2


def test_resid_pre_layer0_all_positions_is_clean_and_unpatched_is_corrupted(hm):
    """Known answers: patching resid_pre.0 at every position at once gives the clean run's metric;
    the last layer's MLP output at any position but the last never reaches the last logits."""
    res = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "resid_pre", layers=[0])
    assert torch.allclose(res.clean, _metric(hm.forward(CLEAN)).double(), atol=1e-6)
    assert torch.allclose(res.corrupted, _metric(hm.forward(CORRUPTED)).double(), atol=1e-6)
    with hm.patch("resid_pre.0", hm.run_with_cache(CLEAN, hooks=["resid_pre.0"])[1]["resid_pre.0"]):
        full = _metric(hm.forward(CORRUPTED)).double()
    assert torch.allclose(full, res.clean, atol=1e-5)
    last = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "mlp_out", layers=[-1])
    assert torch.allclose(
        last.values[0, :-1], torch.full((N_POS - 1,), res.corrupted_metric).double(), atol=1e-5
    )


def test_by_position_head_sweeps_and_kv_groups(hm):
    c = hm.cfg
    res = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "k", by_position=True, positions=[-2, -1], layers=[1])
    assert res.axes == ("layer", "position", "kv_head")
    assert tuple(res.values.shape) == (1, 2, c.n_kv_heads)
    assert res.labels["position"] == [N_POS - 2, N_POS - 1]
    g = c.n_heads // c.n_kv_heads
    assert res.kv_groups == {h: list(range(h * g, (h + 1) * g)) for h in range(c.n_kv_heads)}
    assert res.meta["group_size"] == g
    ref = _reference(hm, res, CLEAN, CORRUPTED)
    assert torch.allclose(res.values, ref, atol=1e-5)
    heads = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "heads", by_position=True, positions=[-1], max_rows=4)
    assert heads.axes == ("layer", "position", "head")
    assert torch.allclose(heads.values, _reference(hm, heads, CLEAN, CORRUPTED), atol=1e-5)


def test_memory_budget_sets_rows_per_forward_not_results(hm):
    big = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "attn_out")
    one = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "attn_out", memory_budget=1)
    assert one.meta["rows_per_forward"] == 1 and one.meta["forwards"] == 2 * one.meta["patches"]
    assert big.meta["rows_per_forward"] > one.meta["rows_per_forward"]
    assert torch.allclose(big.values, one.values, atol=1e-5)
    assert hm.active_hook_count() == 0


def test_result_helpers(hm):
    res = patch_sweep(hm, CLEAN[:1], CORRUPTED[:1], lambda lg: lg[:, -1, 5] - lg[:, -1, 9], "resid_pre")
    norm = res.normalized()
    assert torch.allclose(
        norm, (res.values - res.corrupted_metric) / (res.clean_metric - res.corrupted_metric)
    )
    d = res.to_dict()
    assert d["axes"] == ["layer", "position"] and len(d["values"]) == hm.cfg.n_layers
    assert d["labels"]["tokens"] == [hm.tokenizer.decode([int(t)]) for t in CLEAN[0]]
    (where, value), *_ = res.top(3)
    assert value == pytest.approx(float(res.values[where["layer"], where["position"]]))


def test_bad_input(hm):
    with pytest.raises(ShapeError, match="same shape"):
        patch_sweep(hm, CLEAN, CORRUPTED[:, :-1], _metric, "resid_pre")
    with pytest.raises(ConfigError, match="unknown sweep"):
        patch_sweep(hm, CLEAN, CORRUPTED, _metric, "resid_post")
    with pytest.raises(ConfigError, match="out of range"):
        patch_sweep(hm, CLEAN, CORRUPTED, _metric, "resid_pre", layers=[99])
    with pytest.raises(ConfigError, match="by_position"):
        patch_sweep(hm, CLEAN, CORRUPTED, _metric, "mlp_out", by_position=True)
    with pytest.raises(ShapeError, match="one value per prompt"):
        patch_sweep(hm, CLEAN, CORRUPTED, lambda lg: lg[:, -1].sum(), "resid_pre")
    assert hm.active_hook_count() == 0


def test_user_contexts_still_apply_inside_the_sweep(hm):
    """An active ablation applies to clean, corrupted and every patched row alike."""
    d = torch.randn(hm.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with hm.ablate(d):
        res = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "mlp_out", layers=[1])
        ref = _reference(hm, res, CLEAN, CORRUPTED)
    assert torch.allclose(res.values, ref, atol=1e-5)
    plain = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "mlp_out", layers=[1])
    assert not torch.allclose(plain.values, res.values, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "gpt_neox", "qwen2"])
def test_shared_prefix_over_a_sliding_window_equals_full_forwards(family):
    """Prompts longer than Gemma 3's sliding window (8): the KV-cached prefix gives the same values."""
    model, tok = tiny_model(family, n_layers=2)
    hm = HookedModel.from_hf(model, tok)
    g = torch.Generator().manual_seed(3)
    clean, corrupted = (
        torch.randint(0, 380, (2, 12), generator=g),
        torch.randint(0, 380, (2, 12), generator=g),
    )
    res = patch_sweep(hm, clean, corrupted, _metric, "resid_pre", max_rows=6)
    full = patch_sweep(hm, clean, corrupted, _metric, "resid_pre", max_rows=6, reuse_prefix=False)
    assert res.meta["shared_prefix"] and not full.meta["shared_prefix"]
    assert res.meta["token_rows"] < 0.7 * full.meta["token_rows"]
    assert torch.allclose(res.values, full.values, atol=1e-5)
    assert torch.allclose(res.values, _reference(hm, res, clean, corrupted), atol=1e-5)
    heads = patch_sweep(
        hm, clean, corrupted, _metric, "heads", by_position=True, positions=[2, 9, 11], layers=[1]
    )
    assert heads.meta["shared_prefix"]
    assert torch.allclose(heads.values, _reference(hm, heads, clean, corrupted), atol=1e-5)


def test_no_shared_prefix_inside_a_prompt_only_steer(hm):
    """steer(positions="prompt") tells prompt from cached forwards: the sweep then runs full forwards."""
    v = torch.randn(hm.cfg.d_model, generator=torch.Generator().manual_seed(1))
    with hm.steer("resid_pre.0", v, positions="prompt"):
        res = patch_sweep(hm, CLEAN, CORRUPTED, _metric, "resid_pre", layers=[1])
        ref = _reference(hm, res, CLEAN, CORRUPTED)
    assert not res.meta["shared_prefix"]
    assert torch.allclose(res.values, ref, atol=1e-5)


@pytest.mark.real
def test_real_smollm_sweep_equals_loop(smollm):
    enc_c = smollm.tokenize("The months in order: January February March April")["input_ids"]
    enc_x = smollm.tokenize("The months in order: April March January February")["input_ids"]
    assert enc_c.shape == enc_x.shape
    answer, wrong = smollm.tokenizer(" May")["input_ids"][-1], smollm.tokenizer(" March")["input_ids"][-1]

    def metric(logits):
        return logits[:, -1, answer] - logits[:, -1, wrong]

    res = patch_sweep(smollm, enc_c, enc_x, metric, "resid_pre", layers=[0, 15, -1])
    _, cache = smollm.run_with_cache(enc_c, hooks=["resid_pre.0", "resid_pre.15", "resid_pre.-1"])
    for i, lay in enumerate(res.labels["layer"]):
        for j, p in enumerate(res.labels["position"]):
            with smollm.patch(hook_name("resid_pre", lay), cache[hook_name("resid_pre", lay)], positions=p):
                want = float(metric(smollm.forward(enc_x))[0])
            assert res.values[i, j] == pytest.approx(want, abs=2e-4)
    assert res.clean_metric > res.corrupted_metric  # the prompts differ in the way the metric measures


@pytest.mark.parametrize("sweep", ["resid_pre", "heads"])
def test_last_logits_only_gives_the_same_values(hm, sweep):
    seen = []

    def metric(logits):
        seen.append(logits.shape[1])
        return _metric(logits)

    full = patch_sweep(hm, CLEAN, CORRUPTED, _metric, sweep, max_rows=4)
    last = patch_sweep(hm, CLEAN, CORRUPTED, metric, sweep, max_rows=4, last_logits_only=True)
    assert set(seen) == {1} and last.meta["last_logits_only"]
    assert torch.allclose(full.values, last.values, atol=1e-5)
    assert torch.allclose(full.clean, last.clean) and torch.allclose(full.corrupted, last.corrupted)
