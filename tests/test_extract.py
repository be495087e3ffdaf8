"""End-to-end extraction through the CLI: kill-and-resume, torchrun with 2 processes, corpus generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import run_torchrun
from rosettalens.cli import main
from rosettalens.models.tiny import tiny_model
from rosettalens.store import ActivationStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "tiny-llama"
    m, t = tiny_model("llama", seed=1)
    m.save_pretrained(d)
    t.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from rosettalens.data import load_documents

    docs = load_documents("sequences").documents + load_documents("mini-web").documents
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n", encoding="utf-8")
    return p


def _env():
    """The child's environment: this checkout on the path and one thread, as in :func:`one_thread`
    (stores compared bit for bit must come from the same kernels and summation order)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def one_thread():
    """In-process runs on one thread, like the children of :func:`_env`: a store resumed in this
    process after a child was killed must equal, bit for bit, one written here uninterrupted. A CI
    run with the default thread count (2 here), another job on the cores, found the two stores'
    ``resid_post.1`` unequal (2026-11-27; not reproduced alone); one thread on both sides takes the
    thread count out of the comparison."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _argv(model_dir, corpus, out, *extra):
    return [
        *("extract", "--model", str(model_dir), "--hooks", "resid_post.1,attn_out.0", "--data", str(corpus)),
        *("--out", str(out), "--no-progress", *extra),
    ]


def _assert_same_store(a: Path, b: Path, exact: bool = True):
    sa, sb = ActivationStore.open(a, verify=True), ActivationStore.open(b, verify=True)
    ma = {k: v for k, v in sa.manifest.items() if k != "shards"}
    mb = {k: v for k, v in sb.manifest.items() if k != "shards"}
    assert ma == mb
    assert [s["rows"] for s in sa.manifest["shards"]] == [s["rows"] for s in sb.manifest["shards"]]
    for name in ("token_ids", "doc_index", "pos_index", "char_end"):
        assert torch.equal(getattr(sa, name), getattr(sb, name)), name
    for h in sa.hooks:
        if exact:
            assert torch.equal(sa.read(h), sb.read(h)), h
        else:
            torch.testing.assert_close(sa.read(h), sb.read(h), rtol=1e-4, atol=1e-5)
    if exact:
        assert sa.manifest["shards"] == sb.manifest["shards"]
        assert (a / "documents.jsonl").read_bytes() == (b / "documents.jsonl").read_bytes()


def test_killed_extraction_resumes_to_identical_store(model_dir, corpus, tmp_path, one_thread):
    out = tmp_path / "killed"
    extra = ("--batch-size", "4", "--shard-size", "25", "--max-tokens", "800")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rosettalens.cli", *_argv(model_dir, corpus, out, *extra)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (out / "shard-00003.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert 4 <= len(done)
    with pytest.raises(Exception, match="unfinished extraction"):
        ActivationStore.open(out)

    assert main(_argv(model_dir, corpus, out, *extra)) == 0  # the same command again
    n_shards = len(ActivationStore.open(out).manifest["shards"])
    assert n_shards > len(done), "the run was killed after it had finished"
    for name, mtime in done.items():  # shards of the killed run were kept, not recomputed
        assert (out / name).stat().st_mtime_ns == mtime
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    ref = tmp_path / "uninterrupted"
    assert main(_argv(model_dir, corpus, ref, *extra)) == 0
    _assert_same_store(out, ref, exact=True)


def test_torchrun_two_processes_match_single_process(model_dir, corpus, tmp_path):
    extra = ("--batch-size", "4", "--shard-size", "150", "--max-tokens", "700")
    single = tmp_path / "single"
    assert main(_argv(model_dir, corpus, single, *extra)) == 0
    multi = tmp_path / "multi"
    r = run_torchrun(["-m", "rosettalens.cli", *_argv(model_dir, corpus, multi, *extra, "--json")])
    summary = json.loads(r.stdout.strip().splitlines()[-1])  # rank 0 prints the summary
    assert summary["rows"] == 700
    # each rank wrote its own shards (round-robin), rank 0 the manifest
    _assert_same_store(multi, single, exact=False)


def test_generate_corpus_reproducible_dedup_cached(model_dir, tmp_path, capsys):
    from rosettalens.data.generate import generate_to_file
    from rosettalens.models.loading import load

    hm = load(str(model_dir), progress=False)
    kw = dict(max_new_tokens=16, batch_size=4)
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    ra = generate_to_file(hm, a, 40, seed=5, **kw)
    assert ra["cached"] is False and ra["n_tokens"] >= 40
    generate_to_file(hm, b, 40, seed=5, **kw)
    assert a.read_text() == b.read_text()
    generate_to_file(hm, c, 40, seed=6, **kw)
    assert a.read_text() != c.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts) and all(r["text"].startswith(r["opening"]) for r in rows)
    from rosettalens.data import load_documents

    assert load_documents(a).documents == texts  # usable as --data as it is

    # the CLI: a rerun with the same options is served from the cache, bad options exit 2
    mtime = a.stat().st_mtime_ns
    args = ["--model", str(model_dir), "--n-tokens", "40", "--max-new-tokens", "16", "--batch-size", "4"]
    args += ["--no-progress", "--json", "--seed", "5"]
    assert main(["data", "generate", *args, "--out", str(a)]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True and a.stat().st_mtime_ns == mtime
    assert main(["data", "generate", *args, "--out", str(tmp_path / "x.csv")]) == 2
    assert main(["data", "generate", *args[:2], "--n-tokens", "0", "--out", str(c)]) == 2


def test_data_list_json(capsys):
    assert main(["data", "list", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert {"mini-web", "sequences"} <= {d["name"] for d in obj["datasets"]}


def test_device_map_auto_gives_the_same_store(model_dir, tmp_path, capsys):
    pytest.importorskip("accelerate", reason="--device-map needs the optional accelerate package")
    base = ["--hooks", "resid_post.0", "--data", "mini-web", "--max-tokens", "120", "--no-progress"]
    assert main(["extract", "--model", str(model_dir), *base, "--out", str(tmp_path / "plain")]) == 0
    argv = [
        "extract",
        "--model",
        str(model_dir),
        *base,
        "--out",
        str(tmp_path / "auto"),
        "--device-map",
        "auto",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    a, b = ActivationStore.open(tmp_path / "plain"), ActivationStore.open(tmp_path / "auto")
    assert torch.equal(a.read("resid_post.0"), b.read("resid_post.0"))
    assert torch.equal(a.token_ids, b.token_ids)
