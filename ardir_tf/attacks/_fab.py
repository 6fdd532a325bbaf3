"""FAB and FAB-T (Croce & Hein 2020): the adversarial example of least Linf or
L2 norm, with AutoAttack's step parameters, and the box projection they need."""

import numbers

import numpy as np
import tensorflow as tf

from ardir_tf.attacks._common import (
    _check, _check_count, _check_restarts, _logits, _project, _succeeded, _true_logit, normal,
    uniform)


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
    direction = uniform(tf.shape(x), -1.0, 1.0) if norm == "linf" else normal(tf.shape(x))
    flat = _flat(direction)
    scale = (eps / 2) / (_norm_p(flat, norm) + 1e-12)
    return tf.clip_by_value(x + tf.reshape(flat * scale[:, None], tf.shape(x)), *clip)


def _fab_finish(model_fn, x, y, candidates, eps, norm, clip, return_norms):
    """Per example the candidate of least norm among those still adversarial
    after projection onto the ball and the clip range (a run's point can lose
    that by a rounding's worth); x where none within eps is.

    The norms returned: the chosen candidate's; beyond eps, the least found
    (x is returned then); inf where no candidate is adversarial. Candidates
    are checked one at a time: a forward pass of one batch each, within the
    memory the runs were given (`targets_per_run`)."""
    mask_shape = tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0)
    chosen, least = x, tf.fill(tf.shape(x)[:1], np.inf)
    for point, found in candidates:
        with tf.control_dependencies([least]):  # one check after the other
            projected = tf.clip_by_value(x + _project(point - x, eps, norm), *clip)
        # Never report a point as broken that is not: check each candidate itself.
        usable = tf.where(tf.logical_or(_succeeded(model_fn, projected, y), found > eps),
                          found, np.inf)
        better = usable < least  # strict: the first of equal norms, as argmin
        chosen = tf.where(tf.reshape(better, mask_shape), projected, chosen)
        least = tf.minimum(least, usable)
    x_adv = tf.where(tf.reshape(least <= eps, mask_shape), chosen, x)
    return (x_adv, least) if return_norms else x_adv


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
