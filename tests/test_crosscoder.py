"""Crosscoders: known answers on planted data, the formulas against independent computations, pairing
of one and of two tokenizers on tiny models, splicing, save/load, bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from rosettalens.crosscoder import (
    CrossCoder,
    CrossCoderConfig,
    CrossCoderTrainConfig,
    auroc,
    classify_latents,
    evaluate_crosscoder,
    extract_pairs,
    latent_scaling,
    latent_stats,
    load_crosscoder,
    prompt_max_latents,
    splice_metrics,
    train_crosscoder,
)
from rosettalens.errors import ConfigError, DataError, ShapeError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ planted data
def sparse_data(n: int = 6000, d: int = 24, n_features: int = 48, seed: int = 0):
    """``x [n, d]``: sparse non-negative codes of a planted unit-norm dictionary, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    S = (torch.rand(n, n_features, generator=g) < 0.06) * torch.rand(n, n_features, generator=g) * 2
    return S @ D + 0.01 * torch.randn(n, d, generator=g), g


def _train(xa, xb, width=96, k=4, arch="batchtopk", epochs=8, lr=3e-3, **kw):
    cfg = CrossCoderConfig(d_a=xa.shape[1], d_b=xb.shape[1], width=width, k=k if arch == "batchtopk" else None,
                           arch=arch, **kw)  # fmt: skip
    tcfg = CrossCoderTrainConfig(batch_size=256, epochs=epochs, lr=lr)
    return train_crosscoder((xa, xb), cfg, tcfg, progress=False)


def test_model_against_itself_shares_every_live_latent():
    x, _ = sparse_data()
    cc = _train(x, x.clone())
    st = latent_stats(cc, x, x)
    ev = evaluate_crosscoder(cc, x, x)
    assert ev["a"]["explained_variance"] > 0.85 and ev["b"]["explained_variance"] > 0.85
    assert st["n_alive"] > 20
    assert st["n_shared"] >= 0.95 * st["n_alive"]
    assert st["n_a_only"] == 0 and st["n_b_only"] == 0
    assert st["shared_decoder_cosine_median"] > 0.99  # one space: the two decoder rows coincide
    # Latent Scaling: where a shared latent fires, A carries its B-direction in full (nu near 1)
    live = [j for j, c in enumerate(st["classes"]) if c == "shared"]
    nu = latent_scaling(cc, x, x, live)
    assert float(np.median([v for v in nu if v is not None])) == pytest.approx(1.0, abs=0.05)


def test_planted_direction_on_some_tokens_gives_a_b_only_latent_that_finds_them():
    x, g = sparse_data(n=8000, d=32, n_features=64, seed=2)
    v = torch.randn(x.shape[1], generator=g)
    v /= v.norm()
    trig = torch.rand(x.shape[0], generator=g) < 0.1
    xb = x + 3.0 * trig[:, None].float() * v  # B = A + a direction present on 10% of the tokens only
    cc = _train(x, xb, width=128, epochs=10)
    st = latent_stats(cc, x, xb)
    assert st["n_b_only"] == 1 and st["n_a_only"] == 0
    (j,) = st["latent_scaling"]["latents"]
    z = cc.encode(x, xb).detach()
    assert auroc(z[:, j], trig) > 0.99  # it fires on exactly the tokens that carry the direction
    assert torch.nn.functional.cosine_similarity(cc.W_dec_b[j].detach(), v, dim=0) > 0.95
    # Latent Scaling: A's reconstruction error holds none of this direction (nu near 0)
    assert abs(st["latent_scaling"]["nu_median"]) < 0.1
    # every other live latent is shared or near it
    assert st["n_shared"] >= 0.9 * (st["n_alive"] - 1)


def test_unrelated_activations_share_few_latents():
    """B independent of A (rows of another sample): a latent can fire in both only by chance."""
    x, _ = sparse_data(seed=6)
    y, _ = sparse_data(seed=7)
    cc = _train(x, y, epochs=12, lr=1e-2)
    st = latent_stats(cc, x, y)
    assert st["shared_fraction"] < 0.2
    assert st["n_a_only"] + st["n_b_only"] > 0.6 * st["n_alive"]


def test_l1_arch_trains_and_folds_decoder_norms_to_sum_one():
    x, _ = sparse_data(n=3000, seed=2)
    cc = _train(x, x.clone(), arch="l1", l1_coeff=0.05, epochs=4)
    na, nb = cc.decoder_norms()
    assert torch.allclose(na + nb, torch.ones_like(na), atol=1e-5)
    assert cc.threshold is None
    assert evaluate_crosscoder(cc, x, x)["a"]["explained_variance"] > 0.5


def test_fold_decoder_norms_keeps_forward():
    cfg = CrossCoderConfig(d_a=6, d_b=9, width=20, arch="l1", k=None)
    cc = CrossCoder(cfg)
    with torch.no_grad():
        cc.W_dec_a.mul_(torch.rand(20, 1) * 3)
        cc.b_enc.uniform_(-0.1, 0.1)
    xa, xb = torch.randn(50, 6), torch.randn(50, 9)
    before = cc(xa, xb)
    cc.fold_decoder_norms()
    after = cc(xa, xb)
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_encode_decode_match_the_formula():
    cfg = CrossCoderConfig(d_a=5, d_b=7, width=16, k=3)
    cc = CrossCoder(cfg)
    with torch.no_grad():
        for p in cc.parameters():
            p.normal_()
        cc.scale_a.fill_(0.5)
        cc.scale_b.fill_(2.0)
        cc.threshold.fill_(0.3)
    xa, xb = torch.randn(11, 5), torch.randn(11, 7)
    P = {k: v.detach().numpy().astype(np.float64) for k, v in cc.state_dict().items()}
    pre = (xa.numpy() * 0.5 - P["b_dec_a"]) @ P["W_enc_a"] + (xb.numpy() * 2.0 - P["b_dec_b"]) @ P["W_enc_b"]
    pre += P["b_enc"]
    z = np.where(pre > 0.3, pre, 0.0)
    ha = (z @ P["W_dec_a"] + P["b_dec_a"]) / 0.5
    hb = (z @ P["W_dec_b"] + P["b_dec_b"]) / 2.0
    got_a, got_b = cc(xa, xb)
    np.testing.assert_allclose(got_a.detach().numpy(), ha, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_b.detach().numpy(), hb, rtol=1e-4, atol=1e-4)


def test_latent_scaling_equals_least_squares():
    """nu = beta_a / beta_b, each beta the least-squares scalar of f d_b against each model's error with
    the latent's own contribution added back."""
    x, g = sparse_data(n=800, d=10, n_features=20, seed=3)
    xb = x + 0.3 * torch.randn(x.shape, generator=g)
    cc = _train(x, xb, width=40, k=3, epochs=2)
    with torch.no_grad():
        z = cc.encode(x, xb)
        ua, ub = x * cc.scale_a, xb * cc.scale_b
        ea = (ua - (z @ cc.W_dec_a + cc.b_dec_a)).double()
        eb = (ub - (z @ cc.W_dec_b + cc.b_dec_b)).double()
    live = [j for j in range(cc.width) if bool((z[:, j] > 0).any())][:5]
    got = latent_scaling(cc, x, xb, live)
    for j, nu in zip(live, got, strict=True):
        d = cc.W_dec_b[j].detach().double()
        f = z[:, j].double()
        A = (f[:, None] * d[None, :]).reshape(-1, 1)  # [n * d, 1]: the latent's contribution
        da = cc.W_dec_a[j].detach().double()
        beta_a = torch.linalg.lstsq(A, (ea + f[:, None] * da[None, :]).reshape(-1, 1)).solution.item()
        beta_b = torch.linalg.lstsq(A, (eb + f[:, None] * d[None, :]).reshape(-1, 1)).solution.item()
        assert nu == pytest.approx(beta_a / beta_b, rel=1e-6, abs=1e-9)
    # different widths: undefined
    cc2 = CrossCoder(CrossCoderConfig(d_a=4, d_b=6, width=8, k=2))
    assert latent_scaling(cc2, torch.randn(5, 4), torch.randn(5, 6), [0, 1]) == [None, None]


def test_auroc_against_all_pairs():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    ref = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auroc(s, y) == pytest.approx(ref)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    with pytest.raises(DataError):
        auroc([1, 2], [1, 1])


def test_classes_follow_the_documented_bands():
    rho = torch.tensor([0.0, 0.09, 0.1, 0.3, 0.5, 0.7, 0.8, 0.91, 1.0, 0.5])
    alive = torch.tensor([True] * 9 + [False])
    assert classify_latents(rho, alive) == [
        "a_only", "a_only", "other", "shared", "shared", "shared", "other", "b_only", "b_only", "dead",
    ]  # fmt: skip


def test_different_widths_report_no_cosine():
    x, g = sparse_data(n=2000, d=12, n_features=24, seed=4)
    Q = torch.linalg.qr(torch.randn(20, 12, generator=g))[0]  # B: A's space embedded in 20 dims
    cc = _train(x, x @ Q.T, width=48, k=3, epochs=4)
    st = latent_stats(cc, x, x @ Q.T)
    assert st["shared_decoder_cosine_median"] is None and st["latent_scaling"]["nu_median"] is None
    assert st["n_shared"] >= 0.9 * st["n_alive"]  # the same information, rotated: shared


def test_save_load_round_trip_is_bit_exact(tmp_path):
    x, _ = sparse_data(n=1200, seed=5)
    cc = _train(x, 2 * x, width=32, k=3, epochs=1)
    cc.save(tmp_path / "cc")
    back = load_crosscoder(tmp_path / "cc")
    for name, t in cc.state_tensors().items():
        assert torch.equal(t, back.state_tensors()[name]), name
    assert back.cfg == cc.cfg
    assert torch.equal(cc.encode(x, 2 * x), back.encode(x, 2 * x))
    assert back.info["train"]["steps"] == cc.info["train"]["steps"]
    with pytest.raises(DataError):
        load_crosscoder(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    from rosettalens.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        cc.save(tmp_path / "other")


def test_bad_input_raises_typed_errors():
    x = torch.randn(100, 8)
    cfg = CrossCoderConfig(d_a=8, d_b=8, width=16, k=2)
    with pytest.raises(ShapeError):
        train_crosscoder((x, x[:90]), cfg, progress=False)  # mismatched pair counts
    with pytest.raises(ShapeError):
        train_crosscoder((x, torch.randn(100, 9)), cfg, progress=False)  # width not the config's
    with pytest.raises(ConfigError):
        CrossCoderConfig(d_a=8, d_b=8, width=16, k=16).validate()
    with pytest.raises(ConfigError):
        CrossCoderConfig(d_a=8, d_b=8, width=16, arch="relu").validate()  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        CrossCoder(cfg).encode(x, x[:50])
    with pytest.raises(DataError):
        train_crosscoder((torch.ones(100, 8), x), cfg, CrossCoderTrainConfig(batch_size=10), progress=False)


# ------------------------------------------------------------------------------------ tiny models
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "One two three four five six seven eight nine ten.",
    "January February March April May June July August.",
    "How do I bake bread at home? Sure, here is how you do it.",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday.",
    "Activation spaces of different language models can be mapped onto each other.",
] * 4


@functools.lru_cache
def tiny(family: str = "llama", seed: int = 0):
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_model

    m, t = tiny_model(family, seed=seed)
    return HookedModel.from_hf(m, t, name=f"tiny-{family}-{seed}")


@functools.lru_cache
def tiny_other_tokenizer():
    """A tiny Qwen2-like model with a different (Metaspace, byte-fallback) tokenizer and vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_config

    corpus = [" ".join(TEXTS[:6])] * 5
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=380, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    cfg = tiny_config("qwen2", d_model=40)
    cfg.vocab_size = 400
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return HookedModel.from_hf(model, hf_tok, name="tiny-qwen2-sp")


def test_same_tokenizer_pairs_by_position_and_self_pair_is_shared():
    hm = tiny("llama")
    pairs = extract_pairs(hm, hm, TEXTS, "resid_post.1", "resid_post.1", progress=False)
    assert pairs.pairing == "all"
    assert torch.equal(pairs.x_a, pairs.x_b) and torch.equal(pairs.pos_a, pairs.pos_b)
    assert int(pairs.pos_a.min()) >= 1  # BOS (special) and the first position left out
    # the paired rows are the model's own activations at those positions (independent forward)
    ids = hm.tokenizer(TEXTS[0])["input_ids"]
    _, cache = hm.run_with_cache(torch.tensor([ids]), hooks=["resid_post.1"])
    rows = pairs.doc == 0
    torch.testing.assert_close(pairs.x_a[rows], cache["resid_post.1"][0, pairs.pos_a[rows]])


def test_two_tokenizers_pair_by_character_ends_end_to_end():
    hm_a, hm_b = tiny("llama"), tiny_other_tokenizer()
    pairs = extract_pairs(hm_a, hm_b, TEXTS, "resid_post.1", "resid_post.-1", progress=False)
    assert pairs.pairing == "aligned"
    assert pairs.x_a.shape[1] == 48 and pairs.x_b.shape[1] == 40
    # every pair ends at the same character of its text in both tokenizations
    from rosettalens.align import char_ends

    for i in range(len(pairs))[::7]:
        text = TEXTS[int(pairs.doc[i])]
        ea = char_ends(hm_a.tokenizer, text)[1][int(pairs.pos_a[i])]
        eb = char_ends(hm_b.tokenizer, text)[1][int(pairs.pos_b[i])]
        assert ea == eb >= 0
    cfg = CrossCoderConfig(d_a=48, d_b=40, width=64, k=4, hook_a="resid_post.1", hook_b="resid_post.1",
                           median_norm_a=pairs.info["median_norm_a"], median_norm_b=pairs.info["median_norm_b"])  # fmt: skip
    cc = train_crosscoder(
        (pairs.x_a, pairs.x_b), cfg, CrossCoderTrainConfig(batch_size=64, epochs=3, lr=3e-3), progress=False
    )
    st = latent_stats(cc, pairs.x_a, pairs.x_b)
    assert st["shared_decoder_cosine_median"] is None
    sp = splice_metrics(cc, hm_a, hm_b, TEXTS[:6])
    for m in ("a", "b"):
        assert np.isfinite(sp[m]["ce_spliced"]) and sp[m]["n_tokens"] > 0
    mx = prompt_max_latents(cc, hm_a, hm_b, TEXTS[:6], [0, 1, 2])
    assert mx.shape == (6, 3) and bool((mx >= 0).all())


def _identity_crosscoder(d_a: int, d_b: int) -> CrossCoder:
    """relu(x) - relu(-x) = x on each model's own latents: reconstructs both models exactly."""
    w = 2 * (d_a + d_b)
    cc = CrossCoder(
        CrossCoderConfig(d_a=d_a, d_b=d_b, width=w, arch="l1", k=None, skip_first=1, norm_ratio=0.0)
    )
    ea, eb = torch.eye(d_a), torch.eye(d_b)
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        cc.W_enc_a[:, :d_a], cc.W_enc_a[:, d_a : 2 * d_a] = ea, -ea
        cc.W_dec_a[:d_a], cc.W_dec_a[d_a : 2 * d_a] = ea, -ea
        o = 2 * d_a
        cc.W_enc_b[:, o : o + d_b], cc.W_enc_b[:, o + d_b :] = eb, -eb
        cc.W_dec_b[o : o + d_b], cc.W_dec_b[o + d_b :] = eb, -eb
    return cc


def test_splice_known_answers_exact_and_zero():
    hm = tiny("llama")
    hm_b = tiny("llama", seed=1)
    cc = _identity_crosscoder(48, 48)
    sp = splice_metrics(cc, hm, hm_b, TEXTS[:6], hook_a="resid_post.1", hook_b="resid_post.0")
    for m in ("a", "b"):
        assert sp[m]["ce_spliced"] == pytest.approx(sp[m]["ce_clean"], abs=1e-4)
        assert sp[m]["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
        assert sp[m]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    # an all-zero decoder reconstructs the decoder bias 0: splicing it equals zero-ablation
    with torch.no_grad():
        cc.W_dec_a.zero_()
        cc.W_dec_b.zero_()
    sp = splice_metrics(cc, hm, hm_b, TEXTS[:6], hook_a="resid_post.1", hook_b="resid_post.0")
    for m in ("a", "b"):
        assert sp[m]["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
        assert sp[m]["kl_score"] == pytest.approx(0.0, abs=1e-6)
    # the clean CE equals the model's own loss on those tokens (independent: HF labels)
    ids = torch.tensor([hm.tokenizer(TEXTS[0])["input_ids"]])
    one = splice_metrics(cc, hm, hm, TEXTS[:1], hook_a="resid_post.1", hook_b="resid_post.1")["a"]
    with torch.no_grad():
        logits = hm.model(ids).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    positions = range(1, ids.shape[1] - 1)  # past BOS (position 0, the sink), with a next token
    ref = -np.mean([float(lp[p, ids[0, p + 1]]) for p in positions])
    assert one["ce_clean"] == pytest.approx(ref, rel=1e-4)


def test_dedicated_latents_find_an_amplified_direction_a_plain_crosscoder_calls_shared():
    """B = A + 0.75 v on 10% of tokens where A already has 0.25 v: the direction is amplified, not new.
    A plain crosscoder keeps one latent for it (rho well below the B-only band); with tied shared rows
    and dedicated B latents, a B-only latent takes B's excess and fires on exactly those tokens."""
    x, g = sparse_data(n=8000, d=32, n_features=64, seed=2)
    v = torch.randn(x.shape[1], generator=g)
    v /= v.norm()
    trig = torch.rand(x.shape[0], generator=g) < 0.1
    on = 4.0 * trig[:, None].float() * v
    xa, xb = x + 0.25 * on, x + on
    plain = _train(xa, xb, width=128, k=6, epochs=10)
    st = latent_stats(plain, xa, xb)
    z = plain.encode(xa, xb).detach()
    best = max(range(plain.width), key=lambda j: auroc(z[:, j], trig) if bool((z[:, j] > 0).any()) else 0.0)
    assert auroc(z[:, best], trig) > 0.99 and float(st["rho"][best]) < 0.9 and st["n_b_only"] == 0

    cc = _train(xa, xb, width=128, k=6, epochs=10, dedicated_b=8, tie_shared=True)
    only_a, only_b = cc.dedicated_masks()
    assert int(only_b.sum()) == 8 and not bool(only_a.any())
    shared = ~only_b
    assert torch.equal(cc.W_dec_a[shared], cc.W_dec_b[shared])  # tied rows stay tied
    assert not cc.W_dec_a.detach()[only_b].any() and not cc.W_enc_a.detach()[:, only_b].any()
    z = cc.encode(xa, xb).detach()
    js = [j for j in torch.nonzero(only_b).flatten().tolist() if bool((z[:, j] > 0).any())]
    j = max(js, key=lambda j: auroc(z[:, j], trig))
    assert auroc(z[:, j], trig) > 0.99
    assert torch.nn.functional.cosine_similarity(cc.W_dec_b[j].detach(), v, dim=0) > 0.9
    st = latent_stats(cc, xa, xb)
    assert st["classes"][j] == "b_only"
    # saved and loaded with its structure
    assert CrossCoderConfig.from_dict(cc.cfg.to_dict()) == cc.cfg


def test_dedicated_and_tied_configs_are_checked():
    with pytest.raises(ConfigError, match="tie_shared needs one width"):
        CrossCoderConfig(d_a=4, d_b=6, width=8, k=2, tie_shared=True).validate()
    with pytest.raises(ConfigError, match="leave shared latents"):
        CrossCoderConfig(d_a=4, d_b=4, width=8, k=2, dedicated_a=4, dedicated_b=4).validate()
