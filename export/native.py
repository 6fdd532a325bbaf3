"""The server's own protocol: POST /v1/predict, GET /v1/metadata.

    POST /v1/predict    a batch of images, float pixels in [0, 1], shape [N, H, W, C]:
                          Content-Type: application/json   {"instances": [image, ...]}
                          Content-Type: application/x-npy  the bytes of np.save(array)
                        -> {"labels": [N], "classes": [N names], "probabilities": [N][K]}

Kept beside the standard protocols (open_inference, tf_serving) because its .npy
body is the cheapest way to send float images from Python, and existing clients
use it.
"""

import io
import math

import numpy as np

from export.validate import ClientError, check_images, loads, refuse_literals

JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/octet-stream")


def unsupported(content_type):
    """The 415 for a Content-Type the server does not read (None: no header)."""
    return ClientError(415, f"Content-Type {content_type or 'none'!r} is not supported; "
                       f"send {JSON_TYPES[0]} or {NPY_TYPES[0]}")


def decode(body, content_type, image_shape, max_batch):
    """The images of a /v1/predict request body as float32 [N, H, W, C], checked.

    Raises:
      ClientError: anything that is not a batch of 1..max_batch finite images of
        `image_shape` with pixels in [0, 1].
    """
    if content_type in JSON_TYPES:
        request = loads(body)
        if not isinstance(request, dict) or "instances" not in request:
            raise ClientError(400, 'expected a JSON object {"instances": [image, ...]}')
        if set(request) != {"instances"}:
            raise ClientError(400, f"unknown keys {sorted(set(request) - {'instances'})}; "
                              'expected only "instances"')
        values = request["instances"]
        if not isinstance(values, list):
            raise ClientError(400, '"instances" must be a list of images')
        refuse_literals(body, '"instances"')
    elif content_type in NPY_TYPES:
        values = _npy(body, max_batch)
    else:
        raise unsupported(content_type)
    return check_images(values, image_shape, max_batch)


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def _npy(body, max_batch):
    """The array of an np.save body. Its header is read first: the array is
    allocated only once the header's shape and dtype account for the body's bytes
    exactly, and the batch is within max_batch (a 100-byte header may declare
    terabytes)."""
    buffer = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(buffer)
        if version not in _NPY_HEADERS:
            raise ValueError(f".npy format version {version[0]}.{version[1]}; np.save "
                             "writes 1.0 or 2.0")
        shape, _, dtype = _NPY_HEADERS[version](buffer)
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise ClientError(400, f"the body is not a .npy array (np.save): {err}") from None
    except (RecursionError, MemoryError):  # numpy's header parser on a nested expression
        raise ClientError(400, "the body is not a .npy array (np.save): its header is "
                          "not a plain dictionary") from None
    if dtype.hasobject or dtype.kind not in "biufc":
        raise ClientError(400, f"non-numeric values (read as {dtype}); pixels must be "
                          "numbers in [0, 1]")
    if shape and shape[0] > max_batch:
        raise ClientError(400, f"batch of {shape[0]} images is above this server's "
                          f"maximum of {max_batch}; split it")
    if any(d < 0 for d in shape):
        raise ClientError(400, f"the .npy header's shape {list(shape)} has a negative "
                          "dimension")
    size = math.prod(shape) * dtype.itemsize
    if size != len(body) - buffer.tell():
        raise ClientError(400, f"the .npy header says shape {list(shape)} of {dtype} "
                          f"({size} bytes), but {len(body) - buffer.tell()} bytes follow it")
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OverflowError) as err:  # e.g. (0, 2**64): no bytes, no such array
        raise ClientError(400, f"the .npy header's shape {list(shape)} is not an array "
                          f"numpy can make: {err}") from None


def answer(probabilities, class_names):
    """The /v1/predict answer for a batch's probabilities [N, K]."""
    labels = probabilities.argmax(axis=1)
    return {"labels": labels.tolist(), "classes": [class_names[i] for i in labels],
            "probabilities": probabilities.tolist()}
