"""SAE interop: the real sae-lens package loads our SAEs and we load its SAEs (same latents); sparsify
folders built from its on-disk format; hub ids fail cleanly offline."""

from __future__ import annotations

import json

import pytest
import torch

from rosettalens.errors import DataError
from rosettalens.sae import SAE, SAEConfig, TrainConfig, load_sae, train_saes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3072, 32, generator=g) * 4 + 2


@pytest.fixture(scope="module")
def trained(data):
    """One SAE of every architecture, trained on the same batches (input scale folded on the way out)."""
    cfgs = [
        SAEConfig(d_in=32, width=80, arch="relu", seed=1, model="m", hook="resid_post.1"),
        SAEConfig(d_in=32, width=80, arch="topk", k=6, seed=2, model="m", hook="resid_post.1"),
        SAEConfig(d_in=32, width=80, arch="batchtopk", k=6, seed=3, model="m", hook="resid_post.1"),
        SAEConfig(d_in=32, width=80, arch="jumprelu", seed=4, model="m", hook="resid_post.1"),
    ]
    return train_saes(data, cfgs, TrainConfig(batch_size=256, lr=2e-3), progress=False)


def _sae_lens():
    return pytest.importorskip("sae_lens")


def test_sae_lens_loads_our_saes_with_the_same_latents(trained, data, tmp_path):
    sl = _sae_lens()
    for sae in trained:
        d = tmp_path / sae.arch
        sae.save(d)
        peer = sl.SAE.load_from_disk(str(d), device="cpu")
        want = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[sae.arch]
        assert peer.cfg.architecture() == want
        assert peer.cfg.metadata.hook_name == "resid_post.1"
        with torch.no_grad():
            z_peer = peer.encode(data)
            z_ours = sae.encode(data)
            assert torch.allclose(z_peer, z_ours, atol=1e-5, rtol=1e-5), sae.arch
            assert torch.equal(z_peer > 0, z_ours > 0)
            assert torch.allclose(peer.decode(z_peer), sae.decode(z_ours), atol=1e-4)
        assert float((z_ours > 0).sum(1).float().mean()) > 0  # not a vacuous comparison


def _randomise(peer, seed: int, thr: bool = False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name != "threshold" else 0.2))
        if thr:
            peer.threshold.abs_()
    return peer


def test_we_load_sae_lens_saes_with_the_same_latents(data, tmp_path):
    sl = _sae_lens()
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    cases = {
        "standard": StandardSAE(StandardSAEConfig(d_in=32, d_sae=64)),
        "standard_no_bdec_in": StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, apply_b_dec_to_input=False)),
        "topk": TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=5)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=64)),
    }
    for i, (name, peer) in enumerate(cases.items()):
        _randomise(peer, i, thr=name == "jumprelu")
        peer.save_model(tmp_path / name)
        ours = SAE.load(tmp_path / name)
        assert ours.arch == {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[name.split("_")[0]]
        with torch.no_grad():
            z_peer = peer.encode(data)
            z_ours = ours.encode(data)
            assert torch.allclose(z_ours, z_peer, atol=1e-4, rtol=1e-5), name
            assert torch.allclose(ours.decode(z_ours), peer.decode(z_peer), atol=1e-4), name
        assert (z_ours > 0).any()
    del sl


def test_pre_6_saelens_config_is_read(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    t = {
        "W_enc": torch.randn(16, 40, generator=g),
        "b_enc": torch.randn(40, generator=g),
        "W_dec": torch.randn(40, 16, generator=g),
        "b_dec": torch.randn(16, generator=g),
    }
    d = tmp_path / "old"
    d.mkdir()
    save_file(t, str(d / "sae_weights.safetensors"))
    cfg = {"d_in": 16, "d_sae": 40, "hook_point": "blocks.3.hook_resid_pre", "activation_fn_str": "topk"}
    cfg["activation_fn_kwargs"] = {"k": 7}
    (d / "cfg.json").write_text(json.dumps(cfg))
    sae = SAE.load(d)
    assert sae.arch == "topk" and sae.cfg.k == 7 and sae.cfg.hook == "blocks.3.hook_resid_pre"
    x = torch.randn(50, 16, generator=g)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]  # the textbook TopK encoder, written out
    vals, idx = pre.topk(7, dim=1)
    want = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    assert torch.allclose(sae.encode(x).detach(), want, atol=1e-5)


def _sparsify_folder(d, d_in=24, n=60, k=5, seed=0, **extra):
    """A folder exactly as sparsify's ``SparseCoder.save_to_disk`` writes it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {
        "encoder.weight": torch.randn(n, d_in, generator=g) * 0.3,
        "encoder.bias": torch.randn(n, generator=g) * 0.1,
        "W_dec": torch.randn(n, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }
    d.mkdir(parents=True)
    save_file(t, str(d / "sae.safetensors"))
    cfg = {"expansion_factor": 32, "normalize_decoder": True, "num_latents": n, "k": k, "multi_topk": False}
    cfg.update({"skip_connection": False, "transcode": False, "activation": "topk", "d_in": d_in, **extra})
    (d / "cfg.json").write_text(json.dumps(cfg))
    return t


def test_sparsify_folder_matches_its_encoder(tmp_path):
    t = _sparsify_folder(tmp_path / "layers.2")
    sae = SAE.load(tmp_path / "layers.2")
    assert sae.arch == "topk" and sae.width == 60 and sae.cfg.k == 5
    x = torch.randn(40, 24)
    # sparsify: top-k of relu(encoder(x - b_dec)), decode as sum of acts * W_dec rows + b_dec
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    acts, idx = pre.topk(5, dim=1)
    want_z = torch.zeros_like(pre).scatter_(1, idx, acts)
    want_x = (acts[..., None] * t["W_dec"][idx]).sum(1) + t["b_dec"]
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), want_z, atol=1e-5)
        assert torch.allclose(sae(x), want_x, atol=1e-4)
    # num_latents = 0 means d_in * expansion_factor
    _sparsify_folder(tmp_path / "ef", d_in=4, n=8, num_latents=0, expansion_factor=2)
    assert SAE.load(tmp_path / "ef").width == 8


def test_unsupported_and_broken_peer_folders(tmp_path):
    _sparsify_folder(tmp_path / "gm", activation="groupmax")
    with pytest.raises(DataError, match="groupmax"):
        SAE.load(tmp_path / "gm")
    _sparsify_folder(tmp_path / "bad", n=60, num_latents=70)
    with pytest.raises(DataError, match="inconsistent cfg.json"):
        SAE.load(tmp_path / "bad")
    _sparsify_folder(tmp_path / "kbig", n=60, k=60)
    with pytest.raises(DataError, match="k must be"):
        SAE.load(tmp_path / "kbig")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cfg.json").write_text("{}")
    with pytest.raises(DataError, match="neither"):
        SAE.load(tmp_path / "empty")


def test_hub_id_offline_is_a_clean_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot download SAE"):
        load_sae("no-such-owner-xyz/no-such-sae-repo/layers.0")
    with pytest.raises(DataError, match="no such folder"):
        load_sae("./definitely/not/here")
