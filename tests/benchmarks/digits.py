"""Benchmark: robustness and speed of natural, PGD-AT teacher and ARDIR student on digits.

    python tests/benchmarks/digits.py [--epochs 15] [--seed 0]

Trains the models of the README's snippet with the same epoch budget (and, for
comparison, the student's architecture with ARD and with PGD-AT alone), then
prints clean and PGD-10 accuracy on the digits test split and the time per
training step (median over the steps of the last epoch, from a Keras callback).
Not a test: it asserts nothing and its timings depend on the machine's load.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import ardir_tf  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t)

    def median_ms(self):
        return 1000 * float(np.median(self.times))


def evaluate(model, attack, x, y):
    fn = lambda z: model(z, training=False)  # noqa: E731
    clean = float(np.mean(np.argmax(fn(x), -1) == y))
    robust = float(np.mean(np.argmax(fn(attack(fn, x, y)), -1) == y))
    return clean, robust


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=float, default=0.15)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = ardir_tf.data.digits(seed=args.seed)
    train_ds = ardir_tf.data.pipeline(x_train, y_train, 64, shuffle=True, seed=args.seed)
    attack = ardir_tf.attacks.PGD(eps=args.eps, step_size=args.eps / 4, steps=10)
    build = lambda width: ardir_tf.models.build(  # noqa: E731
        "small_cnn", (8, 8, 1), 10, width=width)
    rows = {}

    def fit(name, trainable, model):
        timer = StepTimer()
        t = time.perf_counter()
        trainable.fit(train_ds, epochs=args.epochs, verbose=0, callbacks=[timer])
        clean, robust = evaluate(model, attack, x_test, y_test)
        rows[name] = dict(clean_accuracy=clean, pgd10_accuracy=robust,
                          ms_per_step=round(timer.median_ms(), 1),
                          fit_seconds=round(time.perf_counter() - t, 1),
                          params=model.count_params())

    natural = build(16)
    natural.compile(optimizer=keras.optimizers.Adam(3e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit("natural", natural, natural)

    teacher = build(32)
    trainer = ardir_tf.AdversarialTrainer(teacher, attack=attack)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
    fit("teacher (PGD-AT)", trainer, teacher)

    for method, layers in (("ardir", [("stage2", "stage2")]), ("ard", [])):
        keras.utils.set_random_seed(args.seed)
        student = build(16)
        distiller = ardir_tf.ARDIRDistiller(teacher=teacher, student=student, layers=layers,
                                            attack=attack, method=method)
        distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
        fit(f"student ({method.upper()})", distiller, student)

    # The student's architecture trained on its own, without a teacher.
    keras.utils.set_random_seed(args.seed)
    alone = build(16)
    trainer = ardir_tf.AdversarialTrainer(alone, attack=attack)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
    fit("student (PGD-AT)", trainer, alone)

    print(f"digits, Linf eps={args.eps}, PGD-10 (step eps/4, random start), "
          f"{args.epochs} epochs, seed {args.seed}, {len(x_test)} test images")
    print(f"{'model':18} {'params':>7} {'clean':>6} {'PGD-10':>7} {'ms/step':>8} {'fit s':>6}")
    for name, r in rows.items():
        print(f"{name:18} {r['params']:7d} {r['clean_accuracy']:6.3f} {r['pgd10_accuracy']:7.3f} "
              f"{r['ms_per_step']:8.1f} {r['fit_seconds']:6.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
