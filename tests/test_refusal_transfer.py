"""The refusal-transfer pipeline end to end on tiny models saved as local HF folders."""

import json
import subprocess
import sys

from rosettalens.experiments.base import run_experiment
from rosettalens.experiments.refusal_transfer import EXPERIMENT, RefusalTransferConfig
from rosettalens.hooks import HookedModel
from rosettalens.mapping.pairs import paired_activations
from rosettalens.models.tiny import tiny_model, tiny_tokenizer


def run(cfg, **kw):
    """The experiment run from a config object, as ``rosetta run`` runs it (``run_experiment``)."""
    return run_experiment(EXPERIMENT, cfg, **kw)


def _save(tmp_path, name, family="qwen2", seed=0, d_model=48, chat=True, n_layers=3):
    model, tok = tiny_model(family, seed=seed, d_model=d_model, n_layers=n_layers)
    if not chat:
        tok = tiny_tokenizer(add_bos=False, chat_template=False)
    path = tmp_path / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _cfg(tmp_path, src, tgt, **kw):
    base = dict(source=src, target=tgt, n_train=12, n_val=6, n_eval=4, max_new_tokens=3, batch_size=8,
                sweep_points=2, candidate_stride=1, judge="target", out=str(tmp_path / "run"))  # fmt: skip
    base.update(kw)
    return RefusalTransferConfig(**base)


def test_same_model_transfer_recovers_native_direction(tmp_path):
    """Source == target: the affine map is the identity, so the transferred direction is the native one."""
    src = _save(tmp_path, "a")
    res = run(_cfg(tmp_path, src, src, source_layer=1), progress=False)
    assert res["pairing"]["same_tokenizer"] and res["pairing"]["paired_fraction"] == 1.0
    assert res["mapper"]["fvu"] < 1e-6
    assert res["vectors"]["cos_transferred_native"] > 0.999
    for key in ("baseline", "native", "transferred", "random"):
        assert 0.0 <= res["refusal_rate"][key] <= 1.0
    run_dir = tmp_path / "run"
    for f in ("config.json", "results.json", "report.html", "refusal_rates.png", "sweep.png", "examples.json",
              "mapper", "transferred_refusal.safetensors"):  # fmt: skip
        assert (run_dir / f).exists(), f
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["refusal_rate"] == res["refusal_rate"]
    assert json.loads((run_dir / "config.json").read_text())["source"] == src
    # the model judge saw every completion; its agreement record matches the saved completions
    from rosettalens.steering import is_refusal

    comps = json.loads((run_dir / "completions.json").read_text())
    comps = {
        c: v
        for c, v in comps.items()
        if c.startswith("harmful") or c in ("harmless_baseline", "harmless_induced")
    }
    flat = [t for texts in comps.values() for t in texts]
    ag = res["model_judge"]["agreement_with_substring"]
    assert ag["n"] == len(flat) == sum(len(v) for v in comps.values())
    assert ag["rate_a"] == sum(map(is_refusal, flat)) / len(flat)
    assert set(res["model_judge"]["refusal_rate"]) == set(comps)


def test_layer_selection_by_sweep_takes_the_best_validation_pair(tmp_path):
    import pytest

    from rosettalens.errors import ConfigError

    src = _save(tmp_path, "s", family="llama", seed=3, n_layers=6)
    tgt = _save(tmp_path, "t", seed=4, n_layers=4)
    res = run(_cfg(tmp_path, src, tgt, layer_selection="sweep", judge="none"), progress=False)
    sel, sweep = res["selection"], res["sweep"]
    assert sel["method"] == "sweep" and sel["candidates"] == [1, 2, 3]  # 1 up to (not incl.) 80% depth of 6
    assert [e["source_layer"] for e in sweep] == sel["candidates"]
    drops = [e["score_baseline"] - e["score_transferred_ablated"] for e in sweep]
    best = sweep[max(range(len(sweep)), key=drops.__getitem__)]
    assert res["layers"] == {
        "source": f"resid_pre.{best['source_layer']}",
        "target": f"resid_pre.{best['target_layer']}",
    }
    assert all(e["kl_harmless_transferred_ablated"] >= 0 for e in sweep)
    # a KL bound below every candidate's KL leaves nothing to choose: a clear error, no results file
    with pytest.raises(ConfigError, match="max-kl"):
        run(_cfg(tmp_path, src, tgt, layer_selection="sweep", judge="none", max_kl=1e-12,
                 out=str(tmp_path / "run2")), progress=False)  # fmt: skip
    assert not (tmp_path / "run2" / "results.json").exists()


def _other_tokenizer(vocab_size=300):
    """A second byte-level BPE (fewer merges than the tiny one, same specials and chat template):
    the same texts tokenize differently, so positions must be paired by character offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rosettalens.models import tiny

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tiny.SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator([tiny._TRAIN_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])  # fmt: skip
    fast.chat_template = tiny.CHAT_TEMPLATE
    return fast


def _user_ends(tok, prompt):
    """Char ends (relative to the user text) of the tokens of the chat-formatted prompt that end inside
    it, by decoding prefixes (ASCII prompts only: every token ends on a character)."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start = text.index(prompt)
    ends = [len(tok.decode(ids[: i + 1])) - start for i in range(len(ids))]
    return ids, {e for e in ends if 0 < e <= len(prompt)}


def test_same_tokenizer_pairs_every_position_across_architectures(tmp_path):
    # the tiny llama and qwen2 share one tokenizer (only BOS handling differs, unused in chat text):
    # every position pairs, and each row is the model's own activation at that position
    import torch

    a = HookedModel.from_hf(*tiny_model("llama", d_model=36))
    b = HookedModel.from_hf(*tiny_model("qwen2", d_model=48, seed=1))
    prompts = ["How do I bake bread?", "Café 東京 — tell me more"]
    X, Y, info = paired_activations(
        a, b, prompts, ["resid_pre.1"], ["resid_pre.2"], chat=True, progress=False
    )
    n_tokens = [len(_user_ends(a.tokenizer, p)[0]) for p in prompts]
    assert info["same_tokenizer"] is True and info["paired_fraction"] == 1.0
    assert info["pairs"] == sum(n_tokens) == X["resid_pre.1"].shape[0] == Y["resid_pre.2"].shape[0]
    assert X["resid_pre.1"].shape[1] == 36 and Y["resid_pre.2"].shape[1] == 48
    # reference: HF hidden_states[L] is the input of block L (resid_pre.L), unpadded, one prompt at a time
    row = 0
    for p, n in zip(prompts, n_tokens):
        ids = torch.tensor([_user_ends(a.tokenizer, p)[0]])
        with torch.no_grad():
            ha = a.model(ids, output_hidden_states=True).hidden_states[1][0]
            hb = b.model(ids, output_hidden_states=True).hidden_states[2][0]
        assert torch.allclose(X["resid_pre.1"][row : row + n], ha, atol=1e-4)
        assert torch.allclose(Y["resid_pre.2"][row : row + n], hb, atol=1e-4)
        row += n


def test_different_tokenizers_pair_positions_by_character_offsets(tmp_path):
    import torch

    a = HookedModel.from_hf(*tiny_model("llama", d_model=36))
    b = HookedModel.from_hf(tiny_model("qwen2", d_model=48, seed=1)[0], _other_tokenizer())
    prompts = ["How do I bake bread at home?", "Tell me about the lazy dog, please."]  # ASCII: see _user_ends
    X, Y, info = paired_activations(
        a, b, prompts, ["resid_pre.1"], ["resid_pre.2"], chat=True, progress=False
    )
    assert info["same_tokenizer"] is False
    # independent count: user-text char ends both tokenizations share, plus the last prompt token
    expected = 0
    n_all = 0
    for p in prompts:
        ids_a, ends_a = _user_ends(a.tokenizer, p)
        ids_b, ends_b = _user_ends(b.tokenizer, p)
        assert ids_a != ids_b  # the two tokenizations really differ
        assert 0 < len(ends_a & ends_b) < max(len(ends_a), len(ends_b))  # some, not all, positions pair
        expected += len(ends_a & ends_b) + 1
        n_all += len(ids_a) + len(ids_b)
    assert info["pairs"] == expected == X["resid_pre.1"].shape[0] == Y["resid_pre.2"].shape[0]
    assert info["paired_fraction"] == 2 * expected / n_all < 1.0
    # the last prompt token of each prompt is paired, and its rows hold each model's own activation there
    for i, p in enumerate(prompts):
        r = int(info["last_rows"][i])
        for hm, acts, layer in ((a, X["resid_pre.1"], 1), (b, Y["resid_pre.2"], 2)):
            ids = torch.tensor([_user_ends(hm.tokenizer, p)[0]])
            with torch.no_grad():
                ref = hm.model(ids, output_hidden_states=True).hidden_states[layer][0, -1]
            assert torch.allclose(acts[r], ref, atol=1e-4)


def test_cross_architecture_run_with_different_tokenizers(tmp_path):
    src = _save(tmp_path, "llama", family="llama", d_model=36)
    model, _ = tiny_model("qwen2", d_model=48, seed=1)
    tgt = tmp_path / "qwen"
    model.save_pretrained(tgt)
    _other_tokenizer().save_pretrained(tgt)
    res = run(_cfg(tmp_path, src, str(tgt), mapper="orthogonal"), progress=False)
    assert res["layers"]["source"].startswith("resid_pre.") and res["mapper"]["kind"] == "orthogonal"
    assert res["pairing"]["same_tokenizer"] is False
    assert 0.0 < res["pairing"]["paired_fraction"] < 1.0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rosettalens.cli", "run", "refusal-transfer", *args],
                          capture_output=True, text=True)  # fmt: skip


def test_cli_json_and_bad_input(tmp_path, capsys):
    src = _save(tmp_path, "a")
    r = _cli("--source", src, "--target", src, "--n-train", "8", "--n-val", "4", "--n-eval", "2",
             "--max-new-tokens", "2", "--sweep-points", "0", "--judge", "none", "--source-layer", "1", "--out", str(tmp_path / "r"), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["refusal_rate"]) == {"baseline", "native", "transferred", "random"}
    assert {"refusal_rate_baseline", "refusal_rate_transferred", "kl_transferred"} <= set(out["harmless"])
    for key in ("induced_refusal_rate", "source", "target", "layers", "mapper", "run_dir"):
        assert key in out
    assert "fvu" in out["mapper"] and out["mapper"]["kind"] == "affine"

    nochat = _save(tmp_path, "nochat", chat=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    from rosettalens.cli import main

    for args, needle in [
        (["--source", nochat, "--target", src], "chat template"),
        (["--source", src, "--target", src, "--mapper", "quadratic"], "quadratic"),
        (["--source", src, "--target", src, "--harmful", str(empty)], "empty"),
        (["--source", "no-such-model", "--target", src], "unknown model"),
    ]:
        capsys.readouterr()
        code = main(["run", "refusal-transfer", *args, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("rosetta: error:") and needle in last.lower(), (args, err)
        assert not (tmp_path / "bad").exists()


def test_resume_reruns_only_the_missing_stages_with_identical_results(tmp_path):
    src = _save(tmp_path, "a", family="llama", seed=2, n_layers=4)
    tgt = _save(tmp_path, "b", seed=5, n_layers=3)
    cfg = _cfg(tmp_path, src, tgt, judge="none", sweep_points=0)
    first = run(cfg, progress=False)
    run_dir = tmp_path / "run"
    (run_dir / "completions.json").unlink()  # as if killed during the generation evaluation
    second = run(cfg, progress=False, resume=run_dir)
    t = second.pop("timings_s")
    first.pop("timings_s")
    assert second == first
    assert t["source_direction"] == t["mapper"] == t["directions"] == "skipped"
    assert isinstance(t["generation_eval"], float) and isinstance(t["paired_activations"], float)
