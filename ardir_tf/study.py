"""Method studies: which differences between methods do the seeds support?

A study is a grid of runs, methods x seeds, each evaluated with the same
attacks on the same test images. `run` trains and evaluates the grid, one
ordinary resumable run directory per cell (`cells/<method>-seed<k>/`), so a
killed study resumes where it stopped and a finished cell is never trained
again. Its rows are dicts

    {"method": "ardir", "seed": 0, "clean_accuracy": 0.99,
     "worst_case_accuracy": 0.71, "robust_accuracy": {"pgd20": 0.73, ...},
     "seconds_per_epoch": 1.9, "reliable": True, "verified": False}

("reliable": whether the evaluation's sanity checks passed; False when one
failed, e.g. a gradient-free attack broke points the gradient attacks could
not, None when they were not run; "verified": whether, after a failed check,
the standard attacks ran on the points left standing, so that the worst case
holds them too)

and this module reports them: per method the mean and standard deviation over
seeds, and per method its paired difference from a reference method (the same
seeds, so the seed-to-seed spread the two share cancels) with a Student-t
confidence interval over the seeds. An interval that contains 0 is no evidence
of a difference.

Methods are named as `--study_methods` names them (`parse_method`): a base
method (`natural`, `pgd_at`, `trades` on the student's architecture, `ard`,
`rslad`, `ardir`), optionally with knobs, `ardir@ir_weight=0.5@distance=mse`,
`ardir@layers=stage1:stage1+stage2:stage2`, or a name from a variants file.

The report (summarize, format_table, write_report) is in
ardir_tf/study_report.py; its names are read from here too.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import time

from ardir_tf import losses, precision, training
# The report, read from here too (study.summarize, study.format_table, ...).
from ardir_tf.study_report import (  # noqa: F401
    MARKS, METRICS, format_table, paired_difference, plot, summarize, t_quantile,
    write_csv, write_json, write_report)
from ardir_tf.workdir import Workdir


BASES = ("natural", "pgd_at", "trades", "ard", "rslad", "ardir")
_DISTILLERS = ("ard", "rslad", "ardir")
ATTACK_OBJECTIVES = ("ce", "kl", "ardir")  # as distill.ATTACK_OBJECTIVES


class StudyError(ValueError):
    """A study that cannot run as asked (a bad method name, a bad variants file)."""


def _number(text, low=None, high=None, above=None):
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        try:
            num, _, den = str(text).partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise StudyError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or (low is not None and value < low) or \
            (high is not None and value > high) or (above is not None and value <= above):
        bounds = (f"> {above}" if above is not None else
                  f"in [{low}, {high}]" if high is not None else f">= {low}")
        raise StudyError(f"expected a number {bounds}, got {text!r}")
    return value


def _choice(options):
    def parse(text):
        if text not in options:
            raise StudyError(f"expected one of {', '.join(options)}, got {text!r}")
        return text
    return parse


def _layers(text):
    items = text if isinstance(text, (list, tuple)) else str(text).split("+")
    pairs = tuple(tuple(str(p).split(":")) for p in items)
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise StudyError("expected student_layer:teacher_layer pairs joined by +, e.g. "
                         f"stage1:stage1+stage2:stage2, got {text!r}")
    return pairs


# The knobs a method name may set: knob -> (parser, the base methods taking it).
# Their names are the distiller's (and the trainer's) arguments; main.py maps
# them onto its flags (beta is --trades_beta).
KNOBS = {
    "ir_weight": (lambda v: _number(v, low=0), ("ardir",)),
    "distance": (_choice(losses.DISTANCES), ("ardir",)),
    "layers": (_layers, ("ardir",)),
    "ir_teacher_input": (_choice(losses.IR_TEACHER_INPUTS), ("ardir",)),
    "ir_student_input": (_choice(losses.IR_STUDENT_INPUTS), ("ardir",)),
    "alpha": (lambda v: _number(v, 0, 1), _DISTILLERS),
    "temperature": (lambda v: _number(v, above=0), ("ard", "ardir")),
    "kd_teacher_input": (_choice(("clean", "adv")), ("ard", "ardir")),
    "bn_statistics": (_choice(("split", "adv", "both")), ("ard", "rslad", "ardir", "trades")),
    "attack_objective": (_choice(ATTACK_OBJECTIVES), _DISTILLERS),
    "beta": (lambda v: _number(v, low=0), ("trades",)),
    # The arithmetic the cell trains in (precision.choose); it is evaluated in float32.
    "precision": (_choice(precision.CHOICES), BASES),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of a study: `name` as written, its `base` method and the knobs
    it sets (`options`, sorted (knob, value) pairs; the rest come from the
    study's own settings)."""
    name: str
    base: str
    options: tuple = ()

    @property
    def kwargs(self):
        return dict(self.options)

    @property
    def slug(self):
        """The name as a directory name."""
        return re.sub(r"[^A-Za-z0-9._=@+-]", "_", self.name.replace(":", "-"))


def _method(name, base, options):
    if base not in BASES:
        raise StudyError(f"{name!r}: unknown method {base!r}; valid: {', '.join(BASES)} "
                         "(or a name from the variants file)")
    parsed = {}
    for key, value in options:
        if key not in KNOBS:
            raise StudyError(f"{name!r}: unknown knob {key!r}; valid: {', '.join(KNOBS)}")
        parse, bases = KNOBS[key]
        if base not in bases:
            raise StudyError(f"{name!r}: {key} is a knob of {', '.join(bases)}, not of {base}")
        try:
            parsed[key] = parse(value)
        except StudyError as err:
            raise StudyError(f"{name!r}: {key}: {err}") from None
    if parsed.get("attack_objective") == "ardir" and base != "ardir":
        raise StudyError(f"{name!r}: attack_objective=ardir needs the ardir method")
    if parsed.get("attack_objective") == "ardir" and parsed.get("kd_teacher_input") == "adv":
        raise StudyError(f"{name!r}: attack_objective=ardir needs kd_teacher_input=clean "
                         "(fixed targets)")
    return Method(name, base, tuple(sorted(parsed.items())))


def parse_method(text, variants=None):
    """A Method from a name: `ardir`, `ardir@ir_weight=0.5@distance=mse`, or a
    key of `variants` ({name: "base@knob=value..." or {"method": base, knob:
    value, ...}}, as a --study_variants JSON file holds). Raises StudyError."""
    text = str(text).strip()
    if variants and text in variants:
        spec = variants[text]
        if isinstance(spec, str):
            return dataclasses.replace(parse_method(spec), name=text)
        if not isinstance(spec, dict) or "method" not in spec:
            raise StudyError(f"variant {text!r} must be a method name such as "
                             '"ardir@ir_weight=0.5" or an object {"method": "ardir", '
                             f'"ir_weight": 0.5}}; got {spec!r}')
        return _method(text, spec["method"],
                       [(k, v) for k, v in spec.items() if k != "method"])
    base, *knobs = text.split("@")
    options = []
    for knob in knobs:
        key, eq, value = knob.partition("=")
        if not eq or not key or not value:
            raise StudyError(f"{text!r}: knobs are written @name=value, e.g. "
                             f"ardir@ir_weight=0.5; got {knob!r}")
        options.append((key, value))
    return _method(text, base, options)


def load_variants(path):
    """A --study_variants JSON file: {name: spec} (see `parse_method`), each
    checked. Raises StudyError naming what is wrong."""
    try:
        with open(path) as f:
            variants = json.load(f)
    except OSError as err:
        raise StudyError(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise StudyError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(variants, dict):
        raise StudyError(f"{path} must hold an object {{name: method}}, e.g. "
                         '{"ardir-half": "ardir@ir_weight=0.5"}')
    for name in variants:
        if "@" in name or "," in name or name in BASES:
            raise StudyError(f"{path}: variant name {name!r} must not contain @ or , nor "
                             "be a base method's name")
        parse_method(name, variants)
    return variants


def grid(methods, seeds):
    """The cells in the order a study runs them: every method for the first
    seed, then for the next, so a study stopped early has whole seeds to pair."""
    return [(m, s) for s in seeds for m in methods]


def cell_workdir(root, method, seed):
    return Workdir(os.path.join(root, "cells", f"{method.slug}-seed{seed}"))


# What a cell holds beside an ordinary run's files: its evaluation under
# metrics.json's "student", and in cell.json the training time, the method's
# name and the seed, and which evaluation that is (written last: the cell is
# finished when it matches the study's evaluation).
CELL = "cell.json"
# Where a cell's evaluation keeps its finished attacks until its report is written.
PARTIAL = "evaluation-partial"


def _row(name, seed, workdir):
    report = workdir.read_json("metrics.json")["student"]
    timing = workdir.read_json(CELL, {})
    epochs = timing.get("epochs") or 0
    order = report.get("attack_order") or list(report["robust_accuracy"])
    return {"method": name, "seed": seed,
            "clean_accuracy": report["clean_accuracy"],
            "worst_case_accuracy": report["worst_case_accuracy"],
            "robust_accuracy": {a: report["robust_accuracy"][a] for a in order},
            "seconds_per_epoch": round(timing["seconds"] / epochs, 3) if epochs else None,
            "reliable": report.get("reliable"),
            "verified": bool(report.get("verified"))}


def finished_rows(root, evaluation=None):
    """The rows of the finished cells in the study directory `root`, as `run`
    returns them, without training or evaluating anything: a study in progress,
    or stopped, read as it stands. Ordered by seed, then method name (from the
    cell's cell.json; for cells written before it recorded them, `study_method`
    and `seed` in the cell's flags.json, as main.py writes them).

    evaluation: only the cells evaluated so (`run`'s argument, as cell.json
      records it); None: every finished cell, and StudyError when two were
      evaluated differently (a re-evaluation under way: `evaluations(root)`
      says which there are).
    """
    found = _finished_cells(root)
    if evaluation is None:
        ways = len({json.dumps(c[3], sort_keys=True) for c in found})
        if ways > 1:
            raise StudyError(f"the finished cells of {root} were evaluated in {ways} ways; "
                             "pass one of study.evaluations() or run the study's command "
                             "again to evaluate them alike")
        chosen = found
    else:
        chosen = [c for c in found if c[3] == evaluation]
    rows = [_row(method, seed, workdir) for workdir, method, seed, _ in chosen]
    return sorted(rows, key=lambda r: (r["seed"], r["method"]))


def evaluations(root):
    """The evaluations the finished cells of `root` had, most cells first, as
    [(evaluation, number of cells)]."""
    counts = {}
    for *_, evaluation in _finished_cells(root):
        key = json.dumps(evaluation, sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    return [(json.loads(k), n) for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def _finished_cells(root):
    """[(workdir, method name, seed, evaluation)] of root's finished cells."""
    out = []
    cells = os.path.join(root, "cells")
    for name in sorted(os.listdir(cells)) if os.path.isdir(cells) else []:
        workdir = Workdir(os.path.join(cells, name))
        try:
            cell = workdir.read_json(CELL, {})
            saved = workdir.read_json(Workdir.SETTINGS) or {}
        except ValueError:
            continue  # a cell being written; it is not finished
        method = cell.get("method", saved.get("study_method"))
        seed = cell.get("seed", saved.get("seed"))
        if method is None or seed is None or "evaluation" not in cell or \
                not finished(workdir, cell["evaluation"]):
            continue
        out.append((workdir, method, seed, cell["evaluation"]))
    return out


def cell_seconds(workdir):
    """(training, evaluation) seconds a finished cell took, from its cell.json,
    flags.json and metrics.json; None when they do not say.

    A cell killed and resumed records only what its processes that finished
    timed: its training, the epochs they trained (its seconds per epoch times
    the run's epochs, then); its evaluation, every attack's seconds including
    the batches kept from a killed process (the report's own "seconds" count
    only the last process)."""
    try:
        timing = workdir.read_json(CELL, {})
        report = (workdir.read_json("metrics.json") or {}).get("student", {})
        epochs = (workdir.read_json(Workdir.SETTINGS) or {}).get("epochs")
    except ValueError:
        return None
    training_s, evaluation_s = timing.get("seconds"), report.get("seconds")
    if training_s is None or evaluation_s is None:
        return None
    timed = timing.get("epochs") or 0
    if timed and isinstance(epochs, int) and epochs > timed:
        training_s = training_s / timed * epochs
    return training_s, max(evaluation_s, sum((report.get("attack_seconds") or {}).values()))


def _duration(seconds):
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _time_left(spent, todo):
    """'; about 4 h 10 min left (...)' for the cells `todo` [(workdir, whether it
    is trained)] from the finished cells' (training, evaluation) seconds
    (`spent`), by their medians: a cell slowed by other work on the machine
    moves a median less than a mean. A trained cell costs only its evaluation."""
    if not spent:
        return ""
    train_s = statistics.median(t for t, _ in spent)
    eval_s = statistics.median(e for _, e in spent)
    total = sum(eval_s + (0 if trained else train_s) for trained in todo)
    return (f"; about {_duration(total)} left (median of {len(spent)} finished "
            f"cell{'s' if len(spent) > 1 else ''}: {_duration(train_s)} training, "
            f"{_duration(eval_s)} evaluation)")


def finished(workdir, evaluation=None):
    """Whether a cell is trained and evaluated with `evaluation` (a dict naming
    the attacks and examples; see `run`): it is then never run again."""
    try:
        return "student" in (workdir.read_json("metrics.json") or {}) and \
            workdir.read_json(CELL, {}).get("evaluation") == evaluation
    except ValueError:
        return False


def run(root, methods, seeds, *, settings, train, evaluate, epochs, evaluation=None,
        log=None):
    """Trains and evaluates every cell of methods x seeds not finished yet.

    Args:
      root: the study's directory; cell k is root/cells/<method>-seed<k>/.
      methods: Method objects; seeds: integers.
      settings: fn(method, seed) -> the cell's settings (its flags.json); a cell
        directory holding other settings raises StudyError.
      train: fn(method, seed, workdir) -> the trained keras.Model, resuming
        from workdir's backup (phase "student", saved as student.keras).
      evaluate: fn(model, resume_dir) -> an `evaluate.evaluate` report; the
        same attacks, seed and test images for every cell. `resume_dir` is
        the cell's directory for the evaluation's finished steps
        (`evaluate(..., resume_dir=)`), so that a study killed during a long
        evaluation resumes it; it is removed once the report is written.
      epochs: the epochs a cell trains (for its seconds per epoch).
      evaluation: a JSON-able dict naming what `evaluate` does (attacks, steps,
        examples, seed). A trained cell evaluated otherwise is evaluated again
        (not trained again), so every row of the report comes from the same
        evaluation.
      log: fn(str) told what each cell does (None: quiet).

    Returns the rows, in grid order.
    """
    log = log or (lambda message: None)
    cells = grid(methods, seeds)
    rows = []
    # The finished cells' (training, evaluation) seconds, for the time left.
    spent = [cell_seconds(w) for w in (cell_workdir(root, m, s) for m, s in cells)
             if finished(w, evaluation) and cell_seconds(w) is not None]
    for i, (method, seed) in enumerate(cells, 1):
        workdir = cell_workdir(root, method, seed)
        wanted = settings(method, seed)
        previous = workdir.read_json(Workdir.SETTINGS) if workdir.exists(Workdir.SETTINGS) \
            else None
        changed = Workdir.changed_settings(previous, wanted) if previous is not None else []
        if changed:
            raise StudyError(f"{workdir.root} holds {method.name} seed {seed} trained with "
                             f"other settings ({', '.join(changed[:4])} differ); give the "
                             "changed method a new name, or delete that directory")
        workdir.claim(wanted)
        where = f"cell {i} of {len(cells)} ({method.name}, seed {seed})"
        if finished(workdir, evaluation):
            log(f"{where}: finished earlier, reused")
        else:
            todo = [cell_workdir(root, m, s) for m, s in cells[i - 1:]]
            todo = [w.exists("student.keras") for w in todo if not finished(w, evaluation)]
            log(f"{where}: {len(cells) - i} more after it, in {workdir.root}"
                f"{_time_left(spent, todo)}")
            timing = workdir.read_json(CELL, {"seconds": 0.0, "epochs": 0})
            timing.pop("evaluation", None)  # until the new one is written
            workdir.write_json(CELL, timing)
            trained = 0 if workdir.exists("student.keras") else \
                epochs - training.resumable_epoch(workdir, "student")
            start = time.perf_counter()
            model = train(method, seed, workdir)
            if trained:  # training time, tracing included, over the epochs this call ran
                timing = {"seconds": timing["seconds"] + time.perf_counter() - start,
                          "epochs": timing["epochs"] + trained}
                workdir.write_json(CELL, timing)
            partial = workdir.path(PARTIAL)
            workdir.write_json("metrics.json", {"student": evaluate(model, partial)})
            workdir.write_json(CELL, dict(timing, evaluation=evaluation, method=method.name,
                                          seed=seed))
            shutil.rmtree(partial, ignore_errors=True)
            if cell_seconds(workdir) is not None:
                spent.append(cell_seconds(workdir))
        row = _row(method.name, seed, workdir)
        log(f"{where}: clean {row['clean_accuracy']:.4f}, worst case "
            f"{row['worst_case_accuracy']:.4f}")
        rows.append(row)
    return rows
