"""What every attack shares: the objectives, the argument checks, projections,
random starts and the first-success bookkeeping of restarts and targets."""

import contextlib
import numbers
import threading

import tensorflow as tf


NORMS = ("linf", "l2")
LOSSES = ("ce", "kl", "cw", "dlr")


# Where the attacks draw their random numbers (random starts, Square's
# proposals, FAB's restarts): TensorFlow's stateful random ops, repeated by a
# graph seed as cleverhans's are, or, while `drawing_from(generator)` is active
# when an attack is traced, that tf.random.Generator. evaluate's runner uses
# the latter and resets the generator before each batch, so that a batch's
# draws are a function of the seed, the attack's name and the batch alone (a
# resumed evaluation draws what an uninterrupted one drew).
_SOURCE = threading.local()


@contextlib.contextmanager
def drawing_from(generator):
    """Attacks traced inside draw from `generator` (a tf.random.Generator)."""
    previous = getattr(_SOURCE, "generator", None)
    _SOURCE.generator = generator
    try:
        yield generator
    finally:
        _SOURCE.generator = previous


def uniform(shape, minval=0.0, maxval=1.0, dtype=tf.float32):
    """tf.random.uniform, or the active `drawing_from` generator's. A custom
    attack that draws through it repeats per batch in `evaluate`."""
    generator = getattr(_SOURCE, "generator", None)
    if generator is None:
        return tf.random.uniform(shape, minval, maxval, dtype)
    return generator.uniform(shape, minval, maxval, dtype)


def normal(shape):
    """tf.random.normal, or the active `drawing_from` generator's."""
    generator = getattr(_SOURCE, "generator", None)
    return tf.random.normal(shape) if generator is None else generator.normal(shape)


def _logits(outputs):
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    # Mixed-precision models emit float16 logits; the attack objective and its
    # gradient are computed in float32 so small gradients do not underflow.
    return tf.cast(logits, tf.float32)


def _other_max(logits, labels):
    """Largest logit among the classes other than `labels`."""
    one_hot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    return tf.reduce_max(logits - one_hot * 1e9, axis=-1)


def _true_logit(logits, labels):
    return tf.gather(logits, labels, axis=-1, batch_dims=1)


def attack_objective(loss, outputs, y, targets=None):
    """Per-example value the attack maximises.

    Args:
      loss: "ce" (cross-entropy with `y`), "kl" (KL(targets || softmax), with
        `targets` a probability distribution, e.g. a teacher's softmax on the
        clean input), "cw" (the Carlini-Wagner margin max_{j!=y} z_j - z_y), or
        a callable `loss(outputs, y) -> [batch]`.
      outputs: what `model_fn` returned.
      y: integer labels [batch].
      targets: for "ce" and "cw", optional target labels that make the attack
        targeted (it then maximises the negated loss towards `targets`); for
        "kl", the reference distribution (required).
    """
    if callable(loss):
        return tf.cast(loss(outputs, y), tf.float32)
    logits = _logits(outputs)
    if loss == "kl":
        if targets is None:
            raise ValueError("loss='kl' needs targets: the reference probability "
                             "distribution [batch, classes]")
        p = tf.cast(targets, tf.float32)
        log_q = tf.nn.log_softmax(logits)
        return tf.reduce_sum(p * (tf.math.log(tf.maximum(p, 1e-12)) - log_q), -1)
    labels = tf.cast(y if targets is None else targets, tf.int32)
    if loss == "ce":
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return ce if targets is None else -ce
    if loss == "cw":
        margin = _other_max(logits, labels) - _true_logit(logits, labels)
        return margin if targets is None else -margin
    if loss == "dlr":
        return _dlr(logits, tf.cast(y, tf.int32), None if targets is None else labels)
    raise ValueError(f"unknown attack loss {loss!r}; valid: {', '.join(LOSSES)} "
                     "or a callable(outputs, y)")


def _dlr(logits, y, targets=None):
    """Croce & Hein's difference of logits ratio (to maximise), scale-invariant.

    Untargeted: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3); targeted towards t:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), pi sorting z in decreasing order.
    """
    z_sorted = tf.sort(logits, axis=-1, direction="DESCENDING")
    z_y = _true_logit(logits, y)
    if targets is None:
        return -(z_y - _other_max(logits, y)) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)
    z_t = _true_logit(logits, targets)
    return -(z_y - z_t) / (z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + 1e-12)


def _check(eps, step_size, steps, norm, loss, clip):
    for name, v in (("eps", eps), ("step_size", step_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{name} must be a number (not a tensor), got {v!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (the radius of the threat ball), got {eps}")
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; valid: {', '.join(LOSSES)} "
                         "or a callable(outputs, y)")
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise ValueError(f"clip must be (low, high) with low < high, or None; got {clip!r}")


def _per_example_norm(t):
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=tf.range(1, tf.rank(t)),
                                 keepdims=True))


def _project(delta, eps, norm):
    if norm == "linf":
        return tf.clip_by_value(delta, -eps, eps)
    # Scale down onto the ball, never up: points inside stay where they are.
    return delta * tf.minimum(1.0, eps / (_per_example_norm(delta) + 1e-12))


def _random_start(x, eps, norm):
    if norm == "linf":
        if isinstance(eps, float):  # the same draw as cleverhans from the same seed
            return uniform(tf.shape(x), -eps, eps)
        return uniform(tf.shape(x), -1.0, 1.0) * eps
    direction = normal(tf.shape(x))
    direction /= _per_example_norm(direction) + 1e-12
    radius = uniform(tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0))
    return direction * radius * eps


def _succeeded(model_fn, x_adv, y, targets=None):
    """Per example: the model predicts a wrong class (or the target, when targeted)."""
    pred = tf.argmax(_logits(model_fn(x_adv)), -1, output_type=tf.int32)
    if targets is not None and targets.shape.rank == 1:
        return tf.equal(pred, tf.cast(targets, tf.int32))
    return tf.not_equal(pred, tf.cast(y, tf.int32))


def _first_success(model_fn, y, runs, targets=None):
    """Runs each attempt in `runs` (callables returning x_adv) and keeps, per
    example, the first that succeeded, else the last attempt."""
    x_adv = done = None
    for i, run in enumerate(runs):
        candidate = run()
        ok = _succeeded(model_fn, candidate, y, targets)
        if x_adv is None:
            x_adv, done = candidate, ok
            continue
        take = tf.logical_and(tf.logical_not(done), tf.logical_or(ok, i == len(runs) - 1))
        x_adv = tf.where(tf.reshape(take, [-1] + [1] * (x_adv.shape.rank - 1)), candidate,
                         x_adv)
        done = tf.logical_or(done, ok)
    return x_adv


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_restarts(restarts):
    _check_count("restarts", restarts)
