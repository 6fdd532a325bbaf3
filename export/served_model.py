"""The model a server serves: an exported ONNX classifier and its model card.

    load(onnx_path, name=None)   the `Model` at onnx_path, with the model_card.json
                                 beside it checked against the file (check_card)
    Model(onnx_path, card, name) images float32 [N, H, W, C] -> (logits, probabilities)
    public_card(card)            the part of the card GET /v1/metadata serves

Imports no TensorFlow.
"""

import hashlib
import json
import os
import re

import onnxruntime


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
