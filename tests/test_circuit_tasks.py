"""Sequence tasks: prompts, corrupted twins, single-token checks, metric, competence, task files."""

import json

import pytest
import torch

from rosettalens.circuits.tasks import (
    BUILTIN_TASKS,
    AnswerMetric,
    PromptSet,
    SequenceTask,
    answer_forms,
    competence,
    load_task,
    load_task_file,
    make_prompts,
    prompt_ids,
    select_tasks,
)
from rosettalens.errors import DataError, ShapeError
from rosettalens.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _letters(tok, n=9):
    """Capital letters that are one token in the tiny tokenizer (as answers)."""
    _, ok, _ = answer_forms(tok, [chr(65 + i) for i in range(26)])
    return [m for m in (chr(65 + i) for i in range(26)) if m in ok][:n]


def test_builtin_tasks_load():
    for name in BUILTIN_TASKS:
        t = load_task(name)
        assert t.items(), name
    digits = load_task("digits")
    shown, ans, last = digits.items()[0]
    assert shown == ["0", "1", "2", "3"] and ans == "4" and last == "3"
    inter = load_task("interval-digits")
    assert inter.items()[0] == (["0", "2", "4"], "6", "4")
    add = load_task("addition")
    assert all(int(a) + int(b) == int(ans) and last == b for (a, b), ans, last in add.items())
    with pytest.raises(DataError, match="unknown task"):
        load_task("fibonacci")


def test_prompts_equal_length_answer_is_next_token(tok):
    members = _letters(tok)
    task = SequenceTask("letters", members, templates=["{1} {2} {3} {4}", "so {1} {2} {3} {4}"])
    ps = make_prompts(tok, task, n=12, seed=1)
    n, pos = ps.clean_ids.shape
    assert n == len(ps) and ps.corrupted_ids.shape == (n, pos)
    assert ps.tokenization["answer_form"] == "split"
    for i in range(n):
        # the answer is exactly the token that follows the prompt in the tokenization of prompt + answer
        full = tok(ps.texts[i] + " " + ps.answers[i])["input_ids"]
        assert full == ps.clean_ids[i].tolist() + [int(ps.answer_ids[i])]
        assert ps.lasts[i] == members[members.index(ps.answers[i]) - 1]
        # member positions hold the shown members' tokens
        shown = ps.texts[i].split()[-4:]
        got = [tok.convert_ids_to_tokens(int(ps.clean_ids[i, p])) for p in ps.member_positions[i]]
        assert got == shown
        # corrupted: the same template with other members, not ending in order
        c = ps.corrupted_texts[i].split()[-4:]
        assert all(m in members for m in c)
        assert members.index(c[-1]) - members.index(c[-2]) != 1
    assert len(set(ps.texts)) == n


def test_prompt_ids_reads_one_tokenizers_prompts_with_another(tok):
    members = _letters(tok)
    task = SequenceTask("letters", members, templates=["{1} {2} {3} {4}", "so {1} {2} {3} {4}"])
    ps = make_prompts(tok, task, n=12, seed=1)
    # read by the tokenizer that made them: make_prompts' own ids
    assert prompt_ids(tok, task, ps.texts, ps.answers) == [r.tolist() for r in ps.clean_ids]
    other = tiny_tokenizer(add_bos=False)  # the same text, no BOS: every id list one shorter
    got = prompt_ids(other, task, ps.texts, ps.answers)
    for g, ids, text, ans in zip(got, ps.clean_ids, ps.texts, ps.answers, strict=True):
        assert g == ids.tolist()[1:]
        assert other(text + " " + ans)["input_ids"][: len(g)] == g  # the answer is the next token
    # an answer that is no single token for the reader: None
    assert prompt_ids(other, task, ps.texts[:2], ["not-a-member", ps.answers[1]]) == [None, got[1]]


def test_not_single_token_reported_and_strict_refuses(tok):
    members = _letters(tok, 7) + ["fox"]
    task = SequenceTask("mixed", members, templates=["{1} {2} {3} {4}"])
    ps = make_prompts(tok, task, n=8)
    assert "fox" in ps.tokenization["not_single_token"]
    assert "fox" not in ps.tokenization["usable_members"]
    assert all("fox" not in t for t in ps.texts)
    with pytest.raises(DataError, match="not a single token"):
        make_prompts(tok, task, n=8, strict=True)
    bad = SequenceTask("words", ["quick", "brown", "lazy", "jumps", "over"], templates=["{1} {2} {3} {4}"])
    with pytest.raises(DataError, match="no prompt can be made"):
        make_prompts(tok, bad, n=4)


def test_metric_against_hand_computed():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    a, b = torch.tensor([1, 4, 7]), torch.tensor([2, 2, 0])
    m = AnswerMetric(a, b)
    want = torch.stack([logits[i, -1, a[i]] - logits[i, -1, b[i]] for i in range(3)])
    assert torch.allclose(m(logits), want)
    # rows of a chunk
    assert torch.allclose(m(logits[1:], torch.tensor([1, 2])), want[1:])
    # the set stacked twice (batched patching)
    assert torch.allclose(m(torch.cat([logits, logits])), torch.cat([want, want]))
    p = AnswerMetric(a, b, kind="prob")(logits)
    assert torch.allclose(p, torch.stack([logits[i, -1].softmax(-1)[a[i]] for i in range(3)]))
    with pytest.raises(ShapeError):
        m(torch.randn(4, 5, 11))
    with pytest.raises(ShapeError):
        AnswerMetric(a, b, kind="kl")


class _FixedModel:
    """Stands in for a HookedModel: returns given last-position logits."""

    def __init__(self, last):
        self.last = last

    def forward(self, ids):
        return self.last[: ids.shape[0]].unsqueeze(1).expand(-1, ids.shape[1], -1)


def test_competence_filter_rule():
    ids = torch.zeros(4, 3, dtype=torch.long)
    ans, last = torch.tensor([1, 1, 1, 1]), torch.tensor([2, 2, 2, 2])
    logp = torch.log(
        torch.tensor(
            [
                [0.1, 0.6, 0.2, 0.1],  # top-1 and 0.6 > 2*0.2: kept
                [0.1, 0.45, 0.3, 0.15],  # top-1 but 0.45 < 0.6: dropped
                [0.1, 0.3, 0.1, 0.5],  # not top-1: dropped
                [0.05, 0.7, 0.05, 0.2],  # kept
            ]
        )
    )
    ps = PromptSet("t", ["a"] * 4, ["b"] * 4, ids, ids, ans, last, ["x"] * 4, ["y"] * 4, [0] * 4)
    mask, stats = competence(_FixedModel(logp), ps)
    assert mask.tolist() == [True, False, False, True]
    assert stats["competence"] == 0.5 and stats["top1"] == 0.75 and stats["n_kept"] == 2


def test_task_file(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"name": "planets", "members": ["Mercury", "Venus", "Earth", "Mars", "Jupiter"],
                             "templates": ["{name} saw {1}, {2} and {3}, then"], "k": 3}))  # fmt: skip
    (t,) = load_task_file(p)
    assert t.name == "planets" and t.k == 3 and len(t.items()) == 2
    p.write_text(
        json.dumps(
            [
                {"name": "a", "members": ["x", "y", "z"], "k": 2},
                {"name": "b", "members": ["1", "2", "3"], "k": 2},
            ]
        )
    )
    assert [t.name for t in load_task_file(p)] == ["a", "b"]
    for bad, msg in [
        ("{", "not valid JSON"),
        (json.dumps({"members": ["a", "b"]}), "needs 'name'"),
        (json.dumps({"name": "x", "members": ["a", "b", "c"], "k": 2, "templates": ["{1} then"]}), "must hold"),
        (json.dumps({"name": "x", "members": ["a", "b", "c"], "k": 2, "templates": ["{1} {2} {who}"]}), "unknown placeholders"),
        (json.dumps({"name": "x", "members": ["a", "a", "c"], "k": 2}), "repeated members"),
        (json.dumps({"name": "x", "members": ["a", "b"], "k": 4}), "too few"),
        (json.dumps({"name": "x", "members": ["a", "b", "c"], "colour": 1}), "unknown task fields"),
    ]:  # fmt: skip
        p.write_text(bad)
        with pytest.raises(DataError, match=msg):
            load_task_file(p)
    with pytest.raises(DataError, match="cannot read"):
        load_task_file(tmp_path / "missing.json")


def test_task_file_k_is_what_the_templates_show(tmp_path):
    planets = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"]
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"name": "planets", "members": planets,
                             "templates": ["{name} saw {1}, {2} and {3}, then", "{1} {2} {3}"]}))  # fmt: skip
    (t,) = load_task_file(p)
    # three members shown: each item is 3 consecutive members and the one after them
    assert t.k == 3
    assert t.items() == [(planets[i : i + 3], planets[i + 3], planets[i + 2]) for i in range(3)]
    p.write_text(json.dumps({"name": "planets", "members": planets}))  # no templates: the built-in k
    assert load_task_file(p)[0].k == 4
    p.write_text(json.dumps({"name": "planets", "members": planets, "templates": ["{1} {2}", "{1} {2} {3}"]}))
    with pytest.raises(DataError, match="different numbers of members"):
        load_task_file(p)


def test_tasks_name_the_task_files_own_tasks(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps([{"name": "a", "members": ["x", "y", "z", "w"], "templates": ["{1} {2}"]},
                             {"name": "b", "members": ["1", "2", "3", "4"], "templates": ["{1} {2}"]}]))  # fmt: skip
    # named: only those, in the given order, built-ins and file tasks mixed
    assert [t.name for t in select_tasks(["b", "digits"], p)] == ["b", "digits"]
    assert select_tasks(["b"], p)[0].members == ["1", "2", "3", "4"]
    # not named: the file adds every one of its tasks
    assert [t.name for t in select_tasks(["months"], p)] == ["months", "a", "b"]
    assert [t.name for t in select_tasks([], p)] == ["a", "b"]
    with pytest.raises(DataError, match="unknown task 'c'"):
        select_tasks(["c"], p)


def test_names_need_single_token_names(tok):
    task = SequenceTask("letters", _letters(tok), templates=["{name1} got {1}. {name2} got {2}. {name3} got {3}. {name4} got {4}. {name5} got"])  # fmt: skip
    with pytest.raises(DataError, match="single-token names"):
        make_prompts(tok, task, n=4)


@pytest.mark.real
def test_smollm_competence_on_digits(smollm):
    ps = make_prompts(smollm, load_task("digits"), n=16)
    assert ps.tokenization["answer_form"] == "split"  # SmolLM2 writes " 5" as " " + "5"
    assert ps.tokenization["not_single_token"] == {}
    mask, stats = competence(smollm, ps)
    assert stats["competence"] >= 0.6, stats
    nw = make_prompts(smollm, load_task("number-words"), n=8)
    assert nw.tokenization["answer_form"] == "space"
