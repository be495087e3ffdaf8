"""Every library writer of a user-named output: refuses an existing one, replaces it whole with
``overwrite`` (a stale extra file is gone), and after an injected error leaves no temp file and the
old output intact."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rosettalens.errors import ConfigError, DataError, OutputExistsError
from rosettalens.experiments.base import Experiment, Stage, run_experiment
from rosettalens.io import is_temp_name
from rosettalens.mapping import get_mapper_class, load_mapper
from rosettalens.sae.model import SAE, SAEConfig
from rosettalens.steering.vectors import SteeringVector


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_temp(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*") if is_temp_name(p.name) or ".tmp" in p.name]


def _mode() -> int:
    m = os.umask(0)
    os.umask(m)
    return 0o666 & ~m


class Boom(RuntimeError):
    pass


def _boom(*a, **k):
    raise Boom("serializer failed")


def _error_keeps_old(monkeypatch, target: str, replacement, save, out: Path) -> None:
    """``save()`` with ``target`` patched to fail: it raises, ``out`` is as before, no temp is left."""
    old = _snapshot(out.parent)
    monkeypatch.setattr(target, replacement)
    with pytest.raises(Boom):
        save()
    monkeypatch.undo()
    assert _snapshot(out.parent) == old
    _no_temp(out.parent)


# ------------------------------------------------------------------------------------------ mapper
def _mapper(seed: int):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(40, 6, generator=g), torch.randn(40, 5, generator=g)
    return get_mapper_class("affine")().fit(X, Y)


def test_mapper_save_refuses_replaces_whole_and_survives_errors(tmp_path, monkeypatch):
    d = tmp_path / "mapper"
    m1, m2 = _mapper(0), _mapper(1)
    m1.save(d, overwrite=False)
    assert {p.stat().st_mode & 0o777 for p in d.iterdir()} == {_mode()}
    (d / "stale.txt").write_text("from an earlier run")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        m2.save(d, overwrite=False)
    _error_keeps_old(
        monkeypatch, "rosettalens.mapping.base.save_file", _boom, lambda: m2.save(d, overwrite=True), d
    )
    m2.save(d, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "mapper.safetensors"]  # stale gone
    torch.testing.assert_close(load_mapper(d).transform(torch.ones(2, 6)), m2.transform(torch.ones(2, 6)))


def test_mapper_save_never_mixes_into_or_deletes_a_foreign_folder(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError):
            _mapper(0).save(d, overwrite=overwrite)
    assert [p.name for p in d.iterdir()] == ["notes.txt"]
    _no_temp(tmp_path)


# ------------------------------------------------------------------------------------ steering vector
def _vector(seed: int) -> SteeringVector:
    v = torch.randn(8, generator=torch.Generator().manual_seed(seed))
    return SteeringVector(vector=v, model="tiny", hook="resid_post.0")


def test_vector_save_refuses_replaces_and_survives_errors(tmp_path, monkeypatch):
    p = tmp_path / "v.safetensors"
    _vector(0).save(p, overwrite=False)
    assert {f.stat().st_mode & 0o777 for f in tmp_path.iterdir()} == {_mode()}
    with pytest.raises(OutputExistsError):
        _vector(1).save(p, overwrite=False)
    from rosettalens.io import atomic_path

    def half_written(path, data, overwrite=True):
        with atomic_path(path, overwrite=overwrite) as tmp:
            tmp.write_bytes(data[: len(data) // 2])
            _boom()

    target = "rosettalens.steering.vectors.atomic_write_bytes"
    _error_keeps_old(monkeypatch, target, half_written, lambda: _vector(1).save(p, overwrite=True), p)

    _vector(1).save(p, overwrite=True)
    assert torch.equal(SteeringVector.load(p).vector, _vector(1).vector)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["v.json", "v.safetensors"]


def test_vector_save_to_a_folder_is_an_error_not_a_sibling_file(tmp_path):
    (tmp_path / "out").mkdir()
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="folder"):
            _vector(0).save(tmp_path / "out", overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no out.safetensors beside it
    assert not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------- SAE
def test_sae_save_refuses_replaces_and_survives_errors(tmp_path, monkeypatch):
    d = tmp_path / "sae"
    a = SAE(SAEConfig(d_in=8, width=16, arch="topk", k=2, seed=0))
    b = SAE(SAEConfig(d_in=8, width=16, arch="topk", k=2, seed=1))
    a.save(d, overwrite=False)
    with pytest.raises(OutputExistsError):
        b.save(d, overwrite=False)
    _error_keeps_old(monkeypatch, "safetensors.torch.save_file", _boom, lambda: b.save(d, overwrite=True), d)
    b.save(d, overwrite=True)
    assert torch.equal(SAE.load(d).W_enc, b.W_enc)
    (d / "stale.txt").write_text("x")
    with pytest.raises(
        OutputExistsError, match="not a SAE folder"
    ):  # never mixes with or deletes other files
        a.save(d, overwrite=True)
    assert (d / "stale.txt").exists()


# ---------------------------------------------------------------------------------- similarity files
def test_compare_writers_are_atomic(tmp_path, monkeypatch):
    from rosettalens.similarity.compare import plot_heatmap, write_json_atomic

    p = write_json_atomic({"v": float("nan"), "ok": 1.5}, tmp_path / "results.json")
    assert json.loads(p.read_text()) == {"v": None, "ok": 1.5}  # strict JSON on disk
    png = plot_heatmap([[0.1, 0.2], [0.3, None]], ["a0", "a1"], ["b0", "b1"], tmp_path / "m.png")
    old = png.read_bytes()
    assert old[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.figure import Figure

    def half_then_fail(self, fname, *a, **k):
        Path(fname).write_bytes(b"\x89PNG partial")
        _boom()

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(Boom):
        plot_heatmap([[0.5]], ["a"], ["b"], png)
    assert png.read_bytes() == old
    _no_temp(tmp_path)


# ----------------------------------------------------------------------------------- data generate
def test_generate_refuses_user_files_and_folders_before_generating(tmp_path, monkeypatch):
    from rosettalens.data import generate

    monkeypatch.setattr(generate, "generate_corpus", _boom)  # any generation would fail the test
    (tmp_path / "mine.jsonl").write_text('{"text": "my own data"}\n')
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        generate.generate_to_file(None, tmp_path / "mine.jsonl", 10)
    with pytest.raises(ConfigError, match="folder"):
        generate.generate_to_file(None, tmp_path / "folder.jsonl", 10, overwrite=True)
    assert (tmp_path / "mine.jsonl").read_text() == '{"text": "my own data"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.jsonl", "mine.jsonl"]


def test_generate_overwrite_replaces_and_error_keeps_old(tmp_path, monkeypatch):
    from rosettalens.data import generate
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_model

    m, t = tiny_model("llama", seed=0)
    hm = HookedModel.from_hf(m, t, name="tiny-llama")
    out = tmp_path / "c.txt"
    out.write_text("users file\n")
    docs = [{"text": "alpha beta gamma", "opening": "alpha", "temperature": 1.0, "seed": 1}]
    monkeypatch.setattr(generate, "generate_corpus", lambda *a, **k: docs)
    monkeypatch.setattr(generate, "atomic_write_text", lambda *a, **k: _boom())
    with pytest.raises(Boom):
        generate.generate_to_file(hm, out, 3, overwrite=True)
    assert out.read_text() == "users file\n"
    monkeypatch.undo()
    monkeypatch.setattr(generate, "generate_corpus", lambda *a, **k: docs)
    res = generate.generate_to_file(hm, out, 3, overwrite=True)
    assert out.read_text() == "alpha beta gamma\n" and res["cached"] is False
    assert out.stat().st_mode & 0o777 == _mode()
    assert generate.generate_to_file(hm, out, 3)["cached"] is True  # ours now: reused, no overwrite needed
    _no_temp(tmp_path)


# ------------------------------------------------------------------------------------- run folders
@dataclass
class _Cfg:
    n: int = 3
    fail: bool = False
    out: str | None = None


class _Exp(Experiment):
    name = "outputs-toy"
    config_cls = _Cfg

    def stages(self, cfg):
        def data(ctx):
            ctx.save_json("data.json", {"n": ctx.config.n})

        def plot(ctx):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots()
            ax.plot(range(ctx.config.n))
            ctx.save_figure(f"plot-{ctx.config.n}.png", fig)
            if ctx.config.fail:
                raise DataError("bad prompts")
            ctx.results["n"] = ctx.config.n

        return [Stage("data", ("data.json",), data), Stage("plot", (f"plot-{cfg.n}.png",), plot)]


def test_run_into_an_earlier_run_refuses_or_replaces_whole(tmp_path):
    out = tmp_path / "run"
    run_experiment(_Exp(), _Cfg(n=3, out=str(out)), progress=False)
    assert (out / "plot-3.png").is_file()
    with pytest.raises(ConfigError, match="--overwrite"):
        run_experiment(_Exp(), _Cfg(n=4, out=str(out)), progress=False)
    old = _snapshot(out)
    # a user error during the replacing run: the earlier run comes back untouched
    with pytest.raises(DataError):
        run_experiment(_Exp(), _Cfg(n=4, fail=True, out=str(out)), progress=False, overwrite=True)
    assert _snapshot(out) == old
    _no_temp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # replaced whole: the earlier run's plot does not survive next to the new results.json
    run_experiment(_Exp(), _Cfg(n=4, out=str(out)), progress=False, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert "plot-3.png" not in names and "plot-4.png" in names
    assert json.loads((out / "results.json").read_text())["n"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    _no_temp(tmp_path)
    # --resume keeps working, and does not combine with --overwrite
    run_experiment(_Exp(), None, resume=out, progress=False)
    assert json.loads((out / "results.json").read_text())["timings_s"]["plot"] == "skipped"
    with pytest.raises(ConfigError, match="only one"):
        run_experiment(_Exp(), None, resume=out, progress=False, overwrite=True)
