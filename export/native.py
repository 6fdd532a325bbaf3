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
        try:
            values = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ClientError(400, f"the body is not a .npy array (np.save): {err}") from None
        if not isinstance(values, np.ndarray):
            raise ClientError(400, "the body is not a single .npy array (np.save)")
    else:
        raise unsupported(content_type)
    return check_images(values, image_shape, max_batch)


def answer(probabilities, class_names):
    """The /v1/predict answer for a batch's probabilities [N, K]."""
    labels = probabilities.argmax(axis=1)
    return {"labels": labels.tolist(), "classes": [class_names[i] for i in labels],
            "probabilities": probabilities.tolist()}
