"""`rosetta steer vector | transfer | eval` on tiny models saved as local HF folders."""

from __future__ import annotations

import json

import pytest
import torch

from rosettalens.cli import main
from rosettalens.models.tiny import tiny_model
from rosettalens.steering import SteeringVector


def _save_tiny(path, family="llama", d_model=48, chat=True):
    m, t = tiny_model(family, seed=0, d_model=d_model)
    if not chat:
        import copy

        t = copy.deepcopy(t)
        t.chat_template = None
    m.save_pretrained(path)
    t.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": _save_tiny(root / "tiny-llama"),
        "wide": _save_tiny(root / "tiny-qwen64", family="qwen2", d_model=64),
        "nochat": _save_tiny(root / "tiny-nochat", chat=False),
    }


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_vector_transfer_eval_round_trip(models, tmp_path, capsys):
    vec = tmp_path / "v.safetensors"
    code, out, err = _run(
        capsys,
        ["steer", "vector", "--model", models["llama"], "--hook", "resid_pre.-1", "--positive", "harmful",
         "--negative", "harmless", "--n-prompts", "4", "--out", str(vec), "--json"],
    )  # fmt: skip
    assert code == 0, err
    obj = json.loads(out)  # exactly one JSON object on stdout
    assert obj["hook"] == "resid_pre.2" and obj["d_model"] == 48 and vec.is_file()
    sv = SteeringVector.load(vec)
    assert sv.source["positive"] == "harmful" and sv.source["n_positive"] == 4

    # transfer through a mapper fitted on planted data (48 -> 64)
    from rosettalens.mapping import AffineMapper

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 48, generator=g, dtype=torch.float64)
    W = torch.randn(64, 48, generator=g, dtype=torch.float64)
    mdir = AffineMapper().fit(X, X @ W.T).save(
        tmp_path / "mapper", source_model="tiny-llama", source_hook="resid_pre.2", target_model="tiny-qwen64",
        target_hook="resid_pre.1",
    )  # fmt: skip
    tv = tmp_path / "t.safetensors"
    code, out, err = _run(
        capsys,
        ["steer", "transfer", "--vector", str(vec), "--mapper-dir", str(mdir), "--out", str(tv), "--json"],
    )
    assert code == 0, err
    obj = json.loads(out)
    assert obj["d_model"] == 64 and obj["hook"] == "resid_pre.1" and obj["model"] == "tiny-qwen64"
    assert SteeringVector.load(tv).kind == "transferred"

    # eval of the transferred vector in the 64-wide model
    res_file = tmp_path / "res.json"
    code, out, err = _run(
        capsys,
        ["steer", "eval", "--model", models["wide"], "--vector", str(tv), "--mode", "add", "--scale", "2",
         "--task", "refusal", "--n-prompts", "2", "--max-new-tokens", "3", "--json", "--out", str(res_file)],
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert set(res["harmful"]) == {"baseline", "steered", "random"}
    assert res["n_harmful"] == 2 and res["mode"] == "add" and res["scale"] == 2.0
    assert json.loads(res_file.read_text())["harmful"] == res["harmful"]

    # human-readable output without --json
    code, out, err = _run(
        capsys,
        ["steer", "eval", "--model", models["llama"], "--vector", str(vec), "--mode", "ablate", "--task",
         "refusal", "--n-prompts", "1", "--max-new-tokens", "2", "--no-random"],
    )  # fmt: skip
    assert code == 0, err
    assert "refusal rate on 1 harmful prompts" in out


def test_vector_auto_selects_refusal_direction(models, tmp_path, capsys):
    vec = tmp_path / "auto.safetensors"
    code, out, err = _run(
        capsys,
        ["steer", "vector", "--model", models["llama"], "--hook", "auto", "--positive", "harmful",
         "--negative", "harmless", "--n-prompts", "3", "--kl-threshold", "100", "--out", str(vec), "--json"],
    )  # fmt: skip
    assert code == 0, err
    obj = json.loads(out)
    sv = SteeringVector.load(vec)
    assert sv.kind == "refusal" and sv.hook == f"resid_pre.{obj['layer']}"
    assert [c["layer"] for c in sv.source["candidates"]] == [0, 1]


def test_bad_inputs_exit_2_with_one_line(models, tmp_path, capsys):
    vec = tmp_path / "v48.safetensors"
    SteeringVector(torch.ones(48), "tiny-llama", "resid_pre.1").save(vec)
    # vector from a model with other dims
    code, out, err = _run(
        capsys,
        [
            "steer",
            "eval",
            "--model",
            models["wide"],
            "--vector",
            str(vec),
            "--mode",
            "ablate",
            "--task",
            "refusal",
        ],
    )
    assert code == 2 and out == ""
    assert "d_model 48" in _one_error_line(err)
    # model without a chat template for the chat task
    code, out, err = _run(
        capsys,
        [
            "steer",
            "eval",
            "--model",
            models["nochat"],
            "--vector",
            str(vec),
            "--mode",
            "ablate",
            "--task",
            "refusal",
        ],
    )
    assert code == 2 and "chat template" in _one_error_line(err)
    code, out, err = _run(
        capsys,
        ["steer", "vector", "--model", models["nochat"], "--hook", "resid_pre.1", "--positive", "harmful",
         "--negative", "harmless", "--n-prompts", "2", "--out", str(tmp_path / "x.safetensors")],
    )  # fmt: skip
    assert code == 2 and "chat template" in _one_error_line(err)
    assert not (tmp_path / "x.safetensors").exists()
    # empty prompt files
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, out, err = _run(
        capsys,
        ["steer", "vector", "--model", models["llama"], "--hook", "resid_pre.1", "--positive", str(empty),
         "--negative", "harmless", "--out", str(tmp_path / "y.safetensors")],
    )  # fmt: skip
    assert code == 2 and "no prompts" in _one_error_line(err)
    code, out, err = _run(
        capsys,
        ["steer", "eval", "--model", models["llama"], "--vector", str(vec), "--mode", "ablate", "--task", "refusal",
         "--harmless-eval", str(empty)],
    )  # fmt: skip
    assert code == 2 and "no prompts" in _one_error_line(err)
    # transfer: vector dims do not fit the mapper; missing mapper directory; corrupt vector
    from rosettalens.mapping import AffineMapper

    X = torch.randn(100, 40, dtype=torch.float64)
    mdir = AffineMapper().fit(X, X[:, :30]).save(tmp_path / "m40")
    code, out, err = _run(
        capsys,
        ["steer", "transfer", "--vector", str(vec), "--mapper-dir", str(mdir), "--out", str(tmp_path / "z")],
    )
    assert code == 2 and "source width 40" in _one_error_line(err)
    code, out, err = _run(
        capsys,
        [
            "steer",
            "transfer",
            "--vector",
            str(vec),
            "--mapper-dir",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "z"),
        ],
    )
    assert code == 2 and _one_error_line(err)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    code, out, err = _run(
        capsys,
        ["steer", "transfer", "--vector", str(bad), "--mapper-dir", str(mdir), "--out", str(tmp_path / "z")],
    )
    assert code == 2 and _one_error_line(err)
    assert not list(tmp_path.glob("z*"))
    # unknown prompt set name / bad hook
    code, out, err = _run(
        capsys,
        ["steer", "vector", "--model", models["llama"], "--hook", "resid_pre.99", "--positive", "harmful",
         "--negative", "harmless", "--n-prompts", "2", "--out", str(tmp_path / "w.safetensors")],
    )  # fmt: skip
    assert code == 2 and _one_error_line(err)
