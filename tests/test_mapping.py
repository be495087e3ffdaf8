"""Mappers against planted answers: affine, orthogonal, low-rank, autoencoder; save/load; resume; transfer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import torch

from rosettalens.errors import ConfigError, DataError, RosettaError, ShapeError
from rosettalens.mapping import (
    AffineMapper,
    AutoencoderMapper,
    LowRankMapper,
    MapperError,
    OrthogonalMapper,
    jacobian,
    load_mapper,
    transfer_vector,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: intra-op threads only add contention on the shared 2-core test machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _planted_affine(n=600, d_src=16, d_tgt=12, noise=0.0, seed=0):
    g = _gen(seed)
    X = torch.randn(n, d_src, generator=g, dtype=F64) * 2 + 0.5
    W = torch.randn(d_tgt, d_src, generator=g, dtype=F64)
    b = torch.randn(d_tgt, generator=g, dtype=F64)
    Y = X @ W.T + b + noise * torch.randn(n, d_tgt, generator=g, dtype=F64)
    return X, Y, W, b


# ------------------------------------------------------------------------------------------- affine
def test_affine_recovers_noise_free_map_exactly():
    X, Y, W, b = _planted_affine()
    m = AffineMapper().fit(X, Y)
    assert m.fit_info["alpha"] == 0.0
    assert torch.allclose(m.weight, W, atol=1e-8, rtol=0)
    assert torch.allclose(m.bias, b, atol=1e-8, rtol=0)
    assert torch.allclose(m.transform(X), Y, atol=1e-8, rtol=0)


def test_affine_noisy_chooses_small_ridge_and_matches_ridge_formula():
    X, Y, W, b = _planted_affine(n=2000, noise=0.3, seed=1)
    m = AffineMapper().fit(X, Y)
    assert m.fit_info["alpha"] <= 1e-2
    assert (m.weight - W).abs().max() < 0.05
    # independent reference: ridge with unpenalised bias via augmented normal equations in numpy
    lam = m.fit_info["ridge_lambda"]
    Xa = np.hstack([X.numpy(), np.ones((len(X), 1))])
    P = np.eye(Xa.shape[1]) * lam
    P[-1, -1] = 0.0
    sol = np.linalg.solve(Xa.T @ Xa + P, Xa.T @ Y.numpy())
    assert np.allclose(m.weight.numpy(), sol[:-1].T, atol=1e-9)
    assert np.allclose(m.bias.numpy(), sol[-1], atol=1e-9)


def test_affine_heavy_noise_few_rows_picks_nonzero_ridge():
    # n barely above d: OLS overfits, validation should prefer shrinkage
    X, Y, _, _ = _planted_affine(n=40, d_src=30, d_tgt=4, noise=5.0, seed=2)
    m = AffineMapper().fit(X, Y)
    assert m.fit_info["alpha"] > 0.0
    fv = m.fit_info["val_fvu_by_alpha"]
    assert fv[repr(m.fit_info["alpha"])] == min(fv.values())


def test_affine_fixed_alpha_and_bad_args():
    X, Y, _, _ = _planted_affine(n=100)
    m = AffineMapper(alpha=0.5).fit(X, Y)
    assert m.fit_info["alpha"] == 0.5 and "val_fvu_by_alpha" not in m.fit_info
    with pytest.raises(ConfigError):
        AffineMapper(alpha=-1.0)
    with pytest.raises(ShapeError):
        AffineMapper().fit(X, Y[:-1])
    with pytest.raises(DataError):
        AffineMapper().fit(X[:0], Y[:0])
    bad = X.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(DataError):
        AffineMapper().fit(bad, Y)
    with pytest.raises(ShapeError):
        m.transform(torch.zeros(3, 5))
    with pytest.raises(MapperError):
        AffineMapper().transform(X)


def test_transform_keeps_leading_dims_and_dtype():
    X, Y, W, b = _planted_affine(n=200)
    m = AffineMapper().fit(X, Y)
    x3 = X[:24].reshape(2, 12, 16).float()
    out = m.transform(x3)
    assert out.shape == (2, 12, 12) and out.dtype == torch.float32
    assert torch.allclose(out.double(), (X[:24] @ W.T + b).reshape(2, 12, 12), atol=1e-4)


# ------------------------------------------------------------------------------------------- orthogonal
def test_orthogonal_recovers_rotation_scale_and_shift():
    g = _gen(3)
    X = torch.randn(500, 10, generator=g, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    Y = 2.5 * X @ Q + torch.arange(10, dtype=F64)
    m = OrthogonalMapper().fit(X, Y)
    assert torch.allclose(m.rotation, Q, atol=1e-10)
    assert abs(m.fit_info["scale"] - 2.5) < 1e-10
    assert torch.allclose(m.transform(X), Y, atol=1e-9)
    # independent reference: scipy's Procrustes analysis on noisy data (same disparity, same rotation)
    Yn = Y + 0.5 * torch.randn(Y.shape, generator=g, dtype=F64)
    m2 = OrthogonalMapper().fit(X, Yn)
    _, _, disparity = scipy.spatial.procrustes(Yn.numpy(), X.numpy())
    assert abs(m2.fit_info["disparity"] - disparity) < 1e-10
    Xc, Yc = X.numpy() - X.numpy().mean(0), Yn.numpy() - Yn.numpy().mean(0)
    R_ref, _ = scipy.linalg.orthogonal_procrustes(Xc, Yc)
    assert np.allclose(m2.rotation.numpy(), R_ref, atol=1e-10)


@pytest.mark.parametrize("d_src,d_tgt", [(6, 9), (9, 6)])
def test_orthogonal_unequal_widths(d_src, d_tgt):
    g = _gen(4)
    X = torch.randn(400, d_src, generator=g, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(max(d_src, d_tgt), max(d_src, d_tgt), generator=g, dtype=F64))
    R = Q[:d_src, :d_tgt]  # rows (or columns) orthonormal
    if d_src > d_tgt:
        # a map that drops dimensions can only be exact on data living in the kept subspace
        X = X @ R @ R.T
    Y = 0.7 * X @ R - 1.0
    m = OrthogonalMapper().fit(X, Y)
    assert torch.allclose(m.transform(X), Y, atol=1e-9)
    Rm = m.rotation
    k = min(d_src, d_tgt)
    gram = Rm @ Rm.T if d_src <= d_tgt else Rm.T @ Rm
    assert torch.allclose(gram, torch.eye(k, dtype=F64), atol=1e-10)
    if d_src <= d_tgt:
        assert torch.allclose(Rm, R, atol=1e-9)


# ------------------------------------------------------------------------------------------- low rank
def test_lowrank_recovers_planted_rank_r_map():
    g = _gen(5)
    X = torch.randn(800, 20, generator=g, dtype=F64)
    A = torch.randn(14, 3, generator=g, dtype=F64) @ torch.randn(3, 20, generator=g, dtype=F64)
    b = torch.randn(14, generator=g, dtype=F64)
    m = LowRankMapper(rank=3).fit(X, X @ A.T + b)
    assert torch.allclose(m.weight, A, atol=1e-8)
    assert torch.allclose(m.bias, b, atol=1e-8)
    # noisy: still rank exactly 3 and close to the truth; better than truncating OLS' SVD is not required
    Yn = X @ A.T + b + 0.2 * torch.randn(800, 14, generator=g, dtype=F64)
    mn = LowRankMapper(rank=3).fit(X, Yn)
    assert int(torch.linalg.matrix_rank(mn.weight)) == 3
    assert (mn.weight - A).norm() / A.norm() < 0.02
    # reduced-rank regression is the best rank-3 fit: no worse than rank-3 truncated OLS on training data
    ols = AffineMapper(alpha=0.0).fit(X, Yn)
    U, S, Vh = torch.linalg.svd(ols.weight)
    trunc = (U[:, :3] * S[:3]) @ Vh[:3]
    sse_rrr = ((mn.transform(X) - Yn) ** 2).sum()
    sse_trunc = ((X @ trunc.T + (Yn.mean(0) - X.mean(0) @ trunc.T) - Yn) ** 2).sum()
    assert sse_rrr <= sse_trunc + 1e-9
    with pytest.raises(ConfigError):
        LowRankMapper(rank=15).fit(X, Yn)


# ------------------------------------------------------------------------------------------- autoencoder
def _smooth(n, seed):
    gm = _gen(100)  # the planted map is the same for every call; only the inputs vary with seed
    A = torch.randn(6, 6, generator=gm) / 6**0.5
    B = torch.randn(6, 5, generator=gm) / 6**0.5
    X = torch.randn(n, 6, generator=_gen(seed))
    Y = torch.tanh(X @ A) @ B * 3 + 1.0
    return X, Y


def test_autoencoder_fits_smooth_map_and_early_stops():
    X, Y = _smooth(2000, 6)
    Y = Y + 0.05 * torch.randn(Y.shape, generator=_gen(7))
    m = AutoencoderMapper(hidden=64, lr=1e-2, batch_size=64, max_epochs=300, patience=4, seed=0)
    m.fit(X, Y, progress=False)
    assert m.fit_info["stopped_early"] and m.fit_info["epochs_run"] < 300
    assert m.fit_info["epochs_run"] == m.fit_info["best_epoch"] + 1 + 4
    Xt, Yt = _smooth(1000, 8)
    pred = m.transform(Xt)
    fvu = ((pred - Yt) ** 2).sum() / ((Yt - Yt.mean(0)) ** 2).sum()
    assert fvu < 0.05
    assert AutoencoderMapper().fit(X[:50], Y[:50], progress=False).fit_info["hidden"] == round((6 * 5) ** 0.5)


def test_autoencoder_deterministic_and_resume_equals_uninterrupted(tmp_path):
    X, Y = _smooth(600, 9)
    kw = dict(hidden=16, batch_size=32, max_epochs=6, patience=100, seed=3)
    ref = AutoencoderMapper(**kw).fit(X, Y, progress=False)
    again = AutoencoderMapper(**kw).fit(X, Y, progress=False)
    for k, v in ref._state().items():
        assert torch.equal(v, again._state()[k])

    class Killed(Exception):
        pass

    def kill_at_2(epoch, info):
        if epoch == 2:
            raise Killed

    ck = tmp_path / "ckpt"
    with pytest.raises(Killed):
        AutoencoderMapper(**kw).fit(X, Y, checkpoint_dir=ck, progress=False, callback=kill_at_2)
    assert json.loads((ck / "checkpoint.json").read_text())["state"]["epoch"] == 3
    seen = []
    resumed = AutoencoderMapper(**kw).fit(
        X, Y, checkpoint_dir=ck, progress=False, callback=lambda e, i: seen.append(e)
    )
    assert seen == [3, 4, 5]
    for k, v in ref._state().items():
        assert torch.equal(v, resumed._state()[k]), k
    assert resumed.fit_info["history"] == ref.fit_info["history"]
    # a checkpoint of another fit is refused, not silently continued
    with pytest.raises(MapperError):
        AutoencoderMapper(**{**kw, "seed": 4}).fit(X, Y, checkpoint_dir=ck, progress=False)
    (ck / "checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(MapperError):
        AutoencoderMapper(**kw).fit(X, Y, checkpoint_dir=ck, progress=False)


# ------------------------------------------------------------------------------------------- save / load
def _fitted_all():
    X, Y, _, _ = _planted_affine(n=300, d_src=8, d_tgt=6, noise=0.1)
    return X, [
        AffineMapper().fit(X, Y),
        OrthogonalMapper().fit(X, Y),
        LowRankMapper(rank=2).fit(X, Y),
        AutoencoderMapper(hidden=8, max_epochs=3).fit(X.float(), Y.float(), progress=False),
    ]


def test_save_load_round_trip_identical(tmp_path):
    X, mappers = _fitted_all()
    for m in mappers:
        d = m.save(tmp_path / m.kind, source_model="src-m", target_model="tgt-m", source_hook="resid_post.1")
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["kind"] == m.kind and cfg["source_model"] == "src-m" and cfg["target_hook"] is None
        loaded = load_mapper(d)
        assert type(loaded) is type(m) and loaded.meta["source_hook"] == "resid_post.1"
        for x in (X, X.float()):
            assert torch.equal(loaded.transform(x), m.transform(x))
        assert type(m).load(d).kind == m.kind
    with pytest.raises(MapperError):
        AffineMapper.load(tmp_path / "orthogonal")
    assert not list(tmp_path.rglob("*.tmp"))


def test_load_missing_or_corrupt_raises_typed_error(tmp_path):
    _, mappers = _fitted_all()
    d = mappers[0].save(tmp_path / "m")
    with pytest.raises(MapperError):
        load_mapper(tmp_path / "nope")
    w = d / "mapper.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(MapperError, match="sha256"):
        load_mapper(d)
    w.unlink()
    with pytest.raises(MapperError, match="missing"):
        load_mapper(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(MapperError):
        load_mapper(d)
    d2 = mappers[1].save(tmp_path / "k")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["kind"] = "quantum"
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MapperError, match="unknown kind"):
        load_mapper(d2)
    assert issubclass(MapperError, RosettaError)


# ------------------------------------------------------------------------------------------- transfer
def test_transfer_linear_is_W_v_without_bias():
    X, Y, W, b = _planted_affine()
    m = AffineMapper().fit(X, Y)
    v = torch.randn(16, generator=_gen(10), dtype=F64)
    assert torch.allclose(transfer_vector(m, v), W @ v, atol=1e-8)
    V = torch.randn(3, 16, generator=_gen(11), dtype=F64)
    assert torch.allclose(transfer_vector(m, V), V @ W.T, atol=1e-8)
    # the rule is the map's actual effect of adding v at any point
    assert torch.allclose(m.transform(X[:5] + v) - m.transform(X[:5]), (W @ v).expand(5, -1), atol=1e-8)
    assert torch.allclose(jacobian(m), W, atol=1e-8)
    with pytest.raises(ShapeError):
        transfer_vector(m, torch.zeros(7))


def test_transfer_calibration_matches_norm_ratio():
    X, Y, W, b = _planted_affine()
    m = AffineMapper().fit(X, Y)
    v = torch.randn(16, generator=_gen(12), dtype=F64)
    t = transfer_vector(m, v, calibrate=True)
    src_ratio = v.norm() / X.norm(dim=1).mean()
    tgt_ratio = t.norm() / Y.norm(dim=1).mean()
    assert abs(float(src_ratio - tgt_ratio)) < 1e-10
    cos = torch.nn.functional.cosine_similarity(t, W @ v, dim=0)
    assert cos > 1 - 1e-12


def test_transfer_autoencoder_rules():
    X, Y = _smooth(400, 13)
    m = AutoencoderMapper(hidden=16, max_epochs=5, seed=1).fit(X, Y, progress=False)
    anchors = X[:20].double()
    v = torch.randn(6, generator=_gen(14), dtype=F64)
    t = transfer_vector(m, v, anchors)
    # reference: central finite differences of the map, averaged over anchors
    eps = 1e-6
    fd = ((m.transform(anchors + eps * v) - m.transform(anchors - eps * v)) / (2 * eps)).mean(0)
    assert torch.allclose(t, fd, atol=1e-6)
    assert torch.allclose(jacobian(m, anchors) @ v, t, atol=1e-10)
    diff = transfer_vector(m, v, anchors, method="difference")
    assert torch.allclose(diff, (m.transform(anchors + v) - m.transform(anchors)).mean(0))
    # without anchors: the training-mean anchor
    assert transfer_vector(m, v).shape == (5,)
    # for a linear map given as an autoencoder (all ReLUs active), both rules equal W v
    lin = AutoencoderMapper(hidden=6, max_epochs=1).fit(X, Y, progress=False)
    with torch.no_grad():
        lin.net.net[0].weight.copy_(torch.eye(6))
        lin.net.net[0].bias.fill_(100.0)
    Wfull = (lin.net.sy * lin.net.net[2].weight / lin.net.sx).double()
    assert torch.allclose(transfer_vector(lin, v, anchors), Wfull @ v, atol=1e-6)
    assert torch.allclose(transfer_vector(lin, v, anchors, method="difference"), Wfull @ v, atol=1e-4)
    with pytest.raises(ConfigError):
        transfer_vector(m, v, anchors, method="magic")
