"""Which arithmetic a run trains in, and the float32 model every number is measured on.

    choose(precision)      "auto" -> (policy, reason): mixed_bfloat16 where the
                           hardware computes bfloat16 natively, float32 elsewhere;
                           any other name is returned as given
    native_bfloat16()      (bool, what was found): the reason behind "auto"
    compute_dtypes(model)  "float32", or the mixed policies of its layers
    float32_model(model)   the model itself if it computes in float32, else a
                           copy with the same weights computing in float32
    inference_view(model)  for the inference passes of training (the PGD loop,
                           the teacher): `model` under mixed_bfloat16 with its
                           BatchNormalization computed in bfloat16, sharing its
                           weights; `model` itself otherwise

Why bfloat16 on a CPU: with oneDNN, TensorFlow runs convolutions and matrix
products in bfloat16 on CPUs that have AVX512_BF16 or AMX instructions at
about twice the float32 rate (docs/results/step_speed.md); on CPUs without
them bfloat16 is emulated and slower than float32. Under Keras' mixed policies
the weights stay float32 and our models' logits are float32 (models.py), so
the losses, the softmax and the optimizer's update are float32 too; only the
layers' arithmetic is rounded.

Why measure in float32: a model trained under mixed_bfloat16 is the same set of
float32 weights, and deployment exports it in float32 (export.artifacts). Its
robustness is measured on that float32 function, so no reported number depends
on bfloat16 rounding; `float32_model` makes the copy (attacks and evaluation
call it, see evaluate.evaluate).

Why a view for the inference passes: Keras' BatchNormalization computes in
float32 under every policy (it casts its bfloat16 input up and its output back
down), because batch moments in bfloat16 lose precision. In inference mode it
computes no moments: it is x * scale + shift with constants made from its
variables, which bfloat16 carries as well as it carries a convolution's output.
Ten of the eleven forward passes of a PGD-10 training step (and their backward
passes to the input) are such passes; computing their BatchNorm in bfloat16
removes two casts and two float32 passes over every BatchNorm's activations
(docs/results/step_speed.md#bfloat16 measures what it gives). The model
itself, its `.keras` file and every training-mode pass are unchanged.
"""

import keras
import numpy as np

from ardir_tf import keras_compat

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
CHOICES = ("auto", *POLICIES)
# /proc/cpuinfo flags of x86 CPUs with bfloat16 arithmetic instructions.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags(cpuinfo="/proc/cpuinfo"):
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _gpus():
    """[(name, compute capability)] of the visible GPUs."""
    import tensorflow as tf
    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        out.append((details.get("device_name", gpu.name),
                    tuple(details.get("compute_capability") or (0, 0))))
    return out


def native_bfloat16(cpu_flags=None, gpus=None):
    """(True, why) when the hardware this process trains on computes bfloat16
    natively, else (False, why): a GPU of compute capability 8.0 or newer
    (Ampere on), or, without a GPU, a CPU with AVX512_BF16 or AMX. `cpu_flags`
    (names) and `gpus` ([(name, capability)]) stand in for /proc/cpuinfo's flags
    and the visible GPUs, for tests."""
    gpus = _gpus() if gpus is None else list(gpus)
    if gpus:
        name, capability = gpus[0]
        if capability >= (8, 0):
            return True, f"the GPU ({name}) has native bfloat16"
        return False, (f"the GPU ({name}, compute capability "
                       f"{'.'.join(map(str, capability))}) has no native bfloat16")
    flags = _cpu_flags() if cpu_flags is None else set(cpu_flags)
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"this CPU has {' and '.join(f.upper() for f in found)}"
    return False, ("this CPU has no native bfloat16 (neither AVX512_BF16 nor AMX), where "
                   "bfloat16 would be emulated and slower than float32")


def choose(precision, cpu_flags=None, gpus=None):
    """(policy, reason) for `precision` (one of CHOICES): "auto" picks
    mixed_bfloat16 where `native_bfloat16()`, else float32; any other is itself."""
    if precision not in CHOICES:
        raise ValueError(f"precision {precision!r}; expected one of {', '.join(CHOICES)}")
    if precision != "auto":
        return precision, "as asked"
    native, why = native_bfloat16(cpu_flags, gpus)
    return ("mixed_bfloat16" if native else "float32"), f"auto: {why}"


def compute_dtypes(model):
    """The policy `model` computes in: "float32", or the mixed policies of its
    layers joined by "+" (e.g. "mixed_bfloat16")."""
    names = {layer.dtype_policy.name for layer in keras_compat.all_layers(model)}
    return "+".join(sorted(names - {"float32"})) or "float32"


def _float32_config(config):
    """`config` (a model's get_config()) with every layer's dtype policy float32."""
    if isinstance(config, list):
        return [_float32_config(c) for c in config]
    if not isinstance(config, dict):
        return config
    out = {k: _float32_config(v) for k, v in config.items()}
    if "class_name" in out and isinstance(out.get("config"), dict) and \
            "dtype" in out["config"] and out["class_name"] != "InputLayer":
        out["config"]["dtype"] = "float32"
    return out


def float32_copy(model):
    """A copy of `model` (same weights) computing in float32, whose Normalization
    constants are numpy arrays (graph constants when traced: tf2onnx would make
    Keras' eager tensors extra inputs of an ONNX graph)."""
    copy = model.__class__.from_config(_float32_config(model.get_config()))
    copy.set_weights(model.get_weights())
    for layer in keras_compat.all_layers(copy):
        if isinstance(layer, keras.layers.Normalization):
            layer.mean = np.asarray(layer.mean, np.float32)
            layer.variance = np.asarray(layer.variance, np.float32)
    return copy


class _BFloat16InferenceBatchNorm(keras.layers.Layer):
    """`batch_norm`'s inference-mode function (its moving statistics) computed in
    its compute dtype: scale and shift are made in float32 from its variables,
    then rounded once. Holds no weights of its own; never saved (see
    `inference_view`)."""

    def __init__(self, batch_norm):
        # autocast=False: its float32 variables are read as float32.
        super().__init__(name=f"{batch_norm.name}_inference", dtype=batch_norm.dtype_policy,
                         autocast=False)
        self._of = [batch_norm]  # a list: not tracked as a sub-layer

    def call(self, x, training=None, mask=None):
        bn = self._of[0]
        scale = keras.ops.rsqrt(keras.ops.convert_to_tensor(bn.moving_variance) + bn.epsilon)
        if bn.scale:
            scale = scale * bn.gamma
        shift = -keras.ops.convert_to_tensor(bn.moving_mean) * scale
        if bn.center:
            shift = shift + bn.beta
        x = keras.ops.cast(x, self.compute_dtype)  # autocast=False leaves inputs as given
        return x * keras.ops.cast(scale, x.dtype) + keras.ops.cast(shift, x.dtype)


def _bfloat16_batch_norm(layer):
    """Whether `layer` is a channels-last BatchNormalization computing under a
    bfloat16 policy (which Keras computes in float32)."""
    return isinstance(layer, keras.layers.BatchNormalization) and \
        layer.dtype_policy.compute_dtype == "bfloat16" and \
        layer.axis in (-1, len(layer.input.shape) - 1)


def _bfloat16_inference(layer):
    return _BFloat16InferenceBatchNorm(layer) if _bfloat16_batch_norm(layer) else layer


def inference_view(model):
    """`model` for inference-mode calls (training=False) only, computing its
    BatchNormalization layers in bfloat16 when they run under a bfloat16 policy
    (see the module docstring): a functional model sharing every other layer and
    every weight of `model`, so it always computes with `model`'s current
    weights. `model` itself when no BatchNormalization computes in bfloat16 or it
    is a subclassed model (float32 training runs exactly as before).

    Calling the view with training=True would still normalise with the moving
    statistics and update nothing: train through `model`.
    """
    if not keras_compat.is_graph_model(model) or \
            not any(map(_bfloat16_batch_norm, keras_compat.all_layers(model))):
        return model
    return keras.models.clone_model(model, clone_function=_bfloat16_inference, recursive=True)


def float32_model(model):
    """`model` if it is not a keras.Model or computes in float32; else its
    float32 copy (the function the export deploys)."""
    if not isinstance(model, keras.Model) or compute_dtypes(model) == "float32":
        return model
    return float32_copy(model)
