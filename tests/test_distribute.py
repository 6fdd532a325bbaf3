"""ardir_tf.distribute, and main.py on 1 device, 2 logical devices and 2 workers.

The equality runs go through main.py as a user would: the same seeded ARDIR
student (random start off, SGD, a fixed teacher) on one device, mirrored over
two logical CPU devices, and on a two-worker MultiWorkerMirroredStrategy
cluster on 127.0.0.1 started by --num_workers=2.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import ardir_tf
from ardir_tf import distribute
from conftest import ROOT, write_npz

# End to end (subprocesses of main.py, whole runs): outside the inner loop.
pytestmark = pytest.mark.slow


def test_strategy_kinds_and_their_errors(monkeypatch):
    assert distribute.strategy("default").num_replicas_in_sync == 1
    assert distribute.strategy("auto").num_replicas_in_sync == 1  # no GPU here
    mirrored = distribute.strategy("auto", devices=2)  # conftest split the CPU in two
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2
    assert distribute.strategy("mirrored", devices=2).num_replicas_in_sync == 2
    with pytest.raises(ValueError, match="unknown strategy 'tpu'"):
        distribute.strategy("tpu")
    with pytest.raises(ValueError, match="runs on one device"):
        distribute.strategy("default", devices=2)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG.*--num_workers"):
        distribute.strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ValueError, match="TF_CONFIG is not a cluster spec"):
        distribute.tf_config()
    assert distribute.is_chief(mirrored)


def test_a_machine_with_gpus_never_splits_its_cpu(monkeypatch):
    """One GPU and devices=2: an error, not two logical CPU devices (a silent
    CPU run). TensorFlow is made to see one GPU; the check comes before any
    device is touched."""
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: (
        [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")] if kind == "GPU"
        else real(kind)))
    for kind in ("auto", "mirrored"):
        with pytest.raises(ValueError, match="devices=2, but this machine has 1 GPU.*"
                                             "mirrored_cpu"):
            distribute.strategy(kind, devices=2)
    # Asked for by name, the CPU is split all the same (conftest split it in two).
    cpus = distribute.strategy("mirrored_cpu", devices=2)
    assert cpus.num_replicas_in_sync == 2 and distribute.on_logical_cpus(cpus)


def test_xla_is_refused_exactly_on_logical_cpu_devices():
    assert distribute.on_logical_cpus(distribute.strategy("mirrored", devices=2))
    assert not distribute.on_logical_cpus(distribute.strategy("default"))


def test_free_ports_are_distinct_and_bindable():
    import socket
    ports = distribute.free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


# --- the same run on 1 device, 2 devices, 2 workers ---------------------------

def main_py(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A user's small npz data set (3 classes) whose size the batch does not
    divide (221 = 3 x 64 + 29: the last batch splits 15/14 over two replicas),
    and a fixed teacher (untrained: random data need no skill, so its
    pre-training accuracy check is off)."""
    root = tmp_path_factory.mktemp("scale")
    dataset = write_npz(root / "data.npz", n_train=221, n_test=24, size=8, classes=3)
    keras.utils.set_random_seed(1)
    ardir_tf.models.build("small_cnn", (8, 8, 1), 3, width=8).save(root / "teacher.keras")
    common = ["--flagfile=flags/smoke.cfg", f"--dataset={dataset}",
              f"--teacher={root / 'teacher.keras'}", "--nocheck_teacher",
              "--natural_epochs=1", "--epochs=2",
              "--random_start=false", "--optimizer=sgd", "--lr=0.05", "--batch_size=64",
              "--seed=3"]
    return root, common


@pytest.fixture(scope="session")
def runs(setup):
    root, common = setup
    out = {}
    for name, extra in (("one", ["--strategy=default"]),
                        ("mirrored", ["--strategy=mirrored", "--devices=2"]),
                        ("workers", ["--strategy=multi_worker", "--num_workers=2"])):
        proc = main_py(*common, *extra, f"--workdir={root / name}")
        assert proc.returncode == 0, name + proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = (root / name, proc)
    return out


def student_weights(workdir):
    return keras.models.load_model(workdir / "student.keras").get_weights()


def test_one_device_two_devices_and_two_workers_train_the_same_models(runs):
    """The natural baseline and the ARDIR student, on a data set whose last batch
    the replicas split unevenly."""
    one = student_weights(runs["one"][0])
    losses = [float(r.split(",")[3]) for r in (runs["one"][0] / "history.csv").read_text()
              .splitlines() if r.startswith("student,") and ",loss," in r]
    assert len(losses) == 2 and losses[1] != losses[0]  # it trained
    # The all-reduce sums in another order than one device: differences of about
    # 1e-6. Dividing the uneven last batch by the local size x 2 instead (no
    # global batch size) was measured to move them by 5.7e-4.
    natural = keras.models.load_model(runs["one"][0] / "natural.keras").get_weights()
    for name in ("mirrored", "workers"):
        for a, b in zip(one, student_weights(runs[name][0]), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=name)
        other = keras.models.load_model(runs[name][0] / "natural.keras").get_weights()
        for a, b in zip(natural, other, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"natural, {name}")
    metrics = {n: json.loads((w / "metrics.json").read_text())["student"]
               for n, (w, _) in runs.items()}
    # The npz's own test set (24 examples) and classes (3), through main.py.
    assert metrics["one"]["n_examples"] == 24 and set(metrics["one"]["per_class"]) == {
        "0", "1", "2"}
    for name in ("mirrored", "workers"):
        assert metrics[name]["clean_accuracy"] == metrics["one"]["clean_accuracy"]
        assert metrics[name]["robust_accuracy"] == metrics["one"]["robust_accuracy"]


def test_the_cluster_writes_through_the_chief_only(runs):
    workdir, proc = runs["workers"]
    assert "2 replica(s)" in proc.stdout and "worker 1: pid" in proc.stdout
    assert sorted(os.listdir(workdir / "workers")) == [
        "worker-0.log", "worker-0.pid", "worker-1.log", "worker-1.pid"]
    assert "[student] saved" in (workdir / "workers/worker-0.log").read_text()
    assert "[student] saved" not in (workdir / "workers/worker-1.log").read_text()
    assert (workdir / "student.keras").exists() and (workdir / "metrics.json").exists()
    history = (workdir / "history.csv").read_text().splitlines()
    assert len([r for r in history if r.startswith("student,2,loss,")]) == 1  # one writer


def test_a_killed_worker_stops_the_cluster_and_the_same_command_resumes(setup):
    root, common = setup
    workdir = root / "killed"
    args = [*common, "--natural_epochs=0", "--epochs=3", "--strategy=multi_worker",
            "--num_workers=2",
            f"--workdir={workdir}"]
    launcher = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    backup = workdir / "backup/student/epoch-0001"
    deadline = time.time() + 300
    while not backup.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert backup.exists(), launcher.communicate()
    log = workdir / "workers/worker-1.log"
    os.kill(int((workdir / "workers/worker-1.pid").read_text()), signal.SIGKILL)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0, out
    assert "worker 1 exited with status -9" in out and "run the same command again" in err
    assert log.exists()

    resumed = main_py(*args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    done = re.search(r"\[student\] resuming after epoch (\d) of 3", resumed.stdout)
    assert done and int(done.group(1)) >= 1, resumed.stdout[-3000:]
    assert (workdir / "student.keras").exists()
