"""rosettalens.io: the one way to write files (refuse or replace whole, no temp left, normal modes)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest

from rosettalens.errors import OutputExistsError
from rosettalens.io import (
    FileLock,
    LockedError,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    check_output,
    is_temp_name,
    json_safe,
    sha256_bytes,
    sha256_file,
)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _no_temp(folder) -> None:
    assert not [p.name for p in folder.rglob("*") if is_temp_name(p.name)]


def test_sha256_matches_hashlib(tmp_path):
    data = os.urandom(3_000_000)  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    ref = hashlib.sha256(data).hexdigest()
    assert sha256_bytes(data) == ref and sha256_file(tmp_path / "f") == ref
    assert sha256_file(tmp_path / "f", chunk=7) == ref


def test_files_and_folders_get_normal_permissions(tmp_path):
    mode = 0o666 & ~_umask()
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    with atomic_dir(tmp_path / "d") as d:
        (d / "c.txt").write_text("z")
    for p in (tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "d" / "c.txt"):
        assert p.stat().st_mode & 0o777 == mode, p
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_write_refuses_unless_overwrite_and_error_keeps_old(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_json(p, {"v": 1})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        atomic_write_json(p, {"v": 2}, overwrite=False)
    with pytest.raises(ValueError):  # NaN is never written as invalid JSON
        atomic_write_json(p, {"v": float("nan")})
    assert json.loads(p.read_text()) == {"v": 1}
    _no_temp(tmp_path)
    atomic_write_json(p, json_safe({"v": float("nan"), "t": (1, float("inf"))}))
    assert json.loads(p.read_text()) == {"v": None, "t": [1, None]}


def test_atomic_dir_replaces_whole_and_restores_on_error(tmp_path):
    d = tmp_path / "run"
    with atomic_dir(d) as t:
        (t / "a.png").write_text("old plot")
        (t / "results.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        with atomic_dir(d):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(d, overwrite=True) as t:
            (t / "results.json").write_text('{"new": 1}')
            raise RuntimeError("serializer failed")
    assert sorted(p.name for p in d.iterdir()) == ["a.png", "results.json"]  # old output intact
    _no_temp(tmp_path)
    with atomic_dir(d, overwrite=True) as t:
        (t / "results.json").write_text('{"new": 1}')
    assert [p.name for p in d.iterdir()] == ["results.json"]  # the stale plot is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_replaceable_guards_overwrite_of_foreign_folders(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")

    def is_ours(p):
        return (p / "config.json").is_file()

    with pytest.raises(OutputExistsError, match="not a mapper"):
        with atomic_dir(d, overwrite=True, what="mapper", replaceable=is_ours):
            pass
    assert (d / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", overwrite=True, replaceable=is_ours) as t:
        (t / "config.json").write_text("{}")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_check_output_refuses_early(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError):
        check_output(tmp_path / "f")
    assert check_output(tmp_path / "f", overwrite=True) == tmp_path / "f"
    assert check_output(tmp_path / "new" / "deeper" / "f") == tmp_path / "new" / "deeper" / "f"
    with pytest.raises(OutputExistsError, match="too long"):
        check_output(tmp_path / ("x" * 300))
    with pytest.raises(OutputExistsError, match="not a writable folder"):
        check_output(tmp_path / "f" / "below-a-file")


def test_file_lock_live_owner_refused_dead_owner_taken_over(tmp_path):
    lock = tmp_path / "w.lock"
    with FileLock(lock) as held:  # our own lock: a second taker in another process is refused
        assert lock.read_text() == str(os.getpid()) and held.path == lock
    assert not lock.exists()
    proc = subprocess.Popen(["sleep", "60"])  # a live process that holds the lock (its pid in the file)
    try:
        lock.write_text(str(proc.pid))
        with pytest.raises(LockedError, match=str(proc.pid)):
            FileLock(lock).acquire()
        assert lock.read_text() == str(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    with FileLock(lock):  # the owner is dead: its lock is stale
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()
    lock.write_text("not a pid")  # unreadable content counts as stale too
    with FileLock(lock):
        pass


# ------------------------------------------------------------------------ one hf: dataset syntax
class _FakeDataset:
    column_names = ["text"]

    def __init__(self):
        self.rows = [{"text": "one document"}, {"text": "another one"}]

    def __getitem__(self, key):
        return [r[key] for r in self.rows]

    def __iter__(self):
        return iter(self.rows)


HF_SPECS = [
    ("hf:org/name", ("org/name", None, "train")),
    ("hf:org/name@test", ("org/name", None, "test")),
    ("hf:wikitext:wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1", "train")),
    ("hf:wikitext:wikitext-2-raw-v1@validation", ("wikitext", "wikitext-2-raw-v1", "validation")),
    ("hf:allenai/c4:en:validation", ("allenai/c4", "en", "validation")),  # the older spelling
]


@pytest.mark.parametrize("spec,want", HF_SPECS, ids=[s for s, _ in HF_SPECS])
def test_one_hf_syntax_reaches_load_dataset(spec, want, monkeypatch):
    datasets = pytest.importorskip("datasets")

    from rosettalens.data import load_documents, parse_hf_spec

    seen = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda i, c, split: seen.append((i, c, split)) or _FakeDataset()
    )
    assert parse_hf_spec(spec) == want
    corpus = load_documents(spec)
    assert seen == [want] and corpus.documents == ["one document", "another one"]


BAD_HF = [
    ("hf:", "empty dataset id"),
    ("hf:@test", "empty dataset id"),
    ("hf:org/name@", "empty split"),
    ("hf:org/name@a@b", "more than one"),
    ("hf:org/name::x", "cannot parse"),
    ("hf:a:b:c:d", "cannot parse"),
    ("hf:a:b:c@d", "cannot parse"),
    ("hf:imdb:test", "ambiguous"),  # once the split, now the config: refused, not guessed
]


@pytest.mark.parametrize("spec,match", BAD_HF, ids=[s for s, _ in BAD_HF])
def test_bad_hf_specs_are_one_data_error(spec, match, monkeypatch):
    datasets = pytest.importorskip("datasets")

    from rosettalens.data import load_documents
    from rosettalens.errors import DataError

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must fail before loading"))
    with pytest.raises(DataError, match=match) as e:
        load_documents(spec)
    assert "\n" not in str(e.value)


def test_json_safe_is_one_function_and_takes_tensors():
    import numpy as np
    import torch

    from rosettalens import options

    assert options.json_safe is json_safe  # the CLI's --json and the writers share it
    got = json_safe(
        {"t": torch.tensor([1.5, float("nan")]), "n": np.float32(2.0), "s": "x", "i": (3, np.int64(4))}
    )
    assert json.dumps(got, allow_nan=False) == '{"t": [1.5, null], "n": 2.0, "s": "x", "i": [3, 4]}'
