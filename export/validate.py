"""What every request of every protocol must pass before it reaches the model.

Each protocol (native, Open Inference, TF Serving) parses its own envelope; the
images inside then go through `check_images`, so that every door refuses the
same bad pixels with the same words: a batch of 1..max_batch images of the
model's shape, finite, in [0, 1]. Pixels outside [0, 1] are rejected, not
clipped: a clipped image is not the one the client meant, and the model's
robustness holds for the [0, 1] box it was trained on.
"""

import json
import re

import numpy as np


class ClientError(Exception):
    """A request the server cannot answer; `status` is the HTTP status (4xx, or
    503 when the server sheds load), `headers` any to send with it."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def loads(body):
    """`body` (bytes) as JSON, refusing NaN and Infinity (which Python accepts)."""
    def no_constants(token):  # NaN, Infinity, -Infinity
        raise ClientError(400, f"non-finite value {token} in the JSON; pixels must be "
                          "finite numbers in [0, 1]")
    try:
        return json.loads(body, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClientError(400, f"malformed JSON: {err}") from None
    except RecursionError:
        raise ClientError(400, "JSON nested too deeply; images are [N, H, W, C]") from None
    except ValueError as err:  # an integer of more than 4,300 digits (CPython's limit)
        raise ClientError(400, f"a number in the JSON cannot be read: {err}") from None


# numpy reads true/false as 1/0 beside numbers, so they must be found in the text.
_JSON_LITERALS = re.compile(rb"\b(true|false|null)\b")


def has_literals(body):
    """Whether the JSON text `body` has true, false or null anywhere (a fast test: when
    an envelope's own fields cannot hold them, it is exact for its numbers)."""
    return _JSON_LITERALS.search(body) is not None


def literal_message(where):
    return (f"non-numeric values (true, false or null) in {where}; pixels must be numbers "
            "in [0, 1]")


def refuse_literals(body, where):
    """ClientError if the JSON `body` has true, false or null: for envelopes whose
    own fields were checked and hold none (so any one is among the pixels)."""
    if has_literals(body):
        raise ClientError(400, literal_message(where))


def holds_literals(values):
    """Whether the parsed nested lists `values` hold a bool or None (exact, slower)."""
    stack = [values]
    while stack:
        value = stack.pop()
        if not isinstance(value, list):
            if value is None or isinstance(value, bool):
                return True
            continue
        types = set(map(type, value))
        if list in types:
            stack.extend(v for v in value if type(v) is list)
        if bool in types or type(None) in types:
            return True
    return False


def as_array(values, image_shape):
    """Nested lists (or an array) as a numeric array, or ClientError."""
    try:
        x = np.asarray(values)
    except ValueError:  # numpy 2 refuses ragged nesting
        raise ClientError(400, f"ragged images: every image must have shape "
                          f"[{', '.join(map(str, image_shape))}]") from None
    if x.dtype.kind not in "fiu":
        raise ClientError(400, f"non-numeric values (read as {x.dtype}); pixels must be "
                          "numbers in [0, 1]")
    return x


def check_images(values, image_shape, max_batch):
    """`values` (nested lists or an array) as float32 [N, *image_shape], or ClientError."""
    expected = f"[N, {', '.join(map(str, image_shape))}]"
    if isinstance(values, np.ndarray) and values.ndim == 0:
        raise ClientError(400, f"a single number; expected images of shape {expected}")
    if len(values) == 0:
        raise ClientError(400, "empty batch: send at least one image")
    if len(values) > max_batch:
        raise ClientError(400, f"batch of {len(values)} images is above this server's "
                          f"maximum of {max_batch}; split it")
    x = as_array(values, image_shape)
    if x.ndim != len(image_shape) + 1:
        raise ClientError(400, f"images of rank {x.ndim} (shape {list(x.shape)}); expected "
                          f"rank {len(image_shape) + 1}, shape {expected}")
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise ClientError(400, f"images of shape {list(x.shape)}; expected {expected}")
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise ClientError(400, "NaN or infinite pixels; pixels must be finite, in [0, 1]")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ClientError(400, f"pixels in [{low:g}, {high:g}]; expected [0, 1] (divide "
                          "0-255 images by 255). Out-of-range pixels are rejected, not clipped")
    return x
