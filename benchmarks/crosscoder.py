"""Crosscoder training throughput: rosettalens's crosscoder trainer against its SAE trainer on the
concatenated input ``[x_a, x_b]`` (``d_a + d_b`` wide), the same width, k, batch and steps.

The peer anchor, dictionary_learning's crosscoder trainer, is not in the ``dictionary-learning``
package that PyPI serves (version 0.1.0 has no ``CrossCoder``; the crosscoder lives in a fork that is
installed from git), so the baseline measured in the same run is a BatchTopK SAE of the same width on
the two models' activations side by side: the same arithmetic per token (one encoder over ``d_a +
d_b`` inputs, one decoder back), which a crosscoder trainer should match. Both train on the same
in-memory rows, one after the other, ``--repeats`` interleaved rounds (median).

Activations: synthetic paired rows with a known answer: ``--shared`` atoms present in both models
(through two random embeddings into ``d_a`` and ``d_b`` dimensions), ``--own`` atoms only in A and
only in B, ``--active`` atoms per row, exponential coefficients, an offset and noise. Besides
tokens/s, each side reports per-model FVU on held-out rows, and the crosscoder how many latents it
classes as shared / A-only / B-only (the planted numbers are printed beside them).

Prints one JSON object: ``crosscoder`` and ``sae_concat`` (``tokens_per_s``, ``seconds``, ``fvu_a``,
``fvu_b``, ``l0``), ``ratio`` (crosscoder / SAE tokens/s), ``latents`` and ``planted``.

    python benchmarks/crosscoder.py [--d-a 576] [--d-b 896] [--width 2048] [--k 32] [--batch-size 1024]
        [--steps 60] [--threads 1] [--repeats 1] [--out benchmarks/results/crosscoder.cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from rosettalens.crosscoder import (  # noqa: E402
    CrossCoderConfig,
    CrossCoderTrainConfig,
    latent_stats,
    train_crosscoder,
)
from rosettalens.sae import SAEConfig, TrainConfig, fvu, train_sae  # noqa: E402


def paired(n: int, d_a: int, d_b: int, shared: int, own: int, active: int, seed: int):
    """``(x_a [n, d_a], x_b [n, d_b])``: sparse codes over shared and model-own atoms (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    F = shared + 2 * own
    Da = torch.randn(F, d_a, generator=g)
    Db = torch.randn(F, d_b, generator=g)
    Da[shared + own :] = 0  # B's own atoms are absent from A
    Db[shared : shared + own] = 0  # A's own atoms are absent from B
    Da = Da / Da.norm(dim=1, keepdim=True).clamp_min(1e-12)
    Db = Db / Db.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx = torch.randint(0, F, (n, active), generator=g)
    coef = torch.empty(n, active).exponential_(1.0, generator=g)
    S = torch.zeros(n, F).scatter_add_(1, idx, coef)
    xa = S @ Da + 0.3 * torch.randn(d_a, generator=g) + 0.05 * torch.randn(n, d_a, generator=g)
    xb = S @ Db + 0.3 * torch.randn(d_b, generator=g) + 0.05 * torch.randn(n, d_b, generator=g)
    return xa, xb


def run_crosscoder(xa, xb, args) -> tuple[dict, object]:
    cfg = CrossCoderConfig(d_a=xa.shape[1], d_b=xb.shape[1], width=args.width, k=args.k, seed=args.seed)
    tcfg = CrossCoderTrainConfig(batch_size=args.batch_size, tokens=args.steps * args.batch_size, lr=args.lr,
                                 lr_warmup_steps=0, lr_decay_frac=0.0, seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    cc = train_crosscoder((xa, xb), cfg, tcfg, progress=False)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": args.steps * args.batch_size / dt}, cc


def run_sae(x, args) -> tuple[dict, object]:
    cfg = SAEConfig(d_in=x.shape[1], width=args.width, arch="batchtopk", k=args.k, seed=args.seed)
    tcfg = TrainConfig(batch_size=args.batch_size, tokens=args.steps * args.batch_size, lr=args.lr,
                       lr_warmup_steps=0, lr_decay_frac=0.0, seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    sae = train_sae(x, cfg, tcfg, progress=False)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": args.steps * args.batch_size / dt}, sae


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--d-a", type=int, default=576, help="width of model A's activations (SmolLM2-135M)")
    p.add_argument("--d-b", type=int, default=896, help="width of model B's activations (Qwen2.5-0.5B)")
    p.add_argument("--width", type=int, default=2048, help="latents")
    p.add_argument("--k", type=int, default=32, help="BatchTopK: active latents per token")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per step")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (constant)")
    p.add_argument("--shared", type=int, default=1024, help="planted atoms present in both models")
    p.add_argument("--own", type=int, default=256, help="planted atoms present in one model only (each)")
    p.add_argument("--active", type=int, default=24, help="atoms per row")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds (median reported)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.steps * args.batch_size
    xa, xb = paired(n + 8192, args.d_a, args.d_b, args.shared, args.own, args.active, args.seed)
    held_a, held_b = xa[n:], xb[n:]
    xa, xb = xa[:n], xb[:n]
    cat = torch.cat([xa, xb], 1)
    rounds: dict[str, list[dict]] = {"crosscoder": [], "sae_concat": []}
    cc = sae = None
    for _ in range(args.repeats):
        r, cc = run_crosscoder(xa, xb, args)
        rounds["crosscoder"].append(r)
        r, sae = run_sae(cat, args)
        rounds["sae_concat"].append(r)
    assert cc is not None and sae is not None
    out: dict = {}
    for name, rs in rounds.items():
        out[name] = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "tokens_per_s")}
    with torch.no_grad():
        ha, hb = cc.decode(cc.encode(held_a, held_b))  # type: ignore[attr-defined]
        z = cc.encode(held_a, held_b)  # type: ignore[attr-defined]
        out["crosscoder"].update(
            fvu_a=fvu(held_a, ha), fvu_b=fvu(held_b, hb), l0=float((z > 0).sum(1).float().mean())
        )
        zs = sae.encode(torch.cat([held_a, held_b], 1))  # type: ignore[attr-defined]
        h = sae.decode(zs)  # type: ignore[attr-defined]
        out["sae_concat"].update(fvu_a=fvu(held_a, h[:, : args.d_a]), fvu_b=fvu(held_b, h[:, args.d_a :]),
                                 l0=float((zs > 0).sum(1).float().mean()))  # fmt: skip
    st = latent_stats(cc, held_a, held_b)  # type: ignore[arg-type]
    out["ratio"] = out["crosscoder"]["tokens_per_s"] / out["sae_concat"]["tokens_per_s"]
    out["latents"] = {k: st[k] for k in ("n_alive", "n_shared", "n_a_only", "n_b_only", "n_other")}
    out["planted"] = {"shared": args.shared, "a_only": args.own, "b_only": args.own}
    out["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    out["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
