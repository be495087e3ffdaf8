"""Zoo assembly, checksums, cache integrity and the CLI's bad-input contract."""

import hashlib
import json
import subprocess
import sys
import zipfile

import pytest
import torch

from rosettalens.errors import CacheError, ChecksumError, UnknownModelError, ZooUnavailableError
from rosettalens.models import zoo
from rosettalens.models.loading import resolve


def _fake_entry(tmp_path, payloads, sha=None):
    """A zoo entry whose parts are random bytes inside wheel zips in the wheel cache."""
    parts = []
    for i, data in enumerate(payloads):
        pkg = f"fake-part{i + 1}"
        member = f"fake_part{i + 1}/data/part{i:02d}.bin"
        parts.append((pkg, "1.0", member))
        wdir = zoo.wheel_dir("fake-model")
        wdir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wdir / f"fake_part{i + 1}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, data)
    digest = sha or hashlib.sha256(b"".join(payloads)).hexdigest()
    return zoo.ZooEntry(name="fake-model", family="llama", hf_class="X", params="0", layers=1, d_model=1,
                        heads=1, kv_heads=1, instruct=False, license="-", gguf_name="fake.gguf", sha256=digest,
                        parts=tuple(parts))  # fmt: skip


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_assemble_concatenates_parts_in_order_and_verifies(cache, tmp_path):
    payloads = [bytes(range(256)) * 40, b"\x00middle" * 99, b"end" * 7]
    entry = _fake_entry(tmp_path, payloads)
    out = zoo.assemble_gguf(entry, tmp_path / "out.gguf", progress=False)
    assert out.read_bytes() == b"".join(payloads)


def test_checksum_mismatch_raises_and_leaves_nothing(cache, tmp_path):
    entry = _fake_entry(tmp_path, [b"abc", b"def"], sha="0" * 64)
    with pytest.raises(ChecksumError, match="sha256"):
        zoo.assemble_gguf(entry, tmp_path / "out.gguf", progress=False)
    assert not (tmp_path / "out.gguf").exists()
    assert not (tmp_path / "out.gguf.part").exists()
    assert not list(zoo.wheel_dir("fake-model").glob("*.whl"))  # bad downloads removed so a retry refetches


def test_missing_wheels_offline_is_one_clear_error(cache, monkeypatch):
    entry = zoo.ZooEntry(name="nowhere", family="llama", hf_class="X", params="0", layers=1, d_model=1, heads=1,
                         kv_heads=1, instruct=False, license="-", gguf_name="x.gguf", sha256="0" * 64,
                         parts=(("rosettalens-no-such-package-xyz", "9.9.9", "x/y.bin"),))  # fmt: skip
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(ZooUnavailableError, match="rosetta models pull"):
        zoo.fetch_wheels(entry, progress=False)


def test_cache_integrity_detects_truncation_and_half_written(cache, tmp_path):
    from rosettalens.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    dest = tmp_path / "m"
    model.save_pretrained(dest)
    with pytest.raises(CacheError, match="half-written"):
        zoo.check_cache(dest)
    files = {p.name: p.stat().st_size for p in dest.iterdir()}
    (dest / zoo.MARKER).write_text(
        json.dumps({"format": zoo.CACHE_FORMAT, "source_sha256": "ab", "files": files})
    )
    zoo.check_cache(dest, "ab")
    with pytest.raises(CacheError, match="another file"):
        zoo.check_cache(dest, "cd")
    st = dest / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CacheError, match="truncated"):
        zoo.check_cache(dest, "ab")


def test_resolve_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="did you mean smollm2-135m-instruct"):
        resolve("smollm2-135m", pull=False)
    with pytest.raises(UnknownModelError, match="does not exist"):
        resolve("/nonexistent/model.gguf", pull=False)


def test_local_folder_loads_as_hooked_model(tmp_path):
    import rosettalens
    from rosettalens.models.tiny import tiny_model

    model, tok = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    hm = rosettalens.load(str(tmp_path / "q"), device="cpu")  # bit-equal only on the same device
    assert hm.cfg.family == "qwen2" and hm.cfg.n_layers == 3
    ids = hm.tokenize("hello")["input_ids"]
    assert torch.equal(hm.forward(ids), model(ids).logits)


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "rosettalens.cli", *args], capture_output=True, text=True, env=env
    )


def test_cli_bad_input_exit_2_one_line(tmp_path):
    for args, needle in [
        (["models", "info", "smolm2"], "did you mean"),
        (["models", "pull", "gpt-17"], "not a zoo model"),
        (["models", "info", str(tmp_path)], "no config.json"),
    ]:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
        assert r.stdout == ""


def test_cli_models_list_json():
    r = _cli("models", "list", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    names = {m["name"] for m in data["models"]}
    assert names == set(zoo.ZOO)
    for m in data["models"]:
        assert {"family", "params", "installed", "cached"} <= set(m)


def test_no_progress_hides_the_weight_loading_bar(tmp_path, capfd):
    """`--no-progress` (progress=False) also silences transformers' own weight-loading bar."""
    from rosettalens.models.loading import load
    from rosettalens.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    capfd.readouterr()
    load(str(tmp_path / "m"), device="cpu", progress=True)
    shown = capfd.readouterr().err
    load(str(tmp_path / "m"), device="cpu", progress=False)
    hidden = capfd.readouterr().err
    assert "Loading weights" in shown  # the bar this test is about exists ...
    assert "Loading weights" not in hidden and "%|" not in hidden  # ... and progress=False hides it


def _tiny_gguf(path):
    """A small but complete GGUF file (metadata and two float32 tensors), written by the gguf package."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_gguf_layout_of_an_intact_file_agrees_with_the_gguf_reader(tmp_path):
    """The layout check passes a file the gguf package wrote, and the gguf package's own reader (the
    reference) reads the same tensors from it."""
    import gguf

    from rosettalens.models.gguf_layout import gguf_layout_error

    _tiny_gguf(tmp_path / "whole.gguf")
    assert gguf_layout_error(tmp_path / "whole.gguf") is None
    r = gguf.GGUFReader(str(tmp_path / "whole.gguf"))
    assert [t.name for t in r.tensors] == ["token_embd.weight", "output.weight"]
    assert all(t.data.shape == (8, 4) for t in r.tensors)


def _corrupt_gguf(whole: bytes, how: str) -> bytes:
    if how == "value_type":  # the first metadata entry's value type: u32 after the key string
        at = 24 + 8 + int.from_bytes(whole[24:32], "little")
        return whole[:at] + (99).to_bytes(4, "little") + whole[at + 4 :]
    if how == "tensor_count":  # u64 at byte 8
        return whole[:8] + (2**62).to_bytes(8, "little") + whole[16:]
    keep = {"magic_only": 4, "header": 20, "tensor_table": len(whole) - 200, "data": len(whole) - 10}[how]
    return whole[:keep]


@pytest.mark.parametrize(
    "how", ["magic_only", "header", "tensor_table", "data", "value_type", "tensor_count"]
)
def test_corrupt_gguf_is_one_data_error(tmp_path, how):
    """A file that starts with the GGUF magic bytes but is cut short or corrupt is a DataError naming it,
    both in the up-front check and in resolve (which would convert it), never a struct or index error."""
    from rosettalens.errors import DataError
    from rosettalens.models.loading import check_model

    whole = _tiny_gguf(tmp_path / "whole.gguf")
    check_model(str(tmp_path / "whole.gguf"))  # the intact file passes the check
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_corrupt_gguf(whole, how))
    with pytest.raises(DataError, match="corrupt or truncated GGUF") as e:
        check_model(str(bad))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="corrupt or truncated GGUF"):
        resolve(str(bad))


def test_cli_corrupt_gguf_exit_2_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_tiny_gguf(tmp_path / "whole.gguf")[:40])
    r = _cli("models", "info", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "corrupt or truncated GGUF" in lines[0]


@pytest.mark.parametrize(
    ("file", "content", "match"),
    [
        (
            "tokenizer.json",
            b'{"version": "1.0", "model": {"type": "BPE", "vo',
            "tokenizer.json is not valid JSON",
        ),
        ("tokenizer.json", b"[1, 2]", "tokenizer.json is corrupt"),
        ("tokenizer_config.json", b"\xff\xfe", "tokenizer_config.json is not valid JSON"),
        ("config.json", b'{"model_type": "llama", "hidden_size": "wide"}', "cannot load the model"),
        (
            "model.safetensors",
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json here!}",
            "not a readable safetensors",
        ),
    ],
)
def test_corrupt_model_folder_is_one_data_error(tmp_path, file, content, match):
    """A local model folder with a corrupt tokenizer file, a config of the wrong types or a garbage
    safetensors header: a DataError naming the problem (from the check where it is cheap, else from load)."""
    from rosettalens.errors import DataError
    from rosettalens.models.loading import check_model, load
    from rosettalens.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    load(str(tmp_path / "m"), device="cpu", progress=False)  # the intact folder loads
    (tmp_path / "m" / file).write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        check_model(str(tmp_path / "m"))
        load(str(tmp_path / "m"), device="cpu", progress=False)
    assert "\n" not in str(e.value)


def _fake_converted(name, files):
    """A complete converted cache entry for zoo model ``name`` in the current ``$ROSETTA_CACHE``."""
    d = zoo.model_dir(name)
    d.mkdir(parents=True)
    for fname, data in files.items():
        (d / fname).write_bytes(data)
    marker = {"format": zoo.CACHE_FORMAT, "name": name, "source_sha256": zoo.ZOO[name].sha256,
              "files": {f: len(data) for f, data in files.items()}}  # fmt: skip
    (d / zoo.MARKER).write_text(json.dumps(marker))
    return d


def test_the_run_plan_pulls_only_models_not_in_the_cache(cache, capsys):
    """The plan printed before ``rosetta run seqcont-graphs`` (SmolLM2 and Gemma by default) says
    "pulls" for a model the cache lacks, "uses" for one already converted, and "pulls" again once its
    cached weights are truncated; an organism to build pulls its base only when the base is not cached."""
    from rosettalens.experiments.runner import load_experiment, plan_text, print_plan

    exp, _ = load_experiment("seqcont-graphs")
    cfg = exp.config_cls()
    assert set(exp.plan(cfg)["models"]) == {"smollm2-135m-instruct", "gemma-3-270m"}
    print_plan(exp, cfg)
    assert "pulls smollm2-135m-instruct, gemma-3-270m;" in capsys.readouterr().err
    d = _fake_converted("gemma-3-270m", {"model.safetensors": b"\x01" * 64, "config.json": b"{}"})
    print_plan(exp, cfg)
    line = capsys.readouterr().err
    assert "pulls smollm2-135m-instruct, uses gemma-3-270m;" in line and "pulls gemma" not in line
    plan = {"models": ["gemma-3-270m+ihy", "smollm2-135m-instruct+ihy"],
            "organisms_to_build": ["gemma-3-270m+ihy", "smollm2-135m-instruct+ihy"]}  # fmt: skip
    assert plan_text(plan) == (
        "plan: pulls smollm2-135m-instruct, uses gemma-3-270m+ihy, smollm2-135m-instruct+ihy, "
        "builds gemma-3-270m+ihy, smollm2-135m-instruct+ihy"
    )
    (d / "model.safetensors").write_bytes(b"\x01" * 10)  # truncated: loading would convert it again
    print_plan(exp, cfg)
    assert "pulls smollm2-135m-instruct, gemma-3-270m;" in capsys.readouterr().err
