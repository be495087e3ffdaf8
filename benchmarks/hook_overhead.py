"""Hook overhead on the real SmolLM2: hooked forward vs the plain HF forward, same batch, same run.

Prints JSON: median forward times (interleaved runs) for (a) plain HF, (b) caching one resid_post,
(c) caching every resid_post; ratios against plain (targets: one <= 1.03, all <= 1.10); for context
HF's own ``output_hidden_states=True`` (which also keeps every layer's output alive); and
the cached load time against the first GGUF conversion (target: cached load <= 2 s).

    python benchmarks/hook_overhead.py [--repeats 15] [--batch 8] [--seq 128] [--no-conversion]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rosettalens
from rosettalens.names import hook_name

MODEL = "smollm2-135m-instruct"


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def forward_overhead(repeats: int, batch: int, seq: int) -> dict:
    hm = rosettalens.load(MODEL, progress=False)
    torch.manual_seed(0)
    ids = torch.randint(100, hm.cfg.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    one = [hook_name("resid_post", hm.cfg.n_layers // 2)]
    every = [hook_name("resid_post", i) for i in range(hm.cfg.n_layers)]

    @torch.no_grad()
    def plain():
        hm.model(input_ids=ids, attention_mask=mask, use_cache=False)

    @torch.no_grad()
    def hf_hidden_states():  # HF's own way to keep every layer's output: context for (b)
        hm.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)

    variants = {
        "plain": plain,
        "hf_output_hidden_states": hf_hidden_states,
        "one_resid_post": lambda: hm.run_with_cache(ids, hooks=one, attention_mask=mask),
        "every_resid_post": lambda: hm.run_with_cache(ids, hooks=every, attention_mask=mask),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):  # interleaved so drifts in machine load hit every variant alike
        for k, fn in variants.items():
            times[k].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": batch,
        "seq": seq,
        "repeats": repeats,
        "median_s": med,
        "ratio_one_resid_post": med["one_resid_post"] / med["plain"],
        "ratio_every_resid_post": med["every_resid_post"] / med["plain"],
        # keeping 30 layer outputs alive costs the allocator fresh pages whoever keeps them
        "ratio_hf_output_hidden_states": med["hf_output_hidden_states"] / med["plain"],
        "ratio_every_resid_post_vs_hf_hidden_states": med["every_resid_post"]
        / med["hf_output_hidden_states"],
        "targets": {"ratio_one_resid_post": 1.03, "ratio_every_resid_post": 1.10},
    }


def load_times(conversion: bool) -> dict:
    # a fresh process each time; library imports happen before the clock starts (they are not loading)
    code = (
        "import time,rosettalens;from transformers import AutoModelForCausalLM,AutoTokenizer,LlamaForCausalLM;"
        f"t=time.perf_counter();rosettalens.load({MODEL!r}, progress=False);print(time.perf_counter()-t)"
    )
    cached = [
        float(subprocess.check_output([sys.executable, "-c", code], stderr=subprocess.DEVNULL))
        for _ in range(3)
    ]
    out = {"cached_load_s": min(cached), "cached_load_runs_s": cached, "target_cached_load_s": 2.0}
    if conversion:
        from rosettalens.models import zoo

        entry = zoo.ZOO[MODEL]
        with tempfile.TemporaryDirectory() as tmp:
            gguf = zoo.assemble_gguf(entry, Path(tmp) / entry.gguf_name, progress=False)
            t = time.perf_counter()
            zoo.convert_gguf(gguf, Path(tmp) / "conv", entry.sha256, MODEL)
            out["first_conversion_s"] = time.perf_counter() - t
        out["speedup_cached_vs_conversion"] = out["first_conversion_s"] / out["cached_load_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-conversion", action="store_true", help="skip timing the first GGUF conversion")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = {"model": MODEL, "torch_threads": torch.get_num_threads()}
    result["forward"] = forward_overhead(args.repeats, args.batch, args.seq)
    result["load"] = load_times(not args.no_conversion)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
