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
