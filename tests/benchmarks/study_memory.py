"""Benchmark: how a study's memory grows with its cells.

    python tests/benchmarks/study_memory.py [--cells 30] [--methods pgd_at,ard,ardir]

Runs `main.py --mode=study --flagfile=flags/smoke.cfg` (tiny models, seconds a
cell) with --methods x (cells / methods) seeds in a fresh temporary workdir, as
a child process, and reads the child's resident memory (VmRSS) each time a cell
finishes (its "[study] cell k of N (...): clean ..." line). Prints RSS after
cell 1, 3, 10, 20, ..., the last, and the growth from cell 3 to the last. Not a
test: it asserts nothing.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=30)
    parser.add_argument("--methods", default="pgd_at,ard,ardir")
    args = parser.parse_args()
    methods = args.methods.split(",")
    seeds = -(-args.cells // len(methods))
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, os.path.join(ROOT, "main.py"), "--mode=study",
                   "--flagfile=flags/smoke.cfg", f"--workdir={workdir}/study",
                   f"--study_methods={args.methods}", f"--study_seeds={seeds}",
                   f"--study_reference={methods[0]}", "--verbose=0"]
        print(" ".join(command[1:]))
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        samples = {}
        for line in proc.stdout:
            found = re.match(r"\[study\] cell (\d+) of (\d+) \(.*\): clean", line)
            if found:
                samples[int(found.group(1))] = rss_mb(proc.pid)
        proc.wait()
        if proc.returncode:
            raise SystemExit(f"the study failed (exit {proc.returncode})")
    seconds = time.perf_counter() - start
    last = max(samples)
    shown = sorted({1, 3, *range(10, last + 1, 10), last} & set(samples))
    print("| cells done | RSS (MB) |\n|---|---|")
    for k in shown:
        print(f"| {k} | {samples[k]:.0f} |")
    print(f"growth from cell 3 to cell {last}: {samples[last] - samples[3]:+.0f} MB "
          f"({len(samples)} cells in {seconds:.0f} s)")


if __name__ == "__main__":
    main()
