"""APGD (Croce & Hein 2020): Auto-PGD with CE or DLR, and APGD-T, its targeted
form over the classes the model ranks highest."""

import functools
import math
import numbers

import tensorflow as tf

from ardir_tf import attacks
from ardir_tf.attacks._common import (
    _check, _check_count, _check_restarts, _first_success, _logits, _per_example_norm,
    _project, _random_start, attack_objective)


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

    Longer than the house's 80 lines, on purpose: the body is one
    `tf.while_loop` whose state (iterate, momentum, step size, the best point
    and the checkpoint counters) the paper's Algorithm 1 updates together;
    split into functions, that state would be threaded through every call and
    the step could no longer be read against the paper line by line.
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
        # Through the package: a replaced ardir_tf.attacks.apgd (a wrapper, a
        # test double) is the one APGD-T runs.
        out = attacks.apgd(model_fn, tf.tile(x, [k] + [1] * (x.shape.rank - 1)),
                           tf.tile(y, [k]),
                           eps=eps, steps=steps, norm=norm, loss="dlr", clip=clip,
                           targets=tf.concat([others[:, i] for i in group], 0))
        candidates.extend(tf.split(out, k, axis=0))
    return _first_success(model_fn, y, [lambda c=c: c for c in candidates])
