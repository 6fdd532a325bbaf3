"""Installs the project in fresh virtual environments and uses what it installed.

    python .ci/install_check.py [--keep DIR]

1. full: `pip install .` in a new venv (every dependency from the package
   index), then, from a directory outside the checkout, `ardir-tf
   --mode=distill --flagfile=flags/smoke.cfg` (the preset comes from the
   installed package), `ardir-tf --mode=export`, and `ardir-serve --help`.
2. serve-only: `pip install -r requirements-serve.txt && pip install --no-deps .`
   in another new venv, as the README says. TensorFlow must not be importable
   there.
3. In both venvs, the installed `ardir-serve` serves step 1's export: one Open
   Inference Protocol request must give the labels ONNX Runtime gives. Then the
   same entry point (export.cli:run) runs under a wrapper that prints, when the
   server has stopped on SIGTERM, whether TensorFlow was ever in sys.modules.
4. serve-only, editable: `pip install --no-deps -e .` over it, and `ardir-serve`
   serves again (so `pip install -e .` is exercised too).
5. The full venv has none of the test-only packages (cleverhans, pytest,
   tritonclient) until `pip install .[test]`, which must bring them.

pip runs with --no-compile: byte-compiling all of TensorFlow's modules at
install is half a minute of CI that an import does lazily for the modules used.

Step 2 runs beside step 1's pip install, and step 5's `pip install .[test]`
beside the serve-only checks of steps 3 and 4 (neither touches what the other
uses).

The checkout is copied first (its tracked and untracked files, not ignored
ones), so that the build leaves nothing in it. Prints each step's time; exits 1
on the first failure, saying which step and what it printed.
"""

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Started as the console script would be, then tells at exit what it imported.
SERVE_AND_REPORT = """
import atexit, sys
atexit.register(lambda: print("IMPORTED", sorted({m.split(".")[0] for m in sys.modules}
                                                 & {"tensorflow", "keras", "tf2onnx"}),
                              flush=True))
from export import cli
sys.argv = ["ardir-serve", *sys.argv[1:]]
cli.run()
"""


def step(name, command, cwd, env=None, timeout=1800, ok=(0,)):
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.1f} s", flush=True)
    if run.returncode not in ok:
        sys.exit(f"FAILED: {name} (status {run.returncode})\n{run.stdout[-3000:]}\n"
                 f"{run.stderr[-3000:]}")
    return run, seconds


def copy_checkout(target):
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        source = os.path.join(ROOT, rel)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, rel))


def onnx_runtime_case(venv, export_dir):
    """Five random images and the labels the venv's ONNX Runtime gives them."""
    check = ("import json, sys, numpy as np, onnxruntime\n"
             "x = np.random.default_rng(0).random((5, 8, 8, 1), dtype=np.float32)\n"
             f"s = onnxruntime.InferenceSession({os.path.join(export_dir, 'student.onnx')!r})\n"
             "print(json.dumps({'x': x.tolist(), 'want': "
             "s.run(['logits'], {'images': x})[0].argmax(1).tolist()}))")
    return json.loads(subprocess.run([f"{venv}/bin/python", "-c", check], capture_output=True,
                                     text=True, check=True).stdout)


def serve_once(venv, export_dir, cwd, case, report_imports=False):
    """Starts the venv's ardir-serve (or its entry point under the reporting wrapper),
    sends one V2 infer of `case`'s images, stops it; returns (labels, modules imported
    or None, seconds to listen)."""
    python = f"{venv}/bin/python"
    command = [python, "-c", SERVE_AND_REPORT] if report_imports else [f"{venv}/bin/ardir-serve"]
    start = time.perf_counter()
    proc = subprocess.Popen([*command, f"--export_dir={export_dir}", "--port=0"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = None
    for line in proc.stdout:
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if found:
            port = int(found.group(1))
            break
    listening = time.perf_counter() - start
    if port is None:
        sys.exit(f"FAILED: ardir-serve did not start\n{proc.stderr.read()[-3000:]}")
    body = json.dumps({"inputs": [{"name": "images", "shape": [5, 8, 8, 1],
                                   "datatype": "FP32", "data": case["x"]}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/student/infer", body)
    with urllib.request.urlopen(request, timeout=30) as response:
        outputs = {o["name"]: o for o in json.load(response)["outputs"]}
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    imported = re.search(r"IMPORTED (\[.*\])", out)
    if proc.returncode or (report_imports and not imported):
        sys.exit(f"FAILED: ardir-serve exit {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}")
    return outputs["label"]["data"], imported and imported.group(1), listening


def check_serving(name, venv, export_dir, cwd):
    case = onnx_runtime_case(venv, export_dir)
    labels, _, listening = serve_once(venv, export_dir, cwd, case)
    want = case["want"]
    print(f"{name}: ardir-serve listening after {listening:.2f} s; labels {labels} (ONNX "
          f"Runtime: {want})", flush=True)
    if labels != want:
        sys.exit(f"FAILED: {name} ardir-serve gave {labels} for {want}")
    _, imported, _ = serve_once(venv, export_dir, cwd, case, report_imports=True)
    print(f"{name}: TensorFlow-like modules in the server's sys.modules: {imported}")
    if imported != "[]":
        sys.exit(f"FAILED: {name} ardir-serve imported {imported}")


def make_serve_only(serve, source, work):
    """The serving-only venv, as the README installs it; TensorFlow must be absent."""
    step("serve-only: python -m venv", [sys.executable, "-m", "venv", serve], work)
    step("serve-only: pip install -r requirements-serve.txt",
         [f"{serve}/bin/pip", "install", "-q", "--no-compile", "-r",
          os.path.join(source, "requirements-serve.txt")], work)
    step("serve-only: pip install --no-deps .",
         [f"{serve}/bin/pip", "install", "-q", "--no-compile", "--no-deps", source], work)
    no_tf = subprocess.run([f"{serve}/bin/python", "-c", "import tensorflow"],
                           capture_output=True, text=True)
    if no_tf.returncode == 0:
        sys.exit("FAILED: the serve-only venv has TensorFlow")
    print("serve-only: TensorFlow is not installed: ok", flush=True)


def installed(venv, modules):
    """Those of `modules` importable in `venv`, in their order."""
    run = subprocess.run([f"{venv}/bin/python", "-c",
                          "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] "
                          "if importlib.util.find_spec(m)))", *modules],
                         capture_output=True, text=True, check=True)
    return run.stdout.split()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work here and keep it (default: a temporary "
                        "directory, removed)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="ardir-install-")
    os.makedirs(work, exist_ok=True)
    total = time.perf_counter()
    try:
        source = os.path.join(work, "source")
        copy_checkout(source)
        outside = os.path.join(work, "elsewhere")  # not the checkout: presets from the package
        os.makedirs(outside, exist_ok=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

        # The serve-only venv needs nothing from the full one until it serves step 1's
        # export, and the test extra changes the full venv only after its serving
        # check: each is made while the other venv's pip or server runs (about 15 s
        # of CI).
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as aside:
            serve = os.path.join(work, "venv-serve")
            serve_ready = aside.submit(make_serve_only, serve, source, work)
            full = os.path.join(work, "venv-full")
            step("full: python -m venv", [sys.executable, "-m", "venv", full], work)
            _, install_seconds = step("full: pip install .", [
                f"{full}/bin/pip", "install", "-q", "--no-compile", source], work)
            run_dir = os.path.join(outside, "run")
            step("full: ardir-tf --mode=distill --flagfile=flags/smoke.cfg",
                 [f"{full}/bin/ardir-tf", "--mode=distill", "--flagfile=flags/smoke.cfg",
                  f"--workdir={run_dir}"], outside, env)
            step("full: ardir-tf --mode=export",
                 [f"{full}/bin/ardir-tf", "--mode=export", f"--workdir={run_dir}",
                  "--parity_examples=32"], outside, env)
            for command in ("ardir-serve", "ardir-tf"):  # absl's --help exits with status 1
                run, _ = step(f"full: {command} --help", [f"{full}/bin/{command}", "--help"],
                              outside, env, ok=(0, 1))
                if "--max_batch" not in run.stdout or "USAGE" in run.stdout:
                    sys.exit(f"FAILED: {command} --help lists no flags:\n{run.stdout[:2000]}")

            test_only = ["cleverhans", "pytest", "tritonclient"]
            if installed(full, test_only):
                sys.exit(f"FAILED: pip install . installed test-only packages: "
                         f"{installed(full, test_only)}")
            print("full: no test-only package installed: ok")

            export_dir = os.path.join(run_dir, "export")
            check_serving("full", full, export_dir, outside)
            serve_ready.result()  # re-raises its SystemExit, if it failed
            test_extra = aside.submit(step, "full: pip install .[test]", [
                f"{full}/bin/pip", "install", "-q", "--no-compile", f"{source}[test]"], work)
            check_serving("serve-only", serve, export_dir, outside)
            step("serve-only: pip install --no-deps -e .",
                 [f"{serve}/bin/pip", "install", "-q", "--no-compile", "--no-deps", "-e",
                  source], work)
            check_serving("serve-only, editable", serve, export_dir, outside)
            test_extra.result()
        if installed(full, test_only) != test_only:
            sys.exit(f"FAILED: pip install .[test] left out "
                     f"{sorted(set(test_only) - set(installed(full, test_only)))}")
        print("full: the test extra installs cleverhans, pytest and tritonclient: ok")
        print(f"install check passed in {time.perf_counter() - total:.0f} s "
              f"(of which pip install . {install_seconds:.0f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
