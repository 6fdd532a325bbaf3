"""Teachers from SavedModel directories and ONNX files (see ardir_tf.teachers,
whose `load` opens them, for what a teacher is and the rules they follow).

    SavedModelTeacher(path, input_shape, layers, ...)   a SavedModel signature
    OnnxTeacher(path, input_shape, layers, ...)         an ONNX graph on ONNX Runtime
    _interface(...)                                      the one validation both pass
    logits_output(outputs, where)                        the one rule for the logits
"""

import os

import numpy as np
import tensorflow as tf

from ardir_tf.teachers import (LAYOUTS, SAVED_MODEL_SIGNATURES, Teacher, TeacherError,
                               _dims, _first_line)


class _Preprocessing:
    """[0, 1] NHWC pixels -> what the model takes: scaled, normalised, transposed."""

    def __init__(self, input_scale=1.0, mean=None, std=None, channels=None, layout="nhwc"):
        if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) \
                or not input_scale > 0:
            raise TeacherError(f"input_scale must be a number > 0, got {input_scale!r}")
        self.input_scale = float(input_scale)
        self.mean = self._per_channel("mean", mean, 0.0, channels)
        self.std = self._per_channel("std", std, 1.0, channels)
        if np.any(self.std <= 0):
            raise TeacherError(f"std must be > 0, got {list(self.std)}")
        self.layout = layout

    @staticmethod
    def _per_channel(name, value, default, channels):
        if value is None:
            return np.full([channels], default, np.float32)
        values = np.atleast_1d(np.asarray(value, np.float32))
        if values.size == 1:
            values = np.full([channels], values[0], np.float32)
        if values.size != channels:
            raise TeacherError(f"{name} needs one value for all channels or one per channel "
                               f"({channels}), got {list(values)}")
        return values

    @property
    def identity(self):
        return self.input_scale == 1 and not self.mean.any() and np.all(self.std == 1)

    def __call__(self, x):
        if not self.identity:
            x = (x * self.input_scale - self.mean) / self.std
        return tf.transpose(x, [0, 3, 1, 2]) if self.layout == "nchw" else x

    def describe(self):
        parts = [self.layout.upper()]
        if self.input_scale != 1:
            parts.append(f"pixels x {self.input_scale:g}")
        if self.mean.any() or np.any(self.std != 1):
            parts.append(f"mean {list(map(float, self.mean))}, std {list(map(float, self.std))}")
        return ", ".join(parts)


def _layout(given, model_dims, data_shape, source):
    """'nhwc' or 'nchw' from the model's input dims [H?, W?, C?] (ints or None)
    and the data's (H, W, C)."""
    if given not in LAYOUTS:
        raise TeacherError(f"layout must be one of {', '.join(LAYOUTS)}, got {given!r}")
    h, w, c = data_shape
    dims = [d if isinstance(d, int) and d > 0 else None for d in model_dims]
    if len(dims) != 3:
        raise TeacherError(f"teacher {source} takes inputs of rank {len(dims) + 1}; an image "
                           f"classifier takes [batch, H, W, C] or [batch, C, H, W]")

    def fits(want):
        return all(d is None or d == v for d, v in zip(dims, want))
    nhwc, nchw = fits((h, w, c)), fits((c, h, w))
    if given == "auto":
        if nhwc and not nchw:
            return "nhwc"
        if nchw and not nhwc:
            return "nchw"
        if not nhwc and not nchw:
            raise TeacherError(f"teacher {source} takes images of shape {_dims(dims)}, but the "
                               f"data's are {h}x{w}x{c} (as NHWC) or {c}x{h}x{w} (as NCHW)")
        raise TeacherError(f"teacher {source} takes {_dims(dims)}, which could be NHWC or NCHW "
                           "for these data: say which (layout='nchw' for PyTorch exports, "
                           "--teacher_layout)")
    if not (nhwc if given == "nhwc" else nchw):
        want = (h, w, c) if given == "nhwc" else (c, h, w)
        raise TeacherError(f"teacher {source} takes {_dims(dims)}; as {given.upper()} these "
                           f"data would be {_dims(want)}")
    return given


def _to_nhwc(value, layout):
    if layout == "nchw" and value.shape.rank == 4:
        return tf.transpose(value, [0, 2, 3, 1])
    return value


def _load_outside_strategy(path):
    """tf.saved_model.load with plain variables, even inside a strategy's scope.

    Loaded inside a MirroredStrategy scope, a SavedModel's variables become
    distributed and its functions callable only in replica context, so the
    eager calls a teacher gets (the probe, the pre-training check, the
    evaluation) would fail. A strategy's scope belongs to the thread that
    entered it: loaded on a fresh thread, the teacher's variables are plain ones
    that every replica reads (a frozen teacher needs no copy per replica)."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(tf.saved_model.load, path).result()


class SavedModelTeacher(Teacher):
    """A TensorFlow SavedModel signature as a teacher (see the module doc)."""

    kind = "saved_model"

    def __init__(self, path, input_shape, layers=(), layout="auto", input_scale=1.0,
                 mean=None, std=None, signature=None):
        try:
            self.loaded = _load_outside_strategy(path)
        except Exception as err:  # TF raises several kinds for a bad directory
            raise TeacherError(f"{path}: cannot load it as a SavedModel: {_first_line(err)}"
                               ) from None
        names = list(self.loaded.signatures.keys())
        wanted = [signature] if signature else [s for s in SAVED_MODEL_SIGNATURES if s in names]
        if not wanted or wanted[0] not in names:
            raise TeacherError(f"{path}: no signature {signature or ' or '.join(SAVED_MODEL_SIGNATURES)}; "
                               f"it has {', '.join(names) or 'none'}")
        self.signature = wanted[0]
        fn = self.loaded.signatures[self.signature]
        _, kwargs = fn.structured_input_signature
        outputs = list(fn.structured_outputs)
        self.input_name, self.layout, self.logits_name = _interface(
            path, f"{path}: signature {self.signature!r}",
            [(name, spec.dtype.name, list(spec.shape)) for name, spec in kwargs.items()],
            outputs, layers, input_shape, layout)
        self.prep = _Preprocessing(input_scale, mean, std, input_shape[-1], self.layout)
        self.description = (f"SavedModel {path} (signature {self.signature!r}, "
                            f"{self.prep.describe()})")

        def run(x):
            out = fn(**{self.input_name: self.prep(x)})
            res = {"logits": out[self.logits_name]}
            res.update({n: _to_nhwc(out[n], self.layout) for n in layers})
            return res
        super().__init__(run, input_shape, layers, path, available=outputs)


def logits_output(outputs, where):
    """The one rule for a file teacher's logits: the output named `logits`, else
    the only output. TeacherError (naming them) for several, none `logits`."""
    if "logits" in outputs:
        return "logits"
    if len(outputs) == 1:
        return outputs[0]
    raise TeacherError(f"{where} has outputs {', '.join(outputs)}, none named 'logits'; "
                       "name the logits output 'logits' (torch.onnx.export(..., "
                       "output_names=['logits', ...]); a SavedModel signature returning "
                       "{'logits': ...})")


# ONNX Runtime's input types by the dtype names the checks use.
ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
              "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64",
              "tensor(float16)": "float16"}


def _interface(path, where, inputs, outputs, layers, input_shape, layout):
    """The one validation of a SavedModel's or an ONNX file's interface, in order:
    one input; float32; a batch dimension that is not fixed (a teacher runs on
    every batch size: the training batch, the last smaller batch, the check's
    and the evaluation's); a layout that fits the data (`_layout`); the logits
    output (`logits_output`); every asked layer among the outputs.

    Args:
      inputs: [(name, dtype name, shape)] of the file's inputs, shape with
        None or a string for a dimension left open.
      outputs: the file's output names; layers: the names asked for.

    Returns:
      (input name, layout, logits output name).
    """
    if len(inputs) != 1:
        raise TeacherError(f"{where} takes inputs {', '.join(i[0] for i in inputs) or 'none'}; "
                           "a teacher takes one image tensor")
    name, dtype, shape = inputs[0]
    if dtype != "float32":
        raise TeacherError(f"{where} takes {dtype} {name!r}; a teacher takes float32 images "
                           "(export it with a float32 input and, for 0-255 models, pass "
                           "input_scale=255)")
    batch = shape[0] if shape else None
    if isinstance(batch, int) and batch > 0:
        raise TeacherError(f"{where}: input {name!r} has a fixed batch size of {batch}; "
                           "export it with a dynamic batch (torch.onnx.export(..., "
                           "dynamic_axes={'input': {0: 'batch'}}); tf.TensorSpec([None, ...]))")
    found = _layout(layout, list(shape[1:]), tuple(input_shape), path)
    logits = logits_output(outputs, where)
    missing = [n for n in layers if n not in outputs]
    if missing:
        raise TeacherError(f"{where} has no output {', '.join(map(repr, missing))}; it has "
                           f"{', '.join(outputs)}")
    return name, found, logits


def onnx_providers():
    """ONNX Runtime's execution providers for a teacher: CUDA when this
    onnxruntime has it, then the CPU."""
    import onnxruntime
    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxTeacher(Teacher):
    """An ONNX model run by ONNX Runtime inside the graph (see the module doc)."""

    kind = "onnx"
    differentiable = False

    def __init__(self, path, input_shape, layers=(), layout="auto", input_scale=1.0,
                 mean=None, std=None, providers=None):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        # ONNX Runtime's threads spin after each run, waiting for the next one;
        # inside a training step that time is taken from TensorFlow's own
        # threads (measured on digits: the step 11.5 ms slower with spinning,
        # docs/results/step_speed.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(
                path, sess_options=options, providers=providers or onnx_providers())
        except Exception as err:  # ONNX Runtime's errors for a bad file vary
            raise TeacherError(f"{path}: cannot load it as an ONNX model: {_first_line(err)}"
                               ) from None
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        self.input_name, self.layout, self.logits_name = _interface(
            path, f"{path}: the ONNX graph",
            [(i.name, ONNX_TYPES.get(i.type, i.type), list(i.shape or [])) for i in inputs],
            outputs, layers, input_shape, layout)
        self.output_names = [self.logits_name, *[n for n in layers if n != self.logits_name]]
        self.prep = _Preprocessing(input_scale, mean, std, input_shape[-1], self.layout)
        self.providers = self.session.get_providers()
        self.description = (f"ONNX {path} on ONNX Runtime {onnxruntime.__version__} "
                            f"({self.providers[0]}; {self.prep.describe()})")
        # Shapes of the outputs as the model gives them (before any transpose),
        # from one probe run: ONNX graphs often leave non-batch dims symbolic.
        try:
            probe = self.session.run(self.output_names, {
                self.input_name: self.prep(tf.zeros([2, *input_shape])).numpy()})
        except Exception as err:  # ONNX Runtime's errors are not ValueErrors
            raise TeacherError(f"{path}: ONNX Runtime cannot run it on 2 images of the "
                               f"data's shape {tuple(input_shape)}: "
                               f"{str(err).splitlines()[0][:300]}") from None
        self._raw_shapes = [tuple(p.shape[1:]) for p in probe]
        bad = [n for n, p in zip(self.output_names, probe) if p.dtype != np.float32]
        if bad:
            raise TeacherError(f"{path}: outputs {', '.join(bad)} are not float32")
        super().__init__(self._run, input_shape, layers, path, available=outputs)

    def _session_run(self, x):
        return self.session.run(self.output_names, {self.input_name: x})

    def _run(self, x):
        values = tf.numpy_function(self._session_run, [self.prep(x)],
                                   [tf.float32] * len(self.output_names), stateful=False)
        if not isinstance(values, (list, tuple)):  # one output comes back bare
            values = [values]
        out = {}
        for name, value, shape in zip(self.output_names, values, self._raw_shapes):
            value.set_shape([None, *shape])
            out[name] = value if name == self.logits_name else _to_nhwc(value, self.layout)
        out["logits"] = out[self.logits_name]
        return out


def is_saved_model(path):
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "saved_model.pb"))
                                    or os.path.isfile(os.path.join(path, "saved_model.pbtxt")))
