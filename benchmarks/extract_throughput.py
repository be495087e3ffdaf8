"""Throughput of ``extract()`` against a plain HF forward on the same batches, per storage dtype; the
error of the reduced-precision stores; peak memory.

Prints one JSON object. For each hook set (``--hook-sets``; default: ``resid_post`` at three layers, and
one ``resid_post`` in the middle of the model):

- ``extract_tok_s`` per storage dtype (``--dtypes``): stored tokens per second of the whole ``extract()``
  call (tokenization, dataset hash, model fingerprint, forward with hooks, selecting rows, writing shards,
  checksums, manifest), median of interleaved repeats;
- baselines over exactly the same padded batches (same documents, shards, order, padding), timed in the
  same run: ``hf_forward`` = ``model(input_ids, attention_mask, output_hidden_states=True)``,
  ``hf_body`` = the same without the LM head (``model.model``), and, when the deepest hook is not the
  last layer, ``hf_body_upto`` = the body cut after the deepest hooked layer (the work ``extract()``
  does: it stops after its last hook); ``ratio`` = extract / baseline per dtype (target >= 0.90);
- ``projected``: wall time (hours) of a 1M- and a 5M-token store at the measured rate (fixed costs
  per call included, so slightly pessimistic), and its size on disk;
- ``error`` (reduced dtypes against the float32 store of the same documents, per hook): per-row
  relative error ``||x_lo - x_32|| / ||x_32||`` (median, p99, max), the largest ``|x|`` over all rows
  and outside the attention-sink rows (float16 overflows past 65504), non-finite values, whether
  ``x_lo`` is exactly ``x_32`` rounded (no other difference), and ``noise_fvu`` = ``sum ||x_lo - x_32||^2 / sum ||x_32 - mean||^2`` (the FVU floor that rounding
  alone puts under any reconstruction);
- ``sae`` (first hook set, its middle hook): a TopK SAE trained on each store with one seed, the
  first position and attention-sink rows left out (:mod:`rosettalens.sae.sinks`), evaluated on
  held-out float32 rows (the last 20% of documents): the FVU cost of training on a reduced store,
  and of evaluating the float32 SAE on reduced rows.

``--data`` is a data spec (default ``corpus``: the offline real-text corpus of
``rosetta data corpus build``) or ``builtin``: documents of about ``--doc-tokens`` tokens built from the
built-in ``mini-web`` and ``sequences`` sets. ``--mem-sizes``: peak RSS of a fresh process extracting
that many tokens each (it must not grow with the size of the store once a shard is full; ``""`` skips).

    OMP_NUM_THREADS=1 python benchmarks/extract_throughput.py [--model smollm2-135m-instruct]
        [--data corpus|builtin|SPEC] [--tokens 8192] [--dtypes float32,bfloat16,float16]
        [--hook-sets auto | "resid_post.10,resid_post.20,resid_post.-1;resid_post.15"]
        [--sae-width 2304] [--sae-k 32] [--sae-epochs 8] [--mem-sizes 2000,20000] [--batch-size 8]
        [--repeats 2] [--doc-tokens 256] [--out FILE]
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
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import rosettalens
from rosettalens.data import Corpus, load_documents
from rosettalens.names import hook_layer, hook_name
from rosettalens.store import STORAGE_DTYPES, ActivationStore, ExtractConfig, _tokenize_docs, extract

PROJECT = (1_000_000, 5_000_000)


def make_builtin(tok, n_tokens: int, doc_tokens: int) -> Corpus:
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


def load_data(args, tok, n_tokens: int) -> Corpus:
    if args.data == "builtin":
        return make_builtin(tok, n_tokens, args.doc_tokens)
    return load_documents(args.data)


def hf_batches(hm, corpus: Corpus, cfg: ExtractConfig):
    """The padded batches extract() runs: per shard, its documents sorted by length, left padding (a
    document cut by a shard boundary runs once per shard, as in extract())."""
    max_pos = getattr(hm.model.config.get_text_config(), "max_position_embeddings", None) or 1024
    docs = _tokenize_docs(hm.tokenizer, corpus.documents, cfg, min(cfg.max_length or 1024, int(max_pos)))
    row_doc = np.concatenate([np.full(len(d.keep), i) for i, d in enumerate(docs)])
    n_rows = len(row_doc)
    pad = hm.tokenizer.pad_token_id if hm.tokenizer.pad_token_id is not None else 0
    batches = []
    for r0 in range(0, n_rows, cfg.shard_size):
        r1 = min(r0 + cfg.shard_size, n_rows)
        order = sorted(range(int(row_doc[r0]), int(row_doc[r1 - 1]) + 1), key=lambda i: len(docs[i].ids))
        for b in range(0, len(order), cfg.batch_size):
            group = [docs[i].ids for i in order[b : b + cfg.batch_size]]
            T = max(len(x) for x in group)
            ids = torch.full((len(group), T), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, x in enumerate(group):
                ids[j, T - len(x) :] = torch.from_numpy(x)
                mask[j, T - len(x) :] = 1
            batches.append((ids, mask))
    return batches, n_rows


@contextmanager
def layers_upto(hm, last: int):
    """The HF model with its decoder layers cut after ``last`` (a plain forward doing extract()'s work)."""
    body = hm.model.model
    full = body.layers
    body.layers = full[: last + 1]
    try:
        yield
    finally:
        body.layers = full


def hook_sets(hm, spec: str) -> list[list[str]]:
    if spec != "auto":
        return [[h.strip() for h in s.split(",") if h.strip()] for s in spec.split(";") if s.strip()]
    n = hm.cfg.n_layers
    three = [
        hook_name("resid_post", n // 3),
        hook_name("resid_post", 2 * n // 3),
        hook_name("resid_post", n - 1),
    ]
    return [three, [hook_name("resid_post", n // 2)]]


def throughput(args, hm, corpus: Corpus, hooks: list[str], dtypes: list[str], keep_dir: Path) -> dict:
    """Interleaved repeats of the baselines and of extract() per dtype; the last repeat's stores are
    kept under ``keep_dir/<dtype>``."""
    hooks = [hm.resolve_hook(h) for h in hooks]
    cfg = ExtractConfig(hooks=hooks, data=corpus.spec, max_tokens=args.tokens, batch_size=args.batch_size,
                        shard_size=args.shard_size)  # fmt: skip
    batches, n_rows = hf_batches(hm, corpus, cfg)
    n_positions = sum(int(m.sum()) for _, m in batches)
    deepest = max(hook_layer(h) for h in hooks)

    @torch.no_grad()
    def hf_forward(mod):
        for ids, mask in batches:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            mod(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                output_hidden_states=True,
                use_cache=False,
            )

    def body_upto():
        with layers_upto(hm, deepest):
            hf_forward(hm.model.model)

    baselines = {"hf_forward": lambda: hf_forward(hm.model), "hf_body": lambda: hf_forward(hm.model.model)}
    if deepest < hm.cfg.n_layers - 1:
        baselines["hf_body_upto"] = body_upto
    with torch.no_grad():  # warm-up (first calls allocate and pick kernels)
        ids, mask = batches[0]
        hm.run_with_cache(ids, hooks=hooks, attention_mask=mask, stop_early=True)
        hm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    times: dict[str, list[float]] = {k: [] for k in [*baselines, *dtypes]}
    scratch = Path(tempfile.mkdtemp(prefix="rosetta-bench-"))
    try:
        for r in range(args.repeats):  # interleaved, so a busy machine slows all alike
            last = r == args.repeats - 1
            for name, fn in baselines.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
            for dt in dtypes:
                out = (keep_dir if last else scratch) / dt
                t = time.perf_counter()
                store = extract(hm, hooks, corpus, out, max_tokens=args.tokens, batch_size=args.batch_size,
                                shard_size=args.shard_size, dtype=dt)  # fmt: skip
                times[dt].append(time.perf_counter() - t)
                assert len(store) == n_rows
                if not last:
                    shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    bytes_per_row = {}
    for dt in dtypes:
        size = sum(p.stat().st_size for p in (keep_dir / dt).iterdir())
        bytes_per_row[dt] = size / n_rows
    per_dtype = {}
    for dt in dtypes:
        rate = n_rows / med[dt]
        per_dtype[dt] = {
            "extract_tok_s": round(rate, 1),
            "ratio": {b: round(med[b] / med[dt], 3) for b in baselines},
            "store_bytes_per_token": round(bytes_per_row[dt], 1),
            "projected": {
                f"{n // 1_000_000}M": {
                    "hours": round(n / rate / 3600, 2),
                    "store_gb": round(n * bytes_per_row[dt] / 1e9, 2),
                }
                for n in PROJECT
            },
        }
    return {
        "hooks": hooks,
        "tokens_stored": n_rows,
        "positions_run": n_positions,
        "documents": sum(len(b[0]) for b in batches),
        "batches": len(batches),
        "baseline_tok_s": {b: round(n_rows / med[b], 1) for b in baselines},
        "dtypes": per_dtype,
        "target_ratio": 0.90,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }


def dtype_error(ref: ActivationStore, low: ActivationStore) -> dict:
    """Per hook: how far ``low``'s rows are from the float32 store ``ref``'s."""
    from rosettalens.sae.sinks import keep_rows

    out = {}
    for h in ref.hooks:
        kept, _ = keep_rows(ref, [h])  # rows outside the default attention-sink rule
        x32 = ref.read(h).float()
        xlo_raw = low.read(h)
        xlo = xlo_raw.float()
        rel = (xlo - x32).norm(dim=1) / x32.norm(dim=1).clamp_min(1e-30)
        num = (xlo.double() - x32.double()).pow(2).sum()
        den = (x32.double() - x32.double().mean(0)).pow(2).sum()
        out[h] = {
            "rel_error_median": float(rel.median()),
            "rel_error_p99": float(rel.quantile(0.99)),
            "rel_error_max": float(rel.max()),
            "max_abs_fp32": float(x32.abs().max()),
            "max_abs_fp32_outside_sinks": float(x32[kept].abs().max()),
            "non_finite": int((~torch.isfinite(xlo)).sum()),
            "equals_fp32_rounded": bool(torch.equal(xlo_raw, x32.to(xlo_raw.dtype))),
            "noise_fvu": float(num / den),
        }
    return out


def sae_effect(args, stores: dict[str, ActivationStore], hook: str) -> dict:
    """A TopK SAE per store (same seed, same rows); FVU on held-out float32 rows."""
    from rosettalens.sae.evaluate import fvu
    from rosettalens.sae.model import SAEConfig
    from rosettalens.sae.sinks import keep_rows
    from rosettalens.sae.train import TrainConfig, train_sae

    ref = stores["float32"]
    keep, medians = keep_rows(ref, [hook])  # default rule: first position and norm outliers left out
    n_docs = int(ref.doc_index.max()) + 1
    held = ref.doc_index >= int(0.8 * n_docs)
    train_rows = torch.nonzero(keep & ~held).squeeze(1)
    test_rows = torch.nonzero(keep & held).squeeze(1)
    x_test = {dt: s.read(hook, test_rows).float() for dt, s in stores.items()}
    tokens = args.sae_epochs * len(train_rows)
    res: dict = {
        "hook": hook,
        "arch": "topk",
        "width": args.sae_width,
        "k": args.sae_k,
        "train_rows": len(train_rows),
        "heldout_rows": len(test_rows),
        "left_out_rows": int((~keep).sum()),
        "train_tokens": tokens,
        "median_norm": medians[hook],
    }
    saes = {}
    t0 = time.perf_counter()
    for dt, s in stores.items():
        x_train = s.read(hook, train_rows).float()
        cfg = SAEConfig(
            d_in=ref.d_model, width=args.sae_width, k=args.sae_k, seed=0, skip_first=0, norm_ratio=0
        )
        tcfg = TrainConfig(batch_size=min(1024, len(train_rows)), tokens=tokens, seed=0)
        with torch.enable_grad():
            saes[dt] = train_sae(x_train, cfg, tcfg, progress=False).eval()
    res["train_seconds_total"] = round(time.perf_counter() - t0, 1)
    with torch.no_grad():
        x32 = x_test["float32"]
        # trained on each store, scored on float32 rows
        res["fvu_trained_on"] = {dt: fvu(x32, sae(x32)) for dt, sae in saes.items()}
        # the float32 SAE scored on each store's rows (what `sae eval` on a reduced store reports)
        res["fvu_fp32_sae_on"] = {dt: fvu(x, saes["float32"](x)) for dt, x in x_test.items()}
    return res


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
    corpus = load_data(args, hm.tokenizer, args.mem_run)
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
                    shard_size=args.mem_shard_size)  # fmt: skip
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
        "shard_size": args.mem_shard_size,
        "seconds": round(dt, 2),
    }


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="zoo name, hub id or folder")
    ap.add_argument("--data", default="corpus", help="a data spec (default: the offline corpus) or 'builtin'")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens stored per extraction")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="storage dtypes (float32 first)")
    ap.add_argument("--hook-sets", default="auto",
                    help="';'-separated comma lists of hooks (auto: resid_post at 3 layers; at 1)")  # fmt: skip
    ap.add_argument("--sae-width", type=int, default=2304, help="SAE latents (0: no SAE part)")
    ap.add_argument("--sae-k", type=int, default=32, help="TopK SAE's active latents per token")
    ap.add_argument("--sae-epochs", type=int, default=8, help="passes of the SAE over its training rows")
    ap.add_argument("--mem-sizes", default="2000,20000", help="token counts of the memory runs ('' skips)")
    ap.add_argument("--shard-size", type=int, default=16384, help="rows per shard (extract's default)")
    ap.add_argument("--mem-shard-size", type=int, default=2048, help="rows per shard in the memory runs")
    ap.add_argument("--batch-size", type=int, default=8, help="documents per forward")
    ap.add_argument("--doc-tokens", type=int, default=256, help="document length of --data builtin")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats (median)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--hooks", default=None, help=argparse.SUPPRESS)  # memory runs
    ap.add_argument("--mem-run", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.mem_run:
        print(json.dumps(memory_run(args)))
        return
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if dtypes[0] != "float32" or any(d not in STORAGE_DTYPES for d in dtypes):
        raise SystemExit(f"--dtypes: float32 first, then any of {', '.join(STORAGE_DTYPES)}")
    load_before = _load()
    t_all = time.perf_counter()
    hm = rosettalens.load(args.model, progress=False)
    corpus = load_data(args, hm.tokenizer, args.tokens)
    sets = hook_sets(hm, args.hook_sets)
    result: dict = {
        "model": args.model,
        "data": args.data,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "load_before": load_before,
        "runs": [],
    }
    for i, hooks in enumerate(sets):
        keep = Path(tempfile.mkdtemp(prefix="rosetta-bench-keep-"))
        try:
            run = throughput(args, hm, corpus, hooks, dtypes, keep)
            stores = {dt: ActivationStore.open(keep / dt) for dt in dtypes}
            run["error"] = {dt: dtype_error(stores["float32"], stores[dt]) for dt in dtypes[1:]}
            if i == 0 and args.sae_width:
                hs = run["hooks"]
                run["sae"] = sae_effect(args, stores, hs[len(hs) // 2])
            result["runs"].append(run)
        finally:
            shutil.rmtree(keep, ignore_errors=True)
    mem = []
    for n in [int(x) for x in args.mem_sizes.split(",") if x]:
        cmd = [sys.executable, __file__, "--mem-run", str(n), "--model", args.model, "--data", args.data]
        cmd += ["--hooks", ",".join(sets[0]), "--batch-size", str(args.batch_size)]
        cmd += ["--mem-shard-size", str(args.mem_shard_size), "--doc-tokens", str(args.doc_tokens)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        mem.append(json.loads(r.stdout.strip().splitlines()[-1]))
    result["memory"] = mem
    if len(mem) >= 2:
        result["peak_rss_growth_mb"] = (
            mem[-1]["peak_rss_during_extract_mb"] - mem[0]["peak_rss_during_extract_mb"]
        )
    result["load_after"] = _load()
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(result, indent=1, default=lambda x: float(x) if isinstance(x, np.floating) else str(x))
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
