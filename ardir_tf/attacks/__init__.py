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

Their random numbers come from `uniform` and `normal`: TensorFlow's stateful
random ops (a graph seed repeats them), or inside `drawing_from(generator)`
a tf.random.Generator's, which `evaluate` resets before each batch so that a
batch's draws depend on the seed, the attack's name and the batch only.

`fab` and `fab_targeted` are Croce & Hein's (2020) FAB and FAB-T: the
adversarial example of least Linf or L2 norm they can find, with AutoAttack's
step parameters; FAB-T is the fourth attack of AutoAttack's standard set.

One module a family, and one for what they share; every name is read from here
(`ardir_tf.attacks.pgd`, ...):

    _common.py   the objectives (CE, KL, CW, DLR), argument checks, projections,
                 random starts, the first-success bookkeeping
    _pgd.py      pgd, pgd_per_example, fgsm, PGD
    _apgd.py     apgd, apgd_targeted
    _fab.py      fab, fab_targeted, box_projection
    _square.py   square
"""

from ardir_tf.attacks._apgd import _apgd_checkpoints, apgd, apgd_targeted  # noqa: F401
from ardir_tf.attacks._common import (  # noqa: F401
    LOSSES, NORMS, _first_success, _logits, attack_objective, drawing_from, normal, uniform)
from ardir_tf.attacks._fab import box_projection, fab, fab_targeted  # noqa: F401
from ardir_tf.attacks._pgd import PGD, fgsm, pgd, pgd_per_example  # noqa: F401
from ardir_tf.attacks._square import _square_l2_pattern, _square_p, square  # noqa: F401

__all__ = ["LOSSES", "NORMS", "PGD", "apgd", "apgd_targeted", "attack_objective",
           "box_projection", "drawing_from", "fab", "fab_targeted", "fgsm", "normal", "pgd",
           "pgd_per_example", "square", "uniform"]
