"""Benchmark: is this run's student gradient-masked? Measures the symptoms directly.

    python tests/benchmarks/masking.py --workdir runs/distill-digits-ardir
    python tests/benchmarks/masking.py --workdir runs/study-mnist/cells/ard-seed0 \
        --dataset npz:mnist10k.npz --examples 500 --json probe.json
    python tests/benchmarks/masking.py --workdir RUN_A --workdir RUN_B ...  # a table

For each run directory (a `--mode=distill` run or a study cell) it reads the
threat model and the data set from the run's flags.json (`--dataset` overrides
the data set, e.g. when the run's npz path was relative to another directory),
attacks the first `--examples` test images of the run's model (`--model`,
default student) and prints `ardir_tf.masking.probe`'s findings: PGD accuracy
at 10, 20 and 100 steps, APGD-CE, the share of the points every gradient attack
left standing that the gradient-free Square attack breaks, the worst case, the
logit scale and the input-gradient norms at x and at the PGD-10 point.

A model whose PGD accuracy keeps falling with more steps, whose APGD-CE number
is well below PGD's, or of whose standing points Square breaks more than 5%,
masks its gradients: its PGD numbers overstate its robustness. Evaluate it with
`--mode=evaluate --attacks=fast,standard` and trust the worst case.

Not a test: it asserts nothing, and its timings depend on the machine's load.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import ardir_tf  # noqa: E402
from ardir_tf import evaluate, masking  # noqa: E402


def probe_run(workdir, args):
    with open(os.path.join(workdir, "flags.json")) as f:
        flags = json.load(f)
    path = os.path.join(workdir, f"{args.model}.keras")
    if not os.path.exists(path):
        sys.exit(f"error: no {args.model}.keras in {workdir}")
    model = keras.models.load_model(path)
    data = ardir_tf.data.load(args.dataset or flags["dataset"], 256, seed=0, augment=False)
    x, y = evaluate.collect(data.test, args.examples)
    return masking.probe(model, x, y, flags["eps"], flags.get("norm", "linf"),
                         steps=args.steps, square_queries=args.square_queries,
                         apgd_steps=args.apgd_steps, seed=args.seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True,
                        help="a run directory (repeat for several)")
    parser.add_argument("--model", default="student", help="natural, teacher or student")
    parser.add_argument("--dataset", help="override the run's --dataset")
    parser.add_argument("--examples", type=int, default=500, help="test images attacked")
    parser.add_argument("--steps", default="10,20,100", help="PGD step counts")
    parser.add_argument("--apgd_steps", type=int, default=100, help="0: no APGD-CE")
    parser.add_argument("--square_queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every probe to this file")
    args = parser.parse_args()
    args.steps = [int(k) for k in args.steps.split(",")]

    results = {}
    for workdir in args.workdir:
        result = probe_run(workdir, args)
        results[workdir] = result
        print(masking.format_probe(result, workdir), flush=True)
    if len(results) > 1:
        steps = list(next(iter(results.values()))["pgd"])
        print("\n| run | " + " | ".join(f"PGD-{k}" for k in steps)
              + " | APGD-CE | Square's share | worst | mean max logit | CE gradient at x' "
              "(median dual norm) | zero gradients at x' |")
        print("|---" * (len(steps) + 7) + "|")
        for workdir, r in results.items():
            g = r["gradients"][f"pgd{steps[0]}"]
            apgd = "-" if r["apgd_ce"] is None else f"{r['apgd_ce']:.3f}"
            zero = "-" if g["zero_gradient_share"] is None else f"{g['zero_gradient_share']:.1%}"
            max_logit = "-" if r["logits"]["mean_max"] is None else f"{r['logits']['mean_max']:.1f}"
            print(f"| {workdir} | " + " | ".join(f"{r['pgd'][k]:.3f}" for k in steps)
                  + f" | {apgd} | {r['square_share']:.1%} ({r['square_broke']}/"
                  f"{r['square_standing']}) | {r['worst']:.3f} | {max_logit} | "
                  f"{g['quantiles']['0.5']:.3g} | {zero} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
