"""Sanity checks that every robustness evaluation runs on itself.

After Carlini et al., "On Evaluating Adversarial Robustness" (2019): numbers
from an evaluation that fails one of these are not to be trusted, usually
because the model masks its gradients (the attacks see no useful gradient, so
they fail, and the model looks robust when it is not).

    eps_sweep           PGD-20 accuracy never rises as eps grows
    more_steps          PGD-100 is no weaker than PGD-20, PGD-20 than PGD-10
    unbounded           PGD-100 with an eps that spans the whole pixel range
                        drives accuracy to (near) zero
    square_vs_gradient  the gradient-free Square attack breaks few of the points
                        the gradient attacks left standing (a share of those
                        points; passes when there are none)

Each returns {"passed": bool, "message": str, ...the numbers it used}. They
run on the first `sanity_examples` examples of the evaluation (see
`ardir_tf.evaluate`), and reuse its per-example results where they can.

Their attacks within the threat model (PGD-10, PGD-20 and PGD-100 at eps, and
Square-1000 when the evaluation has no gradient-free attack) are attacks like
any other: `check` also returns which examples survived all of them, and the
evaluation's worst case counts an example only if it survived these too.
"""

import functools
import math

import numpy as np

from ardir_tf import attacks

# Accuracy may rise by this much (or two examples, if more) and still count as
# "not rising": with random starts, a few examples flip either way between runs.
TOLERANCE = 0.01
# ...and a larger rise counts only if the random starts do not explain it: of
# the examples the two runs disagree on, the later one (more steps, a larger
# eps) leaves standing more than a fair coin would, at this one-sided p-value
# (a sign test). With none the other way, p < 0.01 needs a rise of 7 examples
# (2^-7 < 0.01 < 2^-6), so below about 700 examples that, not the slack, is
# the smallest rise that fails. Each run draws its own random starts; on the
# default digits run's honest teacher and student, one seed's PGD-100 at eps
# left up to 6 more of 360 examples standing than its PGD-20, which the slack
# alone failed on 2 seeds of 20 (docs/results/digits.md).
SIGNIFICANCE = 0.01
# "Near zero" for the unbounded attack.
UNBOUNDED_MAX_ACCURACY = 0.05
# Square may break this fraction of the points the gradient attacks left
# standing (or 2 of them, if more) before the gradient attacks are called
# masked. On honest models (the default digits run's teacher and student)
# Square-1000 broke 1.6% and 3.1% of the points the fast attacks left standing
# (docs/results/digits.md).
SQUARE_MARGIN = 0.05
EPS_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0)
SANITY_SQUARE_QUERIES = 1000


def _rises(before, after):
    """Whether `after` (right after the attack, per example) leaves more
    examples standing than `before` by more than the slack and than random
    starts explain."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    n = len(before)
    up = int(np.sum(after & ~before))  # right after it, broken before it
    down = int(np.sum(before & ~after))
    if up - down <= max(TOLERANCE * n, 2.0):
        return False
    return _sign_test(up, up + down) < SIGNIFICANCE


def _sign_test(k, n):
    """P(X >= k) for X ~ Binomial(n, 1/2), summed in log space (linear in n)."""
    if k <= 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _not_rising(rights):
    """No run in `rights` (booleans per example, in order) leaves significantly
    more examples standing than the one before it."""
    return not any(_rises(a, b) for a, b in zip(rights, rights[1:]))


def run_checks(runner, x, y, clean, robust, gradient_free, *, eps, norm, verbose=0):
    """The four checks on examples (x, y): `check`'s checks alone."""
    return check(runner, x, y, clean, robust, gradient_free, eps=eps, norm=norm,
                 verbose=verbose)[0]


def check(runner, x, y, clean, robust, gradient_free, *, eps, norm, verbose=0):
    """The four checks on examples (x, y), and which examples survived their
    attacks within the threat model.

    Args:
      runner: an `evaluate._Runner`.
      clean: booleans, the model is right on the clean example.
      robust: {attack name: booleans} the evaluation's results on these examples.
      gradient_free: {attack name: bool}.
      eps, norm: the threat model.

    Returns:
      (checks, survived): checks {name: result} as the module docstring says,
      plus n_examples; survived, booleans [n]: the model is right on the
      example after every attack the checks ran within eps (PGD-10, PGD-20,
      PGD-100, and their own Square-1000 when they ran it). Where `clean` is
      False it is False.
    """
    n = len(y)
    out = {"n_examples": int(n)}
    if eps <= 0 or n == 0:
        skipped = {"passed": None, "message": "not run (eps is 0 or no examples)"}
        return ({**out, **{k: dict(skipped) for k in
                           ("eps_sweep", "more_steps", "unbounded", "square_vs_gradient")}},
                np.asarray(clean, bool).copy())

    todo = np.flatnonzero(clean)

    def survived(steps, radii, step_fraction, note):
        """[len(radii), n] booleans: right after PGD-`steps` at each radius. The
        radii share one compiled call: the examples are tiled once per radius."""
        if verbose:
            print(f"  sanity: {note}")
        k = len(radii)
        right = runner.right_pgd(steps, norm, np.tile(x[todo], (k,) + (1,) * (x.ndim - 1)),
                                 np.tile(y[todo], k), np.repeat(radii, len(todo)),
                                 np.repeat(radii, len(todo)) * step_fraction)
        out = np.zeros([k, n], bool)
        out[:, todo] = right.reshape(k, len(todo))
        return out

    sweep_eps = [0.0] + [f * eps for f in EPS_FACTORS]
    sweep_right = [clean, *survived(20, sweep_eps[1:], 0.25, "PGD-20 eps sweep")]
    sweep_acc = [float(r.mean()) for r in sweep_right]
    ok = _not_rising(sweep_right)
    out["eps_sweep"] = {
        "passed": ok, "eps": sweep_eps, "accuracy": sweep_acc,
        "message": "PGD-20 accuracy falls as eps grows" if ok else
        "PGD-20 accuracy ROSE as eps grew: the attack is not finding the worst case "
        "(masked or noisy gradients)"}

    at_eps = sweep_right[1 + EPS_FACTORS.index(1.0)]
    # Linf 1 reaches every image in [0, 1]; so does L2 sqrt(number of pixels).
    big = 1.0 if norm == "linf" else math.sqrt(float(np.prod(x.shape[1:])))
    # Steps of eps/4 at eps, of eps/10 unbounded: one call, per-example steps.
    (ten,) = survived(10, [eps], 0.25, "PGD-10")
    if verbose:
        print("  sanity: PGD-100, at eps and unbounded")
    k2 = np.concatenate([np.full(len(todo), eps), np.full(len(todo), big)])
    right = runner.right_pgd(100, norm, np.concatenate([x[todo]] * 2),
                             np.concatenate([y[todo]] * 2), k2,
                             np.concatenate([np.full(len(todo), eps / 4),
                                             np.full(len(todo), big / 10)]))
    hundred, unbounded_right = np.zeros([2, n], bool)
    hundred[todo], unbounded_right[todo] = right[: len(todo)], right[len(todo):]
    steps_acc = {10: float(ten.mean()), 20: float(at_eps.mean()),
                 100: float(hundred.mean())}
    ok = _not_rising([ten, at_eps, hundred])
    out["more_steps"] = {
        "passed": ok, "steps": list(steps_acc), "accuracy": list(steps_acc.values()),
        "message": "more PGD steps do not raise accuracy" if ok else
        "more PGD steps RAISED accuracy: the attack does not converge"}

    unbounded = float(unbounded_right.mean())
    ok = unbounded <= UNBOUNDED_MAX_ACCURACY
    out["unbounded"] = {
        "passed": ok, "eps": big, "accuracy": unbounded,
        "message": f"unbounded PGD-100 leaves {unbounded:.1%} correct" if ok else
        f"unbounded PGD-100 leaves {unbounded:.1%} correct (expected <= "
        f"{UNBOUNDED_MAX_ACCURACY:.0%}): gradients do not lead the attack anywhere"}

    out["square_vs_gradient"], square_right = _square_check(
        runner, x, y, robust, gradient_free, at_eps, eps, norm, verbose)
    survived = np.asarray(clean, bool) & ten & at_eps & hundred
    if square_right is not None:
        survived &= square_right
    return out, survived


def _square_check(runner, x, y, robust, gradient_free, at_eps, eps, norm, verbose):
    """The gradient-free check: the share of the examples the gradient attacks
    left standing (PGD-20 at eps, `at_eps`, when the evaluation ran none) that
    the evaluation's gradient-free attacks, or Square-SANITY_SQUARE_QUERIES,
    broke. Returns (the check's result, and None when it used the
    evaluation's gradient-free attacks, else booleans [n]: right after its own
    Square where it ran it, False where the evaluation's gradient attacks had
    already broken the example)."""
    gradient = [r for name, r in robust.items() if not gradient_free[name]] or [at_eps]
    gradient_robust = np.logical_and.reduce(gradient)
    free = [r for name, r in robust.items() if gradient_free[name]]
    if free:
        free_robust, source = np.logical_and.reduce(free), "the evaluation's"
        own = None
    else:
        square = functools.partial(attacks.square, eps=eps, norm=norm,
                                   queries=SANITY_SQUARE_QUERIES)
        free_robust = gradient_robust.copy()
        left = np.flatnonzero(gradient_robust)
        if verbose:
            print(f"  sanity: Square-{SANITY_SQUARE_QUERIES} on {len(left)} examples")
        if len(left):
            free_robust[left] = runner.right("sanity-square", square, x[left], y[left])
        source = f"Square-{SANITY_SQUARE_QUERIES}"
        # Square ran only where the gradient attacks failed; elsewhere the
        # model is already wrong under them.
        own = free_robust
    # The share of the examples the gradient attacks left standing that Square
    # broke: of those examples, not of all (at 5% robust accuracy a share of all
    # could never pass 5%, however masked the gradients).
    standing = int(gradient_robust.sum())
    broken = int(np.sum(gradient_robust & ~free_robust))
    square_only = broken / standing if standing else 0.0
    # Two examples' slack, as for the other checks: of 4 points left standing
    # (a natural model), Square breaking one is noise, not masking.
    ok = broken <= max(SQUARE_MARGIN * standing, 2)
    if standing:
        message = (f"{source} gradient-free attack broke {square_only:.1%} ({broken} of "
                   f"{standing}) of the examples the gradient attacks left standing")
        if not ok:
            message += (f" (more than {SQUARE_MARGIN:.0%} and 2 examples): GRADIENTS ARE LIKELY MASKED, the "
                        "gradient attacks' numbers overstate robustness")
    else:
        message = ("the gradient attacks left no example standing: nothing for Square "
                   "to break, so nothing is masked")
    return {
        "passed": ok, "gradient_accuracy": float(gradient_robust.mean()),
        "square_accuracy": float(free_robust.mean()), "square_only": square_only,
        "standing": standing, "square_broke": broken, "message": message}, own
