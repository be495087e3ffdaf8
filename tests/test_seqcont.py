"""`rosetta run seqcont-circuits` end to end on the planted model (tests/test_pruning.py), and its
bad-input paths."""

import json
import random

import pytest
import torch

from rosettalens.circuits.ablation import mean_ablate
from rosettalens.circuits.tasks import SequenceTask, competence, load_task, make_prompts
from rosettalens.cli import main
from rosettalens.experiments.seqcont_circuits import ablation_test
from test_pruning import MEMBERS, planted_model

TASKS = [
    {"name": "letters-then", "members": ["A", "B", "C", "D", "E", "F", "G", "H"],
     "templates": ["then {1} and {2} and {3} and {4}"]},
    {"name": "letters-so", "members": ["A", "B", "C", "D", "E", "F", "G", "H"],
     "templates": ["so {1} then {2} then {3} and {4}"]},
]  # fmt: skip


def _save(d, hm):
    hm.model.save_pretrained(d)
    hm.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("planted"), planted_model())


@pytest.fixture(scope="module")
def model_dir2(tmp_path_factory):
    """The same construction with the successor head at 2.3 (the last layer)."""
    return _save(tmp_path_factory.mktemp("planted2"), planted_model(succ_head=(2, 3)))


def stdout_print(run_dir):
    """The summary as printed without --json (print_summary of the saved results)."""
    import contextlib
    import io

    from rosettalens.experiments.seqcont_circuits import EXPERIMENT

    r = json.loads((run_dir / "results.json").read_text())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        EXPERIMENT.print_summary({**r, "run_dir": str(run_dir)})
    return buf.getvalue()


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_end_to_end_json(model_dir, model_dir2, tmp_path, capsys):
    tf = tmp_path / "tasks.json"
    tf.write_text(json.dumps(TASKS))
    out = tmp_path / "run"
    argv = ["run", "seqcont-circuits", "--models", f"{model_dir},{model_dir2}", "--tasks", "", "--task-file", str(tf),
            "--other-tasks", "", "--n-prompts", "4", "--n-random", "1", "--n-random-ablation", "8", "--out", str(out),
            "--json"]  # fmt: skip
    rc, stdout, _ = _run(argv, capsys)
    assert rc == 0
    r = json.loads(stdout)  # exactly one JSON object
    assert set(r) >= {"model", "tasks", "shared", "run_dir"}
    assert r["run_dir"] == str(out)
    for name in ("letters-then", "letters-so"):
        t = r["tasks"][name]
        assert set(t) >= {"n_prompts", "competence", "baseline_metric", "circuit", "faithfulness", "cpr", "cmd",
                          "random_cpr"}  # fmt: skip
        assert t["n_prompts"] == 4 and t["competence"] == 1.0
        assert t["circuit"] == {"heads": ["1.2"], "mlps": []}  # the planted head, found by pruning
        assert t["faithfulness"] > 0.8
        assert t["cpr"] > t["random_cpr"]
        # 20 random single heads: only the planted head itself (if drawn) is as faithful
        assert t["random_faithfulness"] < 0.5 and t["faithfulness_p_value"] < 0.25
    sh = r["shared"]
    assert sh["heads"] == ["1.2"] and sh["mlps"] == [] and sh["iou"] == [[1.0, 1.0], [1.0, 1.0]]
    assert sh["roles"]["1.2"]["successor"] == 1.0
    for key in ("ablation_test", "ablation_test_heads"):  # the shared sub-circuit is one head, no MLP
        for task in ("letters-then", "letters-so"):
            test = sh[key][task]
            assert test["accuracy"] == 1.0 and test["accuracy_shared_ablated"] < 0.5
            assert test["heads"] == ["1.2"] and test["mlps"] == [] and len(test["random_sets"]) == 8
            # a random single head breaks the task exactly when it is the planted head
            hits = ["1.2" in r["heads"] for r in test["random_sets"]]
            assert [a < 0.5 for a in test["accuracy_random_ablated"]] == hits
            assert test["p_value_accuracy"] == (1 + sum(hits)) / 9
    assert "ablation test (shared heads only) letters-then: 1 heads + 0 MLPs; accuracy 1.00" in stdout_print(
        out
    )
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "results.json", "report.html", "prompts.json", "circuits.json", "edges.json",
            "faithfulness.json", "shared.json"} <= names  # fmt: skip
    assert any(n.startswith("iou_") for n in names) and any(n.startswith("faithfulness_") for n in names)
    # each circuit was saved as soon as it was pruned (model index - task)
    assert json.loads((out / "circuits" / "1-letters-so.json").read_text())["heads"] == ["2.3"]
    edges = json.loads((out / "edges.json").read_text())
    top = edges[str(model_dir)]["letters-then"]["edges"][0]
    assert top["sender"] == "1.2" and top["receiver"] == "logits"
    # across models: the second model's circuit is its own successor head, matched to the first's by role
    assert r["models"][str(model_dir2)]["shared"]["heads"] == ["2.3"]
    assert r["models"][str(model_dir)]["tasks"] == r["tasks"]
    cm = r["cross_model"]
    assert cm["relative_depth"][str(model_dir)]["letters-then"]["heads"] == [0.5]
    assert cm["relative_depth"][str(model_dir2)]["letters-then"]["heads"] == [1.0]
    (match,) = cm["role_matches"]
    (pair,) = match["pairs"]
    assert pair[str(model_dir)] == "1.2" and pair[str(model_dir2)] == "2.3" and pair["role_distance"] < 0.05
    # both are successor heads (successor score 1.0): one pair within the cutoff, sharing that role
    assert pair["roles"] == ["successor", "successor"] and pair["same_role"] and pair["matched"]
    assert match["n_same_role"] == 1 and 0 < match["p_value"] <= 1
    assert json.loads((out / "circuits" / "1-letters-so.json").read_text())["model"] == str(model_dir2)
    assert (out / "relative_depth.png").exists()
    # resume: every stage is skipped and the summary is the same
    rc, stdout2, _ = _run(["run", "seqcont-circuits", "--resume", str(out), "--json"], capsys)
    assert rc == 0
    r2 = json.loads(stdout2)
    assert r2["tasks"] == r["tasks"] and r2["shared"]["heads"] == sh["heads"]
    saved = json.loads((out / "results.json").read_text())  # the numbers, also after a resume
    assert saved["tasks"] == r["tasks"] and saved["timings_s"]["circuits"] == "skipped"


@pytest.mark.parametrize(
    "tasks, msg",
    [
        ([{"name": "backwards", "members": ["H", "G", "F", "E", "D", "C", "B", "A"],
           "templates": ["then {1} and {2} and {3} and {4}"]}], "passes no prompt of the competence filter"),
        ([{"name": "words", "members": ["A", "B", "C", "D", "Elephant", "F"],
           "templates": ["then {1} and {2} and {3} and {4}"]}], "not a single token"),
    ],
)  # fmt: skip
def test_bad_input_one_line_exit_2(model_dir, tmp_path, capsys, tasks, msg):
    tf = tmp_path / "tasks.json"
    tf.write_text(json.dumps(tasks))
    out = tmp_path / "run"
    rc, stdout, err = _run(["run", "seqcont-circuits", "--model", str(model_dir), "--tasks", "", "--task-file",
                            str(tf), "--other-tasks", "", "--out", str(out), "--json"], capsys)  # fmt: skip
    assert rc == 2 and stdout == ""
    (line,) = [x for x in err.splitlines() if "rosetta" in x]  # one line (besides loading bars)
    assert line.startswith("rosetta: error:") and msg in line
    assert not out.exists()  # nothing half-written


def test_negative_n_random_ablation_exit_2(model_dir, capsys):
    rc, _, err = _run(
        ["run", "seqcont-circuits", "--model", str(model_dir), "--n-random-ablation", "-1"], capsys
    )
    assert rc == 2 and "--n-random-ablation must be >= 0" in err


@pytest.mark.parametrize("bad", [["--other-filter", "some"], ["--role-min-score", "-0.1"]])
def test_bad_filter_or_role_cutoff_exit_2(model_dir, capsys, bad):
    rc, stdout, err = _run(["run", "seqcont-circuits", "--model", str(model_dir), *bad], capsys)
    assert rc == 2 and stdout == "" and bad[0] in err


def test_other_task_competence_filtered(model_dir, tmp_path, capsys):
    """An other task of the ablation test (built-in letters, bare template) keeps only prompts that pass
    the competence filter: its rows are exactly the competent ones, so its unablated accuracy is 1."""
    tf = tmp_path / "tasks.json"
    tf.write_text(json.dumps(TASKS[:1]))
    out = tmp_path / "run"
    argv = ["run", "seqcont-circuits", "--model", str(model_dir), "--tasks", "", "--task-file", str(tf),
            "--other-tasks", "letters", "--templates", "bare", "--n-prompts", "3", "--n-random", "0",
            "--n-random-ablation", "2", "--n-random-circuits", "2", "--edges", "false", "--out", str(out), "--json"]  # fmt: skip
    rc, stdout, _ = _run(argv, capsys)
    assert rc == 0
    r = json.loads(stdout)
    rep = json.loads((out / "prompts.json").read_text())[str(model_dir)]["letters"]
    assert rep["main"] is False and 0 < len(rep["rows"]) <= 3 and rep["n_kept"] >= len(rep["rows"])
    hm = planted_model()
    ps = make_prompts(hm, load_task("letters"), n=16 * 3, seed=0, templates="bare")
    mask, _ = competence(hm, ps)
    assert rep["rows"] == mask.nonzero().flatten().tolist()[:3]
    test = r["shared"]["ablation_test"]["letters"]
    assert test["main_task"] is False and test["n_prompts"] == len(rep["rows"]) and test["accuracy"] == 1.0


def test_tasks_names_a_task_of_the_task_file(model_dir, tmp_path, capsys):
    """``--tasks`` may name a task the ``--task-file`` defines (its tasks give no ``k``): only the named
    one runs, and pruning finds the planted successor head on it, as on the built-in-free run above."""
    assert all("k" not in t for t in TASKS)
    tf = tmp_path / "tasks.json"
    tf.write_text(json.dumps(TASKS))
    out = tmp_path / "run"
    argv = ["run", "seqcont-circuits", "--model", str(model_dir), "--tasks", "letters-so", "--task-file", str(tf),
            "--other-tasks", "", "--n-prompts", "4", "--n-random", "0", "--n-random-ablation", "2",
            "--n-random-circuits", "2", "--no-edges", "--out", str(out), "--json"]  # fmt: skip
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert list(r["tasks"]) == ["letters-so"]  # the file's other task is not added
    t = r["tasks"]["letters-so"]
    assert t["n_prompts"] == 4 and t["competence"] == 1.0
    assert t["circuit"] == {"heads": ["1.2"], "mlps": []}
    assert list(json.loads((out / "prompts.json").read_text())[str(model_dir)]) == ["letters-so"]


def test_reuse_takes_each_models_circuits_from_an_earlier_run(
    model_dir, model_dir2, tmp_path, capsys, monkeypatch
):
    """``--reuse`` of a one-model run: the two-model run takes that model's circuits from it (not pruned
    again, the same as the earlier run's) and prunes only the other model (its planted head 2.3); a
    reused run pruned with another seed lends nothing, so the model is pruned again."""
    import rosettalens.circuits.pruning as pruning

    tf = tmp_path / "tasks.json"
    tf.write_text(json.dumps(TASKS))
    pruned: list[int] = []
    real = pruning.prune_nodes

    def counting(hm, *a, **kw):
        pruned.append(1)
        return real(hm, *a, **kw)

    monkeypatch.setattr(pruning, "prune_nodes", counting)
    common = ["--tasks", "", "--task-file", str(tf), "--other-tasks", "", "--n-prompts", "4", "--n-random", "0",
              "--n-random-ablation", "0", "--n-random-circuits", "1", "--no-edges", "--json"]  # fmt: skip
    first, both, reseeded = tmp_path / "a", tmp_path / "ab", tmp_path / "a-seed1"
    rc, _, err = _run(
        ["run", "seqcont-circuits", "--model", str(model_dir), *common, "--out", str(first)], capsys
    )
    assert rc == 0, err
    assert len(pruned) == 2  # one model, two tasks
    a, b = str(model_dir), str(model_dir2)
    argv = [
        "run",
        "seqcont-circuits",
        "--models",
        f"{a},{b}",
        *common,
        "--out",
        str(both),
        "--reuse",
        str(first),
    ]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    assert len(pruned) == 4  # only the second model's two circuits were pruned
    r = json.loads(stdout)
    c1 = json.loads((first / "circuits.json").read_text())
    c2 = json.loads((both / "circuits.json").read_text())
    assert c2[a] == c1[a]  # the earlier run's circuits, trace included
    assert c2[b]["letters-then"]["heads"] == ["2.3"] and c2[b]["letters-so"]["heads"] == ["2.3"]
    expect = {a: {"letters-then": str(first), "letters-so": str(first)}}
    saved = json.loads((both / "results.json").read_text())
    assert r["reused_circuits"] == expect and saved["reused_circuits"] == expect
    assert r["models"][a]["tasks"]["letters-then"]["circuit"] == {"heads": ["1.2"], "mlps": []}
    # a resumed run keeps the record
    rc, stdout, err = _run(["run", "seqcont-circuits", "--resume", str(both), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["reused_circuits"] == expect and len(pruned) == 4
    # another seed: the earlier run's circuits do not apply, the model is pruned again, nothing recorded
    argv = ["run", "seqcont-circuits", "--model", a, *common, "--seed", "1", "--out", str(reseeded),
            "--reuse", str(first)]  # fmt: skip
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    assert len(pruned) == 6
    assert "reused_circuits" not in json.loads(stdout)
    assert not (reseeded / "circuits" / "reused.json").exists()


def test_unknown_task_exit_2(model_dir, capsys):
    rc, _, err = _run(["run", "seqcont-circuits", "--model", str(model_dir), "--tasks", "fibonacci"], capsys)
    assert rc == 2 and "unknown task" in err


@pytest.fixture(scope="module")
def planted_set():
    hm = planted_model()
    task = SequenceTask("letters", MEMBERS, templates=["then {1} and {2} and {3} and {4}"])
    ps = make_prompts(hm, task, n=16, seed=0)
    mask, _ = competence(hm, ps)
    return hm, ps.subset(mask)


def _reference(hm, ps, heads, mlps):
    """Accuracy and mean metric with the components mean-ablated by the ablation module (its own hooks)."""
    with mean_ablate(hm, heads, mlps, reference=ps.corrupted_ids), torch.no_grad():
        lg = hm.forward(ps.clean_ids)
    return float((lg[:, -1].argmax(-1) == ps.answer_ids).float().mean()), float(ps.metric()(lg).mean())


@pytest.mark.parametrize("mlps", [[0, 1], []])  # the combined test (heads + MLPs) and the heads-only one
def test_ablation_test_random_sets_and_p_values(planted_set, mlps):
    hm, ps = planted_set
    n = 12
    out = ablation_test(hm, ps, ["1.2"], mlps, n, random.Random(3), batch_size=5)
    sets = out["random_sets"]
    assert len(sets) == n and out["n_random"] == n and out["n_prompts"] == len(ps)
    all_heads = {f"{L}.{h}" for L in range(hm.cfg.n_layers) for h in range(hm.cfg.n_heads)}
    for r in sets:  # as many heads (heads only) and as many MLPs as the tested set, no repeats
        assert len(r["heads"]) == 1 and set(r["heads"]) <= all_heads
        assert len(set(r["mlps"])) == len(mlps) and set(r["mlps"]) <= set(range(hm.cfg.n_layers))
    # every number against the ablation module's mean ablation
    assert (out["accuracy"], out["metric"]) == pytest.approx(_reference(hm, ps, [], []), abs=1e-4)
    assert out["accuracy"] == 1.0  # the competence filter kept only prompts the model gets right
    ref = _reference(hm, ps, ["1.2"], mlps)
    assert (out["accuracy_shared_ablated"], out["metric_shared_ablated"]) == pytest.approx(ref, abs=1e-4)
    for r, a, m in zip(sets, out["accuracy_random_ablated"], out["metric_random_ablated"]):
        assert (a, m) == pytest.approx(_reference(hm, ps, r["heads"], r["mlps"]), abs=1e-4)
    # planted: only the successor head matters (the MLPs write nothing), so a random set's drop is as
    # large as the planted head's exactly when it holds that head
    assert out["accuracy_shared_ablated"] < 0.5
    hits = sum("1.2" in r["heads"] for r in sets)
    assert out["p_value_accuracy"] == (1 + hits) / (1 + n)
    drop = out["metric"] - out["metric_shared_ablated"]
    assert out["p_value_metric"] == (
        1 + sum(out["metric"] - m >= drop for m in out["metric_random_ablated"])
    ) / (1 + n)
    assert ablation_test(hm, ps, ["1.2"], mlps, 0, random.Random(3))["p_value_accuracy"] is None


def test_ablation_test_same_rng_same_sets(planted_set):
    hm, ps = planted_set
    a = ablation_test(hm, ps, ["1.2", "2.0"], [1], 4, random.Random(7))
    b = ablation_test(hm, ps, ["1.2", "2.0"], [1], 4, random.Random(7))
    assert a["random_sets"] == b["random_sets"] and a == b
    assert all(len(set(r["heads"])) == 2 for r in a["random_sets"])
