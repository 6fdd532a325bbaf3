"""AdversarialTrainer: trains a robust model (a teacher) with PGD-AT or TRADES,
or the natural baseline on clean inputs.

Same attack, reduction and metric machinery as the distiller (`RobustModel`), so
every phase of a run trains alike under every tf.distribute strategy.
"""

import tensorflow as tf

from ardir_tf import losses
from ardir_tf.robust_model import (RobustModel, check_bn_statistics, check_logits_model,
                                   clean_pass, moving_statistics)

METHODS = ("pgd_at", "trades", "natural")


class AdversarialTrainer(RobustModel):
    """Adversarial training of `model` on PGD examples crafted against itself.

    Args:
      model: the keras.Model to train (pixels -> logits).
      attack: an `attacks.PGD` (required, keyword-only). For "natural" it is
        only the threat model that validation (`test_step`) attacks with.
      method: "pgd_at" (Madry et al. 2018: CE on x', attack with the attack's
        own loss), "trades" (Zhang et al. 2019: CE on x plus
        beta * KL(f(x) || f(x')), attack maximising that KL), or "natural"
        (CE on the clean x, no attack: the baseline robust methods beat).
        TRADES' reference code starts the attack at x + 0.001 * N(0, 1); this
        one starts where the attack says (uniform in the ball with
        random_start=True).
      beta: TRADES' robustness weight (6.0 in the paper).
      bn_statistics: how TRADES' clean pass treats BatchNorm, whose moving
        statistics the deployed model and every attack use: "split"
        (default: normalised by its own batch, the moving statistics from the
        adversarial batches alone), "adv" (inference mode) or "both" (as
        TRADES' reference code: the moving statistics average the clean and
        adversarial batches'). See `robust_model.BN_STATISTICS`.
      eval_attack: attack used by `test_step`; defaults to `attack` with CE.

    Metrics: loss, its terms (ce_adv; or ce and kl_adv; or ce), clean_accuracy
    (trades and natural: from the training-mode logits the loss used, as
    Keras' own "accuracy" is; pgd_at has no clean pass, so no training
    clean_accuracy), adv_accuracy (not for "natural"); test_step reports
    clean_accuracy and pgd_accuracy.
    """

    TERMS = {"pgd_at": ["ce_adv"], "trades": ["ce", "kl_adv"], "natural": ["ce"]}

    def __init__(self, model, *, attack, method="pgd_at", beta=6.0, bn_statistics="split",
                 eval_attack=None, name="adversarial_trainer", **kwargs):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if attack is None:
            raise ValueError("attack is required, e.g. ardir_tf.attacks.PGD(eps=8/255, "
                             "step_size=2/255, steps=10)")
        check_logits_model(model, "model")
        if method == "pgd_at" and getattr(attack, "loss", None) == "kl":
            raise ValueError("pgd_at attacks with the attack's own loss, and loss='kl' needs a "
                             "reference distribution: use loss='ce' or 'cw', or method='trades'")
        losses.check_weight("beta", beta)
        check_bn_statistics(bn_statistics)
        super().__init__(model, attack, eval_attack, train_metrics=self.TERMS[method],
                         adversarial=method != "natural",
                         clean_accuracy=method != "pgd_at", name=name, **kwargs)
        self.model = model
        self.method, self.beta = method, float(beta)
        self.bn_statistics = bn_statistics

    @property
    def network(self):
        return self.model

    def adversarial_examples(self, x, y):
        """The PGD examples a training step crafts for the batch (x, y) (x
        itself for "natural")."""
        return self._adversarial(*self._unpack((x, y)))

    def _adversarial(self, x, y):
        if self.method == "natural":
            return x
        if self.method == "pgd_at":
            return self.attack(self._inference, x, y)
        p_clean = tf.nn.softmax(tf.cast(self._inference(x), tf.float32))
        return self.attack.replace(loss="kl")(self._inference, x, y, targets=p_clean)

    def train_step(self, data):
        x, y = self._unpack(data)
        x_adv = None if self.method == "natural" else self._adversarial(x, y)
        with tf.GradientTape() as tape:
            # x' before x, so BatchNorm's moving statistics update in that order.
            logits_adv = None if x_adv is None else self.model(x_adv, training=True)
            # Natural training has no x': its clean pass trains BatchNorm.
            logits_clean = (None if self.method == "pgd_at" else
                            self.model(x, training=True) if self.method == "natural" else
                            clean_pass(self.model, x, self.bn_statistics,
                                       moving_statistics(self.model)))
            if self.method == "natural":
                terms = losses.natural(y, logits_clean)
            elif self.method == "pgd_at":
                terms = losses.pgd_at(y, logits_adv)
            else:
                terms = losses.trades(y, logits_clean, logits_adv, self.beta)
            scaled = self.optimizer.scale_loss(self._reduce(terms["loss"]))
        self._apply(tape, scaled)
        return self._report(y, terms, logits_clean, logits_adv)
