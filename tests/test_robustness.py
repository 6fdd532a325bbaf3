"""End to end on digits: the default command's teacher and ARDIR student are robust."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ardir_tf import attacks
from conftest import DIGITS_ATTACK, ROOT

# End to end (subprocesses of main.py, whole runs): outside the inner loop.
pytestmark = pytest.mark.slow


def pgd_accuracy(model, x, y):
    fn = lambda z: model(z, training=False)  # noqa: E731
    x_adv = attacks.pgd(fn, x, y, **DIGITS_ATTACK)
    return float(np.mean(np.argmax(fn(x_adv), -1) == y))


def clean_accuracy(model, x, y):
    return float(np.mean(np.argmax(model(x, training=False), -1) == y))


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The product's first door as a newcomer uses it: `python main.py
    --mode=distill` with no other flag (but where to write, and no progress bars).
    Natural baseline, PGD-AT teacher and ARDIR student on digits."""
    workdir = tmp_path_factory.mktemp("default_run")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--mode=distill",
                           f"--workdir={workdir}", "--verbose=0"], cwd=workdir,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


def test_teacher_and_student_beat_a_natural_model_under_pgd(trained, digits):
    _, (x_test, y_test) = digits
    acc = {name: (clean_accuracy(trained[name], x_test, y_test),
                  pgd_accuracy(trained[name], x_test, y_test))
           for name in ("natural", "teacher", "student")}
    print(acc)
    assert acc["natural"][0] > 0.95  # a good model ...
    assert acc["natural"][1] < 0.30  # ... that the attack breaks
    for name in ("teacher", "student"):
        assert acc[name][0] > 0.9, (name, acc)
        assert acc[name][1] > acc["natural"][1] + 0.4, (name, acc)


def test_default_command_prints_and_writes_robust_numbers(default_run):
    workdir, stdout = default_run
    m = json.loads((workdir / "metrics.json").read_text())
    pgd = {name: m[name]["robust_accuracy"]["pgd20"] for name in ("natural", "teacher", "student")}
    assert m["student"]["n_examples"] == 360 and m["student"]["eps"] == 0.15
    assert pgd["natural"] < 0.3
    assert pgd["student"] > pgd["natural"] + 0.4 and pgd["teacher"] > pgd["natural"] + 0.4
    row = next(line for line in stdout.splitlines() if line.startswith("student "))
    assert f"{m['student']['clean_accuracy']:.4f}" in row and f"{pgd['student']:.4f}" in row
