"""`rosetta map train | eval` on tiny models saved as local folders; bad input exits 2 with one line."""

from __future__ import annotations

import json

import pytest
import torch

from rosettalens.cli import main
from rosettalens.mapping import AffineMapper, load_mapper
from rosettalens.models.tiny import tiny_model

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "January February March April May June July",
    "How do I bake bread at home? Sure, here is how.",
    "Activation spaces of different models can be mapped onto each other.",
    "One two three four five six seven eight nine ten eleven.",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "def main(): return 42",
    "Tabs\tand newlines and runs   of whitespace.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
    "I'm sorry, but I can't help with that.",
]
FAST = ["--no-progress", "--max-length", "32"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mapcli")
    paths = {}
    for name, fam, seed, d in (
        ("llama", "llama", 0, 48),
        ("qwen", "qwen2", 1, 48),
        ("narrow", "llama", 2, 36),
    ):
        model, tok = tiny_model(fam, seed=seed, d_model=d)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    data = root / "docs.txt"
    data.write_text("\n".join(DOCS) + "\n")
    empty = root / "empty.txt"
    empty.write_text("\n\n")
    paths.update(root=root, data=str(data), empty=str(empty))
    return paths


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("rosetta")]
    assert len(lines) == 1, err
    return lines[0]


def test_train_and_eval_identity(env, capsys):
    out_dir = env["root"] / "ident"
    rc, out, _ = run(
        ["map", "train", "--source", f"{env['llama']}:resid_post.1", "--target", f"{env['llama']}:resid_post.1",
         "--data", env["data"], "--mapper", "affine", "--out", str(out_dir), "--max-tokens", "300", "--json", *FAST],
        capsys,
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out)  # exactly one JSON object on stdout
    assert res["pairing"] == "all" and res["d_src"] == res["d_tgt"] == 48
    assert res["heldout"]["fvu"] < 1e-8 and res["fit"]["alpha"] == 0.0
    m = load_mapper(out_dir)
    assert m.meta == {
        "source_model": env["llama"], "target_model": env["llama"],
        "source_hook": "resid_post.1", "target_hook": "resid_post.1",
    }  # fmt: skip
    rc, out, _ = run(
        ["map", "eval", "--mapper-dir", str(out_dir), "--data", env["data"], "--json", "--fidelity-texts", "4",
         "--generate", "1", "--max-new-tokens", "3", "--max-tokens", "200", *FAST],
        capsys,
    )  # fmt: skip
    assert rc == 0
    ev = json.loads(out)
    assert ev["activations"]["fvu"] < 1e-8
    assert ev["fidelity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ev["fidelity"]["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-3)
    assert ev["fidelity"]["generation"]["token_match_rate"] == 1.0


def test_train_cross_model_autoencoder_and_lowrank(env, capsys):
    for kind, extra in (("autoencoder", ["--epochs", "2", "--hidden", "16"]), ("lowrank", ["--rank", "4"])):
        out_dir = env["root"] / kind
        rc, out, err = run(
            ["map", "train", "--source", f"{env['llama']}:resid_post.-1", "--target", f"{env['qwen']}:resid_post.1",
             "--data", env["data"], "--mapper", kind, "--out", str(out_dir), "--max-tokens", "200", "--json",
             *extra, *FAST],
            capsys,
        )  # fmt: skip
        assert rc == 0, err
        res = json.loads(out)
        assert res["pairing"] == "aligned" and res["source"].endswith(":resid_post.2")
        m = load_mapper(out_dir)
        assert m.kind == kind and m.fit_info["heldout"]["n"] == res["n_heldout"]
    # the default checkpoint lives beside OUT while training and is gone once the mapper is saved
    assert not (env["root"] / ".autoencoder.checkpoint").exists()
    assert sorted(p.name for p in (env["root"] / "autoencoder").iterdir()) == [
        "config.json",
        "mapper.safetensors",
    ]
    # non-JSON output is for people: it names the result
    rc, out, _ = run(
        ["map", "eval", "--mapper-dir", str(env["root"] / "lowrank"), "--data", env["data"], "--fidelity-texts", "2",
         "--generate", "0", "--max-tokens", "100", *FAST],
        capsys,
    )  # fmt: skip
    assert rc == 0 and "FVU" in out and "KL" in out


def test_bad_input_exits_2_with_one_line(env, capsys):
    src, tgt = f"{env['llama']}:resid_post.1", f"{env['qwen']}:resid_post.1"
    base = ["map", "train", "--source", src, "--target", tgt, "--out", str(env["root"] / "bad")]
    rc, out, err = run([*base, "--data", env["data"], "--mapper", "quadratic", *FAST], capsys)
    assert rc == 2 and out == "" and "--mapper: invalid choice: 'quadratic'" in _one_error_line(err)
    rc, out, err = run([*base, "--data", env["empty"], "--mapper", "affine", *FAST], capsys)
    assert rc == 2 and out == "" and _one_error_line(err)
    rc, out, err = run(
        [*base, "--data", str(env["root"] / "missing.txt"), "--mapper", "affine", *FAST], capsys
    )
    assert rc == 2 and _one_error_line(err)
    rc, _, err = run(
        [*base[:2], "--source", "nocolon", "--target", tgt, "--out", "x", "--data", env["data"]], capsys
    )
    assert rc == 2 and "MODEL:HOOK" in _one_error_line(err)
    rc, _, err = run(
        [*base[:2], "--source", f"{env['llama']}:resid_post.9", "--target", tgt, "--out", "x", "--data", env["data"],
         *FAST],
        capsys,
    )  # fmt: skip
    assert rc == 2 and "out of range" in _one_error_line(err)
    assert not (env["root"] / "bad").exists()  # nothing half-written
    # a mapper whose widths do not fit the models
    mdir = (
        AffineMapper()
        .fit(torch.randn(60, 48), torch.randn(60, 48))
        .save(
            env["root"] / "w48",
            source_model=env["llama"],
            source_hook="resid_post.1",
            target_model=env["llama"],
            target_hook="resid_post.1",
        )
    )
    rc, _, err = run(
        ["map", "eval", "--mapper-dir", str(mdir), "--data", env["data"], "--target", f"{env['narrow']}:resid_post.1",
         *FAST],
        capsys,
    )  # fmt: skip
    assert rc == 2 and "width" in _one_error_line(err)
    rc, _, err = run(
        ["map", "eval", "--mapper-dir", str(env["root"] / "nope"), "--data", env["data"]], capsys
    )
    assert rc == 2 and "does not exist" in _one_error_line(err)


def test_train_from_stores_matches_in_memory_pairs(env, capsys):
    from rosettalens.hooks import HookedModel
    from rosettalens.mapping.pairs import paired_activations
    from rosettalens.store import extract

    hms = {}
    for name in ("llama", "qwen"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hms[name] = HookedModel.from_hf(
            AutoModelForCausalLM.from_pretrained(env[name]),
            AutoTokenizer.from_pretrained(env[name]),
            name=name,
        )
        extract(hms[name], ["resid_post.1"], env["data"], env["root"] / f"store-{name}", max_length=32)
    out_dir = env["root"] / "from-stores"
    rc, out, _ = run(
        ["map", "train", "--source", f"{env['llama']}:resid_post.1", "--target", f"{env['qwen']}:resid_post.1",
         "--source-store", str(env["root"] / "store-llama"), "--target-store", str(env["root"] / "store-qwen"),
         "--mapper", "orthogonal", "--out", str(out_dir), "--json", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out)
    X, Y, info = paired_activations(hms["llama"], hms["qwen"], DOCS, "resid_post.1", "resid_post.1", max_length=32, progress=False)  # fmt: skip
    assert res["n_train"] + res["n_heldout"] == X.shape[0] == info["n_pairs"]
    # the stores pair exactly the rows that in-memory extraction pairs (same documents, same positions)
    assert load_mapper(out_dir).fit_info["data"]["source"] == "stores"
    from rosettalens.align import PairedStores
    from rosettalens.store import ActivationStore

    pair = PairedStores(
        ActivationStore.open(env["root"] / "store-llama"), ActivationStore.open(env["root"] / "store-qwen")
    )
    Xs, Ys = pair.read("resid_post.1", "resid_post.1")
    assert torch.allclose(Xs.float(), X, atol=1e-4) and torch.allclose(Ys.float(), Y, atol=1e-4)
