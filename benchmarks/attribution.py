"""Attribution patching on a real zoo model: time and peak memory of EAP / EAP-IG / edge EAP.

Default model qwen2.5-coder-1.5b-instruct (28 layers x 12 heads, GQA 2 kv heads), digit-sequence
prompts ("3 4 5 6 7" -> " 8") against corrupted prompts of the same token length, metric
logit(next) - logit(last member). Baselines measured in the same run on the same batch:

* one plain forward (no grad) -- the unit the other numbers are expressed in;
* phases: EAP on the float32 model, EAP under bfloat16 autocast (float32 weights), EAP on the model
  loaded in bfloat16 (``eap_bf16_model``), EAP-IG, edge EAP;
* exact activation patching, one forward per component: ``k`` patches are timed and the time per
  patch is multiplied by the number of components (heads + MLPs), i.e. what a patching loop over every
  node would take (``ratio_exact_loop_vs_eap``).

Each phase runs in a fresh process (so freed-but-kept allocator pages of one phase do not hide the
next one's peak); its peak memory is the process's resident peak (VmHWM) minus the RSS after loading
the model and one warm-up forward of one prompt (which makes every mmapped weight page resident),
with the peak reset there (``/proc/self/clear_refs``; a bfloat16 load converts from the float32 cache
and peaks during loading), i.e. what the phase needs above the model's weights.
EAP-IG's and the edge graph's fidelity are not measured here (tests/test_attribution.py does that).

    nice python benchmarks/attribution.py [--model M] [--batch 8] [--batch-size 8] [--patches 12]
        [--steps 5] [--no-edges] [--out benchmarks/results/attribution.cpu2.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from memory import reset_peak, status_mb

import rosettalens
from rosettalens.circuits.attribution import attribute_edges, attribute_nodes, logit_diff_metric
from rosettalens.io import atomic_write_text
from rosettalens.names import hook_name


def prompts(hm, n: int):
    """Up to 10 rows: "a a+1 .. a+4" (a = 0..4) -> " a+5"; corrupted by two fixed shuffles of the members."""
    tok = hm.tokenizer
    clean_txt, corr_txt, good, bad = [], [], [], []
    for perm in ((0, 3, 1, 4, 2), (2, 4, 0, 3, 1)):
        for a in range(5):
            seq = [a + i for i in range(5)]
            clean_txt.append(" ".join(map(str, seq)))
            corr_txt.append(" ".join(str(seq[i]) for i in perm))
            good.append(tok.encode(f" {seq[-1] + 1}", add_special_tokens=False)[-1])
            bad.append(tok.encode(f" {seq[-1]}", add_special_tokens=False)[-1])
    clean_txt, corr_txt, good, bad = clean_txt[:n], corr_txt[:n], good[:n], bad[:n]
    c = hm.tokenize(clean_txt)
    x = hm.tokenize(corr_txt)
    assert c["input_ids"].shape == x["input_ids"].shape and bool(c["attention_mask"].all())
    return c["input_ids"], x["input_ids"], logit_diff_metric(torch.tensor(good), torch.tensor(bad))


PHASES = ("forward", "exact", "eap", "eap_bf16", "eap_bf16_model", "eap_ig", "edges")


def _picks(c, k: int) -> list[tuple[int, int]]:
    stride = max(1, c.n_layers // k)
    return [(layer, layer % c.n_heads) for layer in range(0, c.n_layers, stride)][:k]


def run_phase(args) -> dict:
    """One phase in this process: peak = VmHWM - RSS after loading the model."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t = time.perf_counter()
    dtype = torch.bfloat16 if args.phase == "eap_bf16_model" else None
    hm = rosettalens.load(args.model, progress=False, dtype=dtype)
    load_s = time.perf_counter() - t
    clean, corrupted, metric = prompts(hm, args.batch)
    rows = torch.arange(clean.shape[0])
    c = hm.cfg
    hm.forward(clean[:1])  # warm-up: every weight page is resident after it (safetensors are mmapped)
    loaded_mb = status_mb("VmRSS")
    peak_reset = reset_peak()  # forget the loading peak (a bfloat16 load converts from float32)
    out: dict = {
        "load_s": load_s,
        "model_rss_mb": loaded_mb,
        "shape": list(clean.shape),
        "peak_reset": peak_reset,
    }
    out["n_nodes"] = c.n_layers * (c.n_heads + 1)
    bs = args.batch_size
    t = time.perf_counter()
    if args.phase == "forward":
        hm.forward(clean)
    elif args.phase == "exact":
        base = float(metric(hm.forward(clean), rows).double().mean())
        _, cx = hm.run_with_cache(corrupted, hooks=[hook_name("head_z", i) for i in range(c.n_layers)])
        t = time.perf_counter()  # time the patches only
        vals = []
        for layer, h in _picks(c, args.patches):

            def fn(act, name, h=h, src=cx[hook_name("head_z", layer)]):
                new = act.clone()
                new[:, :, h] = src[:, :, h]
                return new

            with hm.patch({hook_name("head_z", layer): fn}):
                vals.append(float(metric(hm.forward(clean), rows).double().mean()) - base)
        out["exact"] = vals
        out["patches"] = len(vals)
    elif args.phase in ("eap", "eap_bf16", "eap_bf16_model", "eap_ig"):
        kw: dict = {
            "eap_bf16": {"dtype": torch.bfloat16},
            "eap_ig": {"method": "eap-ig", "steps": args.steps},
        }.get(args.phase, {})
        att = attribute_nodes(hm, clean, corrupted, metric, batch_size=bs, **kw)
        out["at_exact_picks"] = [float(att.heads[layer, h]) for layer, h in _picks(c, args.patches)]
        out["clean_metric"], out["corrupted_metric"] = att.clean_metric, att.corrupted_metric
        out["top5"] = sorted(att.scores().items(), key=lambda kv: kv[1])[:5]
    elif args.phase == "edges":
        ea = attribute_edges(hm, clean, corrupted, metric, batch_size=bs)
        out["n_edges"] = ea.n_edges
    out["seconds"] = time.perf_counter() - t
    out["peak_mb_above_model"] = status_mb("VmHWM") - loaded_mb
    out["process_peak_mb"] = status_mb("VmHWM")
    out["load_avg_1min"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--batch", type=int, default=8, help="prompts (at most 10)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per chunk")
    ap.add_argument("--patches", type=int, default=6, help="exact head patches timed for the loop baseline")
    ap.add_argument("--steps", type=int, default=3, help="EAP-IG steps")
    ap.add_argument("--no-edges", action="store_true")
    ap.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--only", default=None, help="comma-separated phases to rerun, merged into an existing --out file"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    common = ["--model", args.model, "--batch", str(args.batch), "--batch-size", str(args.batch_size)]
    common += ["--patches", str(args.patches), "--steps", str(args.steps)]
    res: dict = {"model": args.model, "torch_threads": min(2, os.cpu_count() or 1), "steps": args.steps}
    only = set(args.only.split(",")) if args.only else set(PHASES)
    if args.only and args.out and Path(args.out).exists():
        res = json.loads(Path(args.out).read_text())
        res.setdefault("rerun_phases", []).append(sorted(only))
    for phase in PHASES:
        if phase not in only or (phase == "edges" and args.no_edges):
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--phase", phase, *common], capture_output=True, text=True, check=True
        )
        res[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{phase}: {res[phase]['seconds']:.1f} s", file=sys.stderr)
    fwd = res["forward"]["seconds"]
    per_patch = res["exact"]["seconds"] / res["exact"]["patches"]
    n_nodes = res["n_nodes"] = res["forward"]["n_nodes"]
    res["prompts"], res["tokens_per_prompt"] = res["forward"]["shape"]
    res["exact_loop_all_nodes_s_estimated"] = per_patch * n_nodes
    for phase in ("eap", "eap_bf16", "eap_bf16_model", "eap_ig", "edges"):
        if phase in res:
            res[phase]["seconds_per_forward"] = res[phase]["seconds"] / fwd
    res["ratio_exact_loop_vs_eap"] = res["exact_loop_all_nodes_s_estimated"] / res["eap"]["seconds"]
    res["ratio_exact_loop_vs_eap_bf16"] = res["exact_loop_all_nodes_s_estimated"] / res["eap_bf16"]["seconds"]
    res["exact_vs_eap_at_picks"] = list(zip(res["exact"]["exact"], res["eap"]["at_exact_picks"]))
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")


if __name__ == "__main__":
    main()
