"""Conditional ablation (rosettalens.steering.conditional) against the unconditional ablation it gates
(``hm.ablate`` restricted to the same hooks) and the unsteered model, on tiny random models."""

import pytest
import torch

from rosettalens.errors import ConfigError, HookPointError, ShapeError
from rosettalens.steering.conditional import calibrate_threshold, conditional_ablate, gate_scores

TEXTS = ["the cat sat on the mat", "a b", "one two three four five six", "hello"]


def _late_hooks(hm, layer):
    return [f"{k}.{L}" for L in range(layer, hm.cfg.n_layers) for k in ("resid_pre", "attn_out", "mlp_out")]


def _direction(hm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hm.cfg.d_model, generator=g)


@pytest.mark.parametrize("pool", ["max", "last"])
def test_gate_scores_match_each_text_alone(tiny_hm, pool):
    """The batch is left-padded; the score of each row must ignore its pads: equal to the text run alone."""
    v, layer = _direction(tiny_hm), 1
    got = gate_scores(tiny_hm, TEXTS, v, layer, pool=pool, batch_size=4)
    u = v.double() / v.double().norm()
    for i, t in enumerate(TEXTS):
        _, cache = tiny_hm.run_with_cache([t], hooks=[f"resid_pre.{layer}"])
        proj = cache[f"resid_pre.{layer}"][0].double() @ u.to(cache[f"resid_pre.{layer}"].device)
        want = proj.max() if pool == "max" else proj[-1]
        assert float(got[i]) == pytest.approx(float(want), rel=1e-4, abs=1e-4)
    with pytest.raises(ConfigError, match="pool"):
        gate_scores(tiny_hm, TEXTS, v, layer, pool="mean")


@pytest.mark.parametrize("pool", ["max", "last"])
def test_flagged_rows_equal_ablation_and_the_rest_are_untouched(tiny_hm, pool):
    v, layer = _direction(tiny_hm, 1), 1
    scores = gate_scores(tiny_hm, TEXTS, v, layer, pool=pool)
    thr = float(scores.median())  # some rows above, some below
    flagged = scores > thr
    assert 0 < int(flagged.sum()) < len(TEXTS)
    enc = tiny_hm.tokenize(TEXTS)
    with torch.no_grad():
        base = tiny_hm.forward(enc["input_ids"], attention_mask=enc["attention_mask"])
        with tiny_hm.ablate(v, hooks=_late_hooks(tiny_hm, layer)):
            abl = tiny_hm.forward(enc["input_ids"], attention_mask=enc["attention_mask"])
        rec: list = []
        with conditional_ablate(tiny_hm, v, layer, thr, pool=pool, record=rec):
            got = tiny_hm.forward(enc["input_ids"], attention_mask=enc["attention_mask"])
    assert torch.equal(rec[0], flagged)
    m = enc["attention_mask"].bool()
    for i in range(len(TEXTS)):
        want = abl[i] if flagged[i] else base[i]
        if flagged[i]:
            torch.testing.assert_close(got[i][m[i]], want[m[i]], rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(got[i][m[i]], want[m[i]])  # bit for bit the unsteered model
    assert (got[flagged] - base[flagged]).abs().max() > 1e-3  # the ablation did something
    assert tiny_hm.active_hook_count() == 0


def test_flags_hold_for_generated_tokens(tiny_hm):
    """Threshold -inf flags every row: generation equals the ablated model's at every step; +inf
    flags none: the unsteered model's."""
    v, layer = _direction(tiny_hm, 2), 1
    prompts = TEXTS[:3]
    base = tiny_hm.generate(prompts, max_new_tokens=6)
    with tiny_hm.ablate(v, hooks=_late_hooks(tiny_hm, layer)):
        abl = tiny_hm.generate(prompts, max_new_tokens=6)
    rec: list = []
    with conditional_ablate(tiny_hm, v, layer, float("-inf"), record=rec):
        on = tiny_hm.generate(prompts, max_new_tokens=6)
    with conditional_ablate(tiny_hm, v, layer, float("inf")):
        off = tiny_hm.generate(prompts, max_new_tokens=6)
    assert on == abl and off == base
    assert len(rec) == 1 and bool(rec[0].all())  # decided once, on the prompt pass


def test_calibrate_threshold_known_answers():
    assert calibrate_threshold(torch.tensor([1.0, 3.0, 2.0])) == 3.0
    assert calibrate_threshold(torch.tensor([1.0, 3.0]), margin=1.5) == pytest.approx(4.5)
    assert calibrate_threshold(torch.tensor([-2.0, -4.0]), margin=1.5) == pytest.approx(-1.0)
    with pytest.raises(ConfigError):
        calibrate_threshold(torch.tensor([]))
    with pytest.raises(ConfigError):
        calibrate_threshold(torch.tensor([1.0]), margin=0.5)


def test_bad_direction_or_layer(tiny_hm):
    with pytest.raises(ShapeError):
        with conditional_ablate(tiny_hm, torch.ones(tiny_hm.cfg.d_model + 1), 1, 0.0):
            pass
    with pytest.raises(ShapeError):
        gate_scores(tiny_hm, TEXTS, torch.zeros(tiny_hm.cfg.d_model), 1)
    with pytest.raises(HookPointError):
        gate_scores(tiny_hm, TEXTS, torch.ones(tiny_hm.cfg.d_model), tiny_hm.cfg.n_layers + 5)
    assert tiny_hm.active_hook_count() == 0


def test_teacher_forced_kl_lets_only_the_prompt_decide(tiny_hm):
    """clean_kl scores prompt + response in one pass; the gate must decide on the prompt alone (as in
    generation). The direction is a *response* position's activation, so a full-sequence detector
    would fire on that row while no prompt reaches the threshold: KL exactly 0; with every row
    flagged, the ablation moves the distributions (KL > 0)."""
    from rosettalens.organisms import clean_kl
    from rosettalens.organisms.data import prompt_ids

    prompts = ["the cat sat on the mat", "a b c"]
    resp = [[5, 9, 13, 7], [11, 4, 8]]
    layer = 1
    hook = f"resid_pre.{layer}"
    pids = prompt_ids(tiny_hm, prompts)
    _, cache = tiny_hm.run_with_cache(torch.tensor([pids[0] + resp[0]]), hooks=[hook])
    v = cache[hook][0, -1].double().cpu()
    u = v / v.norm()
    top = max(float((tiny_hm.run_with_cache(torch.tensor([p]), hooks=[hook])[1][hook][0].double().cpu() @ u).max())
              for p in pids)  # fmt: skip
    assert float(cache[hook][0, -1].double().cpu() @ u) > top  # a full-sequence detector would fire
    thr = top + 1e-6 * abs(top)
    gated = clean_kl(tiny_hm, tiny_hm, prompts, responses=resp,
                     intervention=lambda: conditional_ablate(tiny_hm, v, layer, thr))  # fmt: skip
    assert gated["clean_kl"] == pytest.approx(0.0, abs=1e-9)
    always = clean_kl(tiny_hm, tiny_hm, prompts, responses=resp,
                      intervention=lambda: conditional_ablate(tiny_hm, v, layer, float("-inf")))  # fmt: skip
    assert always["clean_kl"] > 1e-6
    assert tiny_hm.active_hook_count() == 0
