"""Transcoders: the module against its textbook formula, file round trips, training and evaluation."""

from __future__ import annotations

import pytest
import torch

from rosettalens.errors import ConfigError, DataError, OutputExistsError, ShapeError
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
    save_circuit_tracer(tset, tmp_path / "ct", overwrite=True)  # an earlier export is replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):  # --overwrite replaces only an earlier export
        save_circuit_tracer(tset, tmp_path / "notes", overwrite=True)
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["mine.txt"]
    (tmp_path / "ct" / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    with pytest.raises(DataError, match="not supported"):
        load_circuit_tracer(tmp_path / "ct")


# ------------------------------------------------------------------------------------- sink rule
def test_keep_mask_rule():
    from rosettalens.transcoders.sinks import keep_mask

    x = torch.ones(2, 5, 4)
    y = torch.ones(2, 5, 3)
    y[0, 3] *= 50.0  # an outlier MLP output (50 x the median norm)
    x[1, 2] *= 20.0  # an outlier MLP input
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # row 1 left-padded
    k = keep_mask(x, y, mask, skip_first=1, norm_ratio=10.0)
    expected = torch.tensor([[False, True, True, False, True], [False, False, False, True, True]])
    assert torch.equal(k.mask, expected)
    assert k.medians == (2.0, pytest.approx(3**0.5))
    # norm test off: only first positions and padding
    k0 = keep_mask(x, y, mask, skip_first=1, norm_ratio=0)
    assert torch.equal(
        k0.mask, torch.tensor([[False, True, True, True, True], [False, False, False, True, True]])
    )


# ------------------------------------------------------------------------- tiny models: replace, eval
@pytest.fixture(scope="module")
def linear_hm():
    """A tiny Llama whose MLPs are replaced by fixed linear maps ``x @ M_L`` (what a ReLU transcoder of
    width 2d can represent exactly)."""
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_model

    torch.set_num_threads(1)
    m, tok = tiny_model("llama", seed=3)
    hm = HookedModel.from_hf(m, tok, name="tiny-linear")
    g = torch.Generator().manual_seed(5)
    maps = {}
    for L, block in enumerate(hm.layers):
        M = torch.randn(hm.cfg.d_model, hm.cfg.d_model, generator=g) / hm.cfg.d_model**0.5
        maps[L] = M
        block.mlp.forward = lambda x, M=M: x @ M
    hm.maps = maps
    return hm


def _exact_set(hm) -> TranscoderSet:
    d = hm.cfg.d_model
    tcs = {}
    eye = torch.eye(d)
    for L, M in hm.maps.items():
        tc = Transcoder(TranscoderConfig(layer=L, d_in=d, d_out=d, width=2 * d, arch="relu", norm_ratio=0))
        with torch.no_grad():
            tc.W_enc.copy_(torch.cat([eye, -eye], 1))  # f = [relu(x), relu(-x)]
            tc.b_enc.zero_()
            tc.W_dec.copy_(torch.cat([M, -M], 0))  # relu(x) @ M - relu(-x) @ M = x @ M
            tc.b_dec.zero_()
        tcs[L] = tc
    return TranscoderSet(hm.name, tcs)


def _texts():
    from rosettalens.data.sources import load_documents

    return load_documents("mini-web").documents[:10]


def test_exact_transcoders_score_one(linear_hm):
    from rosettalens.transcoders.evaluate import evaluate_transcoders

    r = evaluate_transcoders(_exact_set(linear_hm), linear_hm, _texts(), progress=False)
    for per in r["layers"].values():
        assert per["explained_variance"] == pytest.approx(1.0, abs=1e-5)
        assert per["dead_fraction"] == 0.0
        assert 0 < per["l0"] <= linear_hm.cfg.d_model
    assert r["ce_replaced"] == pytest.approx(r["ce_clean"], abs=1e-4)
    assert r["kl_replaced"] == pytest.approx(0.0, abs=1e-5)
    assert r["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)


def test_zero_transcoders_score_zero_and_ce_matches_hf(linear_hm):
    from rosettalens.transcoders.evaluate import evaluate_transcoders
    from rosettalens.transcoders.train import pad_id, tokenize_documents

    tset = _exact_set(linear_hm)
    for L in tset.layers:
        with torch.no_grad():
            tset[L].W_dec.zero_()
    texts = _texts()
    r = evaluate_transcoders(tset, linear_hm, texts, docs_per_forward=3, progress=False)
    assert r["ce_replaced"] == pytest.approx(r["ce_zero"], rel=1e-5)
    assert r["kl_replaced"] == pytest.approx(r["kl_zero"], rel=1e-5)
    assert r["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
    # clean CE against the HF model run one document at a time (predictions from positions >= 1)
    tot = n = 0.0
    for ids in tokenize_documents(linear_hm.tokenizer, texts, 128):
        t = torch.tensor([ids])
        with torch.no_grad():
            logits = linear_hm.model(input_ids=t).logits[0].float()
        ce = torch.nn.functional.cross_entropy(logits[1:-1], t[0, 2:], reduction="sum")
        tot += float(ce)
        n += len(ids) - 2
    assert pad_id(linear_hm.tokenizer) is not None
    assert r["ce_clean"] == pytest.approx(tot / n, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_replace_mlps_matches_plain_torch_hooks(family):
    """replace_mlps (through HookedModel) against the same replacement written with raw PyTorch hooks
    on the HF modules; positions left out keep the MLP's own output."""
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_model
    from rosettalens.transcoders.evaluate import replace_mlps

    m, tok = tiny_model(family, seed=2)
    hm = HookedModel.from_hf(m, tok)
    d = hm.cfg.d_model
    tset = TranscoderSet(
        hm.name,
        {L: _random_tc(layer=L, d_in=d, d_out=d, width=32, k=4, seed=L) for L in range(hm.cfg.n_layers)},
    )
    for tc in tset.transcoders.values():
        with torch.no_grad():
            tc.W_dec.mul_(0.05)
    ids = torch.randint(5, 300, (2, 9))
    keep = {L: torch.ones(2, 9, dtype=torch.bool) for L in tset.layers}
    for k in keep.values():
        k[:, 0] = False
    with replace_mlps(hm, tset, keep):
        ours = hm.forward(ids)
    out_mod = {"llama": "mlp", "gemma3": "post_feedforward_layernorm"}[family]
    handles, stash = [], {}
    for L, block in enumerate(hm.layers):
        handles.append(
            block.mlp.register_forward_pre_hook(lambda mod, args, L=L: stash.__setitem__(L, args[0]))
        )

        def post(mod, args, out, L=L):
            new = tset[L](stash[L])
            new[:, 0] = out[:, 0]
            return new

        handles.append(getattr(block, out_mod).register_forward_hook(post))
    try:
        with torch.no_grad():
            ref = m(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, hm.forward(ids), atol=1e-3)  # the replacement did change something


# ------------------------------------------------------------------------------------------ training
def test_train_learns_a_linear_mlp_and_saves_raw_units(linear_hm, tmp_path):
    from rosettalens.transcoders.evaluate import evaluate_transcoders
    from rosettalens.transcoders.train import TrainConfig, train_transcoders

    docs = _texts() * 6
    cfg = TrainConfig(width=64, k=8, skip=True, max_tokens=4000, batch_size=64, lr=5e-3, heldout=0.2)
    tset, held = train_transcoders(linear_hm, docs, cfg, progress=False)
    assert tset.layers == list(range(linear_hm.cfg.n_layers)) and held
    for L in tset.layers:
        c = tset[L].cfg
        assert (c.hook_in, c.hook_out, c.model) == (f"mlp_in.{L}", f"mlp_out.{L}", "tiny-linear")
        assert c.tokens > 0 and c.median_norm_in and c.median_norm_out
    tset.save(tmp_path / "set")
    back = TranscoderSet.load(tmp_path / "set")
    r = evaluate_transcoders(back, linear_hm, _texts(), progress=False)
    # a linear MLP is learnt by the skip connection: nearly all of its variance explained
    assert r["explained_variance_min"] > 0.95
    assert r["ce_loss_score"] > 0.9
    for per in r["layers"].values():
        assert 0 < per["l0"] <= 8


def test_train_lr_schedule_is_lr_factor_over_the_steps_run(linear_hm, monkeypatch):
    """The learning rate every optimiser step ran at (read from the optimiser itself) is the project's
    schedule ``lr_factor`` over exactly the number of steps that ran: warm-up, constant, linear decay,
    and no step wasted at learning rate 0."""
    import math

    from rosettalens.sae.train import lr_factor
    from rosettalens.transcoders.train import TrainConfig, train_transcoders

    lrs: dict[int, list[float]] = {}
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        lrs.setdefault(id(self), []).append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    # documents of unequal length and a batch size that divides no forward's token count: every forward
    # leaves a partial batch over
    docs = _texts() * 6
    cfg = TrainConfig(width=32, k=4, max_tokens=2500, batch_size=48, docs_per_forward=5, lr=1e-3,
                      warmup_frac=0.1, decay_frac=0.4, heldout=0.2, layers=[0, -1])  # fmt: skip
    tset, _ = train_transcoders(linear_hm, docs, cfg, progress=False)
    assert len(lrs) == len(tset.layers) == 2
    for L, seq in zip(tset.layers, lrs.values(), strict=True):
        n = len(seq)
        # the budget is reached: every layer trains on max_tokens tokens, in full batches but the last
        assert tset[L].cfg.tokens == cfg.max_tokens
        assert n == tset[L].cfg.info["steps"] == math.ceil(cfg.max_tokens / cfg.batch_size)
        warmup = round(cfg.warmup_frac * n)
        assert warmup >= 3 and int(cfg.decay_frac * n) >= 3  # both phases are exercised
        ref = [cfg.lr * lr_factor(i, n, warmup, cfg.decay_frac) for i in range(n)]
        torch.testing.assert_close(torch.tensor(seq), torch.tensor(ref), rtol=1e-12, atol=0)
        assert sum(v == 0 for v in seq) <= 1
        assert seq[0] < seq[warmup] == cfg.lr > seq[-1] > 0  # warm-up, plateau, decay


def test_train_short_corpus_stops_early_and_says_so(linear_hm, monkeypatch):
    """A corpus with fewer training tokens than the budget: every token is trained on, the steps follow
    the planned schedule as far as they go (none at learning rate 0), and the record says how far."""
    import math

    from rosettalens.sae.train import lr_factor
    from rosettalens.transcoders.train import TrainConfig, train_transcoders

    lrs: list[float] = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    # a norm ratio barely above 1 leaves out about half of the tokens, after the budget was set from the
    # token count
    cfg = TrainConfig(width=32, k=4, max_tokens=100_000, batch_size=32, docs_per_forward=3, heldout=0,
                      norm_ratio=1.05, layers=[1])  # fmt: skip
    tset, _ = train_transcoders(linear_hm, _texts()[:6], cfg, progress=False)
    info, tokens = tset[1].cfg.info, tset[1].cfg.tokens
    assert len(lrs) == info["steps"] == math.ceil(tokens / cfg.batch_size) < info["steps_planned"]
    planned, warmup = info["steps_planned"], round(cfg.warmup_frac * info["steps_planned"])
    ref = [cfg.lr * lr_factor(i, planned, warmup, cfg.decay_frac) for i in range(len(lrs))]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(ref), rtol=1e-12, atol=0)
    assert min(lrs) > 0 and tset.info["tokens"] == tokens


def test_train_resumes_bit_identical_from_a_checkpoint(linear_hm, tmp_path):
    """A run killed after its last checkpoint and started again ends with the same weights, bit for bit,
    as one that ran through; the checkpoint is removed at the end; a checkpoint written under another
    config, or a checkpoint folder holding other files, is refused."""
    import json

    from safetensors.torch import load_file

    from rosettalens.transcoders.train import TrainConfig, train_transcoders

    docs = _texts() * 3
    # a batch size that divides no forward's token count (rows wait across the checkpoint) and few enough
    # dead tokens that the AuxK loss and its counters are in play
    base = dict(width=96, k=4, max_tokens=1500, batch_size=48, docs_per_forward=3, dead_tokens=100,
                heldout=0.2, layers=[0, -1])  # fmt: skip
    seen: list[int] = []
    ref, _ = train_transcoders(linear_hm, docs, TrainConfig(**base), progress=False,
                               on_log=lambda r: seen.append(r["forwards"]))  # fmt: skip
    assert len(seen) >= 5
    ck = tmp_path / "ck"
    cfg = TrainConfig(**base, checkpoint_dir=str(ck), checkpoint_every=2)

    class Killed(Exception):
        pass

    def kill(rec):
        if rec["forwards"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train_transcoders(linear_hm, docs, cfg, progress=False, on_log=kill)
    assert json.loads((ck / "state.json").read_text())["forwards"] == 2
    state = load_file(ck / "state.safetensors")
    assert (state["0.since_fired"] >= base["dead_tokens"]).any() and state["0.x_wait"].shape[0] > 0
    with pytest.raises(ConfigError, match="another training config"):
        train_transcoders(linear_hm, docs, TrainConfig(**{**base, "lr": 1e-3}, checkpoint_dir=str(ck)),
                          progress=False)  # fmt: skip
    resumed: list[int] = []
    got, _ = train_transcoders(
        linear_hm, docs, cfg, progress=False, on_log=lambda r: resumed.append(r["forwards"])
    )
    assert resumed == seen[2:]  # the third forward is run again, the first two are not
    assert not ck.exists()
    assert got.layers == ref.layers and got.info["tokens"] == ref.info["tokens"]
    for L in ref.layers:
        a, b = ref[L].state_dict(), got[L].state_dict()
        assert a.keys() == b.keys() and "W_skip" in a
        for name in a:
            assert torch.equal(a[name], b[name]), (L, name)
        assert got[L].cfg.info == ref[L].cfg.info and got[L].cfg.tokens == ref[L].cfg.tokens
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="other than a transcoder checkpoint"):
        TrainConfig(checkpoint_dir=str(other)).validate()
    assert (other / "notes.txt").read_text() == "keep"


def test_train_bad_config():
    from rosettalens.transcoders.train import TrainConfig

    for bad in (
        dict(k=0),
        dict(width=8, k=9),
        dict(lr=-1.0),
        dict(heldout=1.0),
        dict(norm_ratio=0.5),
        dict(warmup_frac=0.8, decay_frac=0.5),
        dict(checkpoint_every=2),
        dict(checkpoint_every=-1, checkpoint_dir="ck"),
    ):
        with pytest.raises(ConfigError):
            TrainConfig(**bad).validate()


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rosettalens.models.tiny import tiny_model

    d = tmp_path_factory.mktemp("models") / "tiny-llama"
    m, t = tiny_model("llama", seed=1)
    m.save_pretrained(d)
    t.save_pretrained(d)
    return d


def test_cli_train_and_eval(model_dir, tmp_path, capsys):
    import json

    from rosettalens.cli import main

    out = tmp_path / "tc"
    args = ["transcoders", "train", "--model", str(model_dir), "--data", "mini-web", "--out", str(out),
            "--width", "32", "--k", "4", "--max-tokens", "600", "--batch-size", "64", "--layers", "0,-1",
            "--no-progress", "--json"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    n = TranscoderSet.load(out)
    last = len(n.transcoders) and max(n.layers)
    assert summary["layers"] == n.layers == [0, last] and last > 0
    assert set(summary["per_layer"]) == {"0", str(last)}
    assert summary["ce_zero"] > 0 and "ce_loss_score" in summary
    assert main(["transcoders", "eval", "--transcoders", str(out), "--data", "mini-web", "--max-tokens", "300",
                 "--no-progress", "--json"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == str(model_dir) and 0 <= r["per_layer"]["0"]["dead_fraction"] <= 1
    # an existing output is refused before any work, and kept
    before = sorted(p.name for p in out.iterdir())
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "0,x"], "--layers"),
        (["--layers", "7"], "out of range"),
        (["--width", "8", "--k", "9"], "larger than width"),
        (["--arch", "gated"], "invalid choice"),
        (["--data", "/nonexistent/file.txt"], ""),
        (["--heldout", "1.5"], ""),
        (["--checkpoint-every", "2"], "checkpoint_every needs a checkpoint_dir"),
    ],
)
def test_cli_bad_input(model_dir, tmp_path, capsys, extra, message):
    from rosettalens.cli import main

    base = ["transcoders", "train", "--model", str(model_dir), "--data", "mini-web", "--out", str(tmp_path / "o"),
            "--max-tokens", "100", "--no-progress"]  # fmt: skip
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("rosetta: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_train_checkpoint_options(model_dir, tmp_path, capsys):
    """--checkpoint-dir/--checkpoint-every reach the trainer: a folder holding other files is refused
    before any work; a run that checkpoints leaves the set and no checkpoint behind, and its weights equal
    those of a run without checkpoints."""
    from rosettalens.cli import main

    base = ["transcoders", "train", "--model", str(model_dir), "--data", "mini-web", "--width", "32", "--k", "4",
            "--max-tokens", "400", "--batch-size", "64", "--docs-per-forward", "4", "--layers", "1",
            "--eval-tokens", "0", "--no-progress"]  # fmt: skip
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    assert main(base + ["--out", str(tmp_path / "a"), "--checkpoint-dir", str(busy)]) == 2
    assert "other than a transcoder checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and (busy / "notes.txt").read_text() == "keep"
    ck = tmp_path / "ck"
    assert (
        main(base + ["--out", str(tmp_path / "a"), "--checkpoint-dir", str(ck), "--checkpoint-every", "1"])
        == 0
    )
    assert main(base + ["--out", str(tmp_path / "b")]) == 0
    assert not ck.exists()
    a, b = TranscoderSet.load(tmp_path / "a"), TranscoderSet.load(tmp_path / "b")
    assert "checkpoint_dir" not in a.info["train"]
    for name, t in a[1].state_dict().items():
        assert torch.equal(t, b[1].state_dict()[name]), name


def test_cli_eval_bad_set(tmp_path, capsys):
    from rosettalens.cli import main

    assert main(["transcoders", "eval", "--transcoders", str(tmp_path), "--data", "mini-web"]) == 2
    assert "not a transcoder set" in capsys.readouterr().err


def test_train_and_evaluate_every_family(tiny_hm):
    """Every adapted architecture: the MLP hooks, the sink rule and the replaced forward work, and the
    trained transcoders predict held-out MLP outputs better than their mean."""
    from rosettalens.transcoders.evaluate import evaluate_transcoders
    from rosettalens.transcoders.train import TrainConfig, train_transcoders

    torch.set_num_threads(1)
    cfg = TrainConfig(width=64, k=8, max_tokens=3000, batch_size=64, heldout=0.2)
    from rosettalens.data.sources import load_documents

    docs = load_documents("mini-web").documents  # distinct documents: the held-out ones are unseen
    tset, held = train_transcoders(tiny_hm, docs, cfg, progress=False)
    r = evaluate_transcoders(tset, tiny_hm, held, progress=False)
    assert tset.layers == list(range(tiny_hm.cfg.n_layers))
    for per in r["layers"].values():
        assert per["explained_variance"] > 0.05 and 0 < per["l0"] <= 8
    assert r["ce_zero"] > 0 and r["ce_replaced"] > 0 and r["kl_replaced"] >= 0
