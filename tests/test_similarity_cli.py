"""`rosetta compare` end to end on small stores written by the store's own extract(), and its core."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rosettalens.cli import main
from rosettalens.errors import RosettaError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model
from rosettalens.similarity import linear_cka, svcca
from rosettalens.similarity.compare import compare_layers
from rosettalens.store import ActivationStore, extract

DOCS = [
    "The river runs past the old mill every spring.",
    "January and February are cold months in the north.",
    "My mother said that joy is a choice, not a feeling.",
    "0 1 2 3 4 5 6 7 8 9",
    "Cells divide; genes mutate; species evolve slowly.",
    "Where is the nearest train station, please?",
]
HOOKS = ["resid_post.0", "resid_post.1", "resid_post.2"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    out = {}
    for name, fam, seed in [("a", "llama", 0), ("b", "llama", 1), ("q", "qwen2", 0)]:
        m, t = tiny_model(fam, seed=seed)
        out[name] = extract(HookedModel.from_hf(m, t, name=f"tiny-{fam}-{seed}"), HOOKS, data, root / name)
    return out


def run(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_compare_end_to_end_same_tokenizer(stores, tmp_path, capsys):
    a, b = stores["a"], stores["b"]
    out = tmp_path / "run"
    argv = ["compare", "--a", str(a.path), "--b", str(b.path), "--metrics", "svcca,linear_cka,rsa"]
    code, stdout, _ = run([*argv, "--permutations", "19", "--out", str(out), "--json"], capsys)
    assert code == 0
    printed = json.loads(stdout)  # exactly one JSON object on stdout
    res = json.loads((out / "results.json").read_text())
    assert printed["metrics"] == res["metrics"]
    assert res["hooks_a"] == HOOKS and res["hooks_b"] == HOOKS
    assert res["n_rows"] == len(a) and "row-by-row" in res["pairing"]
    assert len(res["pairs"]) == 3 * 3 * 3
    for m in ("svcca", "linear_cka", "rsa"):
        table = res["metrics"][m]
        for key in ("value", "p_value", "null_mean", "null_std"):
            assert np.array(table[key], dtype=float).shape == (3, 3)
            assert all(v is not None for row in table[key] for v in row)
        assert all(1 / 20 <= p <= 1 for row in table["p_value"] for p in row)
        assert (out / f"{m}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # values equal the metric functions on the stores' own rows
    xa, xb = a.read("resid_post.1"), b.read("resid_post.2")
    assert res["metrics"]["linear_cka"]["value"][1][2] == pytest.approx(linear_cka(xa, xb), abs=1e-12)
    assert res["metrics"]["svcca"]["value"][1][2] == pytest.approx(svcca(xa, xb), abs=1e-12)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["metrics"] == ["svcca", "linear_cka", "rsa"] and cfg["permutations"] == 19
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_store_against_itself(stores, tmp_path, capsys):
    a = stores["a"]
    out = tmp_path / "self"
    code, stdout, _ = run(
        ["compare", "--a", str(a.path), "--b", str(a.path), "--hooks", "resid_post.-1,resid_post.0"]
        + ["--metrics", "linear_cka,procrustes", "--permutations", "9", "--out", str(out), "--json"],
        capsys,
    )
    assert code == 0
    res = json.loads(stdout)
    assert res["hooks_a"] == ["resid_post.2", "resid_post.0"]  # negative layers resolved
    for m in ("linear_cka", "procrustes"):
        for i in range(2):
            assert res["metrics"][m]["value"][i][i] == pytest.approx(1.0, abs=1e-9)
            assert res["metrics"][m]["p_value"][i][i] == pytest.approx(0.1)


def test_compare_across_tokenizers_pairs_by_characters(stores, tmp_path, capsys):
    from rosettalens.align import PairedStores

    a, q = stores["a"], stores["q"]
    assert a.manifest["tokenizer"]["sha256"] != q.manifest["tokenizer"]["sha256"]
    out = tmp_path / "cross"
    code, stdout, _ = run(
        ["compare", "--a", str(a.path), "--b", str(q.path), "--metrics", "linear_cka"]
        + ["--permutations", "5", "--out", str(out), "--json"],
        capsys,
    )
    assert code == 0
    res = json.loads(stdout)
    pair = PairedStores(a, q)
    assert "PairedStores" in res["pairing"] and res["n_rows"] == len(pair)
    xa, xq = pair.read("resid_post.0", "resid_post.1")
    assert res["metrics"]["linear_cka"]["value"][0][1] == pytest.approx(linear_cka(xa, xq), abs=1e-12)


def test_max_rows_subsamples_with_seed(stores, tmp_path, capsys):
    a, b = stores["a"], stores["b"]
    outs = []
    for k in range(2):
        out = tmp_path / f"sub{k}"
        code, stdout, _ = run(
            ["compare", "--a", str(a.path), "--b", str(b.path), "--hooks", "resid_post.1", "--metrics", "rsa"]
            + ["--permutations", "0", "--max-rows", "40", "--out", str(out), "--json"],
            capsys,
        )
        assert code == 0
        outs.append(json.loads(stdout))
    assert outs[0]["n_rows"] == 40 and outs[0]["rows_used"] == 40 and outs[0]["paired_rows"] == len(a)
    assert outs[0]["metrics"] == outs[1]["metrics"]  # same seed, same subset
    assert outs[0]["metrics"]["rsa"]["p_value"] == [[None]]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--metrics", "svcca,nope"], "nope"),
        (["--hooks", "resid_post.7"], "resid_post.7"),
        (["--permutations", "-1"], "permutations"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(stores, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    code, stdout, err = run(
        ["compare", "--a", str(stores["a"].path), "--b", str(stores["b"].path), "--out", str(out), *extra],
        capsys,
    )
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not out.exists()


def test_missing_store_exits_2(tmp_path, capsys):
    code, _, err = run(
        ["compare", "--a", str(tmp_path / "none"), "--b", str(tmp_path), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "store" in err and len(err.strip().splitlines()) == 1


def test_compare_layers_core_in_memory():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    acts_a = {"l0": x, "l1": torch.from_numpy(rng.normal(size=(80, 2, 3)))}  # per-head hooks are flattened
    acts_b = {"m0": 3 * x @ q}
    res = compare_layers(acts_a, acts_b, ["linear_cka", "mutual_knn"], n_permutations=49, seed=0)
    assert res["hooks_a"] == ["l0", "l1"] and res["hooks_b"] == ["m0"]
    assert res["metrics"]["linear_cka"]["value"][0][0] == pytest.approx(1.0, abs=1e-10)
    assert res["metrics"]["linear_cka"]["p_value"][0][0] == pytest.approx(1 / 50)
    assert res["metrics"]["linear_cka"]["p_value"][1][0] > 0.02
    assert res["metrics"]["mutual_knn"]["value"][0][0] == 1.0
    with pytest.raises(RosettaError):
        compare_layers({"a": x}, {"b": x[:50]}, ["svcca"])
    with pytest.raises(RosettaError):
        compare_layers({"a": x}, {"b": x}, ["bogus"])


def test_store_reader_is_the_one_used(stores):
    # guard for the store API this command relies on
    s = ActivationStore.open(stores["a"].path)
    assert s.hooks == HOOKS and s.read("resid_post.0").shape == (len(s), s.d_model)


def test_overwrite_replaces_an_earlier_compare_whole_and_nothing_else(stores, tmp_path, capsys):
    base = [
        "compare",
        "--a",
        str(stores["a"].path),
        "--b",
        str(stores["b"].path),
        "--out",
        str(tmp_path / "run"),
    ]
    assert run([*base, "--metrics", "svcca,rsa"], capsys)[0] == 0
    assert {"svcca.png", "rsa.png"} <= {p.name for p in (tmp_path / "run").iterdir()}
    assert run([*base, "--metrics", "linear_cka"], capsys)[0] == 2  # exists: refused without --overwrite
    assert run([*base, "--metrics", "linear_cka", "--overwrite"], capsys)[0] == 0
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names == {"config.json", "results.json", "linear_cka.png"}  # no stale plot of the first run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = run([*base[:-1], str(mine), "--overwrite"], capsys)
    assert code == 2 and "not a compare folder" in err and (mine / "notes.txt").read_text() == "keep"
