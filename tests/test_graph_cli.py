"""``rosetta graph`` on a tiny model with a random transcoder set: files, the JSON line, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from rosettalens.circuits.graph_view import graph_html, load_graph
from rosettalens.cli import main
from rosettalens.models.tiny import tiny_model
from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    m, t = tiny_model("llama", n_layers=2)
    m.save_pretrained(root / "model")
    t.save_pretrained(root / "model")
    d = m.config.hidden_size
    tcs = {L: Transcoder(TranscoderConfig(layer=L, d_in=d, d_out=d, width=16, k=3, seed=L)) for L in range(2)}
    TranscoderSet("tiny", tcs).save(root / "tc")
    return root


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_graph_cli_writes_files_and_json(dirs, capsys):
    out = dirs / "g1"
    argv = ["graph", "--model", str(dirs / "model"), "--transcoders", str(dirs / "tc"), "--prompt",
            "One two three four", "--out", str(out), "--json", "--agreement-features", "5"]  # fmt: skip
    code, stdout, err = _run(capsys, argv)
    assert code == 0, err
    res = json.loads(stdout)
    for key in ("n_nodes", "n_edges", "replacement_score", "completeness_score", "intervention_agreement",
                "top_features"):  # fmt: skip
        assert key in res
    assert 0.0 <= res["completeness_score"] <= 1.0 and 0.0 <= res["replacement_score"] <= 1.0
    gj = json.loads((out / "graph.json").read_text())
    assert set(gj) >= {"metadata", "qParams", "nodes", "links"}
    assert len(gj["nodes"]) == res["n_nodes"] and len(gj["links"]) == res["n_edges"]
    ids = {n["node_id"] for n in gj["nodes"]}
    assert all(x["source"] in ids and x["target"] in ids for x in gj["links"])
    kinds = {n["feature_type"] for n in gj["nodes"]}
    assert {"embedding", "logit"} <= kinds
    assert sum(n["is_target_logit"] for n in gj["nodes"]) == 1
    # the saved graph reloads whole and gives the same scores
    g = load_graph(out)
    rep, comp = g.scores()
    assert rep == pytest.approx(res["replacement_score"]) and comp == pytest.approx(res["completeness_score"])
    assert torch.isfinite(g.edges).all()
    page = (out / "graph.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and page.count("<circle") >= 1
    assert graph_html(gj) == page.replace(f"{res['model']}: attribution graph", "attribution graph")


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--prompt", "   "], "empty"),
        (["--prompt", "x", "--transcoders", "/nonexistent"], "not a transcoder set"),
        (["--prompt", "x", "--node-threshold", "1.5"], "node-threshold"),
        ([], "--prompt"),
    ],
)
def test_graph_cli_bad_input(dirs, capsys, extra, msg):
    out = dirs / "bad"
    argv = ["graph", "--model", str(dirs / "model"), "--transcoders", str(dirs / "tc"), "--out", str(out)]
    code, stdout, err = _run(capsys, argv + extra)
    assert code == 2
    assert err.startswith("rosetta: error:") and msg in err and len(err.strip().splitlines()) == 1
    assert stdout == "" and not out.exists()


def test_graph_cli_refuses_existing_out(dirs, capsys):
    out = dirs / "exists"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["graph", "--model", str(dirs / "model"), "--transcoders", str(dirs / "tc"), "--prompt", "One two",
            "--out", str(out)]  # fmt: skip
    code, _, err = _run(capsys, argv)
    assert code == 2 and "exists" in err
    code, _, err = _run(capsys, argv + ["--overwrite"])
    assert code == 2 and (out / "notes.txt").read_text() == "mine"
