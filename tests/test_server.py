"""export.server: every bad request gets a 4xx JSON error, the server lives on,
good requests get the ONNX model's answer, concurrent ones are merged, and
SIGTERM stops it cleanly."""

import asyncio
import concurrent.futures
import http.client
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime
import pytest

from conftest import SERVED_MAX_BATCH as MAX_BATCH, SERVED_MAX_BODY as MAX_BODY
from conftest import SERVED_SHAPE as SHAPE, start_server
from export import native, server, validate


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(shape, descr):
    """A .npy header alone, declaring `shape` of `descr`, with no data after it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


def instances(images):
    return json.dumps({"instances": np.round(images, 3).tolist()}).encode()


@pytest.fixture(scope="session")
def images():
    return np.random.default_rng(0).random((MAX_BATCH + 1, *SHAPE), np.float32)


# --- request decoding, without a server --------------------------------------

GOOD = np.full((2, *SHAPE), 0.5, np.float32)
DECODE_ERRORS = {
    "malformed JSON": (b'{"instances": [', "application/json", 400, "malformed JSON"),
    "not an object": (b"[1, 2]", "application/json", 400, 'expected a JSON object'),
    "no instances": (b'{"images": []}', "application/json", 400, 'expected a JSON object'),
    "extra keys": (b'{"instances": [], "x": 1}', "application/json", 400, "unknown keys"),
    "instances not a list": (b'{"instances": 3}', "application/json", 400, "must be a list"),
    "empty batch": (b'{"instances": []}', "application/json", 400, "empty batch"),
    "strings": (json.dumps({"instances": [[["a"] * 1] * 8] * 8}).encode(), "application/json",
                400, "non-numeric"),
    "numeric strings": (json.dumps({"instances": [[[["0.5"]] * 8] * 8]}).encode(),
                        "application/json", 400, "non-numeric"),
    "booleans": (instances(GOOD).replace(b"0.5", b"true", 1), "application/json", 400,
                 "non-numeric values \\(true, false or null\\)"),
    "null": (instances(GOOD).replace(b"0.5", b"null", 1), "application/json", 400,
             "non-numeric values"),
    "NaN": (instances(GOOD).replace(b"0.5", b"NaN", 1), "application/json", 400,
            "non-finite value NaN"),
    "Infinity": (instances(GOOD).replace(b"0.5", b"-Infinity", 1), "application/json", 400,
                 "non-finite value -Infinity"),
    "overflow": (instances(GOOD).replace(b"0.5", b"1e400", 1), "application/json", 400,
                 "NaN or infinite"),
    "ragged": (json.dumps({"instances": [[[0.5]] * 8, [[0.5]] * 7]}).encode(),
               "application/json", 400, "ragged images"),
    "wrong rank": (instances(GOOD[:, :, :, 0]), "application/json", 400,
                   "rank 3 .*expected rank 4, shape \\[N, 8, 8, 1\\]"),
    "wrong shape": (instances(np.zeros((2, 8, 7, 1))), "application/json", 400,
                    "shape \\[2, 8, 7, 1\\]; expected \\[N, 8, 8, 1\\]"),
    "scalar": (b'{"instances": [1]}', "application/json", 400, "rank 1"),
    "out of range": (instances(GOOD * 3), "application/json", 400,
                     "pixels in \\[1.5, 1.5\\]; expected \\[0, 1\\].*not clipped"),
    "negative": (instances(-GOOD), "application/json", 400, "pixels in \\[-0.5, -0.5\\]"),
    "too many": (instances(np.zeros((MAX_BATCH + 1, *SHAPE))), "application/json", 400,
                 "batch of 9 images is above this server's maximum of 8"),
    "npy garbage": (b"\x93NUMPY garbage", "application/x-npy", 400, "not a .npy array"),
    "npy strings": (npy(np.array(["a", "b"])), "application/x-npy", 400, "non-numeric"),
    "npy bool": (npy(np.ones((1, *SHAPE), bool)), "application/x-npy", 400, "non-numeric"),
    "npy 0-d": (npy(np.float32(0.5)), "application/x-npy", 400, "a single number"),
    "npy uint8": (npy(np.full((1, *SHAPE), 255, np.uint8)), "application/x-npy", 400,
                  "divide 0-255 images by 255"),
    "npy inf": (npy(np.where(GOOD > 0, np.inf, 0)), "application/x-npy", 400,
                "NaN or infinite"),
    "npy empty": (npy(np.zeros((0, *SHAPE), np.float32)), "application/x-npy", 400,
                  "empty batch"),
    "content type": (instances(GOOD), "text/plain", 415, "Content-Type 'text/plain'"),
    "deeply nested": (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                      "application/json", 400, "nested too deeply"),
    # A .npy header may declare any shape: checked before anything is allocated.
    "npy declares terabytes": (npy_header((2**40,), "<f8"), "application/x-npy", 400,
                               "batch of 1099511627776 images is above"),
    "npy truncated": (npy(GOOD)[:-3], "application/x-npy", 400,
                      r"says shape \[2, 8, 8, 1\] of float32 \(512 bytes\), but 509"),
    "npy above max batch": (npy(np.zeros((MAX_BATCH + 1, *SHAPE), np.float32)),
                            "application/x-npy", 400, "batch of 9 images is above"),
    # Negative sides multiply to the byte count (4 bytes: one float32) ...
    "npy negative sides": (npy_header((-1, -1), "<f4") + b"\0" * 4, "application/x-npy", 400,
                           r"shape \[-1, -1\] has a negative dimension"),
    # ... and a 0 beside a side no array can have gives 0 bytes.
    "npy impossible side": (npy_header((0, 2**64), "<f4"), "application/x-npy", 400,
                            r"shape \[0, 18446744073709551616\] is not an array numpy"),
    # CPython refuses integers of over 4,300 digits with a plain ValueError.
    "huge integer": (b'{"instances": [' + b"1" * 5000 + b"]}", "application/json", 400,
                     "a number in the JSON cannot be read"),
}


@pytest.mark.parametrize("case", DECODE_ERRORS)
def test_decode_rejects_bad_bodies_with_a_reason(case):
    body, content_type, status, message = DECODE_ERRORS[case]
    with pytest.raises(validate.ClientError, match=message) as err:
        native.decode(body, content_type, SHAPE, MAX_BATCH)
    assert err.value.status == status


def test_decode_reads_json_and_npy_alike():
    from_json = native.decode(instances(GOOD), "application/json", SHAPE, MAX_BATCH)
    from_npy = native.decode(npy(GOOD.astype(np.float64)), "application/x-npy", SHAPE,
                             MAX_BATCH)
    assert from_json.dtype == from_npy.dtype == np.float32
    np.testing.assert_array_equal(from_json, from_npy)
    edges = np.stack([np.zeros(SHAPE), np.ones(SHAPE)])  # 0 and 1 are in range
    assert native.decode(npy(edges), "application/octet-stream", SHAPE, 2).shape == (2, *SHAPE)


def test_batcher_merges_requests_that_wait_and_splits_the_answers():
    calls = []
    busy, release = threading.Event(), threading.Event()

    def run(x):
        calls.append(len(x))
        busy.set()
        assert release.wait(30)  # the first batch runs until the others are queued
        return x.reshape(len(x), -1)[:, :2] * 10

    async def scenario():
        batcher = server.Batcher(run, max_batch=6)
        batcher.start()
        xs = [np.full((n, 2, 1, 1), i, np.float32) for i, n in enumerate([1, 2, 3, 2, 1])]
        first = asyncio.ensure_future(batcher.predict(xs[0]))
        while not busy.is_set():  # the model is now busy with the first request
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.predict(x)) for x in xs[1:]]
        while batcher._queue.qsize() < len(rest):
            await asyncio.sleep(0)
        release.set()
        outs = await asyncio.gather(first, *rest)
        await batcher.stop()
        return xs, outs, batcher

    xs, outs, batcher = asyncio.run(scenario())
    # Alone at first; then 2+3 merged (2+3+2 would pass max_batch 6), then 2+1.
    assert calls == [1, 5, 3]
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, x.reshape(len(x), -1)[:, :2] * 10)
    assert (batcher.requests, batcher.batches, batcher.images) == (5, 3, 9)


def test_shutdown_finishes_the_requests_in_flight():
    """What SIGTERM triggers (runner.cleanup) waits for a prediction under way."""
    import aiohttp
    from aiohttp import web
    started = threading.Event()

    class SlowModel:
        image_shape, num_classes, card, class_names = SHAPE, 2, {}, ["a", "b"]
        name, input_name, version = "slow", "images", "1"

        def __call__(self, x):
            started.set()
            time.sleep(0.5)
            probabilities = np.tile(np.float32([[0.25, 0.75]]), (len(x), 1))
            return np.log(probabilities), probabilities

    async def scenario():
        runner = web.AppRunner(server.make_app(SlowModel()), shutdown_timeout=10)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/predict"
        async with aiohttp.ClientSession() as client:
            async def call():
                async with client.post(url, data=npy(GOOD),
                                       headers={"Content-Type": "application/x-npy"}) as r:
                    return r.status, await r.json()
            pending = asyncio.ensure_future(call())
            while not started.is_set():
                await asyncio.sleep(0.01)
            await runner.cleanup()
            return await pending

    status, answer = asyncio.run(scenario())
    assert status == 200 and answer["classes"] == ["b", "b"]


def test_metrics_count_the_requests_waiting_for_a_busy_model():
    """ardir_queue_depth while the model is held on a first request and three more
    wait: 3; once all are answered: 0. And each waiting request is one merged batch."""
    import aiohttp
    from aiohttp import web
    from prometheus_client.parser import text_string_to_metric_families
    started, release = threading.Event(), threading.Event()

    class HeldModel:
        image_shape, num_classes, card, class_names = SHAPE, 2, {}, ["a", "b"]
        name, input_name, version = "held", "images", "1"

        def __call__(self, x):
            started.set()
            assert release.wait(30)
            probabilities = np.tile(np.float32([[0.25, 0.75]]), (len(x), 1))
            return np.log(probabilities), probabilities

    def gauge(text):
        return next(s.value for f in text_string_to_metric_families(text)
                    for s in f.samples if s.name == "ardir_queue_depth")

    async def scenario():
        runner = web.AppRunner(server.make_app(HeldModel()))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as client:
            async def call():
                async with client.post(f"{base}/v1/predict", data=npy(GOOD[:1]),
                                       headers={"Content-Type": "application/x-npy"}) as r:
                    return r.status
            first = asyncio.ensure_future(call())
            while not started.is_set():
                await asyncio.sleep(0.01)
            rest = [asyncio.ensure_future(call()) for _ in range(3)]
            app = runner.app
            while app[server.BATCHER].queued < 3:
                await asyncio.sleep(0.01)
            async with client.get(f"{base}/metrics") as r:
                waiting = gauge(await r.text())
            release.set()
            statuses = await asyncio.gather(first, *rest)
            async with client.get(f"{base}/metrics") as r:
                text = await r.text()
        await runner.cleanup()
        return waiting, gauge(text), statuses, text

    waiting, after, statuses, text = asyncio.run(scenario())
    assert (waiting, after, statuses) == (3, 0, [200] * 4)
    assert "ardir_batch_images_count 2.0" in text and "ardir_batch_images_sum 4.0" in text


# --- the server, as a client sees it ----------------------------------------

def request(port, method, path, body=None, content_type=None, chunked=False):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": content_type} if content_type else {}
    if chunked:
        connection.request(method, path, body=iter([body]), headers=headers,
                           encode_chunked=True)
    else:
        connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    assert response.getheader("Content-Type").startswith("application/json"), data
    return response.status, json.loads(data)


BAD_REQUESTS = {
    "malformed JSON": ("POST", "/v1/predict", b"{nope", "application/json", 400,
                       "malformed JSON"),
    "wrong shape": ("POST", "/v1/predict", instances(np.zeros((1, 4, 4, 1))),
                    "application/json", 400, "expected \\[N, 8, 8, 1\\]"),
    "wrong rank": ("POST", "/v1/predict", npy(np.zeros(SHAPE, np.float32)),
                   "application/x-npy", 400, "expected rank 4"),
    "non-numeric": ("POST", "/v1/predict", b'{"instances": [["x"]]}', "application/json",
                    400, "non-numeric"),
    "NaN": ("POST", "/v1/predict", instances(GOOD).replace(b"0.5", b"NaN", 1),
            "application/json", 400, "non-finite value NaN"),
    "inf": ("POST", "/v1/predict", npy(GOOD * np.inf), "application/x-npy", 400,
            "NaN or infinite"),
    "out of range": ("POST", "/v1/predict", instances(GOOD + 1), "application/json", 400,
                     "expected \\[0, 1\\]"),
    "empty batch": ("POST", "/v1/predict", b'{"instances": []}', "application/json", 400,
                    "empty batch"),
    "batch above max": ("POST", "/v1/predict", instances(np.zeros((9, *SHAPE))),
                        "application/json", 400, "above this server's maximum of 8"),
    "body above max": ("POST", "/v1/predict", b" " * (MAX_BODY + 1), "application/json", 413,
                       f"body of {MAX_BODY + 1} bytes is above this server's maximum of "
                       f"{MAX_BODY} bytes"),
    "content type": ("POST", "/v1/predict", instances(GOOD), "text/plain", 415,
                     "Content-Type 'text/plain' is not supported"),
    "no content type": ("POST", "/v1/predict", npy(GOOD), None, 415,
                        "Content-Type 'none' is not supported"),
    "unknown path": ("GET", "/v2/predict", None, None, 404, "Not Found: GET /v2/predict"),
    "wrong method": ("GET", "/v1/predict", None, None, 405, "Method Not Allowed"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error_saying_what_was_wrong(served, case):
    method, path, body, content_type, status, message = BAD_REQUESTS[case]
    got, answer = request(served[1], method, path, body, content_type)
    assert got == status, answer
    assert re.search(message, answer["error"]), answer


def test_a_chunked_body_above_the_maximum_is_refused_as_it_streams(served):
    status, answer = request(served[1], "POST", "/v1/predict", b" " * (2 * MAX_BODY),
                             "application/json", chunked=True)
    assert status == 413
    assert answer["error"] == f"body above this server's maximum of {MAX_BODY} bytes"


def test_after_bad_requests_it_answers_healthz_metadata_and_predictions(served, onnx_path,
                                                                        images):
    _, port, _ = served
    for case in BAD_REQUESTS:  # once more, all of them, then good requests
        method, path, body, content_type, status, _ = BAD_REQUESTS[case]
        assert request(port, method, path, body, content_type)[0] == status
    status, health = request(port, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, card = request(port, "GET", "/v1/metadata")
    assert status == 200 and card["input"]["shape"] == [None, 8, 8, 1]
    assert card["parity"]["passed"] and card["class_names"] == list("abcdefghij")

    session = onnxruntime.InferenceSession(str(onnx_path))
    x = images[:MAX_BATCH]
    want = session.run(["probabilities"], {"images": x})[0]
    status, answer = request(port, "POST", "/v1/predict", npy(x), "application/x-npy")
    assert status == 200
    np.testing.assert_allclose(answer["probabilities"], want, atol=1e-6)
    assert answer["labels"] == want.argmax(1).tolist()
    assert answer["classes"] == [card["class_names"][i] for i in answer["labels"]]
    rounded = np.round(x, 3)
    status, answer = request(port, "POST", "/v1/predict", instances(x),
                             "application/json; charset=utf-8")
    assert status == 200
    np.testing.assert_allclose(answer["probabilities"],
                               session.run(["probabilities"], {"images": rounded})[0],
                               atol=1e-6)


def test_concurrent_clients_each_get_their_own_answer(served, onnx_path, images):
    _, port, _ = served
    session = onnxruntime.InferenceSession(str(onnx_path))
    want = session.run(["probabilities"], {"images": images})[0]

    def one(i):
        return request(port, "POST", "/v1/predict", npy(images[i:i + 1]), "application/x-npy")

    before = request(port, "GET", "/healthz")[1]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, list(range(len(images))) * 4))
    for i, (status, answer) in zip(list(range(len(images))) * 4, answers):
        assert status == 200
        np.testing.assert_allclose(answer["probabilities"][0], want[i], atol=1e-6)
    after = request(port, "GET", "/healthz")[1]
    # Every request counted once, every image once, whatever the merging.
    assert after["requests"] - before["requests"] == 4 * len(images)
    assert after["images"] - before["images"] == 4 * len(images)


def test_the_deployment_pages_clients_work(served, onnx_path, images):
    """The deployment page's curl lines and its two Python clients, against this
    server."""
    import contextlib
    from test_readme import ROOT
    port = served[1]
    page = (ROOT / "docs" / "deployment.md").read_text()
    section = page.split("### Clients", 1)[1].split("\n## ", 1)[0]
    npy_client, triton_client = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(npy_client, namespace)
    labels, probabilities = namespace["predict"](images[:3],
                                                 url=f"http://127.0.0.1:{port}/v1/predict")
    want = onnxruntime.InferenceSession(str(onnx_path)).run(["probabilities"],
                                                            {"images": images[:3]})[0]
    assert labels == want.argmax(1).tolist()
    np.testing.assert_allclose(probabilities, want, atol=1e-6)

    printed, namespace = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(triton_client.replace("127.0.0.1:8500", f"127.0.0.1:{port}"), namespace)
    want = onnxruntime.InferenceSession(str(onnx_path)).run(["probabilities"],
                                                            {"images": namespace["x"]})[0]
    assert printed.getvalue().strip() == str(want.argmax(1))
    # Row by row (four different images), not only their labels.
    np.testing.assert_array_equal(namespace["result"].as_numpy("probabilities"), want)

    script = re.search(r"```sh\n(curl -s localhost:8500/healthz\n.*?)```", section, re.S)
    run = subprocess.run(["bash", "-c", script.group(1).replace("8500", str(port))],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    decoder, answers, rest = json.JSONDecoder(), [], run.stdout
    while rest.strip():  # curl prints the answers back to back
        answer, end = decoder.raw_decode(rest.lstrip())
        answers.append(answer)
        rest = rest.lstrip()[end:]
    health, native_answer, tf_serving_answer = answers
    assert health["status"] == "ok" and len(native_answer["labels"]) == 1
    assert len(tf_serving_answer["predictions"]) == 1
    assert native_answer["labels"][0] == int(np.argmax(
        tf_serving_answer["predictions"][0]["probabilities"]))


def test_sigterm_stops_the_server_cleanly(onnx_path):
    """A server of its own (export.server, which imports no TensorFlow, so it
    starts in a second): SIGTERM, then a clean exit."""
    proc, port, _ = start_server([sys.executable, "-c", (
        "from export import server\n"
        f"server.serve({str(onnx_path)!r}, '127.0.0.1', 0, server.Limits(),"
        " log=lambda m: print(m, flush=True))")])
    assert request(port, "GET", "/healthz")[0] == 200
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "stopping: finishing requests in flight" in out and out.rstrip().endswith("stopped")
    assert "Traceback" not in err
