"""Head roles on the hand-built planted model (tests/test_pruning.py): known successor / copy heads,
known attention patterns."""

import pytest
import torch

from rosettalens.circuits.roles import head_roles, member_attention, ov_logits, successor_scores
from rosettalens.circuits.tasks import SequenceTask, make_prompts
from rosettalens.errors import DataError
from test_pruning import MEMBERS, planted_model


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def test_ov_logits_equal_hand_computed_ov_circuit(planted):
    """Head 1.2's OV circuit by hand from the weights: LN(embedding) @ W_V @ W_O -> ln_f -> unembed."""
    m = planted.model
    tok = planted.tokenizer
    ids = [tok.convert_tokens_to_ids(x) for x in MEMBERS]
    got = ov_logits(planted, ids, layers=[1])[1]  # [H, n, vocab]
    d, dh = 48, 8
    with torch.no_grad():
        x = m.transformer.h[1].ln_1(m.transformer.wte.weight[ids])  # layer 0 writes nothing
        W = m.transformer.h[1].attn.c_attn.weight
        v = x @ W[:, 2 * d + 2 * dh : 2 * d + 3 * dh]
        o = v @ m.transformer.h[1].attn.c_proj.weight[2 * dh : 3 * dh]
        want = m.lm_head(m.transformer.ln_f(o))
    assert torch.allclose(got[2], want, atol=1e-4)


def test_successor_and_copy_scores_known_answer(planted):
    task = SequenceTask("letters", MEMBERS, templates=["{1} {2} {3} {4}"])
    succ, copy = successor_scores(planted, task)
    assert succ.shape == copy.shape == (3, 6)
    assert succ[1, 2] == 1.0 and copy[1, 2] == 0.0  # successor head: H -> no successor, left out
    assert copy[2, 0] == 1.0 and succ[2, 0] == 0.0  # copy head
    assert float(succ[1, 2]) == float(succ.max())
    only = successor_scores(planted, task, layers=[1])[0]
    assert torch.isnan(only[0]).all() and only[1, 2] == 1.0


def test_member_attention_known_patterns(planted):
    task = SequenceTask("letters", MEMBERS, templates=["then {1} and {2} and {3} and {4}"])
    ps = make_prompts(planted, task, n=8)
    att = member_attention(planted, ps, batch_size=3)
    assert att.shape == (3, 6)
    # heads with zero query/key weights attend uniformly: 4 members among 8 tokens
    assert att[0, 0] == pytest.approx(0.5, abs=1e-5)
    assert att[1, 0] == pytest.approx(0.5, abs=1e-5)
    # the planted successor head attends to the current token, the last member
    assert att[1, 2] > 0.99
    roles = head_roles(planted, task, ps, heads=["1.2", "2.0"])
    assert roles["1.2"]["successor"] == 1.0 and roles["1.2"]["member_attention"] > 0.99
    assert set(roles) == {"1.2", "2.0"}


def test_no_usable_member(planted):
    with pytest.raises(DataError):
        successor_scores(planted, SequenceTask("x", ["q1", "q2", "q3"], k=2))


def _r(s: float, c: float, a: float) -> dict[str, float]:
    return {"successor": s, "copy": c, "member_attention": a}


def test_role_label_takes_the_best_score_above_the_floor():
    from rosettalens.circuits.roles import role_label

    assert role_label(_r(0.6, 0.1, 0.3)) == "successor"
    assert role_label(_r(0.0, 0.0, 0.8)) == "member_attention"
    assert role_label(_r(0.1, 0.05, 0.15), min_score=0.2) == "unassigned"
    assert role_label(_r(0.1, 0.05, 0.15), min_score=0.1) == "member_attention"
    with pytest.raises(DataError):
        role_label({"other": 1.0})


def test_match_roles_cutoff_unassigned_and_null():
    """Known answer: model A's two heads are a successor and a member-attention head, model B has the
    same two roles (swapped order) plus a copy head; a head pair farther than the cutoff is not a match,
    two role-less heads matched at distance 0 do not 'share a role'."""
    from rosettalens.circuits.roles import match_roles

    ra = {"3.1": _r(0.9, 0.0, 0.1), "5.0": _r(0.0, 0.1, 0.8), "6.2": _r(0.0, 0.0, 0.0)}
    rb = {"2.0": _r(0.0, 0.1, 0.7), "4.3": _r(0.85, 0.05, 0.1), "7.1": _r(0.0, 0.0, 0.01)}
    m = match_roles(ra, rb, min_score=0.2, max_distance=0.25)
    by = {tuple(p["heads"]): p for p in m["pairs"]}
    assert set(by) == {("3.1", "4.3"), ("5.0", "2.0"), ("6.2", "7.1")}  # the Hungarian optimum
    assert by[("3.1", "4.3")]["same_role"] and by[("3.1", "4.3")]["roles"] == ["successor", "successor"]
    assert by[("5.0", "2.0")]["same_role"]
    assert by[("6.2", "7.1")]["matched"] and not by[("6.2", "7.1")]["same_role"]  # both unassigned
    assert by[("6.2", "7.1")]["roles"] == ["unassigned", "unassigned"]
    assert m["n_same_role"] == 2 and m["n_matched"] == 3
    d = ((0.9 - 0.85) ** 2 + 0.05**2) ** 0.5
    assert by[("3.1", "4.3")]["role_distance"] == pytest.approx(d)
    # a tighter cutoff unmatches the farther pair (5.0/2.0 at distance ~0.1)
    m2 = match_roles(ra, rb, min_score=0.2, max_distance=0.08)
    assert m2["n_same_role"] == 1 and "5.0" in m2["unmatched"][0] and "2.0" in m2["unmatched"][1]

    # null: in pools where every other head has no role, two role-sharing heads are rare by chance
    pool_a = {**ra, **{f"9.{i}": _r(0.0, 0.0, 0.0) for i in range(30)}}
    pool_b = {**rb, **{f"8.{i}": _r(0.0, 0.0, 0.0) for i in range(30)}}
    m3 = match_roles(ra, rb, null_a=pool_a, null_b=pool_b, n_null=400, seed=1)
    assert m3["p_value"] < 0.05 and m3["null_mean_same_role"] < 0.5
    # and where every pool head is a successor head, the same two pairs are no surprise
    pool_a = {**ra, **{f"9.{i}": _r(0.9, 0.0, 0.1) for i in range(30)}}
    pool_b = {**rb, **{f"8.{i}": _r(0.9, 0.0, 0.1) for i in range(30)}}
    m4 = match_roles(ra, rb, null_a=pool_a, null_b=pool_b, n_null=400, seed=1)
    assert m4["p_value"] > 0.5
