"""The command line's flag definitions: their choices are the library's, and
defining them (so --help) imports no TensorFlow."""

import json
import subprocess
import sys

import pytest

import ardir_tf
from ardir_tf import adversarial, data, distill, distribute, evaluate, losses, models
from ardir_tf import teachers, training
from conftest import ROOT
from export import artifacts
from flags import choices


@pytest.mark.parametrize("copy, table", [
    (choices.ARCHS, models.BUILDERS),
    (choices.DATASETS, data.NAMES),
    (choices.STRATEGIES, distribute.KINDS),
    (choices.TEACHER_LAYOUTS, teachers.LAYOUTS),
    (choices.TEACHER_OUTPUTS, teachers.OUTPUTS),
    (choices.METHODS, distill.METHODS),
    (choices.TEACHER_METHODS, [m for m in adversarial.METHODS if m != "natural"]),
    (choices.DISTANCES, losses.DISTANCES),
    (choices.IR_TEACHER_INPUTS, losses.IR_TEACHER_INPUTS),
    (choices.IR_STUDENT_INPUTS, losses.IR_STUDENT_INPUTS),
    (choices.KD_TEACHER_INPUTS, distill.KD_TEACHER_INPUTS),
    (choices.ATTACK_OBJECTIVES, distill.ATTACK_OBJECTIVES),
    (choices.OPTIMIZERS, training.OPTIMIZERS),
    (choices.SCHEDULES, training.SCHEDULES),
    (choices.ATTACK_SUITES, evaluate.SUITES),
], ids=lambda v: None)
def test_the_flags_choices_are_the_librarys(copy, table):
    assert list(copy) == list(table)


def test_the_default_opset_is_one_the_installed_tf2onnx_writes():
    """The --opset validator takes the default without importing tf2onnx."""
    assert (choices.DEFAULT_OPSET, choices.MIN_OPSET) == (artifacts.DEFAULT_OPSET,
                                                           artifacts.MIN_OPSET)
    assert choices.MIN_OPSET <= choices.DEFAULT_OPSET <= artifacts.max_opset()


def test_the_dataset_check_agrees_with_the_librarys(tmp_path):
    import flags
    npz = tmp_path / "mine.npz"
    npz.write_bytes(b"")
    for name in [*choices.DATASETS[:-1], f"npz:{npz}", f"npz:{tmp_path}/none.npz",
                 "imagenet", "npz:", "MNIST"]:
        try:
            data.check_name(name)
            loads = True
        except ardir_tf.data.DataError:
            loads = False
        assert flags._valid_dataset(name) == loads, name


@pytest.mark.parametrize("asks", ["--help", "--helpfull"])
def test_help_lists_every_flag_without_importing_tensorflow(asks):
    code = ("import runpy, sys\n"
            f"sys.argv = ['main.py', {asks!r}]\n"
            "try:\n"
            "    runpy.run_path('main.py', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('IMPORTED', sorted({'tensorflow', 'keras', 'tf2onnx'} & set(sys.modules)))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert "IMPORTED []" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    for flag in ("--mode", "--method", "--teacher_arch", "--ir_teacher_input", "--opset",
                 "--port", "--study_methods"):
        assert f"{flag}:" in run.stdout, flag
    assert "ardir_tf from the command line" in run.stdout


def test_what_counts_as_asking_for_help():
    """main.asks_for_help, in a process that imports main.py without TensorFlow."""
    cases = {"--help": True, "-help": True, "--helpfull=true": True, "-?": True,
             "--helpshort=1": True, "--helpxml": True, "--help=false": False,
             "--mode=distill": False, "--model_name=--help": False}
    code = ("import json, sys\n"
            "sys.argv = ['main.py', '--help']\n"
            "import main\n"
            f"cases = {list(cases)!r}\n"
            "out = {c: main.asks_for_help(['main.py', '--seed=1', c]) for c in cases}\n"
            "out['after --'] = main.asks_for_help(['main.py', '--', '--help'])\n"
            "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert json.loads(run.stdout.splitlines()[-1]) == dict(cases, **{"after --": False}), \
        run.stderr[-2000:]
