"""The experiment skeleton: stages in order, resume, wrong-experiment resume, the --json object."""

import json
import textwrap

import pytest
import torch

from rosettalens.errors import ConfigError
from rosettalens.experiments import EXPERIMENTS
from rosettalens.experiments.base import Experiment, Stage, run_experiment

TOY = textwrap.dedent(
    '''
    """A toy experiment: three stages over a seeded random matrix."""
    from dataclasses import dataclass

    import torch

    from rosettalens.experiments.base import Experiment, Stage

    CALLS = []


    @dataclass
    class ToyConfig:
        n: int = 4
        scale: float = 2.0
        seed: int = 0
        center: bool = False
        out: str | None = None


    class Toy(Experiment):
        name = "toy"
        config_cls = ToyConfig

        def stages(self, cfg):
            return [
                Stage("data", ("data.safetensors",), self.data),
                Stage("stats", ("stats.json",), self.stats),
                Stage("plot", ("plot.png",), self.plot),
                Stage("finish", (), self.finish),
            ]

        def data(self, ctx):
            CALLS.append("data")
            g = torch.Generator().manual_seed(ctx.config.seed)
            x = torch.randn(ctx.config.n, 3, generator=g) * ctx.config.scale
            ctx.state["data"] = {"x": x}
            ctx.save_tensors("data.safetensors", ctx.state["data"])

        def stats(self, ctx):
            CALLS.append("stats")
            x = ctx.state["data"]["x"]
            ctx.state["stats"] = {"mean": float(x.mean()), "n": x.shape[0]}
            ctx.save_json("stats.json", ctx.state["stats"])

        def plot(self, ctx):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            CALLS.append("plot")
            fig, ax = plt.subplots()
            ax.plot(ctx.state["data"]["x"][:, 0])
            ctx.save_figure("plot.png", fig)

        def finish(self, ctx):
            CALLS.append("finish")
            ctx.results.update(mean=ctx.state["stats"]["mean"], n=ctx.state["stats"]["n"])

        def summary(self, ctx):
            return {"mean": ctx.results["mean"], "n": ctx.results["n"]}


    EXPERIMENT = Toy()
    '''
)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_mod").mkdir()
    (tmp_path / "toy_mod" / "rosetta_toy_exp.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path / "toy_mod"))
    monkeypatch.setitem(EXPERIMENTS, "toy", "rosetta_toy_exp")
    import importlib

    mod = importlib.import_module("rosetta_toy_exp")
    mod = importlib.reload(mod)
    mod.CALLS.clear()
    return mod


def _expected_mean(n=4, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return float((torch.randn(n, 3, generator=g) * scale).mean())


def test_stages_run_in_order_and_write_the_run_dir(toy, tmp_path):
    out = tmp_path / "run"
    summary = run_experiment(toy.EXPERIMENT, toy.ToyConfig(out=str(out)), progress=False)
    assert toy.CALLS == ["data", "stats", "plot", "finish"]
    assert summary["mean"] == pytest.approx(_expected_mean()) and summary["n"] == 4
    assert summary["run_dir"] == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {"experiment": "toy", "n": 4, "scale": 2.0, "seed": 0, "center": False, "out": str(out)}
    res = json.loads((out / "results.json").read_text())
    assert res["mean"] == summary["mean"] and set(res["timings_s"]) == {
        "data",
        "stats",
        "plot",
        "finish",
        "total",
    }
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "<html" in (out / "report.html").read_text().lower()
        or "<!doctype html>" in (out / "report.html").read_text()
    )
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temp files left


def test_resume_skips_finished_stages_and_reruns_missing_ones(toy, tmp_path):
    out = tmp_path / "run"
    first = run_experiment(toy.EXPERIMENT, toy.ToyConfig(out=str(out)), progress=False)
    toy.CALLS.clear()
    # every output exists: only the output-less stage runs, values come back from the files
    again = run_experiment(toy.EXPERIMENT, None, resume=out, progress=False)
    assert toy.CALLS == ["finish"] and again == first
    res = json.loads((out / "results.json").read_text())
    assert res["timings_s"]["data"] == res["timings_s"]["stats"] == "skipped"
    # a missing output reruns its stage only (the later stage reads the reloaded data)
    (out / "stats.json").unlink()
    (out / "plot.png").unlink()
    toy.CALLS.clear()
    third = run_experiment(toy.EXPERIMENT, toy.ToyConfig(out=str(out)), resume=out, progress=False)
    assert toy.CALLS == ["stats", "plot", "finish"] and third == first
    # a tampered data file proves the values really are reloaded, not recomputed
    from safetensors.torch import save_file

    save_file({"x": torch.ones(5, 3)}, str(out / "data.safetensors"))
    (out / "stats.json").unlink()
    toy.CALLS.clear()
    fourth = run_experiment(toy.EXPERIMENT, None, resume=out, progress=False)
    assert toy.CALLS == ["stats", "finish"] and fourth == {"mean": 1.0, "n": 5, "run_dir": str(out)}


def test_resume_refuses_changed_options_and_fresh_run_refuses_existing_dir(toy, tmp_path):
    out = tmp_path / "run"
    run_experiment(toy.EXPERIMENT, toy.ToyConfig(out=str(out)), progress=False)
    with pytest.raises(ConfigError, match="scale"):
        run_experiment(toy.EXPERIMENT, toy.ToyConfig(out=str(out), scale=3.0), resume=out, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        run_experiment(toy.EXPERIMENT, toy.ToyConfig(out=str(out)), progress=False)


def test_user_error_in_a_stage_leaves_nothing(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from rosettalens.errors import DataError

    @dataclass
    class Cfg:
        out: str | None = None

    class Failing(Experiment):
        name = "failing"
        config_cls = Cfg

        def stages(self, cfg):
            def ok(ctx):
                ctx.save_json("a.json", {"a": 1})

            def bad(ctx):
                raise DataError("no prompts")

            return [Stage("a", ("a.json",), ok), Stage("b", ("b.json",), bad)]

    with pytest.raises(DataError):
        run_experiment(Failing(), Cfg(out=str(tmp_path / "r")), progress=False)
    assert not (tmp_path / "r").exists()
    # a directory that already existed keeps what it had, and gets nothing of this run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError):
        run_experiment(Failing(), Cfg(out=str(tmp_path / "mine")), progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # the default run directory: neither it nor the runs/ folder made for it stays
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(DataError):
        run_experiment(Failing(), Cfg(), progress=False)
    assert list(work.iterdir()) == []


def _main(argv, capsys):
    from rosettalens.cli import main

    capsys.readouterr()
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_json_prints_one_object_and_options_come_from_the_config(toy, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _main(["run", "toy", "--n", "6", "--scale", "0.5", "--center", "--out", str(out),
                               "--json"], capsys)  # fmt: skip
    assert code == 0, err
    obj = json.loads(stdout)  # exactly one JSON document on stdout
    assert obj == {"mean": pytest.approx(_expected_mean(6, 0.5)), "n": 6, "run_dir": str(out)}
    assert json.loads((out / "config.json").read_text())["center"] is True
    # --config reruns the saved config (options override it)
    code, stdout, err = _main(["run", "toy", "--config", str(out / "config.json"), "--seed", "1", "--out",
                               str(tmp_path / "run2"), "--json"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["mean"] == pytest.approx(_expected_mean(6, 0.5, seed=1))
    # --resume with no options: the run's own config, nothing recomputed
    toy.CALLS.clear()
    code, stdout, err = _main(["run", "toy", "--resume", str(out), "--json"], capsys)
    assert code == 0, err
    assert toy.CALLS == ["finish"]
    assert json.loads(stdout) == obj


def test_cli_resume_of_another_experiments_run_is_refused(toy, tmp_path, capsys):
    out = tmp_path / "run"
    run_experiment(toy.EXPERIMENT, toy.ToyConfig(out=str(out)), progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for argv in (["run", "refusal-transfer", "--resume", str(out)],
                 ["run", "refusal-transfer", "--resume", str(out), "--n-eval", "3", "--json"]):  # fmt: skip
        code, stdout, err = _main(argv, capsys)
        assert code == 2 and stdout == ""
        lines = err.strip().splitlines()
        assert (
            len(lines) == 1
            and lines[0].startswith("rosetta: error:")
            and "toy run, not refusal-transfer" in lines[0]
        )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    # a folder that is no run directory at all
    (tmp_path / "empty").mkdir()
    code, _, err = _main(["run", "toy", "--resume", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no config.json" in err and list((tmp_path / "empty").iterdir()) == []


def test_old_boolean_spelling_still_works_with_a_deprecation_line(toy, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _main(["run", "toy", "--center", "true", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["center"] is True
    assert "--center true is deprecated; use --center" in err
    code, stdout, err = _main(
        ["run", "toy", "--center=false", "--out", str(tmp_path / "r2"), "--json"], capsys
    )
    assert code == 0 and json.loads((tmp_path / "r2" / "config.json").read_text())["center"] is False
    assert "use --no-center" in err


def test_preset_then_options_win(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(type(toy.EXPERIMENT), "presets", {"big": {"n": 8, "scale": 0.5}}, raising=False)
    code, stdout, err = _main(
        ["run", "toy", "--preset", "big", "--out", str(tmp_path / "a"), "--json"], capsys
    )
    assert code == 0, err
    assert json.loads(stdout)["n"] == 8 and json.loads(stdout)["mean"] == pytest.approx(
        _expected_mean(8, 0.5)
    )
    code, stdout, err = _main(["run", "toy", "--preset", "big", "--n", "3", "--out", str(tmp_path / "b"), "--json"],
                              capsys)  # fmt: skip
    assert json.loads(stdout)["mean"] == pytest.approx(_expected_mean(3, 0.5))
    code, _, err = _main(["run", "toy", "--preset", "small"], capsys)
    assert code == 2 and "invalid choice: 'small'" in err


def test_plan_is_printed_before_the_run(toy, tmp_path, capsys, monkeypatch):
    def plan(self, cfg):
        return {"models": ["smollm2-135m-instruct"], "organisms_to_build": ["smollm2-135m-instruct+ihy"],
                "minutes": 9.2, "peak_gb": 2.84, "notes": f"{cfg.n} rows"}  # fmt: skip

    monkeypatch.setattr(type(toy.EXPERIMENT), "plan", plan)
    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path / "cache"))  # the model is not cached there
    code, stdout, err = _main(["run", "toy", "--n", "5", "--out", str(tmp_path / "a"), "--json"], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == (
        "plan: pulls smollm2-135m-instruct, builds smollm2-135m-instruct+ihy; about 9 min, peak 2.8 GB; 5 rows"
    )
    from rosettalens.cli import main

    assert main(["run", "--help"]) == 0
    assert "[about 9 min, peak 2.8 GB]" in capsys.readouterr().out.replace("\n", " ")


def test_python_entry_point_runs_with_the_clis_checks(toy, tmp_path):
    from rosettalens.experiments import run

    out = tmp_path / "py"
    summary = run("toy", n=6, scale=0.5, out=str(out), progress=False)
    assert summary == {"mean": pytest.approx(_expected_mean(6, 0.5)), "n": 6, "run_dir": str(out)}
    with pytest.raises(ConfigError, match="no option scael"):
        run("toy", scael=0.5, out=str(tmp_path / "x"), progress=False)
    with pytest.raises(ConfigError, match="n must be int"):
        run("toy", n="six", out=str(tmp_path / "x"), progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):  # the CLI's output check, before any stage
        run("toy", out=str(out), progress=False)
    with pytest.raises(ConfigError, match="unknown experiment"):
        run("toy2")
    assert not (tmp_path / "x").exists()


def test_reuse_takes_the_matching_stages_of_an_earlier_run(toy, tmp_path, capsys):
    from dataclasses import dataclass

    calls = []

    @dataclass
    class Cfg:
        n: int = 3
        scale: float = 1.0
        out: str | None = None

    class Reuser(Experiment):
        name = "reuser"
        config_cls = Cfg

        def stages(self, cfg):
            def data(ctx):
                calls.append("data")
                ctx.state["data"] = {"x": torch.arange(cfg.n, dtype=torch.float32)}
                ctx.save_tensors("data.safetensors", ctx.state["data"])

            def scaled(ctx):
                calls.append("scaled")
                ctx.results["sum"] = float(ctx.state["data"]["x"].sum()) * cfg.scale
                ctx.save_json("scaled.json", {"sum": ctx.results["sum"]})

            return [
                Stage("data", ("data.safetensors",), data, reuse_key=("n",)),
                Stage("scaled", ("scaled.json",), scaled, reuse_key=("n", "scale")),
            ]

    a = tmp_path / "a"
    run_experiment(Reuser(), Cfg(out=str(a)), progress=False)
    # the data stage depends on n only: taken from run a; the scaled stage (new scale) recomputed on it
    calls.clear()
    b = run_experiment(Reuser(), Cfg(scale=2.0, out=str(tmp_path / "b")), reuse=[a], progress=False)
    assert calls == ["scaled"] and b["sum"] == 2.0 * (0 + 1 + 2)
    assert b["reused"] == {"data": str(a)} and b["timings_s"]["data"] == "reused"
    assert (tmp_path / "b" / "data.safetensors").read_bytes() == (a / "data.safetensors").read_bytes()
    # another n: nothing matches, everything is computed
    calls.clear()
    c = run_experiment(Reuser(), Cfg(n=4, out=str(tmp_path / "c")), reuse=[a], progress=False)
    assert calls == ["data", "scaled"] and c["sum"] == 6.0 and "reused" not in c
    # a run of another experiment, or no run at all: refused before anything is written
    t = tmp_path / "toy-run"
    run_experiment(toy.EXPERIMENT, toy.ToyConfig(out=str(t)), progress=False)
    for bad, msg in ((t, "holds a toy run, not reuser"), (tmp_path, "no config.json")):
        with pytest.raises(ConfigError, match=msg):
            run_experiment(Reuser(), Cfg(out=str(tmp_path / "d")), reuse=[bad], progress=False)
        assert not (tmp_path / "d").exists()
