"""Small deployed artifacts (export.quantize, export.litert, export.variants) and
their robustness measured on the artifact itself (ardir_tf.deployed), on the
committed digits run's student."""

import os

import numpy as np
import onnxruntime
import pytest
import keras
import tensorflow as tf

from ardir_tf import deployed
from export import artifacts, litert, quantize, variants


@pytest.fixture(scope="module")
def files(trained, digits, tmp_path_factory):
    """The student as float32, INT8 and float16 ONNX files, and as float32 and
    full-integer INT8 LiteRT files."""
    (x_train, _), _ = digits
    root = tmp_path_factory.mktemp("deployed")
    float_path = str(root / "student.onnx")
    serving = artifacts.serving_model(trained["student"])
    serving(x_train[:1])  # Keras exports only a model that has been called
    serving.export(float_path, format="onnx", verbose=False)
    serving.export(str(root / "saved_model"), format="tf_saved_model", verbose=False)
    return {"float32": float_path,
            "int8": quantize.int8_onnx(float_path, str(root / "student.int8.onnx"),
                                       x_train[:256]),
            "float16": quantize.float16_onnx(float_path, str(root / "student.float16.onnx")),
            "litert_float32": litert.convert(str(root / "saved_model"),
                                             str(root / "student.tflite"), "float32"),
            "litert_int8": litert.convert(str(root / "saved_model"),
                                          str(root / "student.int8.tflite"), "int8",
                                          x_train[:256])}


def run(path, x):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["logits", "probabilities"], {"images": x})


def test_the_small_files_keep_the_interface_and_the_accuracy(files, digits):
    """Same input and outputs as the float32 export (so the server serves them);
    INT8 is QDQ-quantized and smaller; clean accuracy within a point of float32."""
    _, (x, y) = digits
    import onnx
    ops = [n.op_type for n in onnx.load(files["int8"]).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert os.path.getsize(files["int8"]) < 0.6 * os.path.getsize(files["float32"])
    accuracy = {}
    for name, path in files.items():
        if name.startswith("litert"):
            continue
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [(i.name, i.type) for i in session.get_inputs()] == [("images", "tensor(float)")]
        assert [(o.name, o.type) for o in session.get_outputs()] == [
            ("logits", "tensor(float)"), ("probabilities", "tensor(float)")]
        logits, probabilities = run(path, x)
        accuracy[name] = float((probabilities.argmax(1) == y).mean())
    assert abs(accuracy["int8"] - accuracy["float32"]) <= 0.01, accuracy
    assert accuracy["float16"] == accuracy["float32"], accuracy
    # float16 arithmetic: logits within its rounding of float32's (3 decimal digits).
    np.testing.assert_allclose(run(files["float16"], x)[0], run(files["float32"], x)[0],
                               atol=0.05, rtol=0.01)


def test_the_litert_files_keep_the_interface_and_int8_is_integer_inside(files, digits):
    """Signature serving_default, float32 images in, logits and probabilities out,
    any batch; the INT8 file computes every op but its edges on int8 tensors,
    is under 45% of the float32 file (the float32 one: 72 kB for 17k
    parameters) and keeps clean accuracy within a point; float32 LiteRT
    computes the ONNX file's logits."""
    _, (x, y) = digits
    logits = {}
    for name in ("litert_float32", "litert_int8"):
        model = litert.Model(files[name])
        assert model.input_shape == (8, 8, 1)
        one, _ = model(x[:1])
        logits[name], probabilities = model(x)
        assert one.shape == (1, 10) and logits[name].shape == (len(x), 10)
        # INT8 probabilities come out of an int8 SOFTMAX (steps of 1/256): ten
        # values each within half a step.
        np.testing.assert_allclose(probabilities.sum(1), 1,
                                   atol=10 / 512 if name == "litert_int8" else 1e-5)
        assert probabilities.dtype == np.float32
    onnx_logits = run(files["float32"], x)[0]
    np.testing.assert_allclose(logits["litert_float32"], onnx_logits, atol=1e-4)
    accuracy = {k: float((v.argmax(1) == y).mean()) for k, v in logits.items()}
    assert abs(accuracy["litert_int8"] - accuracy["litert_float32"]) <= 0.01, accuracy
    assert litert.float_ops(files["litert_int8"]) == []
    assert "CONV_2D" in litert.float_ops(files["litert_float32"])
    assert os.path.getsize(files["litert_int8"]) < 0.45 * os.path.getsize(
        files["litert_float32"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "litert_int8"])
def test_bpda_finds_at_least_what_transfer_finds_on_the_int8_file(files, trained, digits,
                                                                  kind):
    """Through BPDA (the file forward, the float student backward) the gradient
    attacks leave no more points standing than the float student's points
    transferred; the worst case is the minimum over the three families; on the
    ONNX and the LiteRT INT8 file alike."""
    _, (x, y) = digits
    data = tf.data.Dataset.from_tensor_slices((x[:256], y[:256])).batch(128)
    artifact = deployed.load(files[kind], (8, 8, 1))
    report = deployed.evaluate_artifact(artifact, trained["student"], data, 0.15,
                                        apgd_steps=25, n_targets=3, square_queries=200)
    worst = report["worst_case"]
    assert report["clean_accuracy"] > 0.9 and report["n_examples"] == 256
    assert worst["bpda"] <= worst["transfer"], report
    # Over every attack at once: no family alone leaves fewer standing.
    assert report["worst_case_accuracy"] <= min(worst.values())
    assert worst["bpda"] < report["clean_accuracy"]


def test_bpda_runs_the_artifact_forward_and_the_surrogate_backward(trained, digits):
    """The BPDA model's values are the artifact's; its gradient the surrogate's."""
    _, (x, _) = digits
    x = tf.constant(x[:4])
    student = trained["student"]

    def artifact(z, training=False):  # a 'deployed' model: rounded logits, no gradient
        return tf.stop_gradient(tf.round(student(z, training=False) * 4) / 4)
    model = deployed.bpda(artifact, student)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        through, direct = model(x), student(x, training=False)
        loss_through, loss_direct = tf.reduce_sum(through[:, 3]), tf.reduce_sum(direct[:, 3])
    np.testing.assert_allclose(through, artifact(x), atol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss_through, x), tape.gradient(loss_direct, x),
                               atol=1e-6)


def test_a_graph_int8_cannot_reach_is_refused_in_one_line(tmp_path):
    """No Conv, MatMul or Gemm to quantize: refused, not written."""
    import onnx
    from onnx import TensorProto, helper
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64])
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [10])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["images", "shape"], ["flat"]),
         helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 8, 8, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [shape, starts, ends, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "plain.onnx"))
    out = tmp_path / "plain.int8.onnx"
    with pytest.raises(quantize.QuantizationError, match="reached none of Conv, MatMul, "
                                                         "Gemm") as err:
        quantize.int8_onnx(str(tmp_path / "plain.onnx"), str(out),
                           np.zeros((4, 8, 8, 1), np.float32))
    assert "\n" not in str(err.value) and not out.exists()


@keras.saving.register_keras_serializable("test_deployed")
class Sine(keras.layers.Layer):
    """An op LiteRT has no integer kernel for."""

    def call(self, x):
        return keras.ops.sin(x)


def test_an_export_whose_ops_have_no_integer_kernel_is_refused_in_one_line(digits, tmp_path):
    """The LiteRT converter would quietly run SIN in float32 inside an 'INT8'
    file; the export refuses it in one line and writes nothing."""
    (x_train, _), (x, y) = digits
    images = keras.Input((8, 8, 1))
    hidden = keras.layers.Flatten()(Sine()(keras.layers.Conv2D(4, 3)(images)))
    model = keras.Model(images, keras.layers.Dense(10)(hidden))
    with pytest.raises(artifacts.ExportError, match="needs an integer kernel for every "
                                                    "op, and LiteRT has none for SIN") as err:
        artifacts.export(model, tmp_path / "export", x[:16], y[:16], batch_sizes=(16,),
                         attack=lambda f, z, _: tf.constant(z), litert=("float32", "int8"),
                         calibration=x_train[:32])
    assert "\n" not in str(err.value)
    assert os.listdir(tmp_path) == []


def test_the_export_writes_the_small_files_measures_them_and_serves_them(trained, digits,
                                                                         tmp_path):
    """export(quantize=...): the files beside <name>.onnx, each with its size,
    latencies, clean accuracy and worst case measured on the file in the card,
    one flagged when its worst case falls more than the margin below float32's;
    the server serves the INT8 file under the same card."""
    from export import server
    (x_train, _), (x, y) = digits
    x, y = x[:48], y[:48]
    worst = {"student.onnx": 0.70, "student.int8.onnx": 0.69, "student.float16.onnx": 0.60,
             "student.int8.tflite": 0.71}

    def robustness(path):  # the measurement itself is tested above; here its plumbing
        return {"worst_case_accuracy": worst[os.path.basename(path)]}
    logged = []
    card = artifacts.export(trained["student"], tmp_path / "export", x, y,
                            attack=trained["attack"], batch_sizes=(48,),
                            quantize=("int8", "float16"), litert=("int8",),
                            calibration=x_train[:128], robustness=robustness,
                            log=logged.append, card={"class_names": list("abcdefghij")})
    small = card["artifacts"]
    assert set(small) == {"float32", "int8", "float16", "litert_int8"}
    assert small["litert_int8"]["file"] == "litert/student.int8.tflite"
    assert small["litert_int8"]["format"] == "litert" and small["int8"]["format"] == "onnx"
    assert (tmp_path / "export" / "litert" / "labels.txt").read_text() == \
        "".join(f"{c}\n" for c in "abcdefghij")
    for kind, entry in small.items():
        path = tmp_path / "export" / entry["file"]
        assert entry["bytes"] == os.path.getsize(path) == card["files"][entry["file"]]["bytes"]
        assert set(entry["latency_ms"]) == {"1", "64"} and entry["clean_accuracy"] > 0.9
    assert small["int8"]["bytes"] < small["float32"]["bytes"]
    assert (small["int8"]["flagged"], small["float16"]["flagged"],
            small["litert_int8"]["flagged"]) == (False, True, False)
    assert abs(small["float16"]["worst_case_diff"] + 0.10) < 1e-9
    assert any("student.float16.onnx's worst case is 0.100 below float32's" in m
               for m in logged)
    assert "FLAGGED" in variants.format_table(small)
    model = server.load(str(tmp_path / "export" / "student.int8.onnx"))
    labels = model(x[:8])[1].argmax(1)
    assert (labels == run(str(tmp_path / "export" / "student.int8.onnx"), x[:8])[1].argmax(1)).all()
    assert model.public_card["artifacts"]["int8"]["file"] == "student.int8.onnx"
    # The INT8 ONNX file is a Triton model of its own, the same file by its sha256.
    triton = tmp_path / "export" / "triton" / "student_int8"
    assert card["serving"]["triton"]["variants"] == {"int8": "student_int8",
                                                     "float16": "student_float16"}
    assert 'name: "student_int8"' in (triton / "config.pbtxt").read_text()
    assert card["files"]["triton/student_int8/1/model.onnx"]["sha256"] == \
        card["files"]["student.int8.onnx"]["sha256"]
    # The deployment page's LiteRT example, run on this export's INT8 file.
    import contextlib
    import io
    import re
    from test_readme import ROOT
    page = (ROOT / "docs" / "deployment.md").read_text()
    section = page.split("### LiteRT files", 1)[1].split("\n### ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(example.replace('"export/', f'"{tmp_path}/export/'), {})
    zeros = litert.Model(tmp_path / "export" / "litert" / "student.int8.tflite")(
        np.zeros((2, 8, 8, 1), np.float32))[1]
    assert printed.getvalue().strip() == str(["abcdefghij"[i] for i in zeros.argmax(1)])
