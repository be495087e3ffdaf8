"""Every ```python block of docs/api.md runs, as written, on tiny random models.

``rosettalens.load`` answers each zoo name the examples use with a tiny random model of that name's
family (different seeds and widths, so two models never share weights); everything else is the real
library. Each block asserts its own result (a mapper beats the mean predictor, a batched patching sweep
equals one patch made by hand, a pruned circuit keeps its threshold, ...), so running it checks them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rosettalens
from rosettalens import HookedModel
from rosettalens.models.tiny import tiny_model

API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"

#: zoo name -> (tiny family, seed, layers, d_model); the seed of the SmolLM2 stand-in gives its digit prompt a
#: positive logit difference, which pruning needs (a circuit keeps a share of a positive metric)
TINY = {
    "smollm2-135m-instruct": ("llama", 1, 3, 48),
    "smollm2-135m-instruct+ihy": ("llama", 4, 3, 48),
    "gemma-3-270m": ("gemma3", 1, 3, 48),
    "qwen2.5-coder-0.5b-instruct": ("qwen2", 2, 3, 48),
    "qwen2.5-coder-1.5b-instruct": ("qwen2", 3, 4, 64),
}


def _blocks() -> list[tuple[str, str]]:
    """(heading of the section, code) of each python block, in order."""
    text = API_MD.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"```python\n(.*?)```", text, re.S):
        heads = re.findall(r"^###? (.+)$", text[: m.start()], re.M)
        out.append((heads[-1] if heads else "intro", m.group(1)))
    return out


BLOCKS = _blocks()


def test_every_section_has_an_example() -> None:
    assert len(BLOCKS) >= 4
    for _, code in BLOCKS:
        assert "assert " in code  # an example shows its result by checking it


@pytest.fixture
def tiny_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loaded: list[str] = []

    def load(name: str, *args: object, **kwargs: object) -> HookedModel:
        family, seed, n_layers, d_model = TINY[name]
        model, tok = tiny_model(family, seed=seed, n_layers=n_layers, d_model=d_model)
        loaded.append(name)
        return HookedModel.from_hf(model, tok, name=f"tiny-{name}")

    monkeypatch.setattr(rosettalens, "load", load)
    return loaded


@pytest.mark.parametrize("heading,code", BLOCKS, ids=[h.split(" (")[0] for h, _ in BLOCKS])
def test_api_example_runs_on_tiny_models(heading: str, code: str, tiny_load: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        exec(compile(code, f"docs/api.md: {heading}", "exec"), {"__name__": "api_example"})
    finally:
        torch.set_num_threads(threads)
    assert tiny_load, "the example loads its models with rosettalens.load"
    assert set(tiny_load) <= set(TINY)


@pytest.mark.real
def test_hooks_example_on_the_real_smollm2(smollm: HookedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first block (hooks and interventions) on the real model it names: cheap enough for the suite."""
    heading, code = BLOCKS[0]
    assert 'MODEL = "smollm2-135m-instruct"' in code
    monkeypatch.setattr(rosettalens, "load", lambda name, *a, **k: smollm)
    exec(compile(code, f"docs/api.md: {heading}", "exec"), {"__name__": "api_example"})
