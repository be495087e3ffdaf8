"""Crosscoder training under ``torchrun`` (2 gloo ranks on the CPU) against one process: the same global
batches, so the exact reference is the single-process crosscoder (equal up to float rounding). Through
the CLI the ranks also share the extraction (its exact test: ``test_crosscoder_shard.py``)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from cli_helpers import run_torchrun
from rosettalens.crosscoder import (
    CrossCoderConfig,
    CrossCoderTrainConfig,
    evaluate_crosscoder,
    load_crosscoder,
    train_crosscoder,
)

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("batchtopk", "l1")


pytestmark = pytest.mark.usefixtures("one_thread")


def paired(n=4096, d_a=24, d_b=32, shared=48, own=16, active=4, seed=0):
    """``(x_a [n, d_a], x_b [n, d_b])``: sparse codes over planted atoms, ``shared`` present in both
    models, ``own`` in A only and ``own`` in B only, plus a mean and a little noise."""
    g = torch.Generator().manual_seed(seed)
    F = shared + 2 * own
    Da = torch.randn(F, d_a, generator=g)
    Db = torch.randn(F, d_b, generator=g)
    Da[shared + own :] = 0  # B's own atoms are absent from A
    Db[shared : shared + own] = 0  # A's own atoms are absent from B
    Da = Da / Da.norm(dim=1, keepdim=True).clamp_min(1e-12)
    Db = Db / Db.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx = torch.randint(0, F, (n, active), generator=g)
    coef = torch.empty(n, active).exponential_(1.0, generator=g)
    S = torch.zeros(n, F).scatter_add_(1, idx, coef)
    xa = S @ Da + 0.3 * torch.randn(d_a, generator=g) + 0.05 * torch.randn(n, d_a, generator=g)
    xb = S @ Db + 0.3 * torch.randn(d_b, generator=g) + 0.05 * torch.randn(n, d_b, generator=g)
    return xa, xb


def train(arch: str):
    xa, xb = paired()
    cfg = CrossCoderConfig(d_a=xa.shape[1], d_b=xb.shape[1], width=256, arch=arch,
                           k=4 if arch == "batchtopk" else None, l1_coeff=0.3, seed=1)  # fmt: skip
    # dead_tokens of a few steps: AuxK (and its dead-latent counts) takes part in the comparison
    tcfg = CrossCoderTrainConfig(batch_size=256, epochs=3, lr=3e-3, dead_tokens=512, seed=2)
    return train_crosscoder((xa, xb), cfg, tcfg, progress=False)


WORKER = """
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_crosscoder_ddp import ARCHS, train
rank = int(os.environ["RANK"])
for arch in ARCHS:  # two trainings in one process share the group the first one made
    train(arch).save({out!r} + f"/{{arch}}-{{rank}}")
"""


def _close(a, b, what: str) -> None:
    for name, p in a.state_dict().items():
        q = b.state_dict()[name]
        assert torch.allclose(p, q, atol=2e-5, rtol=1e-4), (what, name, float((p - q).abs().max()))


def test_two_ranks_train_the_crosscoder_of_one_rank(tmp_path):
    single = {arch: train(arch) for arch in ARCHS}
    script = tmp_path / "worker.py"
    out = tmp_path / "multi"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(REPO / "tests"), out=str(out))))
    run_torchrun([str(script)], tmp_path)
    xa, xb = (x[:1000] for x in paired())  # the planted atoms: rows of the training data
    for arch in ARCHS:
        a = single[arch]
        r0, r1 = load_crosscoder(out / f"{arch}-0"), load_crosscoder(out / f"{arch}-1")
        assert a.info["train"]["world_size"] == 1 and r0.info["train"]["world_size"] == 2
        for name, p in r0.state_dict().items():  # all_reduce gives every rank the same sums
            assert torch.equal(p, r1.state_dict()[name]), (arch, name)
        # a run worth comparing: it learned the planted atoms, and (batchtopk) AuxK revived dead latents
        ev = evaluate_crosscoder(a, xa, xb)
        assert ev["a"]["explained_variance"] > 0.5 and ev["b"]["explained_variance"] > 0.5, (arch, ev)
        if arch == "batchtopk":
            assert max(h["dead_fraction"] for h in a.info["history"]) > 0
        _close(a, r0, arch)
        za, zb = a.encode(xa, xb).detach(), r0.encode(xa, xb).detach()
        assert torch.ne(za > 0, zb > 0).float().mean() < 1e-3
        # the logged statistics are those of the global batch
        for ha, hb in zip(a.info["history"], r0.info["history"], strict=True):
            assert ha["step"] == hb["step"] and ha["dead_fraction"] == hb["dead_fraction"]
            for k in ("fvu_a", "fvu_b", "l0"):
                assert abs(ha[k] - hb[k]) <= 1e-4 * max(1.0, abs(ha[k])), (arch, k, ha, hb)


def test_cli_under_torchrun_writes_once_and_equals_one_process(tmp_path, capsys):
    from cli_helpers import run_rosetta, save_tiny

    model = save_tiny(tmp_path / "tiny", "llama", seed=1)
    argv = ["crosscoder", "train", "--models", f"{model},{model}", "--hooks", "resid_post.0,resid_post.2",
            "--data", "mini-web", "--width", "64", "--k", "4", "--max-tokens", "1500", "--epochs", "2",
            "--batch-size", "128", "--norm-ratio", "1.5", "--device", "cpu", "--no-progress", "--json"]  # fmt: skip
    one = json.loads(run_rosetta(capsys, *argv, "--out", str(tmp_path / "one")))
    r = run_torchrun(["-m", "rosettalens.cli", *argv, "--out", str(tmp_path / "two")], tmp_path)
    two = json.loads(r.stdout)  # one JSON object: only rank 0 reports
    assert two["steps"] == one["steps"] > 0 and two["train_pairs"] == one["train_pairs"]
    a, b = load_crosscoder(tmp_path / "one"), load_crosscoder(tmp_path / "two")
    assert b.info["train"]["world_size"] == 2
    # the ranks shared the extraction and gathered the pairs of one process: its medians, counts and cut
    assert b.info["data"] == a.info["data"] and a.info["data"]["train"]["dropped_outliers"] > 0
    _close(a, b, "cli")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "tiny", "two"]  # nothing else written
    # eval: the ranks share the extraction, rank 0 alone scores and reports what one process reports
    ev = ["crosscoder", "eval", "--crosscoder", str(tmp_path / "two"), "--data", "mini-web", "--max-tokens", "600",
          "--device", "cpu", "--no-progress", "--json"]  # fmt: skip
    ev_one = json.loads(run_rosetta(capsys, *ev))
    ev_two = json.loads(run_torchrun(["-m", "rosettalens.cli", *ev], tmp_path).stdout)
    assert ev_two.keys() == ev_one.keys() and ev_one["n_tokens"] > 0
    assert ev_two["n_tokens"] == ev_one["n_tokens"] and ev_two["n_shared"] == ev_one["n_shared"]
    for model in ("a", "b"):
        assert ev_two["explained_variance"][model] == pytest.approx(
            ev_one["explained_variance"][model], abs=1e-6
        )
        assert ev_two["splice"][model]["ce_loss_recovered"] == pytest.approx(
            ev_one["splice"][model]["ce_loss_recovered"], abs=1e-6
        )
