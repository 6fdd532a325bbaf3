"""LiteRT (formerly TensorFlow Lite) files of an exported student, and their runner.

    convert(saved_model_dir, out_path, kind, calibration=None)
        writes a .tflite file from the export's SavedModel: kind "float32",
        "float16" (weights stored in float16, computed in float32 where the
        device has no float16 arithmetic) or "int8" (full integer: every op
        runs on int8 tensors, activations calibrated on `calibration` images)
    Model(path)   the file run by the LiteRT interpreter; model(x) -> (logits,
                  probabilities)
    forward(path) the same file as a TensorFlow callable x -> logits, for
                  attacks (ardir_tf.deployed measures a file's robustness)

Every file keeps the export's interface: signature `serving_default`, input
`images` float32 [N, H, W, C] in [0, 1] (any N), outputs `logits` and
`probabilities` float32 [N, K]. The INT8 file quantizes its input and
dequantizes its outputs inside the graph, so a caller never handles scales
and zero points; it runs on integer-only kernels in between.

The converter is TensorFlow's (`tf.lite.TFLiteConverter`, still the way from a
TF graph to a .tflite file in TF 2.21); the interpreter is the `ai-edge-litert`
package's, the runtime Google maintains now (TF 2.21's `tf.lite.Interpreter`
warns that it is deprecated and will be deleted).
"""

import os
import threading

import numpy as np

KINDS = ("float32", "float16", "int8")
SIGNATURE = "serving_default"
DIRECTORY = "litert"  # inside an export: litert/<name>[.<kind>].tflite, labels.txt


class LiteRTError(ValueError):
    """A conversion the student's ops or the arguments do not allow."""


def file_name(name, kind):
    """<name>.tflite for float32, <name>.<kind>.tflite for the others."""
    return f"{name}.tflite" if kind == "float32" else f"{name}.{kind}.tflite"


def convert(saved_model_dir, out_path, kind, calibration=None):
    """Writes the `kind` LiteRT file of the SavedModel at `saved_model_dir` (an
    export's, signature serving_default) to `out_path`. Returns out_path.

    Args:
      kind: one of KINDS.
      calibration: float32 images [N, H, W, C] in [0, 1]; needed for "int8"
        (a few hundred training images), ignored otherwise.

    Raises:
      LiteRTError: an unknown kind, no calibration images for INT8, or a
        conversion the converter refuses (one line: for INT8, usually an op
        with no integer kernel).
    """
    import tensorflow as tf
    if kind not in KINDS:
        raise LiteRTError(f"unknown LiteRT kind {kind!r}; expected one of {', '.join(KINDS)}")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir,
                                                         signature_keys=[SIGNATURE])
    if kind != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if kind == "int8":
        images = np.asarray(calibration if calibration is not None else [], np.float32)
        if images.ndim != 4 or not len(images):
            raise LiteRTError(f"calibration images of shape {images.shape}; INT8 needs "
                              "[N, H, W, C] with N >= 1")
        converter.representative_dataset = lambda: ([images[i:i + 1]]
                                                    for i in range(len(images)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        content = converter.convert()
    except Exception as err:  # ConverterError, or a RuntimeError from calibration
        message = " ".join(str(err).split())
        raise LiteRTError(f"the LiteRT converter cannot write a {kind} file of this "
                          f"model: {message[:300]}") from None
    with open(out_path, "wb") as f:
        f.write(content)
    if kind == "int8":
        islands = float_ops(out_path)
        if islands:
            os.remove(out_path)
            raise LiteRTError(
                f"a full-integer INT8 file needs an integer kernel for every op, and LiteRT "
                f"has none for {', '.join(sorted(set(islands)))} (the converter would run "
                "it in float32 between a DEQUANTIZE and a QUANTIZE); the float16 LiteRT "
                "file or the INT8 ONNX file can be written for this model instead")
    return out_path


def float_ops(path):
    """The ops of the .tflite file at `path` that compute in float32 inside the
    graph: every op but QUANTIZE, DEQUANTIZE and those whose outputs are all the
    graph's outputs (the probabilities' SOFTMAX on the dequantized logits)."""
    interpreter = _interpreter(path)
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    outputs = {d["index"] for d in interpreter.get_output_details()}
    found = []
    for op in interpreter._get_ops_details():  # no public op list in ai_edge_litert 2.3
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        tensors = [i for i in [*op["inputs"], *op["outputs"]] if i >= 0]
        if any(dtypes.get(i) == np.float32 for i in tensors) and \
                not set(op["outputs"]) <= outputs:
            found.append(op["op_name"])
    return found


def _interpreter(path, num_threads=None):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise LiteRTError("running a LiteRT file needs the ai-edge-litert package "
                          "(pip install ai-edge-litert)") from None
    try:
        return Interpreter(model_path=str(path), num_threads=num_threads)
    except (ValueError, RuntimeError) as err:
        raise LiteRTError(f"{path}: not a LiteRT file: {' '.join(str(err).split())[:200]}"
                          ) from None


class Model:
    """A .tflite file of ours run by the LiteRT interpreter (`ai_edge_litert`).

    model(x) -> (logits, probabilities), float32 numpy arrays, for any batch of
    float32 images (the signature runner resizes the input). One interpreter
    serves one call at a time: calls from several threads take turns.
    """

    def __init__(self, path, num_threads=None):
        self.interpreter = _interpreter(path, num_threads)
        try:
            self._runner = self.interpreter.get_signature_runner(SIGNATURE)
        except (ValueError, RuntimeError) as err:
            raise LiteRTError(f"{path}: not a LiteRT file of ours (signature {SIGNATURE!r} "
                              f"with input 'images'): {' '.join(str(err).split())[:200]}"
                              ) from None
        details = self._runner.get_input_details()
        if list(details) != ["images"] or details["images"]["dtype"] != np.float32:
            raise LiteRTError(f"{path}: its signature takes {list(details)}; expected one "
                              "float32 input 'images'")
        self.input_shape = tuple(int(d) for d in details["images"]["shape_signature"][1:])
        self.path = str(path)
        self._lock = threading.Lock()

    def __call__(self, x):
        x = np.ascontiguousarray(x, np.float32)
        with self._lock:
            out = self._runner(images=x)
        return (np.asarray(out["logits"], np.float32),
                np.asarray(out["probabilities"], np.float32))


def forward(path):
    """The LiteRT file at `path` as a TensorFlow callable (x, training=False) ->
    logits [N, K], through tf.numpy_function: no gradient (see
    ardir_tf.deployed.bpda for one)."""
    import tensorflow as tf
    model = Model(path)
    num_classes = model(np.zeros([1, *model.input_shape], np.float32))[0].shape[-1]

    def run(x, training=False):
        logits = tf.numpy_function(lambda z: model(z)[0], [tf.cast(x, tf.float32)],
                                   tf.float32, stateful=False)
        logits.set_shape([None, num_classes])
        return logits
    return run
