"""Transcoders: the module against its textbook formula, file round trips, training and evaluation."""

from __future__ import annotations

import pytest
import torch

from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.transcoders import Transcoder, TranscoderConfig, TranscoderSet


def _random_tc(layer=0, arch="topk", skip=False, d_in=6, d_out=5, width=16, k=3, seed=0) -> Transcoder:
    cfg = TranscoderConfig(
        layer=layer, d_in=d_in, d_out=d_out, width=width, arch=arch, k=k, skip=skip, seed=seed
    )
    tc = Transcoder(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return tc


def test_topk_keeps_exactly_k_largest():
    tc = _random_tc(k=3)
    with torch.no_grad():
        tc.b_enc.fill_(50.0)  # every pre-activation positive: exactly k survive the relu
    x = torch.randn(4, 7, 6)
    f = tc.encode(x)
    assert f.shape == (4, 7, 16)
    assert ((f != 0).sum(-1) == 3).all()
    pre = x @ tc.W_enc + tc.b_enc
    ref = torch.zeros_like(pre)
    top = pre.sort(-1, descending=True)
    ref.scatter_(-1, top.indices[..., :3], top.values[..., :3])
    torch.testing.assert_close(f, ref)


def test_topk_relu_and_relu_arch():
    tc = _random_tc(k=4)
    x = torch.randn(50, 6)
    f = tc.encode(x)
    assert (f >= 0).all() and ((f != 0).sum(-1) <= 4).all()
    relu = _random_tc(arch="relu")
    torch.testing.assert_close(relu.encode(x), (x @ relu.W_enc + relu.b_enc).clamp_min(0))


@pytest.mark.parametrize("skip", [False, True])
def test_forward_equals_formula(skip):
    tc = _random_tc(skip=skip)
    x = torch.randn(3, 6)
    pre = x @ tc.W_enc + tc.b_enc
    v, i = pre.topk(3, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v.clamp_min(0))
    y = f @ tc.W_dec + tc.b_dec
    if skip:
        y = y + x @ tc.W_skip
    torch.testing.assert_close(tc(x), y)
    torch.testing.assert_close(tc.decode(tc.encode(x)) + (x @ tc.W_skip if skip else 0), y)


def test_fold_scales_keeps_the_function():
    tc = _random_tc(skip=True)
    x, s_in, s_out = torch.randn(8, 6), 3.0, 0.25
    before_f, before_y = tc.encode(x * s_in), tc(x * s_in) / s_out
    tc.fold_scales(s_in, s_out)
    torch.testing.assert_close(tc.encode(x), before_f)
    torch.testing.assert_close(tc(x), before_y)
    assert tc.cfg.input_scale == s_in and tc.cfg.output_scale == s_out


@pytest.mark.parametrize("skip", [False, True])
def test_save_load_bit_exact(tmp_path, skip):
    tc = _random_tc(skip=skip, arch="relu" if skip else "topk")
    tc.cfg.info = {"fvu": 0.25}
    tc.save(tmp_path / "tc")
    back = Transcoder.load(tmp_path / "tc")
    assert back.cfg == tc.cfg
    for k, v in tc.state_tensors().items():
        assert torch.equal(back.state_tensors()[k], v)
    assert (back.W_skip is None) == (not skip)


def test_set_save_load_bit_exact(tmp_path):
    tcs = {L: _random_tc(layer=L, skip=L == 2, seed=L) for L in (0, 2, 3)}
    for L, tc in tcs.items():
        tc.cfg.hook_in, tc.cfg.hook_out, tc.cfg.model = f"mlp_in.{L}", f"mlp_out.{L}", "tiny"
    tset = TranscoderSet("tiny", tcs, info={"ce_loss_score": 0.5})
    tset.save(tmp_path / "set")
    names = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert names == ["layer_0.safetensors", "layer_2.safetensors", "layer_3.safetensors", "transcoders.json"]
    back = TranscoderSet.load(tmp_path / "set")
    assert back.model == "tiny" and back.layers == [0, 2, 3] and back.info == {"ce_loss_score": 0.5}
    x = torch.randn(5, 6)
    for L in tset.layers:
        assert back[L].cfg == tset[L].cfg
        for k, v in tset[L].state_tensors().items():
            assert torch.equal(back[L].state_tensors()[k], v)
        assert torch.equal(back[L](x), tset[L](x))
    with pytest.raises(ConfigError):
        back[1]
    # overwriting a set is allowed; a folder of other files is never replaced
    tset.save(tmp_path / "set")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(Exception, match="not a transcoder set"):
        tset.save(tmp_path / "other")


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError):
        TranscoderConfig(layer=0, d_in=4, d_out=4, width=8, k=9).validate()
    with pytest.raises(ConfigError):
        Transcoder(TranscoderConfig(layer=0, d_in=4, d_out=4, width=8, arch="gated"))  # type: ignore[arg-type]
    tc = _random_tc()
    with pytest.raises(ShapeError):
        tc(torch.randn(2, 7))
    with pytest.raises(DataError):
        TranscoderSet.load(tmp_path)
    tc.save(tmp_path / "tc")
    (tmp_path / "tc" / "transcoder.json").write_text("{}")
    with pytest.raises(DataError):
        Transcoder.load(tmp_path / "tc")


# ------------------------------------------------------------------------------------- circuit-tracer
def _write_ct(folder, layers, act, skip, d=6, width=12, k=3, listed=False):
    """A circuit-tracer folder written by hand in its layout (encoder stored [width, d_model])."""
    import yaml
    from safetensors.torch import save_file

    folder.mkdir()
    g = torch.Generator().manual_seed(7)
    raw = {}
    for L in range(layers):
        t = {
            "W_enc": torch.randn(width, d, generator=g),
            "b_enc": torch.randn(width, generator=g),
            "W_dec": torch.randn(width, d, generator=g),
            "b_dec": torch.randn(d, generator=g),
        }
        if skip:
            t["W_skip"] = torch.randn(d, d, generator=g)
        if act == "jumprelu":
            t["activation_function.threshold"] = torch.rand(width, generator=g)
        save_file(t, str(folder / f"layer_{L}.safetensors"))
        raw[L] = t
    cfg = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    if act != "jumprelu":
        cfg["activation"] = act
    if act == "topk":
        cfg["k"] = k
    if listed:
        cfg["transcoders"] = [f"layer_{L}.safetensors" for L in range(layers)]
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return raw


def _ct_forward(t, x, act, k=3):
    """circuit-tracer's SingleLayerTranscoder.forward, written out."""
    pre = torch.nn.functional.linear(x, t["W_enc"], t["b_enc"])
    if act == "relu":
        f = pre.relu()
    elif act == "topk":
        v, i = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    else:
        f = pre * (pre > t["activation_function.threshold"])
    y = f @ t["W_dec"] + t["b_dec"]
    return y + x @ t["W_skip"].T if "W_skip" in t else y


@pytest.mark.parametrize(
    ("act", "skip", "listed"), [("relu", True, False), ("topk", False, True), ("jumprelu", True, False)]
)
def test_load_circuit_tracer(tmp_path, act, skip, listed):
    from rosettalens.transcoders.interop import load_circuit_tracer

    raw = _write_ct(tmp_path / "ct", 3, act, skip, listed=listed)
    tset = load_circuit_tracer(tmp_path / "ct", model="tiny")
    assert tset.layers == [0, 1, 2] and tset.model == "tiny"
    x = torch.randn(4, 5, 6)
    for L in tset.layers:
        tc = tset[L]
        assert tc.cfg.arch == act and tc.cfg.skip == skip
        assert tc.cfg.hook_in == f"mlp_in.{L}" and tc.cfg.hook_out == f"mlp_out.{L}"
        torch.testing.assert_close(tc(x), _ct_forward(raw[L], x, act))


def test_circuit_tracer_round_trip_and_bad_folders(tmp_path):
    from rosettalens.transcoders.interop import load_circuit_tracer, save_circuit_tracer

    tset = TranscoderSet("tiny", {L: _random_tc(layer=L, skip=True, seed=L) for L in range(2)})
    save_circuit_tracer(tset, tmp_path / "ct")
    back = load_circuit_tracer(tmp_path / "ct")
    x = torch.randn(3, 6)
    for L in tset.layers:
        torch.testing.assert_close(back[L](x), tset[L](x))
        assert back[L].cfg.k == tset[L].cfg.k
    with pytest.raises(DataError, match="no config.yaml"):
        load_circuit_tracer(tmp_path)
    gap = TranscoderSet("tiny", {1: _random_tc(layer=1)})
    with pytest.raises(ConfigError):
        save_circuit_tracer(gap, tmp_path / "gap")
    (tmp_path / "ct" / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    with pytest.raises(DataError, match="not supported"):
        load_circuit_tracer(tmp_path / "ct")
