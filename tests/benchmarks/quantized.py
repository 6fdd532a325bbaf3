"""Benchmark: the robustness of a run's student as INT8 and float16 files (ONNX
and LiteRT), measured on each file (ardir_tf.deployed.evaluate_artifact), and
the files' sizes for any Keras model.

    python tests/benchmarks/quantized.py --workdir runs/distill-digits-ardir \\
        [--examples 360] [--queries 1000] [--calibration 512] [--apgd_steps 100]
    python tests/benchmarks/quantized.py --size_of docs/studies/mnist-width8/teacher.keras

--workdir needs the run's export (`python main.py --mode=export`) and a digits
run (the data are the embedded digits, split as main.py splits them, seed 0).
It writes student.int8.onnx (static QDQ, calibrated on --calibration training
images) and student.float16.onnx beside the export's student.onnx, and the
LiteRT float32, float16 and full-integer INT8 files from its saved_model/ into
a temporary directory, then for each file: clean accuracy, APGD-CE and APGD-T
through BPDA, Square on the file alone, APGD-CE and APGD-T crafted on the float
student and transferred, the worst case, each family's worst case alone, file
size and seconds.

--size_of (repeatable) exports each Keras model to float32 ONNX and LiteRT and
writes every smaller file, calibrated on uniform random images (a file's size
does not depend on what it was calibrated on), and prints the sizes with the
parameter count. Not a test: it asserts nothing.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)


def write_files(model, directory, calibration, onnx_path=None):
    """{kind: path} of the model's float32 ONNX file (onnx_path, or one written
    into directory) and every smaller file."""
    from export import artifacts, litert, quantize
    serving = artifacts.serving_model(model)
    serving(calibration[:1])
    if onnx_path is None:
        onnx_path = os.path.join(directory, "model.onnx")
        serving.export(onnx_path, format="onnx", verbose=False)
    saved_model = os.path.join(directory, "saved_model")
    serving.export(saved_model, format="tf_saved_model", verbose=False)
    stem = onnx_path[:-len(".onnx")]
    files = {"float32": onnx_path,
             "int8": quantize.int8_onnx(onnx_path, f"{stem}.int8.onnx", calibration),
             "float16": quantize.float16_onnx(onnx_path, f"{stem}.float16.onnx")}
    for kind in litert.KINDS:
        files[f"litert_{kind}"] = litert.convert(
            saved_model, os.path.join(directory, litert.file_name("model", kind)), kind,
            calibration)
    return files


def sizes(paths):
    import keras
    import numpy as np
    print("| model | parameters | file | bytes | share of its float32 file |")
    print("|---|---|---|---|---|")
    for path in paths:
        model = keras.models.load_model(path, compile=False)
        shape = tuple(model.inputs[0].shape[1:])
        calibration = np.random.default_rng(0).random((64, *shape), np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            files = write_files(model, tmp, calibration)
            for kind, file in files.items():
                base = files["litert_float32" if kind.startswith("litert") else "float32"]
                print(f"| {os.path.basename(path)} | {model.count_params():,} | {kind} | "
                      f"{os.path.getsize(file):,} | "
                      f"{os.path.getsize(file) / os.path.getsize(base):.0%} |", flush=True)


def robustness(args):
    import keras
    import tensorflow as tf
    import ardir_tf
    from ardir_tf import deployed

    (x_train, _), (x_test, y_test) = ardir_tf.data.digits(seed=0)
    export = os.path.join(args.workdir, "export")
    student = keras.models.load_model(os.path.join(args.workdir, "student.keras"))
    data = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256)
    print(f"{args.examples} test digits, Linf {args.eps}, APGD {args.apgd_steps} steps, "
          f"Square {args.queries} queries, INT8 calibrated on {args.calibration} images")
    print("| file | bytes | clean | BPDA APGD-CE / APGD-T | Square on the file | transfer "
          "APGD-CE / APGD-T | worst: BPDA / Square / transfer | worst case | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(student, tmp, x_train[:args.calibration],
                            onnx_path=os.path.join(export, "student.onnx"))
        for name, path in files.items():
            start = time.perf_counter()
            r = deployed.evaluate_artifact(deployed.load(path, x_test.shape[1:]), student, data,
                                           args.eps, n_examples=args.examples,
                                           apgd_steps=args.apgd_steps,
                                           square_queries=args.queries)
            a, w = r["robust_accuracy"], r["worst_case"]
            print(f"| {name} | {os.path.getsize(path):,} | {r['clean_accuracy']:.3f} | "
                  f"{a['bpda_apgd_ce']:.3f} / {a['bpda_apgd_t']:.3f} | {a['square']:.3f} | "
                  f"{a['transfer_apgd_ce']:.3f} / {a['transfer_apgd_t']:.3f} | "
                  f"{w['bpda']:.3f} / {w['square']:.3f} / {w['transfer']:.3f} | "
                  f"{r['worst_case_accuracy']:.3f} | {time.perf_counter() - start:.0f} |",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir")
    parser.add_argument("--size_of", action="append", default=[])
    parser.add_argument("--examples", type=int, default=360)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--apgd_steps", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.15)
    args = parser.parse_args()
    if not args.workdir and not args.size_of:
        parser.error("give --workdir (a digits run with an export) or --size_of MODEL.keras")
    if args.size_of:
        sizes(args.size_of)
    if args.workdir:
        robustness(args)


if __name__ == "__main__":
    main()
