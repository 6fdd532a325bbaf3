"""An HTTP server for an exported classifier, on aiohttp and ONNX Runtime.

It speaks three protocols over one model, batcher and set of checks:

    Open Inference Protocol (KServe V2, Triton)   /v2/...         export/open_inference.py
    TensorFlow Serving REST                       /v1/models/...  export/tf_serving.py
    this server's own                             /v1/predict     export/native.py

    GET  /healthz       {"status": "ok", "requests": n, "batches": n, "images": n}
    GET  /metrics       Prometheus text format (export/metrics.py)
    GET  /v1/metadata   the model card (model_card.json beside the .onnx, or what
                        the ONNX file itself says)

The model is served under one name (`Model.name`: the card's, else the file's
stem) and version 1; another name or version is a 404 that names the right one.

Bad input never reaches the model. It gets a 4xx with {"error": "..."} saying what
was wrong and what is expected (export/validate.py: wrong shape or datatype,
non-numeric values, NaN or infinity, pixels outside [0, 1], an empty batch or one
above `max_batch`); 413 a body above `max_body_bytes`; 404 and 405 for unknown
paths and methods. A 500 means a bug on our side.

Batching: requests that arrive while the model is busy wait in a queue; when it is
free, it takes everything queued (up to `max_batch` images) as one batch. A lone
request runs at once (no added latency); under load, batches grow by themselves.
`batch_delay_ms` > 0 also waits that long for company before each batch.
ONNX Runtime runs in one worker thread, so the event loop keeps parsing requests
meanwhile.

SIGTERM or SIGINT stops accepting connections, finishes the requests in flight,
then exits.

This module imports no TensorFlow: it serves where only onnxruntime, numpy,
aiohttp and prometheus_client are installed (requirements-serve.txt).
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import signal
import time
from importlib import metadata as package_metadata

import numpy as np
import onnxruntime
from aiohttp import web

from export import metrics, native, open_inference, tf_serving
from export.validate import ClientError

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
    """An ONNX classifier: images float32 [N, H, W, C] -> (logits, probabilities)."""

    version = "1"  # the only version a server serves

    def __init__(self, onnx_path, card=None, name=None):
        try:
            self.session = onnxruntime.InferenceSession(
                onnx_path, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own kinds for bad files
            raise ValueError(f"cannot load {onnx_path} as an ONNX model: "
                             f"{str(err).splitlines()[0]}") from None
        inputs = self.session.get_inputs()
        outputs = {o.name: o for o in self.session.get_outputs()}
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or \
                not all(isinstance(d, int) for d in inputs[0].shape[1:]) or \
                not {"logits", "probabilities"} <= set(outputs) or \
                inputs[0].type != "tensor(float)":
            raise ValueError(f"{onnx_path} takes {[(i.name, i.type, i.shape) for i in inputs]} "
                             f"and gives {sorted(outputs)}; the server needs one float32 "
                             "input of images [N, H, W, C] and outputs logits and "
                             "probabilities (an export of --mode=export)")
        self.input_name = inputs[0].name
        self.image_shape = tuple(inputs[0].shape[1:])
        self.num_classes = int(outputs["logits"].shape[-1])
        self.card = card or {
            "input": {"name": self.input_name, "dtype": "float32",
                      "shape": [None, *self.image_shape], "range": [0.0, 1.0]},
            "note": "no model_card.json beside the ONNX file"}
        self.name = name or self.card.get("name") or \
            os.path.splitext(os.path.basename(onnx_path))[0]
        names = self.card.get("class_names") or [str(i) for i in range(self.num_classes)]
        self.class_names = list(names)

    def __call__(self, x):
        return tuple(self.session.run(["logits", "probabilities"], {self.input_name: x}))


class Batcher:
    """Merges concurrent requests into batches for `run` (see the module doc).

    `run(x)` returns an array or a tuple of arrays, each [len(x), ...]; every
    request gets its own rows. `on_batch(images)` is told of each batch run.
    """

    def __init__(self, run, max_batch, delay_seconds=0.0, on_batch=None):
        self._run, self._max_batch, self._delay = run, max_batch, delay_seconds
        self.on_batch = on_batch or (lambda images: None)
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "onnxruntime")
        self._task = None
        self._held = None  # taken off the queue, waiting for the next batch
        self.requests = self.batches = self.images = 0

    @property
    def queued(self):
        """Requests waiting for the model."""
        return self._queue.qsize() + (self._held is not None)

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
        while True:
            first = self._held or await self._queue.get()
            self._held = None
            if self._delay:
                await asyncio.sleep(self._delay)
            group, size = [first], len(first[0])
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if size + len(item[0]) > self._max_batch:
                    self._held = item
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
            self.on_batch(size)
            start = 0
            for part, future in group:
                end = start + len(part)
                if not future.done():  # a client that went away cancels its future
                    future.set_result(tuple(o[start:end] for o in out)
                                      if isinstance(out, tuple) else out[start:end])
                start = end


LIMITS = web.AppKey("limits", Limits)
BATCHER = web.AppKey("batcher", Batcher)
METRICS = web.AppKey("metrics", metrics.Metrics)

def endpoints(app):
    """Every route of `app`, "METHOD /path" (for the 404 and 405 messages)."""
    return ", ".join(f"{route.method} {route.resource.canonical}"
                     for route in app.router.routes() if route.method != "HEAD")


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
                      f"(endpoints: {endpoints(request.app)})")
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # a bug of ours: logged, answered, and the server lives on
        request.app.logger.exception("error serving %s %s", request.method, request.path)
        return _error(500, "internal error (logged by the server)")


def _endpoint(request):
    resource = getattr(request.match_info.route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _observe(request, handler):
    """Counts and times every answer, errors included (outside _json_errors); a
    request whose client went away got no answer and is not counted."""
    start = time.perf_counter()

    def count(status):
        request.app[METRICS].observe_request(_endpoint(request), request.method, status,
                                             time.perf_counter() - start)
    try:
        response = await handler(request)
    except web.HTTPException as err:  # what _json_errors lets through: below 400
        count(err.status)
        raise
    count(response.status)
    return response


def _version():
    try:
        return package_metadata.version("ardir-tf")
    except package_metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "checkout"


def make_app(model, limits=Limits()):
    """The aiohttp application serving `model` (a `Model`) under `limits`."""
    batcher = Batcher(model, limits.max_batch, limits.batch_delay_ms / 1000)
    observed = metrics.Metrics(queue_depth=lambda: batcher.queued)
    batcher.on_batch = observed.observe_batch

    def the_model(request):
        """404 unless the path names the served model (and version 1)."""
        name = request.match_info["model"]
        version = request.match_info.get("version", model.version)
        if name != model.name:
            raise ClientError(404, f"unknown model {name!r}; this server serves "
                              f"{model.name!r}")
        if version != model.version:
            raise ClientError(404, f"unknown version {version!r} of model {name!r}; this "
                              f"server serves version {model.version}")

    async def body(request):
        if request.content_length is not None and \
                request.content_length > limits.max_body_bytes:
            raise ClientError(413, f"body of {request.content_length} bytes is above this "
                              f"server's maximum of {limits.max_body_bytes} bytes")
        return await request.read()

    async def run(x):
        logits, probabilities = await batcher.predict(x)
        return {"logits": logits, "probabilities": probabilities,
                "label": probabilities.argmax(axis=1).astype(np.int64)}

    # --- this server's own protocol, and operations ---
    async def healthz(request):
        return web.json_response({"status": "ok", "requests": batcher.requests,
                                  "batches": batcher.batches, "images": batcher.images})

    async def metrics_text(request):
        return web.Response(body=observed.text(), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def card(request):
        return web.json_response(model.card)

    async def predict(request):
        # Without parameters such as charset; aiohttp reads a missing header as
        # application/octet-stream, which must not pass for a deliberate .npy body.
        content_type = request.content_type if "Content-Type" in request.headers else None
        if content_type not in native.JSON_TYPES + native.NPY_TYPES:  # before the body
            raise native.unsupported(content_type)
        x = native.decode(await body(request), content_type, model.image_shape,
                          limits.max_batch)
        results = await run(x)
        return web.json_response(native.answer(results["probabilities"], model.class_names))

    # --- the Open Inference Protocol ---
    async def v2_server(request):
        return web.json_response(open_inference.server_metadata(_version()))

    async def v2_live(request):
        return web.json_response({"live": True})

    async def v2_ready(request):
        return web.json_response({"ready": True})

    async def v2_model(request):
        the_model(request)
        return web.json_response(open_inference.model_metadata(model))

    async def v2_model_ready(request):
        the_model(request)
        return web.json_response({"name": model.name, "ready": True})

    async def v2_infer(request):
        the_model(request)
        parsed = open_inference.parse(await body(request),
                                      request.headers.get(open_inference.HEADER_LENGTH),
                                      model, limits.max_batch)
        text, content_type, headers = open_inference.respond(parsed, await run(parsed.images),
                                                             model)
        return web.Response(body=text, headers={"Content-Type": content_type, **headers})

    # --- TensorFlow Serving's REST API ---
    async def tfs_status(request):
        the_model(request)
        return web.json_response(tf_serving.status(model))

    async def tfs_metadata(request):
        the_model(request)
        return web.json_response(tf_serving.metadata(model))

    async def tfs_predict(request):
        the_model(request)
        x, form = tf_serving.parse(await body(request), model, limits.max_batch)
        results = await run(x)
        return web.json_response(tf_serving.respond(form, results["logits"],
                                                    results["probabilities"]))

    async def on_startup(app):
        batcher.start()

    async def on_cleanup(app):
        await batcher.stop()

    app = web.Application(middlewares=[_observe, _json_errors],
                          client_max_size=limits.max_body_bytes)
    model_path = "{model:[^/:]+}"
    versioned = [f"/{model_path}", f"/{model_path}/versions/{{version:[^/:]+}}"]
    routes = [web.get("/healthz", healthz), web.get("/metrics", metrics_text),
              web.get("/v1/metadata", card), web.post("/v1/predict", predict),
              web.get("/v2", v2_server), web.get("/v2/health/live", v2_live),
              web.get("/v2/health/ready", v2_ready)]
    for path in versioned:
        routes += [web.get(f"/v2/models{path}", v2_model),
                   web.get(f"/v2/models{path}/ready", v2_model_ready),
                   web.post(f"/v2/models{path}/infer", v2_infer),
                   web.get(f"/v1/models{path}", tfs_status),
                   web.get(f"/v1/models{path}/metadata", tfs_metadata),
                   web.post(f"/v1/models{path}:predict", tfs_predict)]
    app.add_routes(routes)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app[LIMITS] = limits
    app[BATCHER] = batcher
    app[METRICS] = observed
    return app


def load(onnx_path, name=None):
    """The `Model` at `onnx_path`, with the model_card.json beside it if there is one,
    served as `name` (default: the card's name, else the file's stem)."""
    if not os.path.isfile(onnx_path):
        raise ValueError(f"no ONNX model at {onnx_path}")
    card_path = os.path.join(os.path.dirname(onnx_path), "model_card.json")
    card = None
    if os.path.isfile(card_path):
        with open(card_path) as f:
            card = json.load(f)
    return Model(onnx_path, card, name)


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
    log(f"serving model {model.name!r} ({model.image_shape} images -> {model.num_classes} "
        f"classes) on http://{bound_host}:{bound_port}: Open Inference Protocol at /v2, "
        f"TF Serving REST at /v1/models/{model.name}, /v1/predict, /metrics (max batch "
        f"{limits.max_batch}, max body {limits.max_body_bytes} bytes); SIGTERM or Ctrl-C "
        "stops")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log("stopping: finishing requests in flight")
    await runner.cleanup()
    log("stopped")


def serve(onnx_path, host="127.0.0.1", port=8500, limits=Limits(), log=print,
          shutdown_seconds=30.0, name=None):
    """Serves the ONNX model at `onnx_path` as `name` (see `load`) until SIGTERM or
    SIGINT (port 0: any free port, printed). Raises ValueError for a bad model,
    OSError for a busy port."""
    asyncio.run(_serve(load(onnx_path, name), host, port, limits, log, shutdown_seconds))
