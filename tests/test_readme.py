"""The README's code runs as written (and the tutorial shows the same code), and
its test command is what CI runs."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TUTORIAL = (ROOT / "docs" / "tutorial.md").read_text()
MODEL_FIT = "## From your code: `model.fit`"


def python_block(heading, text=README):
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_tutorial_shows_the_readme_snippet_that_runs():
    """The tutorial's model.fit code is the README's, which the next test runs."""
    assert python_block("## Use it from your code", TUTORIAL) == python_block(MODEL_FIT)


@pytest.mark.slow
def test_use_it_from_your_code_snippet_runs(tmp_path):
    code = python_block(MODEL_FIT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "teacher.keras").exists() and (tmp_path / "student.keras").exists()
    # The snippet prints the student's robust accuracy last; it must be real robustness.
    numbers = re.findall(r"pgd_accuracy': ([0-9.]+)", run.stdout)
    assert numbers, run.stdout[-2000:]
    assert float(numbers[-1]) > 0.5, run.stdout[-2000:]
    # Then the evaluation report's table, whose worst case is no higher than PGD-20.
    row = next(line for line in run.stdout.splitlines() if line.startswith("student "))
    clean, fgsm, pgd20, cw, worst = map(float, row.split()[1:6])
    assert "worst class" in run.stdout and worst <= min(fgsm, pgd20, cw) and pgd20 > 0.5


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```sh\n(pip install -r requirements.txt && python -m pytest[^\n]*)\n",
                        README).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_repository_stands_alone():
    """Code, tests and docs cite nothing outside the repository: a user's clone
    has none of the team's shared folder, design or notes files beside it."""
    # Spelled in pieces, so that this file does not match itself.
    outside = re.compile("|".join([r"\.\./" + "shared", "DESIGN" + r"\.md",
                                   "KERAS3" + "_NOTES", "CONVENTIONS" + r"\.md"]))
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = files.stdout.split() if files.returncode == 0 else [
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    checked = [n for n in names if n.endswith((".py", ".md", ".cfg", ".txt", ".ini"))
               and not n.startswith("tests/benchmarks/")]
    assert "README.md" in checked and "ardir_tf/losses.py" in checked
    hits = [n for n in checked if outside.search((ROOT / n).read_text(errors="replace"))]
    assert not hits, hits
    assert (ROOT / "docs" / "objective.md").is_file()
    assert "docs/objective.md" in README


def test_the_docs_say_what_a_keras_user_must_know():
    """The README, the objective's definition and the distiller's docstring say
    which way alpha and a layer tuple go (both differ from Keras' Distiller), and
    that the objective is our reading of the paper's abstract."""
    sys.path.insert(0, str(ROOT))
    import ardir_tf
    readme = " ".join(README.split())
    assert "Only the paper's abstract is available to us" in readme
    assert "student first, the reverse of Keras'" in readme
    docs = " ".join((ROOT / "docs" / "objective.md").read_text().split())
    assert "Only the paper's abstract is available to us" in docs
    assert "our reading of the" in docs and "student first, the reverse of Keras'" in docs
    for text in (docs, ardir_tf.ARDIRDistiller.__doc__):
        flat = " ".join(text.split())
        assert "student_loss_weight = 1 - alpha" in flat or \
            "`student_loss_weight` (keras-io's `alpha`) is our `1 - alpha`" in flat
    distiller_doc = " ".join(ardir_tf.ARDIRDistiller.__doc__.split())
    assert "(student_layer, teacher_layer), the reverse of Keras'" in distiller_doc
