"""Running an experiment from its name and option values, without a command line.

:func:`config_from_values` builds the config (defaults < a config.json or the resumed run's < a preset
< options, each checked against the config dataclass's types and ``Literal`` choices),
:func:`preflight` checks everything that needs no model (values, layer ranges from the zoo's metadata,
devices, model names, prompt and task files, the output folder, the runs to reuse), and
:func:`print_plan` prints the experiment's plan (models to pull or use, organisms to build, minutes,
peak memory) on stderr. ``rosetta run`` (:mod:`rosettalens.experiments.cli`) and
:func:`rosettalens.experiments.run` both go through here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.checks import DTYPES, check_device, check_path, check_prompt_spec
from .base import Experiment, make_config, resolve_aliases

# experiment name -> module exposing EXPERIMENT (one line per experiment)
EXPERIMENTS = {
    "refusal-transfer": "rosettalens.experiments.refusal_transfer",
    "sae-universality": "rosettalens.experiments.sae_universality",
    "seqcont-circuits": "rosettalens.experiments.seqcont_circuits",
    "backdoor-transfer": "rosettalens.experiments.backdoor_transfer",
    "safety-switch": "rosettalens.experiments.safety_switch",
    "seqcont-graphs": "rosettalens.experiments.seqcont_graphs",
    "crosscoder-diff": "rosettalens.experiments.crosscoder_diff",
}
# config fields that name models (checked up front, without loading); "models" is comma-separated
MODEL_FIELDS = ("source", "target", "model", "models", "generate_model", "judge")
JUDGE_ROLES = ("target", "source", "none")
# config fields that are user prompt files (read as UTF-8 before any work)
PROMPT_FILE_FIELDS = ("harmful", "harmless", "harmful_eval", "harmless_eval", "eval_prompts")


# ------------------------------------------------------------------------------------- field types
def _hint_args(cls: type, name: str) -> tuple[tuple[Any, ...], bool]:
    """The alternatives of a field's type hint (``X | None`` -> ``(X,)``) and whether None is allowed."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(a for a in args if a is not type(None)), type(None) in args


def field_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The values of a ``Literal[...]`` field (None for other types)."""
    args, _ = _hint_args(cls, name)
    values: list[Any] = []
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            values += typing.get_args(a)
        else:
            return None
    return tuple(values) or None


def base_types(cls: type, name: str) -> tuple[set[type], bool]:
    """The plain types a config field accepts and whether it may be None."""
    args, nullable = _hint_args(cls, name)
    plain: set[type] = set()
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            plain |= {type(v) for v in typing.get_args(a)}
        else:
            plain.add(typing.get_origin(a) or a)
    return plain, nullable


def check_types(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Each value has its field's type and, for a ``Literal`` field, one of its values (a JSON int is
    accepted for a float); ConfigError otherwise."""
    out = dict(values)
    for name, v in values.items():
        try:
            plain, nullable = base_types(cls, name)
        except KeyError:
            continue  # unknown fields: make_config names them
        if (v is None and nullable) or Any in plain:
            continue
        if float in plain and isinstance(v, int) and not isinstance(v, bool):
            out[name] = float(v)
            continue
        if int in plain and isinstance(v, bool) and bool not in plain:
            ok = False
        else:
            ok = any(isinstance(v, t) for t in plain)
        if not ok:
            want = " or ".join(sorted(t.__name__ for t in plain)) + (" or null" if nullable else "")
            raise ConfigError(f"{where}: {name} must be {want}, got {json.dumps(v)[:40]}")
        choices = field_choices(cls, name)
        if choices is not None and v not in choices:
            raise ConfigError(f"{where}: {name} {v!r} is not one of {', '.join(map(str, choices))}")
    return out


# --------------------------------------------------------------------------------- one experiment
def load_experiment(name: str) -> tuple[Experiment, types.ModuleType]:
    """A registered experiment's ``EXPERIMENT`` and its module (only that module is imported)."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    mod = importlib.import_module(EXPERIMENTS[name])
    return mod.EXPERIMENT, mod


def summary_line(exp: Experiment, mod: types.ModuleType | None = None) -> str:
    """One line: what the experiment does (``summary_line`` or its docstring's first line)."""
    line = getattr(exp, "summary_line", "") or ""
    if not line and mod is not None:
        para = " ".join((mod.__doc__ or "").strip().split("\n\n")[0].split())
        line = re.split(r"(?<!\bal)\.\s+(?=[A-Z])", para)[0]  # the first sentence ("et al. 2025" is none)
    line = " ".join(line.split()).rstrip(".")
    if len(line) > 110:
        line = line[:107].rsplit(" ", 1)[0] + " ..."
    return line or exp.name


def plan_of(exp: Experiment, cfg: Any) -> dict[str, Any] | None:
    """The experiment's plan for ``cfg`` (None when it defines none)."""
    plan = getattr(exp, "plan", None)
    if plan is None:
        return None
    out = plan(cfg)
    return out if isinstance(out, dict) else None


def cost_text(plan: dict[str, Any] | None) -> str:
    """``about 9 min, peak 2.8 GB`` from a plan ("" when it says neither)."""
    if not plan:
        return ""
    parts = []
    if plan.get("minutes") is not None:
        m = float(plan["minutes"])
        parts.append(f"about {m:.0f} min" if m >= 1 else "under a minute")
    if plan.get("peak_gb") is not None:
        parts.append(f"peak {float(plan['peak_gb']):.1f} GB")
    return ", ".join(parts)


def plan_text(plan: dict[str, Any]) -> str:
    """``plan: pulls X, uses Y, builds Z; about 9 min, peak 2.8 GB; NOTES``."""
    from ..models import zoo

    models = list(dict.fromkeys(m for m in plan.get("models") or [] if m))
    building = list(plan.get("organisms_to_build") or [])
    # a zoo model is pulled only when its cache is incomplete; an organism to build pulls its base
    bases = [b for o in building if (b := str(o).rpartition("+")[0]) in zoo.ZOO]
    pulls = [m for m in dict.fromkeys([*models, *bases]) if m in zoo.ZOO and zoo.needs_pull(m)]
    uses = [m for m in models if m not in pulls]
    what = []
    if pulls:
        what.append("pulls " + ", ".join(pulls))
    if uses:
        what.append("uses " + ", ".join(uses))
    if building:
        what.append("builds " + ", ".join(map(str, building)))
    pieces = [", ".join(what), cost_text(plan), str(plan.get("notes") or "")]
    return "plan: " + "; ".join(p for p in pieces if p)


def config_from_values(
    exp: Experiment,
    options: dict[str, Any],
    *,
    config: str | None = None,
    preset: str | None = None,
    resume: str | None = None,
) -> Any:
    """The config: defaults < ``config`` file (or the resumed run's config.json) < ``preset`` < options.

    None for a resume with nothing given (the run's own config). Unknown fields, wrong types and
    values outside a ``Literal`` field's choices raise :class:`ConfigError`."""
    from .base import read_run_config

    values: dict[str, Any] = {}
    source = None
    if resume:
        named, values = read_run_config(resume)
        if named != exp.name:
            raise ConfigError(
                f"--resume {resume}: that directory holds a {named or 'unnamed'} run, not {exp.name}"
            )
        source = f"{resume}/config.json"
    if config:
        path = Path(config)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} is not a JSON object")
        named = values.pop("experiment", exp.name)
        if named != exp.name:
            raise ConfigError(f"config {path} is for the {named} experiment, not {exp.name}")
        source = str(path)
        values = check_types(exp.config_cls, resolve_aliases(exp.config_cls, values), f"config {path}")
    if preset is not None:
        presets = getattr(exp, "presets", None) or {}
        if preset not in presets:
            avail = ", ".join(presets) or "none"
            raise ConfigError(f"{exp.name} has no preset {preset!r}; presets: {avail}")
        values.update(check_types(exp.config_cls, dict(presets[preset]), f"preset {preset}"))
    options = resolve_aliases(exp.config_cls, options)
    known = {f.name for f in dataclasses.fields(exp.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"{exp.name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}"
        )
    overrides = check_types(exp.config_cls, {k: v for k, v in options.items() if v is not None}, "options")
    if resume and not config and preset is None and not overrides:
        return None  # the resumed run's own config
    values.update(overrides)
    return make_config(exp.config_cls, values, source or "options")


def _model_names(cfg: Any) -> list[str]:
    names: list[str] = []
    for field in MODEL_FIELDS:
        v = getattr(cfg, field, None)
        if not isinstance(v, str) or not v:
            continue
        if field == "judge" and v in JUDGE_ROLES:
            continue
        names += [m.strip() for m in v.split(",")] if field == "models" else [v]
    return names


def preflight(
    exp: Experiment,
    cfg: Any,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    reuse: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Every check that needs no model: config values, layer ranges (from the zoo's metadata or a
    folder's config.json), devices, model names, prompt and task files, the output folder, the runs
    given to ``--reuse``."""
    from ..models.loading import check_model
    from .base import reuse_runs

    if reuse:
        out = getattr(cfg, "out", None) if cfg is not None else None
        reuse_runs(exp, reuse, Path(resume or out or "runs/.new"))
    if cfg is None:
        return  # a resumed run's own config was checked when it started
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other")
    if hasattr(cfg, "validate"):
        cfg.validate()
    check_device(getattr(cfg, "device", None))
    dtype = getattr(cfg, "dtype", None)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    for field in PROMPT_FILE_FIELDS:
        v = getattr(cfg, field, None)
        if v:  # a built-in set, an hf: set in the one syntax, or a readable UTF-8 file
            check_prompt_spec(v, "--" + field.replace("_", "-"))
    for model in dict.fromkeys(_model_names(cfg)):
        check_model(model)
    exp.check_layers(cfg)
    task_file = getattr(cfg, "task_file", None)
    if task_file:
        from ..circuits.tasks import load_task_file

        load_task_file(task_file)
    out = getattr(cfg, "out", None)
    if out and not resume:
        p = Path(check_path(out, "--out"))
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {p} is a file; give a folder for the run")
        if (p / "config.json").is_file() and not overwrite:  # other files: the run goes beside them
            raise ConfigError(
                f"--out {p} already holds a run; pass --resume {p} to continue it or --overwrite to replace it"
            )


def print_plan(exp: Experiment, cfg: Any) -> None:
    """The experiment's plan on stderr (nothing when it defines none)."""
    plan = plan_of(exp, cfg) if cfg is not None else None
    if plan:
        print(plan_text(plan), file=sys.stderr)
