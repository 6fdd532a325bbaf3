"""Remakes tests/data/digits_run/: the default command's workdir, minus its logs.

    python tests/data/make_digits_run.py

Runs `python main.py --mode=distill` (about a minute on 2 CPU cores) in a fresh
directory and copies what the tests read. Run it after a change that should
change the default run's models, and commit the result.
"""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ("flags.json", "metrics.json", "history.csv", "natural.keras", "teacher.keras",
         "student.keras")

if __name__ == "__main__":
    target = os.path.join(ROOT, "tests", "data", "digits_run")
    # A fixed workdir: flags.json records it, and tests/test_main.py compares the
    # committed flags.json with the default command's settings for --workdir=/tmp/defrun.
    workdir = "/tmp/defrun"
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--mode=distill",
                        f"--workdir={workdir}", "--verbose=2"], check=True, cwd=ROOT)
        os.makedirs(target, exist_ok=True)
        for name in FILES:
            shutil.copy(os.path.join(workdir, name), os.path.join(target, name))
            os.chmod(os.path.join(target, name), 0o644)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {', '.join(FILES)} to {target}")
