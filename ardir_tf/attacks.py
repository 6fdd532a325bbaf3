"""White-box attacks on [0, 1] pixel inputs: PGD and FGSM, Linf and L2.

Attacks are plain TensorFlow functions of `(model_fn, x, y)`. `model_fn` maps
a batch of pixels to logits, or to a dict holding "logits" (what
`models.expose` returns); pass the model in inference mode, e.g.
`lambda x: model(x, training=False)` (Madry et al.: the model is attacked in
eval mode and trained in train mode). They run eagerly, inside `tf.function`,
and inside a `train_step` under a tf.distribute strategy.

The PGD step loop is a single `tf.while_loop`, so the traced graph, and the
time to trace and compile it, does not grow with the number of steps.

`apgd` is Croce & Hein's (2020) Auto-PGD with the CE or (targeted) DLR loss.

Left out here: the Square and FAB attacks (the evaluation suite's work).
"""

import dataclasses
import math
import numbers
from typing import Callable, Optional, Tuple, Union

import tensorflow as tf

NORMS = ("linf", "l2")
LOSSES = ("ce", "kl", "cw", "dlr")


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
        return tf.random.uniform(tf.shape(x), -eps, eps)
    direction = tf.random.normal(tf.shape(x))
    direction /= _per_example_norm(direction) + 1e-12
    radius = tf.random.uniform(tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0))
    return direction * radius * eps


def pgd(model_fn, x, y, *, eps, step_size, steps, norm="linf", loss="ce",
        random_start=True, clip=(0.0, 1.0), targets=None):
    """Projected gradient descent (Madry et al. 2018), untargeted or targeted.

    Args:
      model_fn: callable, pixels -> logits or dict with "logits"; call the
        model in inference mode inside it.
      x: float pixels [batch, ...].
      y: integer labels [batch].
      eps: radius of the threat ball (Linf or L2), in pixel units; 0 returns x.
      step_size: size of each ascent step (Linf: per coordinate; L2: in norm).
      steps: number of steps (>= 1).
      norm: "linf" or "l2".
      loss: see `attack_objective`.
      random_start: start from a random point in the ball instead of x (Linf:
        uniform in the cube; L2: uniform direction, radius uniform in [0, eps]).
      clip: valid pixel range (low, high), or None for no clipping.
      targets: see `attack_objective`.

    Returns:
      Adversarial pixels, same shape as x, float32, within the eps-ball around
      x and within clip. The last iterate (as in Madry et al.), not the best.
    """
    _check(eps, step_size, steps, norm, loss, clip)
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.convert_to_tensor(y)
    if eps == 0:
        return x
    eps, step_size, steps = float(eps), float(step_size), int(steps)

    def to_valid(x_adv):
        x_adv = x + _project(x_adv - x, eps, norm)
        return x_adv if clip is None else tf.clip_by_value(x_adv, *clip)

    x_adv = to_valid(x + _random_start(x, eps, norm)) if random_start else x

    def step(i, x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            objective = tf.reduce_sum(
                attack_objective(loss, model_fn(x_adv), y, targets))
        grad = tape.gradient(objective, x_adv)
        if grad is None:
            raise ValueError("the attack objective does not depend on the input: "
                             "does model_fn use its argument?")
        if norm == "linf":
            direction = tf.sign(grad)
        else:
            direction = grad / (_per_example_norm(grad) + 1e-12)
        return i + 1, tf.stop_gradient(to_valid(x_adv + step_size * direction))

    _, x_adv = tf.while_loop(lambda i, _: i < steps, step,
                             (tf.constant(0), x_adv), maximum_iterations=steps)
    return x_adv


def fgsm(model_fn, x, y, *, eps, norm="linf", loss="ce", clip=(0.0, 1.0),
         targets=None):
    """Fast gradient (sign) method (Goodfellow et al. 2015): one step of size
    eps from x, no random start. Arguments as for `pgd`."""
    _check(eps, 1.0, 1, norm, loss, clip)
    return pgd(model_fn, x, y, eps=eps, step_size=eps if eps > 0 else 1.0,
               steps=1, norm=norm, loss=loss, random_start=False, clip=clip,
               targets=targets)


@dataclasses.dataclass(frozen=True)
class PGD:
    """A PGD configuration; calling it runs `pgd` with these settings.

    Example:
        attack = PGD(eps=8/255, step_size=2/255, steps=10)
        x_adv = attack(lambda z: model(z, training=False), x, y)
    """
    eps: float
    step_size: float
    steps: int = 10
    norm: str = "linf"
    loss: Union[str, Callable] = "ce"
    random_start: bool = True
    clip: Optional[Tuple[float, float]] = (0.0, 1.0)

    def __post_init__(self):
        _check(self.eps, self.step_size, self.steps, self.norm, self.loss,
               self.clip)

    def __call__(self, model_fn, x, y, targets=None):
        return pgd(model_fn, x, y, eps=self.eps, step_size=self.step_size,
                   steps=self.steps, norm=self.norm, loss=self.loss,
                   random_start=self.random_start, clip=self.clip,
                   targets=targets)

    def replace(self, **changes):
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _apgd_checkpoints(steps):
    """Croce & Hein's checkpoints: p0 = 0, p1 = 0.22, p_{j+1} = p_j + max(p_j -
    p_{j-1} - 0.03, 0.06), at iteration ceil(p_j * steps)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # Rounded first: 0.57 * 100 is 57.000000000000007 in floating point.
    marks = sorted({math.ceil(round(q * steps, 6)) for q in p[1:]})
    marks = [m for m in marks if m < steps]
    return [m for m in marks if m > 0]


def apgd(model_fn, x, y, *, eps, steps=100, norm="linf", loss="ce", targets=None,
         clip=(0.0, 1.0), rho=0.75, momentum=0.75):
    """Auto-PGD (Croce & Hein 2020): PGD with momentum and a step size that halves
    at checkpoints where progress stalled; returns the best point found.

    Args:
      model_fn, x, y, eps, norm, clip: as for `pgd`.
      steps: iterations (the paper uses 100).
      loss: "ce" or "dlr" (targeted when `targets` holds target labels).
      rho: a checkpoint halves the step size unless the loss rose in at least
        this fraction of the steps since the last one.
      momentum: weight of the new step against the previous direction (0.75).

    Returns:
      For each example, an iterate the model misclassified if there was one,
      else the point with the highest loss seen (within the ball and clip).
    """
    _check(eps, 1.0, steps, norm, loss, clip)
    if loss not in ("ce", "dlr"):
        raise ValueError(f"apgd takes loss 'ce' or 'dlr', got {loss!r}")
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.convert_to_tensor(y)
    if eps == 0:
        return x
    eps, steps = float(eps), int(steps)
    checkpoint = tf.constant([k in set(_apgd_checkpoints(steps)) for k in range(steps + 1)])
    per_example = tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0)

    def valid(z):
        z = x + _project(z - x, eps, norm)
        return z if clip is None else tf.clip_by_value(z, *clip)

    def loss_and_grad(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = model_fn(z)
            value = attack_objective(loss, out, y, targets)
        wrong = tf.not_equal(tf.argmax(_logits(out), -1, output_type=tf.int32),
                             tf.cast(y, tf.int32))
        return value, tape.gradient(value, z), wrong

    def direction(g):
        return tf.sign(g) if norm == "linf" else g / (_per_example_norm(g) + 1e-12)

    # Start: a random point in the ball, then one plain step of size 2 eps.
    eta = tf.fill(per_example, 2.0 * eps)
    x0 = valid(x + _random_start(x, eps, norm))
    f0, g0, wrong0 = loss_and_grad(x0)
    x1 = valid(x0 + eta * direction(g0))
    f1, g1, wrong1 = loss_and_grad(x1)
    fooled = tf.logical_or(wrong0, wrong1)
    fooled_x = tf.where(tf.reshape(wrong0, per_example), x0, x1)
    better = f1 > f0
    best_f = tf.maximum(f0, f1)
    best_x = tf.where(tf.reshape(better, per_example), x1, x0)
    state = dict(k=tf.constant(1), x=x1, x_prev=x0, f=f1, g=g1, eta=eta, best_f=best_f,
                 best_x=best_x, best_g=tf.where(tf.reshape(better, per_example), g1, g0),
                 rises=tf.cast(better, tf.float32), last_mark=tf.constant(0),
                 mark_best=f0, mark_eta=eta, fooled=fooled, fooled_x=fooled_x)

    def step(s):
        z = valid(s["x"] + s["eta"] * direction(s["g"]))
        x_new = valid(s["x"] + momentum * (z - s["x"]) + (1 - momentum) * (s["x"] - s["x_prev"]))
        f_new, g_new, wrong = loss_and_grad(x_new)
        first = tf.logical_and(wrong, tf.logical_not(s["fooled"]))
        fooled_x = tf.where(tf.reshape(first, per_example), x_new, s["fooled_x"])
        fooled = tf.logical_or(s["fooled"], wrong)
        rises = s["rises"] + tf.cast(f_new > s["f"], tf.float32)
        improved = f_new > s["best_f"]
        mask = tf.reshape(improved, per_example)
        best_f = tf.where(improved, f_new, s["best_f"])
        best_x, best_g = tf.where(mask, x_new, s["best_x"]), tf.where(mask, g_new, s["best_g"])
        k = s["k"] + 1

        def at_mark():
            span = tf.cast(k - s["last_mark"], tf.float32)
            stalled = tf.logical_or(
                rises < rho * span,
                tf.logical_and(tf.equal(tf.reshape(s["mark_eta"], [-1]),
                                        tf.reshape(s["eta"], [-1])),
                               tf.equal(s["mark_best"], best_f)))
            halve = tf.reshape(stalled, per_example)
            eta = tf.where(halve, s["eta"] / 2.0, s["eta"])
            # A halved step restarts from the best point found so far.
            return (eta, tf.where(halve, best_x, x_new), tf.where(halve, best_g, g_new),
                    tf.where(halve, best_x, x_new), tf.zeros_like(rises), k, best_f, eta)

        def between():
            return (s["eta"], x_new, g_new, s["x"], rises, s["last_mark"], s["mark_best"],
                    s["mark_eta"])

        eta, x_next, g_next, x_prev, rises, last_mark, mark_best, mark_eta = tf.cond(
            tf.gather(checkpoint, k), at_mark, between)
        return [dict(k=k, x=tf.stop_gradient(x_next), x_prev=tf.stop_gradient(x_prev),
                     f=f_new, g=g_next, eta=eta, best_f=best_f,
                     best_x=tf.stop_gradient(best_x), best_g=best_g, rises=rises,
                     last_mark=last_mark, mark_best=mark_best, mark_eta=mark_eta,
                     fooled=fooled, fooled_x=tf.stop_gradient(fooled_x))]

    (state,) = tf.while_loop(lambda s: s["k"] < steps, step, [state],
                             maximum_iterations=max(steps - 1, 0))
    return tf.where(tf.reshape(state["fooled"], per_example), state["fooled_x"],
                    state["best_x"])


def apgd_targeted(model_fn, x, y, *, eps, steps=100, norm="linf", n_targets=9,
                  clip=(0.0, 1.0)):
    """APGD-T: targeted APGD-DLR towards each of the `n_targets` classes the
    model ranks highest on x after the true one; per example, the first target
    that succeeds wins (else the last attempt). Costs n_targets APGD runs."""
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.cast(tf.convert_to_tensor(y), tf.int32)
    logits = _logits(model_fn(x))
    n_classes = logits.shape[-1]
    if not 1 <= n_targets <= n_classes - 1:
        raise ValueError(f"n_targets must be in [1, {n_classes - 1}], got {n_targets}")
    ranked = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    # Drop the true class from the ranking, keep the order of the others.
    others = tf.reshape(tf.boolean_mask(ranked, tf.not_equal(ranked, y[:, None])),
                        [-1, n_classes - 1])
    x_adv, fooled = x, tf.zeros_like(y, dtype=tf.bool)
    for i in range(n_targets):
        candidate = apgd(model_fn, x, y, eps=eps, steps=steps, norm=norm, loss="dlr",
                         targets=others[:, i], clip=clip)
        wrong = tf.not_equal(tf.argmax(_logits(model_fn(candidate)), -1, output_type=tf.int32), y)
        take = tf.logical_and(tf.logical_not(fooled), tf.logical_or(wrong, i == n_targets - 1))
        x_adv = tf.where(tf.reshape(take, [-1] + [1] * (len(x.shape) - 1)), candidate, x_adv)
        fooled = tf.logical_or(fooled, wrong)
    return x_adv
