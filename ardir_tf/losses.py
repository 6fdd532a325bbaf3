"""Per-example losses for adversarial training and robust distillation.

Every function returns one value per example (shape [batch]); the caller
reduces once, with the global batch size (`tf.nn.compute_average_loss`), so
one device and N replicas give the same update.

KL divergences are summed over classes. PyTorch's `KLDivLoss(reduction="mean")`
also averages over classes, so numbers from repos built on it are smaller by a
factor of the number of classes; `reduction="batchmean"`/`sum(1)` match ours.

The method losses (`natural`, `pgd_at`, `trades`, `ard`, `rslad`, `ardir`) return a dict of
weighted per-example terms plus "loss", their sum, so a trainer can report every
term by name.
"""

import math
import numbers

import tensorflow as tf

DISTANCES = ("normalized_mse", "mse", "cosine")
# Which input gives the teacher's representation the student's adversarial one
# is pulled towards, and which of the student's inputs are matched
# (docs/objective.md, "Where the representations come from").
IR_TEACHER_INPUTS = ("clean", "adv", "both")
IR_STUDENT_INPUTS = ("adv", "both")


def _f32(t):
    return tf.cast(t, tf.float32)


def ce(y, logits):
    """Cross-entropy of integer labels `y` under `logits`."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.cast(y, tf.int32), _f32(logits))


def kl(p_logits, q_logits, temperature=1.0):
    """KL(softmax(p/T) || softmax(q/T)), summed over classes (no T^2 factor)."""
    t = float(temperature)
    log_p = tf.nn.log_softmax(_f32(p_logits) / t)
    log_q = tf.nn.log_softmax(_f32(q_logits) / t)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def kd_kl(teacher_logits, student_logits, temperature=1.0):
    """Hinton et al.'s distillation term: T^2 * KL(softmax(t/T) || softmax(s/T)).

    The T^2 keeps the gradient's size independent of T.
    """
    t = float(temperature)
    return t * t * kl(teacher_logits, student_logits, t)


def _flatten(t):
    t = _f32(t)
    return tf.reshape(t, [tf.shape(t)[0], -1])


def ir_distance(student_features, teacher_features, distance="normalized_mse"):
    """Distance between internal representations, per example.

    Args:
      student_features, teacher_features: tensors of the same shape [batch, ...].
      distance: "normalized_mse" ||u/|u| - v/|v|||^2 on flattened features (in
        [0, 4]; scale-free, so a teacher with larger activations does not
        dominate); "mse" the mean squared difference; "cosine" 1 - cos(u, v).
        normalized_mse is exactly 2 * cosine for non-zero features
        (||a - b||^2 = 2 - 2 a.b for unit vectors; an all-zero one normalises
        to 0 and both give 1): the same objective at twice the weight, kept
        because both names are in use.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    student_features, teacher_features = _f32(student_features), _f32(teacher_features)
    s_shape, t_shape = tuple(student_features.shape[1:]), tuple(teacher_features.shape[1:])
    if s_shape != t_shape:
        raise ValueError(f"ir_distance needs features of one shape; student features "
                         f"have shape {s_shape}, teacher features {t_shape}")
    u, v = _flatten(student_features), _flatten(teacher_features)
    if distance == "mse":
        return tf.reduce_mean(tf.square(u - v), axis=-1)
    u = tf.math.l2_normalize(u, axis=-1, epsilon=1e-12)
    v = tf.math.l2_normalize(v, axis=-1, epsilon=1e-12)
    if distance == "cosine":
        return 1.0 - tf.reduce_sum(u * v, axis=-1)
    return tf.reduce_sum(tf.square(u - v), axis=-1)


def _terms(**terms):
    terms["loss"] = tf.add_n(list(terms.values()))
    return terms


def check_weight(name, value, low=0.0, high=None):
    """Raises ValueError unless low <= value (<= high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def natural(y, logits):
    """Natural training: CE on the clean input (the baseline robust methods beat)."""
    return _terms(ce=ce(y, logits))


def pgd_at(y, logits_adv):
    """PGD adversarial training (Madry et al. 2018): CE on the adversarial input."""
    return _terms(ce_adv=ce(y, logits_adv))


def trades(y, logits_clean, logits_adv, beta=6.0):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x'))."""
    return _terms(ce=ce(y, logits_clean),
                  kl_adv=beta * kl(logits_clean, logits_adv))


def ard(y, student_logits_clean, student_logits_adv, teacher_logits,
        alpha=0.9, temperature=1.0):
    """ARD (Goldblum et al. 2020).

    alpha * T^2 * KL(t(x)/T || s(x')/T) + (1 - alpha) * CE(s(x), y).
    With alpha = 1 the clean term is zero and `student_logits_clean` may be None.
    """
    terms = dict(kd=alpha * kd_kl(teacher_logits, student_logits_adv, temperature))
    if alpha < 1:
        terms["ce"] = (1.0 - alpha) * ce(y, student_logits_clean)
    return _terms(**terms)


def rslad(student_logits_clean, student_logits_adv, teacher_logits, alpha=5 / 6):
    """RSLAD (Zhu et al. 2022): the teacher's soft labels replace the hard ones.

    alpha * KL(t(x) || s(x')) + (1 - alpha) * KL(t(x) || s(x)), temperature 1.
    """
    return _terms(kd=alpha * kl(teacher_logits, student_logits_adv),
                  kd_clean=(1.0 - alpha) * kl(teacher_logits, student_logits_clean))


def ir_term(student_features, teacher_features, distance="normalized_mse"):
    """Mean over layer pairs of `ir_distance` (lists of equal-shaped tensors)."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError("ir_term needs one or more (student, teacher) feature pairs, "
                         f"got {len(student_features)} and {len(teacher_features)}")
    return tf.add_n([ir_distance(s, t, distance)
                     for s, t in zip(student_features, teacher_features)]
                    ) / len(student_features)


def ardir(y, student_logits_clean, student_logits_adv, teacher_logits,
          student_features_adv, teacher_features, alpha=0.9, temperature=1.0,
          ir_weight=1.0, distance="normalized_mse", *, teacher_input="clean",
          teacher_features_adv=None, student_features_clean=None):
    """ARDIR (Takahashi et al. 2022, arXiv 2211.00239), as docs/objective.md defines
    it (our reading of the paper's abstract; its full text is not available to us).

    ARD plus ir_weight * the mean, over layer pairs and over the matches below,
    of d(A(h_s(.)), h_t(.)). `student_features_*` are already adapted to the
    teacher's shapes. The matches:
      - the student's adversarial representation h_s(x') against the teacher's
        on the clean input h_t(x) (`teacher_input="clean"`, the default:
        `teacher_features`), on the adversarial input h_t(x') ("adv":
        `teacher_features_adv`), or both ("both");
      - with `student_features_clean` (the student's side "both"), also
        h_s(x) against h_t(x).
    With ir_weight = 0 it is ARD exactly.
    """
    if teacher_input not in IR_TEACHER_INPUTS:
        raise ValueError(f"unknown teacher_input {teacher_input!r}; valid: "
                         f"{', '.join(IR_TEACHER_INPUTS)}")
    terms = ard(y, student_logits_clean, student_logits_adv, teacher_logits,
                alpha, temperature)
    terms.pop("loss")
    if ir_weight:
        matches = []
        if teacher_input in ("clean", "both"):
            matches.append((student_features_adv, teacher_features))
        if teacher_input in ("adv", "both"):
            if teacher_features_adv is None:
                raise ValueError(f"teacher_input={teacher_input!r} needs "
                                 "teacher_features_adv (the teacher's on x')")
            matches.append((student_features_adv, teacher_features_adv))
        if student_features_clean is not None:
            matches.append((student_features_clean, teacher_features))
        terms["ir"] = ir_weight * tf.add_n(
            [ir_term(s, t, distance) for s, t in matches]) / len(matches)
    return _terms(**terms)
