"""Model repositories for the standard servers, laid out inside an export.

    triton/NAME/config.pbtxt     Triton's model configuration: the ONNX Runtime
                                 backend, input and output names, dims and data
                                 types, max batch size, dynamic batching
    triton/NAME/labels.txt       the class names, one a line (Triton's classification
                                 extension answers them for logits and probabilities)
    triton/NAME/1/model.onnx     the export's ONNX file (version 1)
    triton/NAME_int8/...         the same for each smaller ONNX file of the export
                                 (NAME.int8.onnx, NAME.float16.onnx): its own model
    tf_serving/NAME/1/           the export's SavedModel: TF Serving loads a model's
                                 numbered version folders under its base path

The files are hard links to the export's own `NAME.onnx` and `saved_model/` where
the file system allows (else copies), so the repositories cost no extra disk.
Their sha256 in the model card equals the originals'.

`docker_commands(...)` gives the lines that serve them; they are not run by the
tests (no Docker images can be pulled where this is developed).
"""

import os
import shutil

TRITON = "triton"
TF_SERVING = "tf_serving"
VERSION = "1"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.08-py3"
TF_SERVING_IMAGE = "tensorflow/serving:latest"


def triton_config(name, image_shape, num_classes, max_batch, labels=None,
                  queue_delay_us=100):
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for an export's ONNX
    model: input `images` FP32 [batch, *image_shape], outputs `logits` and
    `probabilities` FP32 [batch, num_classes]."""
    dims = ", ".join(map(str, image_shape))
    label_line = f'\n    label_filename: "{labels}"' if labels else ""  # on both outputs
    return f'''name: "{name}"
backend: "onnxruntime"
max_batch_size: {int(max_batch)}
input [
  {{
    name: "images"
    data_type: TYPE_FP32
    format: FORMAT_NHWC
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {int(num_classes)} ]{label_line}
  }},
  {{
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ {int(num_classes)} ]{label_line}
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {int(queue_delay_us)}
}}
'''


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _link_tree(source, target):
    shutil.copytree(source, target, copy_function=_link_or_copy)


def docker_commands(export_dir, name):
    """{"triton": ..., "tf_serving": ...}: the `docker run` lines serving the export at
    `export_dir` (an absolute path; Triton on port 8000, TF Serving's REST API on 8501)."""
    return {
        "triton": f"docker run --rm -p 8000:8000 -v {export_dir}/{TRITON}:/models "
                  f"{TRITON_IMAGE} tritonserver --model-repository=/models",
        "tf_serving": f"docker run --rm -p 8501:8501 -v {export_dir}/{TF_SERVING}/{name}:"
                      f"/models/{name} -e MODEL_NAME={name} {TF_SERVING_IMAGE}"}


def _triton_model(directory, name, onnx_file, image_shape, num_classes, max_batch,
                  class_names):
    model_dir = os.path.join(directory, TRITON, name)
    os.makedirs(os.path.join(model_dir, VERSION))
    _link_or_copy(onnx_file, os.path.join(model_dir, VERSION, "model.onnx"))
    labels = None
    if class_names:
        labels = "labels.txt"
        with open(os.path.join(model_dir, labels), "w") as f:
            f.write("".join(f"{c}\n" for c in class_names))
    with open(os.path.join(model_dir, "config.pbtxt"), "w") as f:
        f.write(triton_config(name, image_shape, num_classes, max_batch, labels))


def write(directory, name, onnx_file, saved_model_dir, image_shape, num_classes,
          max_batch, class_names=None, variants=None):
    """Writes both repositories into `directory` (the export being written), from its
    `onnx_file` and `saved_model_dir` (paths inside it); `variants` ({kind: ONNX
    file}, e.g. {"int8": ".../NAME.int8.onnx"}) become Triton models of their own,
    NAME_<kind>, with the same interface. Returns the model card's "serving"
    entry: where each repository is, relative to the export."""
    _triton_model(directory, name, onnx_file, image_shape, num_classes, max_batch,
                  class_names)
    for kind, path in (variants or {}).items():
        _triton_model(directory, f"{name}_{kind}", path, image_shape, num_classes, max_batch,
                      class_names)
    base_path = os.path.join(directory, TF_SERVING, name)
    os.makedirs(base_path)
    _link_tree(saved_model_dir, os.path.join(base_path, VERSION))
    return {
        "triton": {"model_repository": TRITON, "model": name, "version": VERSION,
                   "config": f"{TRITON}/{name}/config.pbtxt", "max_batch_size": int(max_batch),
                   "variants": {kind: f"{name}_{kind}" for kind in (variants or {})}},
        "tf_serving": {"base_path": f"{TF_SERVING}/{name}", "model": name,
                       "version": VERSION, "signature": "serving_default"},
        "ardir_serve": {"model": name, "protocols": ["open_inference_v2", "tf_serving_rest",
                                                     "native"]},
        "docker": docker_commands("$EXPORT_DIR", name)}
