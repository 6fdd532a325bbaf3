"""A study directory's finished cells as Markdown tables, while it runs or after.

    python tests/benchmarks/study_tables.py --study runs/study-mnist
    python tests/benchmarks/study_tables.py --study runs/study-mnist --reference pgd_at \
        --methods pgd_at,ard,ardir

Reads only files (`ardir_tf.study.finished_rows`): nothing is trained or
evaluated, and a study still running is read as it stands. Prints

1. the summary over the seeds every listed method has finished (mean +- std,
   and each method's paired difference from `--reference` with its 95%
   interval), as `--mode=study` prints it and as Markdown;
2. the worst case per seed and method;
3. per cell, the numbers that show masking: clean, PGD-10 and PGD-100 (the
   evaluation's `more_steps` sanity check, on its first `--sanity_examples`
   images), APGD-CE, Square's share of the points every gradient attack left
   standing (the `square_vs_gradient` check), the worst case, and the minutes
   the cell's training and evaluation took (as recorded: they include any
   other work the machine did meanwhile).

Cells evaluated otherwise than most (a re-evaluation under way) are left out,
and the script says how many. The docs' study tables (docs/results/mnist.md)
can be made with it (their minutes column left out).
Not a test: it asserts nothing.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ardir_tf import study  # noqa: E402


def summary_markdown(summary, methods):
    ref = summary["reference"]
    lines = [f"| method | n | clean | worst case | vs {ref}: paired difference [95% interval] |",
             "|---|---|---|---|---|"]
    for name in methods:
        entry = summary["methods"][name]

        def spread(key):
            sd = entry["std"][key]
            return f"{entry['mean'][key]:.3f}" + (f" +- {sd:.3f}" if sd is not None else "")
        if name == ref:
            versus = "reference"
        else:
            p = summary["paired"][name]
            versus = f"{p['mean']:+.3f}"
            if p["low"] is not None:
                holds = "**excludes 0**" if p["low"] > 0 or p["high"] < 0 else "contains 0"
                versus += f" [{p['low']:+.3f}, {p['high']:+.3f}] {holds}"
        lines.append(f"| `{name}` | {entry['n']} | {spread('clean_accuracy')} | "
                     f"{spread('worst_case_accuracy')} | {versus} |")
    return "\n".join(lines)


def cell_line(root, row):
    # The directory's name needs only the method's name (a --study_variants name too).
    workdir = study.cell_workdir(root, study.Method(row["method"], ""), row["seed"])
    report = workdir.read_json("metrics.json")["student"]
    checks = report.get("sanity_checks") or {}
    steps = checks.get("more_steps") or {}
    by_steps = dict(zip(steps.get("steps", []), steps.get("accuracy", [])))
    square = checks.get("square_vs_gradient") or {}

    def number(value):
        return "-" if value is None else f"{value:.3f}"
    share = "-" if "square_only" not in square else \
        f"{square['square_only']:.1%} ({square['square_broke']} of {square['standing']})"
    spent = study.cell_seconds(workdir)  # a resumed cell's whole time, as best known
    minutes = "-" if spent is None else f"{spent[0] / 60:.0f} + {spent[1] / 60:.0f}"
    return (f"| `{row['method']}`, seed {row['seed']} | {number(row['clean_accuracy'])} | "
            f"{number(by_steps.get(10))} | {number(by_steps.get(100))} | "
            f"{number(row['robust_accuracy'].get('apgd_ce'))} | {share} | "
            f"{number(row['worst_case_accuracy'])} | {minutes} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="the study's --workdir")
    parser.add_argument("--methods", help="comma-separated, in the tables' order "
                        "(default: every method with a finished cell, by name)")
    parser.add_argument("--reference", help="the method the others are compared with "
                        "(default: the first of --methods)")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.study, "cells")):
        sys.exit(f"{args.study}: no cells/ directory; is it a study's --workdir?")
    found = study.evaluations(args.study)
    if not found:
        print(f"{args.study}: no finished cell yet")
        return
    evaluation, _ = found[0]  # the one most cells had
    rows = study.finished_rows(args.study, evaluation)
    methods = args.methods.split(",") if args.methods else sorted({r["method"] for r in rows})
    reference = args.reference or methods[0]
    if reference not in methods:
        sys.exit(f"--reference={reference} is not one of {','.join(methods)}")
    seeds = sorted(s for s in {r["seed"] for r in rows}
                   if {r["method"] for r in rows if r["seed"] == s} >= set(methods))
    done = [r for r in rows if r["seed"] in seeds and r["method"] in methods]
    print(f"{args.study}: {len(rows)} finished cells; seeds every method has finished: "
          f"{seeds or 'none'}")
    print(f"evaluation: {json.dumps(evaluation)}")
    for other, n in found[1:]:
        print(f"left out: {n} cell(s) evaluated otherwise (a re-evaluation under way?): "
              f"{json.dumps(other)}")
    print()
    if seeds:
        summary = study.summarize(done, reference=reference)
        print(study.format_table(summary) + "\n")
        print(summary_markdown(summary, methods) + "\n")
        print("| seed | " + " | ".join(methods) + " |")
        print("|---" * (len(methods) + 1) + "|")
        for seed in seeds:
            worst = {r["method"]: r["worst_case_accuracy"] for r in done if r["seed"] == seed}
            print(f"| {seed} | " + " | ".join(f"{worst[m]:.3f}" for m in methods) + " |")
        print()
    print("| cell | clean | PGD-10 | PGD-100 | APGD-CE | Square's share | worst case | "
          "minutes (training + evaluation) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["seed"], methods.index(r["method"])
                                           if r["method"] in methods else len(methods))):
        if row["method"] in methods:
            print(cell_line(args.study, row))


if __name__ == "__main__":
    main()
