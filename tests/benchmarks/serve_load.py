"""Benchmark: load test of the server (`ardir-serve`) on loopback, next to Keras.

    python tests/benchmarks/serve_load.py --workdir runs/distill-digits-ardir \\
        [--requests 3000] [--clients 16] [--images 1] [--batch_delay_ms 0] [--max_batch 256]
        [--paths v1-json,v1-npy,v2-json,v2-binary,tfs-row,tfs-columnar] [--no-keras]

Serves <workdir>/export/student.onnx (run --mode=export first) in a subprocess on a
free loopback port (python -m export.cli, which is ardir-serve), then sends
--requests requests of --images test images each from --clients threads (one
keep-alive connection each), once per path: this server's /v1/predict with JSON
and with .npy bodies, the Open Inference Protocol's infer with JSON and with
binary tensors (inputs and outputs), and TF Serving's predict in row and in
columnar format. Every answer's labels are checked against ONNX Runtime run
directly on the same images; a non-200 answer, a wrong label, or a connection
error counts as a failed request. Reports throughput and p50/p99 latency, the
server's mean merged batch (from its /metrics), and then Keras on the same
images in this process:
`model.predict` one request at a time (what a naive Keras server does) and in
one call over all of them (the batch-throughput ceiling). Stops the server with
SIGTERM and reports its exit status.

Bounded: each phase stops at --seconds even if requests remain (reported). Not
a test: it asserts nothing, and client threads, server and Keras share the
machine's cores, so numbers depend on its load.
"""

import argparse
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def start_server(onnx_path, args):
    proc = subprocess.Popen(
        [sys.executable, "-m", "export.cli", f"--onnx_path={onnx_path}", "--port=0",
         f"--max_batch={args.max_batch}", f"--batch_delay_ms={args.batch_delay_ms}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return proc, int(found.group(1))
    raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")


def v2_header(x, binary):
    tensor = {"name": "images", "shape": list(x.shape), "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
    else:
        tensor["data"] = x.reshape(-1).tolist()
    request = {"inputs": [tensor]}
    if binary:
        request["parameters"] = {"binary_data_output": True}
    return json.dumps(request).encode()


def encode(x, path):
    """(URL path, body, headers) of a request for images `x` on `path`."""
    if path == "v1-json":
        return "/v1/predict", json.dumps({"instances": x.tolist()}).encode(), {
            "Content-Type": "application/json"}
    if path == "v1-npy":
        buffer = io.BytesIO()
        np.save(buffer, x)
        return "/v1/predict", buffer.getvalue(), {"Content-Type": "application/x-npy"}
    if path == "v2-json":
        return "/v2/models/student/infer", v2_header(x, False), {
            "Content-Type": "application/json"}
    if path == "v2-binary":
        header = v2_header(x, True)
        return "/v2/models/student/infer", header + x.astype("<f4").tobytes(), {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header))}
    form = "instances" if path == "tfs-row" else "inputs"
    return "/v1/models/student:predict", json.dumps({form: x.tolist()}).encode(), {
        "Content-Type": "application/json"}


def labels(path, data, header_length):
    """The labels in an answer on `path` (body bytes; the V2 binary header length)."""
    if path.startswith("v1"):
        return json.loads(data)["labels"]
    if path.startswith("v2"):
        text = data if header_length is None else data[:int(header_length)]
        outputs = json.loads(text)["outputs"]
        if header_length is None:
            return {o["name"]: o for o in outputs}["label"]["data"]
        offset = int(header_length)
        for output in outputs:  # the binary tensors follow in the order listed
            size = output["parameters"]["binary_data_size"]
            if output["name"] == "label":
                return np.frombuffer(data[offset:offset + size], "<i8").tolist()
            offset += size
    answer = json.loads(data)
    if path == "tfs-row":
        return [int(np.argmax(p["probabilities"])) for p in answer["predictions"]]
    return np.argmax(answer["outputs"]["probabilities"], axis=1).tolist()


PATHS = ("v1-json", "v1-npy", "v2-json", "v2-binary", "tfs-row", "tfs-columnar")


def load_phase(port, path, bodies, want, clients, seconds):
    """Sends every body once from `clients` threads; returns latencies and failures."""
    latencies, failures, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds
    next_index = iter(range(len(bodies)))

    def worker():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.perf_counter() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            url, body, headers = bodies[i]
            start = time.perf_counter()
            try:
                connection.request("POST", url, body, headers)
                response = connection.getresponse()
                data = response.read()
                answer = data[:200]
                ok = response.status == 200 and labels(
                    path, data, response.getheader("Inference-Header-Content-Length")) == want[i]
            except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
                ok, answer = False, repr(err)
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                latencies.append(time.perf_counter() - start)
                if not ok:
                    failures.append((i, str(answer)[:200]))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(latencies), failures, time.perf_counter() - start


def merged(port):
    """(images, batches) the server's model has run, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    values = {s.name: s.value for family in text_string_to_metric_families(
        connection.getresponse().read().decode()) for s in family.samples}
    return values["ardir_batch_images_sum"], values["ardir_batch_images_count"]


def row(name, n_requests, n_images, wall, latencies, failures):
    """A table row; latencies None: one call for everything, no per-request latency."""
    p50, p99 = (("-", "-") if latencies is None else
                (f"{v:.1f}" for v in np.percentile(latencies, [50, 99]) * 1000))
    print(f"| {name} | {n_requests} | {failures} | {n_requests / wall:,.0f} | "
          f"{n_images / wall:,.0f} | {p50} | {p99} |", flush=True)


def one_at_a_time(fn, requests):
    latencies = []
    start = time.perf_counter()
    for r in requests:
        t = time.perf_counter()
        fn(r)
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start, np.array(latencies)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/distill-digits-ardir")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--batch_delay_ms", type=float, default=0.0)
    parser.add_argument("--max_batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=300.0, help="bound per phase")
    parser.add_argument("--keras_requests", type=int, default=500,
                        help="requests Keras answers one at a time")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--keras", action=argparse.BooleanOptionalAction, default=True,
                        help="also time Keras and ONNX Runtime in this process")
    args = parser.parse_args()
    args.paths = args.paths.split(",")
    if not set(args.paths) <= set(PATHS):
        parser.error(f"--paths: unknown {sorted(set(args.paths) - set(PATHS))}; "
                     f"choose from {', '.join(PATHS)}")

    export_dir = os.path.join(args.workdir, "export")
    onnx_path = os.path.join(export_dir, "student.onnx")
    if not os.path.isfile(onnx_path):
        sys.exit(f"no {onnx_path}: run python main.py --mode=export --workdir={args.workdir}")
    import onnxruntime
    from ardir_tf import data
    _, (x_test, _) = data.digits(seed=0)
    picks = np.arange(args.requests * args.images) % len(x_test)
    requests = x_test[picks].reshape(args.requests, args.images, *x_test.shape[1:])
    # JSON carries 4 decimals (what a client typically sends); labels are checked
    # against ONNX Runtime on exactly what was sent.
    requests = np.round(requests, 4).astype(np.float32)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    want = [session.run(["logits"], {"images": r})[0].argmax(1).tolist() for r in requests]

    print(f"{args.requests} requests x {args.images} image(s), {args.clients} clients, "
          f"batch_delay_ms {args.batch_delay_ms}, max_batch {args.max_batch}, "
          f"{os.cpu_count()} CPU cores shared by clients and server\n")
    print("| path | requests | failed | requests/s | images/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    proc, port = start_server(onnx_path, args)
    try:
        for path in args.paths:
            bodies = [encode(r, path) for r in requests]
            images_before, batches_before = merged(port)
            latencies, failures, wall = load_phase(port, path, bodies, want, args.clients,
                                                   args.seconds)
            images_after, batches_after = merged(port)
            mean = (images_after - images_before) / max(1, batches_after - batches_before)
            row(f"server, {path} (mean merged batch {mean:.1f} images)", len(latencies),
                len(latencies) * args.images, wall, latencies, len(failures))
            if len(latencies) < len(bodies):
                print(f"  stopped at --seconds={args.seconds}: {len(bodies) - len(latencies)} "
                      "requests not sent")
            for i, answer in failures[:5]:
                print(f"  failed request {i}: {answer}")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    print(f"\nserver exit status after SIGTERM: {proc.returncode} "
          f"({out.strip().splitlines()[-1] if out.strip() else err[-300:]})")
    if not args.keras:
        return

    import keras
    model = keras.models.load_model(os.path.join(export_dir, "student.keras"))
    n = min(args.keras_requests, len(requests))
    model.predict(requests[0], verbose=0)  # warm up
    wall, latencies = one_at_a_time(lambda r: model.predict(r, verbose=0), requests[:n])
    row("Keras model.predict, one request at a time", n, n * args.images, wall, latencies, 0)
    model(requests[0], training=False)
    wall, latencies = one_at_a_time(lambda r: model(r, training=False), requests[:n])
    row("Keras model(x) eagerly, one request at a time", n, n * args.images, wall, latencies, 0)
    flat = requests.reshape(-1, *requests.shape[2:])
    model.predict(flat[:256], batch_size=256, verbose=0)
    start = time.perf_counter()
    labels = model.predict(flat, batch_size=256, verbose=0).argmax(1)
    row("Keras model.predict, all at once (batch 256; failed = labels unlike ONNX)",
        len(requests), len(flat), time.perf_counter() - start, None,
        int(np.sum(labels != np.concatenate(want))))
    wall, latencies = one_at_a_time(lambda r: session.run(["logits"], {"images": r}),
                                    requests[:n])
    row("ONNX Runtime in process, one request at a time (no HTTP)", n, n * args.images, wall,
        latencies, 0)


if __name__ == "__main__":
    main()
