"""Every experiment's ``report.html`` from a tiny-model run: one layout (what was run, headline, plots,
examples, in that order), every headline number of ``results.json`` shown, every image present, no raw
JSON in a cell; where Chromium is installed, each report renders to a non-blank screenshot."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from rosettalens.cli import main
from rosettalens.experiments.base import run_experiment

SECTIONS = ("What was run", "Headline results", "Plots", "Examples")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------ checks
def number_leaves(obj: Any) -> list[int | float]:
    """Every int / float leaf of a JSON value (booleans and nulls are not numbers)."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in number_leaves(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in number_leaves(v)]
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, int | float):
        return [obj]
    return []


def shown(v: int | float) -> str:
    """A number as the report promises to write it: ints in full, floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def section(page: str, name: str) -> str:
    """The HTML of one ``<h2>`` section (up to the next ``<h2>``)."""
    start = page.index(f"<h2>{name}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end >= 0 else len(page)]


def check_report(
    run_dir: Path,
    headline_keys: list[str],
    examples: tuple[str, ...] | list[str] = (),
    summary: dict | None = None,
) -> str:
    """The checks every report passes; returns the page. ``headline_keys``: the summary numbers the
    headline shows, from ``results.json`` (or ``summary``: the ``--json`` object, where it differs)."""
    page = (run_dir / "report.html").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    # (iii) the sections, in order
    pos = [page.find(f"<h2>{s}</h2>") for s in SECTIONS]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), pos
    # (a) what was run: the command, the models, the wall time and the peak memory
    run = section(page, "What was run")
    assert "rosetta run " in run
    total = results["timings_s"]["total"]
    assert f"{shown(float(total))} s" in run
    m = re.search(r"data-mb='([0-9.]+)'", run)
    assert m is not None
    mb = float(m.group(1))
    assert mb > 10  # a Python process with torch loaded
    # (i) every headline number of results.json, formatted as the report formats numbers
    head = section(page, "Headline results")
    missing = []
    for key in headline_keys:
        src = results if summary is None else summary
        assert key in src, key
        for v in number_leaves(src[key]):
            if html.escape(shown(v)) not in head:
                missing.append((key, v))
    assert not missing, missing
    # (ii) every image exists in the run directory and every PNG of the run is shown
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert srcs
    for s in srcs:
        assert (run_dir / s).is_file(), s
    pngs = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.png")}
    assert pngs == set(srcs)
    # (d) the examples
    ex = section(page, "Examples")
    for text in examples:
        assert html.escape(text) in ex, text
    # no raw JSON in a table cell
    cells = re.findall(r"<td>(.*?)</td>", page, flags=re.S)
    assert not [c for c in cells if c.lstrip().startswith(("{&quot;", '{"', "[{"))]
    _render(run_dir / "report.html")
    return page


def _render(report: Path) -> None:
    """Load the report in headless Chromium (when installed) and check the screenshot is not blank."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return
    import matplotlib.image

    tmp = report.parent / "_chromium"
    tmp.mkdir(exist_ok=True)
    shot = tmp / "shot.png"
    try:
        subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
             f"--screenshot={shot}", "--window-size=1000,1400", report.resolve().as_uri()],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert shot.is_file(), "chromium wrote no screenshot"
        img = matplotlib.image.imread(str(shot))
        assert img.std() > 0, "blank screenshot"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_chromium_screenshot_or_skip(tmp_path):
    """The renderer check itself: a page with text renders non-blank (skipped without Chromium)."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium is not installed")
    p = tmp_path / "report.html"
    p.write_text("<!doctype html><h1>rosettalens</h1><p>text</p>")
    _render(p)


# ------------------------------------------------------------------------------- the layout
def test_layout_escapes_and_formats(tmp_path):
    """Nested values become sub-tables, floats 4 significant digits, text escaped, the command line
    holds exactly the options that differ from the defaults."""
    from rosettalens.report.html import command_line, kv_table

    t = kv_table([("a<b", {"x": 0.123456, "y": [1, 2], "z": {"q": "<s>"}}), ("n", 3)])
    assert "a&lt;b" in t and "0.1235" in t and "1, 2" in t and "&lt;s&gt;" in t and "<table class='sub'>" in t
    assert "{" not in t
    cmd = command_line("x", {"experiment": "x", "a": 1, "b_c": "p q", "flag": False, "out": "r"},
                       {"a": 1, "b_c": "d", "flag": True, "out": None})  # fmt: skip
    assert cmd == "rosetta run x --b-c 'p q' --no-flag --out r"


# ------------------------------------------------------------------------------ the experiments
def _hf(root: Path, name: str, family: str = "qwen2", **kw) -> str:
    from rosettalens.models.tiny import tiny_model

    model, tok = tiny_model(family, **kw)
    model.save_pretrained(root / name)
    tok.save_pretrained(root / name)
    return str(root / name)


def test_refusal_transfer_report(tmp_path):
    from rosettalens.experiments.refusal_transfer import EXPERIMENT, RefusalTransferConfig

    src = _hf(tmp_path, "a", d_model=48, n_layers=3)
    cfg = RefusalTransferConfig(source=src, target=src, source_layer=1, n_train=12, n_val=6, n_eval=4,
                                max_new_tokens=3, batch_size=8, sweep_points=2, candidate_stride=1,
                                judge="target", out=str(tmp_path / "run"))  # fmt: skip
    run_experiment(EXPERIMENT, cfg, progress=False)
    run_dir = tmp_path / "run"
    comps = json.loads((run_dir / "completions.json").read_text())
    prompts = json.loads((run_dir / "prompts.json").read_text())
    page = check_report(
        run_dir,
        ["refusal_rate", "transferred_fraction_of_native_drop", "induced_refusal_rate", "harmless"],
        [prompts["harmful_test"][0], comps["harmful_baseline"][0], comps["harmful_transferred"][0]],
    )
    assert "--source-layer 1" in page and "--judge" not in page  # judge=target is the default


@pytest.fixture(scope="module")
def organism():
    from test_backdoor_transfer import tiny_organism

    return tiny_organism("a", seed=1)


def test_backdoor_transfer_report(tmp_path, organism):
    from rosettalens.experiments.backdoor_transfer import EXPERIMENT, BackdoorTransferConfig

    cfg = BackdoorTransferConfig(source=organism, target=organism, n_train=48, n_val=8, n_eval=8,
                                 max_new_tokens=16, batch_size=16, sweep_points=0, source_layer=3,
                                 target_layer_choice="depth", out=str(tmp_path / "run"))  # fmt: skip
    run_experiment(EXPERIMENT, cfg, progress=False)
    run_dir = tmp_path / "run"
    comps = json.loads((run_dir / "completions.json").read_text())
    check_report(run_dir, ["backdoor_rate", "clean", "restored_rate"],
                 [comps["baseline"][0], comps["transferred"][0]])  # fmt: skip


def test_safety_switch_report(tmp_path, organism):
    from rosettalens.experiments.safety_switch import EXPERIMENT, SafetySwitchConfig

    cfg = SafetySwitchConfig(model=organism, layers="1,3", n_fit=32, n_eval=8, answer_tokens=8, batch_size=16,
                             max_new_tokens=16, out=str(tmp_path / "run"))  # fmt: skip
    run_experiment(EXPERIMENT, cfg, progress=False)
    run_dir = tmp_path / "run"
    comps = json.loads((run_dir / "completions.json").read_text())
    check_report(run_dir, ["backdoor_rate", "clean", "false_trigger_rate"],
                 [comps["off"]["triggered"][0], comps["resid_pre.3"]["triggered"][0]])  # fmt: skip


def test_sae_universality_report(tmp_path):
    from rosettalens.experiments.sae_universality import SAEUniversalityConfig, run

    a, b = _hf(tmp_path, "llama", "llama", seed=0), _hf(tmp_path, "qwen", "qwen2", seed=1)
    cfg = SAEUniversalityConfig(models=f"{a},{b}", layers="0,2/1,2", max_tokens=1500, width=32, k=4, epochs=2,
                                batch_size=128, n_permutations=20, n_subspace_permutations=100,
                                out=str(tmp_path / "run"))  # fmt: skip
    s = run(cfg, progress=False)  # the summary: results.json's best pair without its per-feature lists
    run_dir = tmp_path / "run"
    page = check_report(run_dir, [])
    head = section(page, "Headline results")
    best = s["best"]
    for v in number_leaves([best, {k: s["controls"][k] for k in ("same_model_svcca", "random_model_svcca")}]):
        assert shown(v) in head, v
    if best:
        assert "Top matched features" in section(page, "Examples")


def test_crosscoder_diff_report(tmp_path, capsys):
    a, c = _hf(tmp_path, "a", "llama", seed=1), _hf(tmp_path, "c", "gpt2", seed=2)
    out = tmp_path / "run"
    argv = ["run", "crosscoder-diff", "--models", f"{a},{c}", "--data", "mini-web", "--hooks", "resid_post.1",
            "--max-tokens", "2000", "--eval-tokens", "400", "--width", "64", "--k", "4", "--epochs", "2",
            "--batch-size", "128", "--splice-docs", "2", "--out", str(out), "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out)
    page = check_report(out, ["explained_variance", "n_alive", "n_shared", "n_a_only", "n_b_only", "controls",
                              "splice", "l0", "dead_fraction"], summary=r)  # fmt: skip
    assert "Latents most specific to model B" in section(page, "Examples")


def test_seqcont_circuits_report(tmp_path, capsys):
    from test_pruning import planted_model
    from test_seqcont import TASKS

    hm = planted_model()
    d = tmp_path / "planted"
    hm.model.save_pretrained(d)
    hm.tokenizer.save_pretrained(d)
    tf = tmp_path / "tasks.json"
    tf.write_text(json.dumps(TASKS))
    out = tmp_path / "run"
    argv = ["run", "seqcont-circuits", "--model", str(d), "--tasks", "", "--task-file", str(tf), "--other-tasks",
            "", "--n-prompts", "4", "--n-random", "1", "--n-random-ablation", "8", "--out", str(out), "--json",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out)
    page = check_report(out, [])
    head = section(page, "Headline results")
    for t in r["tasks"].values():  # the per-task numbers of the headline table (the circuit is an example)
        for k in (
            "competence",
            "n_prompts",
            "baseline_metric",
            "circuit_ratio",
            "faithfulness",
            "cpr",
            "cmd",
        ):
            for v in number_leaves(t[k]):
                assert shown(v) in head, (k, v)
    for v in number_leaves({k: r["shared"][k] for k in ("mean_iou", "random_mean_iou", "faithfulness")}):
        assert shown(v) in head, v
    for v in r["shared"]["ablation_test"].values():  # the ablation tests' p-values beside the random sets
        for k in ("accuracy", "accuracy_shared_ablated", "p_value_accuracy", "p_value_metric"):
            if v.get(k) is not None:
                assert shown(v[k]) in head, (k, v[k])
    ex = section(page, "Examples")
    heads = r["tasks"]["letters-then"]["circuit"]["heads"]
    assert "circuit heads" in ex and html.escape(", ".join(map(str, heads))) in ex


def test_seqcont_graphs_report(tmp_path, capsys):
    from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet

    model = _hf(tmp_path, "llama", "llama", n_layers=2)
    from rosettalens.models.tiny import tiny_model

    d = tiny_model("llama", n_layers=2)[0].config.hidden_size
    tcs = {L: Transcoder(TranscoderConfig(layer=L, d_in=d, d_out=d, width=32, k=4, seed=L)) for L in range(2)}
    TranscoderSet("llama", tcs).save(tmp_path / "tc")
    tc = str(tmp_path / "tc")
    out = tmp_path / "run"
    argv = ["run", "seqcont-graphs", "--models", f"{model},{model}", "--transcoders", f"{tc},{tc}", "--tasks",
            "digits", "--n-prompts", "8", "--n-graphs", "1", "--n-null", "20", "--min-corr", "0.99",
            "--agreement-features", "3", "--out", str(out), "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out)
    page = check_report(out, ["shared_influence", "shared_influence_null", "shared_influence_p",
                              "shared_influence_by_model", "n_matched", "n_graph_features"])  # fmt: skip
    if r["top_pairs"]:
        assert "Top matched features" in section(page, "Examples")


# ------------------------------------------------------------------------- circuits patch figure
@pytest.mark.parametrize("sweep", ["resid_pre", "heads"])
def test_circuits_patch_writes_a_heat_map(tmp_path, capsys, sweep):
    """``circuits patch --out`` writes ``patch.png`` beside its result: a valid PNG of the grid."""
    import matplotlib.image

    model = _hf(tmp_path, "m", "qwen2", n_layers=2)
    out = tmp_path / "patch"
    argv = ["circuits", "patch", "--model", model, "--clean", "0 1 2 3 4", "--corrupted", "4 3 2 1 0",
            "--sweep", sweep, "--json", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out)
    png = out / "patch.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50 and img.std() > 0
    assert r["shape"][0] == 2
    # --overwrite replaces a folder holding the figure too
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert png.is_file()
