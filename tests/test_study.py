"""The study report: means, spreads and paired intervals against numbers by hand."""

import csv
import json
import math
import os
import pathlib

import pytest

from ardir_tf import study

# Worst-case accuracy of two methods on seeds 0, 1, 2.
ARD = [0.70, 0.72, 0.71]
ARDIR = [0.73, 0.72, 0.75]
# The two-sided 95% quantile of Student's t with 2 degrees of freedom (tables).
T_975_2 = 4.302652729911275


def rows():
    out = []
    for method, worst in (("ard", ARD), ("ardir", ARDIR)):
        for seed, w in enumerate(worst):
            out.append({"method": method, "seed": seed, "clean_accuracy": 0.98 + 0.005 * seed,
                        "worst_case_accuracy": w,
                        "robust_accuracy": {"pgd20": w + 0.02, "square": w + 0.01},
                        "seconds_per_epoch": 1.5})
    return out


def test_paired_difference_is_the_paired_t_interval_by_hand():
    diffs = [a - b for a, b in zip(ARDIR, ARD)]  # 0.03, 0.00, 0.04
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = T_975_2 * std / math.sqrt(3)
    got = study.paired_difference(ARDIR, ARD)
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(mean, abs=1e-12)  # 0.023333
    assert got["std"] == pytest.approx(std, abs=1e-12)  # 0.020817
    assert (got["low"], got["high"]) == pytest.approx((mean - half, mean + half), abs=1e-9)
    assert got["low"] == pytest.approx(-0.02838, abs=1e-5)  # contains 0
    assert study.t_quantile(0.95, 2) == pytest.approx(T_975_2, abs=1e-9)
    # Pairing is what makes a shared seed effect cancel: a constant offset has
    # no spread, unpaired it would be buried in the seeds' own spread.
    offset = study.paired_difference([v + 0.01 for v in ARD], ARD)
    assert offset["std"] == pytest.approx(0, abs=1e-12)
    assert offset["low"] == pytest.approx(0.01) and offset["high"] == pytest.approx(0.01)
    one = study.paired_difference([0.5], [0.4])
    assert one["mean"] == pytest.approx(0.1) and one["low"] is None
    with pytest.raises(ValueError, match="equal-length"):
        study.paired_difference([1, 2], [1])


def test_summarize_and_the_table():
    summary = study.summarize(rows(), reference="ard")
    ardir = summary["methods"]["ardir"]
    assert ardir["n"] == 3 and ardir["seeds"] == [0, 1, 2]
    mean = sum(ARDIR) / 3
    assert ardir["mean"]["worst_case_accuracy"] == pytest.approx(mean)
    assert ardir["std"]["worst_case_accuracy"] == pytest.approx(
        math.sqrt(sum((v - mean) ** 2 for v in ARDIR) / 2))
    assert ardir["mean"]["clean_accuracy"] == pytest.approx(0.985)
    assert set(summary["paired"]) == {"ardir"}
    assert summary["paired"]["ardir"]["mean"] == pytest.approx(0.0233333, abs=1e-6)
    table = study.format_table(summary)
    line = next(l for l in table.splitlines() if l.startswith("ardir"))
    assert "0.7333 +- 0.0153" in line and "+0.0233 [-0.0284, +0.0750] contains 0" in line
    assert "sanity checks failed" not in table
    flagged = rows()
    flagged[4]["reliable"] = False  # ardir, seed 1
    summary_flagged = study.summarize(flagged)
    assert summary_flagged["methods"]["ardir"]["unreliable"] == 1
    assert summary_flagged["methods"]["ardir"]["unverified"] == 1
    flagged_table = study.format_table(summary_flagged)
    # Marked in the worst-case column itself, with the legend under the table.
    line = next(l for l in flagged_table.splitlines() if l.startswith("ardir"))
    assert "0.7333 +- 0.0153 !" in line
    assert "! ardir: a sanity check failed on 1 of 3 seeds and nothing verified it: an " \
        "UPPER BOUND" in flagged_table
    assert "!" not in next(l for l in flagged_table.splitlines() if l.startswith("ard "))
    flagged[4]["verified"] = True  # the standard attacks ran on what was left standing
    verified = study.summarize(flagged)
    assert verified["methods"]["ardir"]["unverified"] == 0
    verified_table = study.format_table(verified)
    assert "0.7333 +- 0.0153 *" in verified_table
    assert "* ardir: a sanity check failed on 1 of 3 seeds: the gradient attacks were " \
        "fooled there" in verified_table and "UPPER BOUND" not in verified_table
    assert "reference" in next(l for l in table.splitlines() if l.startswith("ard "))
    # A method whose seeds the reference lacks is paired on the common ones.
    extra = rows() + [{"method": "ardir", "seed": 7, "clean_accuracy": 0.9,
                       "worst_case_accuracy": 0.9}]
    assert study.summarize(extra)["paired"]["ardir"]["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match="reference method 'trades' has no rows"):
        study.summarize(rows(), reference="trades")
    with pytest.raises(ValueError, match="two rows for method 'ard' seed 0"):
        study.summarize(rows() + rows()[:1])
    with pytest.raises(ValueError, match="needs worst_case_accuracy"):
        study.summarize([{"method": "ard", "seed": 0, "clean_accuracy": 1.0}])


def test_the_files(tmp_path):
    summary = study.summarize(rows())
    csv_path = study.write_csv(rows(), tmp_path / "study.csv")
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["method", "seed", "clean_accuracy", "pgd20", "square",
                              "worst_case_accuracy", "seconds_per_epoch", "reliable",
                              "verified"]
    assert len(table) == 6 and float(table[3]["worst_case_accuracy"]) == ARDIR[0]
    saved = json.loads(study.write_json(rows(), summary, tmp_path / "study.json").read_text())
    assert saved["summary"]["paired"]["ardir"]["n"] == 3 and len(saved["rows"]) == 6
    png = study.plot(summary, tmp_path / "study.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_method_names_and_their_knobs():
    m = study.parse_method("ardir@ir_weight=0.5@layers=stage1:stage1+stage2:stage2")
    assert (m.base, m.kwargs) == ("ardir", {"ir_weight": 0.5, "layers": (
        ("stage1", "stage1"), ("stage2", "stage2"))})
    assert study.parse_method("ard@alpha=5/6").kwargs == {"alpha": pytest.approx(5 / 6)}
    assert study.parse_method("trades@beta=3").kwargs == {"beta": 3.0}
    assert study.parse_method("pgd_at") == study.Method("pgd_at", "pgd_at", ())
    assert study.parse_method("ard@bn_statistics=both@kd_teacher_input=adv").kwargs == {
        "bn_statistics": "both", "kd_teacher_input": "adv"}
    assert study.parse_method("trades@bn_statistics=both").kwargs == {"bn_statistics": "both"}
    assert "/" not in m.slug and ":" not in m.slug
    variants = {"half": "ardir@ir_weight=0.5",
                "mse": {"method": "ardir", "distance": "mse", "ir_teacher_input": "both"}}
    assert study.parse_method("half", variants) == study.Method(
        "half", "ardir", (("ir_weight", 0.5),))
    assert study.parse_method("mse", variants).kwargs == {"distance": "mse",
                                                         "ir_teacher_input": "both"}
    for text, message in [("kd", "unknown method 'kd'"),
                          ("ard@ir_weight=1", "ir_weight is a knob of ardir, not of ard"),
                          ("ardir@weight=1", "unknown knob 'weight'"),
                          ("ardir@ir_weight", "knobs are written @name=value"),
                          ("ardir@distance=l1", "distance: expected one of normalized_mse"),
                          ("ardir@alpha=2", r"alpha: expected a number in \[0, 1\]"),
                          ("ardir@layers=stage1", "student_layer:teacher_layer pairs"),
                          ("rslad@attack_objective=ardir", "needs the ardir method"),
                          ("pgd_at@bn_statistics=both", "a knob of ard, rslad, ardir, trades"),
                          ("ard@bn_statistics=clean", "expected one of split, adv, both"),
                          ("rslad@kd_teacher_input=adv", "a knob of ard, ardir, not of rslad"),
                          ("ardir@attack_objective=ardir@kd_teacher_input=adv",
                           "needs kd_teacher_input=clean")]:
        with pytest.raises(study.StudyError, match=message):
            study.parse_method(text)


def test_variants_files(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"half": "ardir@ir_weight=0.5"}))
    assert study.load_variants(path) == {"half": "ardir@ir_weight=0.5"}
    for content, message in [("[1]", "must hold an object"), ("{", "not valid JSON"),
                             ('{"ard": "ardir"}', "must not contain @ or , nor be a base"),
                             ('{"x": {"distance": "mse"}}', 'an object {"method"'),
                             ('{"x": "ardir@ir_weight=-1"}', "expected a number >= 0")]:
        path.write_text(content)
        with pytest.raises(study.StudyError, match=message):
            study.load_variants(path)
    with pytest.raises(study.StudyError, match="cannot read"):
        study.load_variants(tmp_path / "missing.json")


class FakeCells:
    """train and evaluate for study.run without TensorFlow: a cell's "model" is
    a file, its report a number derived from method and seed."""

    def __init__(self):
        self.trained, self.evaluated = [], []

    def train(self, method, seed, workdir):
        model = pathlib.Path(workdir.root) / "student.keras"
        if not model.exists():  # as main.py's phase: a finished model is reused
            self.trained.append((method.name, seed))
            model.write_text(f"{method.name} {seed}")
        return (method.name, seed)

    def evaluate(self, model, resume_dir):
        self.evaluated.append(model)
        self.resume_dirs = getattr(self, "resume_dirs", []) + [resume_dir]
        os.makedirs(resume_dir, exist_ok=True)  # as evaluate() does with its steps
        worst = 0.5 + 0.1 * model[1] + (0.05 if model[0] == "ardir" else 0)
        return {"clean_accuracy": 0.9, "worst_case_accuracy": worst,
                "robust_accuracy": {"pgd20": worst + 0.01, "apgd_ce": worst},
                "attack_order": ["pgd20", "apgd_ce"]}


def test_the_grid_runs_each_cell_once_and_reevaluates_on_a_new_evaluation(tmp_path):
    methods = [study.parse_method("ard"), study.parse_method("ardir")]
    cells = FakeCells()

    def run(evaluation, seeds=(0, 1), settings=lambda m, s: {"method": m.name, "seed": s}):
        return study.run(tmp_path, methods, list(seeds), settings=settings,
                         train=cells.train, evaluate=cells.evaluate, epochs=3,
                         evaluation=evaluation)

    rows = run({"attacks": ["fast"]})
    assert cells.trained == [("ard", 0), ("ardir", 0), ("ard", 1), ("ardir", 1)]  # seed-major
    # Each evaluation had its cell's directory for its finished steps, removed
    # once its report was written.
    assert cells.resume_dirs[0] == str(tmp_path / "cells" / "ard-seed0" / study.PARTIAL)
    assert not any(os.path.exists(d) for d in cells.resume_dirs)
    assert [(r["method"], r["seed"], r["worst_case_accuracy"]) for r in rows] == [
        ("ard", 0, 0.5), ("ardir", 0, 0.55), ("ard", 1, 0.6), ("ardir", 1, 0.65)]
    assert list(rows[0]["robust_accuracy"]) == ["pgd20", "apgd_ce"]  # the attacks' order
    assert rows[0]["seconds_per_epoch"] is not None
    # The finished cells read back from the directory alone, in seed order.
    assert study.finished_rows(tmp_path) == rows
    cells.trained.clear(), cells.evaluated.clear()
    assert run({"attacks": ["fast"]}) == rows and not cells.trained and not cells.evaluated
    # A third seed trains only its own cells.
    run({"attacks": ["fast"]}, seeds=(0, 1, 2))
    assert cells.trained == [("ard", 2), ("ardir", 2)]
    # Another evaluation evaluates every cell again and trains none.
    cells.trained.clear(), cells.evaluated.clear()
    run({"attacks": ["fast", "standard"]}, seeds=(0, 1, 2))
    assert len(cells.evaluated) == 6 and not cells.trained
    # A cell evaluated otherwise than the rest (as when a re-evaluation stopped
    # half-way) is not mixed into the rows read back.
    cell = tmp_path / "cells" / "ard-seed1" / study.CELL
    cell.write_text(cell.read_text().replace('"standard"', '"fast"'))
    with pytest.raises(study.StudyError, match="evaluated in 2 ways"):
        study.finished_rows(tmp_path)
    assert study.evaluations(tmp_path) == [({"attacks": ["fast", "standard"]}, 5),
                                           ({"attacks": ["fast", "fast"]}, 1)]
    kept = study.finished_rows(tmp_path, {"attacks": ["fast", "standard"]})
    assert [(r["method"], r["seed"]) for r in kept] == [
        ("ard", 0), ("ardir", 0), ("ardir", 1), ("ard", 2), ("ardir", 2)]
    # A cell directory holding another run's settings is refused.
    with pytest.raises(study.StudyError, match="ard seed 0 trained with other settings "
                                               r"\(lr differ\)"):
        run({"attacks": ["fast"]}, settings=lambda m, s: {"method": m.name, "seed": s, "lr": 1})
    summary = study.write_report(tmp_path, rows)
    assert summary["paired"]["ardir"]["mean"] == pytest.approx(0.05)
    assert (tmp_path / "study.csv").read_text().splitlines()[0] == \
        "method,seed,clean_accuracy,pgd20,apgd_ce,worst_case_accuracy,seconds_per_epoch,reliable," \
        "verified"


def test_a_cell_that_starts_says_how_long_the_rest_will_take(tmp_path):
    """From the finished cells' recorded training and evaluation seconds (each
    evaluation reports 10 minutes; the training times are set to 20 minutes),
    over the cells that will run: not the finished ones further on."""
    methods = [study.parse_method("ard"), study.parse_method("ardir")]
    cells = FakeCells()

    def evaluate(model, resume_dir):
        return dict(cells.evaluate(model, resume_dir), seconds=600.0)

    def run(seeds, log):
        study.run(tmp_path, methods, list(seeds), settings=lambda m, s: {"m": m.name, "s": s},
                  train=cells.train, evaluate=evaluate, epochs=3,
                  evaluation={"attacks": ["fast"]}, log=log)

    first = []
    run((0, 2), first.append)
    assert first[0] == f"cell 1 of 4 (ard, seed 0): 3 more after it, in " \
                       f"{tmp_path / 'cells' / 'ard-seed0'}"  # nothing to go by yet
    for cell in (tmp_path / "cells").iterdir():
        timing = json.loads((cell / study.CELL).read_text())
        (cell / study.CELL).write_text(json.dumps(dict(timing, seconds=1200.0)))
    later = []
    run((0, 1, 2), later.append)  # seed 2's cells are finished: two cells to go
    assert later[4] == f"cell 3 of 6 (ard, seed 1): 3 more after it, in " \
        f"{tmp_path / 'cells' / 'ard-seed1'}; about 1 h 00 min left (median of 4 finished " \
        "cells: 20 min training, 10 min evaluation)", later
    # A trained cell still to be evaluated costs only its evaluation.
    assert study._time_left([(1200, 600)] * 3, [True, False, False]).startswith(
        "; about 1 h 10 min left")
    assert study._time_left([], [False]) == ""


def test_a_resumed_cells_seconds_count_its_killed_processes_work(tmp_path):
    """cell.json times only the epochs of processes that finished them, and a
    report's "seconds" only its last process; the attacks' seconds include
    the batches a killed process kept. cell_seconds gives the whole."""
    from ardir_tf.workdir import Workdir
    cell = Workdir(str(tmp_path))
    cell.write_json(Workdir.SETTINGS, {"epochs": 10})
    cell.write_json(study.CELL, {"seconds": 120.0, "epochs": 2, "evaluation": {}})
    cell.write_json("metrics.json", {"student": {"seconds": 300.0, "attack_seconds": {
        "apgd_t": 600.0, "square": 700.0}}})
    assert study.cell_seconds(cell) == (600.0, 1300.0)  # 60 s an epoch x 10; 600 + 700
    cell.write_json(study.CELL, {"seconds": 600.0, "epochs": 10})  # never killed
    cell.write_json("metrics.json", {"student": {"seconds": 1400.0, "attack_seconds": {
        "apgd_t": 600.0, "square": 700.0}}})  # the sanity checks' time beside the attacks'
    assert study.cell_seconds(cell) == (600.0, 1400.0)


def test_a_committed_study_reads_back_as_its_report():
    """docs/studies/mnist-width8: cells written before cell.json named their
    method, read through the cells' flags.json, give the rows of its study.json."""
    root = pathlib.Path(__file__).resolve().parent.parent / "docs" / "studies" / "mnist-width8"
    saved = json.loads((root / "study.json").read_text())["rows"]
    key = lambda r: (r["seed"], r["method"])  # noqa: E731
    assert study.finished_rows(root) == sorted(saved, key=key)


def test_the_study_tables_script_prints_the_committed_studys_summary(monkeypatch, capsys):
    import runpy
    root = pathlib.Path(__file__).resolve().parent.parent
    study_dir = root / "docs" / "studies" / "mnist-width8"
    monkeypatch.setattr("sys.argv", ["study_tables.py", f"--study={study_dir}",
                                     "--methods=pgd_at,ard,ardir", "--reference=ard"])
    runpy.run_path(str(root / "tests" / "benchmarks" / "study_tables.py"), run_name="__main__")
    out = capsys.readouterr().out
    saved = json.loads((study_dir / "study.json").read_text())["summary"]  # reference ard
    p = saved["paired"]["ardir"]
    assert f"| `ardir` | 5 | " in out and \
        f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] contains 0 |" in out, out
    assert "| `ard`, seed 3 | 0.963 | 0.802 | 0.786 | 0.743 | 0.0% (0 of 362) | 0.732 |" in out


def test_a_study_run_without_an_evaluation_name_reads_back(tmp_path):
    """run(evaluation=None), the library's default, records it as null."""
    cells = FakeCells()
    rows = study.run(tmp_path, [study.parse_method("ard")], [0, 1],
                     settings=lambda m, s: {"m": m.name, "s": s}, train=cells.train,
                     evaluate=cells.evaluate, epochs=3)
    assert study.finished_rows(tmp_path) == rows and len(rows) == 2
