"""The Open Inference Protocol (KServe V2) over HTTP/REST, as Triton speaks it.

    GET  /v2                                      server metadata
    GET  /v2/health/live  /v2/health/ready        200 while the server lives / serves
    GET  /v2/models/M[/versions/1]                model metadata
    GET  /v2/models/M[/versions/1]/ready          200 when the model is ready
    POST /v2/models/M[/versions/1]/infer          inference

An infer request carries one input tensor, named as in the export (`images`),
datatype FP32, shape [N, H, W, C], pixels in [0, 1]; its values either in JSON
("data", flat in row-major order or nested) or, with the binary tensor data
extension, as raw little-endian float32 bytes after the JSON header (the
`Inference-Header-Content-Length` header gives the JSON's length, the input's
`parameters.binary_data_size` the bytes'). The answer has the outputs asked for
(all when none are named): `logits` FP32 [N, K], `probabilities` FP32 [N, K] (the
ONNX model's two outputs) and `label` INT64 [N] (their argmax, computed by this
server), each in JSON or binary as asked (`parameters.binary_data`, or the
request's `binary_data_output`). The classification extension
(`parameters.classification: k` on logits or probabilities) answers the top k
classes as BYTES "value:index:class_name". Errors are {"error": "..."} with a
4xx status, as the protocol says.

Not supported (a 400 that says so): shared-memory tensors, other datatypes (the
model takes FP32; Triton refuses a mismatch the same way), more than one input.
"""

import dataclasses
import json
import math
import re
import struct

import numpy as np

from export.validate import (ClientError, as_array, check_images, has_literals,
                             holds_literals, literal_message, loads)

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = ("logits", "probabilities", "label")
EXTENSIONS = ("binary_tensor_data", "classification")
_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
_TENSOR_KEYS = {"name", "shape", "datatype", "parameters", "data"}


def server_metadata(version):
    return {"name": "ardir-serve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(model):
    k = model.num_classes
    return {"name": model.name, "versions": [model.version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": model.input_name, "datatype": "FP32",
                        "shape": [-1, *model.image_shape]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "label", "datatype": "INT64", "shape": [-1]}]}


@dataclasses.dataclass(frozen=True)
class Output:
    name: str
    binary: bool = False
    classification: int = 0  # top-k classes as BYTES; 0: the tensor itself


@dataclasses.dataclass(frozen=True)
class Request:
    images: np.ndarray
    outputs: tuple
    id: str = None


def _header_length(value, body_size):
    if value is None:
        return None
    length = int(value) if re.fullmatch(r"[0-9]{1,12}", value) else -1
    if not 0 < length <= body_size:
        raise ClientError(400, f"{HEADER_LENGTH} is {value!r}; expected the length in bytes "
                          f"of the JSON header, 1 to the body's {body_size}")
    return length


def _dict(value, what):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClientError(400, f"{what} must be a JSON object")
    return value


def _images(tensor, header_length, binary, model, max_batch):
    name = tensor.get("name")
    if name != model.input_name:
        raise ClientError(400, f"unknown input {name!r}; the model takes one input "
                          f"{model.input_name!r}")
    unknown = set(tensor) - _TENSOR_KEYS
    if unknown:
        raise ClientError(400, f"unknown keys {sorted(unknown)} in input {name!r}")
    if tensor.get("datatype") != "FP32":
        raise ClientError(400, f"input {name!r} has datatype {tensor.get('datatype')!r}; "
                          "the model takes FP32 (float32 pixels in [0, 1])")
    shape = tensor.get("shape")
    expected = f"[N, {', '.join(map(str, model.image_shape))}]"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) \
            or tuple(shape[1:]) != model.image_shape:
        raise ClientError(400, f"input {name!r} has shape {shape}; expected {expected}")
    if shape[0] == 0:
        raise ClientError(400, "empty batch: send at least one image")
    if shape[0] > max_batch:  # before any data is read or allocated
        raise ClientError(400, f"batch of {shape[0]} images is above this server's "
                          f"maximum of {max_batch}; split it")
    count = math.prod(shape)
    parameters = _dict(tensor.get("parameters"), f"the parameters of input {name!r}")
    if any(key.startswith("shared_memory") for key in parameters):
        raise ClientError(400, "shared-memory tensors are not supported; send the data in "
                          "the request (JSON or binary)")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if header_length is None:
            raise ClientError(400, f"input {name!r} has binary_data_size but the request has "
                              f"no {HEADER_LENGTH} header")
        if type(size) is not int or size != 4 * count:
            raise ClientError(400, f"input {name!r} has binary_data_size {size!r}; shape "
                              f"{shape} of FP32 is {4 * count} bytes")
        if len(binary) != size:
            raise ClientError(400, f"{len(binary)} bytes follow the JSON header; input "
                              f"{name!r} has binary_data_size {size}")
        values = np.frombuffer(binary, "<f4").reshape(shape)
    else:
        if binary:
            raise ClientError(400, f"{len(binary)} bytes follow the JSON header, but no input "
                              "has parameters.binary_data_size")
        if "data" not in tensor:
            raise ClientError(400, f"input {name!r} has no data (and no binary_data_size)")
        data = tensor["data"]
        if not isinstance(data, list):
            raise ClientError(400, f"the data of input {name!r} must be a list of numbers")
        values = as_array(data, model.image_shape)
        if values.size != count:
            raise ClientError(400, f"input {name!r} has {values.size} values; shape {shape} "
                              f"needs {count}")
        if values.ndim != 1 and list(values.shape) != shape:
            raise ClientError(400, f"the data of input {name!r} is nested as "
                              f"{list(values.shape)}; send it flat (row-major) or nested as "
                              f"its shape {shape}")
        values = values.reshape(shape)
    return check_images(values, model.image_shape, max_batch)


def _outputs(request, parameters, num_classes):
    asked = request.get("outputs")
    default = parameters.get("binary_data_output", False)  # the default of every output
    if not isinstance(default, bool):
        raise ClientError(400, "parameters.binary_data_output must be true or false")
    if asked is None:
        return tuple(Output(name, default) for name in OUTPUTS)
    if not isinstance(asked, list) or not asked:
        raise ClientError(400, '"outputs" must be a list of {"name": ...} objects')
    outputs = []
    for item in asked:
        if not isinstance(item, dict) or item.get("name") not in OUTPUTS:
            name = item.get("name") if isinstance(item, dict) else item
            raise ClientError(400, f"unknown output {name!r}; the model's outputs are "
                              f"{', '.join(OUTPUTS)}")
        options = _dict(item.get("parameters"), f"the parameters of output {item['name']!r}")
        if any(key.startswith("shared_memory") for key in options):
            raise ClientError(400, "shared-memory tensors are not supported")
        binary = options.get("binary_data", default)
        k = options.get("classification", 0)
        if not isinstance(binary, bool):
            raise ClientError(400, f"parameters.binary_data of output {item['name']!r} must "
                              "be true or false")
        if type(k) is not int or not 0 <= k <= num_classes or \
                (k and item["name"] == "label"):
            raise ClientError(400, f"parameters.classification of output {item['name']!r} is "
                              f"{k!r}; expected 1 to {num_classes} classes, on logits or "
                              "probabilities")
        outputs.append(Output(item["name"], binary, k))
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise ClientError(400, f"outputs {names} name one output twice")
    return tuple(outputs)


def parse(body, header_length, model, max_batch):
    """An infer request (`body` bytes, the Inference-Header-Content-Length header
    or None) as a `Request` whose images passed validate.check_images.

    Raises:
      ClientError: a request the protocol or the model does not allow (400).
    """
    length = _header_length(header_length, len(body))
    header, binary = (body, b"") if length is None else (body[:length], body[length:])
    request = loads(header)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ClientError(400, 'expected a JSON object {"inputs": [{"name": "images", '
                          '"datatype": "FP32", "shape": [N, H, W, C], "data": [...]}]}')
    unknown = set(request) - _REQUEST_KEYS
    if unknown:
        raise ClientError(400, f"unknown keys {sorted(unknown)}; an infer request has "
                          f"{', '.join(sorted(_REQUEST_KEYS))}")
    for key, want in (("model_name", model.name), ("model_version", model.version)):
        if key in request and request[key] != want:
            raise ClientError(400, f"{key} {request[key]!r} in the body; this model is "
                              f"{want!r}")
    inputs = request["inputs"]
    if len(inputs) != 1:
        raise ClientError(400, f"{len(inputs)} inputs; the model takes one input tensor "
                          f"{model.input_name!r}")
    if not isinstance(inputs[0], dict):
        raise ClientError(400, 'an input tensor must be a JSON object {"name", "shape", '
                          '"datatype", "data"}')
    parameters = _dict(request.get("parameters"), "the request's parameters")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ClientError(400, '"id" must be a string')
    # true/false/null among the pixels (the envelope's parameters may hold their own).
    if has_literals(header) and holds_literals(inputs[0].get("data", [])):
        raise ClientError(400, literal_message(f"the data of input {model.input_name!r}"))
    images = _images(inputs[0], length, binary, model, max_batch)
    return Request(images, _outputs(request, parameters, model.num_classes), request_id)


def _classify(values, k, class_names):
    top = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return np.array([[f"{row[i]:f}:{i}:{class_names[i]}".encode() for i in indices]
                     for row, indices in zip(values, top)], dtype=object)


def _raw(values, datatype):
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values.reshape(-1))
    return np.ascontiguousarray(values, "<f4" if datatype == "FP32" else "<i8").tobytes()


def respond(request, results, model):
    """The answer to `request` given `results` {"logits", "probabilities", "label"}:
    (body bytes, content type, extra headers)."""
    outputs, blobs = [], []
    for output in request.outputs:
        values = results[output.name]
        datatype = "INT64" if output.name == "label" else "FP32"
        if output.classification:
            values = _classify(values, output.classification, model.class_names)
            datatype = "BYTES"
        entry = {"name": output.name, "datatype": datatype, "shape": list(values.shape)}
        if output.binary:
            blob = _raw(values, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [v.decode() for v in values.reshape(-1)]
        else:
            entry["data"] = values.reshape(-1).tolist()
        outputs.append(entry)
    answer = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if request.id is not None:
        answer["id"] = request.id
    text = json.dumps(answer).encode()
    if not blobs:
        return text, "application/json", {}
    return text + b"".join(blobs), "application/octet-stream", {HEADER_LENGTH: str(len(text))}
