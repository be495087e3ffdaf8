"""Benchmark rosettalens.similarity against plain numpy/scipy textbook implementations (same run).

Prints one JSON object. Defaults: n = 10,000 paired rows, d = 576 vs 896 (SmolLM2 vs Qwen2.5-0.5B
widths), and feature matching of two 16,384-feature dictionaries over 100,000 tokens (peak RSS
measured in a fresh subprocess). Smaller sizes for development::

    python benchmarks/similarity.py --n 2000 --match-features 2048 --match-tokens 20000

Baselines ("textbook") are the formulas as papers and their reference code write them:
CKA = HSIC of double-centred Gram matrices (Kornblith et al. 2019); SVCCA = numpy SVD of each centred
input, then CCA; RSA = scipy ``pdist(correlation)`` + ``spearmanr``; Procrustes = numpy SVD of X^T Y;
kNN = brute-force numpy. For linear CKA the numpy feature-space formula (same algorithm as ours) is
timed too, so the ratio that comes from the algorithm and the one that comes from the implementation
can be told apart. Every row reports ``abs_diff`` between our value and the baseline's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _threads_from_argv(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 1


# Same thread count for torch (MKL/OpenMP) and numpy (OpenBLAS/MKL): set before either is imported.
THREADS = _threads_from_argv(sys.argv)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402
from scipy.spatial.distance import pdist  # noqa: E402

torch.set_num_threads(THREADS)

# ------------------------------------------------------------------------------ textbook baselines


def np_center(x):
    return x - x.mean(0)


def np_center_gram(k):
    means = k.mean(0)
    return k - means[:, None] - means[None, :] + means.mean()


def np_cka_gram(k, l):  # noqa: E741
    k, l = np_center_gram(k), np_center_gram(l)  # noqa: E741
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


def np_linear_cka_textbook(x, y):
    return np_cka_gram(x @ x.T, y @ y.T)


def np_linear_cka_feature(x, y):
    x, y = np_center(x), np_center(y)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def np_rbf_gram(x, sigma=0.5):
    g = x @ x.T
    sq = np.diag(g)
    d2 = np.maximum(-2 * g + sq[:, None] + sq[None, :], 0)
    np.fill_diagonal(d2, 0)
    med = np.median(d2[np.triu_indices_from(d2, 1)])
    return np.exp(-d2 / (2 * sigma**2 * med))


def np_rbf_cka(x, y):
    return np_cka_gram(np_rbf_gram(x), np_rbf_gram(y))


def np_svd_keep(x, keep=0.99):
    u, s, _ = np.linalg.svd(np_center(x), full_matrices=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(energy >= keep - 1e-12)) + 1
    return u[:, :k] * s[:k]


def np_cca_corrs(x, y):
    qx, _ = np.linalg.qr(np_center(x))
    qy, _ = np.linalg.qr(np_center(y))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def np_svcca(x, y):
    return float(np_cca_corrs(np_svd_keep(x), np_svd_keep(y)).mean())


def np_cca(x, y):
    return float(np_cca_corrs(x, y).mean())


def np_inv_sqrt(c):
    w, v = np.linalg.eigh(c)
    return (v / np.sqrt(w)) @ v.T


def np_pwcca(x, y):
    xc, yc = np_center(x), np_center(y)
    ix, iy = np_inv_sqrt(xc.T @ xc), np_inv_sqrt(yc.T @ yc)
    u, rho, vt = np.linalg.svd(ix @ (xc.T @ yc) @ iy, full_matrices=False)
    if x.shape[1] <= y.shape[1]:
        variates, acts = xc @ (ix @ u), xc
    else:
        variates, acts = yc @ (iy @ vt.T), yc
    p, _ = np.linalg.qr(variates)
    w = np.abs(p.T @ acts).sum(1)
    return float(np.sum(w / w.sum() * rho))


def np_rsa(x, y):
    return float(scipy.stats.spearmanr(pdist(x, "correlation"), pdist(y, "correlation")).statistic)


def np_procrustes(x, y):
    x, y = np_center(x), np_center(y)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    return float(np.linalg.svd(x.T @ y, compute_uv=False).sum())


def np_mutual_knn(x, y, k=10):
    def sets(z):
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        s = z @ z.T
        np.fill_diagonal(s, -np.inf)
        idx = np.argpartition(-s, k, axis=1)[:, :k]
        m = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(m, idx, True, axis=1)
        return m

    return float((sets(x) & sets(y)).sum(1).mean() / k)


# ------------------------------------------------------------------------------ harness


def timed(fn, repeats):
    best, value = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def make_data(n, d1, d2, seed=0):
    """Anisotropic paired activations: a shared 64-dim signal with a decaying spectrum, plus noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 64)) * np.geomspace(10, 0.5, 64)
    x = z @ rng.normal(size=(64, d1)) + rng.normal(size=(n, d1))
    y = z @ rng.normal(size=(64, d2)) + 2 * rng.normal(size=(n, d2))
    return x, y


def bench_metrics(args):
    from rosettalens import similarity as sim

    x, y = make_data(args.n, args.d1, args.d2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rows = {
        "linear_cka": (lambda: sim.linear_cka(xt, yt), np_linear_cka_textbook),
        "svcca": (lambda: sim.svcca(xt, yt), np_svcca),
        "rsa": (lambda: sim.rsa(xt, yt), np_rsa),
        "cca": (lambda: float(sim.cca(xt, yt).mean()), np_cca),
        "pwcca": (lambda: sim.pwcca(xt, yt), np_pwcca),
        "rbf_cka": (lambda: sim.rbf_cka(xt, yt), np_rbf_cka),
        "procrustes": (lambda: sim.procrustes(xt, yt).similarity, np_procrustes),
        "mutual_knn": (lambda: sim.mutual_knn(xt, yt, k=10), np_mutual_knn),
    }
    wanted = args.metrics.split(",") if args.metrics else list(rows)
    unknown = sorted(set(wanted) - set(rows))
    if unknown:
        raise SystemExit(f"unknown metric(s) {unknown}; choose from {sorted(rows)}")
    # warm-up on small inputs (BLAS/LAPACK initialisation is not what we time)
    xs, ys = x[:300, :40], y[:300, :60]
    for name in wanted:
        rows_small = {
            "linear_cka": sim.linear_cka,
            "svcca": sim.svcca,
            "rsa": sim.rsa,
            "pwcca": sim.pwcca,
            "rbf_cka": sim.rbf_cka,
            "mutual_knn": sim.mutual_knn,
        }
        if name in rows_small:
            rows_small[name](torch.from_numpy(xs), torch.from_numpy(ys))
        {
            "linear_cka": np_linear_cka_textbook,
            "svcca": np_svcca,
            "rsa": np_rsa,
            "cca": np_cca,
            "pwcca": np_pwcca,
            "rbf_cka": np_rbf_cka,
            "procrustes": np_procrustes,
            "mutual_knn": np_mutual_knn,
        }[name](xs, ys)
    out = {}
    for name in wanted:
        ours_fn, base_fn = rows[name]
        t_ours, v_ours = timed(ours_fn, args.repeats)
        t_base, v_base = timed(lambda f=base_fn: f(x, y), args.repeats)
        rec = {
            "ours_s": round(t_ours, 4),
            "textbook_s": round(t_base, 4),
            "speedup": round(t_base / t_ours, 2),
            "value": v_ours,
            "abs_diff": abs(v_ours - v_base),
        }
        if name == "linear_cka":
            t_f, v_f = timed(lambda: np_linear_cka_feature(x, y), args.repeats)
            rec["numpy_feature_space_s"] = round(t_f, 4)
            rec["speedup_vs_numpy_feature_space"] = round(t_f / t_ours, 2)
            rec["abs_diff_feature_space"] = abs(v_ours - v_f)
        out[name] = rec
        print(f"[bench] {name}: {rec}", file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------ feature matching memory

_CHILD = r"""
import json, os, resource, sys, time
for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[v] = "{threads}"
import numpy as np, torch
torch.set_num_threads({threads})
from rosettalens.similarity import match_features
F, N, L, CH = {f}, {n}, {l0}, {chunk}
rng = np.random.default_rng(0)
perm = rng.permutation(F)

def chunks(side):
    g = np.random.default_rng(1)          # both sides replay the same stream
    noise = np.random.default_rng(2 + side)
    for s in range(0, N, CH):
        c = min(CH, N - s)
        cols = g.integers(0, F, size=(c, L))
        vals = g.exponential(1.0, size=(c, L)).astype(np.float32)
        out = np.zeros((c, F), dtype=np.float32)   # dense float32 chunk, as an SAE encoder returns it
        if side == 0:
            np.put_along_axis(out, cols, vals, axis=1)
        else:
            np.put_along_axis(out, perm[cols], vals * (1 + 0.1 * noise.random(vals.shape, dtype=np.float32)), axis=1)
        yield torch.from_numpy(out)

def hwm_kib():  # this process's own peak RSS (ru_maxrss would include the parent's, kept across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

base = hwm_kib()
t = time.perf_counter()
m = match_features(chunks(0), chunks(1), method="max")
dt = time.perf_counter() - t
peak = hwm_kib()
print(json.dumps({{"features": F, "tokens": N, "active_per_token": L, "chunk": CH, "seconds": round(dt, 2),
    "peak_rss_before_mib": round(base / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
    "peak_delta_mib": round((peak - base) / 1024, 1),
    "float64_corr_matrix_mib": round(F * F * 8 / 2**20, 1),
    "one_dense_float64_copy_of_inputs_mib": round(N * F * 8 / 2**20, 1),
    "pairs": len(m), "planted_recovered": float(np.mean(m.b == perm[m.a]))}}))
"""


def bench_matching(args):
    code = _CHILD.format(
        f=args.match_features,
        n=args.match_tokens,
        l0=args.match_l0,
        chunk=args.match_chunk,
        threads=torch.get_num_threads(),
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--d1", type=int, default=576)
    ap.add_argument("--d2", type=int, default=896)
    ap.add_argument("--metrics", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    ap.add_argument("--match-features", type=int, default=16_384)
    ap.add_argument("--match-tokens", type=int, default=100_000)
    ap.add_argument("--match-l0", type=int, default=64, help="active features per token")
    ap.add_argument("--match-chunk", type=int, default=2048)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for torch and numpy alike (default 1: the CPU is shared)",
    )
    ap.add_argument("--skip-metrics", action="store_true")
    ap.add_argument("--skip-matching", action="store_true")
    args = ap.parse_args(argv)
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        },
        "sizes": {"n": args.n, "d1": args.d1, "d2": args.d2},
    }
    if not args.skip_metrics:
        result["metrics"] = bench_metrics(args)
    if not args.skip_matching:
        result["match_features"] = bench_matching(args)
    result["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["machine"]["bench_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
