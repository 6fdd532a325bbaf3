"""Benchmark: what the standard attacks cost per 1,000 CIFAR-10 images on this machine.

    python tests/benchmarks/attack_cost.py [--arch resnet18] [--batch 100]

Times short runs of each attack of `--attacks=standard` on one batch of random
32x32x3 images through an untrained model of the given architecture (the cost
of an attack step does not depend on the weights), then scales them to 1,000
images at AutoAttack's budgets: APGD-CE 100 steps, APGD-T 9 x 100 steps,
Square 5,000 queries (its loop stops early only when every image is fooled,
which on a robust model never happens, so the full budget is the estimate).
Not a test: it asserts nothing and its timings depend on the machine's load.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ardir_tf  # noqa: E402
from ardir_tf import attacks  # noqa: E402


def seconds(fn, x, y):
    fn(x, y).numpy()  # trace and warm up
    start = time.perf_counter()
    fn(x, y).numpy()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    model = ardir_tf.models.build(args.arch, (32, 32, 3), 10)
    fn = lambda z: model(z, training=False)  # noqa: E731
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((args.batch, 32, 32, 3), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, args.batch))
    eps, short, queries = 8 / 255, 10, 50

    per_step = seconds(tf.function(lambda a, b: attacks.apgd(fn, a, b, eps=eps, steps=short)),
                       x, y) / short
    per_query = seconds(tf.function(lambda a, b: attacks.square(fn, a, b, eps=eps,
                                                                queries=queries)), x, y) / queries
    scale = 1000 / args.batch
    cost = {"apgd_ce (100 steps)": per_step * 100 * scale,
            "apgd_t (9 x 100 steps)": per_step * 900 * scale,
            "square (5000 queries)": per_query * 5000 * scale}
    print(f"{args.arch}, batch {args.batch}: {1000 * per_step:.0f} ms per APGD step, "
          f"{1000 * per_query:.0f} ms per Square query")
    for name, s in cost.items():
        print(f"  {name:24s} {s / 60:7.1f} min per 1,000 images")
    print(f"  {'all, every image':24s} {sum(cost.values()) / 60:7.1f} min per 1,000 images")


if __name__ == "__main__":
    main()
