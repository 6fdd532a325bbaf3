"""Teachers from files (ardir_tf.teachers): Keras, SavedModel and ONNX alike."""

import hashlib
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import keras

import ardir_tf
from ardir_tf import attacks, teachers
from conftest import batch, tiny_pair
from teacher_files import onnx_teacher, saved_model_teacher

FIXED_ATTACK = attacks.PGD(eps=0.2, step_size=0.05, steps=3, random_start=False)
LAYERS = ("stage1", "stage2")
# stage1 of a width-4 student against a width-8 teacher: an adapter; stage2 to
# stage2 likewise. Both IR pairs read teacher outputs of the files.
PAIRS = [("stage1", "stage1"), ("stage2", "stage2")]


def sha256(path):
    path = pathlib.Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One small teacher as .keras, SavedModel, ONNX and NCHW ONNX."""
    root = tmp_path_factory.mktemp("teachers")
    keras.utils.set_random_seed(3)
    teacher, _ = tiny_pair()
    keras_path = root / "teacher.keras"
    teacher.save(keras_path)
    return {"keras": str(keras_path),
            "saved_model": saved_model_teacher(teacher, root / "saved_model", LAYERS),
            "onnx": onnx_teacher(teacher, root / "teacher.onnx", LAYERS),
            "onnx_nchw": onnx_teacher(teacher, root / "nchw.onnx", LAYERS, nchw=True),
            "model": teacher, "root": root}


def distil(teacher, strategy, steps_data=(96, 32)):
    """The student one fit epoch makes from `teacher`, seeded, random start off."""
    keras.utils.set_random_seed(7)
    x, y = batch(*steps_data[:1], seed=1)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(steps_data[1])
    with strategy.scope():
        student = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4,
                                        sync_batchnorm=strategy.num_replicas_in_sync > 1)
        d = ardir_tf.ARDIRDistiller(teacher=teacher, student=student, layers=PAIRS,
                                    attack=FIXED_ATTACK, attack_objective="ardir")
        d.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    history = d.fit(data, epochs=1, verbose=0)
    return [w.numpy() for w in student.weights], history.history, d


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_keras_savedmodel_and_onnx_teachers_distil_the_same_student(files, replicas, mirrored):
    strategy = mirrored if replicas == 2 else tf.distribute.get_strategy()
    before = {k: sha256(files[k]) for k in ("keras", "saved_model", "onnx")}
    results, loaded = {}, {}
    for form in ("keras", "saved_model", "onnx"):
        with strategy.scope():
            loaded[form] = teacher = teachers.load(files[form], LAYERS, input_shape=(8, 8, 1))
        assert teacher.kind == form and teacher.shapes["stage2"] == (4, 4, 16)
        results[form] = distil(teacher, strategy)
    w_keras, h_keras, d = results["keras"]
    # The teacher's logits agree to ~4e-7 across the three runtimes (ONNX
    # Runtime's kernels round differently); three SGD steps carry that to ~1e-6.
    for form in ("saved_model", "onnx"):
        w, h, _ = results[form]
        for a, b in zip(w_keras, w):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert h["ir"][-1] == pytest.approx(h_keras["ir"][-1], rel=1e-4)
    assert max(np.abs(a - b).max() for a, b in zip(w_keras, distil_init())) > 1e-3  # it trained
    assert h_keras["ir"][-1] > 0 and len(d.adapters) == 2 and all(d.adapters)
    # The teachers are untouched, and neither the student nor what the
    # distiller saves (its weights) holds any variable of theirs.
    assert before == {k: sha256(files[k]) for k in before}
    teacher_variables = {id(v) for v in loaded["keras"].model.weights} | {
        id(v) for v in loaded["saved_model"].loaded.variables}
    assert len(teacher_variables) >= 2 * len(loaded["keras"].model.weights)
    for _, _, distiller in results.values():
        assert not teacher_variables & {id(v) for v in distiller.weights}
        assert not teacher_variables & {id(v) for v in distiller.student.weights}


def distil_init():
    keras.utils.set_random_seed(7)
    student = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    return [w.numpy() for w in student.weights]


def test_an_onnx_teacher_onnx_runtime_cannot_run_is_a_teacher_error(files, monkeypatch):
    """ONNX Runtime's own errors (e.g. a graph with open height and width whose
    dense layer fixes them) are not ValueErrors: the loader says what failed."""
    import onnxruntime

    def fails(self, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions")
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", fails)
    with pytest.raises(teachers.TeacherError, match="ONNX Runtime cannot run it on 2 images "
                                                    r"of the data's shape \(8, 8, 1\): "
                                                    r"\[ONNXRuntimeError\]"):
        teachers.load(files["onnx"], LAYERS, input_shape=(8, 8, 1))


def test_an_nchw_onnx_teacher_gives_its_representations_in_nhwc(files):
    x = batch(16, seed=2)[0]
    nhwc = teachers.load(files["onnx"], LAYERS, input_shape=(8, 8, 1))
    auto = teachers.load(files["onnx_nchw"], LAYERS, input_shape=(8, 8, 1))
    explicit = teachers.load(files["onnx_nchw"], LAYERS, input_shape=(8, 8, 1), layout="nchw")
    assert (nhwc.layout, auto.layout, explicit.layout) == ("nhwc", "nchw", "nchw")
    reference = nhwc(x)
    for teacher in (auto, explicit):
        assert teacher.shapes == nhwc.shapes == {"logits": (10,), "stage1": (8, 8, 8),
                                                 "stage2": (4, 4, 16)}
        out = teacher(x)
        for name in ("logits", *LAYERS):
            np.testing.assert_allclose(out[name], reference[name], atol=1e-5)
    with pytest.raises(teachers.TeacherError, match=r"takes 1x8x8; as NHWC these data would "
                                                    r"be 8x8x1"):
        teachers.load(files["onnx_nchw"], LAYERS, input_shape=(8, 8, 1), layout="nhwc")
    # Its IR term is the NHWC teacher's: the same student from both.
    w1, _, _ = distil(nhwc, tf.distribute.get_strategy())
    w2, _, _ = distil(auto, tf.distribute.get_strategy())
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_ambiguous_layout_must_be_given(files, tmp_path):
    keras.utils.set_random_seed(0)
    square = ardir_tf.models.build("small_cnn", (3, 3, 3), 10, width=2)
    path = onnx_teacher(square, tmp_path / "square.onnx")
    with pytest.raises(teachers.TeacherError, match="could be NHWC or NCHW.*layout='nchw'"):
        teachers.load(path, input_shape=(3, 3, 3))
    assert teachers.load(path, input_shape=(3, 3, 3), layout="nhwc").layout == "nhwc"


def test_bad_teacher_files_get_one_clear_error(files, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    keras.utils.set_random_seed(0)
    five = onnx_teacher(files["model"], tmp_path / "five.onnx", classes=5)
    mnist = onnx_teacher(ardir_tf.models.build("small_cnn", (28, 28, 1), 10, width=2),
                         tmp_path / "mnist.onnx")
    cases = [
        (dict(path=str(tmp_path / "none.onnx")), "no such file or directory"),
        (dict(path=str(corrupt)), "cannot load it as an ONNX model"),
        (dict(path=str(tmp_path)), "not a teacher this can load"),
        (dict(path=mnist), "takes images of shape 28x28x1, but the data's are 8x8x1"),
        (dict(path=files["onnx"], layers=["stage3"]),
         "has no output 'stage3'; it has logits, stage1, stage2"),
        (dict(path=files["saved_model"], layers=["stage3"]),
         "has no output 'stage3'; it has"),
        (dict(path=files["keras"], layers=["stage3"]), "'stage3' not in model"),
        (dict(path=files["keras"], input_scale=255.0), "a Keras model takes our"),
        (dict(path=files["onnx"], mean=[0.1, 0.2]), "mean needs one value for all channels or "
                                                    "one per channel \\(1\\)"),
        (dict(path=files["onnx"], std=[0.0]), "std must be > 0"),
        (dict(path=files["onnx"], layout="chw"), "layout must be one of auto, nhwc, nchw"),
    ]
    for kwargs, message in cases:
        with pytest.raises(teachers.TeacherError, match=message):
            teachers.load(kwargs.pop("path"), kwargs.pop("layers", ()), input_shape=(8, 8, 1),
                          **kwargs)
    # A teacher of other classes loads, and the distiller says what is wrong.
    teacher = teachers.load(five, input_shape=(8, 8, 1))
    assert teacher.num_classes == 5
    with pytest.raises(ValueError, match="same classes; teacher logits have shape \\(5,\\)"):
        ardir_tf.ARDIRDistiller(teacher=teacher, student=tiny_pair()[1], method="ard",
                                attack=FIXED_ATTACK)


def test_the_check_names_the_likely_cause_of_a_teacher_at_chance(trained, digits, tmp_path):
    _, (x, y) = digits
    x, y = x[:300], y[:300]
    path = onnx_teacher(trained["teacher"], tmp_path / "255.onnx", expects_255=True)

    def load(**changes):
        return teachers.load(path, input_shape=(8, 8, 1), **changes)
    with pytest.raises(teachers.TeacherError, match=r"near chance \(0.100\); likely cause: it "
                                                    r"expects 0-255 pixels: input_scale=255"):
        teachers.check(load(), x, y, 10, retry=load)
    report = teachers.check(load(input_scale=255.0), x, y, 10, retry=load)
    assert report["clean_accuracy"] > 0.9 and report["n_examples"] == 300
    # Classes in another order: right up to a relabelling.
    shuffled = onnx_teacher(trained["teacher"], tmp_path / "order.onnx",
                            permutation=[3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
    with pytest.raises(teachers.TeacherError, match="classes are in another order"):
        teachers.check(teachers.load(shuffled, input_shape=(8, 8, 1)), x, y, 10)
    # The Keras teacher itself passes.
    assert teachers.check(teachers.as_teacher(trained["teacher"]), x, y, 10)[
        "clean_accuracy"] > 0.9


@pytest.mark.parametrize("kind", ["onnx", "saved_model"])
def test_a_teacher_that_outputs_probabilities_is_refused_or_converted(trained, digits,
                                                                     tmp_path, kind):
    """A file whose one output ends in a softmax passes the accuracy check (its
    argmax is the model's) but would train on near-uniform targets: the check
    refuses it, naming --teacher_outputs; with outputs='probabilities' its logits
    are log-probabilities, the model's log-softmax."""
    _, (x, y) = digits
    x, y = x[:300], y[:300]
    make = onnx_teacher if kind == "onnx" else saved_model_teacher
    path = make(trained["teacher"], tmp_path / f"softmax.{kind}", softmax=True)
    with pytest.raises(teachers.TeacherError, match=r"'logits' are probabilities.*"
                                                    r"--teacher_outputs=probabilities"):
        teachers.check(teachers.load(path, input_shape=(8, 8, 1)), x, y, 10)
    converted = teachers.load(path, input_shape=(8, 8, 1), outputs="probabilities")
    assert "outputs probabilities" in converted.description
    assert teachers.check(converted, x, y, 10)["clean_accuracy"] > 0.9
    want = tf.nn.log_softmax(trained["teacher"](x[:64], training=False))
    np.testing.assert_allclose(converted(x[:64])["logits"], want, atol=1e-4)
    keras_path = str(tmp_path / "teacher.keras")
    trained["teacher"].save(keras_path)
    with pytest.raises(teachers.TeacherError, match="outputs are for SavedModel and ONNX"):
        teachers.load(keras_path, outputs="probabilities")
    # Said to give probabilities, a file giving logits is refused: the log of
    # its logits would distort every target while its argmax stays right.
    logits = make(trained["teacher"], tmp_path / f"logits.{kind}")
    with pytest.raises(teachers.TeacherError, match="said to output probabilities.*they are "
                                                    "logits"):
        teachers.check(teachers.load(logits, input_shape=(8, 8, 1), outputs="probabilities"),
                       x, y, 10)


def test_a_teacher_giving_nan_is_not_called_near_chance(digits):
    _, (x, y) = digits

    def broken(z, training=False):
        return {"logits": tf.fill([tf.shape(z)[0], 10], float("nan"))}
    with pytest.raises(teachers.TeacherError, match="NaN or infinite on 300 of 300"):
        teachers.check(broken, x[:300], y[:300], 10)


def test_an_onnx_teacher_cannot_read_files_outside_its_directory(tmp_path):
    """An ONNX file may name external data; one naming a path outside its own
    directory is refused (ONNX Runtime >= 1.24.1, which requirements.txt asks for)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    (tmp_path / "secret.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    weights = numpy_helper.from_array(np.ones((64, 10), np.float32), "W")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "../secret.bin", "offset": "0", "length": "64"}.items():
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 8, 8, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (tmp_path / "model").mkdir()
    onnx.save(model, str(tmp_path / "model" / "teacher.onnx"))
    with pytest.raises(teachers.TeacherError, match="escapes model directory|outside"):
        teachers.load(str(tmp_path / "model" / "teacher.onnx"), input_shape=(8, 8, 1))


def test_a_callable_teacher_and_an_onnx_teachers_refusals(files):
    model = files["model"]
    view = ardir_tf.models.expose(model, ["stage2"])
    d = ardir_tf.ARDIRDistiller(teacher=lambda x: view(x, training=False),
                                student=tiny_pair()[1], layers=[("stage2", "stage2")],
                                attack=FIXED_ATTACK)
    assert d._views.teacher.kind == "callable" and d._views.teacher.shapes["stage2"] == (4, 4, 16)
    with pytest.raises(ValueError, match="has no output 'stage1'"):
        ardir_tf.ARDIRDistiller(teacher=lambda x: view(x, training=False),
                                student=tiny_pair()[1], layers=[("stage1", "stage1")],
                                attack=FIXED_ATTACK)
    onnx = teachers.load(files["onnx"], ["stage2"], input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="it lacks stage1: load it with layers="):
        ardir_tf.ARDIRDistiller(teacher=onnx, student=tiny_pair()[1],
                                layers=[("stage1", "stage1")], attack=FIXED_ATTACK)
    d = ardir_tf.ARDIRDistiller(teacher=onnx, student=tiny_pair()[1],
                                layers=[("stage2", "stage2")], attack=FIXED_ATTACK)
    with pytest.raises(ValueError, match="jit_compile=True cannot compile a step that runs an "
                                         "ONNX teacher"):
        d.compile(optimizer="sgd", jit_compile=True)
    d.compile(optimizer="sgd", jit_compile="auto")  # Keras' "auto" means off with it
    assert d.jit_compile is False
    # ONNX Runtime gives no gradients: a teacher that PGD cannot attack says so.
    assert not onnx.differentiable and teachers.load(files["saved_model"], input_shape=(
        8, 8, 1)).differentiable


def test_one_rule_picks_a_file_teachers_logits():
    """SavedModel and ONNX alike: `logits`, else the only output, else refused."""
    assert teachers.logits_output(["stage2", "logits"], "f") == "logits"
    assert teachers.logits_output(["output_0"], "f") == "output_0"
    with pytest.raises(teachers.TeacherError, match="has outputs out, stage2, none named "
                                                    "'logits'; name the logits output"):
        teachers.logits_output(["out", "stage2"], "f")


def _plain_files(tmp_path, spec):
    """A SavedModel and an ONNX file of one trivial function taking `spec`."""
    import tf2onnx

    @tf.function(input_signature=[spec])
    def fn(images):
        flat = tf.reshape(tf.cast(images, tf.float32), [-1, 64])
        return {"logits": flat[:, :10]}
    module = tf.Module()
    module.fn = fn
    saved = str(tmp_path / f"sm-{spec.dtype.name}-{spec.shape[0]}")
    tf.saved_model.save(module, saved, signatures={"serving_default": fn})
    onnx = str(tmp_path / f"{spec.dtype.name}-{spec.shape[0]}.onnx")
    tf2onnx.convert.from_function(fn, input_signature=[spec], output_path=onnx)
    return {"saved_model": saved, "onnx": onnx}


@pytest.mark.parametrize("kind", ["saved_model", "onnx"])
@pytest.mark.parametrize("spec, message", [
    (tf.TensorSpec([4, 8, 8, 1], tf.float32, "images"),
     "input 'images' has a fixed batch size of 4; export it with a dynamic batch"),
    (tf.TensorSpec([None, 8, 8, 1], tf.int32, "images"),
     "takes int32 'images'; a teacher takes float32 images"),
])
def test_savedmodel_and_onnx_files_pass_one_validation(tmp_path, kind, spec, message):
    """The same rules, in the same words, for both kinds of file: a fixed batch
    size (a teacher runs on every batch size) and a non-float input are refused."""
    path = _plain_files(tmp_path, spec)[kind]
    with pytest.raises(teachers.TeacherError, match=message) as err:
        teachers.load(path, input_shape=(8, 8, 1))
    assert "\n" not in str(err.value)
