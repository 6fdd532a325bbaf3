"""The server's HTTP application: its limits, routes and error handling.

    make_app(model, limits)  the aiohttp application serving a served_model.Model
    Limits                   what it accepts and how much work it lets wait

The routes (see export/server.py for the list) are methods of `_Handlers`, one a
route, sharing the model, the batcher, the limits and the metrics.

Imports no TensorFlow.
"""

import asyncio
import concurrent.futures
import dataclasses
import functools
import time
from importlib import metadata as package_metadata

import numpy as np
from aiohttp import http_exceptions, web, web_protocol

from export import metrics, native, open_inference, tf_serving
from export.batching import Batcher, unavailable
from export.validate import ClientError

# Bodies below this decode on the event loop (well under a millisecond); larger
# ones in the parser threads.
INLINE_PARSE_BYTES = 64 * 1024

# Bytes of request body per pixel value in the largest encoding the protocols
# accept: JSON text (a float32 written out takes up to ~24 characters with its
# separator; binary encodings take 4), plus room for the envelope.
JSON_BYTES_PER_VALUE = 24
ENVELOPE_BYTES = 64 * 1024


def body_limit(image_shape, max_batch):
    """The largest body a valid request for `max_batch` images of `image_shape`
    needs, in its largest encoding (the default of `Limits.max_body_bytes`)."""
    return max_batch * int(np.prod(image_shape)) * JSON_BYTES_PER_VALUE + ENVELOPE_BYTES


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts, and how much work it lets wait (module doc).

    None: derived when the app is made: max_body_bytes from the model's image
    size (`body_limit`), max_in_flight = 2 x max_batch (a batch running and one
    forming, at one image per request)."""
    max_batch: int = 256                   # images per request, and per merged batch
    max_body_bytes: int | None = None
    batch_delay_ms: float = 0.0            # extra wait for company before a batch
    max_in_flight: int | None = None       # inference requests admitted at once; 503 beyond
    body_timeout_s: float = 30.0           # a request body must arrive within this; 408 after
    idle_timeout_s: float = 15.0           # a connection with no request under way is closed
    max_connections: int = 512             # open connections; more get 503 and are closed
    parse_threads: int = 2                 # request bodies decoded at once, off the event loop

    def __post_init__(self):
        if self.max_batch < 1 or (self.max_body_bytes is not None and self.max_body_bytes < 1) \
                or self.batch_delay_ms < 0 or \
                (self.max_in_flight is not None and self.max_in_flight < 1) or \
                not 0 < self.body_timeout_s <= 3600 or not 0 < self.idle_timeout_s <= 3600 or \
                self.max_connections < 1 or \
                self.parse_threads < 1:
            raise ValueError(f"bad limits {self}: max_batch, max_body_bytes, max_in_flight, "
                             "max_connections and parse_threads must be >= 1, "
                             "batch_delay_ms >= 0, body_timeout_s and idle_timeout_s in "
                             "(0, 3600]")

    def resolve(self, image_shape):
        """These limits with every None derived for images of `image_shape`."""
        return dataclasses.replace(
            self,
            max_body_bytes=self.max_body_bytes or body_limit(image_shape, self.max_batch),
            max_in_flight=self.max_in_flight or 2 * self.max_batch)


LIMITS = web.AppKey("limits", Limits)
BATCHER = web.AppKey("batcher", Batcher)
METRICS = web.AppKey("metrics", metrics.Metrics)

def endpoints(app):
    """Every route of `app`, "METHOD /path" (for the 404 and 405 messages)."""
    return ", ".join(f"{route.method} {route.resource.canonical}"
                     for route in app.router.routes() if route.method != "HEAD")


def _error(status, message, headers=None):
    headers = dict(headers or {})
    close = headers.pop("Connection", None) == "close"
    response = web.json_response({"error": message}, status=status, headers=headers)
    if close:  # the rest of the request is unread: the connection cannot be reused
        response.force_close()
    return response


@web.middleware
async def _json_errors(request, handler):
    """Every error as JSON {"error": ...}: ours, aiohttp's (404, 405, 413), and bugs."""
    try:
        return await handler(request)
    except ClientError as err:
        return _error(err.status, str(err), err.headers)
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


class _Handlers:
    """The routes' handlers, one method a route, over one model, batcher, set of
    limits and metrics; and what the inference routes share (admission, body
    reading, parsing off the event loop, the model's 404)."""

    def __init__(self, model, limits):
        self.model, self.limits = model, limits
        self.batcher = Batcher(model, limits.max_batch, limits.batch_delay_ms / 1000)
        self.metrics = metrics.Metrics(queue_depth=lambda: self.batcher.queued)
        self.batcher.on_batch = self.metrics.observe_batch
        self.parsers = concurrent.futures.ThreadPoolExecutor(limits.parse_threads, "parse")
        self.in_flight = 0  # inference requests admitted and not yet answered

    # --- what the inference routes share ---
    async def inference(self, work):
        """Runs `work()` for an inference request if the server has room for it
        (limits.max_in_flight), else answers 503 at once, before reading the body."""
        self.batcher.check_ready()  # before the body is read, as the limit below
        if self.in_flight >= self.limits.max_in_flight:
            self.metrics.shed("overload")
            raise unavailable(f"the server is at its limit of {self.limits.max_in_flight} "
                              "requests in flight; retry after a second")
        self.in_flight += 1
        try:
            return await work()
        finally:
            self.in_flight -= 1

    async def parse(self, fn, body, *args):
        """fn(body, *args), in a parser thread when the body is large: decoding a
        large JSON body takes long enough to stall every other connection if it
        ran on the event loop, while a small one decodes faster than the hop to a
        thread and back."""
        if len(body) < INLINE_PARSE_BYTES:
            return fn(body, *args)
        return await asyncio.get_running_loop().run_in_executor(
            self.parsers, functools.partial(fn, body, *args))

    def the_model(self, request):
        """404 unless the path names the served model (and version 1)."""
        model = self.model
        name = request.match_info["model"]
        version = request.match_info.get("version", model.version)
        if name != model.name:
            raise ClientError(404, f"unknown model {name!r}; this server serves "
                              f"{model.name!r}")
        if version != model.version:
            raise ClientError(404, f"unknown version {version!r} of model {name!r}; this "
                              f"server serves version {model.version}")

    async def body(self, request):
        limits = self.limits
        if request.content_length is not None and \
                request.content_length > limits.max_body_bytes:
            raise ClientError(413, f"body of {request.content_length} bytes is above this "
                              f"server's maximum of {limits.max_body_bytes} bytes")
        try:
            return await asyncio.wait_for(request.read(), limits.body_timeout_s)
        except (web_protocol.RequestPayloadError, http_exceptions.HttpProcessingError) as err:
            # e.g. a Content-Encoding the body does not decode with. The rest of the
            # body is unreadable: end it here (else aiohttp, draining it after the
            # answer, meets the same error and logs a traceback a request) and close.
            request.content.feed_eof()
            reason = " ".join(str(getattr(err, "message", err) or err).split())
            raise ClientError(400, f"cannot read the request body: {reason}",
                              {"Connection": "close"}) from None
        except asyncio.TimeoutError:
            self.metrics.shed("body_timeout")
            raise ClientError(408, f"the request body did not arrive within "
                              f"{limits.body_timeout_s:g} s", {"Connection": "close"}) from None

    async def run(self, x):
        logits, probabilities = await self.batcher.predict(x)
        return {"logits": logits, "probabilities": probabilities,
                "label": probabilities.argmax(axis=1).astype(np.int64)}

    # --- this server's own protocol, and operations ---
    async def healthz(self, request):
        batcher = self.batcher
        counts = {"requests": batcher.requests, "batches": batcher.batches,
                  "images": batcher.images}
        if not batcher.ready:
            return web.json_response({"status": "unavailable", "error": batcher.failure,
                                      **counts}, status=503)
        return web.json_response({"status": "ok", **counts})

    async def metrics_text(self, request):
        return web.Response(body=self.metrics.text(),
                            headers={"Content-Type": metrics.CONTENT_TYPE})

    async def card(self, request):
        return web.json_response(self.model.public_card)

    async def predict(self, request):
        # Without parameters such as charset; aiohttp reads a missing header as
        # application/octet-stream, which must not pass for a deliberate .npy body.
        content_type = request.content_type if "Content-Type" in request.headers else None
        if content_type not in native.JSON_TYPES + native.NPY_TYPES:  # before the body
            raise native.unsupported(content_type)

        async def work():
            x = await self.parse(native.decode, await self.body(request), content_type,
                                 self.model.image_shape, self.limits.max_batch)
            results = await self.run(x)
            return web.json_response(native.answer(results["probabilities"],
                                                   self.model.class_names))
        return await self.inference(work)

    # --- the Open Inference Protocol ---
    async def v2_server(self, request):
        return web.json_response(open_inference.server_metadata(_version()))

    async def v2_live(self, request):
        return web.json_response({"live": True})

    # Readiness as Triton answers it: 200 ready, 400 not (the protocol's 4xx).
    async def v2_ready(self, request):
        ready = self.batcher.ready
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def v2_model(self, request):
        self.the_model(request)
        return web.json_response(open_inference.model_metadata(self.model))

    async def v2_model_ready(self, request):
        self.the_model(request)
        ready = self.batcher.ready
        return web.json_response({"name": self.model.name, "ready": ready},
                                 status=200 if ready else 400)

    async def v2_infer(self, request):
        self.the_model(request)

        async def work():
            parsed = await self.parse(open_inference.parse, await self.body(request),
                                      request.headers.get(open_inference.HEADER_LENGTH),
                                      self.model, self.limits.max_batch)
            text, content_type, headers = open_inference.respond(
                parsed, await self.run(parsed.images), self.model)
            return web.Response(body=text, headers={"Content-Type": content_type, **headers})
        return await self.inference(work)

    # --- TensorFlow Serving's REST API ---
    async def tfs_status(self, request):
        self.the_model(request)
        return web.json_response(tf_serving.status(self.model, self.batcher.failure))

    async def tfs_metadata(self, request):
        self.the_model(request)
        return web.json_response(tf_serving.metadata(self.model))

    async def tfs_predict(self, request):
        self.the_model(request)

        async def work():
            x, form = await self.parse(tf_serving.parse, await self.body(request), self.model,
                                       self.limits.max_batch)
            results = await self.run(x)
            return web.json_response(tf_serving.respond(form, results["logits"],
                                                        results["probabilities"]))
        return await self.inference(work)

    async def tfs_label(self, request):
        """TF Serving's version labels: this server has none."""
        raise ClientError(404, f"unknown version label {request.match_info['label']!r} of "
                          f"model {request.match_info['model']!r}; this server serves "
                          f"version {self.model.version} and defines no labels")

    # --- the application's life ---
    async def on_startup(self, app):
        self.batcher.start()

    async def on_cleanup(self, app):
        await self.batcher.stop()
        self.parsers.shutdown(wait=True)


def _routes(h):
    model_path = "{model:[^/:]+}"
    versioned = [f"/{model_path}", f"/{model_path}/versions/{{version:[^/:]+}}"]
    routes = [web.get("/healthz", h.healthz), web.get("/metrics", h.metrics_text),
              web.get("/v1/metadata", h.card), web.post("/v1/predict", h.predict),
              web.get("/v2", h.v2_server), web.get("/v2/health/live", h.v2_live),
              web.get("/v2/health/ready", h.v2_ready)]
    for path in versioned:
        routes += [web.get(f"/v2/models{path}", h.v2_model),
                   web.get(f"/v2/models{path}/ready", h.v2_model_ready),
                   web.post(f"/v2/models{path}/infer", h.v2_infer),
                   web.get(f"/v1/models{path}", h.tfs_status),
                   web.get(f"/v1/models{path}/metadata", h.tfs_metadata),
                   web.post(f"/v1/models{path}:predict", h.tfs_predict)]
    labelled = f"/v1/models/{model_path}/labels/{{label:[^/:]+}}"
    return routes + [web.get(labelled, h.tfs_label), web.get(f"{labelled}/metadata", h.tfs_label),
                     web.post(f"{labelled}:predict", h.tfs_label)]


def make_app(model, limits=Limits()):
    """The aiohttp application serving `model` (a served_model.Model) under
    `limits` (its Nones derived for the model: `Limits.resolve`)."""
    limits = limits.resolve(model.image_shape)
    handlers = _Handlers(model, limits)
    app = web.Application(middlewares=[_observe, _json_errors],
                          client_max_size=limits.max_body_bytes)
    app.add_routes(_routes(handlers))
    app.on_startup.append(handlers.on_startup)
    app.on_cleanup.append(handlers.on_cleanup)
    app[LIMITS] = limits
    app[BATCHER] = handlers.batcher
    app[METRICS] = handlers.metrics
    return app
