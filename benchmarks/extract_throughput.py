"""Throughput of ``extract()`` against a plain HF forward on the same batches, and its peak memory.

Prints one JSON object:

- ``extract_tok_s``: stored tokens per second of the whole ``extract()`` call (tokenization, forward
  with hooks, selecting rows, writing shards, checksums, manifest), median of interleaved repeats;
- ``hf_forward_tok_s``: the plain ``model(input_ids, attention_mask, output_hidden_states=True)`` over
  exactly the same padded batches (same documents, same order, same padding), and
  ``hf_body_forward_tok_s`` the same without the LM head (``model.model``), a stricter baseline;
- ``ratio`` = extract / hf_forward (target >= 0.90) and ``ratio_vs_body``;
- ``memory``: peak RSS of a fresh process extracting ``--mem-sizes`` tokens each (it must not grow with
  the size of the store once a shard is full).

    python benchmarks/extract_throughput.py [--model smollm2-135m-instruct] [--tokens 4096]
        [--mem-sizes 2000,20000] [--batch-size 8] [--repeats 3] [--doc-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rosettalens
from rosettalens.data import Corpus, load_documents
from rosettalens.store import ExtractConfig, _tokenize_docs, extract


def make_corpus(tok, n_tokens: int, doc_tokens: int) -> Corpus:
    """Documents of about ``doc_tokens`` tokens, built from the built-in corpora (deterministic)."""
    base = load_documents("mini-web").documents + load_documents("sequences").documents[::5]
    docs, cur, cur_len, total, i = [], [], 0, 0, 0
    while total < n_tokens * 1.05 + doc_tokens:
        piece = base[i % len(base)]
        i += 1
        cur.append(piece)
        cur_len += len(tok(piece, add_special_tokens=False)["input_ids"]) + 1
        if cur_len >= doc_tokens:
            docs.append("\n\n".join(cur))
            total += cur_len
            cur, cur_len = [], 0
    return Corpus(f"benchmark-{n_tokens}", docs)


def hf_batches(hm, corpus: Corpus, cfg: ExtractConfig):
    """The padded batches extract() runs (one shard: documents sorted by length, left padding)."""
    max_pos = getattr(hm.model.config.get_text_config(), "max_position_embeddings", None) or 1024
    docs = _tokenize_docs(hm.tokenizer, corpus.documents, cfg, min(cfg.max_length or 1024, int(max_pos)))
    order = sorted(range(len(docs)), key=lambda i: len(docs[i].ids))
    pad = hm.tokenizer.pad_token_id or 0
    batches = []
    for b in range(0, len(order), cfg.batch_size):
        group = [docs[i].ids for i in order[b : b + cfg.batch_size]]
        T = max(len(x) for x in group)
        ids = torch.full((len(group), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(group):
            ids[j, T - len(x) :] = torch.from_numpy(x)
            mask[j, T - len(x) :] = 1
        batches.append((ids, mask))
    return batches, sum(len(d.keep) for d in docs)


def throughput(args) -> dict:
    hm = rosettalens.load(args.model, progress=False)
    hooks = [h.strip() for h in args.hooks.split(",")]
    corpus = make_corpus(hm.tokenizer, args.tokens, args.doc_tokens)
    cfg = ExtractConfig(hooks=hooks, data=corpus.spec, max_tokens=args.tokens, batch_size=args.batch_size)
    batches, n_rows = hf_batches(hm, corpus, cfg)
    n_positions = sum(int(m.sum()) for _, m in batches)

    @torch.no_grad()
    def hf_forward(body: bool):
        mod = hm.model.model if body else hm.model
        for ids, mask in batches:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            mod(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                output_hidden_states=True,
                use_cache=False,
            )

    with torch.no_grad():  # warm-up (first calls allocate and pick kernels)
        ids, mask = batches[0]
        hm.run_with_cache(ids, hooks=hooks, attention_mask=mask, stop_early=True)
        hm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    tmp = Path(tempfile.mkdtemp(prefix="rosetta-bench-"))
    times: dict[str, list[float]] = {"extract": [], "hf": [], "hf_body": []}
    try:
        for r in range(args.repeats):  # interleaved, so a busy machine slows all three alike
            t = time.perf_counter()
            hf_forward(body=False)
            times["hf"].append(time.perf_counter() - t)
            out = tmp / f"run{r}"
            t = time.perf_counter()
            store = extract(hm, hooks, corpus, out, max_tokens=args.tokens, batch_size=args.batch_size)
            times["extract"].append(time.perf_counter() - t)
            assert len(store) == n_rows
            shutil.rmtree(out)
            t = time.perf_counter()
            hf_forward(body=True)
            times["hf_body"].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "tokens_stored": n_rows,
        "positions_run": n_positions,
        "documents": sum(len(b[0]) for b in batches),
        "batches": len(batches),
        "hooks": [hm.resolve_hook(h) for h in hooks],
        "extract_tok_s": n_rows / med["extract"],
        "hf_forward_tok_s": n_rows / med["hf"],
        "hf_body_forward_tok_s": n_rows / med["hf_body"],
        "ratio": med["hf"] / med["extract"],
        "ratio_vs_body": med["hf_body"] / med["extract"],
        "target_ratio": 0.90,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    """This process's peak RSS (``ru_maxrss`` would report the parent's when larger: Linux keeps it
    across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def memory_run(args) -> dict:
    """Run in a fresh process: extract ``args.mem_run`` tokens; sample RSS every 10 ms while it runs."""
    import threading

    hm = rosettalens.load(args.model, progress=False)
    corpus = make_corpus(hm.tokenizer, args.mem_run, args.doc_tokens)
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = Path(tempfile.mkdtemp(prefix="rosetta-mem-")) / "store"
    t = time.perf_counter()
    store = extract(hm, args.hooks.split(","), corpus, out, max_tokens=args.mem_run, batch_size=args.batch_size,
                    shard_size=args.shard_size)  # fmt: skip
    dt = time.perf_counter() - t
    done.set()
    th.join()
    size = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out.parent)
    return {
        "tokens": len(store),
        "rss_before_mb": round(before, 1),
        "peak_rss_during_extract_mb": round(peak[0], 1),
        "extract_extra_mb": round(peak[0] - before, 1),
        "process_peak_rss_mb": round(_hwm_mb(), 1),
        "store_mb": round(size / 2**20, 1),
        "shard_size": args.shard_size,
        "seconds": round(dt, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--hooks", default="resid_post.7,resid_post.15,resid_post.23,resid_post.-1")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--mem-sizes", default="2000,20000")
    ap.add_argument("--shard-size", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-run", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.mem_run:
        print(json.dumps(memory_run(args)))
        return
    result = {
        "model": args.model,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "doc_tokens": args.doc_tokens,
        **throughput(args),
    }
    mem = []
    for n in [int(x) for x in args.mem_sizes.split(",") if x]:
        cmd = [sys.executable, __file__, "--mem-run", str(n), "--model", args.model, "--hooks", args.hooks]
        cmd += ["--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
        cmd += ["--doc-tokens", str(args.doc_tokens)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        mem.append(json.loads(r.stdout.strip().splitlines()[-1]))
    result["memory"] = mem
    if len(mem) >= 2:
        result["peak_rss_growth_mb"] = (
            mem[-1]["peak_rss_during_extract_mb"] - mem[0]["peak_rss_during_extract_mb"]
        )
    print(json.dumps(result, indent=1, default=lambda x: float(x) if isinstance(x, np.floating) else str(x)))


if __name__ == "__main__":
    main()
