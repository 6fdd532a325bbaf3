"""Deployable files for a trained classifier, written only once they are checked.

`export(model, directory, x, y, attack=...)` writes one directory:

    saved_model/      TensorFlow SavedModel, signature `serve` (also `serving_default`):
                      images float32 [None, H, W, C], pixels in [0, 1]
                      -> {"logits": float32 [None, K], "probabilities": float32 [None, K]}
    NAME.onnx         the same function in ONNX: input `images`, outputs `logits` and
                      `probabilities`, dynamic batch, float32, the opset asked for
    NAME.keras        the trained Keras model, unchanged (to fine-tune or re-export)
    triton/NAME/      a Triton model repository entry: config.pbtxt, labels.txt,
                      1/model.onnx (export/repositories.py)
    tf_serving/NAME/  a TF Serving base path: 1/ holds the SavedModel
    NAME.int8.onnx, NAME.float16.onnx, litert/   with `quantize` and `litert`:
                      the smaller files of the same student (export/variants.py),
                      each measured on itself; the ONNX ones are Triton models too
    model_card.json   what the model takes and returns, what it was trained for and how
                      robust it measured (from the caller's `card`), the parity checks,
                      the opset, where each server's files are ("serving"), and the
                      sha256 of every other file

The exported function is the Keras model recomputed in float32: a mixed-precision
model's float16 layers become float32 (deployment gets the trained weights
without float16 rounding; the card records how far the float16 model is from
it). Keras keeps a Normalization layer's mean and variance as eager tensors,
which tf2onnx turns into extra *inputs* of the ONNX graph that every caller
would have to feed; the float32 copy holds them as numpy arrays, which become
constants of the graph.

Every export runs `parity.compare` (Keras vs SavedModel vs ONNX Runtime on the
given clean inputs and on PGD inputs crafted on the Keras model). The files are
written into a temporary directory beside `directory` and moved into place
only when every check passes: a failed or interrupted export leaves the previous
export (or nothing) where it was, never a half-written model.
"""

import contextlib
import datetime
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from ardir_tf import precision
from export import parity, repositories, variants

CARD = "model_card.json"
SAVED_MODEL = "saved_model"
DEFAULT_OPSET = 17
MIN_OPSET = 13  # the oldest opset tf2onnx 1.17 still converts Keras 3 graphs to


class ExportError(ValueError):
    """An export that cannot be written, or that failed its parity checks."""


def max_opset():
    """The newest ONNX opset the installed tf2onnx writes."""
    import tf2onnx
    return max(tf2onnx.constants.OPSET_TO_IR_VERSION)


def serving_model(model):
    """The float32 copy of `model` (a layer named as `model`) behind an `images`
    input, with outputs {"logits", "probabilities"} (dict outputs give the
    SavedModel signature and the ONNX graph stable output names)."""
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.inputs[0].shape) != 4:
        raise ExportError(f"model {model.name!r} has {len(model.inputs)} input(s) and "
                          f"{len(model.outputs)} output(s); export takes an image "
                          "classifier: one input of pixels [B, H, W, C], one output of logits")
    body = precision.float32_copy(model)
    images = keras.Input(tuple(body.inputs[0].shape[1:]), dtype="float32", name="images")
    logits = keras.layers.Activation("linear", name="logits")(body(images))
    probabilities = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model(images, {"logits": logits, "probabilities": probabilities},
                       name=f"{body.name}_serving")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory):
    """{relative path: {"sha256", "bytes"}} of every file under `directory` but the card."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel != CARD:
                out[rel] = dict(sha256=sha256(path), bytes=os.path.getsize(path))
    return dict(sorted(out.items()))


def verify(directory):
    """Raises ExportError unless every file the card lists is there with its sha256."""
    with open(os.path.join(directory, CARD)) as f:
        card = json.load(f)
    for rel, want in card["files"].items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise ExportError(f"{directory}: {rel} is missing")
        if sha256(path) != want["sha256"]:
            raise ExportError(f"{directory}: {rel} does not match the sha256 in {CARD}")
    return card


def _check_target(directory):
    _recover(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ExportError(f"{directory} is a file; export writes a directory")
    if os.path.isdir(directory) and os.listdir(directory):
        if not os.path.exists(os.path.join(directory, CARD)):
            raise ExportError(f"{directory} is not empty and holds no export of ours (no "
                              f"{CARD}); choose another directory")
        try:
            with open(os.path.join(directory, CARD)) as f:
                listed = set(json.load(f)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ExportError(f"{directory}/{CARD} is not a model card of ours; choose another "
                              "directory") from None
        others = sorted(set(file_digests(directory)) - listed)
        if others:  # an export replaces its directory whole: these would go with it
            raise ExportError(f"{directory} holds files its export did not write "
                              f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                              "move them, or choose another directory")


def lock_path(directory):
    """The lock file an export of `directory` holds while it writes: beside it,
    a regular file (an flock on a directory fails on NFS), named after the
    directory's real path (two spellings of one directory share it)."""
    parent, name = os.path.split(os.path.realpath(directory))
    return os.path.join(parent, f".{name}.lock")


def _same_file(a, b):
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def _exclusive(directory, log):
    """Holds an flock on `lock_path(directory)` while an export writes: a second
    export of the same directory is refused instead of renaming its files into
    the first one's half-finished replacement. The file is deleted when the
    export ends (a lock taken on a file deleted meanwhile is taken again on
    the new one). Where the file system has no flock (some network file
    systems), the export runs unlocked, and says so."""
    path = lock_path(directory)
    for _ in range(100):  # each retry: a holder deleted the file as we opened it
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ExportError(f"cannot open the export's lock file {path} ({err.strerror}); "
                              "is it another user's? Delete it if no export is running") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportError(f"another export of {directory} is under way; wait for it to "
                              "finish") from None
        except OSError as err:
            os.close(fd)
            log(f"cannot lock {path} ({err.strerror}); exporting unlocked")
            fd = None
            break
        try:
            if _same_file(os.stat(path), os.fstat(fd)):
                break  # the file still at the path: the lock holds
        except FileNotFoundError:
            pass
        except OSError:
            os.close(fd)
            raise
        os.close(fd)
    else:
        raise ExportError(f"could not take the export's lock file {path}: it was replaced "
                          "100 times in a row")
    try:
        yield
    finally:
        if fd is not None:
            try:  # while still holding it: no one takes a lock on it after
                if _same_file(os.stat(path), os.fstat(fd)):
                    os.remove(path)
            except OSError:
                pass
            os.close(fd)


def _recover(directory):
    """What a kill during `_move_into_place` left: the previous export under
    .<name>.old-* with no <name> (put back), or beside the new one (deleted)."""
    parent, name = os.path.split(directory)
    for old in sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.old-*"))):
        if not os.path.exists(directory):
            os.replace(old, directory)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _move_into_place(tmp, directory):
    """Renames `tmp` to `directory`. A previous export is first renamed aside and
    deleted last, so a kill in between leaves it whole under .old-*."""
    if not os.path.exists(directory):
        os.replace(tmp, directory)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-",
                           dir=os.path.dirname(directory))
    os.rmdir(old)
    os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _versions():
    import onnx
    import onnxruntime
    import tf2onnx
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _onnx_runtime(path):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != ["images"]:
        raise ExportError(f"the ONNX graph takes inputs {[i.name for i in inputs]}; expected "
                          "only 'images'. A layer of the model keeps constants outside its "
                          "weights, and tf2onnx made them inputs")
    types = {o.name: o.type for o in outputs} | {"images": inputs[0].type}
    if set(types) != {"images", "logits", "probabilities"} or \
            set(types.values()) != {"tensor(float)"}:
        raise ExportError(f"the ONNX graph has inputs/outputs {types}; expected float32 "
                          "images -> logits, probabilities")
    if isinstance(inputs[0].shape[0], int):
        raise ExportError(f"the ONNX graph fixes the batch size to {inputs[0].shape[0]}")
    return session


# What of a model's metrics.json entry goes into its card.
EVALUATION_KEYS = ("norm", "eps", "n_examples", "clean_accuracy", "robust_accuracy",
                   "worst_case_accuracy", "attack_order", "reliable", "scoring")


def card_from_run(settings, metrics, dataset, class_names, model="student"):
    """The facts of a run for the model card of its `model`.

    Args:
      settings: the run's flags.json (dict).
      metrics: the run's metrics.json (dict; entries `model` and `model@norm-eps`).
      dataset: the data set's name; class_names: one name per class.

    Returns:
      {"dataset", "class_names", "trained_for": {"norm", "eps", "method", ...},
      "evaluations": [{norm, eps, clean_accuracy, robust_accuracy, ...}, ...],
      "training": settings}.
    """
    settings = settings or {}
    evaluations = [{k: entry[k] for k in EVALUATION_KEYS if k in entry}
                   for name, entry in sorted(metrics.items())
                   if name == model or name.startswith(f"{model}@")]
    trained_for = {k: settings[k] for k in ("norm", "eps", "method", "student_arch")
                   if k in settings}
    return dict(dataset=dataset, class_names=list(class_names), trained_for=trained_for,
                evaluations=evaluations, training=settings)


def _card(card, name, shape, num_classes, opset, servers, trained_policy, parity_result,
          small, tmp):
    """The model card: the caller's `card`, then what the export knows (the
    interface, the files and their sha256, the parity checks, the versions)."""
    full = dict(card or {})
    full.update(
        format_version=1,
        name=name,
        input={"name": "images", "dtype": "float32", "shape": shape, "layout": "NHWC",
               "range": [0.0, 1.0]},
        outputs={"logits": {"dtype": "float32", "shape": [None, num_classes]},
                 "probabilities": {"dtype": "float32", "shape": [None, num_classes]}},
        onnx={"file": f"{name}.onnx", "opset": int(opset)},
        saved_model={"dir": SAVED_MODEL, "signature": "serve"},
        keras={"file": f"{name}.keras"},
        serving=servers,
        dtype={"trained": trained_policy, "exported": "float32"},
        parity=parity_result,
        versions=_versions(),
        exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        files=file_digests(tmp))
    if small:
        full["artifacts"] = small
    return full


def export(model, directory, x, y, *, attack, card=None, name="student",
           opset=DEFAULT_OPSET, tolerance=parity.TOLERANCE, batch_sizes=(1, 64),
           max_batch=256, log=None, quantize=(), litert=(), calibration=None,
           robustness=None, worst_case_margin=0.02):
    """Writes `model` to `directory` (see the module doc) and returns its card.

    Args:
      model: a Keras classifier, pixels [B, H, W, C] in [0, 1] -> logits [B, K].
      directory: where the export goes; replaced only by a checked export, and
        refused if it is a non-empty directory holding no export of ours.
      x, y: clean test pixels (float32 [N, H, W, C]) and labels for parity.
      attack: a callable (model_fn, x, y) -> x_adv, e.g. attacks.PGD(...):
        the adversarial inputs of the parity checks are crafted with it on
        the Keras model.
      card: dict of facts the caller knows (dataset, class names, threat
        model, accuracy, ...) merged into the model card.
      name: file name of the .onnx and .keras files, and the model's name in
        the Triton and TF Serving repositories.
      opset: ONNX opset, MIN_OPSET to max_opset().
      tolerance: the parity checks' largest max |logit difference|.
      batch_sizes: the batch sizes parity runs at.
      max_batch: the Triton config's max_batch_size.
      log: fn(str) told of each step, or None.
      quantize: smaller ONNX files to write beside <name>.onnx, from "int8"
        (<name>.int8.onnx, calibrated on `calibration` images) and "float16";
        each is also its own model in the Triton repository (<name>_int8, ...).
      litert: LiteRT files to write in litert/, from "float32", "float16" and
        "int8" (full integer, calibrated on `calibration` images).
        With either, the card's "artifacts" gives each file's (and the float32
        ONNX file's) size, latency at batch 1 and 64, clean accuracy on x, and
        with `robustness(path) -> {"worst_case_accuracy"}` its worst case,
        measured on the file (e.g. ardir_tf.deployed.evaluate_artifact); a file
        whose worst case is more than `worst_case_margin` below float32's is
        flagged in the card and the log (export/variants.py).

    Returns:
      The model card (also written to directory/model_card.json).

    Raises:
      ExportError: a bad target, opset or model, or a failed parity check;
        nothing is written then.
    """
    log = log or (lambda message: None)
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    with _exclusive(directory, log):
        _check_target(directory)
        if not MIN_OPSET <= opset <= max_opset():
            raise ExportError(f"opset {opset} is not supported; tf2onnx {max_opset()} "
                              f"writes opsets {MIN_OPSET} to {max_opset()}")
        serving = serving_model(model)
        body = serving.get_layer(model.name)
        x = np.asarray(x, np.float32)
        trained_policy = precision.compute_dtypes(model)
        # A float32 model is its own reference (so parity covers the rewrite too); a
        # mixed-precision one is compared in float32, its float16 drift recorded apart.
        reference = model if trained_policy == "float32" else body

        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
        try:
            log(f"writing {SAVED_MODEL}/, {name}.onnx (opset {opset}) and {name}.keras")
            model.save(os.path.join(tmp, f"{name}.keras"))
            serving.export(os.path.join(tmp, SAVED_MODEL), format="tf_saved_model", verbose=False)
            with warnings.catch_warnings():  # tf2onnx's numpy-2 deprecation notices
                warnings.simplefilter("ignore")
                serving.export(os.path.join(tmp, f"{name}.onnx"), format="onnx",
                               opset_version=opset, verbose=False)
            session = _onnx_runtime(os.path.join(tmp, f"{name}.onnx"))
            loaded = tf.saved_model.load(os.path.join(tmp, SAVED_MODEL))

            log(f"parity: Keras vs SavedModel vs ONNX Runtime on {len(x)} clean and "
                f"{len(x)} adversarial inputs, batch sizes {', '.join(map(str, batch_sizes))}")
            x_adv = attack(lambda z: reference(z, training=False), x, y).numpy()
            result = parity.compare(
                lambda z: reference(z, training=False),
                {"savedmodel": lambda z: loaded.serve(tf.constant(z))["logits"],
                 "onnxruntime": lambda z: session.run(["logits"], {"images": z})[0]},
                {"clean": x, "pgd": x_adv}, batch_sizes=batch_sizes, tolerance=tolerance)
            if not result["passed"]:
                raise ExportError("the export does not compute the Keras model's function; "
                                  "nothing was written:\n  " +
                                  "\n  ".join(parity.failures(result)))

            small = None
            if quantize or litert:
                try:
                    small = variants.write(tmp, name, quantize, litert, calibration, x, y,
                                           robustness, worst_case_margin,
                                           (card or {}).get("class_names"), log)
                except variants.VariantError as err:
                    raise ExportError(str(err)) from None
            shape = [None, *map(int, model.inputs[0].shape[1:])]
            num_classes = int(serving.outputs[0].shape[-1])
            log(f"writing {repositories.TRITON}/{name}/ (Triton) and "
                f"{repositories.TF_SERVING}/{name}/ (TF Serving)")
            servers = repositories.write(
                tmp, name, os.path.join(tmp, f"{name}.onnx"), os.path.join(tmp, SAVED_MODEL),
                shape[1:], num_classes, max_batch, (card or {}).get("class_names"),
                {kind: os.path.join(tmp, f"{name}.{kind}.onnx") for kind in quantize})
            full = _card(card, name, shape, num_classes, opset, servers, trained_policy, result,
                         small, tmp)
            if trained_policy != "float32":
                full["dtype"]["max_abs_logit_diff_vs_trained"] = float(np.max(np.abs(
                    np.asarray(model(x, training=False), np.float32) -
                    np.asarray(reference(x, training=False)))))
            with open(os.path.join(tmp, CARD), "w") as f:
                json.dump(full, f, indent=2)
                f.write("\n")
            _move_into_place(tmp, directory)
            return full
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
