"""Paired extraction under ``torchrun`` (2 gloo ranks on the CPU): each rank runs the models on its share
of the batches, and every rank returns exactly the pairs one process extracts (the reference, run here)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run_torchrun
from rosettalens.crosscoder import extract_pairs

REPO = Path(__file__).resolve().parents[1]
BATCH = 3
HOOKS = ("resid_post.1", "resid_post.-1")
# the norm rule drops rows and max_tokens cuts the third batch of three texts: rank 0 runs batches 0 and
# 2, rank 1 batch 1; the held-out call runs all five batches under given medians, the last one of a
# single text with no pair left after skip_first
TRAIN = dict(skip_first=2, norm_ratio=1.3, max_tokens=1000)
HELD = dict(skip_first=2, norm_ratio=1.3, median_norms=(0.15, 0.13))

pytestmark = pytest.mark.usefixtures("one_thread")


def models():
    """Two tiny models with different tokenizations (one adds a BOS token): pairs by character ends."""
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_model

    ma, ta = tiny_model("llama", seed=0)
    mb, tb = tiny_model("qwen2", seed=1, d_model=40)
    return HookedModel.from_hf(ma, ta, name="tiny-llama"), HookedModel.from_hf(mb, tb, name="tiny-qwen2")


def texts() -> tuple[list[str], list[str]]:
    from rosettalens.data import load_documents

    docs = load_documents("mini-web").documents
    return docs[:15], docs[15:27] + ["x"]


def count_documents(hms) -> list[int]:
    """Documents each model's forward passes ran through (one count per model), counted at the embedding."""
    seen = [0] * len(hms)
    for i, hm in enumerate(hms):

        def hook(_mod, args, i=i):
            seen[i] += int(args[0].shape[0])  # input_ids [batch, pos]

        hm.model.get_input_embeddings().register_forward_pre_hook(hook)
    return seen


WORKER = """
import json, os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from rosettalens.crosscoder import extract_pairs
from test_crosscoder_shard import BATCH, HELD, HOOKS, TRAIN, count_documents, models, texts
rank = int(os.environ["RANK"])
hm_a, hm_b = models()
train, held = texts()
seen = count_documents((hm_a, hm_b))
out = {{}}
for name, docs, kw in (("train", train, TRAIN), ("held", held, HELD)):
    p = extract_pairs(hm_a, hm_b, docs, *HOOKS, batch_size=BATCH, progress=False, **kw)
    save_file({{"x_a": p.x_a, "x_b": p.x_b, "doc": p.doc, "pos_a": p.pos_a, "pos_b": p.pos_b}},
              {out!r} + f"/{{name}}-{{rank}}.safetensors")
    out[name] = {{"info": p.info, "documents": list(seen)}}
    seen[:] = [0, 0]
with open({out!r} + f"/rank-{{rank}}.json", "w") as f:
    json.dump(out, f)
"""


def test_two_ranks_share_the_forwards_and_return_the_pairs_of_one_process(tmp_path):
    hm_a, hm_b = models()
    train, held = texts()
    seen = count_documents((hm_a, hm_b))
    ref = {"train": extract_pairs(hm_a, hm_b, train, *HOOKS, batch_size=BATCH, progress=False, **TRAIN)}
    ref_docs = {"train": list(seen)}
    seen[:] = [0, 0]
    ref["held"] = extract_pairs(hm_a, hm_b, held, *HOOKS, batch_size=BATCH, progress=False, **HELD)
    ref_docs["held"] = list(seen)
    # a case worth sharding: rows dropped by the norm rule, the max_tokens cut inside the third batch
    t = ref["train"].info
    assert t["dropped_outliers"] > 0 and ref["held"].info["dropped_outliers"] > 0
    assert len(ref["train"]) == 1000 and t["n_texts"] == 3 * BATCH < len(train)
    assert ref_docs == {"train": [9, 9], "held": [13, 13]}

    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(REPO / "tests"), out=str(out))))
    run_torchrun([str(script)], cwd=tmp_path)

    ranks = [json.loads((out / f"rank-{k}.json").read_text()) for k in (0, 1)]
    for name, want in ref.items():
        for k in (0, 1):
            got = load_file(out / f"{name}-{k}.safetensors")
            for field in ("x_a", "x_b", "doc", "pos_a", "pos_b"):
                assert torch.equal(got[field], getattr(want, field)), (name, k, field)
            assert ranks[k][name]["info"] == want.info, (name, k)
    # each rank ran both models on its batches only: train batches 0 and 2 / 1, held 0, 2, 4 / 1, 3
    assert [ranks[k]["train"]["documents"] for k in (0, 1)] == [[6, 6], [3, 3]]
    assert [ranks[k]["held"]["documents"] for k in (0, 1)] == [[7, 7], [6, 6]]


def test_a_text_with_no_pair_left_adds_no_rows():
    hm_a, hm_b = models()
    _, held = texts()
    kw = dict(batch_size=1, progress=False, skip_first=2, norm_ratio=0.0)  # one text per forward
    with_x = extract_pairs(hm_a, hm_b, held[:2] + ["x"] + held[2:4], *HOOKS, **kw)  # "x": one pair, at 0/1
    without = extract_pairs(hm_a, hm_b, held[:4], *HOOKS, **kw)
    assert torch.equal(with_x.x_a, without.x_a) and torch.equal(with_x.x_b, without.x_b)
    assert with_x.info["dropped_first"] == without.info["dropped_first"] + 1
