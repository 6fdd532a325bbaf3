"""PGD (Madry et al. 2018) and FGSM, Linf and L2, with the CE, KL, CW and DLR
objectives; `PGD`, a configuration that runs `pgd`."""

import dataclasses
import functools
from typing import Callable, Optional, Tuple, Union

import tensorflow as tf

from ardir_tf.attacks._common import (
    _check, _check_restarts, _first_success, _logits, _per_example_norm, _project,
    _random_start, attack_objective)


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
    `ardir_tf.sanity`) by tiling them.

    Unlike `pgd`, which returns its last iterate (as Madry et al.'s and
    cleverhans's do), it returns each example's first iterate the model
    misclassifies, and the last one where there is none: a point PGD broke on
    the way counts as broken, so that more steps can only break more (with a
    fixed step size the iterates circle around the optimum, and the last one
    can be classified right when an earlier one was not). The sanity checks
    compare step counts and radii on that footing."""
    _check(1.0, 1.0, steps, norm, "ce", (0.0, 1.0))
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    shape = tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0)
    eps = tf.reshape(tf.cast(eps, tf.float32), shape)
    step_size = tf.reshape(tf.cast(step_size, tf.float32), shape)
    return _pgd_loop(model_fn, x, tf.convert_to_tensor(y), eps, step_size, int(steps), norm,
                     "ce", True, (0.0, 1.0), None, keep_first_success=True)


def _pgd_loop(model_fn, x, y, eps, step_size, steps, norm, loss, random_start, clip, targets,
              keep_first_success=False):
    """The PGD iterations; eps and step_size are floats or per-example tensors.
    keep_first_success: return each example's first misclassified iterate (the
    last one where none is) instead of the last."""
    def to_valid(x_adv):
        x_adv = x + _project(x_adv - x, eps, norm)
        return x_adv if clip is None else tf.clip_by_value(x_adv, *clip)

    x_adv = to_valid(x + _random_start(x, eps, norm)) if random_start else x
    if keep_first_success:
        mask_shape = tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0)
        labels = tf.cast(y, tf.int64)

    def step(i, x_adv, found, first):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            outputs = model_fn(x_adv)
            objective = tf.reduce_sum(attack_objective(loss, outputs, y, targets))
        if keep_first_success:  # the iterate the gradient was taken at
            wrong = tf.not_equal(tf.argmax(_logits(outputs), -1), labels)
            first = tf.where(tf.reshape(wrong & ~found, mask_shape), x_adv, first)
            found = found | wrong
        grad = tape.gradient(objective, x_adv)
        if grad is None:
            raise ValueError("the attack objective does not depend on the input: "
                             "does model_fn use its argument?")
        if norm == "linf":
            direction = tf.sign(grad)
        else:
            direction = grad / (_per_example_norm(grad) + 1e-12)
        return i + 1, tf.stop_gradient(to_valid(x_adv + step_size * direction)), found, first

    if not keep_first_success:  # the training attack's loop: no bookkeeping carried
        _, x_adv = tf.while_loop(lambda i, _: i < steps,
                                 lambda i, z: step(i, z, None, None)[:2],
                                 (tf.constant(0), x_adv), maximum_iterations=steps)
        return x_adv
    _, x_adv, found, first = tf.while_loop(
        lambda i, *_: i < steps, step,
        (tf.constant(0), x_adv, tf.zeros(tf.shape(x)[:1], tf.bool), x_adv),
        maximum_iterations=steps)
    # Where no iterate the loop stepped from was misclassified: the last one
    # (whoever runs the attack checks it).
    return tf.where(tf.reshape(found, mask_shape), first, x_adv)


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
