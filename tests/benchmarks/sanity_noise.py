"""Benchmark: how much do the sanity checks' PGD runs vary with their random starts?

    python tests/benchmarks/sanity_noise.py --workdir runs/distill-digits-ardir
    python tests/benchmarks/sanity_noise.py --workdir RUN --model teacher --seeds 20

Runs the sanity checks (`ardir_tf.sanity`, through `evaluate` with FGSM as its
only attack) on the run's model once per seed, each seed drawing other random
starts, and prints per seed the examples left standing by PGD-10, PGD-20 and
PGD-100 at eps, the largest rise from fewer steps to more (in examples), and
whether `more_steps` and `eps_sweep` passed. On an honest model a rise of a few
examples is the random starts' noise; the checks should pass on every seed.

It reads the threat model and the data set from the run's flags.json
(`--dataset` overrides the data set). Not a test: it asserts nothing.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import ardir_tf  # noqa: E402
from ardir_tf import evaluate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run directory")
    parser.add_argument("--model", default="student", help="natural, teacher or student")
    parser.add_argument("--dataset", help="override the run's --dataset")
    parser.add_argument("--examples", type=int, default=None,
                        help="test images (default: all)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0, 1, ...")
    parser.add_argument("--sanity_examples", type=int, default=None,
                        help="examples the checks run on (default: the run's setting, "
                             "else 500)")
    args = parser.parse_args()

    with open(os.path.join(args.workdir, "flags.json")) as f:
        flags = json.load(f)
    path = os.path.join(args.workdir, f"{args.model}.keras")
    if not os.path.exists(path):
        sys.exit(f"error: no {args.model}.keras in {args.workdir}")
    model = keras.models.load_model(path)
    data = ardir_tf.data.load(args.dataset or flags["dataset"], 256, seed=0, augment=False)
    x, y = evaluate.collect(data.test, args.examples)
    eps, norm = flags["eps"], flags.get("norm", "linf")
    fgsm = {"fgsm": evaluate.fast(eps, norm)["fgsm"]}
    checked = args.sanity_examples or flags.get("sanity_examples") or 500
    print(f"{args.model} of {args.workdir}: checks on {min(checked, len(y))} of {len(y)} "
          f"examples, {norm} eps {eps:g}")
    print("| seed | PGD-10 | PGD-20 | PGD-100 | largest rise | more_steps | eps_sweep |")
    print("|---|---|---|---|---|---|---|")
    failed = 0
    for seed in range(args.seeds):
        r = evaluate.evaluate(model, [(x, y)], eps, norm, attacks=fgsm, seed=seed,
                              sanity_examples=checked, verify=False, verbose=0)
        checks = r["sanity_checks"]
        n = checks["n_examples"]
        standing = [round(a * n) for a in checks["more_steps"]["accuracy"]]
        rise = max(b - a for a, b in zip(standing, standing[1:]))
        passed = checks["more_steps"]["passed"], checks["eps_sweep"]["passed"]
        failed += not all(passed)
        print(f"| {seed} | " + " | ".join(map(str, standing))
              + f" | {rise} | {passed[0]} | {passed[1]} |", flush=True)
    print(f"\n{failed} of {args.seeds} seeds failed a check")


if __name__ == "__main__":
    main()
