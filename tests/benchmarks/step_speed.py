"""Times the distiller's training step as users run it (`fit`), and prints its speed.

    python tests/benchmarks/step_speed.py --arch small_cnn --input digits8 --method ard
    python tests/benchmarks/step_speed.py --arch resnet18 --input cifar32 --method ardir \\
        --steps_timed 3 --warmup 1
    python tests/benchmarks/step_speed.py --compare ard,ardir --steps_timed 10 --rounds 6
    python tests/benchmarks/step_speed.py --arch resnet18 --input cifar32 --method ardir \
        --compare_precision float32,mixed_bfloat16 --steps_timed 2 --rounds 3 --warmup 1 \
        --measure_ceiling
    python tests/benchmarks/step_speed.py --kernel_floor --arch small_cnn --input digits8
    python tests/benchmarks/step_speed.py --profile --arch small_cnn --input digits8

Random data (it measures time only; `--input` digits8, mnist28 or cifar32): a
teacher and a student of `--arch`, the ARD or ARDIR step with PGD-`--pgd_steps`
at `--batch`, SGD with momentum, through `ARDIRDistiller.fit`, one step per call. Prints images/s, the step time (median,
p10, p90 over the timed steps), the FLOPs of a step, the GFLOP/s that makes and
its share of `--ceiling_gflops`, the set-up (TensorFlow version, oneDNN kernels,
XLA, threads), and how much CPU other processes used while it timed (above ~0.2
cores the numbers are not valid: time on an idle machine). Asserts nothing.

FLOPs count 2 per multiply-add of the convolutions and dense layers (BatchNorm,
activations, pooling left out): a PGD step is a forward pass and a backward pass
to the input (2 forward-equivalents); the update is a forward pass and a full
backward pass (3) on x' and, with the clean CE term (alpha < 1), again on x; the
teacher runs one forward pass on x.

`--kernel_floor` answers "how fast could this step be with TensorFlow's own
kernels?": it times each convolution kernel the step runs (forward, gradient to
the input, gradient to the filter) alone, at the step's shapes, in a compiled
loop, and adds them up with the number of calls a step makes. That sum is a
lower bound on the step time (BatchNorm, activations, pooling, the optimizer and
the executor's own overhead are left out), and the images/s it allows is an
upper bound on what any change to the step's graph could reach.

`--precision` is the Keras policy the models are built under (float32,
mixed_bfloat16, mixed_float16, or auto: ardir_tf.precision.choose);
`--compare_precision float32,mixed_bfloat16` times the `--method` step under
each, in alternating blocks in one process, and prints each one's median and
GFLOP/s with its ratio to the first. `--measure_ceiling` then measures the
ceiling of each precision's kernels (float32 and bfloat16 matmul and
convolutions) and reports each step's share of its own precision's ceiling.

`--profile` runs the timed steps under TensorFlow's profiler and prints where
the step's op time goes, by op type (summed over the executor's threads;
the profiler itself slows the step by a third or so, so read the shares).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

INPUTS = {"digits8": (8, 8, 1), "mnist28": (28, 28, 1), "cifar32": (32, 32, 3)}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["small_cnn", "resnet18"], default="small_cnn")
    p.add_argument("--width", type=int, default=None,
                   help="student width (default: 32 for small_cnn, 64 for resnet18)")
    p.add_argument("--teacher_width", type=int, default=None, help="default: --width")
    p.add_argument("--input", choices=list(INPUTS), default="digits8")
    p.add_argument("--method", choices=["ard", "ardir"], default="ard")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pgd_steps", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--steps_timed", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps run before timing")
    p.add_argument("--threads", type=int, default=0,
                   help="TensorFlow intra- and inter-op threads (0: its default)")
    p.add_argument("--jit", action="store_true", help="compile the step with XLA")
    p.add_argument("--ceiling_gflops", type=float, default=210.0,
                   help="the machine's float32 arithmetic ceiling, GFLOP/s")
    p.add_argument("--compare", metavar="METHODS",
                   help="comma-separated methods (ard, ardir) timed in one process, in "
                        "alternating blocks of --steps_timed steps for --rounds rounds: "
                        "the fair way to compare two set-ups on a machine whose speed "
                        "drifts. Prints each one's median and its ratio to the first")
    p.add_argument("--rounds", type=int, default=5, help="alternations for --compare")
    p.add_argument("--precision", default="float32",
                   choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                   help="Keras dtype policy the models are built under")
    p.add_argument("--compare_precision", metavar="POLICIES",
                   help="comma-separated policies (e.g. float32,mixed_bfloat16) the --method "
                        "step is timed under, in alternating blocks like --compare")
    p.add_argument("--measure_ceiling", action="store_true",
                   help="measure the ceiling here first (the best of a 2048 matmul and "
                        "ResNet-18's 3x3 convolutions at batch 128) and use it")
    p.add_argument("--kernel_floor", action="store_true",
                   help="time each convolution kernel of the step alone and print their "
                        "sum: a lower bound on the step time (see the module docstring)")
    p.add_argument("--profile", action="store_true",
                   help="run the timed steps under tf.profiler and print the op time per "
                        "step by op type")
    return p.parse_args()


def forward_flops(model):
    """FLOPs of one forward pass of one image: convolutions and dense layers."""
    import keras
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += forward_flops(layer)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            total += 2 * _size(layer.output.shape) * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            total += 2 * _size(layer.output.shape) * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return total


def _size(shape):
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def step_flops(student, teacher, pgd_steps, alpha, batch):
    update = 6 if alpha < 1 else 3  # forward + full backward on x', and on x for alpha < 1
    return batch * (forward_flops(student) * (2 * pgd_steps + update) + forward_flops(teacher))


def measure_ceiling(tf, dtype="float32"):
    """GFLOP/s of the fastest of a few large `dtype` kernels on this machine: a
    2048 x 2048 matmul and 3x3 convolutions of ResNet-18's stages at batch 128
    (median of 5 timed calls each, after one warm-up)."""
    def rate(fn, flops):
        fn().numpy()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn().numpy()
            times.append(time.perf_counter() - start)
        return flops / statistics.median(times) / 1e9

    a = tf.cast(tf.random.normal([2048, 2048]), dtype)
    best = {"matmul 2048": rate(tf.function(lambda: tf.reduce_sum(tf.matmul(a, a))),
                                2 * 2048 ** 3)}
    for hw, c in ((32, 64), (16, 128), (8, 256)):
        x = tf.cast(tf.random.normal([128, hw, hw, c]), dtype)
        k = tf.cast(tf.random.normal([3, 3, c, c]), dtype)
        conv = tf.function(lambda x=x, k=k: tf.reduce_sum(tf.nn.conv2d(x, k, 1, "SAME")))
        best[f"conv3x3 {hw}x{hw}x{c}"] = rate(conv, 2 * 128 * hw * hw * c * c * 9)
    return best


def conv_calls(model, pgd_steps, alpha, teacher):
    """[(layer, input shape, kernel, calls per step by kernel)] for every Conv2D
    of `model` (nested models included), in the step's accounting: a teacher
    runs forward once; a student forward and back to the input per PGD step,
    then forward, back to the input and to the filter once per training pass
    (two when alpha < 1). The first convolution reads the pixels, so a training
    pass needs no gradient to its input (TensorFlow prunes it)."""
    import keras
    passes = 2 if alpha < 1 else 1
    convs = []

    def walk(m):
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                walk(layer)
            elif (isinstance(layer, keras.layers.Conv2D)
                  and not isinstance(layer, keras.layers.DepthwiseConv2D)):
                convs.append(layer)
    walk(model)
    out = []
    for i, layer in enumerate(convs):
        if teacher:
            calls = {"forward": 1}
        else:
            calls = {"forward": pgd_steps + passes,
                     "input_grad": pgd_steps + (passes if i else 0),
                     "filter_grad": passes}
        out.append((layer, tuple(layer.input.shape[1:]), layer.kernel.shape, calls))
    return out


def time_kernel(tf, kind, batch, in_shape, kernel_shape, strides, padding, out_shape):
    """Seconds per call of one convolution kernel, alone: repeated calls in a
    compiled while loop (each feeding a scalar accumulator, so none is pruned),
    as many as take about 0.1 s, median of 5 timed runs after a warm-up."""
    x = tf.random.uniform([batch, *in_shape])
    k = tf.random.normal(kernel_shape) * 0.1
    g = tf.random.normal([batch, *out_shape])
    s = [1, *strides, 1]
    padding = padding.upper()
    ops = {
        "forward": lambda: tf.nn.conv2d(x, k, s, padding),
        "input_grad": lambda: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=[batch, *in_shape], filter=k, out_backprop=g, strides=s,
            padding=padding),
        "filter_grad": lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=list(kernel_shape), out_backprop=g, strides=s,
            padding=padding),
    }
    op = ops[kind]

    @tf.function(autograph=False)
    def run(reps):
        def body(i, acc):
            return i + 1, acc + tf.reshape(op(), [-1])[0]
        return tf.while_loop(lambda i, _: i < reps, body,
                             (tf.constant(0), tf.constant(0.0)))[1]

    def once(reps):
        start = time.perf_counter()
        run(tf.constant(reps)).numpy()
        return time.perf_counter() - start

    once(2)
    reps = max(1, min(100, round(0.1 / once(1))))
    return statistics.median(once(reps) for _ in range(5)) / reps


def kernel_floor(tf, args, student, teacher):
    """Prints each convolution kernel's time alone and the step's floor."""
    rows, cache = [], {}
    for model, role in ((student, "student"), (teacher, "teacher")):
        for layer, in_shape, kernel, calls in conv_calls(model, args.pgd_steps, args.alpha,
                                                         role == "teacher"):
            out_shape = tuple(layer.output.shape[1:])
            flops = 2 * args.batch * _size((None, *out_shape)) * kernel[0] * kernel[1] * kernel[2]
            for kind, n in calls.items():
                key = (kind, in_shape, tuple(kernel), layer.strides, layer.padding)
                if key not in cache:
                    cache[key] = time_kernel(tf, kind, args.batch, in_shape, kernel,
                                             layer.strides, layer.padding, out_shape)
                rows.append((role, layer.name, kind, in_shape, tuple(kernel), n, cache[key],
                             flops))
    print(f"{'model':8} {'layer':12} {'kernel':12} {'input':>13} {'filter':>16} "
          f"{'calls':>5} {'us/call':>8} {'GFLOP/s':>8} {'ms/step':>8}")
    total = 0.0
    for role, name, kind, in_shape, kernel, n, sec, flops in rows:
        total += n * sec
        print(f"{role:8} {name:12} {kind:12} {'x'.join(map(str, in_shape)):>13} "
              f"{'x'.join(map(str, kernel)):>16} {n:5d} {sec * 1e6:8.1f} "
              f"{flops / sec / 1e9:8.1f} {n * sec * 1e3:8.2f}")
    print(f"kernel floor: {total * 1e3:.1f} ms/step = at most {args.batch / total:.0f} img/s "
          f"(convolution kernels alone, at batch {args.batch}, PGD-{args.pgd_steps}, "
          f"alpha {args.alpha:g})")
    return total


def profile(tf, distiller, data, args):
    """The op time of `args.steps_timed` fit steps by op type, from tf.profiler's
    trace (the XPlane protobuf it writes; no TensorBoard plugin needed)."""
    import collections
    import glob
    import tempfile
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    distiller.fit(data, epochs=1, steps_per_epoch=max(args.warmup, 1), verbose=0)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        distiller.fit(data, epochs=1, steps_per_epoch=args.steps_timed, verbose=0)
        wall = (time.perf_counter() - start) / args.steps_timed
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    by_type, calls = collections.Counter(), collections.Counter()
    for line in plane.lines:
        if not line.name.startswith("tf_Compute"):  # the executor's op threads
            continue
        for event in line.events:
            name = plane.event_metadata[event.metadata_id].name
            if ":" not in name or name.startswith("ExecutorState"):
                continue  # the executor's own spans, which contain the ops
            where = "PGD loop" if "/while/body" in name else "update"
            key = (where, name.rsplit(":", 1)[1] + (" (gradient)" if "gradient_tape" in name
                                                    else ""))
            by_type[key] += event.duration_ps / 1e9 / args.steps_timed
            calls[key] += 1 / args.steps_timed
    total = sum(by_type.values())
    conv = sum(v for (_, op), v in by_type.items() if "Conv2D" in op)
    print(f"profiled step: {wall * 1e3:.1f} ms wall; op time {total:.1f} ms per step, of "
          f"which convolutions {conv:.1f} ms ({conv / total:.0%}) and the rest "
          f"{total - conv:.1f} ms ({(total - conv) / total:.0%})")
    print(f"{'where':9} {'op':48} {'calls':>6} {'ms/step':>8} {'share':>6}")
    for (where, op), ms in by_type.most_common(25):
        print(f"{where:9} {op:48} {calls[(where, op)]:6.0f} {ms:8.2f} {ms / total:6.1%}")


def cpu_snapshot():
    """(wall seconds, system-wide busy CPU seconds, this process's CPU seconds)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def onednn_state():
    """Whether TensorFlow runs its oneDNN kernels here, and why."""
    flag = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if flag is not None:
        return f"{'on' if flag not in ('0', 'false', 'False') else 'off'} (TF_ENABLE_ONEDNN_OPTS={flag})"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    # TF 2.21 turns them on by default on x86 CPUs with AVX512-VNNI or AMX.
    on = "avx512_vnni" in flags or "amx" in flags
    return f"{'on' if on else 'off'} (TensorFlow's default for this CPU)"


def build_distiller(ardir_tf, keras, args, method, shape, policy=None):
    width = args.width or (32 if args.arch == "small_cnn" else 64)
    teacher_width = args.teacher_width or width
    keras.utils.set_random_seed(0)
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(
        ardir_tf.precision.choose(policy or args.precision)[0])
    try:
        teacher = ardir_tf.models.build(args.arch, shape, 10, width=teacher_width)
        student = ardir_tf.models.build(args.arch, shape, 10, width=width)
    finally:
        keras.mixed_precision.set_global_policy(before)
    stages = ardir_tf.models.stage_names(student)
    layers = [ardir_tf.LayerPair(s, s) for s in stages] if method == "ardir" else []
    eps = 8 / 255
    distiller = ardir_tf.ARDIRDistiller(
        teacher=teacher, student=student, layers=layers, method=method,
        alpha=args.alpha, attack=ardir_tf.attacks.PGD(eps=eps, step_size=eps / 4,
                                                       steps=args.pgd_steps))
    distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=args.jit)
    return distiller


def alternate(keras, trainers, data, warmup, steps, rounds):
    """{name: [seconds of each step]} of `fit` on each trainer, in `rounds`
    alternating blocks of `steps` steps (after `warmup` steps each), so that the
    machine's drift falls on every set-up alike."""
    times = {name: [] for name in trainers}

    class Clock(keras.callbacks.Callback):
        def __init__(self, sink):
            super().__init__()
            self.sink = sink

        def on_train_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # the step is done when its loss is read
            self.sink.append(time.perf_counter() - self.t)

    for trainer in trainers.values():  # trace and warm up
        trainer.fit(data, epochs=1, steps_per_epoch=max(warmup, 1), verbose=0)
    for _ in range(rounds):
        for name, trainer in trainers.items():
            trainer.fit(data, epochs=1, steps_per_epoch=steps, callbacks=[Clock(times[name])],
                        verbose=0)
    return times


def compare(args, ardir_tf, keras, data, shape):
    """Each method's step timed in alternating blocks in this one process."""
    methods = [m.strip() for m in args.compare.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("ard", "ardir")]
    if len(methods) < 2 or bad:
        raise SystemExit(f"--compare takes two or more of ard, ardir; got {args.compare!r}")
    distillers = {m: build_distiller(ardir_tf, keras, args, m, shape) for m in methods}
    times = alternate(keras, distillers, data, args.warmup, args.steps_timed, args.rounds)
    first = statistics.median(times[methods[0]])
    for m in methods:
        median = statistics.median(times[m])
        print(f"{m}: step {median * 1e3:.1f} ms median of {len(times[m])} "
              f"({args.rounds} alternating blocks), {args.batch / median:.0f} img/s, "
              f"{median / first:.3f}x the {methods[0]} step")


def kernel_dtype(ardir_tf, policy):
    """The dtype of the kernels a step under `policy` runs (auto resolved here)."""
    return "bfloat16" if "bfloat16" in ardir_tf.precision.choose(policy)[0] else "float32"


def compare_precision(args, ardir_tf, keras, data, shape, ceilings):
    """The --method step under each policy, timed in alternating blocks."""
    policies = [p.strip() for p in args.compare_precision.split(",") if p.strip()]
    if len(policies) < 2:
        raise SystemExit("--compare_precision takes two or more policies")
    distillers = {p: build_distiller(ardir_tf, keras, args, args.method, shape, p)
                  for p in policies}
    times = alternate(keras, distillers, data, args.warmup, args.steps_timed, args.rounds)
    d = distillers[policies[0]]
    flops = step_flops(d.student, d.teacher, args.pgd_steps, args.alpha, args.batch)
    first = statistics.median(times[policies[0]])
    for p in policies:
        median = statistics.median(times[p])
        gflops = flops / median / 1e9
        ceiling = ceilings.get(kernel_dtype(ardir_tf, p))
        share = f", {gflops / ceiling:.0%} of its {ceiling:.0f} GFLOP/s ceiling" \
            if ceiling else ""
        print(f"{p}: {args.arch} {args.input} {args.method} step {median * 1e3:.1f} ms median "
              f"of {len(times[p])} ({args.rounds} alternating blocks), "
              f"{args.batch / median:.1f} img/s, {gflops:.1f} GFLOP/s{share}; "
              f"{first / median:.2f}x the {policies[0]} step's speed")


def main():
    args = parse()
    import keras
    import numpy as np
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import ardir_tf

    ceilings = {}
    if args.measure_ceiling:
        policies = [args.precision, *(args.compare_precision or "").split(",")]
        dtypes = {"float32"} | {kernel_dtype(ardir_tf, p.strip()) for p in policies if p.strip()}
        for dtype in sorted(dtypes, reverse=True):  # float32 first
            kernels = measure_ceiling(tf, dtype)
            ceilings[dtype] = round(max(kernels.values()), 1)
            print(f"ceiling ({dtype}): " + ", ".join(f"{k} {v:.0f}" for k, v in kernels.items())
                  + f" GFLOP/s; using {ceilings[dtype]}")
        args.ceiling_gflops = ceilings[kernel_dtype(ardir_tf, args.precision)]

    shape = INPUTS[args.input]
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, *shape), dtype=np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    if args.compare:
        return compare(args, ardir_tf, keras, data, shape)
    if args.compare_precision:
        return compare_precision(args, ardir_tf, keras, data, shape, ceilings)
    distiller = build_distiller(ardir_tf, keras, args, args.method, shape)
    student, teacher = distiller.student, distiller.teacher
    if args.kernel_floor:
        return kernel_floor(tf, args, student, teacher)
    if args.profile:
        return profile(tf, distiller, data, args)

    times, marks = [], {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == args.warmup:
                marks["start"] = cpu_snapshot()
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch >= args.warmup:
                float(logs["loss"])  # the step is done when its loss is read
                times.append(time.perf_counter() - self.t)
            if batch == args.warmup + args.steps_timed - 1:
                marks["end"] = cpu_snapshot()

    distiller.fit(data, epochs=1, steps_per_epoch=args.warmup + args.steps_timed,
                  callbacks=[Clock()], shuffle=False, verbose=0)
    (w0, busy0, own0), (w1, busy1, own1) = marks["start"], marks["end"]
    wall = w1 - w0
    median = statistics.median(times)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [median] * 9
    flops = step_flops(student, teacher, args.pgd_steps, args.alpha, args.batch)
    gflops = flops / median / 1e9
    result = {
        "arch": args.arch, "input": args.input, "method": args.method, "batch": args.batch,
        "precision": ardir_tf.precision.choose(args.precision)[0],
        "pgd_steps": args.pgd_steps, "student_params": student.count_params(),
        "teacher_params": teacher.count_params(), "images_per_s": round(args.batch / median, 2),
        "median_step_s": round(median, 4), "p10_step_s": round(q[0], 4),
        "p90_step_s": round(q[-1], 4), "steps_timed": len(times),
        "step_gflop": round(flops / 1e9, 3), "gflops_achieved": round(gflops, 1),
        "share_of_ceiling": round(gflops / args.ceiling_gflops, 3),
        "ceiling_gflops": args.ceiling_gflops,
        "own_cpu_cores": round((own1 - own0) / wall, 2),
        "foreign_cpu_cores": round(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall, 2),
        "tensorflow": tf.__version__, "keras": keras.__version__, "onednn": onednn_state(),
        "xla": bool(args.jit), "threads": args.threads or "default",
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }
    print(f"{args.arch} {args.input} {args.method}, batch {args.batch}, PGD-{args.pgd_steps}: "
          f"{result['images_per_s']} img/s, step {median * 1e3:.1f} ms (p10 {q[0] * 1e3:.1f}, "
          f"p90 {q[-1] * 1e3:.1f}), {result['step_gflop']} GFLOP/step, {gflops:.1f} GFLOP/s = "
          f"{result['share_of_ceiling']:.0%} of {args.ceiling_gflops:g}; oneDNN "
          f"{result['onednn']}, XLA {'on' if args.jit else 'off'}; other processes used "
          f"{result['foreign_cpu_cores']} cores")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
