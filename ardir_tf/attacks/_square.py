"""Square (Andriushchenko et al. 2020): a score-based random search that needs
no gradients, Linf and L2."""

import math

import numpy as np
import tensorflow as tf

from ardir_tf.attacks._common import (
    _check, _logits, _other_max, _per_example_norm, _true_logit, uniform)


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

    Longer than the house's 80 lines, on purpose: the Linf and L2 proposals
    and the acceptance step live in one `tf.while_loop` body over one shared
    state (points, margins, losses, the query counter), as the paper's
    Algorithm 1 states them; the L2 tables are built once before the loop.
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
        return 2.0 * tf.cast(uniform(shape, 0, 2, tf.int32), tf.float32) - 1.0

    def corners(s):
        return (uniform([batch], 0, h - s + 1, tf.int32),
                uniform([batch], 0, w - s + 1, tf.int32))

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
        flip = uniform([batch]) < 0.5
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
