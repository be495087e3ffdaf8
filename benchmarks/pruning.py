"""Node pruning: the sequential algorithm (one circuit per forward) vs the batched one, same run.

Both run ``rosettalens.circuits.prune_nodes`` on the same model, prompts and settings, once with
``batched=False`` (the reference: one forward per tested removal) and once with ``batched=True``
(speculative batches of candidate removals, one prompt per forward, rows grown at the layer where
they first differ from the current circuit). Prints one JSON object: wall and CPU seconds of each
(``time.process_time`` of this process), their ratios, forwards (model calls), circuits scored and
rows thrown away by the speculation, whether the circuits and every decision are identical, and the
max abs difference of the traced score ratios; writes it to ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/pruning.py [--model smollm2-135m-instruct] [--task digits]
        [--n-prompts 4] [--threshold 0.8] [--group-first true] [--ablation mean] [--max-rows 16]
        [--threads 1] [--out benchmarks/results/pruning.cpu2.json]

Prompts: the task's paper-style prompts (``make_prompts(n=4 * n_prompts)``), the first
``--n-prompts`` that pass the competence filter, their corrupted twins as the reference set.
On a shared machine the CPU-time ratio is the one to read (other processes stretch wall times).

``--random-init`` (for a machine without the zoo weights, e.g. a GPU box with no network): a Llama of
SmolLM2-135M's shape (30 layers, 9 heads, 3 key-value heads, d_model 576, d_ff 1536, vocab 49152) with
random weights, random prompts of ``--n-pos`` tokens and the metric "logit of the clean top token
minus logit of its bottom token"; the circuit means nothing, the timing compares the two algorithms
on that shape. ``--device cuda`` runs either on a GPU (wall times synchronised).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import torch

import rosettalens
from rosettalens.circuits import competence, load_task, make_prompts, prune_nodes
from rosettalens.io import atomic_write_json


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Any, **kw: Any) -> tuple[Any, float, float]:
    _sync()
    w, c = time.perf_counter(), time.process_time()
    out = fn(**kw)
    _sync()
    return out, time.perf_counter() - w, time.process_time() - c


def _random_setup(a: argparse.Namespace) -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    import transformers as T

    from rosettalens.circuits.tasks import AnswerMetric
    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_tokenizer

    cfg = T.LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                        max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(a.seed)
    model = T.LlamaForCausalLM(cfg).eval()
    if a.device:
        model = model.to(a.device)
    hm = HookedModel.from_hf(model, tiny_tokenizer(), name="smollm2-shape-random")
    g = torch.Generator().manual_seed(a.seed)
    clean = torch.randint(100, 40000, (a.n_prompts, a.n_pos), generator=g)
    ref = torch.randint(100, 40000, (a.n_prompts, a.n_pos), generator=g)
    with torch.no_grad():
        lg = hm.forward(clean)[:, -1].float().cpu()
    return hm, clean, ref, AnswerMetric(lg.argmax(-1), lg.argmin(-1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--group-first", type=_bool, default=True)
    ap.add_argument("--ablation", default="mean", choices=("zero", "mean", "resample"))
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batched-first", type=_bool, default=False, help="run the batched variant first")
    ap.add_argument("--out", default=None, help="write the JSON here too (atomically)")
    ap.add_argument("--random-init", type=_bool, default=False, help="SmolLM2-135M's shape, random weights")
    ap.add_argument("--n-pos", type=int, default=33, help="prompt length with --random-init")
    ap.add_argument("--device", default=None)
    ap.add_argument("--grow", default="auto", choices=("auto", "true", "false"),
                    help="batched rows: grown per prompt (CPU default) or stacked (GPU default)")  # fmt: skip
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    stats: dict[str, Any] = {}
    if a.random_init:
        hm, clean, ref, metric = _random_setup(a)
        a.model, a.task = "smollm2-135m shape, random weights", "random tokens"
    else:
        hm = rosettalens.load(a.model, **({"device": a.device} if a.device else {}))
        ps = make_prompts(hm, load_task(a.task), n=4 * a.n_prompts, seed=a.seed)
        mask, stats = competence(hm, ps, a.batch_size)
        rows = mask.nonzero().flatten().tolist()[: a.n_prompts]
        if not rows:
            raise SystemExit(f"{a.model} passes no {a.task} prompt of the competence filter")
        ps = ps.subset(rows)
        clean, ref, metric = ps.clean_ids, ps.corrupted_ids, ps.metric()
    kw = dict(hm=hm, clean_ids=clean, metric=metric, ref_ids=ref, threshold=a.threshold,
              group_first=a.group_first, batch_size=a.batch_size, ablation=a.ablation, seed=a.seed)  # fmt: skip
    runs: dict[str, Any] = {}
    order = ["batched", "sequential"] if a.batched_first else ["sequential", "batched"]
    for name in order:
        grow = None if a.grow == "auto" else a.grow == "true"
        extra = (
            {"batched": True, "max_rows": a.max_rows, "grow": grow}
            if name == "batched"
            else {"batched": False}
        )
        res, wall, cpu = _timed(prune_nodes, **kw, **extra)
        runs[name] = {"res": res, "wall_s": wall, "cpu_s": cpu}
        print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU, {res.n_model_calls} forwards, "
              f"{len(res.heads)} heads + {len(res.mlps)} MLPs keep {res.ratio:.3f}", file=sys.stderr)  # fmt: skip
    s, b = runs["sequential"]["res"], runs["batched"]["res"]
    same_trace = [(e["component"], e["removed"]) for e in s.trace] == [
        (e["component"], e["removed"]) for e in b.trace
    ]
    max_diff = max((abs(x["ratio"] - y["ratio"]) for x, y in zip(s.trace, b.trace)), default=0.0)
    out = {
        "benchmark": "pruning",
        "model": a.model,
        "task": a.task,
        "n_prompts": int(clean.shape[0]),
        "n_positions": int(clean.shape[1]),
        "device": str(hm.device),
        "competence": stats.get("competence"),
        "n_forwards_batched_groups": len(b.batches),
        "mean_rows_per_batched_forward": sum(k for k, _ in b.batches) / max(1, len(b.batches)),
        "threshold": a.threshold,
        "group_first": a.group_first,
        "ablation": a.ablation,
        "max_rows": a.max_rows,
        "grow": a.grow,
        "order": order,
        "identical_circuit": (s.heads, s.mlps) == (b.heads, b.mlps),
        "identical_decisions": same_trace,
        "max_abs_diff_trace_ratio": max_diff,
        "circuit": {"heads": s.heads, "mlps": s.mlps, "ratio_sequential": s.ratio, "ratio_batched": b.ratio},
        "tested_removals": len(s.trace),
        "sequential": {
            "wall_s": runs["sequential"]["wall_s"],
            "cpu_s": runs["sequential"]["cpu_s"],
            "forwards": s.n_model_calls,
            "circuits_scored": s.rows_scored,
            "layer_rows": s.layer_rows,
        },  # fmt: skip
        "batched": {
            "wall_s": runs["batched"]["wall_s"],
            "cpu_s": runs["batched"]["cpu_s"],
            "forwards": b.n_model_calls,
            "circuits_scored": b.rows_scored,
            "speculative_rows_discarded": b.rows_scored - s.rows_scored,
            "layer_rows": b.layer_rows,
        },  # fmt: skip
        "compute_ratio_layer_rows": s.layer_rows / max(1, b.layer_rows),
        "speedup_wall": runs["sequential"]["wall_s"] / runs["batched"]["wall_s"],
        "speedup_cpu": runs["sequential"]["cpu_s"] / runs["batched"]["cpu_s"],
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": a.threads,
            "cpus": os.cpu_count(),
            "loadavg_end": os.getloadavg(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "note": "GPU machine, nothing else running"
            if torch.cuda.is_available()
            else "shared machine: 2 cores, other jobs running (a 1-thread real-model job among them)",
        },
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        atomic_write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
