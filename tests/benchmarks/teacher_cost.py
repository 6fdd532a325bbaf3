"""What a teacher costs per training step, as Keras, SavedModel and ONNX.

    python tests/benchmarks/teacher_cost.py --teacher tests/data/digits_run/teacher.keras

Writes the Keras teacher as a SavedModel and as ONNX (stage2 as an extra output),
then for each form times (a) the teacher's forward pass alone on a batch, inside
a tf.function as the training step runs it, and (b) the whole ARDIR step of
`fit` (student width 16, PGD-10, batch --batch) with that teacher, in
alternating blocks so that the machine's drift falls on every form alike.
Prints medians; asserts nothing.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=os.path.join(ROOT, "tests", "data", "digits_run",
                                                     "teacher.keras"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--calls", type=int, default=200, help="forward passes timed per form")
    p.add_argument("--steps", type=int, default=10, help="fit steps per block")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf
    import ardir_tf
    from ardir_tf import teachers
    from step_speed import alternate
    from teacher_files import onnx_teacher, saved_model_teacher

    model = keras.models.load_model(args.teacher)
    shape = tuple(model.inputs[0].shape[1:])
    tmp = tempfile.mkdtemp()
    paths = {"keras": args.teacher,
             "saved_model": saved_model_teacher(model, os.path.join(tmp, "sm"), ["stage2"]),
             "onnx": onnx_teacher(model, os.path.join(tmp, "t.onnx"), ["stage2"])}
    forms = {k: teachers.load(v, ["stage2"], input_shape=shape) for k, v in paths.items()}
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((args.batch, *shape), dtype=np.float32))
    y = rng.integers(0, 10, args.batch).astype(np.int32)

    print(f"teacher {args.teacher}: {model.count_params()} parameters, batch {args.batch}")
    for name, teacher in forms.items():
        fn = tf.function(lambda z, t=teacher: t(z)["logits"])
        fn(x).numpy()
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn(x).numpy()
            times.append(time.perf_counter() - start)
        print(f"  forward alone, {name:12}: {statistics.median(times) * 1e3:.3f} ms median of "
              f"{args.calls} ({teacher.description})")

    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    distillers = {}
    for name, teacher in forms.items():
        keras.utils.set_random_seed(0)
        student = ardir_tf.models.build("small_cnn", shape, 10, width=16)
        d = ardir_tf.ARDIRDistiller(teacher=teacher, student=student,
                                    layers=[("stage2", "stage2")],
                                    attack=ardir_tf.attacks.PGD(eps=0.15, step_size=0.0375))
        d.compile(optimizer=keras.optimizers.Adam(1e-3))
        distillers[name] = d
    times = alternate(keras, distillers, data, 3, args.steps, args.rounds)
    base = statistics.median(times["keras"])
    for name in forms:
        median = statistics.median(times[name])
        print(f"  ARDIR step (PGD-10), {name:12}: {median * 1e3:.1f} ms median of "
              f"{len(times[name])}, {(median - base) * 1e3:+.1f} ms against the Keras teacher")


if __name__ == "__main__":
    main()
