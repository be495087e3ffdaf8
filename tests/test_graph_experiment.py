"""``rosetta run seqcont-graphs`` on tiny models with random transcoder sets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rosettalens.cli import main
from rosettalens.experiments.seqcont_graphs import shared_influence, shuffled_null
from rosettalens.models.tiny import tiny_model
from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet


def _save(root, family):
    m, t = tiny_model(family, n_layers=2)
    m.save_pretrained(root / family)
    t.save_pretrained(root / family)
    d = m.config.hidden_size
    tcs = {L: Transcoder(TranscoderConfig(layer=L, d_in=d, d_out=d, width=32, k=4, seed=L)) for L in range(2)}
    TranscoderSet(family, tcs).save(root / f"tc-{family}")
    return str(root / family), str(root / f"tc-{family}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seqgraphs")
    return {f: _save(root, f) for f in ("llama", "qwen2")}


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_shared_influence_known_answer():
    graphs = [
        {"keys": [[0, 1], [1, 2], [1, 3]], "influence": [0.5, 0.3, 0.2]},
        {"keys": [[0, 1]], "influence": [1.0]},
    ]
    assert shared_influence(graphs, {(0, 1)}) == pytest.approx(1.5 / 2.0)
    assert shared_influence(graphs, {(1, 3), (1, 2)}) == pytest.approx(0.5 / 2.0)
    assert shared_influence(graphs, set()) == 0.0


def test_shuffled_null_content_vs_position():
    """Features that copy each other's content: the stratified shuffle breaks their match (p small);
    features that only mark the position (the stratum): they still match under the shuffle (p = 1)."""
    rng = np.random.default_rng(0)
    n_prompts, length = 40, 5
    strata = [f"t:{p}" for _ in range(n_prompts) for p in range(length)]
    keys = [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    feats = [
        [{"keys": [[0, 0], [0, 1]], "influence": [0.5, 0.5]}],
        [{"keys": [[1, 0], [1, 1]], "influence": [0.5, 0.5]}],
    ]
    content = rng.random((n_prompts * length, 2))
    null = shuffled_null(content, content.copy(), strata, keys, feats, 0.9, 50, 0)
    observed = 1.0
    p = (1 + sum(v >= observed for v in null)) / 51
    assert max(null) < 0.5 and p < 0.05
    pos = np.tile(np.eye(length)[:, :2], (n_prompts, 1))  # fires at positions 0 and 1 of every prompt
    null = shuffled_null(pos, pos.copy(), strata, keys, feats, 0.9, 20, 0)
    assert min(null) == pytest.approx(1.0)


def test_identical_models_share_everything(dirs, tmp_path, capsys):
    """A model compared with itself: every graph feature that varies over the paired positions matches
    itself (correlation 1; features firing only on the unpaired BOS token are constant there), so the
    shared influence is close to 1 and never below its null."""
    model, tc = dirs["llama"]
    out = tmp_path / "same"
    argv = ["run", "seqcont-graphs", "--models", f"{model},{model}", "--transcoders", f"{tc},{tc}", "--tasks",
            "digits", "--n-prompts", "8", "--n-graphs", "1", "--n-null", "40", "--min-corr", "0.99",
            "--agreement-features", "3", "--out", str(out), "--json"]  # fmt: skip
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["shared_influence"] > 0.95
    assert r["shared_influence_null"] <= r["shared_influence"] + 1e-9
    assert 0.0 < r["shared_influence_p"] <= 1.0
    assert r["n_matched"][0] == r["n_matched"][1] >= 0.9 * r["n_graph_features"][0]
    assert (out / "report.html").is_file() and (out / "shared_influence.png").is_file()
    graphs = json.loads((out / "graphs.json").read_text())["graphs"]
    assert len(graphs) == 2 and all((out / "graphs" / g["folder"] / "graph.json").is_file() for g in graphs)


def test_two_tokenizers_run(dirs, tmp_path, capsys):
    (ma, ta), (mb, tb) = dirs["llama"], dirs["qwen2"]
    out = tmp_path / "two"
    argv = ["run", "seqcont-graphs", "--models", f"{ma},{mb}", "--transcoders", f"{ta},{tb}", "--tasks", "digits",
            "--n-prompts", "6", "--n-graphs", "1", "--n-null", "10", "--agreement-features", "0", "--out",
            str(out), "--json"]  # fmt: skip
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    for key in ("shared_influence", "shared_influence_null", "shared_influence_p", "graph_scores"):
        assert key in r
    assert 0.0 <= r["shared_influence"] <= 1.0 and 0.0 < r["shared_influence_p"] <= 1.0
    m = json.loads((out / "matching.json").read_text())
    assert m["n_rows"] > 0 and len(m["null_values"]) == 10


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--models", "a"], "exactly two"),
        (["--transcoders", "/nonexistent,/nonexistent"], "not a transcoder set"),
        (["--n-graphs", "9", "--n-prompts", "2"], "n-graphs"),
    ],
)
def test_bad_input_exit_2(dirs, tmp_path, capsys, extra, msg):
    model, tc = dirs["llama"]
    argv = ["run", "seqcont-graphs", "--models", f"{model},{model}", "--transcoders", f"{tc},{tc}",
            "--out", str(tmp_path / "bad")]  # fmt: skip
    rc, stdout, err = _run(argv + extra, capsys)
    assert rc == 2 and msg in err and stdout == ""
    assert not (tmp_path / "bad").exists()


def test_an_empty_transcoders_entry_trains_in_the_run(dirs, tmp_path, capsys):
    model, tc = dirs["llama"]
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(f"{i} {i + 1} {i + 2} {i + 3} January February March April" for i in range(60)))
    out = tmp_path / "train"
    argv = ["run", "seqcont-graphs", "--models", f"{model},{model}", "--transcoders", f",{tc}", "--data", str(docs),
            "--train-tokens", "400", "--width", "16", "--k", "2", "--tasks", "digits", "--n-prompts", "4",
            "--n-graphs", "1", "--n-null", "5", "--agreement-features", "0", "--out", str(out), "--json"]  # fmt: skip
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    info = json.loads((out / "transcoders.json").read_text())
    assert [i["trained"] for i in info["info"]] == [True, False]
    assert (out / "transcoders_0" / "transcoders.json").is_file()
    assert "shared_influence" in json.loads(stdout)
