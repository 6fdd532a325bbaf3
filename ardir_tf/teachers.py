"""Frozen teachers from files: Keras, TensorFlow SavedModel and ONNX.

A teacher only ever runs forward, on the clean batch, in inference mode: the
distiller needs its logits and the representations it names, never a gradient
through it. So a teacher here is a frozen function of [0, 1] pixels in NHWC,

    teacher(x) -> {"logits": [B, K], name: [B, ...], ...}

with its representations in NHWC (feature maps [B, H, W, C], vectors [B, C]),
whatever the layout of the model behind it, so that adapters and the IR term
work unchanged. `load(path, layers)` gives one for

- a `.keras` file (the named layers are Keras layers, read through
  `models.expose`);
- a TensorFlow SavedModel directory: a signature (default `serving_default`,
  else `serve`) with one image input; `layers` name further outputs;
- an `.onnx` file, run by ONNX Runtime inside the training graph
  (`tf.numpy_function`, with the output shapes made static from one probe
  run); `layers` name further graph outputs. It works in `fit`, under `tf.function`
  and under MirroredStrategy; not under XLA (`jit_compile=True`), which cannot
  call back into Python. ONNX Runtime computes no input gradients, so an ONNX
  teacher cannot be attacked with PGD (`differentiable` is False).

PyTorch exports are NCHW. `layout="auto"` reads the layout from the model's
input shape when the data's (H, W, C) tells it apart ([C, H, W] or [H, W, C]),
and raises otherwise; `layout="nchw"` or `"nhwc"` says it. Our pixels are in
[0, 1]; a teacher that expects other inputs gets `(x * input_scale - mean) /
std` (per channel) computed in the graph before it, never a guessed scaling.
`check(teacher, x, y)` measures the teacher's clean accuracy before any
training and, near chance level, names the likely cause.

The SavedModel and ONNX teachers live in ardir_tf/file_teachers.py. Both pass
one validation (`file_teachers._interface`), in the same words: one input,
float32, a batch dimension left open (a teacher runs on every batch size), a
layout that fits the data, the logits output, every layer asked for among the
outputs. One rule picks the logits of a SavedModel or an ONNX file (`logits_output`):
the output named `logits`, else the only output; a file with several outputs,
none named `logits`, is refused with their names. They are logits unless
`outputs="probabilities"` says they are a softmax's (then their log is used);
`check` refuses probabilities given as logits.

Trust: loading runs the file. A SavedModel's graph can hold any TensorFlow op,
file reads and writes included, and runs when the teacher is called; an ONNX
file can name external data files, which ONNX Runtime reads. Load teacher
files you would run as code.
"""

import os

import numpy as np
import tensorflow as tf

LAYOUTS = ("auto", "nhwc", "nchw")
# What a file teacher's logits output holds: logits, or softmax probabilities
# (then the teacher gives their log: logits up to a constant a row, which
# softmax, and so every KD term, ignores).
OUTPUTS = ("logits", "probabilities")
# A teacher whose every row on the check's images lies in [0, 1] and sums to 1
# within this outputs probabilities, not logits.
PROBABILITY_ROW_TOLERANCE = 1e-3
SAVED_MODEL_SIGNATURES = ("serving_default", "serve")


class TeacherError(ValueError):
    """A teacher that cannot be loaded or cannot serve these data."""


class Teacher:
    """A frozen function of [0, 1] NHWC pixels to {"logits", name: ...} (NHWC).

    Attributes:
      kind: "keras", "saved_model", "onnx" or "callable".
      source: where it came from (a path, or the callable's name).
      input_shape: (H, W, C) of the pixels it takes.
      num_classes: K, the logits' width.
      layers: the names of the representations it returns besides "logits".
      shapes: {name: shape without the batch dimension}, "logits" included.
      differentiable: whether gradients flow through it (PGD can attack it).
      available: every name `layers` could have asked for.
      description: one line for the log (file, runtime, layout, scaling).
    """

    kind = "callable"
    differentiable = True

    def __init__(self, fn, input_shape, layers=(), source=None, available=None):
        self._fn = fn
        self.layers = tuple(layers)
        self.source = source or getattr(fn, "__name__", type(fn).__name__)
        if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
            raise TeacherError(f"teacher {self.source}: takes inputs of shape "
                               f"{tuple(input_shape)}; a teacher takes images of a fixed "
                               "(height, width, channels)")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.available = tuple(available) if available is not None else None
        try:
            self.shapes = self._probe()
        except TeacherError:
            raise
        except Exception as err:  # whatever the model raises on a batch of zeros
            raise TeacherError(f"teacher {self.source}: running it on two zero images of "
                               f"shape {self.input_shape} failed: {_first_line(err)}") from None
        if "logits" not in self.shapes or len(self.shapes["logits"]) != 1:
            raise TeacherError(f"teacher {self.source}: needs 'logits' of shape [batch, "
                               f"classes]; got {self.shapes}")
        self.num_classes = int(self.shapes["logits"][0])
        if not hasattr(self, "description"):
            self.description = f"{self.kind} teacher {self.source}"

    def _probe(self):
        out = self._fn(tf.zeros([2, *self.input_shape], tf.float32))
        if not isinstance(out, dict):
            raise TeacherError(f"teacher {self.source}: returns {type(out).__name__}; a "
                               "teacher returns a dict {'logits': ..., layer: ...}")
        missing = [n for n in self.layers if n not in out]
        if missing:
            raise TeacherError(f"teacher {self.source}: has no output "
                               f"{', '.join(map(repr, missing))}; it has "
                               f"{', '.join(self.available or out)}")
        return {n: tuple(int(d) for d in out[n].shape[1:]) for n in ("logits", *self.layers)
                if n in out}

    outputs = "logits"  # or "probabilities" (load's `outputs`): the log is taken

    def __call__(self, x, training=False):
        """The outputs on pixels `x` [B, H, W, C] (`training` is ignored: a
        teacher always runs in inference mode)."""
        out = self._fn(tf.cast(x, tf.float32))
        out = {n: tf.cast(out[n], tf.float32) for n in ("logits", *self.layers)}
        if self.outputs == "probabilities":
            out["logits"] = tf.math.log(tf.maximum(out["logits"], 1e-12))
        return out

    def __repr__(self):
        return f"<{type(self).__name__} {self.description}>"


class KerasTeacher(Teacher):
    """A keras.Model (pixels -> logits) with named layers read through `expose`."""

    kind = "keras"

    def __init__(self, model, layers=(), source=None):
        from ardir_tf import models, precision
        self.model = model
        try:
            # A teacher runs in inference mode only: under mixed_bfloat16 its
            # BatchNorm computes in bfloat16 (precision.inference_view).
            self.view = precision.inference_view(models.expose(model, list(layers)))
        except ValueError as err:
            raise TeacherError(str(err)) from None
        self.description = f"Keras model {model.name!r}" + (f" from {source}" if source else "")
        super().__init__(lambda x: self.view(x, training=False),
                         self.view.input.shape[1:], layers, source or model.name)

    def _probe(self):  # the symbolic outputs say it without running the model
        return {n: tuple(int(d) for d in self.view.output[n].shape[1:])
                for n in ("logits", *self.layers)}

    def __call__(self, x, training=False):
        return self.view(x, training=False)


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _dims(dims):
    return "x".join("?" if d is None else str(d) for d in dims)


# The file teachers live in ardir_tf/file_teachers.py; their names are read here
# too (teachers.OnnxTeacher, ...), imported when first asked for.
_FILE_TEACHER_NAMES = ("SavedModelTeacher", "OnnxTeacher", "logits_output", "is_saved_model",
                       "onnx_providers")


def __getattr__(name):
    if name in _FILE_TEACHER_NAMES:
        from ardir_tf import file_teachers
        return getattr(file_teachers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(path, layers=(), *, input_shape=None, layout="auto", input_scale=1.0, mean=None,
         std=None, signature=None, providers=None, outputs="logits"):
    """A frozen teacher from a file (see the module doc).

    Args:
      path: a `.keras` file, a SavedModel directory or an `.onnx` file.
      layers: names of the representations to return besides "logits" (Keras
        layer names; SavedModel signature outputs; ONNX graph outputs).
      input_shape: the data's (H, W, C); required for SavedModel and ONNX
        teachers (it decides the layout and sizes the probe), checked for
        Keras ones.
      layout: "auto", "nhwc" or "nchw" (SavedModel and ONNX).
      input_scale, mean, std: the model takes (pixels * input_scale - mean) /
        std, mean and std per channel (one value: every channel).
      signature: the SavedModel signature (default serving_default, else serve).
      providers: ONNX Runtime execution providers (default: CUDA if available,
        then CPU).
      outputs: what the SavedModel's or ONNX graph's logits output holds:
        "logits", or "probabilities" (a softmax; the teacher then gives their
        log). `check` refuses a teacher whose "logits" are probabilities.

    Raises:
      TeacherError: a missing or unreadable file, a model that does not take
        these images, a missing output (the message lists those it has).
    """
    from ardir_tf import file_teachers
    layers = tuple(dict.fromkeys(n for n in layers if n != "logits"))
    if not isinstance(path, (str, os.PathLike)):
        raise TeacherError(f"a teacher path must be a string, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TeacherError(f"{path}: no such file or directory")
    if outputs not in OUTPUTS:
        raise TeacherError(f"outputs={outputs!r}: expected one of {', '.join(OUTPUTS)}")
    if path.endswith(".keras") and os.path.isfile(path):
        import keras
        if input_scale != 1 or mean is not None or std is not None or \
                layout not in ("auto", "nhwc") or outputs != "logits":
            raise TeacherError(f"{path}: a Keras model takes our [0, 1] NHWC pixels as built "
                               "and must return logits; input_scale, mean, std, layout and "
                               "outputs are for SavedModel and ONNX teachers")
        try:
            model = keras.models.load_model(path)
        except Exception as err:  # Keras raises many kinds for a bad file
            raise TeacherError(f"{path}: cannot load it as a Keras model: {_first_line(err)}"
                               ) from None
        teacher = KerasTeacher(model, layers, source=path)
    elif input_shape is None:
        raise TeacherError(f"{path}: input_shape=(H, W, C) of the data is needed to load a "
                           "SavedModel or ONNX teacher")
    elif file_teachers.is_saved_model(path):
        teacher = file_teachers.SavedModelTeacher(path, input_shape, layers, layout, input_scale, mean, std,
                                    signature)
    elif path.endswith(".onnx") and os.path.isfile(path):
        teacher = file_teachers.OnnxTeacher(path, input_shape, layers, layout, input_scale, mean, std,
                              providers)
    else:
        raise TeacherError(f"{path}: not a teacher this can load; give a .keras file, a "
                           "SavedModel directory (with saved_model.pb) or an .onnx file")
    if input_shape is not None and teacher.input_shape != tuple(input_shape):
        raise TeacherError(f"{path}: the teacher takes {_dims(teacher.input_shape)} images, "
                           f"the data are {_dims(input_shape)}")
    if outputs == "probabilities":
        teacher.outputs = outputs
        teacher.description += ", outputs probabilities (their log is used as logits)"
    return teacher


def as_teacher(teacher, layers=(), input_shape=None):
    """`teacher` as a Teacher returning `layers`: a keras.Model, a Teacher (whose
    layers must include them), or a callable x -> {"logits": ..., name: ...}
    (probed once on zeros of `input_shape`)."""
    import keras
    layers = tuple(dict.fromkeys(n for n in layers if n != "logits"))
    if isinstance(teacher, keras.Model):
        return KerasTeacher(teacher, layers)
    if isinstance(teacher, Teacher):
        missing = [n for n in layers if n not in teacher.layers]
        if missing:
            if isinstance(teacher, KerasTeacher):
                return KerasTeacher(teacher.model, layers, teacher.source)
            raise TeacherError(f"teacher {teacher.source} was loaded with layers "
                               f"{list(teacher.layers)}; it lacks {', '.join(missing)}: load "
                               "it with layers= naming every teacher layer of the pairs")
        return teacher
    if callable(teacher):
        if input_shape is None:
            raise TeacherError("a callable teacher needs the input shape to be probed")
        return Teacher(teacher, input_shape, layers)
    raise TeacherError(f"the teacher must be a keras.Model, an ardir_tf.teachers.Teacher "
                       f"or a callable returning {{'logits': ...}}; got {type(teacher).__name__}")


def accuracy(teacher, x, y, batch_size=256, nonfinite=None):
    """Clean accuracy of `teacher` (or any x -> logits/dict callable) on numpy x, y,
    and its predictions. `nonfinite` (a list): gets the number of images whose
    logits hold NaN or Inf (counted wrong)."""
    preds, bad = [], 0
    for i in range(0, len(x), batch_size):
        out = teacher(tf.constant(x[i: i + batch_size], tf.float32))
        logits = np.asarray(out["logits"] if isinstance(out, dict) else out)
        finite = np.all(np.isfinite(logits), axis=-1)
        bad += int((~finite).sum())
        preds.append(np.where(finite, np.argmax(np.nan_to_num(logits), -1), -1))
    preds = np.concatenate(preds) if preds else np.zeros([0], np.int64)
    if nonfinite is not None:
        nonfinite.append(bad)
    return float(np.mean(preds == np.asarray(y).reshape(-1))), preds


def outputs_probabilities(teacher, x, raw=False):
    """Whether `teacher`'s logits on `x` look like softmax probabilities: every
    row in [0, 1], summing to 1 within PROBABILITY_ROW_TOLERANCE (`raw`: the
    outputs of a Teacher declared to give probabilities, before their log)."""
    x = tf.convert_to_tensor(np.asarray(x, np.float32))
    out = teacher._fn(x) if raw else teacher(x, training=False)
    logits = np.asarray(out["logits"] if isinstance(out, dict) else out, np.float64)
    return bool(len(logits)) and bool(
        np.all(logits >= 0) and np.all(logits <= 1) and
        np.all(np.abs(logits.sum(axis=-1) - 1) <= PROBABILITY_ROW_TOLERANCE))


def check(teacher, x, y, num_classes, retry=None, margin=0.1):
    """The pre-training check of a teacher's clean accuracy on (x, y), after
    refusing one whose logits are probabilities (`outputs_probabilities`).

    Returns {"clean_accuracy", "n_examples", "chance"}. Raises TeacherError when
    the accuracy is near chance: below chance + margin x (1 - chance) (0.19 for
    10 classes, 0.55 for 2, 0.109 for 100; chance = 1 / num_classes), with the likely
    cause: `retry(**changes)` (optional) builds the same teacher with another
    input_scale or layout, and the message names a change that scores well;
    predictions that are right up to a fixed relabelling point at the class
    order."""
    if getattr(teacher, "outputs", "logits") == "logits" and \
            outputs_probabilities(teacher, x[:256]):
        raise TeacherError(
            "the teacher's 'logits' are probabilities: on every test image they lie in "
            "[0, 1] and sum to 1 (a softmax ends the model), so the distillation targets "
            "would be softmax(probabilities), nearly uniform; give a model that returns "
            "logits, or say outputs='probabilities' (--teacher_outputs=probabilities, for "
            "SavedModel and ONNX teachers) to use their log")
    if getattr(teacher, "outputs", "logits") == "probabilities" and \
            not outputs_probabilities(teacher, x[:256], raw=True):
        raise TeacherError(
            "the teacher was said to output probabilities (--teacher_outputs=probabilities), "
            "but its outputs on the test images are not rows in [0, 1] summing to 1: they "
            "are logits; drop --teacher_outputs=probabilities (their log would distort "
            "every distillation target)")
    nonfinite = []
    acc, preds = accuracy(teacher, x, y, nonfinite=nonfinite)
    if nonfinite[0]:
        raise TeacherError(f"the teacher's outputs are NaN or infinite on {nonfinite[0]} of "
                           f"{len(y)} test images; check the file (a broken export) and "
                           "that its inputs are the pixels it was trained on")
    chance = 1.0 / num_classes
    report = {"clean_accuracy": acc, "n_examples": int(len(y)), "chance": chance}
    floor = chance + margin * (1 - chance)
    if acc >= floor:
        return report
    y = np.asarray(y).reshape(-1)
    causes = []
    if retry is not None:
        for label, changes in (
                ("it expects 0-255 pixels: input_scale=255 (--teacher_input_scale=255)",
                 {"input_scale": 255.0}),
                ("it expects [0, 1] pixels: input_scale=1 (--teacher_input_scale=1)",
                 {"input_scale": 1.0}),
                ("its input is NCHW: layout='nchw' (--teacher_layout=nchw)", {"layout": "nchw"}),
                ("its input is NHWC: layout='nhwc' (--teacher_layout=nhwc)", {"layout": "nhwc"})):
            if all(getattr(teacher, "prep", None) is not None and
                   {"input_scale": teacher.prep.input_scale, "layout": teacher.prep.layout}[k] == v
                   for k, v in changes.items()):
                continue  # what it has already
            try:
                other = retry(**changes)
            except (TeacherError, ValueError):
                continue
            if other is None:
                continue
            other_acc, _ = accuracy(other, x, y)
            if other_acc >= floor and other_acc > acc + 0.1:
                causes.append(f"{label} (it then scores {other_acc:.3f})")
    # Right up to a relabelling: each true class maps mostly to one predicted class.
    confusion = np.zeros([num_classes, num_classes])
    np.add.at(confusion, (y, np.clip(preds, 0, num_classes - 1)), 1)
    relabelled = confusion.max(axis=1).sum() / max(len(y), 1)
    if relabelled >= 0.5 and len(set(confusion.argmax(axis=1))) == num_classes:
        causes.append(f"its classes are in another order (a fixed relabelling of its "
                      f"predictions scores {relabelled:.3f})")
    cause = ("likely cause: " + "; or ".join(causes)) if causes else (
        "check that it was trained on this data set, with pixels in [0, 1] and the same "
        "class order" if isinstance(teacher, KerasTeacher) else
        "check the layout (--teacher_layout), the input scaling (--teacher_input_scale, "
        "--teacher_mean, --teacher_std) and the class order")
    raise TeacherError(f"the teacher's clean accuracy on {len(y)} test images is {acc:.3f}, "
                       f"near chance ({chance:.3f}); {cause}")
