"""The one shape every experiment has: a config dataclass, a list of named stages, a run directory.

An experiment module defines::

    @dataclass
    class MyConfig:  # every field is a `rosetta run my-exp` option (its help from option()); saved as config.json
        model: str = option("smollm2-135m-instruct", "the model (zoo name, HF folder, .gguf or hub id)")
        mode: Literal["add", "ablate"] = option("add", "add the vector, or project its direction out")
        seed: int = option(0, "random seed")
        out: str | None = option(None, "the run directory", shown="runs/my-exp-TIMESTAMP")

    class MyExperiment(Experiment):
        name = "my-exp"
        config_cls = MyConfig

        def stages(self, cfg):
            return [
                Stage("model", (), self.load_model),                # no outputs: runs every time
                Stage("vectors", ("vectors.safetensors",), self.vectors),
                Stage("evaluate", ("evaluate.json",), self.evaluate),
            ]

        def vectors(self, ctx):
            ctx.state["vectors"] = {...}                            # name -> tensor
            ctx.save_tensors("vectors.safetensors", ctx.state["vectors"])

        def summary(self, ctx):                                     # the --json object
            return {"rate": ctx.state["evaluate"]["rate"], "run_dir": str(ctx.run_dir)}

    EXPERIMENT = MyExperiment()

and one line in ``rosettalens.experiments.EXPERIMENTS``. Optional class attributes: ``summary_line``,
``presets`` (``--preset NAME``), ``layer_fields`` (layers checked against the model before any work)
and a ``plan(cfg)`` method (the cost printed before a run); see :class:`Experiment`. :func:`run_experiment` creates the run
directory, writes ``config.json``, runs the stages in order, writes ``results.json`` (the stages'
``ctx.results`` plus timings) and ``report.html``, and returns :meth:`Experiment.summary`.

Resume (``--resume RUN_DIR``): a stage is skipped when every one of its declared outputs exists in
the run directory; its ``.json`` and ``.safetensors`` outputs are then reloaded into ``ctx.state``
under the file's stem (``"vectors.safetensors"`` -> ``ctx.state["vectors"]``), or by the stage's
own ``load`` function when it has one. A stage with no outputs (loading models, cheap in-memory
work) always runs. Every file is written atomically (temp file + rename), so a killed stage leaves
either a complete output or none, and is rerun.

User errors (:class:`~rosettalens.errors.RosettaError`) raised by a fresh run remove the run
directory it created: nothing half-written is left behind. An interrupted run (Ctrl-C, a crash)
keeps its directory for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, RosettaError
from ..io import atomic_savefig, atomic_write_bytes, atomic_write_text, temp_sibling
from ..models.zoo import layers_of

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
# config fields that may differ between a run and its resumption (they do not change results)
RESUME_FREE_FIELDS = ("out", "run_dir", "device")


@dataclass
class Stage:
    """A named step. ``run(ctx)`` computes, puts its values into ``ctx.state`` / ``ctx.results`` and
    writes ``outputs`` (paths relative to the run directory) with the ``ctx.save_*`` helpers.

    ``load(ctx)``, when given, restores the stage's values from its outputs on resume (default: each
    ``X.json`` / ``X.safetensors`` output into ``ctx.state["X"]``).

    ``reuse_key``, when given, makes the stage reusable from another run (``--reuse RUN_DIR``): the
    config fields its outputs depend on. A run given by ``--reuse`` whose ``config.json`` has the same
    values for them and holds every output lends its outputs (copied), which are then loaded as on
    resume.
    """

    name: str
    outputs: Sequence[str]
    run: Callable[[RunContext], Any]
    load: Callable[[RunContext], Any] | None = None
    reuse_key: Sequence[str] | None = None


@dataclass
class RunContext:
    """What every stage receives: the config, the run directory and the values shared between stages."""

    config: Any
    run_dir: Path
    progress: bool = True
    state: dict[str, Any] = field(default_factory=dict)  # values passed from stage to stage
    results: dict[str, Any] = field(default_factory=dict)  # goes to results.json
    timings: dict[str, float | str] = field(default_factory=dict)  # stage -> seconds, or "skipped"
    resumed: bool = False
    reuse: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # (run dir, its config)

    # ------------------------------------------------------------------------------------ paths
    def path(self, rel: str) -> Path:
        """``run_dir / rel`` (parent folders created); ``rel`` must stay inside the run directory."""
        p = (self.run_dir / rel).resolve()
        if self.run_dir.resolve() not in p.parents:
            raise ConfigError(f"output {rel!r} is outside the run directory")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def exists(self, rel: str) -> bool:
        return (self.run_dir / rel).exists()

    # ------------------------------------------------------------------------------------- JSON
    def save_json(self, rel: str, obj: Any) -> Path:
        """Write ``obj`` as indented JSON (tensors as lists, non-finite floats as null), atomically."""
        p = self.path(rel)
        atomic_write_text(p, json.dumps(_jsonable(obj), indent=2, default=_json_default))
        return p

    def load_json(self, rel: str) -> Any:
        p = self.run_dir / rel
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {p}: {e}") from e

    # ------------------------------------------------------------------------------ safetensors
    def save_tensors(
        self, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ):
        """Write ``{name: tensor}`` as one safetensors file (contiguous CPU copies), atomically."""
        from safetensors.torch import save

        p = self.path(rel)
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write_bytes(p, save(data, metadata=metadata))
        return p

    def load_tensors(self, rel: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = self.run_dir / rel
        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own SafetensorError on a corrupt file
            raise ConfigError(f"cannot read {p}: {e}") from e

    # ---------------------------------------------------------------------------------- figures
    def save_figure(self, rel: str, fig: Any, dpi: int = 110) -> Path:
        """Save a matplotlib figure as PNG (atomically) and close it."""
        import matplotlib.pyplot as plt

        try:
            return atomic_savefig(fig, self.path(rel), dpi=dpi)
        finally:
            plt.close(fig)


class Experiment:
    """Base class: subclasses set ``name`` and ``config_cls`` and define :meth:`stages`.

    Optional: ``summary_line`` (what ``rosetta run --help`` says about the experiment; default: the
    first line of its module's docstring), ``presets`` (name -> config field values, ``--preset NAME``),
    ``layer_fields`` (config field holding layers -> config field naming their model, checked against
    the model's layer count before any work) and ``plan(cfg)`` (what a run will cost, printed first).
    """

    name: str = ""
    config_cls: type = object
    title: str = ""  # report heading (default: the name)
    summary_line: str = ""
    presets: dict[str, dict[str, Any]] = {}
    layer_fields: dict[str, str] = {"source_layer": "source", "target_layer": "target", "layers": "model"}

    def plan(self, cfg: Any) -> dict[str, Any] | None:
        """What a run with ``cfg`` will cost: ``{"models": [...], "organisms_to_build": [...],
        "minutes": float, "peak_gb": float, "notes": str}`` (any key may be missing); None: no plan."""
        return None

    def check_layers(self, cfg: Any) -> None:
        """Every layer named in ``cfg`` exists in its model, by the model's metadata (nothing loaded).

        ``layer_fields`` maps a field (an int, or comma-separated ints; ``A/B`` gives two models' lists)
        to the field naming its model (a ``models`` field with ``A,B`` when the named one is missing).
        Values that are not plain layer numbers (``auto``, ``stride:K``) are left to the experiment.
        """
        for fname, model_field in self.layer_fields.items():
            value = getattr(cfg, fname, None)
            if value is None or isinstance(value, bool):
                continue
            models = _models_of(cfg, model_field)
            if not models:
                continue
            parts = str(value).split("/") if isinstance(value, str) else [str(value)]
            if len(parts) == 1:
                pairs = [(m, parts[0]) for m in models]
            else:
                pairs = list(zip(models, parts, strict=False))
            for model, text in pairs:
                n = layers_of(model)
                if n is None:
                    continue
                for tok in (t.strip() for t in text.split(",")):
                    try:
                        layer = int(tok)
                    except ValueError:
                        continue  # a keyword the experiment parses itself
                    if not -n <= layer < n:
                        flag = "--" + fname.replace("_", "-")
                        raise ConfigError(
                            f"{flag} {value}: layer {layer} is out of range for {model}, which has {n} layers "
                            f"(0..{n - 1}, or -{n}..-1 from the end)"
                        )

    def stages(self, cfg: Any) -> list[Stage]:
        raise NotImplementedError

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        """The object ``--json`` prints (default: ``results.json``'s content)."""
        return ctx.results

    def report(self, ctx: RunContext) -> None:
        """Write ``report.html`` (default: the report layout with every result as the headline)."""
        from ..report.html import config_defaults, experiment_report, kv_table

        rows = [(k, v) for k, v in ctx.results.items() if k not in ("timings_s", "run_dir")]
        experiment_report(
            ctx,
            self.name,
            self.title or f"rosettalens: {self.name}",
            config_defaults(self.config_cls),
            kv_table(rows),
        )

    def print_summary(self, summary: dict[str, Any]) -> None:
        """Human-readable output of ``rosetta run`` without ``--json`` (default: one line per key)."""
        for k, v in summary.items():
            print(f"{k}: {json.dumps(v, default=_json_default) if isinstance(v, dict | list) else v}")


# ------------------------------------------------------------------------------------ the runner
def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check_options(
    cfg: Any, *, choices: dict[str, Sequence[str]] | None = None, positive: Sequence[str] = ()
) -> None:
    """The shared part of a config's ``validate``: each field in ``choices`` holds one of its values, each
    field in ``positive`` is >= 1; a :class:`ConfigError` naming the CLI option otherwise."""
    for name, allowed in (choices or {}).items():
        value = getattr(cfg, name)
        if value not in allowed:
            what = "mapper kind" if name == "mapper" else name.replace("_", " ")
            raise ConfigError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")


def _models_of(cfg: Any, model_field: str) -> list[str]:
    v = getattr(cfg, model_field, None)
    if isinstance(v, str) and v:
        return [v]
    many = getattr(cfg, "models", None)
    if isinstance(many, str) and many:
        return [m.strip() for m in many.split(",") if m.strip()]
    return []


def read_run_config(
    run_dir: str | os.PathLike[str], what: str = "--resume"
) -> tuple[str | None, dict[str, Any]]:
    """``(experiment name, config fields)`` of an existing run directory; ConfigError if it has none."""
    p = Path(run_dir) / CONFIG_FILE
    if not p.is_file():
        raise ConfigError(f"{what} {run_dir}: no {CONFIG_FILE} there (not a run directory)")
    try:
        values = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what} {run_dir}: cannot read {CONFIG_FILE}: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {run_dir}: {CONFIG_FILE} is not a JSON object")
    name = values.pop("experiment", None)
    return name, values


def _default_run_dir(name: str) -> Path:
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    p, i = base, 1
    while p.exists():
        p, i = base.with_name(f"{base.name}-{i}"), i + 1
    return p


def run_experiment(
    experiment: Experiment,
    cfg: Any = None,
    run_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    reuse: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Run ``experiment`` with ``cfg`` (default: the config class's defaults, or the resumed run's).

    ``reuse``: earlier run directories whose matching stages are taken instead of recomputed (see
    :attr:`Stage.reuse_key`); each must hold a run of this experiment or of one in its ``reuse_from``.

    The run directory is ``resume``, else ``run_dir``, else the config's ``out`` / ``run_dir`` field,
    else ``runs/<name>-<timestamp>``. Returns :meth:`Experiment.summary` (with ``run_dir``).

    A run directory that already holds a run is refused (before any stage runs) unless ``resume``
    continues it or ``overwrite`` replaces it: the earlier run is moved aside and removed when the
    new run ends, so no stale file of it (a plot the new ``results.json`` does not list) survives;
    a user error (:class:`RosettaError`) restores it untouched, while an interrupted new run is
    kept for ``--resume``. A folder of other files gets the run beside
    them (and keeps only them on a user error).
    """
    name = experiment.name
    if resume is not None:
        rdir = Path(resume)
        saved_name, saved = read_run_config(rdir)
        if saved_name != name:
            raise ConfigError(
                f"--resume {rdir}: that directory holds a {saved_name or 'unnamed'!s} run, not {name}"
            )
        saved_cfg = make_config(experiment.config_cls, saved, f"{rdir}/{CONFIG_FILE}")
        if cfg is None:
            cfg = saved_cfg
        else:
            new, old = config_dict(cfg), config_dict(saved_cfg)
            diff = [k for k in new if k not in RESUME_FREE_FIELDS and new[k] != old.get(k)]
            if diff:
                raise ConfigError(
                    f"--resume {rdir}: options differ from the run's config.json ({', '.join(sorted(diff))}); "
                    "resume without them or start a new run"
                )
    elif cfg is None:
        cfg = experiment.config_cls()
    if hasattr(cfg, "validate"):
        cfg.validate()
    if resume is not None:
        rdir = Path(resume)
    elif run_dir is not None:
        rdir = Path(run_dir)
    elif getattr(cfg, "out", None):
        rdir = Path(cfg.out)
    elif getattr(cfg, "run_dir", None):
        rdir = Path(cfg.run_dir)
    else:
        rdir = _default_run_dir(name)
    if resume is not None and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass only one of them")
    if rdir.exists() and not rdir.is_dir():
        raise ConfigError(f"run directory {rdir} exists and is not a folder")
    earlier = resume is None and (rdir / CONFIG_FILE).exists()
    if earlier and not overwrite:
        raise ConfigError(
            f"run directory {rdir} already holds a run; pass --resume {rdir} to continue it, "
            "--overwrite to replace it, or another --out"
        )
    lenders = reuse_runs(experiment, reuse, rdir)
    stages = experiment.stages(cfg)
    ctx = RunContext(config=cfg, run_dir=rdir, progress=progress, resumed=resume is not None, reuse=lenders)
    old_run = None
    if earlier:  # --overwrite: set the earlier run aside (restored on a user error, else removed)
        old_run = temp_sibling(rdir)
        os.replace(rdir, old_run)
    created = not rdir.exists()
    before = set() if created else {p.name for p in rdir.iterdir()}
    new_parents = [p for p in rdir.absolute().parents if not p.exists()]  # e.g. runs/: removed on error
    t_start = time.perf_counter()
    try:
        rdir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            ctx.save_json(CONFIG_FILE, {"experiment": name, **config_dict(cfg)})
        for stage in stages:
            _run_stage(stage, ctx)
        ctx.timings["total"] = round(time.perf_counter() - t_start, 2)
        ctx.results.setdefault("timings_s", {}).update(ctx.timings)
        ctx.results["run_dir"] = str(rdir)
        ctx.save_json(RESULTS_FILE, ctx.results)
        experiment.report(ctx)
    except RosettaError:
        if resume is None and created:
            shutil.rmtree(rdir, ignore_errors=True)
            for parent in new_parents:  # innermost first; only folders this run created, left empty
                try:
                    parent.rmdir()
                except OSError:
                    break
        elif resume is None:  # a directory that existed (empty or unrelated files): remove only ours
            for p in rdir.iterdir():
                if p.name not in before:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        if old_run is not None:
            os.replace(old_run, rdir)
            old_run = None
        raise
    finally:  # replaced (or interrupted after the new run started: it is kept for --resume)
        if old_run is not None:
            shutil.rmtree(old_run, ignore_errors=True)
    out = dict(experiment.summary(ctx))
    out.setdefault("run_dir", str(rdir))
    return _jsonable(out)


def reuse_runs(
    experiment: Experiment, dirs: Sequence[str | os.PathLike[str]], rdir: Path
) -> list[tuple[Path, dict[str, Any]]]:
    """The ``--reuse`` run directories with their configs, checked before any work."""
    allowed = {experiment.name, *getattr(experiment, "reuse_from", ())}
    out = []
    for d in dirs:
        p = Path(d)
        if p.resolve() == rdir.resolve():
            raise ConfigError(f"--reuse {p} is this run's own directory; use --resume to continue it")
        name, values = read_run_config(p, "--reuse")
        if name not in allowed:
            raise ConfigError(
                f"--reuse {p}: that directory holds a {name or 'unnamed'} run, not {experiment.name}"
            )
        out.append((p, resolve_aliases(experiment.config_cls, values)))
    return out


def _reused_from(stage: Stage, ctx: RunContext) -> Path | None:
    """Copy the stage's outputs from the first ``--reuse`` run that matches; the run's directory."""
    if stage.reuse_key is None or not stage.outputs:
        return None
    mine = config_dict(ctx.config)
    for lender, values in ctx.reuse:
        if any(values.get(k) != mine.get(k) for k in stage.reuse_key):
            continue
        if not all((lender / o).exists() for o in stage.outputs):
            continue
        for o in stage.outputs:
            src, dest = lender / o, ctx.path(o)
            tmp = temp_sibling(dest)
            if src.is_dir():
                shutil.copytree(src, tmp)
            else:
                shutil.copy2(src, tmp)
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        return lender
    return None


def _run_stage(stage: Stage, ctx: RunContext) -> None:
    outs = list(stage.outputs)
    lender = None
    if not (ctx.resumed and outs and all(ctx.exists(o) for o in outs)):
        lender = _reused_from(stage, ctx)
        if lender is not None:
            ctx.results.setdefault("reused", {})[stage.name] = str(lender)
    if (ctx.resumed or lender is not None) and outs and all(ctx.exists(o) for o in outs):
        if stage.load is not None:
            stage.load(ctx)
        else:
            for o in outs:
                p = Path(o)
                if p.suffix == ".json":
                    ctx.state[p.stem] = ctx.load_json(o)
                elif p.suffix == ".safetensors":
                    ctx.state[p.stem] = ctx.load_tensors(o)
        ctx.timings[stage.name] = "skipped" if lender is None else "reused"
        return
    t0 = time.perf_counter()
    stage.run(ctx)
    missing = [o for o in outs if not ctx.exists(o)]
    if missing:  # a bug in the experiment, not a user error: resume would never skip this stage
        raise RuntimeError(f"stage {stage.name!r} did not write its outputs {missing}")
    ctx.timings[stage.name] = round(time.perf_counter() - t0, 2)


def resolve_aliases(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each field's old names (its ``aliases``, e.g. an older run's config.json keys)
    renamed to the field; the current name wins when both are given."""
    values = dict(values)
    for f in dataclasses.fields(cls):
        for alias in f.metadata.get("aliases", ()):
            old = alias.lstrip("-").replace("-", "_")
            if old in values and old != f.name:
                v = values.pop(old)
                values.setdefault(f.name, v)
    return values


def make_config(cls: type, values: dict[str, Any], where: str) -> Any:
    """An instance of the config dataclass ``cls`` from ``values`` (a config.json's, a preset's, options;
    old field names read through :func:`resolve_aliases`). Unknown fields or a constructor's refusal:
    :class:`ConfigError` naming ``where``."""
    values = resolve_aliases(cls, values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------------------- files
def _jsonable(o: Any) -> Any:
    """Tensors to lists, non-finite floats to None, tuples to lists (recursively)."""
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _jsonable(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    return str(o)
