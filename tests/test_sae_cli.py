"""``rosetta sae train | eval`` end to end on a tiny model, splice metrics with known answers, bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from rosettalens.cli import main
from rosettalens.sae import SAE, SAEConfig, splice_metrics


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rosettalens.models.tiny import tiny_model

    d = tmp_path_factory.mktemp("models") / "tiny-llama"
    m, t = tiny_model("llama", seed=1)
    m.save_pretrained(d)
    t.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hm(model_dir):
    from rosettalens.models.loading import load

    return load(str(model_dir), progress=False)


@pytest.fixture(scope="module")
def store(hm, tmp_path_factory):
    from rosettalens.store import extract

    out = tmp_path_factory.mktemp("sae_cli_store") / "store"
    return extract(hm, "resid_post.1", "mini-web", out, progress=False)


@pytest.fixture(scope="module")
def texts():
    from rosettalens.data import load_documents

    return load_documents("mini-web").documents[:12]


def _identity_sae(d: int) -> SAE:
    """relu(x) - relu(-x) = x: a ReLU SAE of width 2d that reconstructs exactly."""
    sae = SAE(SAEConfig(d_in=d, width=2 * d, arch="relu"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _zero_sae(d: int) -> SAE:
    sae = SAE(SAEConfig(d_in=d, width=8, arch="relu"))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def test_splice_metrics_known_answers(hm, texts):
    exact = splice_metrics(_identity_sae(48), hm, "resid_post.1", texts, batch_size=4)
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert exact["kl_zero"] > 1e-4 and abs(exact["ce_zero"] - exact["ce_clean"]) > 1e-4  # not vacuous
    # an SAE that outputs zeros everywhere (special tokens too) is exactly zero-ablation: scores 0
    zero = splice_metrics(_zero_sae(48), hm, "resid_post.1", texts, batch_size=4, exclude_special=False)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert zero["kl_score"] == pytest.approx(0.0, abs=1e-4)


def test_splice_clean_ce_equals_hf_loss(hm, texts):
    """Independent reference: HF's own loss for one unpadded document (no token excluded)."""
    enc = hm.tokenize([texts[0]])
    ids = enc["input_ids"]
    got = splice_metrics(_identity_sae(48), hm, "resid_post.1", [ids], exclude_special=False)
    with torch.no_grad():
        want = float(hm.model(input_ids=ids, labels=ids).loss)
    assert got["ce_clean"] == pytest.approx(want, rel=1e-5)
    assert got["n_tokens"] == ids.shape[1]


def test_cli_train_and_eval(store, model_dir, tmp_path, capsys):
    out = tmp_path / "saes"
    args = ["sae", "train", "--store", str(store.path), "--hook", "resid_post.1", "--arch", "topk"]
    args += [
        "--width",
        "64,96",
        "--k",
        "4",
        "--out",
        str(out),
        "--batch-size",
        "128",
        "--lr",
        "2e-3",
        "--max-tokens",
        "4096",
    ]
    args += ["--model", str(model_dir), "--splice-docs", "4"]
    assert main([*args, "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["width"] for s in summary["saes"]] == [64, 96]
    assert summary["heldout_rows"] > 0 and summary["metrics_on"] == "heldout"
    assert summary["sinks"] == {"skip_first": 1, "norm_ratio": 10.0}  # pos 0 is BOS here (not stored)
    assert sorted(p.name for p in out.iterdir()) == ["topk-w64-k4", "topk-w96-k4"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    for s in summary["saes"]:
        assert 0 < s["fvu"] < 1.0 and s["l0"] <= 4
        assert s["explained_variance"] == pytest.approx(1 - s["fvu"])
        assert s["alive_fraction"] == pytest.approx(1 - s["dead_fraction"])
        assert isinstance(s["ce_loss_score"], float) and isinstance(s["kl_div_score"], float)
    assert (out / "topk-w64-k4" / "training.png").stat().st_size > 1000
    saved = SAE.load(out / "topk-w64-k4")
    assert saved.cfg.skip_first == 1 and saved.cfg.median_norm is not None and saved.cfg.median_norm > 0
    assert saved.info["heldout"]["ce_loss_score"] == summary["saes"][0]["ce_loss_score"]

    sae_dir = out / "topk-w64-k4"
    ev = ["sae", "eval", "--sae", str(sae_dir), "--model", str(model_dir), "--data", "mini-web"]
    assert main([*ev, "--max-tokens", "600", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_score"):
        assert isinstance(res[key], float), key
    assert res["hook"] == "resid_post.1" and res["n_tokens"] >= 500
    assert res["sinks"]["skip_first"] == 1 and res["ce_loss_score"] == res["ce_loss_recovered"]
    assert main([*ev, "--max-tokens", "600", "--json", "--no-progress", "--skip-first", "3"]) == 0
    res3 = json.loads(capsys.readouterr().out)
    assert res3["n_tokens"] < res["n_tokens"] and res3["spliced_fraction"] < res["spliced_fraction"]
    fig = tmp_path / "curves.png"
    assert main([*ev, "--max-tokens", "100", "--json", "--no-progress", "--figure", str(fig)]) == 0
    assert fig.stat().st_size > 1000


def test_cli_skip_first_leaves_out_first_tokens(store, tmp_path, capsys):
    args = [
        "sae",
        "train",
        "--store",
        str(store.path),
        "--arch",
        "relu",
        "--width",
        "32",
        "--splice-docs",
        "0",
    ]
    args += ["--out", str(tmp_path / "s"), "--batch-size", "128", "--heldout", "0.2", "--skip-first", "2"]
    args += ["--tokens", "1024"]  # the old spelling of --max-tokens still trains, with one deprecation line
    assert main([*args, "--norm-ratio", "0", "--json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "--tokens is deprecated; use --max-tokens" in captured.err
    summary = json.loads(captured.out)
    assert summary["steps"] == 1024 // 128  # the budget reached the trainer: tokens / batch size
    n = len(store)
    n_train = n - round(n * 0.2)
    pos = store.pos_index
    assert summary["train_rows"] == int((pos[:n_train] >= 2).sum()) < n_train
    sae = SAE.load(tmp_path / "s")
    assert sae.info["train"]["data"]["rows"]["subset"] == summary["train_rows"]
    assert sae.info["heldout"]["n_tokens"] == int((pos[n_train:] >= 2).sum())


def test_cli_bad_input_exits_2(store, model_dir, tmp_path, capsys):
    base = ["sae", "train", "--store", str(store.path), "--hook", "resid_post.1", "--batch-size", "128"]
    base += ["--splice-docs", "0", "--max-tokens", "256"]
    out = tmp_path / "x"
    assert main([*base, "--arch", "topk", "--width", "32", "--k", "32", "--out", str(out)]) == 2
    assert "k must be in [1, width)" in capsys.readouterr().err
    assert (
        main([*base, "--arch", "topk", "--width", "32", "--k", "4", "--d-in", "64", "--out", str(out)]) == 2
    )
    assert "has width 48 but --d-in is 64" in capsys.readouterr().err
    assert main([*base, "--arch", "gated", "--width", "32", "--out", str(out)]) == 2
    assert main([*base, "--arch", "relu", "--width", "32", "--norm-ratio", "0.5", "--out", str(out)]) == 2
    assert "norm_ratio must be 0 (off) or > 1" in capsys.readouterr().err
    assert (
        main(
            [
                *base[:2],
                "--store",
                str(tmp_path / "nostore"),
                "--arch",
                "relu",
                "--width",
                "8",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "not an activation store" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # an SAE of another width than the model's hook; a folder without cfg.json
    other = SAE(SAEConfig(d_in=32, width=64, arch="topk", k=4, hook="resid_post.1"))
    other.save(tmp_path / "w32")
    ev = ["--model", str(model_dir), "--data", "mini-web", "--max-tokens", "50"]
    assert main(["sae", "eval", "--sae", str(tmp_path / "w32"), *ev]) == 2
    assert "width 48 but the SAE takes d_in=32" in capsys.readouterr().err
    ok = SAE(SAEConfig(d_in=48, width=64, arch="topk", k=4))
    ok.save(tmp_path / "w48")
    assert main(["sae", "eval", "--sae", str(tmp_path / "w48"), *ev, "--hook", "resid_post.7"]) == 2
    assert "out of range" in capsys.readouterr().err.lower()
    assert main(["sae", "eval", "--sae", str(tmp_path / "w48"), *ev]) == 2  # no hook recorded, none given
    assert "records no hook" in capsys.readouterr().err
    (tmp_path / "w32" / "cfg.json").unlink()
    assert main(["sae", "eval", "--sae", str(tmp_path / "w32"), *ev]) == 2
    err = capsys.readouterr().err
    assert "has no cfg.json" in err and err.count("\n") == 1


def _sae_train_parser() -> argparse.ArgumentParser:
    from rosettalens.cli import build_parser

    p = build_parser()
    for name in ("sae", "train"):
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[name]
    return p


def test_max_tokens_keeps_tokens_as_a_hidden_alias(capsys):
    """``sae train --max-tokens N`` sets the training budget; the old ``--tokens N`` sets the same field
    with one deprecation line on stderr and is not listed by ``--help``."""
    p = _sae_train_parser()
    argv = ["--store", "s", "--arch", "topk", "--width", "32", "--out", "o"]
    assert p.parse_args(argv).max_tokens is None
    assert p.parse_args([*argv, "--max-tokens", "3000"]).max_tokens == 3000
    assert capsys.readouterr().err == ""
    args = p.parse_args([*argv, "--tokens", "3000"])
    assert args.max_tokens == 3000 and not hasattr(args, "tokens")
    assert capsys.readouterr().err.strip() == "rosetta: warning: --tokens is deprecated; use --max-tokens"
    help_text = p.format_help()
    assert "--max-tokens" in help_text and "--tokens" not in help_text
