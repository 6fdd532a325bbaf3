"""The robustness of a deployed artifact (an INT8 or float16 ONNX file, a LiteRT
file), measured on the artifact itself.

A quantized file is not the float student: its logits are rounded, and its
gradient is not available (ONNX Runtime computes none) or is zero almost
everywhere (rounding). Two naive checks then overstate its robustness:

- attacks crafted on the float student and *transferred* to the file are
  weaker than attacks on the file;
- a score-based attack run on the file alone (Square) stalls on the plateaus
  of its rounded logits.

The adaptive answer is BPDA (Athalye et al. 2018, "Obfuscated gradients give a
false sense of security"): the attack runs the file forward and the float
student backward, `f(x) + stop_gradient(artifact(x) - f(x))`, so every step
sees the file's own decision and a useful gradient. `evaluate_artifact` runs
all three on the same images (the gradient attacks through BPDA, Square on
the file alone, the float student's adversarial points transferred) and takes
the worst case over them: a point counts as robust only if every one failed.
"""

import numpy as np
import tensorflow as tf

from ardir_tf import evaluate as evaluate_lib
from ardir_tf import precision


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


def load(path, input_shape):
    """A deployed file as a TensorFlow callable (x, training=False) -> logits (or
    {"logits"}): a .tflite file run by the LiteRT interpreter (export.litert),
    anything else by `teachers.load` (ONNX files, SavedModels)."""
    if str(path).endswith(".tflite"):
        from export import litert
        return litert.forward(path)
    from ardir_tf import teachers
    return teachers.load(str(path), input_shape=tuple(input_shape))


def bpda(forward, surrogate):
    """A model whose forward pass is `forward`'s (the artifact) and whose
    gradient is `surrogate`'s (the float student): model(x) ->
    surrogate(x) + stop_gradient(forward(x) - surrogate(x))."""
    def model(x, training=False):
        f = tf.cast(_logits(surrogate(x, training=False)), tf.float32)
        a = tf.cast(_logits(forward(x, training=False)), tf.float32)
        return f + tf.stop_gradient(a - f)
    return model


def _transferred(attack, surrogate):
    """`attack` crafted on `surrogate`, whatever model it is handed."""
    def run(model_fn, x, y, **kwargs):
        return attack.run(lambda z: surrogate(z, training=False), x, y, **kwargs)
    return evaluate_lib.Attack(run, {**attack.settings, "crafted_on": "surrogate"})


FAMILIES = {"bpda": ("bpda_apgd_ce", "bpda_apgd_t"), "square": ("square",),
            "transfer": ("transfer_apgd_ce", "transfer_apgd_t")}


def evaluate_artifact(forward, surrogate, dataset, eps, norm="linf", n_examples=None, *,
                      apgd_steps=100, n_targets=9, square_queries=5000, seed=0,
                      batch_size=256):
    """Robust accuracy of the artifact `forward` (a callable x -> logits or
    {"logits"}, e.g. `load("student.int8.onnx", input_shape)`),
    with `surrogate` (the float student, a keras.Model) for gradients.

    Every attack runs on the points the artifact classifies correctly, and is
    judged by the artifact's prediction: APGD-CE and APGD-T of the standard
    preset through `bpda`; its Square on the artifact (through the same model,
    whose values are the artifact's); the same APGD-CE and APGD-T crafted on
    the surrogate, transferred.

    Returns {"clean_accuracy", "n_examples", "eps", "norm", "robust_accuracy":
    {"bpda_apgd_ce", "bpda_apgd_t", "square", "transfer_apgd_ce",
    "transfer_apgd_t"}, "worst_case_accuracy", "worst_case": {"bpda",
    "square", "transfer"} (each family alone), "square_queries"}.
    """
    x, y = evaluate_lib.collect(dataset, n_examples)
    surrogate = precision.float32_model(surrogate)  # gradients as every evaluation's
    model = bpda(forward, surrogate)
    options = dict(seed=seed, batch_size=batch_size)
    clean = evaluate_lib.survivors(model, x, y, {"clean": None}, **options)["clean"]
    todo = np.flatnonzero(clean)
    preset = evaluate_lib.standard(eps, norm, apgd_steps=apgd_steps, n_targets=n_targets,
                                   queries=square_queries)
    attacks = {"bpda_apgd_ce": preset["apgd_ce"], "bpda_apgd_t": preset["apgd_t"],
               "square": preset["square"],
               "transfer_apgd_ce": _transferred(preset["apgd_ce"], surrogate),
               "transfer_apgd_t": _transferred(preset["apgd_t"], surrogate)}
    survived = evaluate_lib.survivors(model, x[todo], y[todo], attacks, **options) \
        if len(todo) else {name: np.zeros([0], bool) for name in attacks}

    def accuracy(standing):
        whole = np.zeros(len(y), bool)
        whole[todo] = standing
        return float(whole.mean()) if len(y) else 0.0
    return {"clean_accuracy": float(clean.mean()) if len(y) else 0.0,
            "n_examples": int(len(y)), "eps": eps, "norm": norm,
            "robust_accuracy": {name: accuracy(s) for name, s in survived.items()},
            "worst_case": {family: accuracy(np.logical_and.reduce([survived[n] for n in names]))
                           for family, names in FAMILIES.items()},
            "worst_case_accuracy": accuracy(np.logical_and.reduce(list(survived.values()))),
            "square_queries": square_queries}
