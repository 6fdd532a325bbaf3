"""Robustness evaluation: clean accuracy and accuracy under attacks, as a report.

`evaluate(model, dataset, attacks)` runs each attack on every batch (one
compiled function per attack) and returns a plain dict, ready for JSON:

    {"clean_accuracy": 0.99, "robust_accuracy": {"pgd20": 0.74, ...},
     "eps": 0.15, "norm": "linf", "n_examples": 360, "seconds": 3.1}

Left out here (the evaluation issue adds them): APGD, Square, the worst-case
ensemble, per-class accuracy and the sanity checks.
"""

import time

import keras
import numpy as np
import tensorflow as tf


def evaluate(model, dataset, attacks, n_examples=None, verbose=1, total=None):
    """Clean and robust accuracy of `model` (pixels -> logits) on `dataset`.

    Args:
      model: a keras.Model returning logits.
      dataset: a tf.data.Dataset of (x, y) batches.
      attacks: {name: attacks.PGD}; all should share eps and norm.
      n_examples: evaluate the first n examples only (None: all).
      verbose: 1 shows a progress bar.
      total: the dataset's size when known, for the progress bar.
    """
    def fn(z):
        return model(z, training=False)

    # One trace for every batch size (the last batch is usually smaller).
    @tf.function(input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32),
                                  tf.TensorSpec([None], tf.int64)])
    def batch_correct(x, y):
        right = lambda z: tf.cast(tf.equal(tf.argmax(fn(z), -1), y), tf.int32)  # noqa: E731
        return right(x), {name: right(a(fn, x, y)) for name, a in attacks.items()}

    start, seen = time.perf_counter(), 0
    clean, robust = [], {name: [] for name in attacks}
    target = min(n_examples, total) if n_examples and total else (n_examples or total)
    bar = keras.utils.Progbar(target, unit_name="example") if verbose else None
    for x, y in dataset:
        if n_examples is not None:
            x, y = x[: n_examples - seen], y[: n_examples - seen]
        c, r = batch_correct(tf.cast(x, tf.float32), tf.cast(tf.reshape(y, [-1]), tf.int64))
        clean.append(c.numpy())
        for name in attacks:
            robust[name].append(r[name].numpy())
        seen += len(c)
        if bar:
            bar.update(seen)
        if n_examples is not None and seen >= n_examples:
            break
    if not seen:
        raise ValueError("evaluate got an empty dataset")
    first = next(iter(attacks.values()), None)
    return {
        "clean_accuracy": float(np.mean(np.concatenate(clean))),
        "robust_accuracy": {n: float(np.mean(np.concatenate(v))) for n, v in robust.items()},
        "eps": first.eps if first else None,
        "norm": first.norm if first else None,
        "n_examples": int(seen),
        "seconds": round(time.perf_counter() - start, 2),
    }


def format_table(reports):
    """A text table of {model name: evaluate() report}, one row a model."""
    attack_names = list(dict.fromkeys(n for r in reports.values() for n in r["robust_accuracy"]))
    header = f"{'model':10} {'clean':>7}" + "".join(f" {n:>8}" for n in attack_names) + \
        f" {'examples':>9}"
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        cells = "".join(f" {r['robust_accuracy'].get(n, float('nan')):8.4f}" for n in attack_names)
        lines.append(f"{name:10} {r['clean_accuracy']:7.4f}{cells} {r['n_examples']:9d}")
    return "\n".join(lines)
