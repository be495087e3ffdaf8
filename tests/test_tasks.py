"""Built-in harmful/harmless prompt sets, deterministic splits, user files and hf: errors."""

from __future__ import annotations

import json
import sys

import pytest

from rosettalens.data.tasks import (
    BUILTIN_SETS,
    assign_splits,
    load_prompt_records,
    load_prompts,
)
from rosettalens.errors import DataError, RosettaError


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_builtin_sizes_categories_and_unique(name):
    recs = load_prompt_records(name)
    assert len(recs) >= 320
    cats = {r.category for r in recs}
    assert len(cats) >= 12
    # every category has a decent number of prompts
    for c in cats:
        assert sum(r.category == c for r in recs) >= 15
    texts = [r.text for r in recs]
    assert len(set(texts)) == len(texts)
    assert len({t.lower().strip(" ?.!") for t in texts}) == len(texts)  # no near-trivial duplicates
    ids = [r.id for r in recs]
    assert len(set(ids)) == len(ids) and all(ids)


def test_harmful_and_harmless_disjoint_and_look_right():
    harmful = set(load_prompts("harmful"))
    harmless = set(load_prompts("harmless"))
    assert not harmful & harmless
    assert {"weapons", "cybercrime", "drugs", "fraud", "harassment", "self-harm", "privacy"} <= {
        r.category for r in load_prompt_records("harmful")
    }
    assert {"cooking", "coding", "science", "travel", "writing", "math", "history"} <= {
        r.category for r in load_prompt_records("harmless")
    }


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_splits_partition_stratified_and_deterministic(name):
    allr = load_prompt_records(name)
    parts = {s: load_prompt_records(name, s) for s in ("train", "val", "test")}
    texts = {s: {r.text for r in recs} for s, recs in parts.items()}
    # partition: no overlap, union is everything
    assert not texts["train"] & texts["val"]
    assert not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]
    assert texts["train"] | texts["val"] | texts["test"] == {r.text for r in allr}
    # every category present in every split; proportions ~60/20/20
    cats = {r.category for r in allr}
    for s, recs in parts.items():
        assert {r.category for r in recs} == cats, s
    n = len(allr)
    assert abs(len(parts["train"]) - 0.6 * n) <= len(cats)
    assert abs(len(parts["val"]) - 0.2 * n) <= len(cats)
    # same records on every call
    assert [(r.text, r.split) for r in load_prompt_records(name)] == [(r.text, r.split) for r in allr]


def _items(n, cats="abc", prefix="prompt number"):
    return [(f"{prefix} {i}", cats[i % len(cats)]) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40, 101])
def test_split_properties(n):
    items = _items(n)
    got = assign_splits(items)
    assert got == assign_splits(list(items))  # deterministic
    assert len(got) == n and set(got) <= {"train", "val", "test"}  # each item in exactly one split
    for c in {c for _, c in items}:
        mine = [s for (_, cc), s in zip(items, got) if cc == c]
        k = len(mine)
        if k >= 3:  # every split used, about 60 / 20 / 20
            assert {"train", "val", "test"} == set(mine)
            assert abs(mine.count("train") - 0.6 * k) <= 1.5 and abs(mine.count("val") - 0.2 * k) <= 1.5


def test_split_is_stratified_other_categories_untouched():
    # adding prompts to one category never moves a prompt of another category
    items = _items(60)
    before = assign_splits(items)
    more = items + [(f"new prompt {j}", "a") for j in range(25)]
    after = assign_splits(more)[:60]
    assert [s for (_, c), s in zip(items, before) if c != "a"] == [
        s for (_, c), s in zip(items, after) if c != "a"
    ]


@pytest.mark.xfail(
    strict=True,
    reason="known limitation of data/tasks.assign_splits: splits are ranks within a category "
    "(first round(0.6 n) by hash are train), so appending prompts shifts the boundaries and moves "
    "existing prompts between splits",
)
def test_split_is_stable_under_appending_prompts():
    items = _items(60)
    before = assign_splits(items)
    for extra in range(1, 10):
        more = items + _items(extra, prefix="new prompt")
        assert assign_splits(more)[:60] == before, extra


def test_split_does_not_depend_on_order():
    items = [(f"prompt number {i}", "abc"[i % 3]) for i in range(40)]
    a = dict(zip([t for t, _ in items], assign_splits(items)))
    rev = items[::-1]
    b = dict(zip([t for t, _ in rev], assign_splits(rev)))
    assert a == b


def test_limit_is_balanced_over_categories():
    recs = load_prompt_records("harmful", "train", limit=32)
    assert len(recs) == 32
    counts = {}
    for r in recs:
        counts[r.category] = counts.get(r.category, 0) + 1
    assert len(counts) == 16 and set(counts.values()) == {2}


def test_builtin_jsonl_files_are_well_formed():
    for path in BUILTIN_SETS.values():
        with path.open(encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                assert set(obj) == {"id", "category", "text"}
                assert obj["text"] == obj["text"].strip() and obj["text"]


def test_user_txt_and_jsonl_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \nthird\n", encoding="utf-8")
    assert load_prompts(txt) == ["first prompt", "second prompt", "third"]
    jl = tmp_path / "p.jsonl"
    rows = [{"text": "a"}, {"prompt": "b"}, {"instruction": "c", "category": "x"}, "d"]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    recs = load_prompt_records(str(jl))
    assert [r.text for r in recs] == ["a", "b", "c", "d"]
    assert recs[2].category == "x" and recs[0].category == "all"


@pytest.mark.parametrize("content", ["", "\n  \n", "{}\n"])
def test_empty_or_bad_file_is_typed_error(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError):
        load_prompts(p)
    t = tmp_path / "empty.txt"
    t.write_text(content.replace("{}", ""), encoding="utf-8")
    with pytest.raises(DataError):
        load_prompts(t)


def test_missing_file_unknown_name_bad_split():
    with pytest.raises(DataError, match="not found"):
        load_prompts("/nonexistent/prompts.txt")
    with pytest.raises(DataError, match="unknown prompt set"):
        load_prompts("harmfull")
    with pytest.raises(DataError, match="unknown split"):
        load_prompts("harmful", "validation")


def test_hf_without_datasets_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(RosettaError) as ei:
        load_prompts("hf:advbench")
    msg = str(ei.value)
    assert "\n" not in msg and "datasets" in msg


def test_hf_offline_is_one_line_error(monkeypatch):
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'walledai/AdvBench' on the Hub (LocalEntryNotFoundError)\nmore")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError) as ei:
        load_prompts("hf:advbench")
    assert "\n" not in str(ei.value) and "offline" in str(ei.value)


def test_hf_alias_reads_field_and_filters(monkeypatch):
    import types

    class FakeDS(list):
        column_names = ["instruction", "input", "output"]

    calls = []

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return FakeDS(
            [
                {"instruction": "Give three tips for staying healthy.", "input": "", "output": "x"},
                {"instruction": "Translate this.", "input": "Bonjour", "output": "Hello"},
                {"instruction": "Name a color.", "input": "", "output": "red"},
            ]
        )

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_prompts("hf:alpaca") == ["Give three tips for staying healthy.", "Name a color."]
    assert calls == [("tatsu-lab/alpaca", None, "train")]


def _fake_datasets(monkeypatch, calls):
    import types

    class FakeDS(list):
        column_names = ["text"]

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return FakeDS([{"text": "one prompt"}])

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("hf:org/prompts", ("org/prompts", None, "train")),
        ("hf:org/prompts@test", ("org/prompts", None, "test")),
        ("hf:org/prompts:en", ("org/prompts", "en", "train")),
        ("hf:org/prompts:en@validation", ("org/prompts", "en", "validation")),
        ("hf:org/prompts:en:validation", ("org/prompts", "en", "validation")),  # older 3-part, still read
        ("hf:ADVBENCH", ("walledai/AdvBench", None, "train")),  # aliases keep their own hub split
        ("hf:jailbreakbench", ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful")),
    ],
)
def test_hf_prompt_specs_in_the_one_syntax(monkeypatch, spec, expected):
    """Prompt sets read hf:<id>[:<config>][@<split>] exactly as --data does (one parser)."""
    calls: list = []
    _fake_datasets(monkeypatch, calls)
    try:
        load_prompts(spec)
    except DataError as e:  # an alias's own column is not in the fake: one line, not a KeyError
        assert spec.lower() in ("hf:advbench", "hf:jailbreakbench") and "no column" in str(e)
    assert calls == [expected]


@pytest.mark.parametrize(
    "spec", ["hf:org/prompts:test", "hf:org/prompts@", "hf:@test", "hf:a:b:c@d", "hf:a@b@c"]
)
def test_hf_prompt_spec_refused_before_loading(monkeypatch, spec):
    calls: list = []
    _fake_datasets(monkeypatch, calls)
    with pytest.raises(DataError) as ei:
        load_prompts(spec)
    assert calls == [] and "\n" not in str(ei.value) and "hf:" in str(ei.value)
