"""An HTTP server for an exported classifier, on aiohttp and ONNX Runtime.

    GET  /healthz       {"status": "ok", "requests": n, "batches": n, ...}
    GET  /v1/metadata   the model card (model_card.json beside the .onnx, or what
                        the ONNX file itself says)
    POST /v1/predict    a batch of images, float pixels in [0, 1], shape [N, H, W, C]:
                          Content-Type: application/json   {"instances": [image, ...]}
                          Content-Type: application/x-npy  the bytes of np.save(array)
                        -> {"labels": [N], "classes": [N names], "probabilities": [N][K]}

Bad input never reaches the model. It gets a 4xx with {"error": "..."} saying what was
wrong and what is expected: 400 malformed JSON or .npy, no "instances", wrong rank or
shape, non-numeric values, NaN or infinity, pixels outside [0, 1] (rejected, not
clipped: a clipped image is not the one the client meant, and the model's robustness
holds for the [0, 1] box it was trained on), an empty batch, a batch above
`max_batch`; 413 a body above `max_body_bytes`; 415 another content type; 404 and
405 for unknown paths and methods. A 500 means a bug on our side.

Batching: requests that arrive while the model is busy wait in a queue; when it is
free, it takes everything queued (up to `max_batch` images) as one batch. A lone
request runs at once (no added latency); under load, batches grow by themselves.
`batch_delay_ms` > 0 also waits that long for company before each batch.
ONNX Runtime runs in one worker thread, so the event loop keeps parsing requests
meanwhile.

SIGTERM or SIGINT stops accepting connections, finishes the requests in flight,
then exits.

This module imports no TensorFlow: it serves where only onnxruntime, numpy and
aiohttp are installed.
"""

import asyncio
import concurrent.futures
import dataclasses
import io
import json
import os
import re
import signal

import numpy as np
import onnxruntime
from aiohttp import web

JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/octet-stream")


class ClientError(Exception):
    """A request the server cannot answer; `status` is the HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    max_batch: int = 256                   # images per request, and per merged batch
    max_body_bytes: int = 32 * 1024 * 1024
    batch_delay_ms: float = 0.0            # extra wait for company before a batch

    def __post_init__(self):
        if self.max_batch < 1 or self.max_body_bytes < 1 or self.batch_delay_ms < 0:
            raise ValueError(f"bad limits {self}: max_batch and max_body_bytes must be >= 1, "
                             "batch_delay_ms >= 0")


class Model:
    """An ONNX classifier: images float32 [N, H, W, C] -> logits, probabilities."""

    def __init__(self, onnx_path, card=None):
        try:
            self.session = onnxruntime.InferenceSession(
                onnx_path, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own kinds for bad files
            raise ValueError(f"cannot load {onnx_path} as an ONNX model: "
                             f"{str(err).splitlines()[0]}") from None
        inputs = self.session.get_inputs()
        outputs = {o.name for o in self.session.get_outputs()}
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or \
                not all(isinstance(d, int) for d in inputs[0].shape[1:]) or \
                not {"logits", "probabilities"} <= outputs:
            raise ValueError(f"{onnx_path} takes {[(i.name, i.shape) for i in inputs]} and "
                             f"gives {sorted(outputs)}; the server needs one input of images "
                             "[N, H, W, C] and outputs logits and probabilities (an export "
                             "of --mode=export)")
        self.input_name = inputs[0].name
        self.image_shape = tuple(inputs[0].shape[1:])
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        self.card = card or {
            "input": {"name": self.input_name, "dtype": "float32",
                      "shape": [None, *self.image_shape], "range": [0.0, 1.0]},
            "note": "no model_card.json beside the ONNX file"}
        names = self.card.get("class_names") or [str(i) for i in range(self.num_classes)]
        self.class_names = list(names)

    def __call__(self, x):
        return self.session.run(["probabilities"], {self.input_name: x})[0]


def _loads(body):
    def no_constants(token):  # NaN, Infinity, -Infinity
        raise ClientError(400, f"non-finite value {token} in the JSON; pixels must be "
                          "finite numbers in [0, 1]")
    try:
        return json.loads(body, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClientError(400, f"malformed JSON: {err}") from None


# numpy reads true/false as 1/0 beside numbers; the only key is "instances", so
# these words anywhere in a well-formed body are values that are not numbers.
_JSON_LITERALS = re.compile(rb"\b(true|false|null)\b")


def decode(body, content_type, image_shape, max_batch):
    """The images of a /v1/predict request body as float32 [N, H, W, C], checked.

    Raises:
      ClientError: anything that is not a batch of 1..max_batch finite images of
        `image_shape` with pixels in [0, 1].
    """
    if content_type in JSON_TYPES:
        request = _loads(body)
        if not isinstance(request, dict) or "instances" not in request:
            raise ClientError(400, 'expected a JSON object {"instances": [image, ...]}')
        if set(request) != {"instances"}:
            raise ClientError(400, f"unknown keys {sorted(set(request) - {'instances'})}; "
                              'expected only "instances"')
        values = request["instances"]
        if not isinstance(values, list):
            raise ClientError(400, '"instances" must be a list of images')
        if _JSON_LITERALS.search(body):
            raise ClientError(400, "non-numeric values (true, false or null) in "
                              '"instances"; pixels must be numbers in [0, 1]')
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


def unsupported(content_type):
    """The 415 for a Content-Type the server does not read (None: no header)."""
    return ClientError(415, f"Content-Type {content_type or 'none'!r} is not supported; "
                       f"send {JSON_TYPES[0]} or {NPY_TYPES[0]}")


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
    try:
        x = np.asarray(values)
    except ValueError:  # numpy 2 refuses ragged nesting
        raise ClientError(400, f"ragged images: every image must have shape "
                          f"[{', '.join(map(str, image_shape))}]") from None
    if x.dtype.kind not in "fiu":
        raise ClientError(400, f"non-numeric values (read as {x.dtype}); pixels must be "
                          "numbers in [0, 1]")
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


class Batcher:
    """Merges concurrent requests into batches for `run` (see the module doc)."""

    def __init__(self, run, max_batch, delay_seconds=0.0):
        self._run, self._max_batch, self._delay = run, max_batch, delay_seconds
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "onnxruntime")
        self._task = None
        self.requests = self.batches = self.images = 0

    def start(self):
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self):
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def predict(self, x):
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((x, future))
        return await future

    async def _serve(self):
        held = None
        while True:
            first = held or await self._queue.get()
            held = None
            if self._delay:
                await asyncio.sleep(self._delay)
            group, size = [first], len(first[0])
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if size + len(item[0]) > self._max_batch:
                    held = item
                    break
                group.append(item)
                size += len(item[0])
            x = group[0][0] if len(group) == 1 else np.concatenate([g[0] for g in group])
            try:
                out = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run, x)
            except Exception as err:  # a model failure answers these requests, not the loop
                for _, future in group:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches += 1
            self.requests += len(group)
            self.images += size
            start = 0
            for part, future in group:
                if not future.done():  # a client that went away cancels its future
                    future.set_result(out[start:start + len(part)])
                start += len(part)


LIMITS = web.AppKey("limits", Limits)
BATCHER = web.AppKey("batcher", Batcher)


def _error(status, message):
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _json_errors(request, handler):
    """Every error as JSON {"error": ...}: ours, aiohttp's (404, 405, 413), and bugs."""
    try:
        return await handler(request)
    except ClientError as err:
        return _error(err.status, str(err))
    except web.HTTPRequestEntityTooLarge:  # a body without Content-Length, read too far
        return _error(413, "body above this server's maximum of "
                      f"{request.app[LIMITS].max_body_bytes} bytes")
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _error(err.status, f"{err.reason}: {request.method} {request.path} "
                      "(endpoints: GET /healthz, GET /v1/metadata, POST /v1/predict)")
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # a bug of ours: logged, answered, and the server lives on
        request.app.logger.exception("error serving %s %s", request.method, request.path)
        return _error(500, "internal error (logged by the server)")


def make_app(model, limits=Limits()):
    """The aiohttp application serving `model` (a `Model`) under `limits`."""
    batcher = Batcher(model, limits.max_batch, limits.batch_delay_ms / 1000)

    async def healthz(request):
        return web.json_response({"status": "ok", "requests": batcher.requests,
                                  "batches": batcher.batches, "images": batcher.images})

    async def metadata(request):
        return web.json_response(model.card)

    async def predict(request):
        if request.content_length is not None and \
                request.content_length > limits.max_body_bytes:
            raise ClientError(413, f"body of {request.content_length} bytes is above this "
                              f"server's maximum of {limits.max_body_bytes} bytes")
        # Without parameters such as charset; aiohttp reads a missing header as
        # application/octet-stream, which must not pass for a deliberate .npy body.
        content_type = request.content_type if "Content-Type" in request.headers else None
        if content_type not in JSON_TYPES + NPY_TYPES:  # refused before reading the body
            raise unsupported(content_type)
        x = decode(await request.read(), content_type, model.image_shape, limits.max_batch)
        probabilities = await batcher.predict(x)
        labels = probabilities.argmax(axis=1)
        return web.json_response({"labels": labels.tolist(),
                                  "classes": [model.class_names[i] for i in labels],
                                  "probabilities": probabilities.tolist()})

    async def on_startup(app):
        batcher.start()

    async def on_cleanup(app):
        await batcher.stop()

    app = web.Application(middlewares=[_json_errors], client_max_size=limits.max_body_bytes)
    app.add_routes([web.get("/healthz", healthz), web.get("/v1/metadata", metadata),
                    web.post("/v1/predict", predict)])
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app[LIMITS] = limits
    app[BATCHER] = batcher
    return app


def load(onnx_path):
    """The `Model` at `onnx_path`, with the model_card.json beside it if there is one."""
    if not os.path.isfile(onnx_path):
        raise ValueError(f"no ONNX model at {onnx_path}")
    card_path = os.path.join(os.path.dirname(onnx_path), "model_card.json")
    card = None
    if os.path.isfile(card_path):
        with open(card_path) as f:
            card = json.load(f)
    return Model(onnx_path, card)


async def _serve(model, host, port, limits, log, shutdown_seconds):
    runner = web.AppRunner(make_app(model, limits), access_log=None,
                           shutdown_timeout=shutdown_seconds)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as err:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}; "
                      "choose another --port") from None
    bound_host, bound_port = runner.addresses[0][:2]
    log(f"serving {model.image_shape} images -> {model.num_classes} classes on "
        f"http://{bound_host}:{bound_port} (max batch {limits.max_batch}, "
        f"max body {limits.max_body_bytes} bytes); SIGTERM or Ctrl-C stops")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log("stopping: finishing requests in flight")
    await runner.cleanup()
    log("stopped")


def serve(onnx_path, host="127.0.0.1", port=8500, limits=Limits(), log=print,
          shutdown_seconds=30.0):
    """Serves the ONNX model at `onnx_path` until SIGTERM or SIGINT (port 0: any free
    port, printed). Raises ValueError for a bad model, OSError for a busy port."""
    asyncio.run(_serve(load(onnx_path), host, port, limits, log, shutdown_seconds))
