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
import functools
import hashlib
import json
import os
import re
import signal
import time
from importlib import metadata as package_metadata

import numpy as np
import onnxruntime
from aiohttp import http_exceptions, web, web_protocol

from export import metrics, native, open_inference, tf_serving
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
    max_connections: int = 512             # open connections; more get 503 and are closed
    parse_threads: int = 2                 # request bodies decoded at once, off the event loop

    def __post_init__(self):
        if self.max_batch < 1 or (self.max_body_bytes is not None and self.max_body_bytes < 1) \
                or self.batch_delay_ms < 0 or \
                (self.max_in_flight is not None and self.max_in_flight < 1) or \
                not 0 < self.body_timeout_s <= 3600 or self.max_connections < 1 or \
                self.parse_threads < 1:
            raise ValueError(f"bad limits {self}: max_batch, max_body_bytes, max_in_flight, "
                             "max_connections and parse_threads must be >= 1, "
                             "batch_delay_ms >= 0, body_timeout_s in (0, 3600]")

    def resolve(self, image_shape):
        """These limits with every None derived for images of `image_shape`."""
        return dataclasses.replace(
            self,
            max_body_bytes=self.max_body_bytes or body_limit(image_shape, self.max_batch),
            max_in_flight=self.max_in_flight or 2 * self.max_batch)


class Model:
    """An ONNX classifier: images float32 [N, H, W, C] -> (logits, probabilities)."""

    version = "1"  # the only version a server serves

    def __init__(self, onnx_path, card=None, name=None):
        options = onnxruntime.SessionOptions()
        # Idle ONNX Runtime threads spin by default, taking CPU from the event loop
        # and the request parsers between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(
                onnx_path, options, providers=["CPUExecutionProvider"])
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
        if not isinstance(names, list) or len(names) != self.num_classes or \
                not all(isinstance(n, str) for n in names):
            raise ValueError(f"the model card's class_names are not {self.num_classes} "
                             f"names, one per class of {os.path.basename(onnx_path)}")
        self.class_names = list(names)
        self.public_card = public_card(self.card)

    def __call__(self, x):
        return tuple(self.session.run(["logits", "probabilities"], {self.input_name: x}))


# What of the model card /v1/metadata serves: what the model takes, returns, was
# trained for and measured; not the run's flags, the serving lines or the file
# list, which hold local paths.
PUBLIC_CARD_KEYS = ("format_version", "name", "input", "outputs", "class_names", "dataset",
                    "trained_for", "evaluations", "onnx", "dtype", "parity", "artifacts",
                    "versions", "exported_at", "note")


def _no_paths(value):
    """`value` with every string that is an absolute path cut to its last part."""
    if isinstance(value, dict):
        return {k: _no_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_paths(v) for v in value]
    if isinstance(value, str):
        prefix, _, rest = value.rpartition(":") if value.startswith("npz:") else ("", "", value)
        if os.path.isabs(rest) or re.match(r"[A-Za-z]:[\\/]", rest):
            rest = re.split(r"[\\/]", rest.rstrip("/\\"))[-1]
            return f"{prefix}:{rest}" if prefix else rest
    return value


def public_card(card):
    """The part of a model card that /v1/metadata serves (PUBLIC_CARD_KEYS, no
    absolute paths)."""
    return _no_paths({k: card[k] for k in PUBLIC_CARD_KEYS if k in card})


def check_card(card, card_path, onnx_path):
    """ValueError, in one line, unless `card` (read from `card_path`) is the model
    card of the ONNX file at `onnx_path`: a JSON object naming that file, with its
    sha256."""
    where = f"{card_path} (beside {os.path.basename(onnx_path)})"
    if not isinstance(card, dict):
        raise ValueError(f"{where} is not a JSON object; a model card is the "
                         "model_card.json --mode=export writes")
    file = os.path.basename(onnx_path)
    named = (card.get("onnx") or {}).get("file") if isinstance(card.get("onnx"), dict) else None
    small = card.get("artifacts") if isinstance(card.get("artifacts"), dict) else {}
    # The smaller ONNX files of the same export; "float32" is the card's own file again.
    files = {named} | {a.get("file") for key, a in small.items() if key != "float32" and
                       isinstance(a, dict) and a.get("format", "onnx") == "onnx"}
    if file not in files:
        raise ValueError(f"{where} describes {named!r}, not {file!r}: it is another model's "
                         "card; serve that model's own export directory")
    want = ((card.get("files") or {}).get(file) or {}).get("sha256") \
        if isinstance(card.get("files"), dict) else None
    digest = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if want != digest.hexdigest():
        raise ValueError(f"{where}: the card's sha256 of {file} is {want}, the file's is "
                         f"{digest.hexdigest()}: the file was changed after the export; "
                         "export again")


def unavailable(message, retry_after=1):
    """The 503 of a server that cannot take this request now."""
    return ClientError(503, message, {"Retry-After": str(retry_after)})


class Batcher:
    """Merges concurrent requests into batches for `run` (see the module doc).

    `run(x)` returns an array or a tuple of arrays, each [len(x), ...]; every
    request gets its own rows. `on_batch(images)` is told of each batch run.
    Should its task ever end other than by `stop` (a bug, or the process out of
    memory), `failure` says why, `ready` turns False, and every waiting and later
    request gets a 503.
    """

    def __init__(self, run, max_batch, delay_seconds=0.0, on_batch=None):
        self._run, self._max_batch, self._delay = run, max_batch, delay_seconds
        self.on_batch = on_batch or (lambda images: None)
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "onnxruntime")
        self._task = None
        self._stopping = False
        self._held = None  # taken off the queue, waiting for the next batch
        self._group = []   # the batch the model is running
        self.failure = None
        self.requests = self.batches = self.images = 0

    @property
    def queued(self):
        """Requests waiting for the model."""
        return self._queue.qsize() + (self._held is not None)

    @property
    def ready(self):
        return self._task is not None and not self._task.done() and self.failure is None

    def check_ready(self):
        """Raises the 503 of a batcher that cannot take requests (see the class doc)."""
        if not self.ready:
            raise unavailable(f"the model is unavailable ({self.failure or 'not started'})",
                              retry_after=30)

    def start(self):
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self._task.add_done_callback(self._ended)

    async def stop(self):
        self._stopping = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _ended(self, task):
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        self.failure = f"the batcher stopped: {error!r}" if error else "the batcher was cancelled"
        waiting = list(self._group) + ([self._held] if self._held else [])
        self._held, self._group = None, []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for _, future in waiting:
            if not future.done():
                try:
                    self.check_ready()
                except ClientError as err:
                    future.set_exception(err)

    async def predict(self, x):
        self.check_ready()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((x, future))
        return await future

    async def _serve(self):
        while True:
            first = self._held or await self._queue.get()
            self._held, self._group = None, [first]
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
            self._group = group
            try:
                x = group[0][0] if len(group) == 1 else np.concatenate([g[0] for g in group])
                out = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run, x)
            except Exception as err:  # a model failure answers these requests, not the loop
                for _, future in group:
                    if not future.done():
                        future.set_exception(err)
                self._group = []
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
            self._group = []


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


def make_app(model, limits=Limits()):
    """The aiohttp application serving `model` (a `Model`) under `limits` (its
    Nones derived for the model: `Limits.resolve`)."""
    limits = limits.resolve(model.image_shape)
    batcher = Batcher(model, limits.max_batch, limits.batch_delay_ms / 1000)
    observed = metrics.Metrics(queue_depth=lambda: batcher.queued)
    batcher.on_batch = observed.observe_batch
    parsers = concurrent.futures.ThreadPoolExecutor(limits.parse_threads, "parse")
    in_flight = [0]  # inference requests admitted and not yet answered

    async def inference(work):
        """Runs `work()` for an inference request if the server has room for it
        (limits.max_in_flight), else answers 503 at once, before reading the body."""
        batcher.check_ready()  # before the body is read, as the limit below
        if in_flight[0] >= limits.max_in_flight:
            observed.shed("overload")
            raise unavailable(f"the server is at its limit of {limits.max_in_flight} "
                              "requests in flight; retry after a second")
        in_flight[0] += 1
        try:
            return await work()
        finally:
            in_flight[0] -= 1

    async def parse(fn, body, *args):
        """fn(body, *args), in a parser thread when the body is large: decoding a
        large JSON body takes long enough to stall every other connection if it
        ran on the event loop, while a small one decodes faster than the hop to a
        thread and back."""
        if len(body) < INLINE_PARSE_BYTES:
            return fn(body, *args)
        return await asyncio.get_running_loop().run_in_executor(
            parsers, functools.partial(fn, body, *args))

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
            observed.shed("body_timeout")
            raise ClientError(408, f"the request body did not arrive within "
                              f"{limits.body_timeout_s:g} s", {"Connection": "close"}) from None

    async def run(x):
        logits, probabilities = await batcher.predict(x)
        return {"logits": logits, "probabilities": probabilities,
                "label": probabilities.argmax(axis=1).astype(np.int64)}

    # --- this server's own protocol, and operations ---
    async def healthz(request):
        counts = {"requests": batcher.requests, "batches": batcher.batches,
                  "images": batcher.images}
        if not batcher.ready:
            return web.json_response({"status": "unavailable", "error": batcher.failure,
                                      **counts}, status=503)
        return web.json_response({"status": "ok", **counts})

    async def metrics_text(request):
        return web.Response(body=observed.text(), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def card(request):
        return web.json_response(model.public_card)

    async def predict(request):
        # Without parameters such as charset; aiohttp reads a missing header as
        # application/octet-stream, which must not pass for a deliberate .npy body.
        content_type = request.content_type if "Content-Type" in request.headers else None
        if content_type not in native.JSON_TYPES + native.NPY_TYPES:  # before the body
            raise native.unsupported(content_type)

        async def work():
            x = await parse(native.decode, await body(request), content_type,
                            model.image_shape, limits.max_batch)
            results = await run(x)
            return web.json_response(native.answer(results["probabilities"],
                                                   model.class_names))
        return await inference(work)

    # --- the Open Inference Protocol ---
    async def v2_server(request):
        return web.json_response(open_inference.server_metadata(_version()))

    async def v2_live(request):
        return web.json_response({"live": True})

    # Readiness as Triton answers it: 200 ready, 400 not (the protocol's 4xx).
    async def v2_ready(request):
        return web.json_response({"ready": batcher.ready}, status=200 if batcher.ready else 400)

    async def v2_model(request):
        the_model(request)
        return web.json_response(open_inference.model_metadata(model))

    async def v2_model_ready(request):
        the_model(request)
        return web.json_response({"name": model.name, "ready": batcher.ready},
                                 status=200 if batcher.ready else 400)

    async def v2_infer(request):
        the_model(request)

        async def work():
            parsed = await parse(open_inference.parse, await body(request),
                                 request.headers.get(open_inference.HEADER_LENGTH),
                                 model, limits.max_batch)
            text, content_type, headers = open_inference.respond(
                parsed, await run(parsed.images), model)
            return web.Response(body=text, headers={"Content-Type": content_type, **headers})
        return await inference(work)

    # --- TensorFlow Serving's REST API ---
    async def tfs_status(request):
        the_model(request)
        return web.json_response(tf_serving.status(model, batcher.failure))

    async def tfs_metadata(request):
        the_model(request)
        return web.json_response(tf_serving.metadata(model))

    async def tfs_predict(request):
        the_model(request)

        async def work():
            x, form = await parse(tf_serving.parse, await body(request), model,
                                  limits.max_batch)
            results = await run(x)
            return web.json_response(tf_serving.respond(form, results["logits"],
                                                        results["probabilities"]))
        return await inference(work)

    async def tfs_label(request):
        """TF Serving's version labels: this server has none."""
        raise ClientError(404, f"unknown version label {request.match_info['label']!r} of "
                          f"model {request.match_info['model']!r}; this server serves "
                          f"version {model.version} and defines no labels")

    async def on_startup(app):
        batcher.start()

    async def on_cleanup(app):
        await batcher.stop()
        parsers.shutdown(wait=True)

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
    labelled = f"/v1/models/{model_path}/labels/{{label:[^/:]+}}"
    routes += [web.get(labelled, tfs_label), web.get(f"{labelled}/metadata", tfs_label),
               web.post(f"{labelled}:predict", tfs_label)]
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
        try:
            with open(card_path) as f:
                card = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read {card_path}: {err}") from None
        check_card(card, card_path, onnx_path)
    return Model(onnx_path, card, name)


LINGERING_SECONDS = 2.0


class _Refused(asyncio.Protocol):
    """A connection above max_connections: one 503, then closed, nothing read."""

    BODY = json.dumps({"error": "the server has too many open connections; retry after "
                       "a second"}).encode()
    RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\n" +
                f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)

    def connection_made(self, transport):
        transport.write(self.RESPONSE)
        transport.close()


def capped(server, max_connections, on_refused):
    """A protocol factory for loop.create_server: aiohttp's `server` (a
    web.Server) for up to `max_connections` open connections, `_Refused` above."""
    def factory():
        if len(server.connections) >= max_connections:
            on_refused()
            return _Refused()
        return server()
    return factory


async def _serve(model, host, port, limits, log, shutdown_seconds):
    app = make_app(model, limits)
    limits = app[LIMITS]
    # lingering_time: after answering a request whose body it did not read (413,
    # 408), aiohttp keeps reading and dropping it so that the client sees the answer
    # before the close; 2 s instead of 10 bounds what a trickling client can hold.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_seconds,
                           lingering_time=LINGERING_SECONDS)
    await runner.setup()
    loop = asyncio.get_running_loop()
    try:
        listening = await loop.create_server(
            capped(runner.server, limits.max_connections,
                   lambda: app[METRICS].shed("connections")), host, port)
    except OSError as err:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}; "
                      "choose another --port") from None
    bound_host, bound_port = listening.sockets[0].getsockname()[:2]
    log(f"serving model {model.name!r} ({model.image_shape} images -> {model.num_classes} "
        f"classes) on http://{bound_host}:{bound_port}: Open Inference Protocol at /v2, "
        f"TF Serving REST at /v1/models/{model.name}, /v1/predict, /metrics (max batch "
        f"{limits.max_batch}, max body {limits.max_body_bytes} bytes, {limits.max_in_flight} "
        f"requests in flight, {limits.max_connections} connections, body timeout "
        f"{limits.body_timeout_s:g} s); SIGTERM or Ctrl-C stops")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log("stopping: finishing requests in flight")
    listening.close()  # no new connections; runner.cleanup finishes the open ones
    await runner.cleanup()
    log("stopped")


def serve(onnx_path, host="127.0.0.1", port=8500, limits=Limits(), log=print,
          shutdown_seconds=30.0, name=None):
    """Serves the ONNX model at `onnx_path` as `name` (see `load`) until SIGTERM or
    SIGINT (port 0: any free port, printed). Raises ValueError for a bad model,
    OSError for a busy port."""
    asyncio.run(_serve(load(onnx_path, name), host, port, limits, log, shutdown_seconds))
