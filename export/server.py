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

Each job has its module; this one is the process (`serve`: listen, cap the
connections, stop on a signal) and the names a caller needs, gathered:

    export/served_model.py   the model and its card: load, Model, check_card
    export/batching.py       concurrent requests merged into model batches: Batcher
    export/app.py            the HTTP application: make_app, Limits, the routes
    export/server.py         serve(onnx_path, host, port, limits)

SIGTERM or SIGINT stops accepting connections, finishes the requests in flight,
then exits.

None of them imports TensorFlow: the server runs where only onnxruntime, numpy,
aiohttp and prometheus_client are installed (requirements-serve.txt).
"""

import asyncio
import json
import logging
import signal

from aiohttp import http_exceptions, web

from export.app import BATCHER, LIMITS, METRICS, Limits, body_limit, make_app  # noqa: F401
from export.batching import Batcher, unavailable  # noqa: F401
from export.served_model import Model, check_card, load, public_card  # noqa: F401
from export.validate import ClientError  # noqa: F401

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
    # keepalive_timeout: aiohttp's deadline for a connection with no request under
    # way, from its opening (no request yet, or headers still arriving) and between
    # keep-alive requests; its default, an hour, let silent connections hold every
    # --max_connections slot.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_seconds,
                           lingering_time=LINGERING_SECONDS,
                           keepalive_timeout=limits.idle_timeout_s)
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
        f"{limits.body_timeout_s:g} s, idle timeout {limits.idle_timeout_s:g} s); SIGTERM or "
        "Ctrl-C stops")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log("stopping: finishing requests in flight")
    listening.close()  # no new connections; runner.cleanup finishes the open ones
    await runner.cleanup()
    log("stopped")


def quiet_bad_http(record):
    """A filter for aiohttp's server logger: drops the ERROR record, with its
    traceback, that aiohttp writes for every request whose HTTP framing it
    refuses (a header line over 8 KiB, too many headers, a bad chunk size; it
    answers those with 400 itself), so that one client cannot flood the log;
    kept when the logger is set to DEBUG."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, http_exceptions.HttpProcessingError) or \
        logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def serve(onnx_path, host="127.0.0.1", port=8500, limits=Limits(), log=print,
          shutdown_seconds=30.0, name=None):
    """Serves the ONNX model at `onnx_path` as `name` (see `load`) until SIGTERM or
    SIGINT (port 0: any free port, printed). Raises ValueError for a bad model,
    OSError for a busy port."""
    aiohttp_log = logging.getLogger("aiohttp.server")
    aiohttp_log.addFilter(quiet_bad_http)
    try:
        asyncio.run(_serve(load(onnx_path, name), host, port, limits, log,
                           shutdown_seconds))
    finally:
        aiohttp_log.removeFilter(quiet_bad_http)
