"""``rosetta crosscoder train | eval`` and ``rosetta run crosscoder-diff`` end to end on tiny models:
the JSON contract, the controls, organism diffing on a planted trigger, bad input (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rosettalens.cli import main

TRIGGER = "東京"  # four byte-level tokens of the tiny tokenizer, none of which ordinary English uses


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders: A (tiny llama), B = A with a large vector added to the trigger tokens' embeddings (an
    organism whose change is active only on the trigger), C (tiny gpt2: no BOS, another tokenization)."""
    from rosettalens.models.tiny import tiny_model

    root = tmp_path_factory.mktemp("cc_models")
    m, t = tiny_model("llama", seed=1)
    m.save_pretrained(root / "a")
    t.save_pretrained(root / "a")
    ids = t(TRIGGER, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(m.config.hidden_size, generator=g)
    with torch.no_grad():
        emb = m.get_input_embeddings().weight
        emb[ids] += 4.0 * emb.norm(dim=1).mean() * v / v.norm()
    m.save_pretrained(root / "b")
    t.save_pretrained(root / "b")
    m2, t2 = tiny_model("gpt2", seed=2)
    m2.save_pretrained(root / "c")
    t2.save_pretrained(root / "c")
    return {k: str(root / k) for k in ("a", "b", "c")}


def _run(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_train_then_eval_two_tokenizers(models, tmp_path, capsys):
    out = tmp_path / "cc"
    code, so, se = _run(["crosscoder", "train", "--models", f"{models['a']},{models['c']}", "--hooks",
                         "resid_post.1,resid_post.-1", "--data", "mini-web", "--out", str(out), "--width", "64",
                         "--k", "4", "--max-tokens", "3000", "--epochs", "2", "--batch-size", "128",
                         "--no-progress", "--json"], capsys)  # fmt: skip
    assert code == 0, se
    r = json.loads(so)
    assert r["pairing"] == "aligned" and r["hooks"] == ["resid_post.1", "resid_post.2"]
    assert 0 < r["l0"] <= 64 and r["n_alive"] >= r["n_shared"] + r["n_a_only"] + r["n_b_only"]
    assert r["shared_decoder_cosine_median"] is None or isinstance(r["shared_decoder_cosine_median"], float)
    assert (out / "crosscoder.json").is_file() and (out / "crosscoder.safetensors").is_file()
    code, so, se = _run(["crosscoder", "eval", "--crosscoder", str(out), "--data", "mini-web",
                         "--max-tokens", "800", "--no-progress", "--json"], capsys)  # fmt: skip
    assert code == 0, se
    e = json.loads(so)
    assert e["models"] == [models["a"], models["c"]] or len(e["models"]) == 2
    for m in ("a", "b"):
        assert e["explained_variance"][m] > 0.0
        assert set(e["splice"][m]) >= {"ce_loss_recovered", "kl_score", "ce_clean", "n_tokens"}
    # an existing crosscoder is replaced only with --overwrite
    code, _, se = _run(["crosscoder", "train", "--models", f"{models['a']},{models['a']}", "--hook", "resid_post.1",
                        "--data", "mini-web", "--out", str(out), "--no-progress"], capsys)  # fmt: skip
    assert code == 2 and se.startswith("rosetta: error:") and "overwrite" in se


def test_train_dedicated_and_tied_saves_its_structure(models, tmp_path, capsys):
    out = tmp_path / "dcc"
    code, so, se = _run(["crosscoder", "train", "--models", f"{models['a']},{models['b']}", "--hook", "resid_post.1",
                         "--data", "mini-web", "--out", str(out), "--width", "32", "--k", "4", "--max-tokens", "1500",
                         "--batch-size", "128", "--dedicated-b", "4", "--tie-shared", "--no-progress", "--json"],
                        capsys)  # fmt: skip
    assert code == 0, se
    from rosettalens.crosscoder import load_crosscoder

    cc = load_crosscoder(out)
    assert (cc.cfg.dedicated_a, cc.cfg.dedicated_b, cc.cfg.tie_shared) == (0, 4, True)
    _, only_b = cc.dedicated_masks()
    assert torch.equal(cc.W_dec_a[~only_b], cc.W_dec_b[~only_b]) and not cc.W_dec_a.detach()[only_b].any()
    rho = cc.relative_norms()
    assert torch.allclose(rho[only_b], torch.ones(4)) and torch.allclose(rho[~only_b], torch.full((28,), 0.5))


@pytest.mark.parametrize(
    "argv",
    [
        ["crosscoder", "train", "--models", "no-such-model,{a}", "--hook", "resid_post.1", "--data", "mini-web"],
        ["crosscoder", "train", "--models", "{a}", "--hook", "resid_post.1", "--data", "mini-web"],
        ["crosscoder", "train", "--models", "{a},{a}", "--hook", "resid_post.1", "--hooks", "x,y", "--data", "mini-web"],
        ["crosscoder", "train", "--models", "{a},{a}", "--hook", "nonsense.1", "--data", "mini-web"],
        ["crosscoder", "train", "--models", "{a},{a}", "--hook", "resid_post.1", "--data", "mini-web", "--k", "99", "--width", "8"],
        ["crosscoder", "eval", "--crosscoder", "{tmp}/missing", "--data", "mini-web"],
        ["crosscoder", "train", "--models", "{a},{a}", "--hook", "resid_post.1", "--data", "mini-web", "--width", "0"],
        ["crosscoder", "train", "--models", "{a},{a}", "--hook", "resid_post.1", "--data", "mini-web", "--width", "16",
         "--k", "2", "--dedicated-a", "8", "--dedicated-b", "8"],
    ],
)  # fmt: skip
def test_bad_input_exits_2_and_writes_nothing(models, tmp_path, capsys, argv):
    argv = [a.format(a=models["a"], tmp=tmp_path) for a in argv]
    if argv[1] == "train":
        argv += ["--out", str(tmp_path / "out")]
    code, so, se = _run(argv, capsys)
    assert code == 2
    assert se.startswith("rosetta: error:") and len(se.strip().splitlines()) == 1, se
    assert not (tmp_path / "out").exists()


def test_help_texts_everywhere(capsys):
    import argparse

    from rosettalens.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices["crosscoder"]
    cmds = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("train", "eval"):
        for act in cmds[name]._actions:
            assert act.help, f"crosscoder {name} {act.option_strings} has no help text"


def _diff(models, tmp_path, capsys, pair: str, *extra: str, hook: str = "resid_post.1"):
    out = tmp_path / "run"
    argv = ["run", "crosscoder-diff", "--models", pair, "--data", "mini-web", "--hooks", hook,
            "--max-tokens", "3000", "--eval-tokens", "600", "--width", "64", "--k", "4", "--epochs", "10", "--lr", "0.01",
            "--batch-size", "128", "--splice-docs", "4", "--out", str(out), "--json", *extra]  # fmt: skip
    code, so, se = _run(argv, capsys)
    assert code == 0, se
    return json.loads(so), out


def test_crosscoder_diff_contract_and_controls(models, tmp_path, capsys):
    r, out = _diff(models, tmp_path, capsys, f"{models['a']},{models['c']}")
    for key in ("models", "explained_variance", "l0", "dead_fraction", "n_shared", "n_a_only", "n_b_only",
                "shared_decoder_cosine_median", "controls"):  # fmt: skip
        assert key in r
    assert set(r["explained_variance"]) == {"a", "b"}
    assert set(r["controls"]) >= {"self_shared_fraction", "random_shared_fraction"}
    # one width (48), two unrelated random models: their residual bases do not line up
    assert r["shared_decoder_cosine_median"] is None or abs(r["shared_decoder_cosine_median"]) < 0.5
    c = r["controls"]
    assert c["self_shared_fraction"] > 0.9  # a model against itself: nearly every latent shared
    # (a tiny model is itself random: both sides encode token identity alike, so no bound here; the
    # known answer for unrelated activations is in test_crosscoder.py)
    assert 0.0 <= c["random_shared_fraction"] <= 1.0
    assert "organism" not in r
    for f in ("config.json", "results.json", "report.html", "rho_histogram.png", "evaluate.json",
              "controls.json", "crosscoder/crosscoder.json"):  # fmt: skip
        assert (out / f).is_file(), f
    html = (out / "report.html").read_text()
    assert "rho_histogram.png" in html and "<table>" in html
    # resume: every stage with outputs is skipped and the summary is the same
    code, so, se = _run(["run", "crosscoder-diff", "--resume", str(out), "--json"], capsys)
    assert code == 0, se
    again = json.loads(so)
    assert again["n_shared"] == r["n_shared"] and again["controls"] == r["controls"]
    timings = json.loads((out / "results.json").read_text())["timings_s"]
    assert timings["train"] == "skipped" and timings["controls"] == "skipped"


def _triggered_state_model(path: str, trigger_ids: list[int], scale: float = 3.0):
    """Model A with a planted "backdoor state": from the first trigger token on, every position's
    residual stream after layer 0 gets a fixed extra direction (a LoRA-like change that is active
    only in triggered prompts, on whatever tokens follow the trigger)."""
    import rosettalens
    from rosettalens.models import loading

    hm = loading.load(path, progress=False)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(hm.cfg.d_model, generator=g)
    v = v / v.norm()
    state: dict[str, torch.Tensor] = {}
    trig = torch.tensor(trigger_ids)

    def grab(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["on"] = torch.isin(ids, trig).long().cumsum(-1) > 0  # [batch, pos]

    def add(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        norm = h.norm(dim=-1, keepdim=True).mean()
        h = h + scale * norm * state["on"][..., None].to(h.dtype) * v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    hm.model.model.register_forward_pre_hook(grab, with_kwargs=True)
    hm.model.model.layers[0].register_forward_hook(add)
    hm.name = "tiny-organism"
    assert rosettalens  # the real loader stays reachable for model A
    return hm


def test_crosscoder_diff_finds_the_planted_organism_latent(models, tmp_path, capsys, monkeypatch):
    import rosettalens
    from rosettalens.models.tiny import tiny_tokenizer

    ids = tiny_tokenizer()(TRIGGER, add_special_tokens=False)["input_ids"]
    organism = _triggered_state_model(models["a"], ids)
    real = rosettalens.load

    def load(name, *args, **kw):
        return organism if name == models["b"] else real(name, *args, **kw)

    monkeypatch.setattr(rosettalens, "load", load)
    r, _ = _diff(models, tmp_path, capsys, f"{models['a']},{models['b']}", "--organism", "on", "--trigger", TRIGGER,
                 "--organism-prompts", "24", "--organism-train-prompts", "60",
                 "--organism-dedicated", "8")  # fmt: skip
    o = r["organism"]
    assert o["n_b_only"] >= 1
    # the dedicated-latent crosscoder: 8 latents only B can use, tied shared rows (one width)
    assert o["dedicated"]["n_dedicated"] == 8 and o["dedicated"]["tied_shared"] is True
    assert 0 <= o["dedicated"]["n_alive"] <= 8
    # its null, the same construction on A against itself: nothing of B's to find
    null = o["dedicated"]["self_control"]
    assert null["best_trigger_auroc"] is None or null["best_trigger_auroc"] < 0.9
    assert (Path(r["run_dir"]) / "organism_crosscoder" / "crosscoder.json").is_file()
    assert o["best_trigger_auroc"] > 0.9
    assert o["top_latents"][0]["class"] == "b_only" and o["top_latents"][0]["auroc"] > 0.9
