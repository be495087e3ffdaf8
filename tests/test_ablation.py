"""Zero / mean / resample ablation contexts (rosettalens.circuits.ablation) against hand-made patches."""

from __future__ import annotations

import pytest
import torch

from rosettalens.circuits.ablation import (
    Ablator,
    all_heads,
    mean_ablate,
    parse_head,
    resample_ablate,
    zero_ablate,
)
from rosettalens.errors import ConfigError, ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hm(request) -> HookedModel:
    model, tok = tiny_model(request.param)
    return HookedModel.from_hf(model, tok, name=f"tiny-{request.param}")


def _ids(n: int, pos: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 300, (n, pos), generator=torch.Generator().manual_seed(seed))


def _head_patch(values: dict[int, torch.Tensor]):
    """fn for head_z: replace head h by values[h] (broadcast)."""

    def fn(act, name):
        out = act.clone()
        for h, v in values.items():
            out[:, :, h] = v.expand_as(out[:, :, h])
        return out

    return fn


def test_zero_ablation_equals_a_zero_patch(hm):
    ids = _ids(3)
    with zero_ablate(hm, heads=["1.2", "1.4", "0.0"], mlps=[2]):
        got = hm.forward(ids)
        assert hm.active_hook_count() > 0
    assert hm.active_hook_count() == 0
    zero = torch.zeros(())
    with hm.patch(
        {
            "head_z.0": _head_patch({0: zero}),
            "head_z.1": _head_patch({2: zero, 4: zero}),
            "mlp_out.2": torch.zeros(hm.cfg.d_model),
        }
    ):
        ref = hm.forward(ids)
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, hm.forward(ids))


def test_mean_ablation_per_position_and_pooled(hm):
    ids, ref_ids = _ids(3, seed=1), _ids(5, seed=2)
    _, cache = hm.run_with_cache(ref_ids, hooks=["head_z.1", "mlp_out.0"])
    z_mean = cache["head_z.1"].mean(0)  # [pos, heads, d_head]
    m_mean = cache["mlp_out.0"].mean(0)  # [pos, d_model]
    with mean_ablate(hm, heads=["1.3"], mlps=[0], reference=ref_ids):
        got = hm.forward(ids)
    with hm.patch({"head_z.1": _head_patch({3: z_mean[:, 3]}), "mlp_out.0": m_mean}):
        ref = hm.forward(ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # pooled over positions, padding excluded from the mean
    mask = torch.ones_like(ref_ids)
    mask[:2, :2] = 0
    _, cache = hm.run_with_cache(ref_ids, hooks=["mlp_out.0"], attention_mask=mask)
    acts = cache["mlp_out.0"][mask.bool()]  # [n_real_tokens, d_model]
    with mean_ablate(hm, mlps=[0], reference=ref_ids, reference_mask=mask, per_position=False):
        got = hm.forward(ids[:, :4])  # any length
    with hm.patch({"mlp_out.0": acts.double().mean(0).float()}):
        ref = hm.forward(ids[:, :4])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_resample_with_rows_is_patching_from_those_rows(hm):
    ids, ref_ids = _ids(3, seed=3), _ids(4, seed=4)
    rows = torch.tensor([2, 0, 2])
    _, cache = hm.run_with_cache(ref_ids[rows], hooks=["head_z.2", "mlp_out.1"])
    with resample_ablate(hm, heads=["2.5"], mlps=[1], reference=ref_ids, rows=rows):
        got = hm.forward(ids)

    def fn(act, name):
        out = act.clone()
        out[:, :, 5] = cache["head_z.2"][:, :, 5]
        return out

    with hm.patch({"head_z.2": fn, "mlp_out.1": cache["mlp_out.1"]}):
        ref = hm.forward(ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_random_resample_is_seeded_and_shares_rows_across_components(hm):
    ids, ref_ids = _ids(4, seed=5), _ids(6, seed=6)
    ab = Ablator(hm, "resample", ref_ids, seed=7)
    with ab.ablate(heads=["0.1", "2.2"], mlps=[1]):
        a = hm.forward(ids)
    with ab.ablate(heads=["0.1", "2.2"], mlps=[1]):
        b = hm.forward(ids)
    torch.testing.assert_close(a, b)  # reproducible per block
    drawn = torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(7))
    with ab.ablate(heads=["0.1", "2.2"], mlps=[1], rows=drawn):
        c = hm.forward(ids)
    torch.testing.assert_close(a, c)  # one draw per forward, for every component
    with Ablator(hm, "resample", ref_ids, seed=8).ablate(heads=["0.1", "2.2"], mlps=[1]):
        d = hm.forward(ids)
    assert not torch.allclose(a, d)


def test_hooks_removed_on_error(hm):
    with pytest.raises(RuntimeError, match="boom"):
        with zero_ablate(hm, heads=["0.0"]):
            raise RuntimeError("boom")
    assert hm.active_hook_count() == 0


def test_component_names_and_bad_input(hm):
    assert parse_head(hm, "-1.2") == (hm.cfg.n_layers - 1, 2)
    assert len(all_heads(hm)) == hm.cfg.n_layers * hm.cfg.n_heads
    with pytest.raises(ConfigError):
        parse_head(hm, "1")
    with pytest.raises(ConfigError):
        parse_head(hm, f"0.{hm.cfg.n_heads}")
    with pytest.raises(ConfigError):
        Ablator(hm, "median")
    with pytest.raises(ConfigError):
        Ablator(hm, "mean")  # no reference
    with pytest.raises(ConfigError):
        Ablator(hm, "zero", _ids(2))
    with pytest.raises(ConfigError):
        with zero_ablate(hm, mlps=[hm.cfg.n_layers]):
            pass
    ab = Ablator(hm, "mean", _ids(3, pos=5))
    with pytest.raises(ShapeError):  # per-position means need the reference's length
        with ab.ablate(heads=["0.0"]):
            hm.forward(_ids(2, pos=6))
    with pytest.raises(ShapeError):
        Ablator(hm, "resample", _ids(3), reference_mask=torch.zeros(3, 6))
    with pytest.raises(ShapeError):
        with Ablator(hm, "resample", _ids(3)).ablate(mlps=[0], rows=[0, 5]):
            pass
    assert hm.active_hook_count() == 0
