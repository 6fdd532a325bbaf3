"""A method study's report: means over seeds and paired intervals (see
ardir_tf.study for the study itself and what its rows hold).

    summarize(rows, reference)   per method: mean and spread over seeds, and the
                                 paired difference from the reference, with its
                                 Student-t interval
    format_table(summary)        the same as a table
    write_report(root, rows)     study.csv, study.json and study.png
"""

import csv
import json
import math
import os

import numpy as np

from ardir_tf.workdir import atomic_write

METRICS = ("clean_accuracy", "worst_case_accuracy")


def write_report(root, rows, reference="ard", metric="worst_case_accuracy",
                 confidence=0.95, attacks=None):
    """study.csv, study.json and study.png in `root`; returns the summary."""
    summary = summarize(rows, reference, metric, confidence)
    write_csv(rows, os.path.join(root, "study.csv"), attacks)
    write_json(rows, summary, os.path.join(root, "study.json"))
    plot(summary, os.path.join(root, "study.png"))
    return summary


def t_quantile(confidence, dof):
    """The two-sided Student-t quantile: P(|T| <= q) = confidence, T ~ t(dof)."""
    from scipy import stats
    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def paired_difference(values, reference, confidence=0.95):
    """Mean of values[i] - reference[i] over the pairs, with its paired-t interval.

    Args:
      values, reference: equal-length sequences, paired by position (by seed).
      confidence: of the interval, in (0, 1).

    Returns:
      {"n", "mean", "std" (of the differences, ddof 1), "low", "high",
      "confidence"}; with fewer than 2 pairs the spread cannot be estimated and
      std, low and high are None.
    """
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if values.shape != reference.shape or values.ndim != 1:
        raise ValueError(f"paired_difference needs two equal-length sequences, got "
                         f"{values.shape} and {reference.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = values - reference
    n = len(diff)
    out = {"n": n, "mean": float(diff.mean()) if n else None, "std": None, "low": None,
           "high": None, "confidence": confidence}
    if n >= 2:
        std = float(diff.std(ddof=1))
        half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
        out.update(std=std, low=out["mean"] - half, high=out["mean"] + half)
    return out


def _check_rows(rows):
    seen = set()
    for row in rows:
        missing = [k for k in ("method", "seed", *METRICS) if k not in row]
        if missing:
            raise ValueError(f"a study row needs {', '.join(missing)}; got {sorted(row)}")
        key = (row["method"], row["seed"])
        if key in seen:
            raise ValueError(f"two rows for method {key[0]!r} seed {key[1]!r}")
        seen.add(key)


def summarize(rows, reference="ard", metric="worst_case_accuracy", confidence=0.95):
    """Per method: n, mean and std (ddof 1) of each metric over seeds; and its
    paired difference in `metric` from `reference` over their common seeds.

    Returns {"reference", "metric", "confidence", "methods": {method: {"n",
    "seeds", "mean": {metric: value}, "std": {metric: value or None},
    "unreliable": how many of its rows' sanity checks failed, "unverified": how
    many of those have no standard-attack verification (their worst case is an
    upper bound)}},
    "paired": {method: paired_difference(...)}} (no "paired" entry for the
    reference itself); methods keep the order of their first row.
    """
    _check_rows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if reference not in methods:
        raise ValueError(f"the reference method {reference!r} has no rows; methods: "
                         f"{', '.join(methods)}")
    by = {m: {r["seed"]: r for r in rows if r["method"] == m} for m in methods}
    summary = {"reference": reference, "metric": metric, "confidence": confidence,
               "methods": {}, "paired": {}}
    for m in methods:
        seeds = sorted(by[m])
        entry = {"n": len(seeds), "seeds": seeds, "mean": {}, "std": {},
                 "unreliable": sum(by[m][s].get("reliable") is False for s in seeds),
                 "unverified": sum(by[m][s].get("reliable") is False
                                   and not by[m][s].get("verified") for s in seeds)}
        for name in dict.fromkeys((*METRICS, metric)):
            values = np.array([by[m][s][name] for s in seeds], float)
            entry["mean"][name] = float(values.mean())
            entry["std"][name] = float(values.std(ddof=1)) if len(values) > 1 else None
        summary["methods"][m] = entry
        if m != reference:
            common = sorted(set(by[m]) & set(by[reference]))
            summary["paired"][m] = dict(
                paired_difference([by[m][s][metric] for s in common],
                                  [by[reference][s][metric] for s in common], confidence),
                seeds=common)
    return summary


def _pm(mean, std):
    return f"{mean:.4f}" + (f" +- {std:.4f}" if std is not None else "          ")


# Marks after a method's worst case in the table: some seeds' evaluations
# failed a sanity check, and their worst case is...
MARKS = {"verified": ("*", "a sanity check failed on {k} of {n} seeds: the gradient attacks "
                           "were fooled there, and the worst case is the one after the "
                           "standard attacks"),
         "unverified": ("!", "a sanity check failed on {k} of {n} seeds and nothing verified "
                             "it: an UPPER BOUND (rerun with --attacks=fast,standard)")}


def format_table(summary):
    """The summary as text: mean +- std per method, and the paired difference
    from the reference with its interval (and whether it excludes 0). A method
    whose evaluations failed a sanity check on some seed is marked in the
    worst-case column (`MARKS`), with the legend under the table."""
    metric, ref = summary["metric"], summary["reference"]
    pct = round(summary["confidence"] * 100)
    w = max(16, *(len(m) for m in summary["methods"]))
    lines = [f"{'method':{w}} {'n':>2}  {'clean':>17}  {metric.replace('_accuracy', ''):>17}    "
             f"vs {ref} (paired, {pct}% interval)",
             "-" * (w + 82)]
    legend = []
    for m, e in summary["methods"].items():
        text = "reference"
        if m in summary["paired"]:
            p = summary["paired"][m]
            if p["low"] is None:
                text = f"{p['mean']:+.4f} (n={p['n']}: no interval)"
            else:
                verdict = "excludes 0" if p["low"] > 0 or p["high"] < 0 else "contains 0"
                text = f"{p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] {verdict}"
        mark = "  "
        if e.get("unverified"):
            mark, note = MARKS["unverified"]
            legend.append(f"{mark} {m}: " + note.format(k=e["unverified"], n=e["n"]))
        elif e.get("unreliable"):
            mark, note = MARKS["verified"]
            legend.append(f"{mark} {m}: " + note.format(k=e["unreliable"], n=e["n"]))
        lines.append(f"{m:{w}} {e['n']:>2}  {_pm(e['mean']['clean_accuracy'], e['std']['clean_accuracy']):>17}  "
                     f"{_pm(e['mean'][metric], e['std'][metric]):>17} {mark:<2} {text}")
    return "\n".join(lines + ([""] + legend if legend else []))


def write_csv(rows, path, attacks=None):
    """One row per run: method, seed, clean, each attack, worst case, seconds
    per epoch; written atomically. Returns the path."""
    _check_rows(rows)
    attacks = list(attacks or dict.fromkeys(a for r in rows
                                            for a in r.get("robust_accuracy", {})))
    fields = ["method", "seed", "clean_accuracy", *attacks, "worst_case_accuracy",
              "seconds_per_epoch", "reliable", "verified"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({"method": r["method"], "seed": r["seed"],
                                 "clean_accuracy": r["clean_accuracy"],
                                 "worst_case_accuracy": r["worst_case_accuracy"],
                                 "seconds_per_epoch": r.get("seconds_per_epoch", ""),
                                 "reliable": r.get("reliable", ""),
                                 "verified": r.get("verified", ""),
                                 **{a: r.get("robust_accuracy", {}).get(a, "")
                                    for a in attacks}})
    atomic_write(path, write)
    return path


def write_json(rows, summary, path):
    """{"rows": rows, "summary": summary}, written atomically. Returns the path."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=2)
            f.write("\n")
    atomic_write(path, write)
    return path


def plot(summary, path):
    """A PNG of each method's mean clean and `metric` accuracy with +- one
    standard deviation over seeds as error bars (headless). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(summary["methods"])
    metric = summary["metric"]
    fig = Figure(figsize=(max(4, 1.2 * len(methods) + 2), 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = np.arange(len(methods))
    for offset, name, label in ((-0.15, "clean_accuracy", "clean"),
                                (0.15, metric, metric.replace("_accuracy", ""))):
        means = [summary["methods"][m]["mean"][name] for m in methods]
        stds = [summary["methods"][m]["std"][name] or 0.0 for m in methods]
        ax.errorbar(xs + offset, means, yerr=stds, fmt="o", capsize=4, label=label)
    ax.set_xticks(xs, methods)
    ax.set_ylabel("accuracy (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return path
