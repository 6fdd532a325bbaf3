"""A direct probe of gradient masking: does the model's robustness hold up when
the attack gets more steps, a better step rule, or no gradients at all?

    result = masking.probe(model, x, y, eps=0.3)
    print(masking.format_probe(result))

`ardir_tf.sanity` answers "can this evaluation be trusted?" with pass/fail
checks. This module measures the symptoms themselves, for one model on one set
of images, so that two training recipes can be compared by how much they mask:

    pgd               accuracy under PGD-k (CE, step eps/4, random start) for each
                      k of `steps`: a masked model's keeps falling with k
    apgd_ce           accuracy under APGD-CE (adaptive step size and momentum)
    gradient_worst    accuracy when PGD-k for every k and APGD-CE must all fail
    square            accuracy under Square (no gradients), run on the points every
                      gradient attack left standing
    square_share      the share of those points Square broke (the sanity check's
                      `square_vs_gradient` quantity; above 0.05 it fails)
    worst             accuracy when every attack above must fail
    logits            mean max-logit, mean margin (top-1 minus top-2 logit) and
                      the share of correctly classified inputs whose softmax has
                      saturated (CE below 1e-6: its gradient is then mostly rounding)
    gradients         the CE input gradient's dual norm (L1 for Linf, L2 for L2)
                      at the clean x and at the PGD-`steps[0]` point, per example:
                      quantiles, a histogram on a log scale, the share of inputs
                      whose gradient is exactly zero (underflow) and the share of
                      pixels whose gradient is exactly zero (those pixels do not
                      move under sign-gradient PGD)
"""

import time

import keras
import numpy as np
import tensorflow as tf

from ardir_tf import attacks as attacks_lib
from ardir_tf import evaluate as evaluate_lib
from ardir_tf import precision, sanity

# Decades of the gradient-norm histogram: [1e-12, 1e-11), ..., [1e2, 1e3), and
# the exact zeros counted apart.
HISTOGRAM_EDGES = tuple(10.0 ** k for k in range(-12, 4))
SATURATED_CE = 1e-6


def _model_fn(model):
    return lambda z: attacks_lib._logits(model(z, training=False))


def _gradient_function(model, norm):
    """A compiled fn(x, y) -> (dual norm of the CE input gradient, share of
    zero pixels, CE, logits), per example."""
    model_fn = _model_fn(model)

    @tf.function(autograph=False)
    def grads(xb, yb):
        with tf.GradientTape() as tape:
            tape.watch(xb)
            logits = model_fn(xb)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(yb, tf.int32), logits)
        g = tape.gradient(ce, xb)
        flat = tf.reshape(g, [tf.shape(xb)[0], -1])
        dual = (tf.reduce_sum(tf.abs(flat), 1) if norm == "linf"
                else tf.norm(flat, axis=1))
        zero_pixels = tf.reduce_mean(tf.cast(tf.equal(flat, 0.0), tf.float32), 1)
        return dual, zero_pixels, ce, logits
    return grads


def _gradient_stats(grads, x, y, batch_size):
    """Per-example CE input gradients' dual norms and zero shares at x, with a
    `_gradient_function`."""
    if not len(y):
        empty = np.zeros([0], np.float32)
        return empty, empty, empty, np.zeros([0, 0], np.float32)
    parts = [grads(tf.constant(x[i:i + batch_size]), tf.constant(y[i:i + batch_size]))
             for i in range(0, len(y), batch_size)]
    dual, zero_pixels, ce, logits = (np.concatenate([p[k].numpy() for p in parts])
                                     for k in range(4))
    return dual, zero_pixels, ce, logits


def _summary(dual, zero_pixels):
    counts, _ = np.histogram(dual[dual > 0], bins=HISTOGRAM_EDGES)
    return {
        "n": int(len(dual)),
        "quantiles": {q: float(np.quantile(dual, float(q))) if len(dual) else None
                      for q in ("0.1", "0.5", "0.9")},
        "zero_gradient_share": float(np.mean(dual == 0)) if len(dual) else None,
        "zero_pixel_share": float(np.mean(zero_pixels)) if len(dual) else None,
        "histogram": {"edges": list(HISTOGRAM_EDGES), "counts": counts.tolist(),
                      "zeros": int(np.sum(dual == 0))},
    }


def probe(model, x, y, eps, norm="linf", *, steps=(10, 20, 100), apgd_steps=100,
          square_queries=1000, seed=0, batch_size=256):
    """The masking probe of `model` (pixels -> logits) on images x, labels y.

    Every attack runs on the correctly classified images; Square only on those
    every gradient attack left standing. A model trained under a mixed policy
    is probed as its float32 copy, as `evaluate` runs it. Returns a dict (see
    the module docstring), ready for JSON.
    """
    model = precision.float32_model(model)
    x, y = np.asarray(x, np.float32), np.asarray(y).reshape(-1).astype(np.int64)
    steps = tuple(int(k) for k in steps)
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be one or more positive step counts, got {steps}")
    gradient = {f"pgd{k}": evaluate_lib._attack(attacks_lib.pgd, eps=eps, norm=norm,
                                                 steps=k, step_size=eps / 4)
                for k in steps}
    if apgd_steps:
        gradient["apgd_ce"] = evaluate_lib._attack(attacks_lib.apgd, eps=eps, norm=norm,
                                                    steps=apgd_steps)
    runner = evaluate_lib._Runner(model, x.shape[1:], batch_size, seed)
    clean = runner.right("clean", None, x, y)
    todo = np.flatnonzero(clean)
    standing, acc, seconds = clean.copy(), {}, {}
    for name, attack in gradient.items():
        start = time.perf_counter()
        survived = np.zeros_like(clean)
        survived[todo] = runner.right(name, attack.run, x[todo], y[todo])
        seconds[name] = round(time.perf_counter() - start, 2)
        acc[name] = float(survived.mean())
        standing &= survived
    gradient_worst = standing.copy()
    left = np.flatnonzero(standing)
    if len(left) and square_queries:
        square = evaluate_lib._attack(attacks_lib.square, gradient_free=True, eps=eps,
                                      norm=norm, queries=square_queries)
        start = time.perf_counter()
        standing[left] = runner.right("square", square.run, x[left], y[left])
        seconds["square"] = round(time.perf_counter() - start, 2)
    broken = int(len(left) - standing[left].sum()) if len(left) else 0

    grads = _gradient_function(model, norm)  # traced once, for x and for x'
    dual, zero_pixels, ce, logits = _gradient_stats(grads, x[todo], y[todo], batch_size)
    # The PGD-steps[0] points behind its accuracy above (the same draws).
    first = f"pgd{steps[0]}"
    x_adv = runner.adversarial(first, gradient[first].run, x[todo], y[todo])
    dual_adv, zero_adv, _, _ = _gradient_stats(grads, x_adv, y[todo], batch_size)
    top2 = np.sort(logits, axis=1)[:, -2:] if len(todo) else np.zeros([0, 2])
    return {
        "n_examples": int(len(y)), "eps": float(eps), "norm": norm, "seed": int(seed),
        "clean": float(clean.mean()),
        "pgd": {str(k): acc[f"pgd{k}"] for k in steps},
        "apgd_ce": acc.get("apgd_ce"),
        "gradient_worst": float(gradient_worst.mean()),
        "square": float(standing.mean()) if square_queries else None,
        "square_queries": int(square_queries),
        "square_standing": int(len(left)), "square_broke": broken,
        "square_share": broken / len(left) if len(left) else 0.0,
        "square_share_passes": broken <= max(sanity.SQUARE_MARGIN * len(left), 2),
        "worst": float(standing.mean()),
        "logits": {
            "mean_max": float(np.mean(top2[:, 1])) if len(todo) else None,
            "mean_margin": float(np.mean(top2[:, 1] - top2[:, 0])) if len(todo) else None,
            "saturated_share": float(np.mean(ce < SATURATED_CE)) if len(todo) else None,
        },
        "gradients": {"clean": _summary(dual, zero_pixels),
                      f"pgd{steps[0]}": _summary(dual_adv, zero_adv)},
        "seconds": seconds,
    }


def format_probe(result, name="model"):
    """The probe as a few lines of text."""
    pgd = ", ".join(f"PGD-{k} {v:.3f}" for k, v in result["pgd"].items())
    lines = [f"{name}: clean {result['clean']:.3f}; {pgd}"
             + (f"; APGD-CE {result['apgd_ce']:.3f}" if result["apgd_ce"] is not None else "")]
    verdict = "passes" if result["square_share_passes"] else "FAILS: gradients likely masked"
    lines.append(
        f"  Square-{result['square_queries']} broke {result['square_broke']} of "
        f"{result['square_standing']} points the gradient attacks left standing "
        f"({result['square_share']:.1%}; {verdict}); worst case {result['worst']:.3f}")
    lg = result["logits"]
    if lg["mean_max"] is not None:
        lines.append(f"  logits: mean max {lg['mean_max']:.2f}, mean margin "
                     f"{lg['mean_margin']:.2f}, saturated softmax (CE < {SATURATED_CE:g}) "
                     f"on {lg['saturated_share']:.1%} of the correct points")
    dual = "L1" if result["norm"] == "linf" else "L2"
    for where, g in result["gradients"].items():
        if not g["n"]:
            continue
        q = g["quantiles"]
        lines.append(f"  CE gradient {dual} norm at {where}: median {q['0.5']:.3g} "
                     f"(10%: {q['0.1']:.3g}, 90%: {q['0.9']:.3g}); zero on "
                     f"{g['zero_gradient_share']:.1%} of inputs, on "
                     f"{g['zero_pixel_share']:.1%} of pixels")
    return "\n".join(lines)


class ProbeCallback(keras.callbacks.Callback):
    """A Keras callback that watches masking develop while a model trains.

        fit(..., callbacks=[masking.ProbeCallback(model, x, y, eps=0.3)])

    At the end of every `every`-th epoch it attacks the fixed images (x, y)
    with PGD at each of `steps` (CE, step eps/4) and records their accuracies,
    and the median CE input-gradient dual norm and the share of zero gradients
    at the PGD-`steps[0]` point, in `history` (a list of dicts, one per probed
    epoch) and in the epoch's logs (`probe_pgd10`, ..., so that they reach
    `fit`'s History and CSV loggers). A gap that opens between the first and
    the last step count is the attack-specific robustness of a masked model.
    A model trained under a mixed policy is probed as its float32 copy, the
    epoch's weights copied into it (what `evaluate` measures and the export
    deploys).
    """

    def __init__(self, model, x, y, eps, norm="linf", steps=(10, 50), every=1,
                 batch_size=256, seed=0):
        super().__init__()
        self.source = model
        # A mixed-precision model is probed as its float32 copy, as `probe` and
        # `evaluate` run it, given the model's weights before each probe.
        self.probed = precision.float32_model(model)
        self.x = np.asarray(x, np.float32)
        self.y = np.asarray(y).reshape(-1).astype(np.int64)
        self.eps, self.norm, self.every = float(eps), norm, int(every)
        self.steps = tuple(int(k) for k in steps)
        self.batch_size, self.seed = batch_size, seed
        self.history = []
        self._attacks = {}
        self._grads = _gradient_function(self.probed, norm)  # traced once, not every epoch

    def _right(self, steps):
        if steps not in self._attacks:
            pgd = attacks_lib.PGD(eps=self.eps, step_size=self.eps / 4, steps=steps,
                                  norm=self.norm)
            model_fn = _model_fn(self.probed)

            def run(xb, yb):
                tf.random.set_seed(self.seed)  # this graph's seed only
                x_adv = pgd(model_fn, xb, yb)
                return x_adv, tf.equal(tf.argmax(model_fn(x_adv), -1), yb)
            self._attacks[steps] = tf.function(run, autograph=False)
        outs = [self._attacks[steps](tf.constant(self.x[i:i + self.batch_size]),
                                     tf.constant(self.y[i:i + self.batch_size]))
                for i in range(0, len(self.y), self.batch_size)]
        return (np.concatenate([o[0].numpy() for o in outs]),
                np.concatenate([o[1].numpy() for o in outs]))

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        if self.probed is not self.source:
            self.probed.set_weights(self.source.get_weights())
        entry = {"epoch": epoch + 1}
        for k in self.steps:
            x_adv, right = self._right(k)
            entry[f"pgd{k}"] = float(right.mean())
            if k == self.steps[0]:
                dual, _, _, _ = _gradient_stats(self._grads, x_adv, self.y,
                                                self.batch_size)
                entry["grad_median"] = float(np.median(dual))
                entry["zero_gradient_share"] = float(np.mean(dual == 0))
        self.history.append(entry)
        if logs is not None:
            logs.update({f"probe_{k}": v for k, v in entry.items() if k != "epoch"})
