"""main.py's start-up on many command lines, in one process.

    python tests/startup_harness.py < cases.json > results.json

cases.json: {name: [arg, ...]}. For each case the flags are reset and
`app.run(main.main)` runs with `main.py ARGS`, as `python main.py ARGS`
would, with Python's stdout and stderr captured; the results are
{name: {"returncode": int, "stderr": str, "stdout": str, "seconds": float}} on
stdout.

It exists to test command lines that must fail at start-up: each would
otherwise cost a fresh process and a TensorFlow import (about 3 s of a CPU).
Only for command lines that stop early: state a finished run leaves behind
(seeds, the dtype policy) would carry over to the next case. The CPU is split
into two logical devices up front, as in conftest.
"""

import contextlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

import tensorflow as tf  # noqa: E402

# Two logical CPU devices before any case starts TensorFlow (as conftest does):
# a case asking for two devices then finds them instead of failing to split.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from absl import app  # noqa: E402

import main  # noqa: E402


def run(args):
    main.FLAGS.unparse_flags()
    main.load_model.cache_clear()
    main.BUILT.clear()
    out, err = io.StringIO(), io.StringIO()
    code, start = 0, time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app.run(main.main, argv=[os.path.join(ROOT, "main.py"), *args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return {"returncode": code, "stderr": err.getvalue(), "stdout": out.getvalue(),
            "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    results = {name: run(args) for name, args in cases.items()}
    sys.stdout.write(json.dumps(results))
