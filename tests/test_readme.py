"""The README is a user's document: short lines, the CI's two commands first, links that resolve,
every hook name it lists accepted by the hook-name parser; the README and the guides in docs/ carry no
issue numbers and no line over 200 characters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rosettalens.names import GLOBAL_HOOKS, LAYER_HOOKS, hook_name, parse_hook_name

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = [
    "api",
    "backdoor",
    "circuits",
    "experiments",
    "hooks",
    "mapping",
    "organisms",
    "similarity",
    "steering",
    "store",
]
OWNED_DOCS = [
    README,
    *sorted((ROOT / "docs" / "results").glob("*.md")),
    *(ROOT / "docs" / f"{name}.md" for name in GUIDES),
]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_readme_is_short_with_no_overlong_line() -> None:
    lines = _text(README).splitlines()
    assert len(lines) <= 160
    long = [(i + 1, len(line)) for i, line in enumerate(lines) if len(line) > 200]
    assert long == []


@pytest.mark.parametrize("path", OWNED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_overlong_lines_or_issue_numbers(path: Path) -> None:
    text = _text(path)
    assert [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 200] == []
    # "#9" style references to the issue tracker; markdown headings and anchors do not match
    assert re.findall(r"(?<![\w/&])#\d+\b", text) == []


def test_first_commands_are_the_main_job_and_the_test_command() -> None:
    block = re.search(r"```bash\n(.*?)```", _text(README), re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert "rosetta run refusal-transfer" in commands[0]
    assert "pip install" in commands[0]
    assert commands[1] == "python -m pytest -q"


def test_relative_links_resolve() -> None:
    for path in OWNED_DOCS:
        if not path.exists():
            continue
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", _text(path)):
            assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_the_readme_lists_exactly_the_hook_names_the_parser_accepts() -> None:
    section = _text(README).split("## Hook names", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for cell in re.findall(r"^\| (.*?) \|", section, re.M):
        listed.update(re.findall(r"`([a-z_]+(?:\.L)?)`", cell))
    for name in listed:
        kind, layer = parse_hook_name(name.replace(".L", ".3"))
        assert hook_name(kind, layer) == name.replace(".L", ".3")
    assert listed == {*GLOBAL_HOOKS, *(f"{kind}.L" for kind in LAYER_HOOKS)}


def test_the_readme_python_block_runs_on_a_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API block as written, with ``rosettalens.load`` answering with a tiny random Llama deep enough
    for the layers it names; the steered, ablated and intervened runs differ from the plain one."""
    import torch

    import rosettalens
    from rosettalens import HookedModel
    from rosettalens.models.tiny import tiny_model

    code = re.search(r"## Python API\n\n```python\n(.*?)```", _text(README), re.S)
    assert code is not None
    hm = HookedModel.from_hf(*tiny_model("llama", n_layers=12), name="tiny-llama")
    monkeypatch.setattr(rosettalens, "load", lambda name, *a, **k: hm)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    scope: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code.group(1), "README.md", "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    assert scope["acts"].shape[:2] == scope["logits"].shape[:2]
    assert not torch.allclose(scope["zero_mlp_logits"], hm.forward(["1, 2, 3, 4,"]))
    assert hm.active_hook_count() == 0
