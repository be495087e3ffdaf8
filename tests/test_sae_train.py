"""SAE trainer: checkpoint + resume == uninterrupted; torchrun (2 ranks, gloo) == 1 rank; store streaming."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from cli_helpers import run_torchrun
from rosettalens.errors import ConfigError, ShapeError
from rosettalens.sae import SAE, SAEConfig, TrainConfig, train_saes
from rosettalens.sae.train import batch_plan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real activation store of a tiny random Llama (resid_post.1 and attn_out.0, d = 48)."""
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_model
    from rosettalens.store import extract

    m, t = tiny_model("llama", seed=1)
    hm = HookedModel.from_hf(m, t, name="tiny-llama")
    out = tmp_path_factory.mktemp("sae_store") / "store"
    return extract(hm, "resid_post.1,attn_out.0", "mini-web", out, shard_size=700, progress=False)


def _cfgs():
    return [
        SAEConfig(d_in=48, width=64, arch="topk", k=4, seed=1),
        SAEConfig(d_in=48, width=96, arch="batchtopk", k=4, seed=2),
        SAEConfig(d_in=48, width=64, arch="jumprelu", seed=3),
        SAEConfig(d_in=48, width=64, arch="relu", seed=4),
    ]


def _tcfg(**kw):
    # dead_tokens small so AuxK is active within the run; small chunks/buffer so the shuffle plan matters
    base = dict(batch_size=128, lr=2e-3, dead_tokens=256, chunk_rows=100, buffer_size=500, seed=3)
    return TrainConfig(**{**base, **kw})


def test_batch_plan_is_a_shuffled_cover_of_the_rows():
    plan = batch_plan(1000, 100, chunk_rows=64, buffer_size=256, seed=0)
    first = torch.cat([next(plan) for _ in range(10)])
    assert sorted(first.tolist()) == list(range(1000))  # one epoch: every row once
    assert not torch.equal(first, torch.arange(1000))
    again = batch_plan(1000, 100, chunk_rows=64, buffer_size=256, seed=0)
    assert torch.equal(torch.cat([next(again) for _ in range(10)]), first)


def test_store_training_reads_the_hook_and_checks_width(store):
    saes = train_saes(store, [SAEConfig(d_in=48, width=64, arch="topk", k=4)], _tcfg(), hook="resid_post.1")
    assert saes[0].cfg.hook == "resid_post.1" and saes[0].cfg.model == "tiny-llama"
    assert saes[0].info["train"]["tokens"] == (len(store) // 128) * 128
    with pytest.raises(ShapeError, match="has width 48 but the SAE config has d_in=64"):
        train_saes(store, [SAEConfig(d_in=64, width=128, arch="topk", k=4)], _tcfg(), hook="resid_post.1")
    with pytest.raises(ConfigError, match="several hooks"):
        train_saes(store, [SAEConfig(d_in=48, width=64, arch="topk", k=4)], _tcfg())


def test_saes_of_several_hooks_from_one_pass(store):
    both = train_saes(
        store,
        [
            SAEConfig(d_in=48, width=64, arch="topk", k=4, seed=1, hook="resid_post.1"),
            SAEConfig(d_in=48, width=64, arch="topk", k=4, seed=1, hook="attn_out.0"),
        ],
        _tcfg(),
        progress=False,
    )
    assert [s.cfg.hook for s in both] == ["resid_post.1", "attn_out.0"]
    alone = train_saes(
        store, [SAEConfig(d_in=48, width=64, arch="topk", k=4, seed=1)], _tcfg(), hook="attn_out.0"
    )
    assert torch.equal(alone[0].W_dec, both[1].W_dec) and not torch.equal(both[0].W_dec, both[1].W_dec)
    assert both[1].input_scale == alone[0].input_scale != both[0].input_scale


def test_checkpoint_resume_equals_uninterrupted(store, tmp_path):
    ref = train_saes(store, _cfgs(), _tcfg(), hook="resid_post.1", progress=False)
    ckpt = tmp_path / "ckpt"

    class Crash(Exception):
        pass

    def crash_at_13(rec):
        if rec["step"] == 13:
            raise Crash

    with pytest.raises(Crash):
        train_saes(
            store,
            _cfgs(),
            _tcfg(checkpoint_dir=str(ckpt), checkpoint_every=5, log_every=1),
            hook="resid_post.1",
            on_log=crash_at_13,
            progress=False,
        )
    assert (ckpt / "state.json").is_file()  # step 10's checkpoint
    resumed = train_saes(
        store,
        _cfgs(),
        _tcfg(checkpoint_dir=str(ckpt), checkpoint_every=5, log_every=1),
        hook="resid_post.1",
        progress=False,
    )
    assert not ckpt.exists()  # a finished run removes its checkpoint
    for a, b in zip(ref, resumed, strict=True):
        for name, p in a.state_dict().items():
            assert torch.equal(p, b.state_dict()[name]), (a.arch, name)
    # a checkpoint from other configs is refused, not silently mixed in
    with pytest.raises(Crash):
        train_saes(
            store, _cfgs(), _tcfg(checkpoint_dir=str(ckpt), checkpoint_every=5), hook="resid_post.1",
            on_log=crash_at_13, progress=False,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="other SAE/training configs"):
        train_saes(
            store, _cfgs()[:2], _tcfg(checkpoint_dir=str(ckpt), checkpoint_every=5), hook="resid_post.1",
            progress=False,
        )  # fmt: skip


def test_a_checkpoint_dir_holding_other_files_is_refused_and_left_alone(store, tmp_path):
    """A checkpoint folder is replaced whole at each save and removed at the end: a folder that holds
    anything else is refused before any work, and keeps its files."""
    busy = tmp_path / "notes"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds files other than an SAE checkpoint"):
        train_saes(store, _cfgs(), _tcfg(checkpoint_dir=str(busy), checkpoint_every=5), hook="resid_post.1")
    assert (busy / "mine.txt").read_text() == "keep me" and len(list(busy.iterdir())) == 1
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        _tcfg(checkpoint_dir=str(afile), checkpoint_every=5).validate()


WORKER = """
import sys, torch
torch.set_num_threads(1)
from rosettalens.store import ActivationStore
from rosettalens.sae import SAEConfig, TrainConfig, train_saes
sys.path.insert(0, {tests!r})
from test_sae_train import _cfgs, _tcfg
saes = train_saes(ActivationStore.open({store!r}), _cfgs(), _tcfg(), hook="resid_post.1", progress=False)
import os
from rosettalens.store import _destroy_group
_destroy_group()  # what runs at exit: the group goes with its gloo threads (one left alive can abort the exit)
threads = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
assert not any(t.startswith(("pt_gloo", "gloo")) for t in threads), threads
if int(os.environ["RANK"]) == 0:
    for i, s in enumerate(saes):
        s.save({out!r} + f"/{{i}}")
"""


def test_torchrun_two_ranks_equal_one_rank(store, tmp_path):
    single = train_saes(store, _cfgs(), _tcfg(), hook="resid_post.1", progress=False)
    script = tmp_path / "worker.py"
    out = tmp_path / "multi"
    script.write_text(
        textwrap.dedent(WORKER.format(tests=str(REPO / "tests"), store=str(store.path), out=str(out)))
    )
    run_torchrun([str(script)])
    for i, a in enumerate(single):
        b = SAE.load(out / str(i))
        assert b.info["train"]["world_size"] == 2 and a.info["train"]["world_size"] == 1
        for name, p in a.state_dict().items():
            q = b.state_dict()[name]
            assert torch.allclose(p, q, atol=2e-5, rtol=1e-4), (a.arch, name, float((p - q).abs().max()))
        x = store.read("resid_post.1", slice(0, 500)).float()
        za, zb = a.encode(x), b.encode(x)
        assert (torch.ne(za > 0, zb > 0)).float().mean() < 1e-3
