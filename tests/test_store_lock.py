"""The store's writer's lock (one writer per --out, stale locks taken over) and corrupt manifests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rosettalens.errors import StoreError
from rosettalens.hooks import HookedModel
from rosettalens.io import LockedError
from rosettalens.models.tiny import tiny_model
from rosettalens.store import LOCK, MANIFEST, ActivationStore, extract

DOCS = ["The quick brown fox jumps over the lazy dog.", "0 1 2 3 4 5 6 7 8 9", "short text here"]
HOOKS = ["resid_post.0"]


@pytest.fixture(scope="module")
def hm():
    m, t = tiny_model("llama", seed=0)
    return HookedModel.from_hf(m, t, name="tiny-llama")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "docs.txt"
    p.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def ref_store(hm, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    extract(hm, HOOKS, data_file, out, shard_size=7)
    return out


def _holder(lock_path: Path) -> subprocess.Popen:
    """Another live process that holds the writer's lock of a store (its pid in the lock file, as a
    running extract leaves it; FileLock's protocol is just that)."""
    proc = subprocess.Popen(["sleep", "60"])
    lock_path.write_text(str(proc.pid))
    return proc


def test_second_writer_is_refused_and_touches_nothing(hm, data_file, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    proc = _holder(out / LOCK)
    try:
        # what the live writer has on disk: its progress marker and a shard being written
        (out / ".extract-in-progress.json").write_text('{"format": "x", "config_hash": "other"}')
        tmp_shard = out / f".shard-00000.safetensors.tmp-{proc.pid}-abcd1234"
        tmp_shard.write_bytes(b"partial")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        for overwrite in (False, True):
            with pytest.raises(LockedError) as e:
                extract(hm, HOOKS, data_file, out, shard_size=7, overwrite=overwrite)
            msg = str(e.value)
            assert "\n" not in msg and str(proc.pid) in msg and str(out) in msg
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # its temp shard survives
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(hm, data_file, ref_store, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is no longer alive
    out = tmp_path / "store"
    out.mkdir()
    (out / LOCK).write_text(str(dead.pid))
    (out / f".shard-00000.safetensors.tmp-{dead.pid}-0000ffff").write_bytes(b"left by the killed run")
    st = extract(hm, HOOKS, data_file, out, shard_size=7)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref_store.iterdir())
    for p in ref_store.iterdir():  # identical to an extraction that never met a lock
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert st.manifest["shards"] == ActivationStore.open(ref_store).manifest["shards"]
    assert not (out / LOCK).exists()


def test_lock_is_released_after_an_error(hm, data_file, tmp_path, monkeypatch):
    import rosettalens.store as store_mod

    out = tmp_path / "store"

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store_mod, "_write_shard", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        extract(hm, HOOKS, data_file, out, shard_size=7)
    assert not (out / LOCK).exists()
    monkeypatch.undo()
    extract(hm, HOOKS, data_file, out, shard_size=7)  # the same command resumes
    ActivationStore.open(out, verify=True)


def _files_mode(path: Path) -> set[int]:
    return {p.stat().st_mode & 0o777 for p in path.iterdir()}


def test_store_files_have_normal_permissions(ref_store):
    mask = os.umask(0)
    os.umask(mask)
    assert _files_mode(ref_store) == {0o666 & ~mask}


CORRUPT = [
    ("list", [1, 2, 3], "JSON list"),
    ("no hooks", lambda m: m.pop("hooks"), "no 'hooks'"),
    ("no shards", lambda m: m.pop("shards"), "no 'shards'"),
    ("no d_model", lambda m: m.pop("d_model"), "no 'd_model'"),
    ("hooks not a list", lambda m: m.update(hooks="resid_post.0"), "'hooks'"),
    ("no hook shape", lambda m: m.update(hook_shapes={}), "'hook_shapes'"),
    ("shard without sha256", lambda m: m["shards"][0].pop("sha256"), "'shards'"),
    ("shard outside the store", lambda m: m["shards"][0].update(file="../x"), "'shards'"),
    ("bad dtype", lambda m: m.update(dtype="int3"), "'dtype'"),
    ("model without name", lambda m: m.update(model={}), "'model'"),
    ("no format", lambda m: m.pop("format"), "unknown store format"),
    ("a string", "hello", "JSON str"),
]


@pytest.mark.parametrize("case,change,match", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_manifest_is_one_store_error(ref_store, tmp_path, case, change, match):
    d = tmp_path / "store"
    shutil.copytree(ref_store, d)
    m = json.loads((d / MANIFEST).read_text())
    if callable(change):
        change(m)
    else:
        m = change
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError) as e:
        ActivationStore.open(d)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_lock_holder_is_seen_alive_then_dead(tmp_path):
    """Guards the tests above: the helper's lock is held while it runs and stale once it is gone."""
    from rosettalens.io import FileLock

    lock = tmp_path / "x.lock"
    proc = _holder(lock)
    try:
        with pytest.raises(LockedError):
            FileLock(lock).acquire()
    finally:
        proc.kill()
        proc.wait()
    FileLock(lock).acquire().release()
    assert not lock.exists()
