"""export.artifacts and export.parity: the deployed model is the trained function."""

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf

import ardir_tf
from conftest import DIGITS_ATTACK, DIGITS_RUN, ROOT
from export import artifacts, parity

ATTACK = ardir_tf.attacks.PGD(**DIGITS_ATTACK)


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """`python main.py --mode=export` on a copy of a default run's workdir."""
    workdir = tmp_path_factory.mktemp("export_run") / "run"
    shutil.copytree(DIGITS_RUN, workdir)
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--mode=export",
                           f"--workdir={workdir}", "--verbose=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return workdir, proc.stdout


@pytest.mark.slow
def test_main_py_export_writes_the_runs_student_unchanged(exported_run):
    workdir, _ = exported_run
    exported = keras.models.load_model(workdir / "export" / "student.keras")
    original = keras.models.load_model(workdir / "student.keras")
    x = np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(exported(x), original(x), atol=1e-6)


def test_main_py_export_passes_parity_and_writes_a_full_card(exported_run):
    workdir, stdout = exported_run
    card = artifacts.verify(workdir / "export")  # every file there, sha256 as listed
    assert sorted(os.listdir(workdir / "export")) == [
        "model_card.json", "saved_model", "student.keras", "student.onnx", "tf_serving",
        "triton"]
    result = card["parity"]
    assert result["passed"] and result["tolerance"] == 1e-4
    seen = {(c["runtime"], c["inputs"], c["batch_size"]) for c in result["checks"]}
    assert seen == {(r, i, b) for r in ("savedmodel", "onnxruntime")
                    for i in ("clean", "pgd") for b in (1, 64)}
    for check in result["checks"]:
        assert check["max_abs_logit_diff"] < 1e-4 and check["label_agreement"] == 1.0
        assert check["examples"] == (32 if check["batch_size"] == 1 else 256)
    assert "onnxruntime  pgd       64   256" in stdout
    metrics = json.loads((workdir / "metrics.json").read_text())["student"]
    assert card["evaluations"] == [{k: metrics[k] for k in artifacts.EVALUATION_KEYS}]
    assert card["trained_for"] == {"norm": "linf", "eps": 0.15, "method": "ardir",
                                   "student_arch": "small_cnn"}
    assert card["dataset"] == "digits" and card["class_names"] == list("0123456789")
    assert card["input"] == {"name": "images", "dtype": "float32", "shape": [None, 8, 8, 1],
                             "layout": "NHWC", "range": [0.0, 1.0]}
    assert card["onnx"]["opset"] == 17
    opsets = {o.domain: o.version for o in onnx.load(workdir / "export/student.onnx").opset_import}
    assert opsets[""] == 17


def test_plain_onnxruntime_keeps_the_students_labels_on_adversarial_inputs(
        exported_run, trained, digits):
    """What a user who only has onnxruntime gets, on fresh PGD inputs of all 360 digits."""
    workdir, _ = exported_run
    _, (x, y) = digits
    student = trained["student"]
    tf.random.set_seed(123)  # another random start than the export's own checks
    x_adv = ATTACK(lambda z: student(z, training=False), x, y).numpy()
    session = onnxruntime.InferenceSession(str(workdir / "export/student.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].shape[0] != 1  # dynamic batch
    logits, probabilities = session.run(["logits", "probabilities"], {"images": x_adv})
    want = student.predict(x_adv, verbose=0)
    np.testing.assert_array_equal(logits.argmax(1), want.argmax(1))
    np.testing.assert_allclose(logits, want, atol=1e-4)
    np.testing.assert_allclose(probabilities, tf.nn.softmax(want).numpy(), atol=1e-5)
    # The check has teeth: the attack changed many of the student's answers.
    assert np.mean(want.argmax(1) != student.predict(x, verbose=0).argmax(1)) > 0.1


def test_reloaded_savedmodel_and_keras_file_predict_as_before_export(exported_run, trained,
                                                                     digits):
    workdir, _ = exported_run
    _, (x, _) = digits
    before = trained["student"].predict(x, verbose=0)
    saved = tf.saved_model.load(str(workdir / "export/saved_model"))
    out = saved.serve(tf.constant(x))
    np.testing.assert_allclose(out["logits"].numpy(), before, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy(), tf.nn.softmax(before), atol=1e-6)
    signature = saved.signatures["serving_default"]
    assert signature.structured_input_signature[1]["images"].shape.as_list() == [None, 8, 8, 1]
    reloaded = keras.models.load_model(workdir / "export/student.keras")
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), before)


@functools.cache
def triton_model_config_module():
    """Triton's ModelConfig protobuf, from the tritonclient package. Its grpc/__init__
    needs grpcio and protobuf versions of its own; the generated model_config_pb2
    alone loads with the protobuf TensorFlow brings, so it is loaded by its path."""
    package = os.path.dirname(importlib.util.find_spec("tritonclient").origin)
    spec = importlib.util.spec_from_file_location(
        "triton_model_config_pb2", os.path.join(package, "grpc", "model_config_pb2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_triton_repository_matches_the_onnx_file(exported_run):
    from google.protobuf import text_format
    pb = triton_model_config_module()
    workdir, stdout = exported_run
    export = workdir / "export"
    card = artifacts.verify(export)
    model_dir = export / "triton" / "student"
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.name == "student" and config.backend == "onnxruntime"
    assert config.max_batch_size == 256 and config.HasField("dynamic_batching")
    session = onnxruntime.InferenceSession(str(model_dir / "1" / "model.onnx"))
    types = {"tensor(float)": pb.DataType.TYPE_FP32}
    inputs, outputs = session.get_inputs(), session.get_outputs()
    assert [(i.name, list(i.dims), i.data_type) for i in config.input] == \
        [(i.name, i.shape[1:], types[i.type]) for i in inputs]
    assert sorted((o.name, list(o.dims), o.data_type) for o in config.output) == \
        sorted((o.name, o.shape[1:], types[o.type]) for o in outputs)
    assert not isinstance(inputs[0].shape[0], int)  # the batch dim Triton adds is dynamic
    labels = {o.name: o.label_filename for o in config.output}["probabilities"]
    assert (model_dir / labels).read_text().splitlines() == card["class_names"]
    # The same bytes as the export's ONNX file, which passed the parity checks.
    assert card["files"]["triton/student/1/model.onnx"] == card["files"]["student.onnx"]
    assert card["serving"]["triton"]["config"] == "triton/student/config.pbtxt"
    assert f"-v {export}/triton:/models" in stdout and "tritonserver --model-repository" in stdout


def test_the_tf_serving_base_path_loads_from_its_version_folder(exported_run, trained, digits):
    workdir, stdout = exported_run
    export = workdir / "export"
    card = artifacts.verify(export)
    assert os.listdir(export / "tf_serving" / "student") == ["1"]
    _, (x, _) = digits
    loaded = tf.saved_model.load(str(export / "tf_serving" / "student" / "1"))
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(out["logits"].numpy(), trained["student"].predict(x, verbose=0),
                               atol=1e-5)
    assert card["serving"]["tf_serving"]["base_path"] == "tf_serving/student"
    assert f"{export}/tf_serving/student:/models/student -e MODEL_NAME=student" in stdout


# --- unit tests on small models ----------------------------------------------

@pytest.fixture(scope="session")
def small(digits):
    """A small trained digits CNN and 64 test images."""
    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)
    return model, x_test[:64], y_test[:64]


def export_small(small, directory, **kwargs):
    model, x, y = small
    return artifacts.export(model, directory, x, y, attack=ATTACK, **kwargs)


def test_normalization_constants_stay_inside_the_onnx_graph(small, tmp_path):
    """Keras keeps Normalization's mean/variance as eager tensors; exported as
    they are, tf2onnx makes them extra graph inputs a caller would have to feed."""
    model = small[0]
    raw = tmp_path / "raw.onnx"
    model.export(str(raw), format="onnx", verbose=False)
    assert len(onnxruntime.InferenceSession(str(raw)).get_inputs()) > 1  # why the rewrite
    export_small(small, tmp_path / "out")
    session = onnxruntime.InferenceSession(str(tmp_path / "out/student.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images"]


def test_mixed_precision_model_exports_float32(small, tmp_path):
    model = small[0]
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(model.get_weights())
    assert mixed.get_layer("stage1").compute_dtype == "float16"  # float32 logits only
    card = export_small((mixed,) + small[1:], tmp_path / "out")
    assert card["parity"]["passed"]
    assert card["dtype"]["trained"] == "mixed_float16" and card["dtype"]["exported"] == "float32"
    # The float16 model is close to, and not the same as, its float32 export.
    assert 0 < card["dtype"]["max_abs_logit_diff_vs_trained"] < 0.05
    session = onnxruntime.InferenceSession(str(tmp_path / "out/student.onnx"))
    assert {o.type for o in session.get_inputs() + session.get_outputs()} == {"tensor(float)"}
    logits = session.run(["logits"], {"images": small[1]})[0]
    np.testing.assert_allclose(logits, model.predict(small[1], verbose=0), atol=1e-4)


def test_the_opset_asked_for_is_the_one_written(small, tmp_path):
    card = export_small(small, tmp_path / "out", opset=artifacts.MIN_OPSET, batch_sizes=(16,))
    opsets = {o.domain: o.version for o in onnx.load(tmp_path / "out/student.onnx").opset_import}
    assert opsets[""] == artifacts.MIN_OPSET == card["onnx"]["opset"] and card["parity"]["passed"]
    with pytest.raises(artifacts.ExportError, match="opset 12 is not supported"):
        export_small(small, tmp_path / "other", opset=12)
    assert not (tmp_path / "other").exists()


def leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


@pytest.mark.slow
def test_a_failed_parity_check_writes_nothing_and_keeps_the_old_export(small, tmp_path):
    target = tmp_path / "out"
    export_small(small, target, batch_sizes=(64,))
    before = artifacts.verify(target)
    with pytest.raises(artifacts.ExportError) as err:
        # Tolerance 0: ONNX Runtime differs from Keras by rounding, so this fails.
        export_small(small, target, tolerance=0.0, batch_sizes=(64,))
    assert "nothing was written" in str(err.value)
    assert "onnxruntime on clean inputs at batch size 64: max |logit diff|" in str(err.value)
    assert artifacts.verify(target) == before  # the previous export, whole
    assert leftovers(tmp_path) == []
    with pytest.raises(artifacts.ExportError):
        export_small(small, tmp_path / "fresh", tolerance=0.0, batch_sizes=(64,))
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_an_interrupted_export_leaves_no_half_written_model(small, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(parity, "compare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_small(small, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_an_export_directory_with_files_it_did_not_write_is_refused(tmp_path):
    """An export replaces its directory whole; files the card does not list
    (a user's) would go with it, so the export is refused and they stay."""
    target = tmp_path / "export"
    target.mkdir()
    (target / artifacts.CARD).write_text(json.dumps({"files": {"student.onnx": {}}}))
    (target / "student.onnx").write_text("onnx")
    artifacts._check_target(str(target))  # only its own files: fine
    (target / "my_notes.txt").write_text("mine")
    with pytest.raises(artifacts.ExportError, match=r"holds files its export did not write "
                                                    r"\(my_notes.txt\)"):
        artifacts._check_target(str(target))
    assert (target / "my_notes.txt").read_text() == "mine"


def test_an_export_killed_while_moving_into_place_is_recovered(tmp_path):
    """Killed between moving the old export aside and the new one in: the old
    one is put back; killed after: the old one aside is deleted."""
    old = tmp_path / ".export.old-x1"
    old.mkdir()
    (old / artifacts.CARD).write_text(json.dumps({"files": {}}))
    artifacts._check_target(str(tmp_path / "export"))
    assert (tmp_path / "export" / artifacts.CARD).exists() and not old.exists()
    old.mkdir()
    artifacts._check_target(str(tmp_path / "export"))
    assert not old.exists() and (tmp_path / "export" / artifacts.CARD).exists()


def test_a_second_export_of_a_directory_is_refused_while_one_runs(small, tmp_path):
    """While one export writes a directory (it holds an flock on the lock file
    beside it), a second one is refused and writes nothing; once it is done,
    the next export goes ahead (a lock file left behind, as here by a holder
    killed before deleting it, is taken over), and deletes its lock file."""
    import fcntl
    target = tmp_path / "export"
    holder = os.open(artifacts.lock_path(str(target)), os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as a running export holds it
    try:
        with pytest.raises(artifacts.ExportError,
                           match=f"another export of {target} is under way"):
            export_small(small, target)
        assert os.listdir(tmp_path) == [".export.lock"]  # the holder's
    finally:
        os.close(holder)
    export_small(small, target)
    assert (target / artifacts.CARD).is_file()
    assert sorted(os.listdir(tmp_path)) == ["export"]  # its own lock file is gone


def test_export_refuses_targets_that_are_not_exports(small, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/keep.txt").write_text("mine")
    with pytest.raises(artifacts.ExportError, match="holds no export of ours"):
        export_small(small, tmp_path / "notes")
    assert os.listdir(tmp_path / "notes") == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(artifacts.ExportError, match="is a file"):
        export_small(small, tmp_path / "file")
    two = keras.Model(small[0].inputs, [small[0].outputs[0]] * 2)
    with pytest.raises(artifacts.ExportError, match="2 output"):
        artifacts.export(two, tmp_path / "two", small[1], small[2], attack=ATTACK)


def test_parity_compare_reports_drift_and_flipped_labels():
    x = np.random.default_rng(0).random((10, 2, 2, 1), np.float32)

    def reference(z):
        return np.stack([z.sum((1, 2, 3)), 1 - z.sum((1, 2, 3))], 1)

    result = parity.compare(reference, {"same": reference,
                                        "drift": lambda z: reference(z) + 1e-3,
                                        "flip": lambda z: reference(z)[:, ::-1]},
                            {"clean": x}, batch_sizes=(1, 4), single_examples=3)
    by = {(c["runtime"], c["batch_size"]): c for c in result["checks"]}
    assert not result["passed"]
    assert by[("same", 1)]["passed"] and by[("same", 4)]["examples"] == 10
    assert by[("same", 1)]["examples"] == 3
    assert by[("drift", 4)]["max_abs_logit_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert by[("drift", 4)]["label_agreement"] == 1.0 and not by[("drift", 4)]["passed"]
    assert by[("flip", 4)]["label_agreement"] < 1.0
    assert len(parity.failures(result)) == 4


def test_card_from_run_takes_the_students_evaluations():
    settings = {"eps": 0.1, "norm": "l2", "method": "ard", "student_arch": "resnet18", "lr": 1}
    entry = {k: i for i, k in enumerate(artifacts.EVALUATION_KEYS)} | {"per_class": [1]}
    metrics = {"student": entry, "student@linf-0.05": entry, "teacher": entry}
    card = artifacts.card_from_run(settings, metrics, "cifar10", ["a", "b"])
    assert card["trained_for"] == {"eps": 0.1, "norm": "l2", "method": "ard",
                                   "student_arch": "resnet18"}
    assert len(card["evaluations"]) == 2 and "per_class" not in card["evaluations"][0]
    assert card["class_names"] == ["a", "b"] and card["training"] == settings
