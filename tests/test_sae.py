"""rosettalens.sae: architectures, trainer, evaluation and save/load, on synthetic data with known answers."""

from __future__ import annotations

import json

import pytest
import torch

from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.sae import SAE, SAEConfig, TrainConfig, evaluate_sae, train_sae, train_saes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small matmuls on a shared 2-core machine: one thread is much faster than two competing ones
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def planted(n: int, d: int = 48, m: int = 192, active: int = 4, seed: int = 0, offset: float = 3.0):
    """``x = codes @ D + offset``: ``active`` of ``m`` unit atoms ``D [m, d]`` per row, coefficients in
    [0.5, 2.5]; returns ``(x [n, d], D)``."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).topk(active, dim=1).indices
    coef = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return coef @ D + offset, D


def mean_max_cos(D: torch.Tensor, W_dec: torch.Tensor) -> float:
    """For every planted atom, the best cosine with a decoder row; averaged."""
    Wn = W_dec / W_dec.norm(dim=1, keepdim=True)
    return float((D @ Wn.T).max(1).values.mean())


ARCH_KW = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "relu": {"l1_coeff": 1.0}, "jumprelu": {}}


@pytest.mark.parametrize("arch", list(ARCH_KW))
def test_planted_dictionary_is_recovered(arch):
    x, D = planted(16000)
    cfg = SAEConfig(d_in=48, width=192, arch=arch, **ARCH_KW[arch])
    sae = train_sae(x, cfg, TrainConfig(batch_size=256, tokens=16000 * 4, lr=3e-3), progress=False)
    assert mean_max_cos(D, sae.W_dec.detach()) >= 0.95
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)  # unit rows after training (relu: folded)
    m = evaluate_sae(sae, x)
    assert m["fvu"] < 0.3 and m["dead_fraction"] < 0.2
    if arch == "topk":
        assert m["l0"] <= 4.0
    if arch in ("batchtopk", "jumprelu"):
        assert sae.threshold is not None and float(sae.threshold.detach().min()) > 0


def test_evaluate_matches_textbook_fvu_about_the_mean():
    x, _ = planted(3000, offset=5.0)
    sae = SAE(SAEConfig(d_in=48, width=96, arch="topk", k=8, seed=3))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    m = evaluate_sae(sae, x, batch_size=700)  # streamed in uneven batches

    X = x.double().numpy()
    Xh = sae(x).detach().double().numpy()
    want = ((X - Xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    about_zero = ((X - Xh) ** 2).sum() / (X**2).sum()
    assert m["fvu"] == pytest.approx(want, rel=1e-9)
    assert m["fvu"] > 3 * about_zero  # the large mean would flatter an about-zero FVU
    z = sae.encode(x)
    assert m["l0"] == pytest.approx(float((z > 0).sum(1).double().mean()))
    assert m["dead_fraction"] == pytest.approx(float(((z > 0).sum(0) == 0).double().mean()))


def test_several_saes_in_one_pass_equal_separate_runs():
    x, _ = planted(4096)
    tcfg = TrainConfig(batch_size=256, tokens=4096, lr=1e-3, seed=7)
    cfgs = [
        SAEConfig(d_in=48, width=96, arch="topk", k=4, seed=1),
        SAEConfig(d_in=48, width=128, arch="jumprelu", seed=2),
        SAEConfig(d_in=48, width=64, arch="relu", seed=3),
    ]
    together = train_saes(x, cfgs, tcfg, progress=False)
    for c, t in zip(cfgs, together, strict=True):
        alone = train_sae(x, SAEConfig.from_dict(c.to_dict()), tcfg, progress=False)
        for name, p in alone.state_dict().items():
            assert torch.equal(p, t.state_dict()[name]), (c.arch, name)


def test_save_load_round_trip_is_exact(tmp_path):
    x, _ = planted(2048)
    for arch, kw in ARCH_KW.items():
        sae = train_sae(
            x, SAEConfig(d_in=48, width=64, arch=arch, **kw), TrainConfig(batch_size=256), progress=False
        )
        sae.save(tmp_path / arch)
        back = SAE.load(tmp_path / arch)
        assert back.arch == arch and back.cfg.k == sae.cfg.k
        for name, p in sae.state_dict().items():
            assert torch.equal(p, back.state_dict()[name]), (arch, name)
        assert torch.equal(back.encode(x), sae.encode(x))
        assert back.input_scale == sae.input_scale != 1.0
        assert back.info["train"]["steps"] == 8
        assert sorted(p.name for p in (tmp_path / arch).iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_unfolded_scale_is_folded_on_save(tmp_path):
    sae = SAE(SAEConfig(d_in=16, width=40, arch="jumprelu", seed=1))
    with torch.no_grad():
        sae.scale.fill_(0.25)
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(100, 16) * 8
    sae.save(tmp_path / "s")
    back = SAE.load(tmp_path / "s")
    assert float(back.scale) == 1.0 and back.input_scale == pytest.approx(0.25)
    assert torch.allclose(back(x), sae(x), atol=1e-4)
    assert torch.allclose(back.encode(x), sae.encode(x) / 0.25, atol=1e-4)  # latents in input units


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_configs_raise_typed_errors(tmp_path):
    with pytest.raises(ConfigError, match="k must be"):
        SAEConfig(d_in=8, width=16, arch="topk", k=16).validate()
    with pytest.raises(ConfigError, match="needs k"):
        SAE(SAEConfig(d_in=8, width=16, arch="batchtopk"))
    with pytest.raises(ConfigError, match="unknown SAE architecture"):
        SAEConfig(d_in=8, width=16, arch="gated").validate()
    with pytest.raises(ShapeError, match="width 48 but the SAE config has d_in=32"):
        train_sae(torch.randn(512, 48), SAEConfig(d_in=32, width=64, arch="topk", k=4), progress=False)
    with pytest.raises(DataError, match="fewer than one batch"):
        train_sae(torch.randn(100, 8), SAEConfig(d_in=8, width=16, arch="relu"), TrainConfig(batch_size=128))


def test_missing_or_inconsistent_cfg_json(tmp_path):
    sae = SAE(SAEConfig(d_in=8, width=16, arch="topk", k=2))
    sae.save(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").unlink()
    with pytest.raises(DataError, match="has no cfg.json"):
        SAE.load(tmp_path / "a")
    sae.save(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    cfg["d_sae"] = 32
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="inconsistent"):
        SAE.load(tmp_path / "b")
    sae.save(tmp_path / "c")
    (tmp_path / "c" / "cfg.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        SAE.load(tmp_path / "c")
    with pytest.raises(DataError, match="does not exist"):
        SAE.load(tmp_path / "nope")


def test_sparse_topk_gradients_equal_dense_autograd():
    """The trainer's TopK path (sparse encoder backward, embedding-bag decoder) against plain autograd."""
    from rosettalens.sae.train import _GatherPre, _sparse_decode

    g = torch.Generator().manual_seed(0)
    d, w, k, n = 12, 40, 5, 30
    x = torch.randn(n, d, generator=g)
    params = {
        "W_enc": torch.randn(d, w, generator=g),
        "b_enc": torch.randn(w, generator=g) * 0.1,
        "W_dec": torch.randn(w, d, generator=g),
        "b_dec": torch.randn(d, generator=g),
    }

    def grads(fast: bool):
        p = {key: v.clone().requires_grad_(True) for key, v in params.items()}
        with torch.no_grad():
            x_in = x - p["b_dec"]
            pre_ng = x_in @ p["W_enc"] + p["b_enc"]
            idx = pre_ng.topk(k, dim=-1).indices
        if fast:
            vals = _GatherPre.apply(x_in, p["b_dec"], p["W_enc"], p["b_enc"], pre_ng, idx).relu()
            x_hat = _sparse_decode(vals, idx, p["W_dec"]) + p["b_dec"]
        else:
            pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
            z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
            x_hat = z @ p["W_dec"] + p["b_dec"]
        ((x - x_hat) ** 2).sum().backward()
        return {key: v.grad for key, v in p.items()}

    fast, ref = grads(True), grads(False)
    for key in params:
        assert torch.allclose(fast[key], ref[key], atol=1e-4, rtol=1e-4), key


def test_training_on_a_row_subset_equals_training_on_those_rows():
    x, _ = planted(3000)
    idx = torch.arange(0, 3000, 3)
    tcfg = TrainConfig(batch_size=200, tokens=2000, lr=1e-3)
    cfg = SAEConfig(d_in=48, width=64, arch="topk", k=4)
    a = train_sae(x, cfg, tcfg, rows=idx.flip(0), progress=False)  # order and duplicates do not matter
    b = train_sae(x[idx], SAEConfig.from_dict(cfg.to_dict()), tcfg, progress=False)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.b_dec, b.b_dec)
    with pytest.raises(ConfigError, match="subset"):
        train_sae(x, cfg, tcfg, rows=torch.tensor([5000]))


def test_save_replaces_an_sae_folder_but_never_a_foreign_one(tmp_path):
    """SAE.save and `sae train --overwrite` replace an SAE (or `sae train`'s folder of SAEs), nothing else."""
    from rosettalens.errors import OutputExistsError
    from rosettalens.sae.model import is_sae_dir, is_sae_output

    a = SAE(SAEConfig(d_in=8, width=16, arch="relu"))
    b = SAE(SAEConfig(d_in=8, width=32, arch="relu"))
    a.save(tmp_path / "s")
    b.save(tmp_path / "s")  # an SAE folder: replaced whole
    assert SAE.load(tmp_path / "s").width == 32
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not a SAE folder"):
        a.save(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    several = tmp_path / "several"
    a.save(several / "relu-w16")
    b.save(several / "relu-w32")
    assert is_sae_output(several) and not is_sae_dir(several)
    assert is_sae_output(tmp_path / "s") and not is_sae_output(tmp_path / "mine")
    (several / "notes.txt").write_text("x")
    assert not is_sae_output(several)
