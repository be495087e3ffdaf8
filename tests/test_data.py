"""Data sources: .txt, .jsonl, hf:<id>, built-ins, and their errors."""

from __future__ import annotations

import builtins
import json
import sys

import pytest

from rosettalens.data import Corpus, DataError, builtin_datasets, load_documents
from rosettalens.data.sources import documents_sha256


def test_txt_one_document_per_line(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("first doc\r\n\n  \nsecond — naïve 東京\nthird\n", encoding="utf-8")
    c = load_documents(p)
    assert c.documents == ["first doc", "second — naïve 東京", "third"]
    assert c.describe()["n_documents"] == 3 and c.describe()["source"] == "file"


def test_jsonl_default_and_custom_field(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "a b", "body": "x\ny"}, {"text": "c", "body": "z"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_documents(p).documents == ["a b", "c"]
    assert load_documents(p, field="body").documents == ["x\ny", "z"]
    with pytest.raises(DataError, match="no field 'nope'"):
        load_documents(p, field="nope")


@pytest.mark.parametrize(
    "content,suffix,match",
    [
        ("", ".txt", "no documents"),
        ("\n  \n", ".txt", "no documents"),
        ('{"text": 3}\n', ".jsonl", "expected a string"),
        ("{not json\n", ".jsonl", "not valid JSON"),
        ("a,b\n", ".csv", "unsupported data file"),
    ],
)
def test_bad_files(tmp_path, content, suffix, match):
    p = tmp_path / f"d{suffix}"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_documents(p)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_documents(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="unknown data 'no-such-dataset'"):
        load_documents("no-such-dataset")
    with pytest.raises(DataError, match="no data"):
        load_documents("")


def test_builtins_listed_and_loadable():
    rows = builtin_datasets()
    names = {r["name"] for r in rows}
    assert {"mini-web", "sequences"} <= names
    for r in rows:
        c = load_documents(r["name"])
        assert len(c) == r["n_documents"] > 0
        assert all(isinstance(d, str) and d.strip() for d in c.documents)
    seq = load_documents("sequences").documents
    assert "January February March April" in seq and "one two three four" in seq


def test_hash_depends_on_texts_and_order():
    a = Corpus("x", ["ab", "c"])
    assert a.sha256 == documents_sha256(["ab", "c"])
    assert a.sha256 != documents_sha256(["a", "bc"])  # boundaries count
    assert a.sha256 != documents_sha256(["c", "ab"])


def test_hf_without_datasets_package(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match=r"pip install 'rosettalens\[datasets\]'"):
        load_documents("hf:wikitext")


def test_hf_offline_is_one_clear_error(monkeypatch):
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)\nmore")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError) as ei:
        load_documents("hf:someone/corpus@validation")
    msg = str(ei.value)
    assert "\n" not in msg and "offline" in msg and "'someone/corpus'" in msg and "validation" in msg


def test_hf_spec_parsing(monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("datasets")

    class DS:
        column_names = ["text", "label"]

        def __getitem__(self, k):
            return ["doc one", "", "doc two"]

    def load_dataset(ds_id, config, split):
        calls.append((ds_id, config, split))
        return DS()

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_documents("hf:org/name").documents == ["doc one", "doc two"]
    load_documents("hf:org/name@test")
    load_documents("hf:wikitext:wikitext-2-raw-v1@validation")
    load_documents("hf:wikitext:wikitext-2-raw-v1:validation")  # the older spelling, still read
    load_documents("hf:allenai/c4:en")  # a config, default split
    assert calls == [
        ("org/name", None, "train"),
        ("org/name", None, "test"),
        ("wikitext", "wikitext-2-raw-v1", "validation"),
        ("wikitext", "wikitext-2-raw-v1", "validation"),
        ("allenai/c4", "en", "train"),
    ]
    with pytest.raises(DataError, match="ambiguous"):  # once meant the split, now would be a config
        load_documents("hf:org/name:test")
    assert len(calls) == 5  # refused before the dataset is opened
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents("hf:org/name", field="body")
