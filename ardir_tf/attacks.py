"""White-box attacks on [0, 1] pixel inputs: PGD and FGSM, Linf and L2.

Attacks are plain TensorFlow functions of `(model_fn, x, y)`. `model_fn` maps
a batch of pixels to logits, or to a dict holding "logits" (what
`models.expose` returns); pass the model in inference mode, e.g.
`lambda x: model(x, training=False)` (Madry et al.: the model is attacked in
eval mode and trained in train mode). They run eagerly, inside `tf.function`,
and inside a `train_step` under a tf.distribute strategy.

The PGD step loop is a single `tf.while_loop`, so the traced graph, and the
time to trace and compile it, does not grow with the number of steps.

`apgd` is Croce & Hein's (2020) Auto-PGD with the CE or (targeted) DLR loss,
`apgd_targeted` its APGD-T form, and `square` Andriushchenko et al.'s (2020)
Square attack, which needs no gradients (it catches gradient masking). CW-inf
is `pgd(..., loss="cw")`. With `restarts`, an attack runs again from a new
random start and keeps, per example, the first run that fooled the model.

`fab` and `fab_targeted` are Croce & Hein's (2020) FAB and FAB-T: the
adversarial example of least Linf or L2 norm they can find, with AutoAttack's
step parameters; FAB-T is the fourth attack of AutoAttack's standard set.
"""

import dataclasses
import functools
import math
import numbers
from typing import Callable, Optional, Tuple, Union

import numpy as np
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
        if isinstance(eps, float):  # the same draw as cleverhans from the same seed
            return tf.random.uniform(tf.shape(x), -eps, eps)
        return tf.random.uniform(tf.shape(x), -1.0, 1.0) * eps
    direction = tf.random.normal(tf.shape(x))
    direction /= _per_example_norm(direction) + 1e-12
    radius = tf.random.uniform(tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0))
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


def pgd(model_fn, x, y, *, eps, step_size, steps, norm="linf", loss="ce",
        random_start=True, clip=(0.0, 1.0), targets=None, restarts=1):
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
      restarts: runs from independent random starts (needs random_start when
        > 1); per example the first run that succeeded is kept.

    Returns:
      Adversarial pixels, same shape as x, float32, within the eps-ball around
      x and within clip. The last iterate (as in Madry et al.), not the best.
    """
    _check(eps, step_size, steps, norm, loss, clip)
    _check_restarts(restarts)
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 needs random_start=True (each restart would "
                         "repeat the same deterministic run)")
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.convert_to_tensor(y)
    if eps == 0:
        return x
    eps, step_size, steps = float(eps), float(step_size), int(steps)
    if restarts > 1:
        hard_labels = None if loss == "kl" or targets is None else tf.convert_to_tensor(targets)
        once = functools.partial(pgd, model_fn, x, y, eps=eps, step_size=step_size,
                                 steps=steps, norm=norm, loss=loss, clip=clip,
                                 targets=targets)
        return _first_success(model_fn, y, [once] * restarts, hard_labels)
    return _pgd_loop(model_fn, x, y, eps, step_size, steps, norm, loss, random_start, clip,
                     targets)


def pgd_per_example(model_fn, x, y, *, eps, step_size, steps, norm="linf"):
    """`pgd` (CE loss, random start, [0, 1] clip) with a radius and step size per
    example: eps and step_size are [batch] tensors. One compiled loop then
    attacks the same inputs at several radii (the eps sweep of
    `ardir_tf.sanity`) by tiling them."""
    _check(1.0, 1.0, steps, norm, "ce", (0.0, 1.0))
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    shape = tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0)
    eps = tf.reshape(tf.cast(eps, tf.float32), shape)
    step_size = tf.reshape(tf.cast(step_size, tf.float32), shape)
    return _pgd_loop(model_fn, x, tf.convert_to_tensor(y), eps, step_size, int(steps), norm,
                     "ce", True, (0.0, 1.0), None)


def _pgd_loop(model_fn, x, y, eps, step_size, steps, norm, loss, random_start, clip, targets):
    """The PGD iterations; eps and step_size are floats or per-example tensors."""
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
    restarts: int = 1

    def __post_init__(self):
        _check(self.eps, self.step_size, self.steps, self.norm, self.loss,
               self.clip)
        _check_restarts(self.restarts)

    def __call__(self, model_fn, x, y, targets=None):
        return pgd(model_fn, x, y, eps=self.eps, step_size=self.step_size,
                   steps=self.steps, norm=self.norm, loss=self.loss,
                   random_start=self.random_start, clip=self.clip,
                   targets=targets, restarts=self.restarts)

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
         clip=(0.0, 1.0), rho=0.75, momentum=0.75, restarts=1):
    """Auto-PGD (Croce & Hein 2020): PGD with momentum and a step size that halves
    at checkpoints where progress stalled; returns the best point found.

    Args:
      model_fn, x, y, eps, norm, clip: as for `pgd`.
      steps: iterations (the paper uses 100).
      loss: "ce" or "dlr" (targeted when `targets` holds target labels).
      rho: a checkpoint halves the step size unless the loss rose in at least
        this fraction of the steps since the last one.
      momentum: weight of the new step against the previous direction (0.75).
      restarts: runs from independent random starts; per example the first
        that fooled the model is kept.

    Returns:
      For each example, an iterate the model misclassified if there was one,
      else the point with the highest loss seen (within the ball and clip).
    """
    _check(eps, 1.0, steps, norm, loss, clip)
    if loss not in ("ce", "dlr"):
        raise ValueError(f"apgd takes loss 'ce' or 'dlr', got {loss!r}")
    _check_restarts(restarts)
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.convert_to_tensor(y)
    if eps == 0:
        return x
    eps, steps = float(eps), int(steps)
    if restarts > 1:
        once = functools.partial(apgd, model_fn, x, y, eps=eps, steps=steps, norm=norm,
                                 loss=loss, targets=targets, clip=clip, rho=rho,
                                 momentum=momentum)
        return _first_success(model_fn, y, [once] * restarts)
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
                  clip=(0.0, 1.0), restarts=1, targets_per_run=1):
    """APGD-T: targeted APGD-DLR towards each of the `n_targets` classes the
    model ranks highest on x after the true one (capped at the number of other
    classes); per example, the first target that fools the model wins (else the
    last attempt). Costs n_targets * restarts APGD runs.

    `targets_per_run` attempts run as one APGD loop on the batch tiled that many
    times (None: all of them; default 1: one after the other). The arithmetic
    is the same, in one loop to trace and fewer, larger operations, at that
    many times the memory of one attempt: APGD-T on the 360 test digits of the
    default run's student took 18-19 s one target at a time and 7.2-8.3 s all
    nine at once, tracing included. `evaluate` picks it from the model's size.
    Each example of the tiled batch is attacked independently, so the grouping
    changes only which random start each attempt draws.
    """
    _check(eps, 1.0, steps, norm, "dlr", clip)
    _check_restarts(restarts)
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.cast(tf.convert_to_tensor(y), tf.int32)
    logits = _logits(model_fn(x))
    n_classes = logits.shape[-1]
    if isinstance(n_targets, bool) or not isinstance(n_targets, numbers.Integral) \
            or n_targets < 1:
        raise ValueError(f"n_targets must be an integer >= 1, got {n_targets!r}")
    n_targets = min(int(n_targets), n_classes - 1)
    ranked = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    # Drop the true class from the ranking, keep the order of the others.
    others = tf.reshape(tf.boolean_mask(ranked, tf.not_equal(ranked, y[:, None])),
                        [-1, n_classes - 1])
    attempts = [i for i in range(n_targets) for _ in range(restarts)]
    if targets_per_run is not None:
        _check_count("targets_per_run", targets_per_run)
    per_run = len(attempts) if targets_per_run is None else int(targets_per_run)
    candidates = []
    for start in range(0, len(attempts), per_run):
        group = attempts[start: start + per_run]
        k = len(group)
        out = apgd(model_fn, tf.tile(x, [k] + [1] * (x.shape.rank - 1)), tf.tile(y, [k]),
                   eps=eps, steps=steps, norm=norm, loss="dlr", clip=clip,
                   targets=tf.concat([others[:, i] for i in group], 0))
        candidates.extend(tf.split(out, k, axis=0))
    return _first_success(model_fn, y, [lambda c=c: c for c in candidates])


def _flat(t):
    return tf.reshape(t, [tf.shape(t)[0], -1])


def _norm_p(flat, norm):
    """Per-example Linf or L2 norm of flat [batch, d] rows."""
    if norm == "linf":
        return tf.reduce_max(tf.abs(flat), axis=1)
    return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1))


def box_projection(t, w, b, norm, low=0.0, high=1.0):
    """The smallest displacement (Linf or L2) taking each row of t onto its
    hyperplane w . z = b while staying in the box [low, high]: FAB's projection
    step (Croce & Hein 2020, section 3).

    Args:
      t, w: float32 [batch, d]; b: float32 [batch].
      norm: "linf" or "l2".

    Returns:
      delta [batch, d] with w . (t + delta) = b and t + delta in the box, of the
      least norm; where the box does not reach the hyperplane, the box corner
      nearest to it (each coordinate moved as far as it can towards it).

    Orient the hyperplane so that w . z must fall by c = w . t - b >= 0. Every
    coordinate then moves against the sign of w_i, at most its room r_i (to
    low or high). For a Linf radius lam the best fall is sum_i |w_i| min(lam, r_i),
    and the L2 minimiser is |delta_i| = min(mu |w_i|, r_i) (the KKT conditions),
    a fall of sum_i |w_i| min(mu |w_i|, r_i). Both are piecewise linear and
    nondecreasing in their one parameter, with breakpoints r_i (Linf) or
    r_i / |w_i| (L2): sorting the breakpoints, their cumulative sums give the
    fall at each, a search finds the segment holding c, and the parameter is
    solved for exactly. (The reference implementation bisects over the same
    sorted breakpoints.)
    """
    c = tf.reduce_sum(w * t, axis=1) - b
    sign = tf.where(c >= 0, 1.0, -1.0)
    w, c = w * sign[:, None], c * sign
    moving = tf.not_equal(w, 0.0)
    room = tf.where(moving, tf.where(w > 0, t - low, high - t), 0.0)
    room = tf.maximum(room, 0.0)
    aw = tf.abs(w)
    if norm == "linf":
        breaks, tail = room, aw
    else:
        breaks, tail = tf.math.divide_no_nan(room, aw), tf.square(aw)
    head = aw * room  # the fall of a coordinate that reached its bound
    order = tf.argsort(breaks, axis=1, stable=True)
    breaks_s = tf.gather(breaks, order, batch_dims=1)
    head_c = tf.cumsum(tf.gather(head, order, batch_dims=1), axis=1, exclusive=True)
    tail_c = tf.cumsum(tf.gather(tail, order, batch_dims=1), axis=1, reverse=True)
    fall = head_c + breaks_s * tail_c  # at each breakpoint, nondecreasing
    d = tf.shape(t)[1]
    k = tf.searchsorted(fall, c[:, None], side="left")[:, 0]
    in_range = k < d
    k = tf.minimum(k, d - 1)
    tail_k = tf.gather(tail_c, k[:, None], batch_dims=1)[:, 0]
    # A zero tail (weights underflowing to 0) cannot reach c: the corner then.
    feasible = tf.logical_and(in_range, tf.logical_or(tail_k > 0, c <= 0))
    value = tf.math.divide_no_nan(c - tf.gather(head_c, k[:, None], batch_dims=1)[:, 0],
                                  tail_k)
    value = tf.maximum(value, 0.0)[:, None]
    size = tf.minimum(value if norm == "linf" else value * aw, room)
    size = tf.where(feasible[:, None], size, room)
    return -tf.sign(w) * size


def _fab_check(eps, steps, norm, clip, alpha_max, eta, beta, restarts):
    _check(eps, 1.0, steps, norm, "ce", clip)
    if clip is None:
        raise ValueError("fab needs a box: clip=(low, high), e.g. (0.0, 1.0)")
    _check_restarts(restarts)
    for name, value, ok in (("alpha_max", alpha_max, lambda v: 0 <= v <= 1),
                            ("eta", eta, lambda v: v >= 1), ("beta", beta, lambda v: 0 < v <= 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
            raise ValueError(f"{name} must be a number in FAB's range (alpha_max in "
                             f"[0, 1], eta >= 1, beta in (0, 1]), got {value!r}")


def _fab_run(model_fn, x, y, targets, norm, steps, alpha_max, eta, beta, clip, start):
    """One FAB run from `start`: (the adversarial point of least norm found [x's
    shape], its norm [batch]; inf where none was found). Untargeted when
    `targets` is None (the nearest linearised boundary of all classes), else
    the boundary between y and targets."""
    shape, low, high = tf.shape(x), float(clip[0]), float(clip[1])
    x0 = _flat(x)
    y = tf.cast(y, tf.int32)

    def boundary(z):
        """The linearisation at z: (f_j(z) - f_y(z), the gradient w of it)."""
        image = tf.reshape(z, shape)
        with tf.GradientTape(persistent=targets is None) as tape:
            tape.watch(image)
            logits = _logits(model_fn(image))
            if targets is not None:
                gap = _true_logit(logits, targets) - _true_logit(logits, y)
                total = tf.reduce_sum(gap)  # examples are independent: one gradient
            else:
                columns = tf.unstack(logits, axis=1)  # recorded, for one gradient each
        if targets is not None:
            return gap, _flat(tape.gradient(total, image)), logits
        grads = tf.stack([_flat(tape.gradient(column, image)) for column in columns],
                         axis=1)  # [batch, K, d]
        del tape
        gaps = logits - _true_logit(logits, y)[:, None]
        dg = grads - tf.gather(grads, y, batch_dims=1)[:, None, :]
        dual = tf.reduce_sum(tf.abs(dg), -1) if norm == "linf" else \
            tf.sqrt(tf.reduce_sum(tf.square(dg), -1))
        distance = tf.abs(gaps) / (dual + 1e-12)
        distance = tf.where(tf.one_hot(y, logits.shape[-1]) > 0, np.inf, distance)
        j = tf.argmin(distance, axis=1, output_type=tf.int32)
        return tf.gather(gaps, j, batch_dims=1), tf.gather(dg, j, batch_dims=1), logits

    def wrong(z):
        logits = _logits(model_fn(tf.reshape(z, shape)))
        return tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), y)

    clean_wrong = wrong(x0)
    best_norm = tf.where(clean_wrong, 0.0, np.inf)

    def step(i, z, best, best_norm):
        gap, w, _ = boundary(z)
        b = tf.reduce_sum(w * z, axis=1) - gap  # where the linearisation is zero
        both = box_projection(tf.concat([z, x0], 0), tf.concat([w, w], 0),
                              tf.concat([b, b], 0), norm, low, high)
        d1, d2 = tf.split(both, 2, axis=0)
        a1 = tf.maximum(_norm_p(d1, norm), 1e-8)
        a2 = tf.maximum(_norm_p(d2, norm), 1e-8)
        alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        z = tf.clip_by_value((1 - alpha) * (z + eta * d1) + alpha * (x0 + eta * d2),
                             low, high)
        adversarial = wrong(z)
        distance = _norm_p(z - x0, norm)
        better = tf.logical_and(adversarial, distance < best_norm)
        best = tf.where(better[:, None], z, best)
        best_norm = tf.where(better, distance, best_norm)
        # Past the boundary: back towards x, to look for a nearer crossing.
        z = tf.where(adversarial[:, None], x0 + beta * (z - x0), z)
        return i + 1, tf.stop_gradient(z), tf.stop_gradient(best), best_norm

    _, _, best, best_norm = tf.while_loop(
        lambda i, *_: i < steps, step, (tf.constant(0), _flat(start), x0, best_norm),
        maximum_iterations=steps)
    return tf.reshape(best, shape), best_norm


def _fab_start(x, eps, norm, clip):
    """A restart's start: a random point at distance eps / 2 (as the reference)."""
    direction = tf.random.uniform(tf.shape(x), -1.0, 1.0) if norm == "linf" else \
        tf.random.normal(tf.shape(x))
    flat = _flat(direction)
    scale = (eps / 2) / (_norm_p(flat, norm) + 1e-12)
    return tf.clip_by_value(x + tf.reshape(flat * scale[:, None], tf.shape(x)), *clip)


def _fab_finish(model_fn, x, y, candidates, eps, norm, clip, return_norms):
    """Per example the candidate of least norm; x where it is above eps or not
    adversarial after projection onto the ball and the clip range."""
    points = tf.stack([c[0] for c in candidates])
    norms = tf.stack([c[1] for c in candidates])  # [runs, batch]
    pick = tf.argmin(norms, axis=0, output_type=tf.int32)
    best = tf.gather(tf.transpose(points, [1, 0] + list(range(2, points.shape.rank))),
                     pick[:, None], batch_dims=1)[:, 0]
    best_norm = tf.reduce_min(norms, axis=0)
    mask_shape = tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0)
    x_adv = tf.where(tf.reshape(best_norm <= eps, mask_shape), best, x)
    x_adv = tf.clip_by_value(x + _project(x_adv - x, eps, norm), *clip)
    # Never report a point as broken that is not: check the returned point itself.
    kept = tf.logical_or(_succeeded(model_fn, x_adv, y), best_norm > eps)
    x_adv = tf.where(tf.reshape(kept, mask_shape), x_adv, x)
    # A point the check sent back to x has no adversarial example to show.
    return (x_adv, tf.where(kept, best_norm, np.inf)) if return_norms else x_adv


def fab(model_fn, x, y, *, eps, norm="linf", steps=100, restarts=1, alpha_max=0.1,
        eta=1.05, beta=0.9, clip=(0.0, 1.0), return_norms=False):
    """FAB (Croce & Hein 2020, "Minimally distorted adversarial examples with a
    fast adaptive boundary attack"): the adversarial example of least Linf or L2
    norm it can find, untargeted.

    Each step linearises the model at the current point, takes the nearest
    class boundary of the linearisation (|f_j - f_y| / ||grad(f_j - f_y)||,
    dual norm), projects both the current point and x onto it within the clip
    box (`box_projection`), and moves to a mix of the two, biased towards x's
    projection by alpha = min(||d1|| / (||d1|| + ||d2||), alpha_max), overshooting
    by eta. A point past the boundary is kept if it is the nearest yet, and the
    next step starts from x + beta (point - x), nearer x.

    Args:
      model_fn, x, y, norm: as for `pgd`.
      eps: the threat radius: the result is x unless FAB found an adversarial
        example within it; restarts start at distance eps / 2.
      steps: iterations per run (100 in AutoAttack).
      restarts: runs; the first from x, the others from random points.
      alpha_max, eta, beta: the paper's step parameters (0.1, 1.05, 0.9).
      clip: the box (low, high) the projections stay in.
      return_norms: also return each example's least norm found ([batch];
        inf where FAB found none, 0 where the model is wrong on x), whatever eps.

    Each step takes one gradient a class (K backward passes, [batch, K, d] of
    memory); `fab_targeted` takes one a target, and is what AutoAttack runs.

    Returns:
      x_adv (x's shape), adversarial and within eps and clip where FAB broke the
      point, else x; with return_norms, (x_adv, norms).
    """
    _fab_check(eps, steps, norm, clip, alpha_max, eta, beta, restarts)
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.cast(tf.convert_to_tensor(y), tf.int32)
    eps, steps = float(eps), int(steps)
    runs = [_fab_run(model_fn, x, y, None, norm, steps, float(alpha_max), float(eta),
                     float(beta), clip, x if r == 0 else _fab_start(x, eps, norm, clip))
            for r in range(restarts)]
    return _fab_finish(model_fn, x, y, runs, eps, norm, clip, return_norms)


def fab_targeted(model_fn, x, y, *, eps, norm="linf", steps=100, n_targets=9, restarts=1,
                 alpha_max=0.1, eta=1.05, beta=0.9, clip=(0.0, 1.0), targets_per_run=None,
                 return_norms=False):
    """FAB-T, AutoAttack's form of `fab`: one FAB run per target class, towards
    the boundary between the true class and each of the `n_targets` classes the
    model ranks highest on x after it (9 in AutoAttack's standard set). A run
    succeeds on any wrong class, as AutoAttack's; per example the adversarial
    point of least norm over the targets is kept. Each step needs one gradient
    (untargeted FAB needs one a class).

    `targets_per_run` targets run as one loop on the batch tiled that many times.
    The default, None, runs all of them at once, at n_targets times the memory
    of one run (unlike `apgd_targeted`, whose default is 1); `evaluate` sets it
    from the model's size, as for APGD-T. Other arguments as for `fab`.
    """
    _fab_check(eps, steps, norm, clip, alpha_max, eta, beta, restarts)
    if isinstance(n_targets, bool) or not isinstance(n_targets, numbers.Integral) \
            or n_targets < 1:
        raise ValueError(f"n_targets must be an integer >= 1, got {n_targets!r}")
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.cast(tf.convert_to_tensor(y), tf.int32)
    eps, steps = float(eps), int(steps)
    logits = _logits(model_fn(x))
    n_classes = logits.shape[-1]
    n_targets = min(int(n_targets), n_classes - 1)
    ranked = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    others = tf.reshape(tf.boolean_mask(ranked, tf.not_equal(ranked, y[:, None])),
                        [-1, n_classes - 1])
    if targets_per_run is not None:
        _check_count("targets_per_run", targets_per_run)
    per_run = n_targets if targets_per_run is None else int(targets_per_run)
    tile = [1] * (x.shape.rank - 1)
    candidates = []
    for restart in range(restarts):
        for first in range(0, n_targets, per_run):
            group = list(range(first, min(first + per_run, n_targets)))
            k = len(group)
            xs = tf.tile(x, [k] + tile)
            start = xs if restart == 0 else _fab_start(xs, eps, norm, clip)
            points, norms = _fab_run(
                model_fn, xs, tf.tile(y, [k]), tf.concat([others[:, i] for i in group], 0),
                norm, steps, float(alpha_max), float(eta), float(beta), clip, start)
            candidates.extend(zip(tf.split(points, k, axis=0), tf.split(norms, k, axis=0)))
    return _fab_finish(model_fn, x, y, candidates, eps, norm, clip, return_norms)


def _square_p(p_init, i, queries):
    """Andriushchenko et al.'s schedule of the fraction of pixels a square
    covers: p_init halved at fixed points of a 10,000-query budget (rescaled)."""
    i = int(i / queries * 10000)
    for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                           (4000, 64), (6000, 128), (8000, 256), (10000, 512)):
        if i <= bound:
            return p_init / divisor
    return p_init / 512


def _eta_rectangles(a, b):
    d = np.zeros([a, b])
    if a == 0 or b == 0:
        return d
    r, c = a // 2, b // 2
    for k in range(max(a // 2 + 1, b // 2 + 1)):
        d[max(r, 0):min(r + 2 * k + 1, a), max(c, 0):min(c + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
        r, c = r - 1, c - 1
    return d / np.sqrt(np.sum(d ** 2))


def _square_l2_pattern(s):
    """The L2 Square attack's s x s update: two nested-rectangle bumps of
    opposite sign, unit L2 norm."""
    d = np.zeros([s, s])
    d[: s // 2] = _eta_rectangles(s // 2, s)
    d[s // 2:] = -_eta_rectangles(s - s // 2, s)
    return (d / np.sqrt(np.sum(d ** 2))).astype(np.float32)


def _window(n, starts, size):
    """[batch, n] booleans: index in [start, start + size) for each example."""
    idx = tf.range(n)[None, :]
    return tf.logical_and(idx >= starts[:, None], idx < starts[:, None] + size)


def square(model_fn, x, y, *, eps, queries=5000, norm="linf", p_init=0.8,
           clip=(0.0, 1.0)):
    """Square attack (Andriushchenko et al. 2020): random search for an
    adversarial example that only queries the model's logits, never its
    gradients, so gradient masking cannot hide a weak model from it.

    Each query changes one random square window per example (Linf: the window
    jumps to a vertex of the cube x +- eps; L2: mass moves between two windows,
    keeping the perturbation on the sphere) and is kept if it lowers the
    margin z_y - max_{j!=y} z_j. An example stops counting once fooled, and
    the model is no longer queried on it (on the digits student: 20 s -> 15.6
    s for 5,000 queries on 360 points, the same result). The
    window covers a fraction of the image that shrinks from p_init on the
    paper's schedule.

    Args:
      model_fn, x, y, eps, norm, clip: as for `pgd`; x is [batch, H, W, C].
      queries: model evaluations per example (AutoAttack uses 5000).
      p_init: initial fraction of pixels a window covers (0.8 in AutoAttack).

    Returns:
      The lowest-margin point found per example (x itself where the clean
      input is already misclassified), within the ball and clip.
    """
    _check(eps, 1.0, queries, norm, "ce", clip)
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    y = tf.cast(tf.convert_to_tensor(y), tf.int32)
    if x.shape.rank != 4 or None in x.shape[1:]:
        raise ValueError(f"square needs images [batch, H, W, C] with known H, W, C; "
                         f"got shape {x.shape}")
    if eps == 0:
        return x
    eps = float(eps)
    h, w, c = x.shape[1:]
    batch = tf.shape(x)[0]
    low, high = clip if clip is not None else (-np.inf, np.inf)

    def margin(z, labels=y):
        logits = _logits(model_fn(z))
        return _true_logit(logits, labels) - _other_max(logits, labels)

    def signs(shape):
        return 2.0 * tf.cast(tf.random.uniform(shape, 0, 2, tf.int32), tf.float32) - 1.0

    def corners(s):
        return (tf.random.uniform([batch], 0, h - s + 1, tf.int32),
                tf.random.uniform([batch], 0, w - s + 1, tf.int32))

    def mask(s, rows, cols):
        m = tf.logical_and(_window(h, rows, s)[:, :, None], _window(w, cols, s)[:, None, :])
        return tf.cast(m, tf.float32)[..., None]  # [batch, h, w, 1]

    def l2_normalise(d):
        return d / (_per_example_norm(d) + 1e-12)

    if norm == "linf":
        # Start: vertical stripes, each column at +eps or -eps.
        start = x + eps * signs(tf.stack([batch, 1, w, c]))
    else:
        # Start: a grid of the pseudo-Gaussian bumps with random signs.
        s0 = max(h // 5, 1)
        # tile: the bump in every s0 x s0 cell; cell: which cell a pixel is in
        # (each cell gets its own random sign per channel).
        tile, cell = np.zeros([h, w], np.float32), np.zeros([h, w], np.int32)
        pattern = _square_l2_pattern(s0)
        off = (h - s0 * (h // s0)) // 2, (w - s0 * (w // s0)) // 2
        for i in range(h // s0):
            for j in range(w // s0):
                window = (slice(off[0] + i * s0, off[0] + (i + 1) * s0),
                          slice(off[1] + j * s0, off[1] + (j + 1) * s0))
                tile[window] = pattern
                cell[window] = i * (w // s0) + j
        cell_signs = signs(tf.stack([batch, (h // s0) * (w // s0), c]))
        delta = tf.gather(cell_signs, tf.reshape(cell, [-1]), axis=1)
        delta = tf.reshape(delta, [batch, h, w, c]) * tile[None, :, :, None]
        start = x + eps * l2_normalise(delta)
    start = tf.clip_by_value(start, low, high)
    m_clean = margin(x)
    m_start = margin(start)
    use_start = tf.logical_and(m_start < m_clean, m_clean > 0)
    best = tf.where(use_start[:, None, None, None], start, x)
    best_m = tf.minimum(m_start, m_clean)

    def linf_candidate(best, s):
        rows, cols = corners(s)
        m = mask(s, rows, cols)
        vertex = tf.clip_by_value(x + eps * signs(tf.stack([batch, 1, 1, c])), low, high)
        return m * vertex + (1.0 - m) * best

    def l2_candidate(best, s, pattern):
        delta = best - x
        r1, c1 = corners(s)
        r2, c2 = corners(s)
        m1, m2 = mask(s, r1, c1), mask(s, r2, c2)
        # The pattern placed at each example's first window (transposed at random).
        flip = tf.random.uniform([batch]) < 0.5
        p = tf.where(flip[:, None, None], tf.transpose(pattern)[None], pattern[None])
        inside_r = tf.clip_by_value(tf.range(h)[None, :] - r1[:, None], 0, s - 1)
        inside_c = tf.clip_by_value(tf.range(w)[None, :] - c1[:, None], 0, s - 1)
        placed = tf.gather(tf.gather(p, inside_r, axis=1, batch_dims=1), inside_c, axis=2,
                           batch_dims=1)[..., None] * m1
        window_norm = tf.sqrt(tf.reduce_sum(tf.square(delta * m1), [1, 2], keepdims=True))
        image_norm = _per_example_norm(delta)
        both_norm = _per_example_norm(delta * tf.maximum(m1, m2))
        new = placed * signs(tf.stack([batch, 1, 1, c])) + delta * m1 / (window_norm + 1e-12)
        new_norm = tf.sqrt(tf.reduce_sum(tf.square(new), [1, 2], keepdims=True))
        # Budget for the window: what the two windows held plus what is left of eps.
        budget = tf.sqrt(tf.maximum(eps ** 2 - image_norm ** 2, 0.0) / c + both_norm ** 2)
        delta = delta * (1.0 - m2) * (1.0 - m1) + new / (new_norm + 1e-12) * budget
        return tf.clip_by_value(x + eps * l2_normalise(delta), low, high)

    # The window size of every query, from the schedule; one loop for all of
    # them (a size is a tensor; L2 patterns are padded into one table).
    n_features = h * w * c
    sizes = []
    for i in range(1, queries):
        s = int(round(math.sqrt(_square_p(p_init, i, queries) * n_features / c)))
        if norm == "linf":
            s = min(max(s, 1), h - 1, w - 1) if min(h, w) > 1 else 1
        else:
            s = max(s, 3)
            s = min(s + 1 if s % 2 == 0 else s, h, w)
        sizes.append(s)
    if not sizes:
        return tf.stop_gradient(best)
    distinct = sorted(set(sizes))
    table = np.zeros([len(distinct), max(distinct), max(distinct)], np.float32)
    for k, size in enumerate(distinct):
        if norm == "l2":
            table[k, :size, :size] = _square_l2_pattern(size)
    size_of = tf.constant(sizes, tf.int32)
    pattern_of = tf.constant([distinct.index(size) for size in sizes], tf.int32)
    table = tf.constant(table)

    def body(i, best, best_m):
        size = size_of[i]
        candidate = (linf_candidate(best, size) if norm == "linf"
                     else l2_candidate(best, size, tf.gather(table, pattern_of[i])))
        # Only examples not fooled yet move; a fooled one keeps its point, so
        # the model is queried on the ones still standing only.
        standing = tf.where(best_m > 0)
        m = tf.tensor_scatter_nd_update(
            tf.fill(tf.shape(best_m), np.float32(np.inf)), standing,
            margin(tf.gather_nd(candidate, standing), tf.gather_nd(y, standing)))
        take = m < best_m
        return (i + 1, tf.where(take[:, None, None, None], candidate, best),
                tf.where(take, m, best_m))

    _, best, best_m = tf.while_loop(
        lambda i, _, m: tf.logical_and(i < len(sizes), tf.reduce_any(m > 0)), body,
        (tf.constant(0), best, best_m), maximum_iterations=len(sizes))
    return tf.stop_gradient(best)
