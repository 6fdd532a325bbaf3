"""Every command-line flag of main.py, defined in one place, with its validator.

`define_flags()` registers them with absl; bad values are rejected while the
command line is parsed, before any work starts, with a one-line message. Preset
flagfiles sit beside this file: `--flagfile=flags/cifar10.cfg`.

`define_serve_flags()` registers only the serving flags, for `ardir-serve`
(export/cli.py). Neither importing this package nor defining the flags imports
TensorFlow (the choices come from flags/choices.py), so that the server starts
where TensorFlow is not installed and `--help` prints at once; the validators
of --study_methods, a SavedModel --teacher and a non-default --opset import the
library when the command line is checked.
"""

import os
import re
import sys

from absl import flags

from . import choices

FLAGS = flags.FLAGS
MODES = ("train_teacher", "distill", "evaluate", "export", "serve", "study")
PRESETS = os.path.dirname(os.path.abspath(__file__))


class _FractionParser(flags.ArgumentParser):
    """A float that may be written as a fraction: --eps=8/255."""

    def parse(self, argument):
        if isinstance(argument, (int, float)):
            return float(argument)
        text = str(argument).strip()
        try:
            if "/" in text:
                num, den = text.split("/")
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number such as 0.03 or 8/255, got {argument!r}")

    def flag_type(self):
        return "float"


def _fraction(name, default, help_text):
    flags.DEFINE(_FractionParser(), name, default, help_text)


def _check(name, predicate, message):
    flags.register_validator(name, predicate, message=f"--{name}: {message}")


def _layer_pairs(values):
    return [tuple(v.split(":")) for v in values]


def resolve_flagfiles(argv):
    """`argv` with each --flagfile=flags/NAME.cfg that is not there from the current
    directory pointed at the preset beside this file (an installed ardir-tf run
    from anywhere finds its presets)."""
    out = []
    for arg in argv:
        found = re.fullmatch(r"--flagfile=(?:\./)?flags/([\w.-]+\.cfg)", arg)
        if found and not os.path.exists(arg.split("=", 1)[1]) and \
                os.path.isfile(os.path.join(PRESETS, found.group(1))):
            arg = f"--flagfile={os.path.join(PRESETS, found.group(1))}"
        out.append(arg)
    return out


def list_in_help(doc):
    """Makes --help of the running console script show our flags and `doc`. absl
    lists the key flags of the module named sys.argv[0] under the docstring of
    __main__, which for a console script (bin/ardir-tf) is pip's wrapper."""
    for flag in FLAGS.get_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules["__main__"].__doc__ = doc


def define_serve_flags():
    """Registers (once) the flags serving needs, and their validators: where the
    model is, how to listen, the server's limits. Imports no TensorFlow."""
    if "port" in FLAGS:
        return
    # Files and serving.
    flags.DEFINE_string("workdir", None, "Where the run's files go (default with "
                        "main.py: runs/distill-<dataset>-<method> for distill, evaluate, "
                        "export and serve, runs/train_teacher-<dataset>-<teacher_method>, "
                        "runs/study-<dataset>; ardir-serve has none).")
    flags.DEFINE_string("export_dir", None, "Where --mode=export writes and --mode=serve "
                        "reads (default: <workdir>/export).")
    flags.DEFINE_string("model_name", None, "The exported model's name: its files "
                        "(<name>.onnx, <name>.keras), its Triton and TF Serving model "
                        "directories, and the name the server answers to (default: "
                        "student when exporting; when serving, the model card's name).")
    flags.DEFINE_string("onnx_path", None, "The .onnx --mode=serve serves (default: "
                        "<export_dir>/<model_name>.onnx).")
    flags.DEFINE_string("host", "127.0.0.1", "Address --mode=serve listens on (0.0.0.0: "
                        "every interface).")
    flags.DEFINE_integer("port", 8500, "Port --mode=serve listens on (0: any free port).")
    flags.DEFINE_integer("max_batch", 256, "Most images per request, and per batch the "
                         "server merges from concurrent requests (also the max_batch_size "
                         "of the exported Triton config).")
    flags.DEFINE_float("max_body_mb", None, "Largest request body the server reads, in "
                       "MiB (default: what --max_batch images of the model's size take in "
                       "JSON, the largest encoding: 4.7 MiB for 28x28x1 at 256).")
    flags.DEFINE_integer("max_in_flight", None, "Inference requests the server admits at "
                         "once (reading, decoding, waiting for or in the model); more get "
                         "503 with Retry-After at once (default: 2 x --max_batch).")
    flags.DEFINE_float("body_timeout_s", 30.0, "Seconds a request's body may take to "
                       "arrive; a slower one gets 408 and its connection is closed.")
    flags.DEFINE_integer("max_connections", 512, "Open connections the server keeps; one "
                         "more gets 503 and is closed.")
    flags.DEFINE_float("idle_timeout_s", 15.0, "Seconds a connection may stay open with no "
                       "request under way (none sent yet, headers still arriving, or "
                       "between keep-alive requests) before the server closes it.")
    flags.DEFINE_float("batch_delay_ms", 0.0, "How long the server waits for more requests "
                       "before running a batch (0: run at once; requests that arrive "
                       "while the model is busy are still merged).")
    _check("model_name", lambda v: v is None or re.fullmatch(r"[A-Za-z0-9][\w.-]{0,63}", v),
           "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit "
           "(it names files and URL paths)")
    _check("port", lambda v: 0 <= v <= 65535, "must be in [0, 65535] (0: any free port)")
    _check("max_batch", lambda v: v >= 1, "must be >= 1")
    _check("max_body_mb", lambda v: v is None or v > 0, "must be > 0")
    _check("max_in_flight", lambda v: v is None or v >= 1, "must be >= 1")
    _check("body_timeout_s", lambda v: 0 < v <= 3600, "must be in (0, 3600]")
    _check("max_connections", lambda v: v >= 1, "must be >= 1")
    _check("idle_timeout_s", lambda v: 0 < v <= 3600, "must be in (0, 3600]")
    _check("batch_delay_ms", lambda v: 0 <= v <= 1000, "must be in [0, 1000]")
    _check("onnx_path", lambda v: v is None or (v.endswith(".onnx") and os.path.isfile(v)),
           "must name an existing .onnx file")


def define_flags():
    """Registers the flags (once) and their validators."""
    if "mode" in FLAGS:
        return
    define_serve_flags()
    # Run.
    flags.DEFINE_enum("mode", "distill", MODES, "What to do.")
    flags.DEFINE_integer("seed", 0, "Seed of weights, shuffling and attacks; the same "
                         "seed gives the same run on a CPU.")
    flags.DEFINE_boolean("overwrite", False, "Replace another run's files in --workdir.")
    flags.DEFINE_enum("strategy", "auto", list(choices.STRATEGIES), "tf.distribute strategy: "
                      "auto (mirrored over all GPUs when there are 2 or more, or over "
                      "--devices; else one device), default (one device), mirrored (over "
                      "--devices GPUs, or logical CPU devices on a machine without GPUs), "
                      "mirrored_cpu (over --devices logical CPU devices, even with GPUs), "
                      "multi_worker (the cluster in TF_CONFIG).")
    flags.DEFINE_integer("num_workers", 0, "With --strategy=multi_worker and no TF_CONFIG: "
                         "start this many workers on 127.0.0.1 (to try multi-worker on one "
                         "machine).")
    flags.DEFINE_integer("devices", 1, "Replicas: >1 mirrors over that many GPUs, or over "
                         "logical devices split from the CPU.")
    flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_float16",
                                            "mixed_bfloat16"],
                      "Keras dtype policy of the models trained (mixed_*: float16/bfloat16 "
                      "arithmetic with float32 weights and logits). auto: mixed_bfloat16 "
                      "where the hardware has native bfloat16 (a CPU with AVX512_BF16 or "
                      "AMX, a GPU of compute capability 8.0+), else float32. flags.json "
                      "records the policy used and why; a run resumed without --precision "
                      "continues in it. Evaluation and export always run in float32.")
    flags.DEFINE_boolean("sync_batchnorm", True, "With several replicas, BatchNorm uses the "
                         "whole global batch's statistics (as one device would) instead of "
                         "each replica's slice; costs an all-reduce per BN layer.")
    flags.DEFINE_boolean("jit_compile", False, "Compile each training step with XLA (fuses "
                         "ops; helps most on GPUs; measure first).")
    flags.DEFINE_integer("verbose", 1, "1: progress bars; 2: a line per epoch; 0: quiet.")
    # Data.
    flags.DEFINE_string("dataset", "digits", f"One of {', '.join(choices.DATASETS)}.")
    flags.DEFINE_string("data_dir", None, "Where tensorflow-datasets keeps prepared data.")
    flags.DEFINE_boolean("download", False, "Let tensorflow-datasets download a missing "
                         "dataset (needs internet).")
    flags.DEFINE_integer("batch_size", 64, "Global batch size (split over --devices).")
    flags.DEFINE_boolean("augment", True, "Random crops and flips on tfds training data.")
    # Models.
    archs = list(choices.ARCHS)
    flags.DEFINE_string("teacher", None, "A trained teacher: a .keras file, a TensorFlow "
                        "SavedModel directory or an .onnx file (e.g. a PyTorch model "
                        "exported with torch.onnx.export). None: train one (or reuse "
                        "<workdir>/teacher.keras).")
    flags.DEFINE_boolean("check_teacher", True, "Before training, score a --teacher on up "
                         "to 1,000 test images and stop when it is near chance level (wrong "
                         "layout, scaling or class order); --nocheck_teacher skips it.")
    flags.DEFINE_enum("teacher_layout", "auto", list(choices.TEACHER_LAYOUTS),
                      "Layout of a SavedModel or ONNX --teacher's input: auto (read from its "
                      "input shape when the data tell NHWC from NCHW), nhwc, or nchw "
                      "(PyTorch exports).")
    flags.DEFINE_float("teacher_input_scale", 1.0, "A SavedModel or ONNX --teacher is fed "
                       "(pixels * this - --teacher_mean) / --teacher_std; our pixels are in "
                       "[0, 1], so 255 for a model trained on 0-255 images.")
    flags.DEFINE_list("teacher_mean", None, "Per-channel mean the --teacher subtracts after "
                      "--teacher_input_scale (one value, or one per channel). None: 0.")
    flags.DEFINE_enum("teacher_outputs", "logits", list(choices.TEACHER_OUTPUTS), "What a "
                      "SavedModel or ONNX --teacher's logits output holds: logits, or "
                      "probabilities (a softmax ends the model; their log is used). A "
                      "teacher that outputs probabilities is refused unless this says so.")
    flags.DEFINE_list("teacher_std", None, "Per-channel std the --teacher divides by (one "
                      "value, or one per channel). None: 1.")
    flags.DEFINE_enum("teacher_arch", "small_cnn", archs, "Architecture of a teacher to train.")
    flags.DEFINE_integer("teacher_width", 32, "Width of the teacher (small_cnn, resnets: "
                         "channels of the first stage; wide_resnet: widening factor; "
                         "mobilenet_v2: not used).")
    flags.DEFINE_integer("teacher_depth", 34, "Depth of a wide_resnet teacher (6n + 4).")
    flags.DEFINE_enum("student_arch", "small_cnn", archs, "Architecture of the student.")
    flags.DEFINE_integer("student_width", 16, "Width of the student (as --teacher_width).")
    flags.DEFINE_integer("student_depth", 16, "Depth of a wide_resnet student (6n + 4).")
    flags.DEFINE_integer("natural_epochs", 15, "Epochs of a naturally trained baseline with "
                         "the student's architecture (0: none).")
    # Attack.
    _fraction("eps", 0.15, "Radius of the threat ball, in [0, 1] pixels (8/255 allowed).")
    _fraction("step_size", None, "PGD step size (default eps/4).")
    flags.DEFINE_integer("steps", 10, "PGD steps during training.")
    flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model norm.")
    flags.DEFINE_boolean("random_start", True, "Start PGD at a random point in the ball.")
    flags.DEFINE_integer("eval_steps", 20, "PGD steps when evaluating.")
    flags.DEFINE_integer("eval_examples", 0, "Test examples to evaluate (0: all).")
    flags.DEFINE_integer("sanity_examples", 500, "Examples the sanity checks of each "
                         "evaluation run on (0: skip them; the report then says "
                         "reliable: null).")
    flags.DEFINE_list("attacks", ["fast"], "Attack presets to evaluate with: fast (FGSM, "
                      "PGD-<eval_steps>, CW), standard (AutoAttack's standard set: APGD-CE, "
                      "APGD-T, FAB-T, Square), or both: fast,standard.")
    flags.DEFINE_boolean("sequential_attacks", False, "Run each attack only on the points "
                         "the earlier ones left standing (AutoAttack's rule: same worst case, "
                         "less time; per-attack columns become cumulative).")
    flags.DEFINE_boolean("verify_unreliable", True, "When a model's evaluation fails a "
                         "sanity check (gradients likely masked), run the standard attacks "
                         "it lacks on the points left standing, so that its worst case is "
                         "the number to trust.")
    # Method.
    flags.DEFINE_enum("method", "ardir", list(choices.METHODS), "Distillation method.")
    flags.DEFINE_enum("teacher_method", "pgd_at", list(choices.TEACHER_METHODS),
                      "How a teacher is trained.")
    flags.DEFINE_list("layers", ["stage2:stage2"], "student_layer:teacher_layer pairs "
                      "matched by the IR term (method ardir); for a SavedModel or ONNX "
                      "--teacher, teacher_layer is one of its output names.")
    _fraction("alpha", None, "Weight of the distillation term, in [0, 1] (default: 0.9; "
              "5/6 for rslad).")
    flags.DEFINE_float("temperature", 1.0, "Temperature of the KD term.")
    flags.DEFINE_float("ir_weight", 1.0, "Weight of the IR term (0: ARD).")
    flags.DEFINE_enum("distance", "normalized_mse", list(choices.DISTANCES), "IR distance "
                      "(normalized_mse is exactly 2 x cosine: the same objective at twice "
                      "the --ir_weight).")
    flags.DEFINE_enum("ir_teacher_input", "clean", list(choices.IR_TEACHER_INPUTS),
                      "Whose teacher representation the student's adversarial one is pulled "
                      "towards: the teacher's on the clean x, on the adversarial x' (one "
                      "more teacher pass a step), or both (the mean of the two distances).")
    flags.DEFINE_enum("ir_student_input", "adv", list(choices.IR_STUDENT_INPUTS),
                      "The student's side of the IR term: its representation on x' (adv), "
                      "or also its representation on x matched to the teacher's on x (both).")
    flags.DEFINE_enum("bn_statistics", "split", ["split", "adv", "both"],
                      "How methods that also run the network on the clean x (ard, ardir, "
                      "rslad, trades) treat BatchNorm there: split (each pass normalised by "
                      "its own batch; the moving statistics, which the deployed model and the "
                      "attacks use, from the adversarial batches alone), adv (the clean pass "
                      "in inference mode) or both (the reference code's: the moving "
                      "statistics average the two, which masked the MNIST students).")
    flags.DEFINE_enum("kd_teacher_input", "clean", list(choices.KD_TEACHER_INPUTS),
                      "Whose output the KD term (ard, ardir) pulls the student's output on "
                      "x' towards: the teacher's on the clean x (ARD's soft labels) or on x' "
                      "(one more teacher pass a step).")
    flags.DEFINE_enum("attack_objective", None, list(choices.ATTACK_OBJECTIVES),
                      "What PGD maximises while distilling (default: ce; kl for rslad).")
    flags.DEFINE_float("trades_beta", 6.0, "TRADES' beta (teacher_method=trades).")
    # Optimisation.
    flags.DEFINE_integer("epochs", 15, "Epochs of distillation.")
    flags.DEFINE_integer("teacher_epochs", 15, "Epochs of teacher training.")
    flags.DEFINE_enum("optimizer", "adam", list(choices.OPTIMIZERS), "Optimiser.")
    flags.DEFINE_float("lr", 3e-3, "Learning rate.")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay.")
    flags.DEFINE_enum("schedule", "constant", list(choices.SCHEDULES), "Learning-rate schedule.")
    flags.DEFINE_list("decay_at", ["0.5", "0.75"], "Where a piecewise schedule decays, as "
                      "fractions of each phase's epochs (0.5,0.75 of 200 = epochs 100, 150).")
    flags.DEFINE_float("decay_factor", 0.1, "Piecewise decay factor.")
    # Study.
    flags.DEFINE_list("study_methods", ["pgd_at", "ard", "rslad", "ardir"],
                      "--mode=study: the methods compared, each trained --study_seeds times "
                      "on the student's architecture: natural, pgd_at, trades, ard, rslad, "
                      "ardir, a variant such as ardir@ir_weight=0.5@distance=mse or "
                      "ardir@layers=stage1:stage1+stage2:stage2, or a name from "
                      "--study_variants.")
    flags.DEFINE_integer("study_seeds", 3, "--mode=study: seeds per method (0, 1, ...).")
    flags.DEFINE_string("study_reference", "ard", "--mode=study: the method every other "
                        "is compared with (paired over seeds); one of --study_methods.")
    flags.DEFINE_string("study_variants", None, "--mode=study: a JSON file of named "
                        'variants, {"ardir-half": "ardir@ir_weight=0.5", "ardir-mse": '
                        '{"method": "ardir", "distance": "mse"}}, usable in --study_methods.')
    # Export.
    flags.DEFINE_integer("opset", choices.DEFAULT_OPSET, "ONNX opset of the export.")
    flags.DEFINE_integer("parity_examples", 256, "Test images (and as many PGD images) "
                         "the export's parity checks run on.")
    flags.DEFINE_list("quantize", [], "Smaller ONNX files --mode=export also writes, each "
                      "with its robustness measured on the file (BPDA, Square, transfer) "
                      "on the parity images: int8 (<name>.int8.onnx, static QDQ), float16, "
                      "or both: int8,float16.")
    flags.DEFINE_list("litert", [], "LiteRT (TFLite) files --mode=export also writes in "
                      "<export>/litert/, each with its robustness measured on the file: "
                      "float32, float16 (float16 weights), int8 (full integer), or any of "
                      "them comma-separated.")
    flags.DEFINE_integer("calibration_examples", 512, "Training images an INT8 file's "
                         "activation ranges are calibrated on.")

    _check("eps", lambda v: v >= 0, "must be >= 0 (the radius of the threat ball)")
    _check("step_size", lambda v: v is None or v > 0, "must be > 0")
    _check("steps", lambda v: v >= 1, "must be >= 1")
    _check("eval_steps", lambda v: v >= 1, "must be >= 1")
    _check("eval_examples", lambda v: v >= 0, "must be >= 0 (0: all)")
    _check("sanity_examples", lambda v: v >= 0, "must be >= 0 (0: skip the checks)")
    _check("attacks", lambda v: bool(v) and set(v) <= set(choices.ATTACK_SUITES),
           f"must be one or more of {', '.join(choices.ATTACK_SUITES)}, comma-separated")
    _check("alpha", lambda v: v is None or 0 <= v <= 1, "must be in [0, 1]")
    _check("temperature", lambda v: v > 0, "must be > 0")
    _check("ir_weight", lambda v: v >= 0, "must be >= 0")
    _check("trades_beta", lambda v: v >= 0, "must be >= 0")
    _check("lr", lambda v: v > 0, "must be > 0")
    flags.register_validator("opset", _valid_opset)
    _check("parity_examples", lambda v: v >= 1, "must be >= 1")
    _check("quantize", lambda v: set(v) <= {"int8", "float16"},
           "must be int8, float16 or both, comma-separated")
    _check("litert", lambda v: set(v) <= {"float32", "float16", "int8"},
           "must be float32, float16, int8 or several of them, comma-separated")
    _check("calibration_examples", lambda v: v >= 1, "must be >= 1")
    _check("num_workers", lambda v: v >= 0, "must be >= 0")
    flags.register_multi_flags_validator(
        ["strategy", "num_workers"], lambda f: not f["num_workers"] or
        f["strategy"] == "multi_worker",
        message="--num_workers starts a local cluster: it needs --strategy=multi_worker")
    flags.register_multi_flags_validator(
        ["strategy", "mode"], lambda f: f["strategy"] != "multi_worker" or
        f["mode"] in ("distill", "train_teacher"),
        message="--strategy=multi_worker trains: use it with --mode=distill or train_teacher")
    for name in ("epochs", "teacher_epochs", "devices", "batch_size"):
        _check(name, lambda v: v >= 1, "must be >= 1")
    _check("natural_epochs", lambda v: v >= 0, "must be >= 0 (0: no baseline)")
    _check("teacher_width", lambda v: v >= 1, "must be >= 1")
    _check("student_width", lambda v: v >= 1, "must be >= 1")
    _check("dataset", _valid_dataset, f"must be one of {', '.join(choices.DATASETS)} "
           "(npz:PATH naming an existing file)")
    _check("teacher", lambda v: v is None or (v.endswith((".keras", ".onnx")) and os.path.isfile(v))
           or _is_saved_model(v),
           "must name an existing .keras file, SavedModel directory (holding saved_model.pb) "
           "or .onnx file")
    _check("teacher_input_scale", lambda v: v > 0, "must be > 0")
    _check("teacher_mean", lambda v: v is None or all(_is_number(t) for t in v),
           "must be numbers, e.g. 0.4914,0.4822,0.4465")
    _check("teacher_std", lambda v: v is None or all(_is_number(t) and float(t) > 0 for t in v),
           "must be numbers > 0, e.g. 0.2471,0.2435,0.2616")
    _check("layers", lambda v: all(len(p) == 2 and all(p) for p in _layer_pairs(v)),
           "must be student_layer:teacher_layer pairs, e.g. stage2:stage2,stage3:stage3")
    _check("decay_at", lambda v: all(_is_fraction(s) for s in v),
           "must be fractions of the phase in (0, 1), e.g. 0.5,0.75")
    for name in ("teacher_depth", "student_depth"):
        _check(name, lambda v: v >= 10 and (v - 4) % 6 == 0,
               "must be 6n + 4 (10, 16, 22, 28, 34, ...) for wide_resnet")
    flags.register_multi_flags_validator(
        ["method", "temperature"], lambda f: f["method"] != "rslad" or f["temperature"] == 1,
        message="--temperature: method rslad uses temperature 1 (the teacher's plain softmax)")
    flags.register_multi_flags_validator(
        ["attack_objective", "ir_teacher_input"],
        lambda f: f["attack_objective"] != "ardir" or f["ir_teacher_input"] == "clean",
        message="--attack_objective=ardir maximises the loss against the teacher's clean "
                "representation; with --ir_teacher_input=adv or both the targets move with "
                "x': use --attack_objective=ce or kl")
    flags.register_multi_flags_validator(
        ["method", "kd_teacher_input"],
        lambda f: f["method"] != "rslad" or f["kd_teacher_input"] == "clean",
        message="--kd_teacher_input: method rslad distils the teacher's output on the clean "
                "x; adv is for ard and ardir")
    flags.register_multi_flags_validator(
        ["attack_objective", "kd_teacher_input"],
        lambda f: f["attack_objective"] != "ardir" or f["kd_teacher_input"] == "clean",
        message="--attack_objective=ardir maximises the loss against the teacher's clean "
                "output; with --kd_teacher_input=adv the targets move with x': use "
                "--attack_objective=ce or kl")
    flags.register_multi_flags_validator(
        ["method", "attack_objective"],
        lambda f: f["attack_objective"] != "ardir" or f["method"] == "ardir",
        message="--attack_objective=ardir needs --method=ardir")
    flags.register_multi_flags_validator(
        ["method", "layers", "ir_weight"],
        lambda f: f["method"] != "ardir" or f["ir_weight"] == 0 or f["layers"],
        message="--layers: method ardir needs at least one student_layer:teacher_layer pair "
                "(or --ir_weight=0, which is ARD)")
    _check("study_seeds", lambda v: v >= 1, "must be >= 1")
    flags.register_multi_flags_validator(
        ["study_methods", "study_variants", "study_reference"], _valid_study,
        message="--study_methods: not a valid study")
    flags.register_multi_flags_validator(
        ["batch_size", "devices"], lambda f: f["batch_size"] % f["devices"] == 0,
        message="--batch_size must be a multiple of --devices (each replica gets an equal share)")


def _study_methods(values):
    """(methods, None) or (None, error message)."""
    from ardir_tf import study
    try:
        variants = study.load_variants(values["study_variants"]) \
            if values["study_variants"] else None
    except study.StudyError as err:
        return None, f"--study_variants: {err}"
    try:
        return [study.parse_method(m, variants) for m in values["study_methods"]], None
    except study.StudyError as err:
        return None, f"--study_methods: {err}"


def _valid_study(values):
    """The study flags hang together; raises a ValidationError saying what is wrong."""
    methods, error = _study_methods(values)
    if error:
        raise flags.ValidationError(error)
    names = [m.name for m in methods]
    if not names or len(set(names)) != len(names):
        raise flags.ValidationError(f"--study_methods must name each method once, got "
                                    f"{','.join(names)}")
    slugs = [m.slug for m in methods]
    if len(set(slugs)) != len(slugs):
        raise flags.ValidationError("--study_methods: two names map to one cell directory")
    if values["study_reference"] not in names:
        raise flags.ValidationError(f"--study_reference={values['study_reference']} must be "
                                    f"one of --study_methods ({','.join(names)})")
    return True


def study_methods():
    """--study_methods as study.Method objects."""
    return _study_methods({"study_methods": FLAGS.study_methods,
                           "study_variants": FLAGS.study_variants})[0]


# The study knobs (study.KNOBS) whose flag has another name.
STUDY_KNOB_FLAGS = {"beta": "trades_beta"}


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_fraction(text):
    try:
        return 0 < float(text) < 1
    except ValueError:
        return False


def _valid_dataset(name):
    """As data.check_name, without importing TensorFlow (the validator runs on
    every command line)."""
    if name.startswith("npz:"):
        return os.path.isfile(name[4:])
    return name in choices.DATASETS[:-1]


def _is_saved_model(path):
    from ardir_tf.file_teachers import is_saved_model
    return is_saved_model(path)


def _valid_opset(value):
    if value == choices.DEFAULT_OPSET:  # every tf2onnx requirements.txt allows writes it
        return True                     # (tests/test_flags.py): no tf2onnx import needed
    from export import artifacts
    if not artifacts.MIN_OPSET <= value <= artifacts.max_opset():
        raise flags.ValidationError(
            f"--opset: must be from {artifacts.MIN_OPSET} to {artifacts.max_opset()} (the "
            "opsets the installed tf2onnx writes)")
    return True


# What --mode=evaluate and --mode=export take from the run's flags.json unless
# given on the command line: the data and the threat model it was trained for.
# --mode=evaluate and export take these from the run unless the command line
# gives them: the run's data, threat model and evaluation attack.
RUN_SETTINGS = ("dataset", "seed", "eps", "norm", "step_size", "batch_size", "eval_steps")


def adopt_run_settings(saved):
    """Sets RUN_SETTINGS flags not given on the command line to the saved run's."""
    for name in RUN_SETTINGS:
        if name in saved and not FLAGS[name].present:
            FLAGS[name].value = saved[name]


# An evaluation's settings, as its record names them (a study's cell.json, a
# report's "evaluation" in metrics.json), and their flags.
EVALUATION_FLAGS = {"attacks": "attacks", "eval_steps": "eval_steps",
                    "eval_examples": "eval_examples", "sequential": "sequential_attacks",
                    "sanity_examples": "sanity_examples", "seed": "seed",
                    "verify_unreliable": "verify_unreliable"}


def evaluation():
    """The evaluation the flags ask for, as its record names it, with the
    library's `evaluate.SCORING` (what its worst case counts): one recorded
    under another scoring is not the same evaluation."""
    from ardir_tf import evaluate  # here, not at the top: --help imports no TensorFlow
    return {**{key: FLAGS[flag].value for key, flag in EVALUATION_FLAGS.items()},
            "scoring": evaluate.SCORING}


def adopt_evaluation(recorded):
    """Sets the evaluation flags not given on the command line to `recorded`'s
    (an earlier evaluation of the run): --mode=evaluate repeats the run's own
    evaluation unless told otherwise. Returns the flags it set."""
    adopted = []
    for key, flag in EVALUATION_FLAGS.items():
        if key in (recorded or {}) and not FLAGS[flag].present:
            FLAGS[flag].value = recorded[key]
            adopted.append(flag)
    return adopted


def teacher_options(defaults=False):
    """The SavedModel/ONNX --teacher options as teachers.load's keyword arguments
    (`defaults`: as they are when none is given)."""
    def value(name):
        return FLAGS[name].default if defaults else FLAGS[name].value

    def floats(values):
        return None if values is None else [float(v) for v in values]
    return dict(layout=value("teacher_layout"), input_scale=value("teacher_input_scale"),
                mean=floats(value("teacher_mean")), std=floats(value("teacher_std")),
                outputs=value("teacher_outputs"))


def layer_pairs():
    """--layers as [(student_layer, teacher_layer), ...]."""
    return _layer_pairs(FLAGS.layers)


def precision_settings(value):
    """flags.json's record of --precision=`value`: the policy it gives on this
    machine ("precision") and why ("precision_reason", a note: see
    Workdir.NOTES)."""
    if value != "auto":
        return {"precision": value, "precision_reason": "as asked"}
    from ardir_tf import precision
    policy, why = precision.choose(value)
    return {"precision": policy, "precision_reason": why}


def resume_precision(saved):
    """A run resumed without --precision continues in the policy its flags.json
    (`saved`) recorded: auto may choose otherwise on this machine, and a run
    written before auto was the default recorded float32. Returns whether it
    did."""
    if saved and "precision" in saved and not FLAGS["precision"].present:
        FLAGS.precision = saved["precision"]
        return True
    return False


def settings():
    """The run-defining flags as a dict (for flags.json): all of ours but how the
    run is displayed, whether it may overwrite, where prepared data lives, and
    the export/evaluation reach."""
    skip = {"verbose", "overwrite", "eval_examples", "sanity_examples", "export_dir", "download", "data_dir",
            "attacks", "sequential_attacks", "verify_unreliable", "opset", "parity_examples",
            "quantize", "litert", "calibration_examples", "onnx_path", "host",
            "model_name", "port", "max_batch", "max_body_mb", "batch_delay_ms", "max_in_flight",
            "body_timeout_s", "idle_timeout_s", "max_connections", "strategy", "num_workers",
            "jit_compile", "check_teacher", "study_methods", "study_seeds",
            "study_reference", "study_variants"}
    if FLAGS.mode == "study":  # a study re-evaluates its cells when these change
        skip |= {"eval_steps"}
    own = FLAGS.flags_by_module_dict()[__name__]
    out = {f.name: f.value for f in own if f.name not in skip
           and not (f.name in ONLY_WHEN_SET and f.value == f.default)}
    out.update(precision_settings(FLAGS.precision))
    return out


# Recorded in flags.json only when set away from their default, so that a run
# written before they existed still resumes (its flags.json lacks them).
ONLY_WHEN_SET = ("teacher_layout", "teacher_input_scale", "teacher_mean", "teacher_std",
                 "teacher_outputs",
                 "ir_teacher_input", "ir_student_input", "kd_teacher_input")
