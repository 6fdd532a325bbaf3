"""Robustness evaluation: an AutoAttack-grade report with its own sanity checks.

    report = evaluate(model, test_ds, eps=8/255, attacks=["fast", "standard"])

runs the attacks on the examples the model classifies correctly and returns a
plain dict, ready for JSON:

    clean_accuracy        accuracy on clean inputs
    robust_accuracy       {attack name: accuracy under that attack}
    worst_case_accuracy   an example counts only if every attack failed on it: the
                          evaluation's, the sanity checks' own attacks within eps
                          (on the examples they ran on) and, with `verified`, the
                          standard attacks run after a failed sanity check
    sanity_broke          how many examples the sanity checks' attacks broke that
                          the evaluation's attacks left standing
    scoring               `SCORING`: what the worst case counts
    per_class             {label: {n, clean_accuracy, robust_accuracy}} (worst case)
    worst_class           {label, robust_accuracy}
    attack_seconds        {attack name: seconds}; attacks {name: settings}
    attack_order          the attacks' names in the order they ran
    attacked              {attack name: examples it ran on}
    sanity_checks         see `ardir_tf.sanity`; `reliable` is False if one
                          failed (None if they did not run: sanity_examples=0)
    trained_in, evaluated_in   only for a mixed-precision keras.Model: its policy,
                          and "float32" (it is evaluated as its float32 copy,
                          ardir_tf.precision.float32_model)
    verified              None, or after a failed check: {failed_checks, attacks
                          (the standard ones added), robust_accuracy (cumulative
                          after each), attack_seconds, worst_case_accuracy,
                          unverified_worst_case_accuracy (the evaluation's
                          attacks' alone)}
    eps, norm, n_examples, seed, seconds, sequential

Attack presets (`SUITES`): "fast" is FGSM, PGD-k and CW-inf (PGD on the CW
margin; CW-L2-style margin PGD under --norm=l2), "standard" is AutoAttack's
standard set: APGD-CE, APGD-T (9 targets), FAB-T (9 targets, 100 iterations)
and Square (5000 queries).

    minimal_perturbation  {attack name: {broken, attacked, median, norm}} for FAB and
                          FAB-T: the median norm of the perturbations that broke a
                          point, over the points it ran on (with sequential=True,
                          those the earlier attacks left standing)

With `sequential=True` the attacks run in order, each only on the points no
earlier attack broke (AutoAttack's rule: the same worst case, at less cost);
`robust_accuracy` then holds the accuracy *after* each attack, cumulative.
"""

import dataclasses
import functools
import hashlib
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from ardir_tf import attacks as attacks_lib
from ardir_tf import precision, sanity
from ardir_tf.checkpoints import Checkpoints, kept_seconds, todo_key


# What the worst case counts, numbered: an evaluation recorded with another
# number (a study's cell, a run's report) counted otherwise, and is repeated.
#   1  the evaluation's attacks (and the standard ones `verify` adds)
#   2  also the sanity checks' own attacks within eps (PGD-10/20/100, their
#      Square-1000), on the examples the checks ran on; and each batch's random
#      draws depend on (seed, attack name, batch) alone, so other draws than
#      1's; more_steps and eps_sweep allow what random starts explain; FAB-T
#      keeps the least candidate that passes its final check, not only the least
SCORING = 2


@dataclasses.dataclass(frozen=True)
class Attack:
    """An attack for `evaluate`: `run(model_fn, x, y) -> x_adv`, the settings to
    report, and whether it uses gradients (the sanity checks compare the two
    kinds)."""
    run: Callable
    settings: dict = dataclasses.field(default_factory=dict)
    gradient_free: bool = False


def _attack(fn, gradient_free=False, **settings):
    return Attack(functools.partial(fn, **settings),
                  {"attack": fn.__name__, **settings}, gradient_free)


def fast(eps, norm="linf", steps=20, step_size=None):
    """FGSM, PGD-`steps` (CE) and CW (PGD-`steps` on the CW margin)."""
    step_size = step_size or (max(eps / 4, 2.5 * eps / steps) if eps > 0 else 1.0)
    pgd = dict(eps=eps, norm=norm, steps=steps, step_size=step_size)
    return {"fgsm": _attack(attacks_lib.fgsm, eps=eps, norm=norm),
            f"pgd{steps}": _attack(attacks_lib.pgd, **pgd),
            f"cw_{norm}": _attack(attacks_lib.pgd, loss="cw", **pgd)}


def standard(eps, norm="linf", apgd_steps=100, n_targets=9, queries=5000, fab_steps=100):
    """AutoAttack's standard set, in its order: APGD-CE, APGD-T, FAB-T, Square."""
    return {"apgd_ce": _attack(attacks_lib.apgd, eps=eps, norm=norm, steps=apgd_steps),
            "apgd_t": _attack(attacks_lib.apgd_targeted, eps=eps, norm=norm, steps=apgd_steps,
                              n_targets=n_targets),
            "fab_t": _attack(attacks_lib.fab_targeted, eps=eps, norm=norm, steps=fab_steps,
                             n_targets=n_targets),
            "square": _attack(attacks_lib.square, gradient_free=True, eps=eps, norm=norm,
                              queries=queries)}


SUITES = {"fast": fast, "standard": standard}


def suite(names, eps, norm="linf", steps=20, step_size=None):
    """The attacks of one or more presets, in order: `suite(["fast", "standard"],
    eps)`. `steps` and `step_size` set the fast preset's PGD."""
    names = [names] if isinstance(names, str) else list(names)
    out = {}
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown attack preset {name!r}; valid: {', '.join(SUITES)}")
        out.update(fast(eps, norm, steps, step_size) if name == "fast"
                   else standard(eps, norm))
    if not out:
        raise ValueError("no attacks: name at least one preset "
                         f"({', '.join(SUITES)}) or pass a dict of attacks")
    return out


def collect(dataset, n_examples=None):
    """The first `n_examples` (all if None) of a dataset of (x, y) batches, as
    float32 pixels and int64 labels."""
    xs, ys, seen = [], [], 0
    for x, y in dataset:
        x, y = np.asarray(x, np.float32), np.asarray(y).reshape(-1).astype(np.int64)
        if n_examples is not None:
            x, y = x[: n_examples - seen], y[: n_examples - seen]
        xs.append(x)
        ys.append(y)
        seen += len(y)
        if n_examples is not None and seen >= n_examples:
            break
    if not seen:
        raise ValueError("evaluate got an empty dataset")
    return np.concatenate(xs), np.concatenate(ys)


class _Runner:
    """Compiled 'is the model still right after this attack?' functions, run over
    batches. One concrete function per attack, traced once for every batch size.

    Random attacks repeat for a seed without touching TensorFlow's global seed.
    The library's attacks draw from a tf.random.Generator of the function's own
    (`attacks.drawing_from`), set before each batch to a stream of its own,
    keyed by (seed, attack, batch index): a batch draws the same numbers
    whichever batches ran before it, so an evaluation resumed at batch k
    (`Parts`) gives an uninterrupted one's result, and no two attacks or
    batches share draws. Other random ops (a custom attack's tf.random calls) repeat for the
    whole call: each function sets the seed of its own graph (tf.random.set_seed
    inside a trace sets only that graph's seed). The caller's random state is
    left as it was."""

    def __init__(self, model, example_shape, batch_size, seed):
        self.model_fn = lambda z: model(z, training=False)
        self.example = tf.TensorSpec([None, *example_shape], tf.float32)
        self.batch_size = batch_size
        self.seed = int(seed)
        self._compiled, self._generators = {}, {}

    def _stream(self, key, batch):
        """The Philox key batch `batch` of the function `key` draws from: its
        own stream (distinct keys, not neighbouring counters of one key, whose
        outputs would be the same numbers shifted by a block)."""
        digest = hashlib.sha256(repr((self.seed, key, batch)).encode()).digest()
        return int.from_bytes(digest[:8], "little") % 2 ** 63

    def _run(self, key, make_attack, *arrays, bar=None, parts=None, points=False):
        """Runs the attack `key` over `arrays` (x, y, per-example extras) in
        batches: (right, {"linf", "l2"}), or with `points` the adversarial
        inputs themselves, drawn as the same attack's `right` draws them."""
        compiled = (key, "points") if points else key
        if compiled not in self._compiled:
            model_fn, seed = self.model_fn, self.seed
            attack = make_attack()
            extra = [tf.TensorSpec([None], tf.float32)] * (len(arrays) - 2)

            # autograph=False: the attacks are explicit tf.while_loops already, and
            # converting them costs most of the tracing time.
            def fn(xb, yb, *rest):
                tf.random.set_seed(seed)  # this graph's seed only (see the class doc)
                x_adv = xb if attack is None else attack(model_fn, xb, yb, *rest)
                if points:
                    return (x_adv,)
                logits = attacks_lib._logits(model_fn(x_adv))
                flat = tf.reshape(x_adv - xb, [tf.shape(xb)[0], -1])
                return (tf.equal(tf.argmax(logits, -1), yb),
                        tf.reduce_max(tf.abs(flat), 1), tf.norm(flat, axis=1))
            # A concrete function: each attack is its own function by design, and
            # calling concrete functions keeps TensorFlow's "frequent retracing"
            # warning (meant for accidental retraces) quiet without touching its
            # logger.
            generator = tf.random.Generator.from_seed(seed)
            with attacks_lib.drawing_from(generator):
                self._compiled[compiled] = tf.function(fn, autograph=False).get_concrete_function(
                    self.example, tf.TensorSpec([None], tf.int64), *extra)
            self._generators[compiled] = generator
        fn, generator, out = self._compiled[compiled], self._generators[compiled], []
        for b, i in enumerate(range(0, len(arrays[1]), self.batch_size)):
            got = parts.get(b) if parts is not None else None
            if got is None:
                generator.reset_from_key_counter(self._stream(key, b), [0, 0])
                started = time.perf_counter()
                got = [t.numpy() for t in fn(*(tf.convert_to_tensor(a[i: i + self.batch_size])
                                               for a in arrays))]
                if parts is not None:
                    parts.put(b, got, time.perf_counter() - started)
            out.append(got)
            if bar is not None:
                bar.add(len(out[-1][0]))
        if points:
            return np.concatenate([o[0] for o in out]) if out else arrays[0][:0]
        if not out:
            return np.zeros([0], bool), {"linf": np.zeros([0]), "l2": np.zeros([0])}
        right, linf, l2 = (np.concatenate(parts) for parts in zip(*out))
        return right, {"linf": linf, "l2": l2}

    def right(self, name, attack, x, y, bar=None, distances=False, parts=None):
        """Booleans: the model's prediction on attack(model_fn, x, y) equals y
        (attack None: on x itself). `name` keys the compiled function. With
        `distances`, also {"linf", "l2"}: each example's perturbation norm.
        `parts` (a `Parts`): keeps each finished batch, and skips those kept."""
        right, norms = self._run(("attack", name), lambda: attack, x, y, bar=bar,
                                 parts=parts)
        return (right, norms) if distances else right

    def adversarial(self, name, attack, x, y):
        """The points attack(model_fn, x, y) returns, with the random draws
        `right(name, attack, x, y)` makes: the inputs behind its booleans."""
        return self._run(("attack", name), lambda: attack, x, y, points=True)

    def right_pgd(self, steps, norm, x, y, eps, step_size):
        """As `right`, under `attacks.pgd_per_example` (eps, step_size: [n])."""
        def make():
            return lambda model_fn, xb, yb, e, s: attacks_lib.pgd_per_example(
                model_fn, xb, yb, eps=e, step_size=s, steps=steps, norm=norm)
        return self._run(("pgd", steps, norm), make, x, y, np.asarray(eps, np.float32),
                         np.asarray(step_size, np.float32))[0]


# Attacks that look for the least perturbation: the report gives the median norm
# of the perturbations that broke a point.
MINIMAL_NORM_ATTACKS = ("fab", "fab_targeted")

# APGD-T runs its targets together while the tiled batch's activations stay
# under this (an estimate: the float32 outputs of the model's layers).
TARGETS_MEMORY_BYTES = 1 << 30


def _activation_bytes(model):
    """Bytes of the float32 outputs of `model`'s layers for one example (nested
    models counted layer by layer), or None when it cannot tell."""
    total = 0
    try:
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                inner = _activation_bytes(layer)
                if inner is None:
                    return None
                total += inner
                continue
            for out in tf.nest.flatten(layer.output):
                total += 4 * int(np.prod(out.shape[1:]))
    except (AttributeError, TypeError, ValueError):
        return None
    return total


def _batch_targets(attack, model, batch_size):
    """APGD-T with its `targets_per_run` set for this model and batch size, when
    the caller left it unset: as many targets at once as fit the memory
    budget (1 when the model's size is unknown: one target at a time)."""
    settings = attack.settings
    if settings.get("attack") not in ("apgd_targeted", "fab_targeted") or \
            "targets_per_run" in settings:
        return attack
    n_targets, restarts = settings.get("n_targets", 9), settings.get("restarts", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
               for v in (n_targets, restarts)):
        return attack  # the attack itself says what is wrong with them
    # APGD-T groups (target, restart) attempts; FAB-T groups targets within a restart.
    attempts = n_targets * restarts if settings["attack"] == "apgd_targeted" else n_targets
    per_example = _activation_bytes(model) if isinstance(model, keras.Model) else None
    fit = 1 if not per_example else TARGETS_MEMORY_BYTES // (per_example * batch_size)
    per_run = max(1, min(attempts, fit))
    # Even groups: 9 attempts in two runs are 5 + 4, not 8 + 1.
    per_run = -(-attempts // -(-attempts // per_run))
    # Recorded in the report: the grouping decides which random start each
    # attempt draws, so it is part of what reproduces the numbers.
    return Attack(functools.partial(attack.run, targets_per_run=per_run),
                  {**settings, "targets_per_run": per_run}, attack.gradient_free)


def survivors(model, x, y, attacks, *, seed=0, batch_size=256):
    """{name: bool [n]}: whether `model` is still right on example i after attack
    `name` (an `Attack`, a callable(model_fn, x, y) -> x_adv, or None: the clean
    x), each compiled once and run in batches, seeded as `evaluate` seeds them.
    Every example is attacked: the caller picks which. A mixed-precision
    keras.Model is run as its float32 copy, as `evaluate` runs it."""
    model = precision.float32_model(model)
    x, y = np.asarray(x, np.float32), np.asarray(y).reshape(-1).astype(np.int64)
    runner = _Runner(model, x.shape[1:], batch_size, seed)
    out = {}
    for name, attack in attacks.items():
        if isinstance(attack, Attack):
            attack = _batch_targets(attack, model, batch_size).run
        out[name] = runner.right(name, attack, x, y)
    return out


def evaluate(model, dataset, eps, norm="linf", attacks="fast", n_examples=None, *,
             sequential=False, seed=0, batch_size=256, sanity_examples=500,
             verify=True, resume_dir=None, verbose=1):
    """Clean accuracy, robust accuracy under each attack and in the worst case,
    per-class robustness and sanity checks for `model` (pixels -> logits).

    Args:
      model: a keras.Model (or callable `model(x, training=False)`) returning
        logits or a dict holding "logits".
      dataset: a tf.data.Dataset (or any iterable) of (x, y) batches, pixels in
        [0, 1].
      eps, norm: the threat model, for the presets and the sanity checks.
      attacks: a preset name ("fast", "standard"), a list of them, or a dict
        {name: Attack or callable(model_fn, x, y) -> x_adv}.
      n_examples: evaluate the first n examples only (None: all).
      sequential: run each attack only on the points earlier attacks left
        standing (cheaper; `robust_accuracy` becomes cumulative); gradient-free
        attacks (Square) then run after every gradient attack.
      seed: seeds the attacks' random starts and queries, so the same call
        gives the same report (TensorFlow's global seed is left alone).
      batch_size: examples per attack batch.
      sanity_examples: how many of the examples the sanity checks use (0
        skips them; the report then says reliable: None).
      verify: when a sanity check fails and `attacks` lacks some of the
        standard set, run the missing standard attacks (APGD-CE, APGD-T, FAB-T,
        Square-5000), AutoAttack-style, on the points every attack left
        standing: `worst_case_accuracy` (and per_class, worst_class) then
        hold the worst case over both sets, and `verified` says what ran and
        what the evaluation's own attacks alone gave. On a masked model the
        evaluation's number overstates robustness, often several times over.
      resume_dir: a directory where each finished attack, each finished batch
        of an attack, and the sanity checks are kept (`Checkpoints`,
        `Parts`), so that the same evaluation, killed and run again, resumes
        at its first unfinished batch (None: nothing kept). Delete it when the
        report is saved.
      verbose: 1 shows a progress bar per attack.

    Returns:
      The report described in the module docstring.
    """
    trained_in = precision.compute_dtypes(model) if isinstance(model, keras.Model) else None
    model = precision.float32_model(model)  # no number depends on bfloat16/float16 rounding
    attacks = _attacks(attacks, eps, norm, model, batch_size)
    reserved = [n for n in attacks if n == "clean" or n.startswith(("sanity-", "verify-"))]
    if reserved:  # the runner's own functions go by these names
        raise ValueError(f"attack name {reserved[0]!r} is reserved for the evaluation's own "
                         "steps (clean, sanity-*, verify-*); name the attack otherwise")
    if sequential:
        # Gradient-free attacks last, as in AutoAttack: the gradient-free check
        # asks what they break of the points every gradient attack left
        # standing, which a gradient attack run after them could never show.
        attacks = dict(sorted(attacks.items(), key=lambda item: item[1].gradient_free))
    start = time.perf_counter()
    x, y = collect(dataset, n_examples)
    runner = _Runner(model, x.shape[1:], batch_size, seed)
    clean = runner.right("clean", None, x, y)

    # robust[name][i]: True if example i survived the attack; in sequential mode
    # also False where an earlier attack already broke it.
    robust, seconds, attacked, minimal = {}, {}, {}, {}
    standing = clean.copy()
    checkpoints = Checkpoints(resume_dir, model, x, y, seed, scoring=SCORING)
    for name, attack in attacks.items():
        todo = np.flatnonzero(standing if sequential else clean)
        attacked[name] = int(len(todo))

        key = {"attack": attack.settings, "eps": eps, "todo": todo_key(todo)}

        def run(name=name, attack=attack, todo=todo, key=key):
            bar = keras.utils.Progbar(len(todo), unit_name="example") if verbose else None
            if verbose:
                print(f"  {name}: {len(todo)} examples")
            t = time.perf_counter()
            parts = checkpoints.parts(f"attack-{name}", key, batch_size)
            right, norms = runner.right(name, attack.run, x[todo], y[todo], bar,
                                        distances=True, parts=parts)
            return {"right": right, "linf": norms["linf"], "l2": norms["l2"],
                    "seconds": round(time.perf_counter() - t + kept_seconds(parts), 2)}
        done = checkpoints(f"attack-{name}", key, run)
        survived = np.zeros_like(clean)
        survived[todo] = done["right"]
        norms = {"linf": done["linf"], "l2": done["l2"]}
        seconds[name] = float(done["seconds"])
        robust[name] = survived
        standing &= survived
        if attack.settings.get("attack") in MINIMAL_NORM_ATTACKS:
            broken = norms[norm][~survived[todo]]
            # Over the points this attack broke of those it ran on (in sequential
            # mode, those the earlier attacks left standing).
            minimal[name] = {"broken": int(len(broken)), "attacked": int(len(todo)),
                             "median": float(np.median(broken)) if len(broken) else None,
                             "norm": norm}
    m = int(min(sanity_examples, len(y)))
    kept = checkpoints("sanity", {
        "n": m, "eps": eps, "norm": norm,
        "robust": todo_key(np.concatenate([r[:m] for r in robust.values()])
                           if robust else np.zeros(0))},
        lambda: _checks(runner, x[:m], y[:m], clean[:m], {n: r[:m] for n, r in robust.items()},
                        {n: a.gradient_free for n, a in attacks.items()}, eps, norm, verbose))
    checks = kept["json_checks"]
    # The checks' own attacks within eps count as the evaluation's: a point they
    # broke is not robust, whichever attack found it.
    own_worst = float(standing.mean())  # the evaluation's attacks alone
    survived = kept["survived"].astype(bool)  # as kept: any integer array
    sanity_broke = int(np.sum(standing[:m] & ~survived))
    standing[:m] &= survived
    verified = None
    if verify and _reliable(checks) is False:
        verified = _verify(runner, x, y, standing, attacks, checks, eps, norm,
                           batch_size, model, verbose, checkpoints, own_worst)
    per_class, weakest = _per_class(y, clean, standing)
    return {
        "clean_accuracy": float(clean.mean()),
        "robust_accuracy": {n: float(r.mean()) for n, r in robust.items()},
        "worst_case_accuracy": float(standing.mean()),
        "per_class": per_class,
        "worst_class": {"label": weakest,
                        "robust_accuracy": per_class[weakest]["robust_accuracy"]},
        "eps": float(eps), "norm": norm, "n_examples": int(len(y)), "seed": int(seed),
        "sequential": bool(sequential),
        "attack_order": list(attacks),
        "attacks": {n: _jsonable(a.settings) for n, a in attacks.items()},
        "attack_seconds": seconds, "attacked": attacked, "minimal_perturbation": minimal,
        "sanity_checks": checks, "sanity_broke": sanity_broke,
        "reliable": _reliable(checks), "verified": verified, "scoring": SCORING,
        "seconds": round(time.perf_counter() - start, 2),
        **({"trained_in": trained_in, "evaluated_in": "float32"}
           if trained_in not in (None, "float32") else {}),
    }


def _checks(runner, x, y, clean, robust, gradient_free, eps, norm, verbose):
    checks, survived = sanity.check(runner, x, y, clean, robust, gradient_free, eps=eps,
                                    norm=norm, verbose=verbose)
    return {"json_checks": checks, "survived": survived}


def _attacks(attacks, eps, norm, model, batch_size):
    """`evaluate`'s attacks as {name: Attack}: presets by name, bare callables
    wrapped, APGD-T and FAB-T given their targets per run (`_batch_targets`)."""
    if not isinstance(attacks, dict):
        attacks = suite(attacks, eps, norm)
    attacks = {name: a if isinstance(a, Attack) else Attack(a, {"attack": repr(a)})
               for name, a in attacks.items()}
    return {name: _batch_targets(a, model, batch_size) for name, a in attacks.items()}


def _per_class(y, clean, worst):
    """({label: {n, clean_accuracy, robust_accuracy}}, the label whose robust
    accuracy is lowest)."""
    per_class = {}
    for label in np.unique(y):
        of = y == label
        per_class[str(label)] = {"n": int(of.sum()),
                                 "clean_accuracy": float(clean[of].mean()),
                                 "robust_accuracy": float(worst[of].mean())}
    return per_class, min(per_class, key=lambda k: per_class[k]["robust_accuracy"])


def _verify(runner, x, y, standing, attacks, checks, eps, norm, batch_size, model,
            verbose, checkpoints, own_worst):
    """The standard attacks the evaluation lacks, each on the points still
    standing (updated in place). Returns the report's "verified" entry;
    `own_worst`: the worst case over the evaluation's attacks alone."""
    failed = [name for name, c in checks.items()
              if isinstance(c, dict) and c.get("passed") is False]
    # A standard attack counts as run when one with its function and eps is in
    # the evaluation (the presets' settings: same function, same threat model).
    present = {(a.settings.get("attack"), a.settings.get("eps")) for a in attacks.values()}
    extra = {name: a for name, a in standard(eps, norm).items()
             if (a.settings["attack"], eps) not in present}
    accuracy, seconds = {}, {}
    if verbose:
        print(f"  a sanity check failed ({', '.join(failed)}): the standard attacks "
              f"{', '.join(extra) or '(all already ran)'} on the {int(standing.sum())} "
              "points left standing")
    for name, attack in extra.items():
        attack = _batch_targets(attack, model, batch_size)
        todo = np.flatnonzero(standing)

        key = {"attack": attack.settings, "eps": eps, "todo": todo_key(todo)}

        def run(name=name, attack=attack, todo=todo, key=key):
            t = time.perf_counter()
            parts = checkpoints.parts(f"verify-{name}", key, batch_size)
            right = (runner.right(f"verify-{name}", attack.run, x[todo], y[todo], parts=parts)
                     if len(todo) else np.zeros([0], bool))
            return {"right": right,
                    "seconds": round(time.perf_counter() - t + kept_seconds(parts), 2)}
        done = checkpoints(f"verify-{name}", key, run)
        standing[todo] = done["right"]
        seconds[name] = float(done["seconds"])
        accuracy[name] = float(standing.mean())
    return {"failed_checks": failed, "attacks": list(extra),
            "robust_accuracy": accuracy, "attack_seconds": seconds,
            "unverified_worst_case_accuracy": own_worst,
            "worst_case_accuracy": float(standing.mean())}


def _reliable(checks):
    """False if a sanity check failed, None if they did not run, else True."""
    passed = [c["passed"] for c in checks.values() if isinstance(c, dict)]
    if False in passed:
        return False
    return None if None in passed else True


def _jsonable(settings):
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
            for k, v in settings.items()}
