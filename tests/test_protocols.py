"""The server's standard protocols, as their own clients see them: the Open
Inference Protocol through Triton's official Python client, TF Serving's REST
API through plain HTTP in its documented formats, and /metrics through
prometheus_client's parser. The server here is `ardir-serve` (python -m
export.cli), which imports no TensorFlow."""

import http.client
import json
import re
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from conftest import ROOT, SERVED_SHAPE as SHAPE, start_server

MAX_BATCH = 64
CLASSES = list("abcdefghij")  # the served export's class names (conftest.onnx_path)


@pytest.fixture(scope="session", params=["float32", "int8"])
def served_file(request, onnx_path):
    """The served export's float32 ONNX file, then its INT8 file: every test of
    a served model runs against both."""
    return onnx_path if request.param == "float32" else \
        onnx_path.with_name("student.int8.onnx")


@pytest.fixture(scope="session")
def ardir_serve(served_file):
    """`ardir-serve` from the checkout, max batch 64; yields its port."""
    proc, port, lines = start_server(
        [sys.executable, "-m", "export.cli", f"--onnx_path={served_file}", "--port=0",
         f"--max_batch={MAX_BATCH}", "--max_body_mb=1"])
    assert "model 'student'" in lines[-1] and "/v2" in lines[-1], lines
    yield port
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def test_digits(digits, served_file):
    """64 test digits and what ONNX Runtime itself says of them."""
    _, (x_test, _) = digits
    x = x_test[:64]
    session = onnxruntime.InferenceSession(str(served_file))
    logits, probabilities = session.run(["logits", "probabilities"], {"images": x})
    return x, logits, probabilities


def send(port, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response.getheader("Content-Type"), data


def send_json(port, method, path, document=None, headers=None):
    body = None if document is None else (document if isinstance(document, bytes)
                                          else json.dumps(document).encode())
    status, content_type, data = send(port, method, path, body, headers)
    assert content_type.startswith("application/json"), data[:200]
    return status, json.loads(data)


# --- the Open Inference Protocol, through tritonclient ---------------------------

def test_the_triton_client_sees_a_ready_server_and_the_models_metadata(ardir_serve):
    client = triton.InferenceServerClient(f"127.0.0.1:{ardir_serve}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("student") and client.is_model_ready("student", "1")
    assert not client.is_model_ready("other") and not client.is_model_ready("student", "2")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("student")
    assert metadata["name"] == "student" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32",
                                   "shape": [-1, *SHAPE]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("logits", "FP32", [-1, 10]), ("probabilities", "FP32", [-1, 10]),
        ("label", "INT64", [-1])]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_client_infer_gives_onnxruntimes_labels_and_values(ardir_serve, test_digits,
                                                                  binary):
    x, logits, probabilities = test_digits
    client = triton.InferenceServerClient(f"127.0.0.1:{ardir_serve}")
    images = triton.InferInput("images", list(x.shape), "FP32")
    images.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary)
               for name in ("logits", "probabilities", "label")]
    result = client.infer("student", [images], outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    np.testing.assert_array_equal(result.as_numpy("label"), probabilities.argmax(1))
    # float32 survives JSON exactly (float -> shortest repr -> float); binary is raw.
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert result.as_numpy("label").dtype == np.int64


def test_triton_client_default_outputs_and_classification(ardir_serve, test_digits):
    x, _, probabilities = test_digits
    client = triton.InferenceServerClient(f"127.0.0.1:{ardir_serve}")
    images = triton.InferInput("images", list(x.shape), "FP32")
    images.set_data_from_numpy(x)
    everything = client.infer("student", [images], model_version="1")  # no outputs named
    assert {o["name"] for o in everything.get_response()["outputs"]} == {
        "logits", "probabilities", "label"}
    np.testing.assert_array_equal(everything.as_numpy("label"), probabilities.argmax(1))
    top3 = client.infer("student", [images], outputs=[
        triton.InferRequestedOutput("probabilities", class_count=3)]).as_numpy("probabilities")
    assert top3.shape == (64, 3)
    for row, want in zip(top3, probabilities):
        value, index, name = row[0].decode().split(":")
        assert int(index) == want.argmax() and name == CLASSES[int(index)]
        assert abs(float(value) - want.max()) < 1e-6
        assert [int(entry.decode().split(":")[1]) for entry in row] == \
            list(np.argsort(-want, kind="stable")[:3])


def infer_error(port, x, datatype="FP32", shape=None, model="student"):
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    images = triton.InferInput("images", list(shape or x.shape), datatype)
    images.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [images])
    return err.value


GOOD = np.full((2, *SHAPE), 0.5, np.float32)
TRITON_BAD = {
    "wrong shape": (dict(x=np.zeros((2, 8, 7, 1), np.float32)), "400",
                    r"shape \[2, 8, 7, 1\]; expected \[N, 8, 8, 1\]"),
    "wrong datatype": (dict(x=GOOD.astype(np.float64), datatype="FP64"), "400",
                       "datatype 'FP64'; the model takes FP32"),
    "integer pixels": (dict(x=np.ones((2, *SHAPE), np.int32), datatype="INT32"), "400",
                       "datatype 'INT32'"),
    "NaN": (dict(x=np.where(GOOD > 0, np.nan, 0).astype(np.float32)), "400",
            "NaN or infinite"),
    "out of range": (dict(x=GOOD * 3), "400", r"pixels in \[1.5, 1.5\]; expected \[0, 1\]"),
    "negative": (dict(x=-GOOD), "400", "expected \\[0, 1\\]"),
    "above max batch": (dict(x=np.zeros((MAX_BATCH + 1, *SHAPE), np.float32)), "400",
                        "above this server's maximum of 64"),
    "unknown model": (dict(x=GOOD, model="other"), "404",
                      "unknown model 'other'; this server serves 'student'"),
}


@pytest.mark.parametrize("case", TRITON_BAD)
def test_bad_tensors_get_a_4xx_and_the_protocols_error(ardir_serve, test_digits, case):
    kwargs, status, message = TRITON_BAD[case]
    error = infer_error(ardir_serve, **kwargs)
    assert error.status() == status and re.search(message, error.message()), error
    x, _, probabilities = test_digits  # and the server keeps serving
    images = triton.InferInput("images", [4, *SHAPE], "FP32")
    images.set_data_from_numpy(x[:4])
    result = triton.InferenceServerClient(f"127.0.0.1:{ardir_serve}").infer("student", [images])
    np.testing.assert_array_equal(result.as_numpy("label"), probabilities[:4].argmax(1))


def v2_body(x=GOOD, **tensor):
    return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist(), **tensor}]}


def binary_body(x, size=None, header=None):
    head = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape),
                                   "datatype": "FP32", "parameters": {
                                       "binary_data_size": size or x.nbytes}}]}).encode()
    return head + x.astype("<f4").tobytes(), {
        "Inference-Header-Content-Length": str(header or len(head))}


V2_RAW_BAD = {
    "malformed JSON": (b"{nope", {}, "malformed JSON"),
    "no inputs": ({"outputs": []}, {}, 'expected a JSON object {"inputs"'),
    "unknown key": (dict(v2_body(), extra=1), {}, r"unknown keys \['extra'\]"),
    "two inputs": ({"inputs": v2_body()["inputs"] * 2}, {}, "2 inputs; the model takes one"),
    "unknown input": ({"inputs": [dict(v2_body()["inputs"][0], name="x")]}, {},
                      "unknown input 'x'; the model takes one input 'images'"),
    "too few values": (v2_body(data=[0.5] * 10), {}, "has 10 values; shape"),
    "booleans in data": (v2_body(data=[True] + [0.5] * 127), {},
                         r"non-numeric values \(true, false or null\)"),
    "strings in data": (v2_body(data=["0.5"] * 128), {}, "non-numeric"),
    "NaN literal": (json.dumps(v2_body()).replace("0.5", "NaN", 1).encode(), {},
                    "non-finite value NaN"),
    "unknown output": (dict(v2_body(), outputs=[{"name": "features"}]), {},
                       "unknown output 'features'"),
    "classification of label": (dict(v2_body(), outputs=[
        {"name": "label", "parameters": {"classification": 2}}]), {},
        "parameters.classification of output 'label'"),
    "shared memory": (v2_body(parameters={"shared_memory_region": "r"}), {},
                      "shared-memory tensors are not supported"),
    "binary size wrong": (*binary_body(GOOD, size=100), "binary_data_size 100"),
    "binary bytes missing": (*(lambda b, h: (b[:-4], h))(*binary_body(GOOD)),
                             "bytes follow the JSON header"),
    "header length garbage": (*binary_body(GOOD, header="abc"),
                              "Inference-Header-Content-Length is 'abc'"),
    "header length too big": (*binary_body(GOOD, header=10**6), "expected the length"),
    "binary without header": (binary_body(GOOD)[0][:binary_body(GOOD)[0].index(b"}]}") + 3],
                              {}, "has binary_data_size but the request has no"),
    # Shapes and sizes that would overflow, allocate, or slip past a loose check.
    "batch in the shape above max": (v2_body(shape=[2**60 + 1, *SHAPE]), {},
                                     "batch of 1152921504606846977 images is above"),
    "zero batch": (v2_body(shape=[0, *SHAPE], data=[]), {}, "empty batch"),
    "float in the shape": (v2_body(shape=[2.0, *SHAPE]), {}, r"has shape \[2.0, 8, 8, 1\]"),
    "binary size a float": (*binary_body(GOOD, size=float(GOOD.nbytes)),
                            "binary_data_size 512.0"),
    "header length 1_0": (*binary_body(GOOD, header="1_0"), "is '1_0'"),
    "nested unlike the shape": (v2_body(data=[[[[[0.5]]]]] * 128), {},
                                r"nested as \[128, 1, 1, 1, 1\]"),
    "deeply nested": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {},
                      "nested too deeply"),
    # An escaped "true" elsewhere must not hide a true among the pixels.
    "escaped word and a literal": (json.dumps(dict(
        v2_body(data=[True] + [0.5] * 127), id="\u0074rue")).replace(
            "\\u0074", "\u0074").encode(), {}, r"non-numeric values \(true"),
    "input not an object": ({"inputs": [3]}, {}, "an input tensor must be a JSON object"),
    "one output twice": (dict(v2_body(), outputs=[{"name": "label"}] * 2), {},
                         "name one output twice"),
    "another model in the body": (dict(v2_body(), model_name="other"), {},
                                  "model_name 'other' in the body"),
}


@pytest.mark.parametrize("case", V2_RAW_BAD)
def test_malformed_infer_requests_get_a_400_saying_what_was_wrong(ardir_serve, case):
    body, headers, message = V2_RAW_BAD[case]
    status, answer = send_json(ardir_serve, "POST", "/v2/models/student/infer", body, headers)
    assert status == 400 and set(answer) == {"error"}, answer
    assert re.search(message, answer["error"]), answer


def test_binary_data_output_is_the_default_of_listed_outputs(ardir_serve, test_digits):
    x, _, probabilities = test_digits
    head = {"model_name": "student", "parameters": {"binary_data_output": True},
            "inputs": [{"name": "images", "shape": [5, *SHAPE], "datatype": "FP32",
                        "parameters": {"binary_data_size": x[:5].nbytes}}],
            "outputs": [{"name": "label"},
                        {"name": "logits", "parameters": {"binary_data": False}}]}
    text = json.dumps(head).encode()
    connection = http.client.HTTPConnection("127.0.0.1", ardir_serve, timeout=30)
    connection.request("POST", "/v2/models/student/infer", text + x[:5].tobytes(),
                       {"Inference-Header-Content-Length": str(len(text))})
    response = connection.getresponse()
    data = response.read()
    assert response.status == 200, data[:300]
    assert response.getheader("Content-Type") == "application/octet-stream"
    length = int(response.getheader("Inference-Header-Content-Length"))
    label, logits = json.loads(data[:length])["outputs"]
    assert label["parameters"] == {"binary_data_size": 40} and "data" not in label
    assert len(logits["data"]) == 50  # its own binary_data: false wins
    assert len(data) == length + 40
    np.testing.assert_array_equal(np.frombuffer(data[length:], "<i8"),
                                  probabilities[:5].argmax(1))


def test_v2_json_without_the_client_nested_data_and_an_oversized_body(ardir_serve, test_digits):
    x, _, probabilities = test_digits
    nested = {"inputs": [{"name": "images", "shape": [3, *SHAPE], "datatype": "FP32",
                          "data": x[:3].tolist()}],
              "parameters": {"binary_data_output": False}}  # its `false` is no pixel
    status, answer = send_json(ardir_serve, "POST", "/v2/models/student/versions/1/infer",
                               nested)
    assert status == 200 and answer["model_name"] == "student"
    label = {o["name"]: o for o in answer["outputs"]}["label"]
    assert label["data"] == probabilities[:3].argmax(1).tolist() and label["shape"] == [3]
    status, answer = send_json(ardir_serve, "POST", "/v2/models/student/infer",
                               b" " * (2**20 + 1))
    assert status == 413 and "above this server's maximum" in answer["error"]
    status, answer = send_json(ardir_serve, "GET", "/v2/models/student/versions/7")
    assert status == 404 and "serves version 1" in answer["error"]


# --- TF Serving's REST API -----------------------------------------------------

def rows_to_labels(answer):
    return [int(np.argmax(p["probabilities"])) for p in answer["predictions"]]


def test_tf_serving_clients_get_onnxruntimes_labels_in_both_formats(ardir_serve, test_digits):
    x, logits, probabilities = test_digits
    want = probabilities.argmax(1).tolist()
    images = x.tolist()
    path = "/v1/models/student:predict"
    status, row = send_json(ardir_serve, "POST", path, {"instances": images})
    assert status == 200 and set(row) == {"predictions"} and len(row["predictions"]) == 64
    assert rows_to_labels(row) == want
    assert set(row["predictions"][0]) == {"logits", "probabilities"}
    np.testing.assert_array_equal(np.float32([p["logits"] for p in row["predictions"]]),
                                  logits)
    status, named = send_json(ardir_serve, "POST", "/v1/models/student/versions/1:predict",
                              {"signature_name": "serving_default",
                               "instances": [{"images": image} for image in images]})
    assert status == 200 and rows_to_labels(named) == want
    for inputs in (images, {"images": images}):
        status, columnar = send_json(ardir_serve, "POST", path, {"inputs": inputs})
        assert status == 200 and set(columnar) == {"outputs"}
        assert np.argmax(columnar["outputs"]["probabilities"], 1).tolist() == want
        np.testing.assert_array_equal(np.float32(columnar["outputs"]["logits"]), logits)
    # curl -d sends application/x-www-form-urlencoded; TF Serving reads JSON anyway.
    status, row = send_json(ardir_serve, "POST", path, {"instances": images[:2]},
                            {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and rows_to_labels(row) == want[:2]


def test_tf_serving_status_and_metadata(ardir_serve):
    status, answer = send_json(ardir_serve, "GET", "/v1/models/student")
    assert status == 200 and answer["model_version_status"][0]["state"] == "AVAILABLE"
    status, answer = send_json(ardir_serve, "GET", "/v1/models/student/versions/1/metadata")
    signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    dims = [int(d["size"]) for d in signature["inputs"]["images"]["tensor_shape"]["dim"]]
    assert status == 200 and dims == [-1, *SHAPE]
    assert set(signature["outputs"]) == {"logits", "probabilities"}


TFS_BAD = {
    "both formats": ({"instances": [], "inputs": []}, 400, 'either "instances".*not both'),
    "neither": ({"signature_name": "serving_default"}, 400, 'either "instances"'),
    "unknown key": ({"instances": [], "examples": []}, 400, r"unknown keys \['examples'\]"),
    "unknown signature": ({"signature_name": "classify", "instances": GOOD.tolist()}, 400,
                          "unknown signature_name 'classify'"),
    "wrong shape": ({"instances": np.zeros((2, 4, 4, 1)).tolist()}, 400,
                    r"expected \[N, 8, 8, 1\]"),
    "unknown input name": ({"instances": [{"x": GOOD[0].tolist()}]}, 400,
                           r"unknown inputs \['x'\]"),
    "inputs not a list": ({"inputs": 3}, 400, '"inputs" must be a list'),
    "booleans": (json.dumps({"instances": GOOD.tolist()}).replace("0.5", "true", 1).encode(),
                 400, "non-numeric values"),
    "NaN": (json.dumps({"instances": GOOD.tolist()}).replace("0.5", "NaN", 1).encode(), 400,
            "non-finite value NaN"),
    "out of range": ({"instances": (GOOD + 1).tolist()}, 400, r"expected \[0, 1\]"),
    "empty": ({"instances": []}, 400, "empty batch"),
    "deeply nested": (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
                      "nested too deeply"),
    "unknown model": ({"instances": GOOD.tolist()}, 404, "unknown model 'nope'"),
}


@pytest.mark.parametrize("case", TFS_BAD)
def test_bad_tf_serving_requests_get_a_4xx_error(ardir_serve, case):
    document, status, message = TFS_BAD[case]
    model = "nope" if case == "unknown model" else "student"
    got, answer = send_json(ardir_serve, "POST", f"/v1/models/{model}:predict", document)
    assert got == status and set(answer) == {"error"}, answer
    assert re.search(message, answer["error"]), answer
    got, answer = send_json(ardir_serve, "POST", "/v1/models/student:predict",
                            {"instances": GOOD.tolist()})
    assert got == 200 and len(answer["predictions"]) == 2


def test_unknown_paths_name_the_endpoints(ardir_serve):
    status, answer = send_json(ardir_serve, "GET", "/v1/models/student:classify")
    assert status == 404 and "POST /v2/models/{model}/infer" in answer["error"]
    status, answer = send_json(ardir_serve, "GET", "/v2/models/student/infer")
    assert status == 405 and "/v1/models/{model}:predict" in answer["error"]


# --- /metrics --------------------------------------------------------------------

def scrape(port):
    status, content_type, data = send(port, "GET", "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), data[:200]
    samples = {}
    for family in text_string_to_metric_families(data.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_parse_and_count_what_was_served(ardir_serve):
    infer = "/v2/models/{model}/infer"

    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    before = scrape(ardir_serve)
    for _ in range(5):
        assert send_json(ardir_serve, "POST", "/v2/models/student/infer",
                         v2_body(np.full((3, *SHAPE), 0.25, np.float32)))[0] == 200
    for _ in range(2):
        assert send_json(ardir_serve, "POST", "/v2/models/student/infer", b"{nope")[0] == 400
    after = scrape(ardir_serve)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("ardir_http_requests_total", endpoint=infer, method="POST", status="200") == 5
    assert moved("ardir_http_requests_total", endpoint=infer, method="POST", status="400") == 2
    assert moved("ardir_http_request_duration_seconds_count", endpoint=infer) == 7
    assert moved("ardir_images_total") == 15
    assert moved("ardir_batch_images_sum") == 15
    assert 1 <= moved("ardir_batch_images_count") <= 5  # one-by-one requests, maybe merged
    assert moved("ardir_http_requests_total", endpoint="/metrics", method="GET",
                 status="200") == 1  # the first scrape, counted once it was answered


# --- ardir-serve ----------------------------------------------------------------

def test_the_serving_command_imports_no_tensorflow():
    code = ("import sys\nfrom export import cli, server\ncli.cli.define_serve_flags()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'tensorflow', 'keras', 'tf2onnx', 'ardir_tf'}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


@pytest.mark.parametrize("args, message", [
    ([], "say which model to serve: --workdir"),
    (["--workdir=/nonexistent"], "no exported model at /nonexistent/export/student.onnx"),
    (["--onnx_path=/nonexistent.onnx"], "--onnx_path: must name an existing .onnx file"),
    (["--port=70000", "--workdir=x"], r"--port: must be in \[0, 65535\]"),
    (["--model_name=a/b", "--workdir=x"], "--model_name: must be 1-64 letters"),
])
def test_the_serving_command_refuses_bad_flags_in_one_line(args, message):
    run = subprocess.run([sys.executable, "-m", "export.cli", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and re.search(message, run.stderr), run.stderr
    assert "Traceback" not in run.stderr
