"""Attribution graphs on SmolLM2: construction time and peak memory against prompt length.

For prompt lengths 64 -> 512 tokens (a sequence-continuation text cut to the length), two ways of
computing the same rows (the logits', then ``--max-feature-nodes`` features'):

* ``chunked`` -- rosettalens' ``build_graph``: one linearised forward of ``--batch-size`` copies of the
  prompt kept for every chunk of targets, features chosen by influence between chunks;
* ``unchunked`` -- the reference implementation: the same function with every row in one batch
  (``chunked=False``), so the kept forward holds ``n_logits + max_feature_nodes`` copies.

Each (length, method) runs in a fresh process; peak memory is the process's resident peak (VmHWM)
minus its RSS after loading the model and transcoders and one warm-up forward (peak reset there with
``/proc/self/clear_refs``). The reference runs under an address-space limit (``--ref-limit-gb``); a
run that hits it is reported as ``oom`` with the limit. The ratio printed is unchunked / chunked.

Transcoders: ``--transcoders DIR`` (a trained set), else the path in ``/tmp/coord/transcoders_ready.txt``
when it exists, else random-init TopK transcoders of ``--width``/``--k`` on every layer (time and
memory depend on the number of active features, not on training). With trained transcoders and
``--quality`` the script also reports replacement/completeness scores and intervention agreement on
a sequence-task prompt.

    nice python benchmarks/graph.py [--lengths 64,128,256,512] [--max-feature-nodes 256]
        [--batch-size 16] [--out benchmarks/results/graph.cpu2.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from memory import reset_peak, status_mb

MODEL = "smollm2-135m-instruct"
TEXT = (
    "Claire was born in February. John was born in March. Mary was born in April. Bob was born in May. "
    "The numbers go 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20. On Monday we rest, on Tuesday we "
    "work, on Wednesday we travel. "
)


def _transcoders(hm, args):
    from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet

    path = None if args.random else args.transcoders
    ready = Path("/tmp/coord/transcoders_ready.txt")
    if path is None and ready.is_file() and not args.random:
        lines = ready.read_text().strip().splitlines()
        path = lines[0].strip() if lines and Path(lines[0].strip()).is_dir() else None
    if path:
        return TranscoderSet.load(path), str(path)
    d = hm.cfg.d_model
    tcs = {
        L: Transcoder(TranscoderConfig(layer=L, d_in=d, d_out=d, width=args.width, k=args.k, seed=L))
        for L in range(hm.cfg.n_layers)
    }
    return TranscoderSet(hm.name, tcs), f"random-init topk width {args.width} k {args.k}"


def _ids(hm, n: int) -> torch.Tensor:
    ids = hm.tokenize(TEXT * (1 + n // 40))["input_ids"][0, :n]
    assert ids.numel() == n
    return ids


def run_one(args) -> dict:
    """One (length, method) in this process."""
    import rosettalens
    from rosettalens.circuits.graph import build_graph

    torch.set_num_threads(args.threads)
    if args.method == "unchunked" and args.ref_limit_gb:
        lim = int(args.ref_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    hm = rosettalens.load(args.model, progress=False)
    tset, source = _transcoders(hm, args)
    ids = _ids(hm, args.length)
    hm.forward(ids[None])
    base = status_mb("VmRSS")
    reset = reset_peak()
    out: dict = {"length": args.length, "method": args.method, "transcoders": source, "peak_reset": reset}
    t = time.perf_counter()
    try:
        g = build_graph(
            hm,
            tset,
            ids,
            max_feature_nodes=args.max_feature_nodes,
            batch_size=args.batch_size,
            chunked=args.method == "chunked",
        )
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        out.update(status="oom", error=str(e).splitlines()[0][:200], limit_gb=args.ref_limit_gb)
        out["seconds"] = time.perf_counter() - t
        return out
    out["seconds"] = time.perf_counter() - t
    out["peak_mb_above_model"] = status_mb("VmHWM") - base
    out.update(
        status="ok",
        n_active_features=g.info["n_active_features"],
        n_feature_nodes=g.n_features,
        n_nodes=g.n_nodes,
        n_logits=g.n_logits,
        load_avg_1min=os.getloadavg()[0],
    )
    if args.quality:
        from rosettalens.circuits.graph_checks import intervention_agreement

        rep, comp = g.scores()
        agr = intervention_agreement(hm, tset, g, n_features=20)
        out.update(replacement_score=rep, completeness_score=comp, intervention_agreement=agr["spearman"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL, help="zoo model (default: %(default)s)")
    ap.add_argument("--transcoders", default=None, help="trained transcoder set folder (default: see above)")
    ap.add_argument("--lengths", default="64,128,256,512", help="prompt lengths in tokens")
    ap.add_argument("--max-feature-nodes", type=int, default=256, help="feature rows per graph")
    ap.add_argument("--batch-size", type=int, default=16, help="chunked: targets per backward pass")
    ap.add_argument("--width", type=int, default=2048, help="random-init transcoders: features")
    ap.add_argument("--k", type=int, default=32, help="random-init transcoders: active features per token")
    ap.add_argument("--ref-limit-gb", type=float, default=8.0, help="address-space limit of the reference")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument(
        "--random", action="store_true", help="random-init transcoders even when trained ones exist"
    )
    ap.add_argument("--quality", action="store_true", help="also scores and intervention agreement")
    ap.add_argument("--methods", default="chunked,unchunked", help="which implementations to run")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="chunked", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    results = []
    for n in [int(x) for x in args.lengths.split(",")]:
        row: dict = {"length": n}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", "--length", str(n), "--method", method]
            for k in ("model", "transcoders", "max_feature_nodes", "batch_size", "width", "k", "ref_limit_gb",
                      "threads"):  # fmt: skip
                v = getattr(args, k)
                if v is not None:
                    cmd += ["--" + k.replace("_", "-"), str(v)]
            if args.random:
                cmd.append("--random")
            if args.quality and method == "chunked":
                cmd.append("--quality")
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["?"])[-1]
                killed = p.returncode < 0 or "memory" in last.lower()
                row[method] = {
                    "status": "oom" if killed else "error",
                    "error": last[:200],
                    "rc": p.returncode,
                }
            else:
                row[method] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{n:4d} tokens {method:9s} {json.dumps(row[method])}", file=sys.stderr, flush=True)
        c, u = row.get("chunked", {}), row.get("unchunked", {})
        if c.get("status") == "ok" and u.get("status") == "ok":
            row["time_ratio_unchunked_vs_chunked"] = u["seconds"] / c["seconds"]
            row["memory_ratio_unchunked_vs_chunked"] = u["peak_mb_above_model"] / max(
                c["peak_mb_above_model"], 1
            )
        results.append(row)
    print(
        f"{'tokens':>6} {'chunked s':>10} {'chunked MB':>11} {'ref s':>8} {'ref MB':>8} {'time x':>7} {'mem x':>7}"
    )
    for r in results:
        c, u = r.get("chunked", {}), r.get("unchunked", {})

        def f(d, k, fmt="{:.1f}"):
            return fmt.format(d[k]) if d.get("status") == "ok" else d.get("status", "-")

        tr = r.get("time_ratio_unchunked_vs_chunked")
        mr = r.get("memory_ratio_unchunked_vs_chunked")
        print(
            f"{r['length']:>6} {f(c, 'seconds'):>10} {f(c, 'peak_mb_above_model', '{:.0f}'):>11} "
            f"{f(u, 'seconds'):>8} {f(u, 'peak_mb_above_model', '{:.0f}'):>8} "
            f"{(f'{tr:.2f}' if tr else '-'):>7} {(f'{mr:.2f}' if mr else '-'):>7}"
        )
    if args.out:
        from rosettalens.io import atomic_write_text

        meta = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "cpus": os.cpu_count(), "torch": torch.__version__}  # fmt: skip
        atomic_write_text(args.out, json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
