"""TopK SAE training throughput: rosettalens's trainer against SAELens's (the real ``sae-lens`` package).

Both train a TopK SAE of the same width and k with the same batch size, number of steps, learning rate
(constant, no warm-up), Adam betas and dead-latent window, on exactly the same batches of the same
in-memory activations (SAELens gets our batch sequence through its ``data_provider``), in one process,
one after the other (``--repeats`` interleaved rounds, median). Both start ``b_dec`` at the data mean
and measure their input scale on the same rows (SAELens's own rule, ``sqrt(d_in) / mean ||x||``);
everything else is each library's default (SAELens: decoder init norm 0.1, top-k on pre-activations
rescaled by decoder norms, its AuxK; ours: unit decoder rows, our AuxK). Each then reconstructs the same held-out
rows and we compute FVU (variance about the mean) and L0 from its own encode/decode.

Activations: synthetic by default (a planted dictionary of ``--atoms`` unit directions in ``--d-in``
dimensions, ``--active`` per row with exponential coefficients, a constant offset and Gaussian noise:
data with a known sparse structure whose FVU means something), or a store's hook (``--store DIR --hook H``).

Prints one JSON object: ``ours`` and ``saelens`` (``tokens_per_s``, ``seconds``, ``fvu``, ``l0``,
``dead_fraction``), ``ratio`` (ours / SAELens tokens/s; target >= 1.5) and ``fvu_delta`` (ours - SAELens,
<= 0 is equal or better). ``--saelens-sparse`` also times SAELens with ``use_sparse_activations=True``.

Quality row (with ``--store`` and ``--splice-docs N > 0``): both SAEs, at the same L0 (TopK, the same
``k``) after the same tokens, are spliced into the store's model on the last ``N`` documents of the store
(:func:`rosettalens.sae.splice_metrics`, positions ``< --min-pos`` keep the model's activation for both)
and ``quality`` reports each one's FVU, L0, CE loss score and KL score, with ``ce_loss_score_delta``
(ours - SAELens, >= 0 is equal or better).

    python benchmarks/sae_training.py [--d-in 576] [--width 4096] [--k 32] [--batch-size 2048]
        [--steps 80] [--lr 1e-3] [--threads 1] [--repeats 1] [--out benchmarks/results/sae_training.cpu.json]
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

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: SAELens's bars off

import torch  # noqa: E402

from rosettalens.sae import SAEConfig, TrainConfig, fvu, train_sae
from rosettalens.sae.train import batch_plan  # noqa: E402


def synthetic(n: int, d: int, atoms: int, active: int, seed: int) -> torch.Tensor:
    """``[n, d]`` rows: ``active`` of ``atoms`` unit directions each, exponential(1) coefficients, an
    offset (a residual stream's mean) and noise of std 0.05 per dimension."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=g) * 0.5
    out = torch.empty(n, d)
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        idx = torch.randint(0, atoms, (m, active), generator=g)
        coef = torch.empty(m, active).exponential_(1.0, generator=g)
        out[s : s + m] = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=coef, mode="sum")
    out += offset + 0.05 * torch.randn(n, d, generator=g)
    return out


def run_ours(x: torch.Tensor, args, seed: int):
    # the rows are chosen above (--min-pos) for both trainers: our sink rule must not drop any more
    cfg = SAEConfig(
        d_in=x.shape[1], width=args.width, arch="topk", k=args.k, seed=seed, skip_first=0, norm_ratio=0
    )
    tcfg = TrainConfig(
        batch_size=args.batch_size,
        tokens=args.steps * args.batch_size,
        lr=args.lr,
        lr_warmup_steps=0,
        lr_decay_frac=0.0,
        dead_tokens=args.dead_steps * args.batch_size,
        norm_rows=args.norm_batches * args.batch_size,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    sae = train_sae(x, cfg, tcfg, progress=False)
    dt = time.perf_counter() - t0

    def recon(h):
        with torch.no_grad():
            z = sae.encode(h)
            return sae.decode(z), z

    return dt, recon, float(sae.info["final"]["dead_fraction"])


def run_saelens(x: torch.Tensor, args, seed: int, sparse: bool = False):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(
        d_in=x.shape[1],
        d_sae=args.width,
        k=args.k,
        normalize_activations="expected_average_only_in",
        use_sparse_activations=sparse,
    )
    sae = TopKTrainingSAE(cfg)
    # the same start as ours: SAELens's own scaling factor (sqrt(d_in) / mean norm), measured on the rows
    # ours measures its scale on, set before fit() so it takes no batches from the provider; b_dec at the
    # data mean (SAELens's trainer starts it at zero, which 60-100 steps cannot undo on data with a mean)
    g = torch.Generator().manual_seed(args.seed + 1)
    sample = x[torch.randperm(x.shape[0], generator=g)[: args.norm_batches * args.batch_size]]
    factor = float(x.shape[1] ** 0.5 / sample.norm(dim=1).mean())
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0) * factor)
    plan = batch_plan(x.shape[0], args.batch_size, 2048, 131072, args.seed)  # the batches ours sees
    provider = (x[idx] for idx in plan)
    tcfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        dead_feature_window=args.dead_steps,
        feature_sampling_window=max(1, args.steps),
        n_batches_for_norm_estimate=args.norm_batches,
        logger=LoggingConfig(log_to_wandb=False),
    )
    t0 = time.perf_counter()
    trainer = SAETrainer(tcfg, sae, provider)
    trainer.activation_scaler.scaling_factor = factor
    trained = trainer.fit()
    dt = time.perf_counter() - t0
    dead = float(trainer.dead_neurons.float().mean())

    def recon(h):
        with torch.no_grad():
            z = trained.encode(h)
            return trained.decode(z), z

    return dt, recon, dead


class _Spliced:
    """What :func:`rosettalens.sae.splice_metrics` needs of an SAE, around a ``recon`` function."""

    def __init__(self, recon, d_in: int, hook: str, skip_first: int):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(hook=hook, skip_first=skip_first, norm_ratio=0.0, median_norm=None)
        self.d_in, self.device, self._recon = d_in, torch.device("cpu"), recon

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._recon(x)[0]


def quality_row(store, hook: str, recons: dict, held: torch.Tensor, args) -> dict:
    """FVU, L0, CE loss score and KL score of each trained SAE, spliced into the store's model."""
    import rosettalens
    from rosettalens.sae import splice_metrics

    hm = rosettalens.load(store.manifest["model"]["name"], progress=False)
    docs = [d for d in store.documents() if d.strip()][-args.splice_docs :]
    row = {"splice_docs": len(docs)}
    for name, recon in recons.items():
        x_hat, z = recon(held)
        s = splice_metrics(_Spliced(recon, held.shape[1], hook, args.min_pos), hm, hook, docs)
        row[name] = {"fvu": fvu(held, x_hat), "l0": float((z > 0).sum(1).double().mean()),
                     **{k: s[k] for k in ("ce_loss_score", "kl_div_score", "ce_clean", "ce_sae", "ce_zero")}}  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--atoms", type=int, default=8192)
    ap.add_argument("--active", type=int, default=24)
    ap.add_argument("--rows", type=int, default=65536, help="training rows (reused over epochs)")
    ap.add_argument("--heldout", type=int, default=8192)
    ap.add_argument("--store", default=None)
    ap.add_argument("--hook", default=None)
    ap.add_argument(
        "--min-pos",
        type=int,
        default=1,
        help="store rows at position >= P only (the first token's residual norm is ~100x: it would "
        "dominate the FVU)",
    )
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dead-steps", type=int, default=20, help="dead-latent window in steps (both trainers)")
    ap.add_argument("--norm-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saelens-sparse", action="store_true", help="also time SAELens's sparse activations")
    ap.add_argument("--splice-docs", type=int, default=0,
                    help="with --store: splice both SAEs into the store's model on its last N documents")  # fmt: skip
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.store:
        from rosettalens.store import ActivationStore

        st = ActivationStore.open(args.store)
        hook = args.hook or st.hooks[0]
        keep = torch.nonzero(st.pos_index >= args.min_pos).reshape(-1)[: args.rows + args.heldout]
        allx = st.read(hook, keep.numpy()).float()
        allx = allx.reshape(allx.shape[0], -1)
        x, held = allx[: -args.heldout], allx[-args.heldout :]
        data = {"store": str(st.path), "hook": hook, "model": st.manifest["model"]["name"]}
        data["min_pos"] = args.min_pos
    else:
        allx = synthetic(args.rows + args.heldout, args.d_in, args.atoms, args.active, args.seed)
        x, held = allx[: args.rows], allx[args.rows :]
        data = {"synthetic": {"atoms": args.atoms, "active": args.active, "d_in": args.d_in}}

    runners = {"ours": lambda s: run_ours(x, args, s), "saelens": lambda s: run_saelens(x, args, s)}
    if args.saelens_sparse:
        runners["saelens_sparse"] = lambda s: run_saelens(x, args, s, sparse=True)
    times: dict[str, list[float]] = {k: [] for k in runners}
    last: dict[str, tuple] = {}
    errors: dict[str, str] = {}
    for r in range(args.repeats):
        for name, fn in list(runners.items()):
            if name in errors:
                continue
            try:
                dt, recon, dead = fn(args.seed + r)
            except Exception as e:  # SAELens's sparse path fails on CPU in some versions: report it
                if name == "ours" or name == "saelens":
                    raise
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            times[name].append(dt)
            last[name] = (recon, dead)
            print(f"[{name}] round {r}: {dt:.1f} s", file=sys.stderr)
    tokens = args.steps * args.batch_size
    res: dict = {}
    for name in runners:
        if name in errors:
            res[name] = {"error": errors[name]}
            continue
        recon, dead = last[name]
        x_hat, z = recon(held)
        sec = statistics.median(times[name])
        res[name] = {
            "seconds": sec,
            "seconds_all": times[name],
            "tokens_per_s": tokens / sec,
            "fvu": fvu(held, x_hat),
            "l0": float((z > 0).sum(1).double().mean()),
            "dead_fraction": dead,
        }
    out = {
        "benchmark": "sae_training",
        "config": {
            "width": args.width,
            "k": args.k,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "tokens": tokens,
            "lr": args.lr,
            "train_rows": int(x.shape[0]),
            "heldout_rows": int(held.shape[0]),
            "threads": args.threads,
            "repeats": args.repeats,
            "data": data,
        },
        **res,
        "ratio": res["ours"]["tokens_per_s"] / res["saelens"]["tokens_per_s"],
        "fvu_delta": res["ours"]["fvu"] - res["saelens"]["fvu"],
        "target": "ratio >= 1.5 at fvu_delta <= 0",
        "versions": {
            "torch": torch.__version__,
            "sae_lens": __import__("sae_lens").__version__,
            "python": platform.python_version(),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.store and args.splice_docs > 0:
        out["quality"] = quality_row(st, hook, {k: last[k][0] for k in ("ours", "saelens")}, held, args)
        q = out["quality"]
        out["ce_loss_score_delta"] = q["ours"]["ce_loss_score"] - q["saelens"]["ce_loss_score"]
    if "saelens_sparse" in res and "error" not in res["saelens_sparse"]:
        out["ratio_vs_sparse"] = res["ours"]["tokens_per_s"] / res["saelens_sparse"]["tokens_per_s"]
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
