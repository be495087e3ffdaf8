"""The offline corpus on a tiny synthetic source tree: splitting, exact and near dedup, manifest hashes,
determinism, reading it back as ``--data corpus:NAME``."""

from __future__ import annotations

import hashlib
import json

import pytest

from rosettalens.data.corpus import (
    build_corpus,
    corpus_dir,
    load_corpus,
    near_duplicates,
    normalise,
    split_text,
)
from rosettalens.errors import ConfigError, DataError

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega"
).split()


def _para(seed: int, n: int = 200) -> str:
    return " ".join(
        WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] + str((seed * i) % 97) for i in range(n)
    )


@pytest.fixture()
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "stdlib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "site-packages").mkdir()
    a = f'"""Module a.\n\n{_para(1)}"""\n\n\ndef f():\n    return 1\n\n\n# {_para(2)}\n'
    (root / "a.py").write_text(a)
    (root / "pkg" / "b.py").write_text(f"# {_para(3)}\n\n\nx = 1\n")
    (root / "pkg" / "copy_of_a.py").write_text(
        a.replace("Module a.", "MODULE   a.")
    )  # exact dup once normalised
    near = _para(3).split(" ")
    near[10] = "changed"
    (root / "pkg" / "near_b.py").write_text("# " + " ".join(near) + "\n\n\nx = 1\n")  # one word changed
    (root / "test" / "test_x.py").write_text(f"# {_para(9)}\n")  # tests are left out
    (root / "site-packages" / "y.py").write_text(f"# {_para(10)}\n")  # so is site-packages
    return root


def test_split_text_known_answer():
    text = "a" * 300 + "\n\n" + "b" * 300 + "\n\n" + "c" * 50 + "\n\n" + "d" * 900
    got = split_text(text, max_chars=700, min_chars=100)
    assert got == ["a" * 300 + "\n\n" + "b" * 300 + "\n\n" + "c" * 50, "d" * 700, "d" * 200]
    assert split_text(text, max_chars=700, min_chars=250)[2:] == []  # the 200-char rest is too short
    assert all(len(p) <= 700 for p in got)


def test_near_duplicates_finds_one_word_edits_only():
    base = _para(4, 200)
    words = base.split(" ")
    words[50] = "edited"
    texts = [base, " ".join(words), _para(5, 200), _para(4, 200).upper()]
    assert near_duplicates(texts) == {1, 3}
    assert normalise("  A\tb\n\nC ") == "a b c"


def test_build_dedup_manifest_and_determinism(tree, tmp_path):
    m = build_corpus("t1", ["stdlib"], stdlib_root=tree, max_chars=4000, count_with=[], progress=False)
    d = corpus_dir("t1")
    assert d == tmp_path / "cache" / "corpus" / "t1"
    docs = [json.loads(line) for s in m["shards"] for line in (d / s["file"]).read_text().splitlines()]
    paths = {doc["path"].split("#")[0] for doc in docs}
    assert paths == {
        "a.py",
        "pkg/b.py",
    }  # copy (exact) and near copy dropped; test/ and site-packages/ not read
    assert m["dedup"]["exact_duplicates"] >= 1 and m["dedup"]["near_duplicates"] >= 1
    assert m["n_docs"] == len(docs) and m["chars"] == sum(len(x["text"]) for x in docs)
    for s in m["shards"]:
        assert s["sha256"] == hashlib.sha256((d / s["file"]).read_bytes()).hexdigest()
    assert all(x["license"] == "PSF-2.0" and x["source"] == "stdlib" for x in docs)
    # the same tree gives the same bytes
    m2 = build_corpus("t2", ["stdlib"], stdlib_root=tree, max_chars=4000, count_with=[], progress=False)
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]
    # reading it back, as --data corpus:t1 does
    from rosettalens.data import load_documents

    corpus = load_documents("corpus:t1")
    assert sorted(corpus.documents) == sorted(x["text"] for x in docs)  # a fixed shuffle of them
    assert load_documents("corpus:t1").documents == corpus.documents
    assert load_corpus("corpus:t1", verify=True).sha256 == corpus.sha256
    (d / m["shards"][0]["file"]).write_text("tampered\n")
    with pytest.raises(DataError, match="sha256"):
        load_corpus("corpus:t1", verify=True)


def test_token_counts_and_errors(tree):
    class WordTok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    m = build_corpus("t3", ["stdlib"], stdlib_root=tree, max_chars=4000, count_with=[("words", WordTok())],
                     progress=False)  # fmt: skip
    d = corpus_dir("t3")
    texts = [
        json.loads(line)["text"] for s in m["shards"] for line in (d / s["file"]).read_text().splitlines()
    ]
    assert m["tokens"]["words"]["total"] == sum(len(t.split()) for t in texts)
    assert m["tokens"]["words"]["per_source"] == {"stdlib": m["tokens"]["words"]["total"]}
    with pytest.raises(ConfigError, match="unknown corpus source"):
        build_corpus("t4", ["nope"], stdlib_root=tree, count_with=[], progress=False)
    with pytest.raises(DataError, match="not built"):
        load_corpus("corpus:missing", build=False)
    with pytest.raises(ConfigError):
        corpus_dir("../escape")


def test_an_out_folder_that_is_not_a_corpus_is_never_replaced(tree, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="is not a corpus"):
            build_corpus("t5", ["stdlib"], out=mine, overwrite=overwrite, stdlib_root=tree, count_with=[],
                         progress=False)  # fmt: skip
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    built = build_corpus(
        "t5", ["stdlib"], out=tmp_path / "c", stdlib_root=tree, count_with=[], progress=False
    )
    again = build_corpus(
        "t5", ["stdlib"], out=tmp_path / "c", overwrite=True, stdlib_root=tree, count_with=[], progress=False
    )  # fmt: skip  (an earlier corpus is replaced)
    assert again["shards"] == built["shards"]


def test_cli_build_pydoc_topics(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pydoc_data.topics")
    from pydoc_data.topics import topics

    from rosettalens.cli import main

    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path / "cache"))
    args = [
        "data",
        "corpus",
        "build",
        "--name",
        "topics",
        "--sources",
        "pydoc-topics",
        "--no-progress",
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(tmp_path / "cache" / "corpus" / "topics")
    assert out["sources"]["pydoc-topics"]["licenses"] == {"PSF-2.0": out["n_docs"]}
    assert 0 < out["chars"] <= sum(len(t) for t in topics.values())
    assert main([*args[:-1], "--sources", "nope"]) == 2
    assert "unknown corpus source" in capsys.readouterr().err
