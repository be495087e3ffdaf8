"""Activation patching sweeps: rosettalens ``patch_sweep`` vs TransformerLens's ``patching`` module.

For each model: a full ``resid_pre`` layer x position sweep and a head (``head_z`` / TL ``hook_z``,
all positions) layer x head sweep on one clean / corrupted prompt pair, timed for

* ``rosettalens``: ``patch_sweep`` (many patches per forward, batch grown at each layer), and again
  with ``last_logits_only=True`` (the LM head at the last position, all this metric reads);
* ``transformer_lens``: ``transformer_lens.patching.get_act_patch_resid_pre`` /
  ``get_act_patch_attn_head_out_all_pos`` on a ``HookedTransformer`` built from the same local HF
  weights (``from_pretrained_no_processing(folder, hf_model=..., tokenizer=...)``; the hub is
  offline), run under ``torch.no_grad()`` (TL's best case);
* ``loop``: one forward per patch through ``hm.patch(hook, clean, positions=..., heads=...)``;
* ``hand_batched``: the same patches stacked ``--hand-batch`` rows per forward from the embedding
  on, written by hand with ``hm.hooks`` (what a user does without ``patch_sweep``).

The metric is the logit of the clean run's top token minus that of the corrupted run's top token at
the last position. Prints one JSON object (times, speed-ups against each baseline measured in the
same run, max abs differences of the result matrices) and writes it to ``--out``.

    nice python benchmarks/patching.py [--models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct]
        [--sweeps resid_pre,heads] [--threads 1] [--skip-tl M,..] [--skip-loop M,..]
        [--out benchmarks/results/patching.cpu2.json]

Times are wall seconds and CPU seconds of this process; on a shared machine the CPU-time ratios are
the ones to read (other processes stretch the wall time of each variant differently).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import rosettalens
from rosettalens.circuits import patch_sweep
from rosettalens.io import atomic_write_text
from rosettalens.names import hook_name

CLEAN = "The months in order: January February March April May June July"
CORRUPTED = "The months in order: July March May January June April February"


def _pair(hm):
    clean = hm.tokenize(CLEAN, add_special_tokens=False)["input_ids"]
    corrupted = hm.tokenize(CORRUPTED, add_special_tokens=False)["input_ids"]
    if clean.shape != corrupted.shape:
        raise SystemExit(f"{hm.name}: prompts tokenise to {clean.shape[1]} and {corrupted.shape[1]} tokens")
    return clean, corrupted


def _metric_for(hm, clean, corrupted):
    answer = int(hm.forward(clean)[0, -1].argmax())
    top = hm.forward(corrupted)[0, -1].topk(2).indices.tolist()
    wrong = top[0] if top[0] != answer else top[1]

    def metric(logits):  # [batch, pos, vocab] -> [batch]
        return logits[:, -1, answer] - logits[:, -1, wrong]

    return metric, answer, wrong


def _load_tl(hm, name: str):
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    folder = Path(os.environ.get("ROSETTA_CACHE", Path.home() / ".cache" / "rosettalens")) / "models" / name
    official = loading.get_official_model_name
    loading.get_official_model_name = lambda n: n if Path(n).exists() else official(n)  # local folder
    try:
        tl = HookedTransformer.from_pretrained_no_processing(
            str(folder),
            hf_model=hm.model,
            tokenizer=hm.tokenizer,
            device="cpu",
            dtype=torch.float32,
            default_prepend_bos=False,
        )
    finally:
        loading.get_official_model_name = official
    return tl


def _timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process): the CPU time is what the ratios use when the
    machine is shared (other processes stretch wall time unevenly between the variants)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    _CPU.append(time.process_time() - c)
    return out, time.perf_counter() - t


_CPU: list[float] = []


@torch.no_grad()
def _loop(hm, clean, corrupted, metric, sweep):
    c = hm.cfg
    kind = "resid_pre" if sweep == "resid_pre" else "head_z"
    _, cache = hm.run_with_cache(clean, hooks=[hook_name(kind, lay) for lay in range(c.n_layers)])
    n = clean.shape[1] if sweep == "resid_pre" else c.n_heads
    out = torch.empty(c.n_layers, n, dtype=torch.float64)
    for lay in range(c.n_layers):
        for i in range(n):
            kw = {"positions": i} if sweep == "resid_pre" else {"heads": i}
            with hm.patch(hook_name(kind, lay), cache[hook_name(kind, lay)], **kw):
                out[lay, i] = float(metric(hm.forward(corrupted))[0])
    return out


@torch.no_grad()
def _hand_batched(hm, clean, corrupted, metric, sweep, batch: int):
    """The patches stacked into batches from the embedding on: row j of a forward is patch j."""
    c = hm.cfg
    kind = "resid_pre" if sweep == "resid_pre" else "head_z"
    _, cache = hm.run_with_cache(clean, hooks=[hook_name(kind, lay) for lay in range(c.n_layers)])
    n = clean.shape[1] if sweep == "resid_pre" else c.n_heads
    grid = [(lay, i) for lay in range(c.n_layers) for i in range(n)]
    out = torch.empty(len(grid), dtype=torch.float64)
    for s in range(0, len(grid), batch):
        chunk = grid[s : s + batch]
        hooks = []
        for lay in sorted({lay for lay, _ in chunk}):
            rows = [j for j, (l2, _) in enumerate(chunk) if l2 == lay]
            idx = [chunk[j][1] for j in rows]
            src = cache[hook_name(kind, lay)][0]

            def fn(act, name, rows=rows, idx=idx, src=src):
                if sweep == "resid_pre":
                    act[rows, idx] = src[idx]
                else:
                    act[rows, :, idx] = src[:, idx].transpose(0, 1)
                return act

            hooks.append((hook_name(kind, lay), fn))
        with hm.hooks(hooks):
            logits = hm.forward(corrupted.expand(len(chunk), -1))
        for j in range(len(chunk)):
            out[s + j] = float(metric(logits[j : j + 1])[0])
    return out.view(c.n_layers, n)


def _tl_sweep(tl, clean, corrupted, metric, sweep):
    from transformer_lens import patching

    with torch.no_grad():
        _, cache = tl.run_with_cache(clean)
        fn = (
            patching.get_act_patch_resid_pre
            if sweep == "resid_pre"
            else patching.get_act_patch_attn_head_out_all_pos
        )
        return fn(tl, corrupted, cache, lambda logits: metric(logits).mean()).double()


def bench_model(name: str, sweeps: list[str], hand_batch: int, skip_tl: bool, skip_loop: bool) -> dict:
    hm = rosettalens.load(name, progress=False)
    clean, corrupted = _pair(hm)
    metric, answer, wrong = _metric_for(hm, clean, corrupted)
    res: dict = {
        "model": name,
        "n_layers": hm.cfg.n_layers,
        "n_heads": hm.cfg.n_heads,
        "n_positions": int(clean.shape[1]),
        "answer": hm.tokenizer.decode([answer]),
        "wrong": hm.tokenizer.decode([wrong]),
    }
    tl = None
    if not skip_tl:
        tl, res["tl_load_s"] = _timed(_load_tl, hm, name)
        with torch.no_grad():
            res["tl_vs_hf_logits_max_abs_diff"] = float((tl(clean) - hm.forward(clean)).abs().max())
    for sweep in sweeps:
        kind = "resid_pre" if sweep == "resid_pre" else "heads"
        print(f"[{name}] {sweep}: rosettalens", file=sys.stderr)
        patch_sweep(hm, clean, corrupted, metric, kind, layers=[hm.cfg.n_layers - 1])  # warm-up
        ours, t_ours = _timed(patch_sweep, hm, clean, corrupted, metric, kind)
        c_ours = _CPU[-1]
        # the same sweep with the LM head at the last position only (all this metric reads)
        last, t_last = _timed(patch_sweep, hm, clean, corrupted, metric, kind, last_logits_only=True)
        c_last = _CPU[-1]
        r = {
            "patches": int(ours.values.numel()),
            "shape": list(ours.values.shape),
            "rosettalens_s": round(t_ours, 2),
            "rosettalens_cpu_s": round(c_ours, 2),
            "rows_per_forward": ours.meta["rows_per_forward"],
            "forwards": ours.meta["forwards"],
            "shared_prefix": ours.meta["shared_prefix"],
            "rosettalens_last_logits_s": round(t_last, 2),
            "rosettalens_last_logits_cpu_s": round(c_last, 2),
            "max_abs_diff_last_logits_vs_full": float((ours.values - last.values).abs().max()),
        }
        if not skip_loop:
            print(f"[{name}] {sweep}: loop over hm.patch", file=sys.stderr)
            loop, t_loop = _timed(_loop, hm, clean, corrupted, metric, sweep)
            r["loop_hm_patch_s"] = round(t_loop, 2)
            r["loop_hm_patch_cpu_s"] = round(_CPU[-1], 2)
            r["speedup_vs_loop"] = round(t_loop / t_ours, 2)
            r["cpu_speedup_vs_loop"] = round(_CPU[-1] / c_ours, 2)
            r["max_abs_diff_vs_loop"] = float((ours.values - loop).abs().max())
        print(f"[{name}] {sweep}: hand-batched", file=sys.stderr)
        hand, t_hand = _timed(_hand_batched, hm, clean, corrupted, metric, sweep, hand_batch)
        r.update(
            {
                "hand_batched_s": round(t_hand, 2),
                "hand_batched_cpu_s": round(_CPU[-1], 2),
                "hand_batch_rows": hand_batch,
                "speedup_vs_hand_batched": round(t_hand / t_ours, 2),
                "cpu_speedup_vs_hand_batched": round(_CPU[-1] / c_ours, 2),
                "cpu_speedup_last_logits_vs_hand_batched": round(_CPU[-1] / c_last, 2),
                "max_abs_diff_vs_hand_batched": float((ours.values - hand).abs().max()),
                "clean_metric": ours.clean_metric,
                "corrupted_metric": ours.corrupted_metric,
                "max_abs_effect": float((ours.values - ours.corrupted_metric).abs().max()),
            }
        )
        if tl is not None:
            print(f"[{name}] {sweep}: TransformerLens", file=sys.stderr)
            tlv, t_tl = _timed(_tl_sweep, tl, clean, corrupted, metric, sweep)
            r["transformer_lens_s"] = round(t_tl, 2)
            r["transformer_lens_cpu_s"] = round(_CPU[-1], 2)
            r["speedup_vs_transformer_lens"] = round(t_tl / t_ours, 2)
            r["cpu_speedup_vs_transformer_lens"] = round(_CPU[-1] / c_ours, 2)
            r["cpu_speedup_last_logits_vs_transformer_lens"] = round(_CPU[-1] / c_last, 2)
            r["max_abs_diff_vs_transformer_lens"] = float((ours.values - tlv.cpu()).abs().max())
        res[sweep] = r
        print(json.dumps({name: {sweep: r}}), file=sys.stderr)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--sweeps", default="resid_pre,heads")
    ap.add_argument(
        "--hand-batch", type=int, default=32, help="rows per forward of the hand-batched baseline"
    )
    ap.add_argument("--skip-tl", default="", help="comma-separated models to run without TransformerLens")
    ap.add_argument("--skip-loop", default="", help="comma-separated models to run without the hm.patch loop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON here too (atomically)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {
        "benchmark": "patching",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "clean": CLEAN,
        "corrupted": CORRUPTED,
        "timing": "wall seconds (*_s) and CPU seconds of this process (*_cpu_s); cpu_speedup_* from CPU time",
        "models": [],
    }
    skip_loop = set(filter(None, args.skip_loop.split(",")))
    skip_tl = set(filter(None, args.skip_tl.split(",")))
    for m in args.models.split(","):
        out["models"].append(
            bench_model(m, args.sweeps.split(","), args.hand_batch, m in skip_tl, m in skip_loop)
        )
        if args.out:  # after each model, so a long run keeps what it has
            _write(Path(args.out), json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")


if __name__ == "__main__":
    sys.exit(main())
