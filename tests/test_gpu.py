"""The same results on a CUDA device as on the CPU (skipped where there is no GPU, as on CI).

The tiny-model hook tests run on a GPU with ``ROSETTA_TEST_DEVICE=cuda`` (see conftest.py); these
check the parts that pick or accept a device themselves: similarity metrics on CUDA tensors,
``rosetta extract --device cuda`` against the CPU store and crosscoder training on CUDA against the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rosettalens import similarity as sim
from rosettalens.cli import main
from rosettalens.models.tiny import tiny_model
from rosettalens.store import ActivationStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(n=300, d1=24, d2=40, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d1))
    y = x @ g.normal(size=(d1, d2)) + 0.5 * g.normal(size=(n, d2))
    return x, y


@pytest.mark.parametrize(
    "metric",
    [
        sim.linear_cka,
        lambda x, y: sim.linear_cka(x, y, debiased=True),
        sim.rbf_cka,
        sim.svcca,
        sim.pwcca,
        sim.rsa,
        lambda x, y: sim.procrustes(x, y).similarity,
        lambda x, y: sim.mutual_knn(x, y, k=5),
    ],
    ids=["linear_cka", "linear_cka_debiased", "rbf_cka", "svcca", "pwcca", "rsa", "procrustes", "mutual_knn"],
)
def test_metrics_on_cuda_tensors_equal_numpy(metric):
    x, y = _pair()
    on_cpu = metric(x, y)
    on_gpu = metric(torch.tensor(x, device="cuda"), torch.tensor(y, device="cuda", dtype=torch.float32))
    # float32 input on the GPU vs float64 on the CPU: equal to float32 precision
    assert abs(float(on_gpu) - float(on_cpu)) < 1e-5


def test_extract_on_cuda_matches_cpu(tmp_path):
    from rosettalens.data import load_documents

    d = tmp_path / "tiny-llama"
    m, t = tiny_model("llama", seed=1)
    m.save_pretrained(d)
    t.save_pretrained(d)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(x.replace("\n", " ") for x in load_documents("sequences").documents) + "\n")
    stores = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / f"store-{dev}"
        argv = ["extract", "--model", str(d), "--hooks", "resid_post.1,attn_out.0", "--data", str(corpus)]
        assert main([*argv, "--out", str(out), "--device", dev, "--no-progress"]) == 0
        stores[dev] = ActivationStore.open(out, verify=True)
    a, b = stores["cpu"], stores["cuda"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.token_ids, b.token_ids)
    for hook in a.hooks:
        torch.testing.assert_close(b.read(hook), a.read(hook), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["batchtopk", "l1"])
def test_crosscoder_trains_on_cuda_as_on_cpu(arch):
    from rosettalens.crosscoder import CrossCoderConfig, CrossCoderTrainConfig, train_crosscoder

    g = torch.Generator().manual_seed(0)
    D = torch.randn(48, 40, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    S = (torch.rand(2048, 48, generator=g) < 0.08) * torch.rand(2048, 48, generator=g)
    x = S @ D + 0.01 * torch.randn(2048, 40, generator=g)
    xa, xb = x[:, :16], x[:, 16:]  # two "models": two views of the same sparse code
    cfg = CrossCoderConfig(d_a=16, d_b=24, width=64, arch=arch, k=4 if arch == "batchtopk" else None, seed=1)
    ccs = {}
    for dev in ("cpu", "cuda"):
        tcfg = CrossCoderTrainConfig(batch_size=256, epochs=2, dead_tokens=512, seed=2, device=dev)
        ccs[dev] = train_crosscoder((xa, xb), cfg, tcfg, progress=False).to("cpu")
    a, b = ccs["cpu"], ccs["cuda"]
    assert str(b.info["train"]["device"]) == "cuda"
    # 16 Adam steps in float32 on two devices: equal up to accumulated rounding
    for name, p in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], p, atol=1e-4, rtol=1e-3, msg=name)
    za, zb = a.encode(xa, xb).detach(), b.encode(xa, xb).detach()
    assert torch.ne(za > 0, zb > 0).float().mean() < 1e-3
    for ha, hb in zip(a.info["history"], b.info["history"], strict=True):
        assert abs(ha["fvu_a"] - hb["fvu_a"]) < 1e-4 and abs(ha["fvu_b"] - hb["fvu_b"]) < 1e-4
