"""Every option of every `rosetta` command explains itself: a help text that says more than its
default, and the choices of every ``Literal`` config field shown and enforced by argparse."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

import pytest

from rosettalens.cli import build_parser
from rosettalens.experiments import EXPERIMENTS
from rosettalens.experiments.cli import config_fields, experiment_parser, field_choices

# commands whose options are still being converted (help texts from config fields); emptied at the end
BEING_CONVERTED: set[str] = set()

ONLY_DEFAULT = re.compile(r"\(default: [^)]*\)")


def _commands() -> list[tuple[str, argparse.ArgumentParser]]:
    """``(prog, parser)`` of every leaf command, each ``rosetta run NAME`` included."""
    out: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(p: argparse.ArgumentParser) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append((p.prog, p))
        for a in subs:
            for child in dict.fromkeys(a.choices.values()):
                if child.prog.startswith("rosetta run "):
                    continue  # stubs: each experiment's own parser is below
                walk(child)

    walk(build_parser())
    out += [(f"rosetta run {n}", experiment_parser(n)[1]) for n in EXPERIMENTS]
    return out


def _undocumented(p: argparse.ArgumentParser) -> list[str]:
    bad = []
    for a in p._actions:
        if isinstance(a, argparse._HelpAction | argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
            continue
        text = (a.help or "").strip()
        if not text or ONLY_DEFAULT.fullmatch(text):
            bad.append(a.option_strings[0] if a.option_strings else a.dest)
    return bad


COMMANDS = _commands()


def test_every_command_is_walked():
    progs = {prog for prog, _ in COMMANDS}
    for expected in ("rosetta models pull", "rosetta extract", "rosetta map train", "rosetta steer eval",
                     "rosetta compare", "rosetta circuits patch", "rosetta organisms build",
                     "rosetta data generate", "rosetta run safety-switch"):  # fmt: skip
        assert expected in progs
    assert not BEING_CONVERTED - progs, "the allowlist names commands that no longer exist"


@pytest.mark.parametrize("prog,parser", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_option_has_help(prog, parser):
    bad = _undocumented(parser)
    if prog in BEING_CONVERTED:
        if not bad:
            pytest.fail(f"{prog} is fully documented: take it off BEING_CONVERTED")
        pytest.xfail(f"being converted: {len(bad)} options without help")
    assert not bad, f"{prog}: options without a help text (or only a default): {', '.join(bad)}"


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_literal_fields_show_and_enforce_their_choices(name, capsys):
    exp, parser = experiment_parser(name)
    actions = {a.dest: a for a in parser._actions}
    text = parser.format_help()
    for f in config_fields(exp.config_cls):
        choices = field_choices(exp.config_cls, f.name)
        if choices is None or f.metadata.get("hidden"):
            continue
        action = actions[f.name]
        assert tuple(action.choices) == choices
        assert "{" + ",".join(map(str, choices)) + "}" in text.replace("\n", "").replace(" ", "")
        with pytest.raises(SystemExit):
            parser.parse_args(["--" + f.name.replace("_", "-"), "not-a-choice"])
        assert "invalid choice" in capsys.readouterr().err


def test_generated_parser_from_field_metadata():
    """A config written with option(...): help, shown default, Literal choices, flags, aliases."""
    from rosettalens.config import option
    from rosettalens.experiments.base import Experiment
    from rosettalens.experiments.cli import _add_config_options

    @dataclasses.dataclass
    class Cfg:
        mapper: typing.Literal["affine", "orthogonal"] = option("affine", "mapper kind", aliases=("kind",))
        layer: int | None = option(None, "source layer", shown="auto")
        controls: bool = option(True, "also run the baselines", aliases=("baselines",))
        secret: int = option(3, hidden=True)
        out: str | None = option(None, "run directory")

    class Exp(Experiment):
        name = "demo"
        config_cls = Cfg

    p = argparse.ArgumentParser(prog="demo")
    _add_config_options(p, Exp.config_cls, "demo")
    text = " ".join(p.format_help().split())
    assert "--mapper {affine,orthogonal} mapper kind (default: affine)" in text
    assert "source layer (default: auto)" in text
    assert "--controls, --no-controls also run the baselines (default: True)" in text
    assert "run directory (default: runs/demo-TIMESTAMP)" in text
    assert (
        "secret" not in text and "--kind" not in text and "baselines" not in text.replace("the baselines", "")
    )
    ns = p.parse_args(["--no-controls", "--kind", "orthogonal", "--secret", "5"])
    assert (ns.controls, ns.mapper, ns.secret, ns.layer) == (False, "orthogonal", 5, None)
    assert p.parse_args(["--no-baselines"]).controls is False  # a bool field's old name, both ways
    assert p.parse_args(["--baselines"]).controls is True
    assert p.parse_args([]).controls is None  # unset: the config's (or preset's) value stays


def test_run_help_lists_every_experiment_with_one_line(capsys):
    from rosettalens.cli import main

    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert "--help`" not in line and len(line.split(name, 1)[1].strip()) > 10, line


@pytest.mark.parametrize("prog,parser", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_the_common_options_where_they_apply(prog, parser):
    """Every command prints JSON on request; one that writes takes --overwrite; one that runs a model
    (it takes --device) takes --no-progress."""
    opts = {o for a in parser._actions for o in a.option_strings}
    assert "--json" in opts
    if "--out" in opts:
        assert "--overwrite" in opts
    if "--device" in opts:
        assert "--no-progress" in opts


@pytest.mark.parametrize(
    ("argv", "dest", "new", "value"),
    [
        (["run", "crosscoder-diff"], "max_tokens", "--max-tokens", 3000),
        (["run", "safety-switch"], "norm_ratio", "--norm-ratio", 5.0),
    ],
)
def test_renamed_experiment_options_keep_their_old_spelling(argv, dest, new, value, capsys):
    """``--tokens`` and ``--massive-ratio`` still work, hidden from ``--help``, with one deprecation line;
    the new spelling is listed."""
    old = {"max_tokens": "--tokens", "norm_ratio": "--massive-ratio"}[dest]
    _, p = experiment_parser(argv[1])
    args = p.parse_args([old, str(value)])
    assert getattr(args, dest) == value
    assert f"{old} is deprecated; use {new}" in capsys.readouterr().err
    assert getattr(p.parse_args([new, str(value)]), dest) == value
    assert capsys.readouterr().err == ""
    help_text = p.format_help()
    assert new in help_text and f"{old} " not in help_text


def test_crosscoder_train_max_tokens_keeps_tokens_as_alias(capsys):
    argv = [
        "crosscoder",
        "train",
        "--models",
        "a,b",
        "--hook",
        "resid_post.1",
        "--data",
        "mini-web",
        "--out",
        "x",
    ]
    args = build_parser().parse_args([*argv, "--tokens", "3000"])
    assert args.max_tokens == 3000
    assert "--tokens is deprecated; use --max-tokens" in capsys.readouterr().err
    assert build_parser().parse_args(argv).max_tokens == 65536


@pytest.mark.parametrize(
    ("name", "old", "field", "value"),
    [
        ("crosscoder-diff", "tokens", "max_tokens", 1234),
        ("safety-switch", "massive_ratio", "norm_ratio", 7.5),
    ],
)
def test_an_old_config_json_with_the_old_key_still_loads(name, old, field, value, tmp_path):
    """A config.json written before the rename (old key) gives the renamed field its value, through
    ``--config`` and through ``--resume``; the new key wins when both are present."""
    import json

    from rosettalens.experiments.base import make_config
    from rosettalens.experiments.runner import config_from_values, load_experiment

    exp, _ = load_experiment(name)
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"experiment": name, old: value}))
    cfg = config_from_values(exp, {}, config=str(f))
    assert getattr(cfg, field) == value
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"experiment": name, old: value, "seed": 3}))
    cfg = config_from_values(exp, {"seed": 3}, resume=str(run_dir))
    assert getattr(cfg, field) == value
    both = make_config(exp.config_cls, {old: value, field: value * 2}, "test")
    assert getattr(both, field) == value * 2
