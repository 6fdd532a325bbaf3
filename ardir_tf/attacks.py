"""White-box attacks on [0, 1] pixel inputs: PGD and FGSM, Linf and L2.

Attacks are plain TensorFlow functions of `(model_fn, x, y)`. `model_fn` maps
a batch of pixels to logits, or to a dict holding "logits" (what
`models.expose` returns); pass the model in inference mode, e.g.
`lambda x: model(x, training=False)` (Madry et al.: the model is attacked in
eval mode and trained in train mode). They run eagerly, inside `tf.function`,
and inside a `train_step` under a tf.distribute strategy.

The PGD step loop is a single `tf.while_loop`, so the traced graph, and the
time to trace and compile it, does not grow with the number of steps.

Left out here: restarts, APGD, the Square attack (the evaluation suite's work).
"""

import dataclasses
import numbers
from typing import Callable, Optional, Tuple, Union

import tensorflow as tf

NORMS = ("linf", "l2")
LOSSES = ("ce", "kl", "cw")


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
    raise ValueError(f"unknown attack loss {loss!r}; valid: {', '.join(LOSSES)} "
                     "or a callable(outputs, y)")


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
