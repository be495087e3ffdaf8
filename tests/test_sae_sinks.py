"""The sink rule (positions an SAE leaves out): known answers of the rule, its use in training, evaluation
and splicing."""

from __future__ import annotations

import math

import pytest
import torch

from rosettalens.errors import ConfigError
from rosettalens.sae import (
    SAE,
    SAEConfig,
    SinkRule,
    TrainConfig,
    evaluate_sae,
    keep_mask,
    splice_metrics,
    train_sae,
)
from rosettalens.sae.sinks import positions_of, sae_rule


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_keep_mask_known_answer_left_padded():
    # two documents, left-padded to 6 positions; every real token has norm 1 except the ones set below
    acts = _unit_rows(12, 4).reshape(2, 6, 4).clone()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    acts[0, 2] *= 100.0  # document 0's first token (a sink)
    acts[1, 4] *= 11.0  # an outlier inside document 1 (> 10 x median)
    acts[1, 5] *= 9.0  # large, but under the ratio
    acts[0, 0] *= 1e6  # padding: never kept, never in the median
    want = torch.tensor([[False, False, False, True, True, True], [False, True, True, True, False, True]])
    assert torch.equal(keep_mask(acts, mask), want)
    assert torch.equal(positions_of(mask)[0, 2:], torch.arange(4))
    # skip_first=2: also the second position of each document
    want2 = want.clone()
    want2[0, 3] = want2[1, 1] = False
    assert torch.equal(keep_mask(acts, mask, skip_first=2), want2)
    # norm test off: only positions (and padding)
    assert torch.equal(keep_mask(acts, mask, norm_ratio=0), positions_of(mask).ge(1) & mask.bool())
    # a given median: the threshold is ratio x that median, whatever the batch
    got = keep_mask(acts, mask, skip_first=0, norm_ratio=10.0, median_norm=0.5)  # threshold 5
    assert torch.equal(got, mask.bool() & (acts.norm(dim=-1) <= 5.0))


def test_keep_mask_rows_with_positions_and_rule_object():
    x = _unit_rows(8, 3)
    x[3] *= 50.0
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    want = torch.tensor([False, True, True, False, False, True, True, True])
    assert torch.equal(keep_mask(x, positions=pos), want)
    assert torch.equal(SinkRule().keep(x, positions=pos), want)
    assert torch.equal(keep_mask(x), torch.arange(8) != 3)  # no positions: norm test only
    with pytest.raises(ConfigError):
        SinkRule(norm_ratio=0.5)
    with pytest.raises(ConfigError):
        SinkRule(skip_first=-1)


def test_rule_is_saved_with_the_sae(tmp_path):
    sae = SAE(SAEConfig(d_in=4, width=8, arch="topk", k=2, skip_first=3, norm_ratio=7.0, median_norm=2.5))
    sae.save(tmp_path / "s")
    back = SAE.load(tmp_path / "s")
    assert sae_rule(back) == SinkRule(3, 7.0, 2.5)


def test_sink_row_with_huge_norm_is_left_out_of_training():
    """A first-position row of norm ~1000x and an outlier row elsewhere never reach a training batch:
    the input scale is the one of the other rows exactly."""
    n, d = 512, 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    pos = torch.arange(n) % 64
    x[pos == 0] *= 1000.0  # sinks
    x[100] *= 300.0  # an outlier at position 36
    cfg = SAEConfig(d_in=d, width=16, arch="topk", k=2)
    tcfg = TrainConfig(batch_size=64, tokens=256, norm_rows=n)
    sae = train_sae(x, cfg, tcfg, positions=pos, progress=False)
    keep = (pos >= 1) & (torch.arange(n) != 100)
    rec = sae.info["train"]["sinks"]
    assert rec["rows_left_out"] == n - int(keep.sum()) == 8 + 1
    assert sae.info["train"]["data"]["rows"]["subset"] == int(keep.sum())
    kept = x[keep].double()
    want_scale = math.sqrt(d / float((kept - kept.mean(0)).pow(2).sum(1).mean()))
    assert sae.input_scale == pytest.approx(want_scale, rel=1e-6)
    assert sae.cfg.median_norm == pytest.approx(float(x[pos >= 1].double().norm(dim=1).median()))
    # with the rule off, the sinks dominate the scale
    off = train_sae(x, SAEConfig(d_in=d, width=16, arch="topk", k=2, skip_first=0, norm_ratio=0), tcfg,
                    positions=pos, progress=False)  # fmt: skip
    assert off.input_scale < want_scale / 20
    # evaluation leaves the same rows out
    m = evaluate_sae(sae, x, positions=pos)
    assert m["n_left_out"] == 9 and m["n_tokens"] == n - 9


# ------------------------------------------------------------------------------------------ splicing
@pytest.fixture(scope="module")
def hm():
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_model

    m, t = tiny_model("llama", seed=1)
    return HookedModel(m.eval(), t, name="tiny-llama")


@pytest.fixture(scope="module")
def texts():
    from rosettalens.data import load_documents

    return load_documents("mini-web").documents[:8]


def _identity_sae(d: int, **kw) -> SAE:
    sae = SAE(SAEConfig(d_in=d, width=2 * d, arch="relu", **kw))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _zero_sae(d: int, **kw) -> SAE:
    sae = SAE(SAEConfig(d_in=d, width=8, arch="relu", **kw))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def test_splice_identity_recovers_everything(hm, texts):
    d = hm.hook_width("resid_post.1")
    got = splice_metrics(_identity_sae(d), hm, "resid_post.1", texts, batch_size=4)
    assert got["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert got["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert 0 < got["spliced_fraction"] <= 1


def test_splice_keeps_model_activation_at_left_out_positions(hm, texts):
    """A zero SAE with skip_first=3 is zero-ablation of positions >= 3 only: its CE equals the CE of that
    ablation done by hand (independent reference), and it scores exactly 0."""
    d = hm.hook_width("resid_post.1")
    sae = _zero_sae(d, skip_first=3, norm_ratio=0)
    got = splice_metrics(sae, hm, "resid_post.1", texts, batch_size=4, exclude_special=False)
    assert got["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    tot, n = 0.0, 0
    for t in texts:
        enc = hm.tokenize([t], max_length=256)
        ids = enc["input_ids"]

        def ablate(act, name):
            out = act.clone()
            out[:, 3:] = 0
            return out

        with torch.no_grad(), hm.patch({"resid_post.1": ablate}):
            logits = hm.forward(enc).float()
        logp = torch.log_softmax(logits, -1)
        tot += float(-logp[0, :-1].gather(-1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert got["ce_sae"] == pytest.approx(tot / n, rel=1e-5)
    every = splice_metrics(sae, hm, "resid_post.1", texts, batch_size=4, exclude_special=False, sinks=False)
    assert every["spliced_fraction"] == 1.0 and got["spliced_fraction"] < 1.0
    assert every["ce_sae"] > got["ce_sae"]
