"""TensorFlow Serving's REST API, for the clients written against it.

    GET  /v1/models/M[/versions/1]              model status
    GET  /v1/models/M[/versions/1]/metadata     the signature `serving_default`
    POST /v1/models/M[/versions/1]:predict      prediction

A predict request is JSON (any Content-Type: TF Serving reads the body as JSON,
and `curl -d` sends form-encoded), in one of TF Serving's two formats:

    row       {"instances": [image, ...]}  or  {"instances": [{"images": image}, ...]}
              -> {"predictions": [{"logits": [K], "probabilities": [K]}, ...]}
    columnar  {"inputs": [image, ...]}  or  {"inputs": {"images": [image, ...]}}
              -> {"outputs": {"logits": [N][K], "probabilities": [N][K]}}

with an optional "signature_name" (serving_default, the default, or serve). The
answer has the exported signature's two outputs, as TF Serving loading the
export's SavedModel would give. Errors are {"error": "..."} with a 4xx status,
as TF Serving's.
"""

from export.validate import ClientError, check_images, loads, refuse_literals

SIGNATURES = ("serving_default", "serve")


def status(model, failure=None):
    """GET /v1/models/M: AVAILABLE, or (`failure`: why the model cannot answer) END
    with error_code UNAVAILABLE, as TF Serving reports a version it can no longer
    serve."""
    if failure:
        return {"model_version_status": [{"version": model.version, "state": "END",
                                           "status": {"error_code": "UNAVAILABLE",
                                                      "error_message": failure}}]}
    return {"model_version_status": [{"version": model.version, "state": "AVAILABLE",
                                       "status": {"error_code": "OK", "error_message": ""}}]}


def _tensor_info(name, dims):
    return {"dtype": "DT_FLOAT", "name": name,
            "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                             "unknown_rank": False}}


def metadata(model):
    k = model.num_classes
    signature = {
        "inputs": {model.input_name: _tensor_info(f"serving_default_{model.input_name}:0",
                                                  [-1, *model.image_shape])},
        "outputs": {"logits": _tensor_info("StatefulPartitionedCall:0", [-1, k]),
                    "probabilities": _tensor_info("StatefulPartitionedCall:1", [-1, k])},
        "method_name": "tensorflow/serving/predict"}
    return {"model_spec": {"name": model.name, "signature_name": "", "version": model.version},
            "metadata": {"signature_def": {"signature_def": {
                name: signature for name in SIGNATURES}}}}


def _named(value, input_name, where):
    """`value`, or value[input_name] when it is the {input_name: ...} object form."""
    if isinstance(value, dict):
        extra = sorted(set(value) - {input_name})
        if extra:
            raise ClientError(400, f"unknown inputs {extra} in {where}; the model takes "
                              f"one input {input_name!r}")
        if input_name not in value:
            raise ClientError(400, f"no input {input_name!r} in {where}")
        return value[input_name]
    return value


def parse(body, model, max_batch):
    """A predict request body as (images float32 [N, H, W, C], "row" or "columnar").

    Raises:
      ClientError: a request TF Serving's format or the model does not allow (400).
    """
    request = loads(body)
    if not isinstance(request, dict):
        raise ClientError(400, 'expected a JSON object {"instances": [...]} (row format) '
                          'or {"inputs": ...} (columnar format)')
    unknown = set(request) - {"signature_name", "instances", "inputs"}
    if unknown:
        raise ClientError(400, f"unknown keys {sorted(unknown)}; a predict request has "
                          '"instances" or "inputs", and optionally "signature_name"')
    if ("instances" in request) == ("inputs" in request):
        raise ClientError(400, 'expected either "instances" (row format) or "inputs" '
                          "(columnar format), not both and not neither")
    signature = request.get("signature_name", "serving_default")
    if signature not in SIGNATURES:
        raise ClientError(400, f"unknown signature_name {signature!r}; the model has "
                          f"{', '.join(SIGNATURES)}")
    if "instances" in request:
        form, values = "row", request["instances"]
        if not isinstance(values, list):
            raise ClientError(400, '"instances" must be a list of images')
        values = [_named(v, model.input_name, "an instance") for v in values]
    else:
        form = "columnar"
        values = _named(request["inputs"], model.input_name, '"inputs"')
        if not isinstance(values, list):
            raise ClientError(400, f'"inputs" must be a list of images (or {{"{model.input_name}"'
                              ": [images]})")
    refuse_literals(body, f'"{"instances" if form == "row" else "inputs"}"')
    return check_images(values, model.image_shape, max_batch), form


def respond(form, logits, probabilities):
    """TF Serving's answer for a batch, in the request's format."""
    if form == "row":
        return {"predictions": [{"logits": l, "probabilities": p} for l, p in
                                zip(logits.tolist(), probabilities.tolist())]}
    return {"outputs": {"logits": logits.tolist(), "probabilities": probabilities.tolist()}}
