"""Test set-up: quiet TensorFlow, two logical CPU devices, shared trained models.

The CPU is split into two logical devices before TensorFlow starts, so that
MirroredStrategy tests run on this machine; everything else uses CPU:0 as usual.

`trained` holds the models of a default run (`python main.py --mode=distill`),
committed in tests/data/digits_run/ (made by tests/data/make_digits_run.py), so
that the tests of attacks, evaluation and export start from real robust models
without training them first. tests/test_robustness.py runs that command itself,
end to end.
"""

import os
import pathlib
import re
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _share_the_cores(environ, cores, workers):
    """Each of pytest-xdist's `workers` (and every main.py it starts, which
    inherits the environment) gets its share of the `cores` as TensorFlow
    intra-op threads, unless TF_NUM_INTRAOP_THREADS is set already: two workers
    whose ops each start one thread per core on two cores spend the difference
    switching between them (the whole suite on 2 cores: 5m45s with one thread
    each, 6m06s without, docs/development.md). Numbers may differ in the last
    bits between thread counts; no test compares across processes with
    different counts."""
    if workers > 1:
        environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, cores // workers)))


_share_the_cores(os.environ, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count(),
                 int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))

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


# A default run's workdir as the command left it (flags.json, metrics.json,
# history.csv and the three models).
DIGITS_RUN = ROOT / "tests" / "data" / "digits_run"


@pytest.fixture(scope="session")
def trained():
    out = {name: keras.models.load_model(DIGITS_RUN / f"{name}.keras")
           for name in ("natural", "teacher", "student")}
    out["attack"] = ardir_tf.attacks.PGD(**DIGITS_ATTACK)
    return out


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the two logical CPUs, shared by every test of a
    process: a second MirroredStrategy over the same devices in one process
    reuses the first one's collective instance keys, and its all-reduces then
    fail with "Shape mismatch in the collective instance" (TF 2.21; measured:
    two strategies, two distillers, fails; one strategy, the same two, passes)."""
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    assert strategy.num_replicas_in_sync == 2
    return strategy


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


# Run with pytest-xdist (pytest.ini: -n 2 --dist loadgroup): the tests that share
# an expensive fixture go to one worker, so that the fixture is made once; every
# other test goes wherever a worker is free. Those fixtures are session-scoped:
# a worker interleaves modules, and a module-scoped fixture would be torn down
# and made again each time its module came back.
SHARED_FIXTURES = {"digits_run": "digits_run", "bad_runs": "digits_run", "runs": "runs",
                   "served": "server", "onnx_path": "server", "served_file": "server", "ardir_serve": "server",
                   "natural_report": "natural_report", "default_run": "default_run",
                   "exported_run": "exported_run"}


# The longest tests (a minute each, most of it one subprocess), started first so
# that no worker is left with one of them while the other has nothing to do.
LONG_FIRST = ("test_robustness.py", "test_distribute.py", "test_readme.py::test_use_it",
              "test_every_mode_on_mocked_tfds", "test_main.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        groups = [SHARED_FIXTURES[n] for n in getattr(item, "fixturenames", ())
                  if n in SHARED_FIXTURES]
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups[0]))

    def rank(item):
        return next((i for i, key in enumerate(LONG_FIRST) if key in item.nodeid),
                    len(LONG_FIRST))
    items.sort(key=rank)  # stable: the order within each rank stays


# --- a served export (tests/test_server.py, tests/test_protocols.py) ----------

SERVED_SHAPE = (8, 8, 1)
SERVED_MAX_BATCH = 8
SERVED_MAX_BODY = 50_000


@pytest.fixture(scope="session")
def onnx_path(tmp_path_factory, digits):
    """A small untrained CNN exported by artifacts.export, with class names a..j,
    and its INT8 file beside it (student.int8.onnx)."""
    from export import artifacts
    (x_train, y_train), (x_test, y_test) = digits
    model = ardir_tf.models.build("small_cnn", SERVED_SHAPE, 10, width=4)
    directory = tmp_path_factory.mktemp("served") / "export"
    artifacts.export(model, directory, x_test[:32], y_test[:32],
                     attack=ardir_tf.attacks.PGD(**DIGITS_ATTACK), batch_sizes=(32,),
                     card={"class_names": list("abcdefghij")}, quantize=("int8",),
                     calibration=x_train[:64])
    return directory / "student.onnx"


def start_server(command):
    """Starts a server process; returns (process, port, lines printed so far)."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    deadline = time.time() + 120
    port = None
    while port is None and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        port = found and int(found.group(1))
    assert port, "".join(lines) + proc.stderr.read()
    return proc, port, lines


@pytest.fixture(scope="session")
def served(onnx_path):
    """`python main.py --mode=serve` on a free loopback port; yields (process, port)."""
    proc, port, lines = start_server(
        [sys.executable, str(ROOT / "main.py"), "--mode=serve", f"--onnx_path={onnx_path}",
         "--port=0", f"--max_batch={SERVED_MAX_BATCH}",
         f"--max_body_mb={SERVED_MAX_BODY / 2**20}"])
    yield proc, port, lines
    if proc.poll() is None:
        proc.kill()
        proc.wait()
