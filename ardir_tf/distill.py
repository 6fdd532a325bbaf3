"""ARDIRDistiller: adversarial robust distillation with internal representations.

Feels like `keras.distillation.Distiller` (teacher, student, layers named by
string, `compile` + `fit`, `distiller.student` is the trained model) but is not
built on it, for three reasons: Keras' Distiller trains on the clean input
while ARDIR trains on PGD examples crafted against the student each step; its
losses take a plain mean, which is wrong by the replica count under
tf.distribute; and it runs the student twice to read features, where ARDIR
needs one exposed forward pass per input.

One training step (K = attack steps):
    1. teacher(x), inference mode, once: logits and named features; they serve
       both the attack objective and the loss.
    2. x' = PGD on the student (inference mode) within the eps-ball around x
       (and teacher(x') when ir_teacher_input is "adv" or "both", or
       kd_teacher_input is "adv").
    3. student(x') in training mode (and student(x) when the loss has a clean
       term, whose BatchNorm statistics update is undone unless
       bn_statistics="both": the moving statistics come from x' alone), under
       the tape; the method's
       per-example loss, reduced with the global batch size; gradients to the
       student and the adapters only.
About K + 1 student forward and backward passes, one more forward (and
backward) pass for the clean terms (alpha < 1, RSLAD, or ir_student_input
"both"), plus one teacher forward pass (two with teacher(x')).
"""

import dataclasses

import keras
import tensorflow as tf

from ardir_tf import losses, precision, teachers
from ardir_tf.keras_compat import UnsavedAttributesMixin
from ardir_tf.models import expose
from ardir_tf.robust_model import (RobustModel, check_bn_statistics, check_logits_model,
                                   clean_pass, moving_statistics)

METHODS = ("ardir", "ard", "rslad")
# alpha and attack objective when not given: RSLAD's paper uses 5/6 and attacks
# with its KL loss; ARD-style methods weigh the clean CE term lightly and use
# the attack's own loss (CE unless the PGD says otherwise).
DEFAULT_ALPHA = {"ardir": 0.9, "ard": 0.9, "rslad": 5 / 6}
DEFAULT_OBJECTIVE = {"ardir": None, "ard": None, "rslad": "kl"}
ATTACK_OBJECTIVES = ("ce", "kl", "ardir")
# Whose output the KD term pulls the student's s(x') towards: the teacher's on
# the clean x (ARD's) or on x' itself (one more teacher pass a step).
KD_TEACHER_INPUTS = ("clean", "adv")


def _feature_shape(view, name):
    return tuple(view.output[name].shape[1:])


def build_adapter(student_shape, teacher_shape, name):
    """A small learned map from a student feature shape to a teacher's.

    Feature maps [H, W, C]: a 1x1 convolution to the teacher's channels, then
    bilinear resizing to the teacher's grid when it differs. Vectors [C]: a
    dense layer. Trained with the student, never part of it.
    """
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (1, 3):
        raise ValueError(
            f"cannot adapt student features of shape {student_shape} to teacher "
            f"features of shape {teacher_shape}: pair feature maps with feature "
            "maps ([H, W, C]) or vectors with vectors ([C])")
    layers = [keras.Input(shape=student_shape)]
    if len(student_shape) == 1:
        layers.append(keras.layers.Dense(teacher_shape[0], name=f"{name}_dense"))
    else:
        layers.append(keras.layers.Conv2D(teacher_shape[-1], 1, name=f"{name}_conv"))
        if student_shape[:2] != teacher_shape[:2]:
            layers.append(keras.layers.Resizing(*teacher_shape[:2],
                                                name=f"{name}_resize"))
    return keras.Sequential(layers, name=name)


@dataclasses.dataclass(frozen=True)
class LayerPair:
    """A student layer whose representation the IR term pulls towards a teacher
    layer's: `LayerPair(student="stage2", teacher="stage3")`.

    Keras' `FeatureDistillation` names the teacher's layer first
    (`teacher_layer_name=..., student_layer_name=...`); a bare tuple here is
    (student, teacher), the other way round, so name them when in doubt.
    """
    student: str
    teacher: str

    def __post_init__(self):
        for role in ("student", "teacher"):
            name = getattr(self, role)
            if not isinstance(name, str) or not name:
                raise ValueError(f"LayerPair.{role} must be a layer name, got {name!r}")


def layer_pair(pair):
    """`pair` as a LayerPair: a LayerPair, a dict {"student": ..., "teacher": ...}
    or a (student_layer, teacher_layer) tuple."""
    if isinstance(pair, LayerPair):
        return pair
    if isinstance(pair, dict):
        if set(pair) != {"student", "teacher"}:
            raise ValueError('a layer pair given as a dict needs exactly the keys "student" '
                             f'and "teacher"; got {pair!r}')
        return LayerPair(**pair)
    if (isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(n, str) and n for n in pair)):
        return LayerPair(*pair)
    raise ValueError("layers must be LayerPair(student=..., teacher=...), "
                     "{'student': ..., 'teacher': ...} or (student_layer, teacher_layer) "
                     f"tuples of layer names, e.g. [('stage2', 'stage3')]; got {pair!r}")


class ARDIRDistiller(UnsavedAttributesMixin, RobustModel):
    """Distils a robust teacher into a student on adversarial examples.

    Args:
      teacher: the frozen teacher, always run in inference mode: a trained
        keras.Model (pixels -> logits), an `ardir_tf.teachers.Teacher` (a
        SavedModel or ONNX model from `teachers.load`, loaded with the teacher
        layers of `layers`), or any callable x -> {"logits": ..., name: ...}
        returning the named representations in NHWC.
      student: the keras.Model to train (same input shape and classes).
      layers: the layer pairs whose representations the IR term matches
        (method "ardir"): `LayerPair(student=..., teacher=...)`, dicts
        `{"student": ..., "teacher": ...}`, or tuples in the order
        (student_layer, teacher_layer), the reverse of Keras'
        `FeatureDistillation(teacher_layer_name, student_layer_name)`.
      attack: an `attacks.PGD` (required, keyword-only); the attack run on the
        student each step.
      method: "ardir" (ARD + IR term), "ard" (Goldblum et al. 2020) or "rslad"
        (Zhu et al. 2022).
      attack_objective: what PGD maximises: "ce" CE(s(x'), y) (ARD's), "kl"
        KL(t(x) || s(x')) (RSLAD's), "ardir" the distillation loss itself. None:
        "kl" for rslad, the attack's own loss (CE by default) otherwise.
      alpha: weight of the distillation term against the clean term, in [0, 1];
        None: 0.9 for ardir and ard, 5/6 for rslad. This is the ARD paper's
        alpha; Keras' `Distiller(student_loss_weight=...)` and keras-io's
        `alpha` weigh the clean (student) loss instead:
        student_loss_weight = 1 - alpha.
      temperature: softmax temperature of the KD term (ard, ardir; RSLAD's
        soft labels are at temperature 1).
      ir_weight: weight of the IR term (ardir); 0 makes ARDIR equal to ARD.
      distance: IR distance, "normalized_mse" (default), "mse" or "cosine"
        (normalized_mse is exactly 2 * cosine).
      ir_teacher_input: which input gives the teacher representation the
        student's adversarial one is pulled towards: "clean" x (default),
        "adv" x' (one more teacher pass a step) or "both" (the mean of the two
        distances).
      ir_student_input: "adv" (default): the student's representation on x'
        is matched; "both": also the student's on the clean x against the
        teacher's on x (the student's clean pass is then run even when
        alpha = 1).
      kd_teacher_input: whose output the KD term (ard, ardir) pulls the
        student's s(x') towards: the teacher's on the clean x ("clean", ARD's
        soft labels) or on x' ("adv": t(x'), one more teacher pass a step).
      bn_statistics: how the student's clean pass (the clean term; RSLAD's
        kd_clean; the IR term's clean side) treats BatchNorm, whose moving
        statistics the deployed student and every attack use. "split"
        (default): normalised by its own batch, the moving statistics learnt
        from the adversarial batches alone; "adv": in inference mode
        (normalised by those moving statistics); "both": in training mode,
        as the ARD and RSLAD reference code does, which averages the clean
        and the adversarial batches' statistics (on MNIST at eps 0.3 that
        made the students look robust to PGD and not be: see
        `robust_model.BN_STATISTICS`).
      adapters: when a pair's shapes differ, learn an adapter (True) or raise.
      eval_attack: attack used by `test_step`; defaults to `attack` with CE.

    Metrics: loss, each loss term by name (kd, ce, ir, kd_clean), clean_accuracy
    (the training-mode logits of the loss's clean pass; none without one:
    alpha = 1, not RSLAD, and no IR term on the clean x) and adv_accuracy (on the training
    adversarial batch); test_step
    reports clean_accuracy and pgd_accuracy. There is no validation loss: give
    callbacks monitor="val_pgd_accuracy" (mode="max").

    Under a tf.distribute strategy each replica normalises its slice of the
    batch in plain BatchNorm layers; build the models with
    `models.build(..., sync_batchnorm=True)` (or `models.synchronize_batchnorm`)
    for N replicas to train exactly like one device.
    """

    def __init__(self, teacher, student, layers=(), *, attack, method="ardir",
                 attack_objective=None, alpha=None, temperature=1.0, ir_weight=1.0,
                 distance="normalized_mse", ir_teacher_input="clean",
                 ir_student_input="adv", kd_teacher_input="clean", bn_statistics="split",
                 adapters=True, eval_attack=None,
                 name="ardir_distiller", **kwargs):
        alpha, attack_objective, pairs = self._checked_options(
            teacher, student, layers, attack, method, attack_objective, alpha, temperature,
            ir_weight, distance, ir_teacher_input, ir_student_input, kd_teacher_input,
            bn_statistics)
        super().__init__(student, attack, eval_attack,
                         train_metrics=self._term_names(method, alpha, ir_weight),
                         clean_accuracy=self._has_clean_pass(method, alpha,
                                                             ir_student_input, ir_weight),
                         name=name,
                         **kwargs)
        self.student = student
        # The teacher is kept out of Keras' tracking: the distiller's weights
        # (what save_weights and the run's backups write) and its trainable
        # variables are what training changes, the student and the adapters,
        # not a teacher that can be 50 times the student's size. It always runs
        # in inference mode. Its own `trainable` flag is left as the caller set
        # it (a teacher trained after the distiller is built still trains).
        self._views.teacher_model = teacher
        self.method, self.attack_objective = method, attack_objective
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.ir_weight, self.distance = float(ir_weight), distance
        self.ir_teacher_input, self.ir_student_input = ir_teacher_input, ir_student_input
        self.kd_teacher_input, self.bn_statistics = kd_teacher_input, bn_statistics
        self.pairs = pairs

        self._views.student = expose(student, [p.student for p in self.pairs])
        # The same for the attack's passes (see RobustModel: inference mode only).
        self._views.student_inference = precision.inference_view(self._views.student)
        s_in = tuple(self._views.student.input.shape[1:])
        # Every teacher becomes a frozen function x -> {"logits", name: NHWC}.
        self._views.teacher = teachers.as_teacher(teacher, [p.teacher for p in self.pairs],
                                                  input_shape=s_in)
        t_in = self._views.teacher.input_shape
        if s_in != t_in:
            raise ValueError(f"teacher and student must take the same input; teacher "
                             f"takes {t_in}, student {s_in}")
        s_out = _feature_shape(self._views.student, "logits")
        t_out = self._views.teacher.shapes["logits"]
        if s_out != t_out:
            raise ValueError(f"teacher and student must have the same classes; teacher "
                             f"logits have shape {t_out}, student {s_out}")
        self.adapters = self._adapters(adapters)

    @staticmethod
    def _checked_options(teacher, student, layers, attack, method, attack_objective, alpha,
                         temperature, ir_weight, distance, ir_teacher_input,
                         ir_student_input, kd_teacher_input, bn_statistics):
        """Every argument checked, alone and against the others (ValueError saying
        what is wrong and what to pass); returns (alpha, attack_objective, pairs)
        with the method's defaults filled in."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if attack_objective is not None and attack_objective not in ATTACK_OBJECTIVES:
            raise ValueError(f"unknown attack_objective {attack_objective!r}; valid: "
                             f"{', '.join(ATTACK_OBJECTIVES)} or None (the attack's own loss)")
        if attack is None:
            raise ValueError("attack is required, e.g. ardir_tf.attacks.PGD(eps=8/255, "
                             "step_size=2/255, steps=10)")
        if isinstance(teacher, (keras.Model, str)):  # a path gets "load it first"
            check_logits_model(teacher, "teacher")
        check_logits_model(student, "student")
        alpha = DEFAULT_ALPHA[method] if alpha is None else alpha
        if attack_objective is None:
            attack_objective = DEFAULT_OBJECTIVE[method]
        if attack_objective is None and getattr(attack, "loss", None) == "kl":
            raise ValueError("a PGD with loss='kl' needs the teacher's distribution: pass "
                             "attack_objective='kl' to the distiller instead")
        losses.check_weight("alpha", alpha, 0.0, 1.0)
        losses.check_weight("ir_weight", ir_weight)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if method == "rslad" and temperature != 1:
            raise ValueError(f"method='rslad' uses temperature 1 (its soft labels are the "
                             f"teacher's plain softmax); got temperature={temperature}")
        if distance not in losses.DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; valid: "
                             f"{', '.join(losses.DISTANCES)}")
        if ir_teacher_input not in losses.IR_TEACHER_INPUTS:
            raise ValueError(f"unknown ir_teacher_input {ir_teacher_input!r}; valid: "
                             f"{', '.join(losses.IR_TEACHER_INPUTS)}")
        if ir_student_input not in losses.IR_STUDENT_INPUTS:
            raise ValueError(f"unknown ir_student_input {ir_student_input!r}; valid: "
                             f"{', '.join(losses.IR_STUDENT_INPUTS)}")
        check_bn_statistics(bn_statistics)
        if kd_teacher_input not in KD_TEACHER_INPUTS:
            raise ValueError(f"unknown kd_teacher_input {kd_teacher_input!r}; valid: "
                             f"{', '.join(KD_TEACHER_INPUTS)}")
        if method == "rslad" and kd_teacher_input != "clean":
            raise ValueError("method='rslad' distils the teacher's output on the clean x "
                             "(its soft labels); kd_teacher_input='adv' is for ard and ardir")
        if attack_objective == "ardir" and kd_teacher_input != "clean":
            raise ValueError("attack_objective='ardir' maximises the loss against fixed "
                             "targets, the teacher's on the clean x; with kd_teacher_input="
                             "'adv' the targets move with x': use attack_objective='ce' "
                             "or 'kl'")
        if method != "ardir" and (ir_teacher_input, ir_student_input) != ("clean", "adv"):
            raise ValueError("ir_teacher_input and ir_student_input choose the inputs of "
                             f"the IR term, which only method='ardir' has (got {method!r})")
        if attack_objective == "ardir" and ir_teacher_input != "clean":
            raise ValueError("attack_objective='ardir' maximises the loss against fixed "
                             "targets, the teacher's on the clean x; with ir_teacher_input="
                             f"{ir_teacher_input!r} the targets move with x': use "
                             "attack_objective='ce' or 'kl'")
        pairs = [layer_pair(p) for p in (layers or ())]
        if method != "ardir" and pairs:
            raise ValueError(f"layers are matched only by method='ardir'; method "
                             f"{method!r} uses logits alone: drop layers=")
        if method == "ardir" and ir_weight > 0 and not pairs:
            raise ValueError("method='ardir' with ir_weight > 0 needs layers=[LayerPair("
                             "student=..., teacher=...), ...]; without them it is ARD: use "
                             "method='ard'")
        if attack_objective == "ardir" and method != "ardir":
            raise ValueError("attack_objective='ardir' needs method='ardir'")
        return alpha, attack_objective, pairs

    def _adapters(self, allowed):
        """One adapter a layer pair whose student and teacher shapes differ (None
        where they match), learnt with the student; ValueError if `allowed` is
        False and one is needed."""
        adapters = []
        for i, pair in enumerate(self.pairs if self.ir_weight > 0 else ()):
            s, t = pair.student, pair.teacher
            s_shape = _feature_shape(self._views.student, s)
            t_shape = self._views.teacher.shapes[t]
            if s_shape == t_shape:
                adapters.append(None)
            elif not allowed:
                raise ValueError(
                    f"student layer {s!r} has shape {s_shape} but teacher layer {t!r} "
                    f"has shape {t_shape}; pass adapters=True to learn a map between them")
            else:
                adapters.append(build_adapter(s_shape, t_shape, f"adapter{i}_{s}_to_{t}"))
        return adapters

    @staticmethod
    def _term_names(method, alpha, ir_weight):
        if method == "rslad":
            return ["kd", "kd_clean"]
        names = ["kd"] + (["ce"] if alpha < 1 else [])
        return names + (["ir"] if method == "ardir" and ir_weight > 0 else [])

    @property
    def network(self):
        return self.student

    UNSAVED = ("teacher",)  # see __init__: the backups hold what training changes

    @property
    def teacher(self):
        """The frozen teacher as given (not among the distiller's weights)."""
        return self._views.teacher_model

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """As `RobustModel.compile`. An ONNX teacher runs in Python (ONNX Runtime
        through tf.numpy_function), which XLA cannot compile: `jit_compile=True`
        is refused with one, and Keras' "auto" means off."""
        if self._views.teacher.kind == "onnx":
            if kwargs.get("jit_compile") is True:
                raise ValueError("jit_compile=True cannot compile a step that runs an ONNX "
                                 "teacher (ONNX Runtime runs outside the graph); drop it, or "
                                 "give the teacher as a SavedModel or Keras model")
            kwargs["jit_compile"] = False
        super().compile(optimizer, loss, metrics, **kwargs)

    @staticmethod
    def _has_clean_pass(method, alpha, ir_student_input="adv", ir_weight=0.0):
        """Whether the loss runs the student on the clean x (RSLAD; alpha < 1;
        an IR term on the student's clean representation)."""
        return method == "rslad" or alpha < 1 or (method == "ardir" and ir_weight > 0
                                                  and ir_student_input == "both")

    @property
    def _ir_on(self):
        return self.method == "ardir" and self.ir_weight > 0

    def _adapted(self, student_out):
        return [student_out[p.student] if a is None else a(student_out[p.student])
                for p, a in zip(self.pairs, self.adapters)]

    def _ir(self, student_out, teacher_features):
        """The weighted IR term, or None when it is off."""
        if not self.ir_weight:
            return None
        return self.ir_weight * losses.ir_term(self._adapted(student_out), teacher_features,
                                               self.distance)

    def _teacher_features(self, teacher_out):
        return [teacher_out[p.teacher] for p in self.pairs]

    def _adversarial(self, x, y, teacher_out):
        objective = self.attack_objective
        if objective is None:
            return self.attack(self._inference, x, y)
        if objective == "ce":
            return self.attack.replace(loss="ce")(self._inference, x, y)
        t_logits = teacher_out["logits"]
        if objective == "kl":
            return self.attack.replace(loss="kl")(
                self._inference, x, y, targets=tf.nn.softmax(tf.cast(t_logits, tf.float32)))

        t_features = self._teacher_features(teacher_out)
        return self.attack.replace(
            loss=lambda student_out, _: self._ardir_attack_loss(student_out, t_logits,
                                                                t_features))(
            lambda z: self._views.student_inference(z, training=False), x, y)

    def _ardir_attack_loss(self, student_out, t_logits, t_features):
        """attack_objective "ardir": the per-example terms of the loss that
        depend on x' (the student's outputs on it, `student_out`). With
        ir_student_input "both" the loss averages the IR term over its two
        matches, so x''s match weighs half."""
        value = self.alpha * losses.kd_kl(t_logits, student_out["logits"], self.temperature)
        ir = self._ir(student_out, t_features)
        if ir is None:
            return value
        return value + (ir / 2 if self.ir_student_input == "both" else ir)

    def adversarial_examples(self, x, y):
        """The PGD examples a training step would craft for the batch (x, y)."""
        x, y = self._unpack((x, y))
        return self._adversarial(x, y, self._views.teacher(x, training=False))

    def _loss_terms(self, y, s_clean, s_adv, teacher_out, teacher_adv=None):
        """The method's per-example terms. `s_clean` is the student's clean
        output (a dict when the IR term reads its features, logits otherwise,
        None without a clean pass); `teacher_adv` the teacher's on x' (only
        with ir_teacher_input "adv" or "both", or kd_teacher_input "adv")."""
        t_logits = teacher_out["logits"]
        if self.kd_teacher_input == "adv":
            t_logits = teacher_adv["logits"]
        clean_logits = s_clean["logits"] if isinstance(s_clean, dict) else s_clean
        if self.method == "rslad":
            return losses.rslad(clean_logits, s_adv["logits"], t_logits, self.alpha)
        if self.method == "ard":
            return losses.ard(y, clean_logits, s_adv["logits"], t_logits, self.alpha,
                              self.temperature)
        on = self._ir_on
        return losses.ardir(
            y, clean_logits, s_adv["logits"], t_logits, self._adapted(s_adv) if on else [],
            self._teacher_features(teacher_out), self.alpha, self.temperature,
            self.ir_weight, self.distance, teacher_input=self.ir_teacher_input,
            teacher_features_adv=(self._teacher_features(teacher_adv)
                                  if on and self.ir_teacher_input != "clean" else None),
            student_features_clean=(self._adapted(s_clean)
                                    if on and self.ir_student_input == "both" else None))

    def train_step(self, data):
        x, y = self._unpack(data)
        teacher_out = self._views.teacher(x, training=False)
        x_adv = self._adversarial(x, y, teacher_out)
        teacher_adv = (self._views.teacher(x_adv, training=False)
                       if (self._ir_on and self.ir_teacher_input != "clean")
                       or self.kd_teacher_input == "adv" else None)
        with tf.GradientTape() as tape:
            s_adv = self._views.student(x_adv, training=True)
            s_clean = None
            # After x', so BatchNorm's moving statistics end each step as x' left them.
            moving = moving_statistics(self.student)
            if self._ir_on and self.ir_student_input == "both":  # logits and features
                s_clean = clean_pass(self._views.student, x, self.bn_statistics, moving)
            elif self._has_clean_pass(self.method, self.alpha):
                s_clean = clean_pass(self.student, x, self.bn_statistics, moving)
            terms = self._loss_terms(y, s_clean, s_adv, teacher_out, teacher_adv)
            scaled = self.optimizer.scale_loss(self._reduce(terms["loss"]))
        self._apply(tape, scaled)
        clean_logits = s_clean["logits"] if isinstance(s_clean, dict) else s_clean
        return self._report(y, terms, clean_logits, s_adv["logits"])
