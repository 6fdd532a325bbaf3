"""Benchmark: is a student's robustness a matter of its BatchNorm statistics?

    python tests/benchmarks/bn_recalibration.py --model CELL/student.keras \
        --dataset npz:mnist10k.npz --eps 0.3 --step_size 0.075

Loads the model three times: as trained; with every BatchNorm layer's moving
statistics re-estimated on `--batches` batches of PGD training examples (the
average of their batch statistics, no weight changed); and re-estimated on clean
batches. Then probes each with `ardir_tf.masking.probe` on the first `--examples`
test images. This is the measurement that named the cause of the MNIST students'
masking (docs/results/mnist.md): a student trained with
`--bn_statistics=both` went from a worst case of 0.098 to 0.678 with adversarial
statistics. Not a test: it asserts nothing.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import ardir_tf  # noqa: E402
from ardir_tf import attacks, evaluate, masking  # noqa: E402


def recalibrated(path, x, y, adversarial, eps, step_size, steps, batch):
    model = keras.models.load_model(path)
    layers = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = 0.0  # each training-mode call leaves its batch's statistics
    pgd = attacks.PGD(eps=eps, step_size=step_size, steps=steps)
    sums = [[0.0, 0.0] for _ in layers]
    n = len(y) // batch
    for i in range(n):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        if adversarial:  # against the model as its statistics stand now
            xb = pgd(lambda z: model(z, training=False), tf.constant(xb), tf.constant(yb))
        model(xb, training=True)
        for total, layer in zip(sums, layers):
            total[0] += layer.moving_mean.numpy() / n
            total[1] += layer.moving_variance.numpy() / n
    for total, layer in zip(sums, layers):
        layer.moving_mean.assign(total[0])
        layer.moving_variance.assign(total[1])
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained .keras model")
    parser.add_argument("--dataset", required=True, help="digits, a tfds name or npz:PATH")
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--step_size", type=float, help="training PGD step (eps/4)")
    parser.add_argument("--steps", type=int, default=10, help="training PGD steps")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--examples", type=int, default=500, help="test images probed")
    args = parser.parse_args()
    step = args.step_size or args.eps / 4
    data = ardir_tf.data.load(args.dataset, args.batch, seed=0, augment=False)
    x_train, y_train = evaluate.collect(data.train, args.batches * args.batch)
    x, y = evaluate.collect(data.test, args.examples)
    for name, make in [
            ("as trained", lambda: keras.models.load_model(args.model)),
            ("statistics of adversarial batches",
             lambda: recalibrated(args.model, x_train, y_train, True, args.eps, step,
                                  args.steps, args.batch)),
            ("statistics of clean batches",
             lambda: recalibrated(args.model, x_train, y_train, False, args.eps, step,
                                  args.steps, args.batch))]:
        result = masking.probe(make(), x, y, args.eps)
        print(masking.format_probe(result, name), flush=True)


if __name__ == "__main__":
    main()
