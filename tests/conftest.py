"""Test set-up: quiet TensorFlow, two logical CPU devices, shared trained models.

The CPU is split into two logical devices before TensorFlow starts, so that
MirroredStrategy tests run on this machine; everything else uses CPU:0 as usual.
"""

import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import ardir_tf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The digits threat model: main.py's defaults, quoted in the README.
DIGITS_EPS = 0.15
DIGITS_ATTACK = dict(eps=DIGITS_EPS, step_size=DIGITS_EPS / 4, steps=10)


@pytest.fixture(scope="session")
def digits():
    return ardir_tf.data.digits(seed=0)


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


@pytest.fixture(scope="session")
def trained(default_run):
    workdir, _ = default_run
    out = {name: keras.models.load_model(workdir / f"{name}.keras")
           for name in ("natural", "teacher", "student")}
    out["attack"] = ardir_tf.attacks.PGD(**DIGITS_ATTACK)
    return out


def tiny_pair(teacher_width=8, student_width=4, **build):
    """A small teacher and student on 8x8x1 inputs."""
    teacher = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=teacher_width, **build)
    student = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=student_width, **build)
    return teacher, student


def batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 8, 8, 1), dtype=np.float32),
            rng.integers(0, 10, n).astype(np.int32))


def write_npz(path, n_train=20, n_test=8, size=6, classes=4, **overrides):
    """A user's .npz data set (uint8 images, integer labels); a key set to None
    is left out. Returns the --dataset name, "npz:PATH"."""
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
                  y_train=np.arange(n_train) % classes,
                  x_test=rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
                  y_test=np.arange(n_test) % classes)
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return f"npz:{path}"
