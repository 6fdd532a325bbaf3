"""Benchmark: the robustness of a run's student as INT8 and float16 ONNX files,
measured on each file (ardir_tf.deployed.evaluate_artifact).

    python tests/benchmarks/quantized.py --workdir runs/distill-digits-ardir \\
        [--examples 360] [--queries 1000] [--calibration 512] [--apgd_steps 100]

Needs the run's export (`python main.py --mode=export`) and a digits run (the
data are the embedded digits, split as main.py splits them, seed 0). Writes
student.int8.onnx (static QDQ, calibrated on --calibration training images)
and student.float16.onnx beside the export's student.onnx, then for each of the
three files: clean accuracy, APGD-CE and APGD-T through BPDA, Square on the file
alone, APGD-CE and APGD-T crafted on the float student and transferred, and the
worst case, each family's worst case alone, file size and seconds. Not a test:
it asserts nothing.
"""

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--examples", type=int, default=360)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--apgd_steps", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.15)
    args = parser.parse_args()

    import keras
    import tensorflow as tf
    import ardir_tf
    from ardir_tf import deployed, teachers
    from export import quantize

    (x_train, _), (x_test, y_test) = ardir_tf.data.digits(seed=0)
    export = os.path.join(args.workdir, "export")
    files = {"float32": os.path.join(export, "student.onnx")}
    files["int8"] = quantize.int8_onnx(files["float32"],
                                       os.path.join(export, "student.int8.onnx"),
                                       x_train[:args.calibration])
    files["float16"] = quantize.float16_onnx(files["float32"],
                                             os.path.join(export, "student.float16.onnx"))
    student = keras.models.load_model(os.path.join(args.workdir, "student.keras"))
    data = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256)
    print(f"{args.examples} test digits, Linf {args.eps}, APGD {args.apgd_steps} steps, "
          f"Square {args.queries} queries, INT8 calibrated on {args.calibration} images")
    print("| file | bytes | clean | BPDA APGD-CE / APGD-T | Square on the file | transfer "
          "APGD-CE / APGD-T | worst: BPDA / Square / transfer | worst case | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path in files.items():
        start = time.perf_counter()
        r = deployed.evaluate_artifact(teachers.load(path, input_shape=x_test.shape[1:]),
                                       student, data, args.eps, n_examples=args.examples,
                                       apgd_steps=args.apgd_steps,
                                       square_queries=args.queries)
        a, w = r["robust_accuracy"], r["worst_case"]
        print(f"| {name} | {os.path.getsize(path):,} | {r['clean_accuracy']:.3f} | "
              f"{a['bpda_apgd_ce']:.3f} / {a['bpda_apgd_t']:.3f} | {a['square']:.3f} | "
              f"{a['transfer_apgd_ce']:.3f} / {a['transfer_apgd_t']:.3f} | "
              f"{w['bpda']:.3f} / {w['square']:.3f} / {w['transfer']:.3f} | "
              f"{r['worst_case_accuracy']:.3f} | {time.perf_counter() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
