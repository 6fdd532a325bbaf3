"""The command-line reference page (docs/cli.md), written from the flag
definitions themselves, so that it cannot drift from them:

    python -m flags.reference > docs/cli.md

A test regenerates it and compares. Sections follow the `# Section.` comments
of flags/__init__.py; each flag's type, default and help are absl's.
"""

import glob
import inspect
import os
import re
import sys

from absl import flags as absl_flags

import flags

# What each mode does, in a line (main.py's docstring has an example of each).
MODES = {
    "distill": "Trains a natural baseline, a robust teacher (or loads `--teacher`) and "
               "the student by `--method`, then evaluates all three.",
    "train_teacher": "Trains a robust teacher alone (`--teacher_method`), then evaluates it.",
    "evaluate": "Evaluates the models of a run again, on the run's own data and threat "
                "model (read from its flags.json) unless flags say otherwise.",
    "export": "Writes the student as SavedModel, ONNX and .keras, a Triton model "
              "repository and a TF Serving base path, after parity checks.",
    "serve": "Serves the exported ONNX student over the Open Inference Protocol, TF "
             "Serving's REST API and `/v1/predict` (also `ardir-serve`, without TensorFlow).",
    "study": "Trains every `--study_methods` x `--study_seeds` student from one teacher, "
             "evaluates each alike, and prints mean, std and paired intervals.",
}

HEADER = """\
# Command line

`python main.py` (or `ardir-tf`, once installed) takes absl flags, from the
command line or from flagfiles: `--flagfile=flags/mnist.cfg`, with flags after
the flagfile overriding it. `ardir-serve` takes only the *Files and serving*
flags. A boolean flag `--name` is turned off with `--noname`.
A bad value stops the run before any work with a one-line message.

This page is generated from the flag definitions (`python -m flags.reference >
docs/cli.md`); `python main.py --help` prints the same help texts.
"""


def _sections():
    """[(section title, [flag name, ...])] in the order flags/__init__.py defines them."""
    source = inspect.getsource(flags)
    sections, current = [], None
    definition = re.compile(r'(?:DEFINE\w*\((?:_\w+\(\),\s*)?|_fraction\()\s*"(\w+)"')
    for line in source.splitlines():
        title = re.fullmatch(r"    # ([A-Z][\w ]*)\.", line)
        if title:
            current = (title.group(1), [])
            sections.append(current)
            continue
        found = definition.search(line)
        if found:
            if current is None:
                raise RuntimeError(f"flag {found.group(1)} is defined before any "
                                   "`# Section.` comment in flags/__init__.py")
            current[1].append(found.group(1))
    merged = {}
    for title, names in sections:
        merged.setdefault(title, []).extend(names)
    return list(merged.items())


def _cell(text):
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")  # <workdir> is not HTML


def _default(flag):
    value = flag.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "`" + ",".join(map(str, value)) + "`"
    return f"`{value}`"


def _type(flag):
    enum = getattr(flag.parser, "enum_values", None)
    if enum:
        return "one of " + ", ".join(f"`{v}`" for v in enum)
    return flag.flag_type()


def markdown():
    """The page, as one string."""
    flags.define_flags()
    registered = {f.name: f for f in absl_flags.FLAGS.get_flags_for_module(flags.__name__)}
    out = [HEADER, "## Modes\n", "| `--mode=` | what it does |", "|---|---|"]
    out += [f"| `{mode}` | {MODES[mode]} |" for mode in flags.MODES]
    listed = set()
    for title, names in _sections():
        out += ["", f"## {title}", "", "| flag | type | default | what it does |",
                "|---|---|---|---|"]
        for name in names:
            flag = registered[name]
            listed.add(name)
            out.append(f"| `--{name}` | {_cell(_type(flag))} | {_cell(_default(flag))} | "
                       f"{_cell(flag.help)} |")
    out += ["", "## Presets", "",
            "Flagfiles in `flags/` (found from any directory once installed); flags "
            "after them override them.", "", "| `--flagfile=` | what | sets |", "|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(flags.PRESETS, "*.cfg"))):
        lines = open(path).read().splitlines()
        head = []
        for line in lines:  # the opening comment
            if not line.startswith("#"):
                break
            head.append(line.lstrip("# "))
        sets = [line for line in lines if line.startswith("--")]
        out.append(f"| `flags/{os.path.basename(path)}` | {_cell(' '.join(head))} | "
                   f"{_cell(' '.join(f'`{s}`' for s in sets))} |")
    missing = sorted(set(registered) - listed)
    if missing:  # a flag defined outside a `# Section.` comment's reach
        raise RuntimeError(f"flags without a section in flags/__init__.py: {missing}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
