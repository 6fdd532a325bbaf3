"""Benchmark: is a cheaper training attack as strong as the literature's?

    python tests/benchmarks/train_attack_strength.py --model runs/study-mnist/teacher.keras \
        --dataset npz:PATH --eps 0.3 --settings 10:0.075,40:0.01,100:0.01

For each PGD setting (steps:step_size, random start, Linf) it attacks the same
training images of a trained model and prints the accuracy left, the mean
cross-entropy the attack reached (what adversarial training minimises: the
stronger attack is the one with the higher loss) and the seconds per batch.
Used to choose flags/mnist.cfg's training attack. Not a test: it asserts
nothing, and its timings depend on the machine's load.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import ardir_tf  # noqa: E402
from ardir_tf import attacks, evaluate, losses  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained .keras model")
    parser.add_argument("--dataset", required=True, help="digits, a tfds name or npz:PATH")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--settings", default="10:0.075,40:0.01",
                        help="comma-separated steps:step_size")
    parser.add_argument("--examples", type=int, default=1024, help="training images attacked")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = keras.models.load_model(args.model)
    data = ardir_tf.data.load(args.dataset, args.batch, seed=args.seed, augment=False)
    x, y = evaluate.collect(data.train, args.examples)
    print(f"{args.model} on {len(y)} training images of {args.dataset}, Linf eps {args.eps}")
    print(f"{'attack':>16} {'accuracy':>9} {'mean CE':>8} {'s/batch':>8}")
    for setting in args.settings.split(","):
        steps, step = setting.split(":")
        pgd = attacks.PGD(eps=args.eps, step_size=float(step), steps=int(steps))
        run = tf.function(lambda xb, yb: pgd(lambda z: model(z, training=False), xb, yb))
        tf.random.set_seed(args.seed)
        run(x[:args.batch], y[:args.batch])  # trace
        right, ce, seconds = [], [], []
        for i in range(0, len(y), args.batch):
            xb, yb = x[i:i + args.batch], y[i:i + args.batch]
            start = time.perf_counter()
            x_adv = run(xb, yb).numpy()
            seconds.append(time.perf_counter() - start)
            logits = model(x_adv, training=False)
            right.append(np.argmax(logits, -1) == yb)
            ce.append(losses.ce(yb, logits).numpy())
        print(f"{'PGD-' + steps + ' step ' + step:>16} {np.concatenate(right).mean():9.4f} "
              f"{np.concatenate(ce).mean():8.4f} {np.median(seconds):8.3f}")


if __name__ == "__main__":
    main()
