"""`rosetta circuits patch` on a tiny model saved as a local HF folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rosettalens.circuits import patch_sweep
from rosettalens.cli import main
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model

CLEAN, CORRUPTED = "0 1 2 3 4", "4 3 2 1 0"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    m, t = tiny_model("qwen2", n_layers=2)
    m.save_pretrained(path)
    t.save_pretrained(path)
    return str(path)


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if "error" in ln]  # (progress bars of the model load aside)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_patch_json_and_out_match_the_api(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "res"
    argv = ["circuits", "patch", "--model", model_dir, "--clean", CLEAN, "--corrupted", CORRUPTED,
            "--sweep", "k", "--json", "--out", str(out_dir)]  # fmt: skip
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    obj = json.loads(out)  # exactly one JSON object on stdout
    assert obj["sweep"] == "k" and obj["axes"] == ["layer", "kv_head"] and obj["shape"] == [2, 2]
    assert obj["kv_groups"] == {"0": [0, 1, 2], "1": [3, 4, 5]} and obj["group_size"] == 3

    # the same sweep through the Python API with the answer / wrong tokens the CLI reports
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hm = HookedModel.from_hf(
        AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    )
    clean, corrupted = hm.tokenize(CLEAN)["input_ids"], hm.tokenize(CORRUPTED)["input_ids"]
    a = int(hm.forward(clean)[0, -1].argmax())
    assert hm.tokenizer.decode([a]) == obj["answer"]
    top = hm.forward(corrupted)[0, -1].topk(2).indices.tolist()
    w = top[0] if top[0] != a else top[1]
    res = patch_sweep(hm, clean, corrupted, lambda lg: lg[:, -1, a] - lg[:, -1, w], "k")
    assert torch.allclose(torch.tensor(obj["values"], dtype=torch.float64), res.values, atol=1e-5)
    assert obj["clean_metric"] == pytest.approx(res.clean_metric, abs=1e-5)

    saved = load_file(str(out_dir / "patch.safetensors"))
    assert torch.allclose(saved["values"], res.values, atol=1e-5)
    assert saved["per_prompt"].shape == (1, 2, 2)
    assert json.loads((out_dir / "patch.json").read_text())["sweep"] == "k"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_patch_text_output_and_answer_tokens(model_dir, capsys):
    argv = ["circuits", "patch", "--model", model_dir, "--clean", CLEAN, "--corrupted", CORRUPTED,
            "--sweep", "resid_pre", "--answer", "5", "--wrong", "4"]  # fmt: skip
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    assert "resid_pre sweep 2x" in out and "layer" in out and "top:" in out


def test_patch_bad_input_one_line_exit_2(model_dir, tmp_path, capsys):
    base = ["circuits", "patch", "--model", model_dir]
    code, out, err = _run(
        capsys, base + ["--clean", CLEAN, "--corrupted", "4 3 2 1 0 9 9", "--sweep", "heads"]
    )
    assert code == 2 and out == ""
    assert "same token length" in _one_error_line(err)
    code, out, err = _run(
        capsys, base + ["--clean", CLEAN, "--corrupted", CORRUPTED, "--sweep", "resid_middle"]
    )
    assert code == 2 and out == "" and "invalid choice" in _one_error_line(err)
    code, out, err = _run(
        capsys,
        base + ["--clean", CLEAN, "--corrupted", CORRUPTED, "--sweep", "heads", "--answer", " January 7"],
    )
    assert code == 2 and "one token" in _one_error_line(err)
    code, out, err = _run(capsys, base + ["--sweep", "heads", "--out", str(tmp_path / "x")])
    assert code == 2 and "--clean" in _one_error_line(err)
    assert not (tmp_path / "x").exists()


def test_patch_task(model_dir, capsys):
    pytest.importorskip("rosettalens.circuits.tasks")
    argv = ["circuits", "patch", "--model", model_dir, "--task", "digits", "--n-prompts", "3", "--sweep", "mlp_out",
            "--templates", "bare", "--json"]  # fmt: skip
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    obj = json.loads(out)
    assert obj["task"] == "digits" and obj["n_prompts"] == 3 and obj["shape"][0] == 2
