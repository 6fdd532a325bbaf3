"""ardir_tf from the command line.

    python main.py --mode=distill                     # digits: natural, teacher, ARDIR student
    python main.py --mode=train_teacher --flagfile=flags/cifar10.cfg
    python main.py --mode=evaluate --workdir=runs/distill-digits-ardir
    python main.py --mode=export --workdir=runs/distill-digits-ardir
    python main.py --mode=serve --workdir=runs/distill-digits-ardir
    python main.py --mode=study --study_methods=pgd_at,ard,rslad,ardir --study_seeds=3

Reads as the run goes: strategy -> data -> models -> trainer -> fit -> evaluate
-> export. The work is in ardir_tf; this file turns flags into its arguments.
"""

import functools
import os
import platform
import re
import shutil
import sys
import tempfile


def default_environment(environ, machine):
    """The TensorFlow settings a command-line run gets unless the user set them
    (they must be in the environment before TensorFlow is imported).

    - TF_CPP_MIN_LOG_LEVEL=3: TensorFlow's C++ start-up lines (CUDA probing on a
      CPU machine, oneDNN notes) are noise on a command line. TF 2.21 prints
      some before its log settings apply, so the import also runs with the
      C-level stderr pointed at /dev/null; Python exceptions still surface.
      TF_CPP_MIN_LOG_LEVEL=0 shows everything.
    - TF_ENABLE_ONEDNN_OPTS=1 on x86-64: TF 2.21 turns its oneDNN CPU kernels on
      by default only on CPUs with AVX512-VNNI or AMX. Measured
      (docs/results/step_speed.md): with them the small digits step is 1.65x faster
      on an AVX512 EPYC, and on an AVX2-only EPYC the ResNet-18 ARDIR step
      1.9x faster (69.6 s -> 36.8 s) and the small step 1.1x. A user's own
      setting (0 included) is kept. The library itself never sets it.
    """
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if machine.lower() in ("x86_64", "amd64"):
        environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


default_environment(os.environ, platform.machine())


def _import_tensorflow_quietly():
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] < "2":
        import tensorflow  # noqa: F401
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def asks_for_help(argv):
    """Whether absl will print help for `argv` (--help, --helpfull=true, -?, ...,
    before a "--"). Help prints while absl parses the command line, before any
    validator runs, and defining the flags imports no TensorFlow: help is at
    once. (One given inside a --flagfile is missed: it prints after the import.)"""
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    return any(re.fullmatch(r"--?(help|helpshort|helpfull|helpxml)(=(true|1))?|-\?", a)
               for a in args)


if not asks_for_help(sys.argv):
    _import_tensorflow_quietly()

from absl import app  # noqa: E402
from absl import logging  # noqa: E402

from absl import flags as absl_flags  # noqa: E402

import flags as cli  # noqa: E402

cli.define_flags()
absl_flags.adopt_module_key_flags(cli)  # --help lists ours, not only main's
FLAGS = cli.FLAGS


# False on the workers of a cluster other than the chief: they train in
# lockstep with it but write no files (main() sets it from the strategy).
CHIEF = True


def say(message):
    print(message, flush=True)


def fail(message):
    """One line on stderr, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# --- models -----------------------------------------------------------------

def build(arch, width, depth, data):
    from ardir_tf import models
    kwargs = {"small_cnn": dict(width=width), "resnet18": dict(width=width),
              "preact_resnet18": dict(width=width), "wide_resnet": dict(depth=depth, width=width),
              "mobilenet_v2": {}}[arch]
    return models.build(arch, data.input_shape, data.num_classes,
                        sync_batchnorm=FLAGS.sync_batchnorm and replicas() > 1, **kwargs)


def replicas():
    import tensorflow as tf
    return tf.distribute.get_strategy().num_replicas_in_sync


def build_student(data):
    return build(FLAGS.student_arch, FLAGS.student_width, FLAGS.student_depth, data)


@functools.cache
def load_model(path, flag=None):
    """A .keras model, loaded once per process (validation and the run share it).
    `flag` names the flag it came from, for the error message."""
    import keras
    try:
        return keras.models.load_model(path)
    except Exception as err:  # Keras raises many kinds for a bad file
        fail(f"{flag + '=' if flag else ''}{path}: cannot load it as a Keras model: "
             f"{str(err).splitlines()[0]}")


# What a run builds, built once: validation builds the teacher, the student and
# the distiller, and the phases train those same objects.
BUILT = {}


def once(role, make):
    if role not in BUILT:
        BUILT[role] = make()
    return BUILT[role]


def teacher_network(workdir, data):
    """The teacher: --teacher, the workdir's finished teacher.keras, or a new one
    for the teacher phase to train (in place: the distiller built on it then
    distils the trained teacher)."""
    if FLAGS.teacher:
        return given_teacher(data)
    if workdir.exists("teacher.keras") and resumes(workdir):
        return load_model(workdir.path("teacher.keras"))
    return once("teacher", lambda: build(FLAGS.teacher_arch, FLAGS.teacher_width,
                                         FLAGS.teacher_depth, data))


def layer_sets():
    """The --layers pairs of each distillation the run does that reads
    representations: the student's (distill), or each ARDIR method's (study)."""
    if FLAGS.mode == "study":
        return [pairs for m in cli.study_methods() if (pairs := study_layers(m))]
    if FLAGS.method == "ardir" and FLAGS.ir_weight > 0:
        return [cli.layer_pairs()]
    return []


def teacher_layers():
    """The teacher's side of the layer pairs (for a SavedModel or ONNX teacher)."""
    return list(dict.fromkeys(t for pairs in layer_sets() for _, t in pairs))


def given_teacher(data, **changes):
    """--teacher: a .keras file as the Keras model, a SavedModel directory or an
    .onnx file as an ardir_tf.teachers.Teacher returning the --layers' teacher
    outputs (`changes` override the --teacher_* options, for the check's
    diagnosis)."""
    if FLAGS.teacher.endswith(".keras"):
        if cli.teacher_options() != cli.teacher_options(defaults=True):
            fail("--teacher_layout, --teacher_input_scale, --teacher_mean, --teacher_std "
                 "and --teacher_outputs are for a SavedModel or ONNX --teacher; a .keras "
                 "model takes our [0, 1] NHWC pixels as built and must return logits")
        return load_model(FLAGS.teacher, "--teacher")
    from ardir_tf import teachers
    def make():
        teacher = teachers.load(FLAGS.teacher, teacher_layers(), input_shape=data.input_shape,
                                **{**cli.teacher_options(), **changes})
        if teacher.kind == "saved_model" and not changes:
            say(f"[teacher] {FLAGS.teacher} is a SavedModel: calling it runs its own graph, "
                "which can read and write files; load only teacher files you trust")
        return teacher
    if changes:
        return make()
    try:
        return once("given_teacher", make)
    except teachers.TeacherError as err:
        fail(f"--teacher: {err}")


def teacher_io(teacher):
    """(input shape, logits shape) of a Keras model or a teachers.Teacher."""
    from ardir_tf import teachers
    if isinstance(teacher, teachers.Teacher):
        return teacher.input_shape, (teacher.num_classes,)
    return tuple(teacher.inputs[0].shape[1:]), tuple(teacher.outputs[0].shape[1:])


# How many test images the check of a given teacher scores it on.
TEACHER_CHECK_EXAMPLES = 1000


def check_given_teacher(teacher, data):
    """Before any training: the given teacher's clean accuracy on up to 1,000
    test images; near chance level the run stops, naming the likely cause."""
    from ardir_tf import evaluate, teachers
    x, y = evaluate.collect(data.test, TEACHER_CHECK_EXAMPLES)
    retry = None
    if isinstance(teacher, (teachers.SavedModelTeacher, teachers.OnnxTeacher)):
        def retry(**changes):
            return given_teacher(data, **changes)
    checked = teachers.as_teacher(teacher)
    try:
        report = teachers.check(checked, x, y, data.num_classes, retry=retry)
    except teachers.TeacherError as err:
        fail(f"--teacher={FLAGS.teacher}: {err}")
    say(f"[teacher] checked {checked.description}: "
        f"clean accuracy {report['clean_accuracy']:.4f} on {report['n_examples']} test images")
    BUILT["teacher_check"] = report


def resumes(workdir):
    """Whether `workdir` holds this very run (so its finished models are ours).
    Validation runs before the workdir is claimed: another run's teacher.keras,
    which --overwrite is about to delete, is never this run's teacher."""
    from ardir_tf.workdir import Workdir
    try:
        return workdir.read_json(Workdir.SETTINGS) == cli.settings()
    except ValueError:
        return False


def check_models(workdir, data):
    """Fails fast, before any training, on models that cannot work together:
    --layers naming layers the models lack, a --teacher for other data, shapes
    no adapter can bridge. Builds the teacher, the student and the distiller
    that the run then trains (nothing is built twice)."""
    import keras
    from ardir_tf import models
    if FLAGS.mode not in ("distill", "study"):
        return
    # The student first: its initial weights then do not depend on whether the
    # teacher is built (a fresh run) or loaded (a resumed one).
    student = once("student", lambda: build_student(data))
    teacher = teacher_network(workdir, data)
    t_in, t_out = teacher_io(teacher)
    if t_in != tuple(data.input_shape) or t_out != (data.num_classes,):
        fail(f"--teacher takes {t_in} and gives {t_out}, but {data.name} has "
             f"{tuple(data.input_shape)} images and {data.num_classes} classes")
    for pairs in layer_sets():
        checked = [("student", student, [s for s, _ in pairs])]
        if isinstance(teacher, keras.Model):  # a file teacher's outputs are checked at load
            checked.append(("teacher", teacher, [t for _, t in pairs]))
        for role, model, names in checked:
            try:
                models.expose(model, names)  # a view of the built model: no new weights
            except ValueError as err:
                fail(f"--layers: {role} {err}")
    from ardir_tf import teachers
    if FLAGS.jit_compile and isinstance(teacher, teachers.OnnxTeacher):
        fail("--jit_compile cannot compile a step that runs an ONNX --teacher (ONNX Runtime "
             "runs outside the graph); drop it, or give the teacher as a SavedModel")
    if FLAGS.teacher and FLAGS.check_teacher:
        check_given_teacher(teacher, data)
    try:
        if FLAGS.mode == "distill":
            student_trainable(data, teacher)
        else:  # each study method's trainer, built on a throwaway student
            for method in cli.study_methods():
                cell_trainable(method, data, teacher, student=build_student(data))
    except ValueError as err:
        fail(str(err))


# --- trainers and phases ----------------------------------------------------

def attack(steps):
    from ardir_tf import attacks
    step = FLAGS.step_size or FLAGS.eps / 4
    return attacks.PGD(eps=FLAGS.eps, step_size=step if FLAGS.eps else 1.0, steps=steps,
                       norm=FLAGS.norm, random_start=FLAGS.random_start)


def optimizer(data, epochs):
    from ardir_tf import training
    return training.optimizer(
        FLAGS.optimizer, FLAGS.lr, FLAGS.momentum, FLAGS.weight_decay, FLAGS.schedule,
        epochs, training.steps_per_epoch(data.num_train, FLAGS.batch_size, data.train),
        [round(float(f) * epochs) for f in FLAGS.decay_at], FLAGS.decay_factor)


def phase(workdir, name, data, epochs, make_trainable, label=None):
    """Trains one phase, or reuses its finished model. Returns the model.
    `label` prefixes its log lines (default: the phase's name)."""
    from ardir_tf import training
    label = label or name
    if workdir.exists(f"{name}.keras"):
        say(f"[{label}] reusing {workdir.path(name + '.keras')}")
        return load_model(workdir.path(f"{name}.keras"))
    done = training.resumable_epoch(workdir, name)
    say(f"[{label}] resuming after epoch {done} of {epochs}" if done else
        f"[{label}] training for {epochs} epochs")
    trainable = make_trainable()
    model = trainable.network
    trainable.compile(optimizer=optimizer(data, epochs), jit_compile=FLAGS.jit_compile)
    training.fit_phase(trainable, data.train, epochs, workdir, name, verbose=FLAGS.verbose,
                       chief=CHIEF, log=lambda message: say(f"[{label}] {message}"))
    if CHIEF:
        say(f"[{label}] saved {workdir.finish_phase(model, name)}")
    else:  # the same save into a throwaway file: see training.EpochBackup
        with tempfile.TemporaryDirectory() as tmp:
            model.save(os.path.join(tmp, f"{name}.keras"))
    return model


def natural_trainable(data):
    """The natural baseline: the student's architecture, CE on clean inputs, on
    the same machinery as the robust phases (so it runs under every strategy)."""
    from ardir_tf import AdversarialTrainer
    model = build_student(data)
    return AdversarialTrainer(model, attack=attack(FLAGS.steps), method="natural")


def teacher_trainable(model):
    from ardir_tf import AdversarialTrainer
    return AdversarialTrainer(model, attack=attack(FLAGS.steps), method=FLAGS.teacher_method,
                              beta=FLAGS.trades_beta, bn_statistics=FLAGS.bn_statistics)


def distiller(teacher, student, method, **changes):
    """An ARDIRDistiller of `method` with the command's settings, `changes`
    (the study knobs: distiller arguments) overriding them."""
    from ardir_tf import ARDIRDistiller, LayerPair
    kwargs = dict(attack_objective=FLAGS.attack_objective, alpha=FLAGS.alpha,
                  temperature=FLAGS.temperature, ir_weight=FLAGS.ir_weight,
                  distance=FLAGS.distance, ir_teacher_input=FLAGS.ir_teacher_input,
                  ir_student_input=FLAGS.ir_student_input,
                  kd_teacher_input=FLAGS.kd_teacher_input,
                  bn_statistics=FLAGS.bn_statistics)
    kwargs.update(changes)
    pairs = kwargs.pop("layers", None) or cli.layer_pairs()
    if method == "rslad":
        kwargs.pop("kd_teacher_input")
    if method != "ardir":
        pairs = []
        for name in ("ir_weight", "distance", "ir_teacher_input", "ir_student_input"):
            kwargs.pop(name)
    return ARDIRDistiller(teacher=teacher, student=student,
                          layers=[LayerPair(student=s, teacher=t) for s, t in pairs],
                          attack=attack(FLAGS.steps), method=method, **kwargs)


def student_trainable(data, teacher):
    """The distiller of `teacher` (built once)."""
    def make():
        return distiller(teacher, once("student", lambda: build_student(data)), FLAGS.method)
    return once(("distiller", id(teacher)), make)


def study_layers(method):
    """The layer pairs a study method's IR term reads ([] for none)."""
    options = method.kwargs
    if method.base != "ardir" or options.get("ir_weight", FLAGS.ir_weight) == 0:
        return []
    return list(options.get("layers") or cli.layer_pairs())


def cell_trainable(method, data, teacher, student=None):
    """The trainer of one study cell: `method` (a study.Method) on a new
    student (or `student`)."""
    from ardir_tf import AdversarialTrainer
    student = build_student(data) if student is None else student
    options = {k: v for k, v in method.kwargs.items() if k != "precision"}  # set by train
    if method.base in ("natural", "pgd_at", "trades"):
        return AdversarialTrainer(student, attack=attack(FLAGS.steps), method=method.base,
                                  beta=options.get("beta", FLAGS.trades_beta),
                                  bn_statistics=options.get("bn_statistics",
                                                            FLAGS.bn_statistics))
    return distiller(teacher, student, method.base, **options)


def teacher_model(workdir, data):
    if FLAGS.teacher:
        if FLAGS.mode == "train_teacher" and not FLAGS.teacher.endswith(".keras"):
            fail("--mode=train_teacher evaluates a --teacher given as .keras only; distil "
                 "from a SavedModel or ONNX teacher with --mode=distill")
        say(f"[teacher] loading {FLAGS.teacher}")
        teacher = given_teacher(data)
        if not FLAGS.teacher.endswith(".keras"):
            say(f"[teacher] {teacher.description}")  # the runtime and provider it runs on
        return teacher
    return phase(workdir, "teacher", data, FLAGS.teacher_epochs,
                 lambda: teacher_trainable(teacher_network(workdir, data)))


# --- evaluation -------------------------------------------------------------

def evaluate_and_report(workdir, data, trained):
    from ardir_tf import evaluate, report
    attacks = evaluate.suite(FLAGS.attacks, FLAGS.eps, FLAGS.norm, steps=FLAGS.eval_steps,
                             step_size=FLAGS.step_size)
    from ardir_tf import teachers
    reports, unattacked = {}, {}
    for name, model in trained.items():
        if isinstance(model, teachers.Teacher) and not model.differentiable:
            # ONNX Runtime gives no input gradients, so no gradient attack can
            # run on it: its entry is its clean accuracy on the same examples.
            x, y = evaluate.collect(data.test, FLAGS.eval_examples or None)
            unattacked[name] = dict(
                clean_accuracy=teachers.accuracy(model, x, y)[0], n_examples=int(len(y)),
                robust_accuracy={}, worst_case_accuracy=None, teacher=model.description,
                not_attacked="an ONNX teacher runs on ONNX Runtime, which computes no "
                             "input gradients; evaluate it where it was trained")
            say(f"[evaluate] {name}: clean accuracy {unattacked[name]['clean_accuracy']:.4f}; "
                f"not attacked ({unattacked[name]['not_attacked']})")
            continue
        say(f"[evaluate] {name}: {', '.join(attacks)} at {FLAGS.norm} eps {FLAGS.eps:.4g}, "
            "then the sanity checks")
        reports[name] = evaluate_model(model, data)
    if not CHIEF:
        return
    metrics = workdir.read_json("metrics.json", {})
    evaluation = cli.evaluation()
    cell = None  # a study cell's cell.json, when its student's evaluation is replaced
    for name, result in reports.items():
        stored = metrics.get(name)
        if stored and (stored["eps"], stored["norm"]) != (result["eps"], result["norm"]):
            # Another threat model: kept beside the run's own numbers, not over them.
            name = f"{name}@{result['norm']}-{result['eps']:g}"
        elif stored:
            cell = replaced_evaluation(workdir, name, stored, evaluation) or cell
        metrics[name] = dict(result, evaluation=evaluation)
    for name, entry in unattacked.items():
        metrics[name] = entry
    if FLAGS.teacher and "teacher" in metrics and "teacher_check" in BUILT:
        metrics["teacher"]["pre_training_check"] = BUILT["teacher_check"]
    if cell is not None:  # unfinished for the study until the new numbers are written
        workdir.write_json("cell.json", {k: v for k, v in cell.items() if k != "evaluation"})
    workdir.write_json("metrics.json", metrics)
    if cell is not None:
        workdir.write_json("cell.json", dict(cell, evaluation=evaluation))
    plot = report.plot_eps(reports, workdir.path(f"robustness-{FLAGS.norm}-{FLAGS.eps:g}.png"))
    say("\n" + report.format_table(reports))
    say(f"\nwrote {workdir.path('metrics.json')} and {plot}")
    for line in report.verdicts(reports):  # last, where a run's reader looks
        say(line)


def replaced_evaluation(workdir, name, stored, evaluation):
    """Says when a model's evaluation is replaced by one with other settings.
    Returns a study cell's cell.json when it is its student's: the caller then
    records the new evaluation there (around writing metrics.json), so that the
    study evaluates the cell again as its other cells instead of mixing this one
    into its table."""
    cell = workdir.read_json("cell.json", {}) if name == "student" else {}
    before = cell.get("evaluation") or stored.get("evaluation")
    if not before or before == evaluation:
        return None
    before = {"scoring": 1, **before}  # recorded before evaluations named their scoring

    def change(key):
        if key in cli.EVALUATION_FLAGS:
            return f"--{cli.EVALUATION_FLAGS[key]} {before.get(key)} -> {evaluation[key]}"
        return f"{key} {before.get(key)} -> {evaluation[key]} (what the worst case counts)"
    changed = ", ".join(change(k) for k in evaluation if before.get(k) != evaluation[k])
    say(f"[evaluate] {name}: replaces an evaluation made otherwise ({changed})"
        + ("; the study will evaluate this cell again" if cell else ""))
    return cell or None


# --- modes ------------------------------------------------------------------

def recorded_evaluation(workdir):
    """The settings of the run's last evaluation: a study cell's cell.json (the
    study's evaluation), else the student's (or another model's) report."""
    cell = workdir.read_json("cell.json", {}).get("evaluation")
    if cell:
        return cell
    metrics = workdir.read_json("metrics.json", {})
    return next((metrics[n]["evaluation"] for n in ("student", "teacher", "natural")
                 if "evaluation" in metrics.get(n, {})), None)


def evaluate_model(model, data, resume_dir=None):
    """The evaluation the flags ask for (every model of a run, every cell of a
    study: the same attacks, seed and images); `resume_dir` keeps its finished
    steps (a study cell's)."""
    from ardir_tf import evaluate
    return evaluate.evaluate(
        model, data.test, FLAGS.eps, FLAGS.norm,
        evaluate.suite(FLAGS.attacks, FLAGS.eps, FLAGS.norm, steps=FLAGS.eval_steps,
                       step_size=FLAGS.step_size),
        n_examples=FLAGS.eval_examples or None, sequential=FLAGS.sequential_attacks,
        sanity_examples=FLAGS.sanity_examples, seed=FLAGS.seed,
        verify=FLAGS.verify_unreliable, resume_dir=resume_dir,
        verbose=int(FLAGS.verbose == 1))


def study(workdir, data):
    """--mode=study: the teacher once (in the study's workdir, or --teacher),
    then --study_methods x --study_seeds students, each an ordinary run
    directory under cells/, evaluated alike; then the report."""
    import keras
    from ardir_tf import precision, study as studies
    from ardir_tf.workdir import WorkdirError
    teacher = teacher_model(workdir, data)
    teacher_path = FLAGS.teacher or workdir.path("teacher.keras")
    methods, seeds = cli.study_methods(), list(range(FLAGS.study_seeds))
    evaluation = cli.evaluation()
    known = workdir.read_json("metrics.json", {}).get("teacher", {})
    if isinstance(teacher, keras.Model) and known.get("study_evaluation") != evaluation:
        say("[teacher] evaluating it as every cell will be evaluated")
        partial = workdir.path("teacher-evaluation-partial")  # a killed one resumes
        workdir.write_json("metrics.json", {"teacher": dict(
            evaluate_model(teacher, data, partial), study_evaluation=evaluation)})
        shutil.rmtree(partial, ignore_errors=True)

    def settings(method, seed):
        # An ordinary run's flags.json (so --mode=evaluate and export work on a
        # cell), with the cell's method, seed, knobs and teacher.
        cell = dict(cli.settings(), seed=seed, method=method.base, natural_epochs=0,
                    teacher=teacher_path, study_method=method.name)
        for knob, value in method.options:
            cell[cli.STUDY_KNOB_FLAGS.get(knob, knob)] = (
                [f"{s}:{t}" for s, t in value] if knob == "layers" else value)
        if "precision" in method.kwargs:
            cell.update(cli.precision_settings(method.kwargs["precision"]))
        return cell

    def train(method, seed, cell):
        keras.utils.set_random_seed(seed)
        cell_data = load_data(seed)
        study_policy = keras.mixed_precision.global_policy()
        if "precision" in method.kwargs:  # the cell's student is built under its own
            keras.mixed_precision.set_global_policy(
                precision.choose(method.kwargs["precision"])[0])
        try:
            return phase(cell, "student", cell_data, FLAGS.epochs,
                         lambda: cell_trainable(method, cell_data, teacher),
                         label=f"{method.name} seed {seed}")
        finally:
            keras.mixed_precision.set_global_policy(study_policy)

    say(f"[study] {len(methods)} methods x {len(seeds)} seeds = {len(methods) * len(seeds)} "
        f"cells in {workdir.path('cells')}")
    try:
        rows = studies.run(workdir.root, methods, seeds, settings=settings, train=train,
                           evaluate=lambda model, partial: evaluate_model(model, data,
                                                                          partial),
                           epochs=FLAGS.epochs, log=lambda m: say(f"[study] {m}"),
                           evaluation=evaluation)
    except (studies.StudyError, WorkdirError) as err:
        fail(str(err))
    summary = studies.write_report(workdir.root, rows, reference=FLAGS.study_reference)
    t = workdir.read_json("metrics.json", {}).get("teacher")
    if t:
        say(f"\nteacher: clean {t['clean_accuracy']:.4f}, worst case "
            f"{t['worst_case_accuracy']:.4f}")
    say("\n" + studies.format_table(summary))
    say(f"\nwrote {', '.join(workdir.path(n) for n in ('study.csv', 'study.json', 'study.png'))}")


def load_data(seed):
    """The run's data with shuffling and augmentation seeded by `seed`."""
    import ardir_tf
    return ardir_tf.data.load(FLAGS.dataset, FLAGS.batch_size, seed=seed,
                              data_dir=FLAGS.data_dir, download=FLAGS.download,
                              augment=FLAGS.augment)


def train_teacher(workdir, data):
    evaluate_and_report(workdir, data, {"teacher": teacher_model(workdir, data)})


def distill(workdir, data):
    trained = {}
    if FLAGS.natural_epochs:
        trained["natural"] = phase(workdir, "natural", data, FLAGS.natural_epochs,
                                   lambda: natural_trainable(data))
    trained["teacher"] = teacher = teacher_model(workdir, data)
    trained["student"] = phase(workdir, "student", data, FLAGS.epochs,
                               lambda: student_trainable(data, teacher))
    evaluate_and_report(workdir, data, trained)


def evaluate_mode(workdir, data):
    found = {n: workdir.path(f"{n}.keras") for n in ("natural", "teacher", "student")
             if workdir.exists(f"{n}.keras")}
    if not found:
        fail(f"no natural.keras, teacher.keras or student.keras in {workdir.root}; "
             "train first (--mode=distill or --mode=train_teacher)")
    loaded = {n: load_model(p) for n, p in found.items()}
    for name, model in loaded.items():
        if tuple(model.inputs[0].shape[1:]) != tuple(data.input_shape):
            fail(f"{name}.keras takes {tuple(model.inputs[0].shape[1:])} images but "
                 f"{data.name} has {tuple(data.input_shape)}; pass the run's --dataset")
    evaluate_and_report(workdir, data, loaded)


def export(workdir, data):
    from ardir_tf import evaluate
    from export import artifacts, parity, repositories, variants
    if not workdir.exists("student.keras"):
        fail(f"no student.keras in {workdir.root}; run --mode=distill first")
    student = load_model(workdir.path("student.keras"))
    if tuple(student.inputs[0].shape[1:]) != tuple(data.input_shape):
        fail(f"student.keras takes {tuple(student.inputs[0].shape[1:])} images but "
             f"{data.name} has {tuple(data.input_shape)}; pass the run's --dataset")
    metrics = workdir.read_json("metrics.json", {})
    card = artifacts.card_from_run(workdir.read_json(workdir.SETTINGS), metrics, data.name,
                                   data.class_names)
    if not card["evaluations"]:
        say("[export] warning: the student has no evaluation in metrics.json, so the model "
            "card holds no accuracy; run --mode=evaluate first")
    x, y = evaluate.collect(data.test, FLAGS.parity_examples)
    target = FLAGS.export_dir or workdir.path("export")
    calibration, robustness = None, None
    if FLAGS.quantize or FLAGS.litert:
        from ardir_tf import deployed
        calibration = evaluate.collect(data.train, FLAGS.calibration_examples)[0]

        def robustness(path):  # on the parity images, measured on the file
            return deployed.evaluate_artifact(
                deployed.load(path, data.input_shape), student, [(x, y)],
                FLAGS.eps, FLAGS.norm, square_queries=1000, seed=FLAGS.seed)
    try:
        card = artifacts.export(student, target, x, y, attack=attack(FLAGS.eval_steps),
                                card=card, opset=FLAGS.opset,
                                name=FLAGS.model_name or "student", max_batch=FLAGS.max_batch,
                                log=lambda message: say(f"[export] {message}"),
                                quantize=tuple(FLAGS.quantize), litert=tuple(FLAGS.litert),
                                calibration=calibration, robustness=robustness)
    except artifacts.ExportError as err:
        fail(f"export to {target} failed: {err}")
    say("\n" + parity.format_table(card["parity"]))
    if card.get("artifacts"):
        say("\n" + variants.format_table(card["artifacts"]))
    tops = sorted({name.split("/")[0] + ("/" if "/" in name else "") for name in card["files"]})
    say(f"\n[export] wrote {target}: {', '.join(tops)} and {artifacts.CARD}")
    commands = repositories.docker_commands(os.path.abspath(target), card["name"])
    say(f"[export] serve it: ardir-serve --export_dir={target} (or --mode=serve), or\n"
        f"  {commands['triton']}\n  {commands['tf_serving']}")


def serve(workdir):
    from export import cli as serving  # the server of ardir-serve
    try:
        serving.serve(default_export_dir=workdir.path("export"), log=say)
    except (ValueError, OSError) as err:
        fail(str(err))


def launch(workdir):
    """--strategy=multi_worker --num_workers=N without TF_CONFIG: this command
    again as N workers on 127.0.0.1, their logs in <workdir>/workers/."""
    from ardir_tf import distribute
    resume_precision(workdir)  # as each worker will (main)
    claim(workdir)  # before the workers, so that none of them finds a foreign directory
    os.environ[CLUSTER_LOCK] = str(os.getpid())  # the workers inherit it
    say(f"{FLAGS.mode}: starting {FLAGS.num_workers} workers on 127.0.0.1, workdir "
        f"{workdir.root}")
    command = [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    status = distribute.launch_local_cluster(command, FLAGS.num_workers,
                                             workdir.path("workers"), say=say)
    if status:
        fail(f"the cluster stopped (status {status}); worker logs in "
             f"{workdir.path('workers')}; run the same command again to resume")


def resume_precision(workdir):
    """A resumed run keeps the precision its flags.json records (cli.resume_precision);
    True if it set it. An unreadable flags.json is left to claim(), which says
    what is wrong with it."""
    try:
        return cli.resume_precision(workdir.read_json(workdir.SETTINGS))
    except ValueError:
        return False


# Set by the launcher of a local cluster, which holds the run's lock for its workers.
CLUSTER_LOCK = "ARDIR_CLUSTER_LOCK"
LOCKED = []  # the workdirs this command holds locked; main() releases them


def lock(workdir):
    workdir.lock()
    LOCKED.append(workdir)


def claim(workdir):
    """Claims the run's directory (or refuses it), then locks it for this
    command (a local cluster's workers run under their launcher's lock)."""
    from ardir_tf.workdir import WorkdirError
    if not CHIEF:
        return
    try:
        workdir.claim(cli.settings(), overwrite=FLAGS.overwrite)
        if not os.environ.get(CLUSTER_LOCK):
            lock(workdir)
    except WorkdirError as err:
        fail(str(err))


TRAINING = ("distill", "train_teacher", "study")
MODES = {"train_teacher": train_teacher, "distill": distill, "evaluate": evaluate_mode,
         "export": export, "study": study}  # and serve, which needs none of their set-up


def default_workdir():
    dataset = FLAGS.dataset.replace("npz:", "npz-").replace(os.sep, "_")
    if FLAGS.mode == "study":
        return os.path.join("runs", f"study-{dataset}")
    method = FLAGS.teacher_method if FLAGS.mode == "train_teacher" else FLAGS.method
    mode = "distill" if FLAGS.mode in ("evaluate", "export", "serve") else FLAGS.mode
    return os.path.join("runs", f"{mode}-{dataset}-{method}")


def main(argv):
    """Runs the mode; whatever happens, releases the runs it locked (the process
    may go on: tests/startup_harness.py runs many command lines in one)."""
    try:
        return _main(argv)
    finally:
        while LOCKED:
            LOCKED.pop().unlock()


def _main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    if not absl_flags.FLAGS["verbosity"].present:
        # SavedModel writing and tf2onnx log each step at INFO through absl; our
        # own lines say what happens. --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    from ardir_tf.workdir import Workdir
    if FLAGS.mode == "serve":  # ONNX Runtime only: no data, no strategy, no run needed
        return serve(Workdir(FLAGS.workdir or default_workdir()))
    from ardir_tf import distribute
    if FLAGS.strategy == "multi_worker" and FLAGS.num_workers and not os.environ.get("TF_CONFIG"):
        return launch(Workdir(FLAGS.workdir or default_workdir()))
    try:
        strategy = distribute.strategy(FLAGS.strategy, FLAGS.devices)  # first: splits the CPU
    except ValueError as err:
        fail(f"--strategy={FLAGS.strategy}: {err}")
    global CHIEF
    CHIEF = distribute.is_chief(strategy)
    import tensorflow as tf
    if FLAGS.jit_compile and distribute.on_logical_cpus(strategy):
        fail("--jit_compile fails under a mirrored strategy on logical CPU devices (XLA "
             "cannot reach the other devices' variables); drop it, or use GPUs")
    import keras
    import ardir_tf

    workdir = Workdir(FLAGS.workdir or default_workdir())
    if FLAGS.mode in ("evaluate", "export"):
        try:
            saved = workdir.read_json(Workdir.SETTINGS)
        except ValueError:
            fail(f"{workdir.path(Workdir.SETTINGS)} is not valid JSON")
        if saved is None:
            fail(f"no run in {workdir.root} (no flags.json); train first, or point "
                 "--workdir at a run")
        try:
            lock(workdir)  # no training or other evaluation writes beside this one
        except ValueError as err:
            fail(str(err))
        cli.adopt_run_settings(saved)
        if FLAGS.mode == "evaluate":  # the run's own evaluation, unless told otherwise
            cli.adopt_evaluation(recorded_evaluation(workdir))
    resumed_precision = FLAGS.mode in TRAINING and resume_precision(workdir)
    keras.utils.set_random_seed(FLAGS.seed)
    # Training modes train in --precision; evaluation and export run in float32.
    policy, why = (ardir_tf.precision.choose(FLAGS.precision) if FLAGS.mode in TRAINING
                   else ("float32", "evaluation and export run in float32"))
    if resumed_precision:
        why = f"as this run started, flags.json; --precision={FLAGS['precision'].default} " \
              "applies to new runs"
    keras.mixed_precision.set_global_policy(policy)
    try:
        data = load_data(FLAGS.seed)
    except ardir_tf.data.DataError as err:
        fail(str(err))
    say(f"{FLAGS.mode}: {data.name} {data.input_shape}, {data.num_classes} classes, "
        f"{strategy.num_replicas_in_sync} replica(s), workdir {workdir.root}")
    if FLAGS.mode in TRAINING:
        say(f"precision: {policy} ({why}); evaluated in float32")
    try:
        with strategy.scope():
            check_models(workdir, data)
            if FLAGS.mode in TRAINING:
                claim(workdir)
                if strategy.num_replicas_in_sync > 1:
                    distribute.barrier(strategy)  # no worker reads it before it is claimed
            MODES[FLAGS.mode](workdir, data)
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume")
    except (ValueError, OSError, tf.errors.OpError) as err:  # OpError: a NaN loss, ...
        if os.environ.get("ARDIR_DEBUG"):
            raise
        fail(f"{type(err).__name__}: {error_line(err)} (ARDIR_DEBUG=1 shows the traceback)")


def error_line(err):
    """The line of an error's message that says what went wrong: the first, or
    for a TensorFlow op's error the line before the failing node's name (its
    first line is "Graph execution error:")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return ""
    nodes = [i for i, line in enumerate(lines) if line.startswith("[[")]
    return lines[nodes[0] - 1] if nodes and nodes[0] > 0 else lines[0]


def run():
    """The console script `ardir-tf`: `python main.py` from anywhere, its preset
    flagfiles (--flagfile=flags/NAME.cfg) found in the installed package."""
    sys.argv = cli.resolve_flagfiles(sys.argv)
    cli.list_in_help(__doc__)
    app.run(main)


if __name__ == "__main__":
    run()
