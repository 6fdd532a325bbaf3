"""The robustness of a deployed artifact (an INT8 or float16 ONNX file), measured
on the artifact itself.

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

from ardir_tf import attacks as attacks_lib
from ardir_tf import evaluate as evaluate_lib


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


def bpda(forward, surrogate):
    """A model whose forward pass is `forward`'s (the artifact) and whose
    gradient is `surrogate`'s (the float student): model(x) ->
    surrogate(x) + stop_gradient(forward(x) - surrogate(x))."""
    def model(x, training=False):
        f = tf.cast(_logits(surrogate(x, training=False)), tf.float32)
        a = tf.cast(_logits(forward(x, training=False)), tf.float32)
        return f + tf.stop_gradient(a - f)
    return model


def _forward_only(forward):
    def model(x, training=False):
        return tf.cast(_logits(forward(x, training=False)), tf.float32)
    return model


def _predict(model, x, batch_size):
    fn = tf.function(lambda z: tf.argmax(_logits(model(z, training=False)), -1),
                     autograph=False)
    return np.concatenate([fn(tf.constant(x[i:i + batch_size])).numpy()
                           for i in range(0, len(x), batch_size)]) if len(x) else \
        np.zeros([0], np.int64)


def _adversarial(attack, model, x, y, batch_size, seed):
    def craft(xb, yb):
        tf.random.set_seed(seed)  # this graph's seed only
        return attack(lambda z: model(z, training=False), xb, yb)
    fn = tf.function(craft, autograph=False)
    return np.concatenate([fn(tf.constant(x[i:i + batch_size]),
                              tf.constant(y[i:i + batch_size])).numpy()
                           for i in range(0, len(x), batch_size)])


def evaluate_artifact(forward, surrogate, dataset, eps, norm="linf", n_examples=None, *,
                      apgd_steps=100, n_targets=9, square_queries=5000, seed=0,
                      batch_size=256):
    """Robust accuracy of the artifact `forward` (a callable x -> logits or
    {"logits"}, e.g. `teachers.load("student.int8.onnx", input_shape=...)`),
    with `surrogate` (the float student, a keras.Model) for gradients.

    Returns {"clean_accuracy", "n_examples", "eps", "norm", "robust_accuracy":
    {"bpda_apgd_ce", "bpda_apgd_t", "square", "transfer_apgd_ce",
    "transfer_apgd_t"}, "worst_case_accuracy", "worst_case": {"bpda",
    "square", "transfer"} (each family alone), "square_queries"}. Every
    attack runs on the points the artifact classifies correctly.
    """
    x, y = evaluate_lib.collect(dataset, n_examples)
    clean = _predict(_forward_only(forward), x, batch_size) == y
    todo = np.flatnonzero(clean)
    xs, ys = x[todo], y[todo]
    gradient = {"apgd_ce": lambda m, a, b: attacks_lib.apgd(m, a, b, eps=eps, norm=norm,
                                                             steps=apgd_steps),
                "apgd_t": lambda m, a, b: attacks_lib.apgd_targeted(
                    m, a, b, eps=eps, norm=norm, steps=apgd_steps, n_targets=n_targets)}
    survived = {}
    artifact = _forward_only(forward)
    through = bpda(forward, surrogate)
    for name, attack in gradient.items():
        if not len(todo):
            survived[f"bpda_{name}"] = survived[f"transfer_{name}"] = np.zeros([0], bool)
            continue
        x_adv = _adversarial(attack, through, xs, ys, batch_size, seed)
        survived[f"bpda_{name}"] = _predict(artifact, x_adv, batch_size) == ys
        x_adv = _adversarial(attack, surrogate, xs, ys, batch_size, seed)
        survived[f"transfer_{name}"] = _predict(artifact, x_adv, batch_size) == ys
    if len(todo):
        x_adv = _adversarial(lambda m, a, b: attacks_lib.square(
            m, a, b, eps=eps, norm=norm, queries=square_queries), artifact, xs, ys,
            batch_size, seed)
        survived["square"] = _predict(artifact, x_adv, batch_size) == ys
    else:
        survived["square"] = np.zeros([0], bool)

    def accuracy(standing):
        whole = np.zeros(len(y), bool)
        whole[todo] = standing
        return float(whole.mean()) if len(y) else 0.0
    families = {"bpda": ("bpda_apgd_ce", "bpda_apgd_t"), "square": ("square",),
                "transfer": ("transfer_apgd_ce", "transfer_apgd_t")}
    every = np.ones(len(todo), bool)
    for standing in survived.values():
        every &= standing
    return {"clean_accuracy": float(clean.mean()) if len(y) else 0.0,
            "n_examples": int(len(y)), "eps": eps, "norm": norm,
            "robust_accuracy": {k: accuracy(v) for k, v in survived.items()},
            "worst_case": {family: accuracy(np.logical_and.reduce(
                [survived[n] for n in names])) for family, names in families.items()},
            "worst_case_accuracy": accuracy(every),
            "square_queries": square_queries}
