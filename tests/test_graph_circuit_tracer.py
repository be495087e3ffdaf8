"""Attribution graphs against circuit-tracer itself: its pruning, its scores and its graph file, run on
graphs that rosettalens built (circuit-tracer is installed without its dependencies by ``.ci/run``: it
pins transformers 4, and these parts of it need only torch and pydantic)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

ct_graph = pytest.importorskip("circuit_tracer.graph")
ct_files = pytest.importorskip("circuit_tracer.utils.create_graph_files")
ct_models = pytest.importorskip("circuit_tracer.frontend.graph_models")

from circuit_tracer.attribution.targets import LogitTarget  # noqa: E402
from circuit_tracer.utils.tl_nnsight_mapping import convert_nnsight_config_to_transformerlens  # noqa: E402

from rosettalens.circuits.graph import build_graph, graph_scores, prune_graph  # noqa: E402
from rosettalens.circuits.graph_view import graph_json, save_graph  # noqa: E402
from rosettalens.hooks import HookedModel  # noqa: E402
from rosettalens.models.tiny import tiny_model  # noqa: E402
from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet  # noqa: E402

PROMPT = "One two three four five six"
THRESHOLDS = [(0.8, 0.98), (0.5, 0.9), (0.95, 0.7)]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def graphs(request):
    """Our graph of PROMPT (float64, every active feature a node) and the same graph as circuit-tracer's
    ``Graph``, with the model's tokenizer."""
    model, tok = tiny_model(request.param)
    hm = HookedModel.from_hf(model.to(torch.float64), tok, name=request.param)
    d = hm.cfg.d_model
    tcs = {}
    for L in range(hm.cfg.n_layers):
        tc = Transcoder(TranscoderConfig(layer=L, d_in=d, d_out=d, width=32, k=4, seed=20 + L))
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.1)
            tc.b_dec.normal_(0, 0.1)
        tcs[L] = tc.to(torch.float64)
    ours = build_graph(hm, TranscoderSet(request.param, tcs), PROMPT, max_feature_nodes=None)
    cfg = copy.deepcopy(hm.model.config)
    cfg.name_or_path, cfg.architectures = request.param, [type(hm.model).__name__]
    theirs = ct_graph.Graph(
        input_string=ours.prompt,
        input_tokens=ours.input_ids,
        active_features=ours.active_features,
        adjacency_matrix=ours.adjacency.to(torch.float32),
        cfg=convert_nnsight_config_to_transformerlens(cfg),
        selected_features=ours.selected,
        activation_values=ours.activations.to(torch.float32),
        logit_targets=[
            LogitTarget(s, int(t)) for s, t in zip(ours.logit_strs, ours.logit_tokens.tolist(), strict=True)
        ],
        logit_probabilities=ours.logit_probs.to(torch.float32),
        scan=request.param,
    )
    return ours, theirs, tok


def test_the_graph_has_pruning_work_to_do(graphs):
    ours, _, _ = graphs
    assert ours.n_features > 20 and ours.n_logits >= 2
    pr = prune_graph(ours, 0.8, 0.98)
    assert 0 < int(pr.node_mask[: ours.n_features].sum()) < ours.n_features


def test_scores_equal_circuit_tracers(graphs):
    ours, theirs, _ = graphs
    rep, comp = graph_scores(ours)
    rep_ct, comp_ct = ct_graph.compute_graph_scores(theirs)
    assert 0 < rep < 1 and 0 < comp < 1
    assert rep == pytest.approx(rep_ct, abs=2e-5) and comp == pytest.approx(comp_ct, abs=2e-5)


@pytest.mark.parametrize("node_threshold,edge_threshold", THRESHOLDS)
def test_pruning_equals_circuit_tracers(graphs, node_threshold, edge_threshold):
    ours, theirs, _ = graphs
    pr = prune_graph(ours, node_threshold, edge_threshold)
    ct = ct_graph.prune_graph(theirs, node_threshold, edge_threshold)
    assert torch.equal(pr.node_mask, ct.node_mask)
    assert torch.equal(pr.edge_mask, ct.edge_mask[ours.row_nodes])
    assert not bool(ct.edge_mask[~torch.isin(torch.arange(ours.n_nodes), ours.row_nodes)].any())
    torch.testing.assert_close(pr.cumulative.float(), ct.cumulative_scores, rtol=1e-4, atol=1e-5)


def _error_node(cls, layer, pos, influence=None):
    """circuit-tracer 0.5.0's error node with the ids of its later fix
    (github.com/decoderesearch/circuit-tracer/pull/102):
    ``0_{layer}_{pos}`` named feature ``layer`` of layer 0 as well, so we write ``{layer}_-1_{pos}`` (and
    ``{layer}_-1-{pos}`` as the display id, which 0.5.0 shared with feature ``pos`` of the layer)."""
    return cls(
        node_id=f"{layer}_-1_{pos}",
        feature=-1,
        layer=str(layer),
        ctx_idx=pos,
        feature_type="mlp reconstruction error",
        jsNodeId=f"{layer}_-1-{pos}",
        influence=influence,
    )


def _by_id(records: list[dict]) -> dict[str, dict]:
    return {r["node_id"]: r for r in records}


@pytest.mark.parametrize("node_threshold,edge_threshold", THRESHOLDS[:2])
def test_graph_file_equals_circuit_tracers(graphs, node_threshold, edge_threshold, monkeypatch):
    """Our graph.json carries circuit-tracer's file: the same nodes with the same fields, the same links
    and weights, the same metadata (we add ``scores`` and ``metadata.info``)."""
    ours, theirs, tok = graphs
    ct = ct_graph.prune_graph(theirs, node_threshold, edge_threshold)
    monkeypatch.setattr(ct_models.Node, "error_node", classmethod(_error_node))
    nodes = ct_files.create_nodes(theirs, ct.node_mask, tok, ct.cumulative_scores)
    used_nodes, used_edges = ct_files.create_used_nodes_and_edges(theirs, nodes, ct.edge_mask)
    ref = ct_files.build_model(theirs, used_nodes, used_edges, "graph", theirs.scan, node_threshold, tok)
    ref = json.loads(ref.model_dump_json())
    gj = graph_json(ours, node_threshold=node_threshold, edge_threshold=edge_threshold)
    ct_models.Model.model_validate(gj)  # their viewer's schema accepts it
    mine, refs = _by_id(gj["nodes"]), _by_id(ref["nodes"])
    assert set(mine) == set(refs) and len(mine) == len(gj["nodes"])
    for nid, r in refs.items():
        m = mine[nid]
        for key, v in r.items():
            if key == "clerp" and r["feature_type"] != "logit":
                assert m[key]  # we label the node where circuit-tracer leaves the label to Neuronpedia
            elif isinstance(v, float):
                assert m[key] == pytest.approx(v, rel=1e-4, abs=1e-5), (nid, key)
            else:
                assert m[key] == v, (nid, key)
    links = {(x["source"], x["target"]): x["weight"] for x in gj["links"]}
    ref_links = {(x["source"], x["target"]): x["weight"] for x in ref["links"]}
    assert set(links) == set(ref_links) and len(links) == len(gj["links"])
    for key, w in ref_links.items():
        assert links[key] == pytest.approx(w, rel=1e-4, abs=1e-6)
    meta = {k: v for k, v in gj["metadata"].items() if k != "info"}
    assert meta == {**ref["metadata"], "scan": meta["scan"]}
    assert gj["qParams"] == ref["qParams"]


def test_saved_folder_is_what_their_viewer_serves(graphs, tmp_path):
    """``graph-metadata.json`` lists the graph as circuit-tracer's ``add_graph_metadata`` would, and its
    slug names the graph file, so ``circuit_tracer.frontend.serve(folder)`` shows it."""
    from circuit_tracer.frontend.utils import add_graph_metadata

    ours, _, _ = graphs
    gj = graph_json(ours)
    save_graph(ours, tmp_path, gj)
    listed = json.loads((tmp_path / "graph-metadata.json").read_text())
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    add_graph_metadata(gj["metadata"], str(ref_dir))
    assert listed == json.loads((ref_dir / "graph-metadata.json").read_text())
    (slug,) = [g["slug"] for g in listed["graphs"]]
    assert json.loads((tmp_path / f"{slug}.json").read_text()) == json.loads(json.dumps(gj))
