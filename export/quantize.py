"""Smaller ONNX artifacts of an exported student: INT8 and float16.

    int8_onnx(float_path, out_path, calibration)   static QDQ quantization by ONNX
                                                   Runtime, calibrated on images
    float16_onnx(float_path, out_path)             weights and arithmetic in
                                                   float16, images in and
                                                   outputs out in float32

Both keep the export's interface (input `images` float32 [N, H, W, C] in [0, 1],
outputs `logits` and `probabilities` float32 [N, K]), so the server and the
clients serve and call them unchanged. INT8 quantizes the convolutions' and
dense layers' weights per output channel and their activations per tensor
(QuantizeLinear/DequantizeLinear pairs around each op: the QDQ format, which
ONNX Runtime runs with integer kernels on CPUs and TensorRT accepts); the
activations' ranges come from running the float model on the calibration
images (MinMax). What a quantized file's robustness is must be measured on
the file itself: `ardir_tf.deployed`.

Imports no TensorFlow.
"""

import os
import tempfile

import numpy as np

# The ops whose weights INT8 quantization must reach for the file to be an INT8
# model at all; a graph with none of them quantized is refused.
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


class QuantizationError(ValueError):
    """A quantization that cannot be done, or did not happen, on this model."""


class _Images:
    """onnxruntime.quantization's CalibrationDataReader over an array of images."""

    def __init__(self, images, input_name, batch_size=64):
        self._batches = iter([{input_name: images[i:i + batch_size]}
                              for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def _input_name(path):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.get_inputs()[0].name


def int8_onnx(float_path, out_path, calibration, per_channel=True):
    """Writes the INT8 (QDQ) version of the ONNX model at `float_path` to
    `out_path`, its activation ranges calibrated on `calibration` (float32
    images [N, H, W, C] in [0, 1]; a few hundred training images). Returns
    out_path.

    Raises:
      QuantizationError: ONNX Runtime cannot quantize the graph, or quantized
        none of its Conv, MatMul or Gemm ops (one line, naming the ops it has).
    """
    import onnx
    from onnxruntime import quantization as q
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != 4 or not len(calibration):
        raise QuantizationError(f"calibration images of shape {calibration.shape}; expected "
                                "[N, H, W, C] with N >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        try:
            q.quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
            q.quantize_static(
                prepared, out_path, _Images(calibration, _input_name(float_path)),
                quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                op_types_to_quantize=list(QUANTIZED_OPS),
                calibrate_method=q.CalibrationMethod.MinMax)
        except Exception as err:  # ONNX Runtime raises many kinds for an op it cannot take
            raise QuantizationError(f"ONNX Runtime cannot quantize {float_path} to INT8: "
                                    f"{' '.join(str(err).split())[:300]}") from None
    graph = onnx.load(out_path).graph
    ops = [n.op_type for n in graph.node]
    quantized = {n.input[1] for n in graph.node if n.op_type in QUANTIZED_OPS and
                 len(n.input) > 1} & {n.output[0] for n in graph.node
                                     if n.op_type == "DequantizeLinear"}
    if not quantized:
        os.remove(out_path)
        raise QuantizationError(
            f"INT8 quantization reached none of {', '.join(QUANTIZED_OPS)} in {float_path} "
            f"(its ops: {', '.join(sorted(set(ops)))}); nothing to gain from an INT8 file")
    return out_path


def float16_onnx(float_path, out_path):
    """Writes the float16 version of the ONNX model at `float_path` (float32
    images in, float32 outputs out) to `out_path`. Returns out_path."""
    import onnx
    from onnxruntime.transformers import float16
    model = float16.convert_float_to_float16(onnx.load(float_path), keep_io_types=True)
    onnx.save(model, out_path)
    return out_path
