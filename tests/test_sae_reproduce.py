"""Two seeds of an SAE on data with a planted dictionary both recover it (known answer), so they agree."""

from __future__ import annotations

import pytest
import torch

from rosettalens.sae import SAEConfig, TrainConfig, best_decoder_cosine, train_sae


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def planted(n: int = 16384, d: int = 32, m: int = 64, k: int = 3, seed: int = 0):
    """``x [n, d]`` made of ``k`` of ``m`` unit atoms per row (coefficients in [0.5, 2.5]), and the atoms."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    z = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=g) * 2 + 0.5)
    return z @ atoms, atoms


def test_two_seeds_recover_the_planted_dictionary():
    x, atoms = planted()
    saes = [
        train_sae(x, SAEConfig(d_in=32, width=64, arch="topk", k=3, seed=s),
                  TrainConfig(batch_size=256, tokens=len(x) * 4, seed=s, lr=3e-3), progress=False)
        for s in (0, 1)
    ]  # fmt: skip
    for sae in saes:  # each seed finds the atoms (the independent reference)
        assert float(best_decoder_cosine(atoms, sae).median()) > 0.95
    assert float(best_decoder_cosine(saes[0], saes[1]).median()) > 0.95
    # the metric itself: a decoder against itself is 1 everywhere, against random directions far lower
    assert torch.allclose(best_decoder_cosine(atoms, atoms), torch.ones(64, dtype=torch.float64))
    rand = torch.randn(64, 32, generator=torch.Generator().manual_seed(9))
    assert float(best_decoder_cosine(atoms, rand).median()) < 0.7
