"""SAE feature-space universality: filtered matching, paired scores with nulls, subspaces, layer grids,
and the `rosetta run sae-universality` pipeline on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rosettalens.errors import ConfigError, DataError, HookPointError
from rosettalens.similarity.universality import (
    MatchFilters,
    filter_match,
    load_subspaces,
    match_saes,
    paired_similarity,
    parse_layers,
    reduce_rows,
    subspace_scores,
)

# ------------------------------------------------------------------------------ synthetic "models"


def planted(n_tokens: int, n_features: int, d: int, seed: int, active: int = 3):
    """Sparse codes ``s [n, F]`` of a planted unit-norm dictionary ``D [F, d]``; token id of a row = its
    strongest feature (so feature i's top tokens are token i)."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_features, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    s = np.zeros((n_tokens, n_features))
    for t in range(n_tokens):
        idx = rng.choice(n_features, active, replace=False)
        s[t, idx] = rng.uniform(0.5, 2.0, active)
    return s, D, s.argmax(1)


def word(i: int) -> str:
    return f" w{i}"


NO_FILTERS = MatchFilters(min_corr=None, drop_nonconcept=False, shared_top_token=False, one_to_one="none")


def test_planted_dictionary_up_to_rotation_is_paired_and_far_above_null():
    F, d_a, d_b = 80, 24, 40
    s, D, tok = planted(3000, F, d_a, seed=0)
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.standard_normal((d_b, d_a)))[0]  # [d_b, d_a] orthonormal columns: rotate + embed
    perm = rng.permutation(F)  # B's features in another order
    codes_b, W_b = s[:, perm], (D @ Q.T)[perm]
    fm = match_saes(s, codes_b, tok, tok, word, word, MatchFilters(min_corr=0.5))
    assert len(fm.kept) == F and np.all(perm[fm.kept.b] == fm.kept.a)  # every feature found its twin
    r = paired_similarity(D, W_b, fm.kept, n_permutations=100, seed=0)
    assert r["svcca"] > 0.999 and r["linear_cka"] > 0.999
    assert r["svcca_null_mean"] < 0.7 and r["svcca_p"] == pytest.approx(1 / 101)
    assert r["rsa"] > 0.8 and r["rsa_p"] == pytest.approx(1 / 101)
    # the SVCCA reduction keeps at most a quarter of the rows per side
    assert max(r["svcca_dims"]) <= F // 4


def test_unrelated_dictionaries_are_not_above_null():
    F, d = 80, 24
    s, D, tok = planted(3000, F, d, seed=2)
    s2, D2, tok2 = planted(3000, F, d, seed=3)
    fm = match_saes(s, s2, tok, tok2, word, word, NO_FILTERS)
    assert np.abs(fm.kept.corr).max() < 0.2
    r = paired_similarity(D, D2, fm.kept, n_permutations=200, seed=0)
    assert r["svcca_p"] > 0.01 and r["rsa_p"] > 0.01
    assert abs(r["svcca"] - r["svcca_null_mean"]) < 4 * r["svcca_null_std"]


def test_match_equals_bruteforce_max_correlation():
    s, _, tok = planted(800, 20, 8, seed=4)
    rng = np.random.default_rng(5)
    b = s @ rng.standard_normal((20, 15)) + 0.1 * rng.standard_normal((800, 15))
    fm = match_saes(s, b, tok, tok, word, word, NO_FILTERS)
    c = np.corrcoef(s.T, b.T)[:20, 20:]
    np.testing.assert_array_equal(fm.all.b, c.argmax(1))
    np.testing.assert_allclose(fm.all.corr, c.max(1), atol=1e-9)


def _two_to_one():
    """A0 and A1 both match B0 best (A1 better); A2 matches B1; A3's top tokens are punctuation."""
    rng = np.random.default_rng(6)
    n = 2000
    b = np.zeros((n, 3))
    for j in range(3):
        on = rng.random(n) < 0.2
        b[on, j] = rng.uniform(0.5, 2, on.sum())
    b[b[:, 1] > 0, 2] = 0  # B1 and B2 never fire together
    a = np.zeros((n, 4))
    a[:, 0] = b[:, 0] + (rng.random(n) < 0.1) * rng.uniform(0.5, 2, n)  # noisy copy of B0
    a[:, 1] = b[:, 0]  # exact copy of B0
    a[:, 2] = b[:, 1]
    a[:, 3] = b[:, 2]
    ids = np.where(b[:, 1] > 0, 1, np.where(b[:, 2] > 0, 2, 0))
    ids = np.where(b.max(1) == 0, 3, ids)  # rows where nothing fires
    vocab_a = {0: " jan", 1: " feb", 2: ",", 3: " the"}
    vocab_b = {0: "jan", 1: "FEB", 2: ",", 3: "the"}
    return a, b, ids, vocab_a, vocab_b


def test_filters_nonconcept_shared_token_and_one_to_one_best_vs_first():
    a, b, ids, va, vb = _two_to_one()
    base = match_saes(a, b, ids, ids, va, vb, NO_FILTERS)
    assert list(base.kept.a) == [0, 1, 2, 3] and list(base.kept.b) == [0, 0, 1, 2]
    best = filter_match(base.all, va, vb, MatchFilters(min_corr=None, top_k=5))
    # A3 (top tokens all ",") is non-concept; A2/B1 share "feb" (case and space normalised); of A0, A1 -> B0
    # the best correlation (A1, exact copy) is kept
    assert best.removed == {"nonconcept": 1, "shared_top_token": 0, "one_to_one": 1}
    assert list(best.kept.a) == [1, 2]
    first = filter_match(base.all, va, vb, MatchFilters(min_corr=None, one_to_one="first"))
    assert list(first.kept.a) == [0, 2]  # the paper's code: the first A feature (lowest index)
    # correlation threshold: the noisy copy falls below 0.99
    thr = filter_match(base.all, va, vb, MatchFilters(min_corr=0.99, drop_nonconcept=False,
                                                      shared_top_token=False, one_to_one="none"))  # fmt: skip
    assert list(thr.kept.a) == [1, 2, 3] and thr.removed == {"min_corr": 1}
    # no shared top token: B's vocabulary spells every token differently
    other = {k: f"x{k}" for k in vb}
    none = filter_match(base.all, va, other, MatchFilters(min_corr=None, drop_nonconcept=False))
    assert len(none.kept) == 0 and none.removed["shared_top_token"] == 4


def test_filters_reject_bad_options():
    with pytest.raises(ConfigError):
        MatchFilters(one_to_one="last").validate()
    with pytest.raises(ConfigError):
        MatchFilters(min_corr=2.0).validate()


def test_reduce_rows_matches_numpy_pca():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((50, 30)) @ np.diag(np.linspace(3, 0.1, 30))
    out = reduce_rows(torch.from_numpy(w), keep_variance=0.9, max_dims=40).numpy()
    wc = w - w.mean(0)
    u, s, _ = np.linalg.svd(wc, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.9) + 1)
    assert out.shape == (50, k)
    np.testing.assert_allclose(np.abs(out), np.abs(u[:, :k] * s[:k]), atol=1e-9)
    assert reduce_rows(torch.from_numpy(w), 0.9, 3).shape == (50, 3)


def test_too_few_pairs_give_none_not_a_number():
    s, D, tok = planted(500, 10, 8, seed=8)
    fm = match_saes(s, s, tok, tok, word, word, NO_FILTERS)
    r = paired_similarity(D, D, fm.kept.subset(np.arange(5)), n_permutations=10)
    assert r["n_pairs"] == 5 and r["svcca"] is None and r["svcca_p"] is None


def test_subspace_scores_on_keyword_features():
    F, d = 60, 20
    s, D, tok = planted(4000, F, d, seed=9)
    months = load_subspaces()["Months"]
    vocab = {i: (f" {months[i].title()}" if i < 12 else f" w{i}") for i in range(F)}
    R = np.linalg.qr(np.random.default_rng(10).standard_normal((d, d)))[0]
    fm = match_saes(s, s, tok, tok, vocab, vocab, MatchFilters(min_corr=0.5))
    rows = subspace_scores(D, D @ R, fm.kept, {"Months": months, "Emotions": ["happy"]}, n_permutations=1000)
    by = {r["name"]: r for r in rows}
    assert by["Months"]["n_pairs"] == 12 and by["Months"]["svcca"] > 0.999
    assert by["Months"]["svcca_p"] == pytest.approx(1 / 1001)
    assert by["Emotions"]["n_pairs"] == 0 and by["Emotions"]["svcca"] is None


def test_bundled_keyword_lists():
    subs = load_subspaces()
    for name in ("Time", "Calendar", "Months", "Numbers", "People/Roles", "Nature", "Emotions", "Countries",
                 "Body", "Food"):  # fmt: skip
        assert name in subs and len(subs[name]) >= 10
    assert "january" in subs["Months"] and all(w == w.strip().lower() for ws in subs.values() for w in ws)


def test_keyword_file_errors(tmp_path):
    with pytest.raises(DataError):
        load_subspaces(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Food": "bread"}))
    with pytest.raises(DataError):
        load_subspaces(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"Food": [" Bread", "rice"]}))
    assert load_subspaces(ok) == {"Food": ["bread", "rice"]}


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("all", ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3])),
        ("stride:2", ([0, 2, 4], [0, 2])),
        ("auto:2", ([1, 4], [1, 3])),
        ("1,-1", ([1, 5], [1, 3])),
        ("0,2/3", ([0, 2], [3])),
    ],
)
def test_parse_layers(spec, expect):
    assert parse_layers(spec, 6, 4) == expect


def test_parse_layers_default_spreads_over_depth():
    la, lb = parse_layers(None, 30, 24)
    assert la == [3, 9, 15, 21, 27] and lb == [2, 7, 12, 16, 21]


@pytest.mark.parametrize("spec", ["0,6", "9/1", "1/-5"])
def test_parse_layers_out_of_range(spec):
    with pytest.raises(HookPointError, match="out of range"):
        parse_layers(spec, 6, 4)


@pytest.mark.parametrize("spec", ["stride:0", "stride:x", "1/2/3", "a,b"])
def test_parse_layers_bad_spec(spec):
    with pytest.raises(ConfigError):
        parse_layers(spec, 6, 4)


# ------------------------------------------------------------------------------ with trained SAEs


def _train(x: np.ndarray, width: int, k: int, seed: int):
    from rosettalens.sae.model import SAEConfig
    from rosettalens.sae.train import TrainConfig, train_saes

    t = torch.from_numpy(x).float()
    cfg = SAEConfig(d_in=t.shape[1], width=width, arch="topk", k=k, seed=seed)
    tc = TrainConfig(batch_size=128, tokens=10 * len(t), lr=1e-2, seed=seed)
    return train_saes(t, [cfg], tc, progress=False)[0]


def test_trained_saes_on_two_rotated_models_pair_features_far_above_null():
    """Two synthetic "models" share a planted dictionary up to a rotation (and another width); SAEs trained
    on each recover it, matching pairs their features, and paired SVCCA is far above the shuffled null.
    A third model with an unrelated dictionary is not."""
    F, d, n = 24, 12, 2000
    s, D, tok = planted(n, F, d, seed=11, active=2)
    rng = np.random.default_rng(12)
    Q = np.linalg.qr(rng.standard_normal((20, d)))[0]  # [20, 12]: model B is 20-dimensional
    xa = s @ D + 0.01 * rng.standard_normal((n, d))
    xb = s @ D @ Q.T + 0.01 * rng.standard_normal((n, 20))
    s2, D2, _ = planted(n, F, d, seed=13, active=2)
    xc = s2 @ D2
    sae_a, sae_b, sae_c = _train(xa, F, 2, 0), _train(xb, F, 2, 1), _train(xc, F, 2, 2)
    enc = {n: sae.encode(torch.from_numpy(x).float()).detach() for n, sae, x in
           (("a", sae_a, xa), ("b", sae_b, xb), ("c", sae_c, xc))}  # fmt: skip
    # the SAEs found the planted directions (max |cos| with a true atom), so the pairs are meaningful
    cos = np.abs(sae_a.W_dec.detach().double().numpy() @ D.T).max(1)
    assert np.median(cos) > 0.9
    filt = MatchFilters(min_corr=0.5, drop_nonconcept=False, shared_top_token=True)
    fm = match_saes(enc["a"], enc["b"], tok, tok, word, word, filt)
    assert len(fm.kept) >= F // 2
    r = paired_similarity(sae_a.W_dec, sae_b.W_dec, fm.kept, n_permutations=100)
    assert r["svcca"] > 0.85 and r["svcca"] > r["svcca_null_mean"] + 0.3 and r["svcca_p"] < 0.02
    un = match_saes(enc["a"], enc["c"], tok, tok, word, word, NO_FILTERS)
    ru = paired_similarity(sae_a.W_dec, sae_c.W_dec, un.kept, n_permutations=100)
    assert ru["svcca"] < ru["svcca_null_mean"] + 4 * ru["svcca_null_std"] and ru["svcca_p"] > 0.01


# ------------------------------------------------------------------------------ the experiment


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random models saved as HF folders: llama (BOS tokenizer), qwen2 (another tokenizer), llama 2."""
    from rosettalens.models.tiny import tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for name, fam, seed in (("llama", "llama", 0), ("qwen", "qwen2", 1), ("llama2", "llama", 5)):
        model, tok = tiny_model(fam, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _cfg(models: str, out, **kw):
    from rosettalens.experiments.sae_universality import SAEUniversalityConfig

    # built-in text: the offline corpus is built from the machine's installed packages, so its order differs
    base = dict(models=models, layers="0,2/1,2", max_tokens=1500, width=32, k=4, epochs=2, batch_size=128,
                n_permutations=20, n_subspace_permutations=1000, data="mini-web,sequences", out=str(out))  # fmt: skip
    base.update(kw)
    return SAEUniversalityConfig(**base)


@pytest.fixture(scope="module")
def cross_run(tiny_dirs, tmp_path_factory):
    from rosettalens.experiments.sae_universality import run

    out = tmp_path_factory.mktemp("runs") / "cross"
    return run(_cfg(f"{tiny_dirs['llama']},{tiny_dirs['qwen']}", out), progress=False), out


def test_pipeline_across_tokenizers_writes_every_output(cross_run):
    s, out = cross_run
    assert s["models"] == ["llama", "qwen"] and s["run_dir"] == str(out)
    assert s["pairing"]["mode"].startswith("character offsets") and s["pairing"]["n_pairs"] > 1000
    assert [(p["layer_a"], p["layer_b"]) for p in s["pairs"]] == [(0, 1), (0, 2), (2, 1), (2, 2)]
    for p in s["pairs"]:
        assert {"n_pairs", "svcca", "svcca_null_mean", "svcca_p", "rsa", "rsa_null_mean", "rsa_p"} <= set(p)
        if p["svcca"] is not None:
            assert 0 <= p["svcca"] <= 1 and 1 / 21 <= p["svcca_p"] <= 1 and 1 / 21 <= p["rsa_p"] <= 1
    scored = [p for p in s["pairs"] if p["svcca"] is not None]
    assert s["best"] == max(scored, key=lambda p: p["svcca"])
    names = [x["name"] for x in s["subspaces"]]
    assert names == list(load_subspaces())
    assert all(
        x["layer_a"] == s["best"]["layer_a"] and x["layer_b"] == s["best"]["layer_b"] for x in s["subspaces"]
    )
    c = s["controls"]
    assert set(c) >= {"same_model_svcca", "random_model_svcca"} and c["layer_a"] == s["best"]["layer_a"]
    assert set(s["sae_metrics"]) == {"llama", "qwen"}
    m = s["sae_metrics"]["llama"]["resid_post.0"]
    assert 0 < m["fvu"] < 1.5 and m["l0"] == pytest.approx(4.0) and 0 <= m["dead_fraction"] <= 1
    assert [(r["layer_a"], r["layer_b"]) for r in c["per_pair"]] == [
        (p["layer_a"], p["layer_b"]) for p in s["pairs"]
    ]
    for r in c["per_pair"]:  # every pair has its cross-model score beside ceiling, null and random-init
        assert {"ceiling_svcca", "cross_svcca", "null_svcca", "random_svcca", "cross_p", "random_p"} <= set(r)
    for f in ("config.json", "results.json", "report.html", "heatmaps.png", "correlations.png", "pairs.json", "controls.png",
              "subspaces.json", "controls.json", "saes/a/layer0/cfg.json", f"saes/random/layer{c['layer_a']}/cfg.json"):  # fmt: skip
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["pairs"][0]["svcca"] == s["pairs"][0]["svcca"] and res["peak_rss_mb"] > 0
    assert "Semantic subspaces" in (out / "report.html").read_text()


def test_first_positions_and_norm_outliers_are_left_out(cross_run):
    from rosettalens.store import ActivationStore

    s, out = cross_run
    info = json.loads((out / "pairing.json").read_text())
    sb = ActivationStore.open(out / "acts" / "b")  # qwen2 tokenizer: no BOS, position 0 is a real token
    assert info["rows_left_out_b"] >= int((sb.pos_index == 0).sum()) > 0
    assert info["n_pairs"] <= info["n_pairs_before_row_filter"] - int((sb.pos_index == 0).sum())


class _FakeStore:
    def __init__(self, x: torch.Tensor, pos: torch.Tensor):
        self.x, self.pos_index, self.hooks = x, pos, ["h"]

    def __len__(self) -> int:
        return len(self.x)

    def read(self, hook, rows=None):
        return self.x if rows is None else self.x[rows]


def test_kept_rows_rule():
    from rosettalens.experiments.sae_universality import SAEUniversalityConfig, kept_rows

    x = torch.ones(8, 4)
    x[3] *= 50  # an outlier (norm 50x the median)
    x[5] *= 5  # large but within 10x
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    keep = kept_rows(_FakeStore(x, pos), SAEUniversalityConfig())
    assert keep.tolist() == [False, True, True, False, False, True, True, True]
    keep = kept_rows(_FakeStore(x, pos), SAEUniversalityConfig(skip_first=0, norm_ratio=0))
    assert keep.all()


def test_pipeline_pair_filters_are_counted(cross_run):
    s, out = cross_run
    for p in json.loads((out / "pairs.json").read_text()):
        assert p["n_matched"] - sum(p["removed"].values()) == p["n_pairs"]
        assert set(p["removed"]) == {"min_corr", "nonconcept", "shared_top_token", "one_to_one"}


def test_resume_skips_finished_stages(cross_run):
    from rosettalens.experiments.sae_universality import run

    s, out = cross_run
    again = run(None, progress=False, resume=out)
    assert again["pairs"] == s["pairs"] and again["subspaces"] == s["subspaces"]
    t = again["timings_s"]
    assert all(t[k] == "skipped" for k in ("extract", "saes", "match", "subspaces", "controls", "plots"))


def test_same_tokenizer_pairs_by_position_with_a_generated_corpus(tiny_dirs, tmp_path, monkeypatch):
    from rosettalens.experiments.sae_universality import run

    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(f"{tiny_dirs['llama']},{tiny_dirs['llama2']}", tmp_path / "r", layers="1", controls="none",
               data="sequences", generate_tokens=300)  # fmt: skip
    s = run(cfg, progress=False)
    assert s["pairing"]["mode"].startswith("position") and s["pairing"]["fraction_a"] == 1.0
    assert len(s["pairs"]) == 1 and s["controls"]["same_model_svcca"] is None
    assert s["pairing"]["corpus"]["spec"] == "sequences+generated:300"
    assert list((tmp_path / "cache" / "corpora").glob("llama-300-seed0.jsonl"))


def test_layer_out_of_range_leaves_nothing(tiny_dirs, tmp_path):
    from rosettalens.experiments.sae_universality import run

    with pytest.raises(HookPointError, match="out of range"):
        run(_cfg(f"{tiny_dirs['llama']},{tiny_dirs['qwen']}", tmp_path / "r", layers="0,7"), progress=False)
    assert not (tmp_path / "r").exists()


def test_no_shared_text_is_a_data_error(tiny_dirs, tmp_path):
    from rosettalens.experiments.sae_universality import run

    f = tmp_path / "one.txt"
    f.write_text("Hi\n")
    with pytest.raises(DataError, match="pair up"):
        run(_cfg(f"{tiny_dirs['llama']},{tiny_dirs['qwen']}", tmp_path / "r", data=str(f)), progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"models": "a"}, "two models"),
        ({"k": 64}, "smaller than --width"),
        ({"one_to_one": "last"}, "one-to-one"),
        ({"eval_fraction": 0.9}, "eval-fraction"),
    ],
)
def test_bad_options(tmp_path, kw, msg):
    cfg = _cfg(kw.pop("models", "x,y"), tmp_path / "r", **kw)
    with pytest.raises(ConfigError, match=msg):
        cfg.validate()


def test_cli_json_and_bad_layer(tiny_dirs, tmp_path, capsys):
    from rosettalens.cli import main

    models = f"{tiny_dirs['llama']},{tiny_dirs['qwen']}"
    rc = main(
        ["run", "sae-universality", "--models", models, "--layers", "0,9", "--out", str(tmp_path / "bad")]
    )
    err = capsys.readouterr().err
    errors = [
        ln for ln in err.splitlines() if "error" in ln
    ]  # (progress bars of model loading may precede it)
    assert (
        rc == 2
        and len(errors) == 1
        and errors[0].startswith("rosetta: error:")
        and "out of range" in errors[0]
    )
    assert not (tmp_path / "bad").exists()
    args = ["run", "sae-universality", "--models", models, "--layers", "1/2", "--max-tokens", "800", "--width", "32",
            "--k", "4", "--epochs", "1", "--batch-size", "128", "--n-permutations", "10", "--controls", "none",
            "--one-to-one", "first", "--out", str(tmp_path / "ok"), "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert {"models", "pairs", "best", "subspaces", "controls", "sae_metrics", "run_dir"} <= set(out)
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["one_to_one"] == "first"


def test_max_tokens_keeps_tokens_as_a_hidden_alias(capsys):
    """``run sae-universality --max-tokens N`` sets ``max_tokens``; the old ``--tokens N`` sets the same
    field with one deprecation line on stderr and is not listed by ``--help``."""
    from rosettalens.experiments.cli import experiment_parser

    _, p = experiment_parser("sae-universality")
    assert p.parse_args(["--max-tokens", "800"]).max_tokens == 800
    assert capsys.readouterr().err == ""
    args = p.parse_args(["--tokens", "800"])
    assert args.max_tokens == 800 and not hasattr(args, "tokens")
    assert capsys.readouterr().err.strip() == "rosetta: warning: --tokens is deprecated; use --max-tokens"
    help_text = p.format_help()
    assert "--max-tokens" in help_text and "--tokens" not in help_text


def test_an_old_config_json_with_tokens_still_loads(tmp_path):
    """A config.json that names the token budget ``tokens`` (the field's old name) gives ``max_tokens``
    its value through ``--config`` and ``--resume``; the new key wins when both are present."""
    from rosettalens.experiments.base import make_config
    from rosettalens.experiments.runner import config_from_values, load_experiment
    from rosettalens.experiments.sae_universality import SAEUniversalityConfig

    default = SAEUniversalityConfig().max_tokens
    exp, _ = load_experiment("sae-universality")
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"experiment": "sae-universality", "tokens": default + 123, "width": 64}))
    cfg = config_from_values(exp, {}, config=str(f))
    assert cfg.max_tokens == default + 123 and cfg.width == 64
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = {"experiment": "sae-universality", "tokens": default + 7, "seed": 3}
    (run_dir / "config.json").write_text(json.dumps(old))
    assert config_from_values(exp, {"seed": 3}, resume=str(run_dir)).max_tokens == default + 7
    both = make_config(SAEUniversalityConfig, {"tokens": 5, "max_tokens": 9}, "test")
    assert both.max_tokens == 9
