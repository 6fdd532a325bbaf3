import numpy as np
import pytest
import tensorflow as tf
import keras

import ardir_tf
from conftest import batch

ATTACK = ardir_tf.attacks.PGD(eps=0.2, step_size=0.05, steps=3)


def ds(n=96):
    x, y = batch(n)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)


@pytest.mark.parametrize("method,terms", [("pgd_at", {"ce_adv"}), ("trades", {"ce", "kl_adv"})])
def test_trainer_updates_the_model_and_reports_terms(method, terms):
    keras.utils.set_random_seed(0)
    model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    before = [w.numpy().copy() for w in model.trainable_weights]
    trainer = ardir_tf.AdversarialTrainer(model, attack=ATTACK, method=method)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05))
    h = trainer.fit(ds(), epochs=1, verbose=0)
    # PGD-AT has no clean pass: no training clean_accuracy (validation has it).
    clean = {"clean_accuracy"} if method == "trades" else set()
    assert set(h.history) == {"loss", "adv_accuracy"} | clean | terms
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


def np_log_softmax(z):
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class FixedAttackTrainer(ardir_tf.AdversarialTrainer):
    """The step's adversarial batch is a given array: the loss `fit` reports and
    the one recomputed below then come from the very same x', instead of from two
    runs of the attack (eagerly and inside fit's graph), whose sign steps on
    near-zero gradients can flip with float noise that differs between
    executors and machines."""

    def __init__(self, model, x_adv, **kwargs):
        super().__init__(model, **kwargs)
        self.x_adv = tf.constant(x_adv)

    def _adversarial(self, x, y):  # what train_step calls for x'
        return self.x_adv


def test_trades_attack_maximises_the_kl_from_the_clean_output():
    keras.utils.set_random_seed(1)
    model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    trainer = ardir_tf.AdversarialTrainer(model, attack=ATTACK.replace(random_start=False),
                                          method="trades", beta=2.0)
    x, y = batch(32)
    x_adv = trainer.adversarial_examples(x, y).numpy()
    # TRADES' attack maximises KL(f(x) || f(x')), from the inference-mode model.
    p = tf.nn.softmax(model(x, training=False))
    kl = lambda z: float(tf.reduce_mean(ardir_tf.attacks.attack_objective(  # noqa: E731
        "kl", model(z, training=False), y, p)))
    assert kl(x_adv) > kl(x) + 1e-3


@pytest.mark.parametrize("method", ["trades", "pgd_at", "natural"])
def test_the_step_computes_its_methods_loss_on_its_adversarial_batch(method):
    keras.utils.set_random_seed(1)
    model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    x, y = batch(32)
    x_adv = np.clip(x + np.random.default_rng(1).uniform(-0.2, 0.2, x.shape), 0, 1
                    ).astype(np.float32)
    trainer = FixedAttackTrainer(model, x_adv, attack=ATTACK, method=method, beta=2.0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: one fixed model
    # shuffle=False: the fixed x' is paired with x in this order.
    h = trainer.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history
    # Training-mode logits use batch statistics, so they can be read after fit
    # (TRADES' clean pass is normalised by its own batch: bn_statistics="split").
    clean = np_log_softmax(model(x, training=True).numpy())
    adv = np_log_softmax(model(x_adv, training=True).numpy())
    ce_clean, ce_adv = -clean[np.arange(32), y], -adv[np.arange(32), y]
    kl = (np.exp(clean) * (clean - adv)).sum(-1)
    expected = {"trades": {"ce": ce_clean.mean(), "kl_adv": 2.0 * kl.mean()},
                "pgd_at": {"ce_adv": ce_adv.mean()},
                "natural": {"ce": ce_clean.mean()}}[method]
    # The same float32 arithmetic in graph and in numpy (float64): agreement to
    # float32 rounding of a sum of 32 terms, far below any wiring mistake (a
    # swapped x/x' or a dropped beta moves these by more than 1%).
    for term, value in expected.items():
        assert h[term][0] == pytest.approx(value, rel=1e-5), term
    assert h["loss"][0] == pytest.approx(sum(expected.values()), rel=1e-5)
    assert ("adv_accuracy" in h) == (method != "natural")


def test_natural_training_is_plain_keras_training():
    """method="natural" makes the update Keras' own compile(loss=CE) + fit makes."""
    (x, y), _ = ardir_tf.data.digits()
    x, y = x[:320], y[:320]

    def trained(ours):
        keras.utils.set_random_seed(3)
        model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
        if ours:
            trainable = ardir_tf.AdversarialTrainer(model, attack=ATTACK, method="natural")
            trainable.compile(optimizer=keras.optimizers.Adam(3e-3))
        else:
            trainable = model
            model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"],
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        h = trainable.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0).history
        return model.get_weights(), h

    (ours, h), (theirs, h_keras) = trained(True), trained(False)
    assert set(h) == {"loss", "ce", "clean_accuracy"}
    np.testing.assert_allclose(h["loss"], h_keras["loss"], rtol=1e-5)
    np.testing.assert_allclose(h["clean_accuracy"], h_keras["accuracy"], rtol=1e-5)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert h["loss"][-1] < h["loss"][0]


def test_an_unbuilt_model_is_refused_with_how_to_build_it():
    unbuilt = keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                                keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="is not built.*keras.Input"):
        ardir_tf.AdversarialTrainer(unbuilt, attack=ATTACK)


def test_attack_is_a_required_keyword():
    model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    with pytest.raises(TypeError, match="attack"):
        ardir_tf.AdversarialTrainer(model)
    with pytest.raises(TypeError):
        ardir_tf.AdversarialTrainer(model, ATTACK)  # positional: not accepted


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="mart"), "unknown method 'mart'"),
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(attack=None), "attack is required"),
    (dict(attack="pgd"), "must be an ardir_tf.attacks.PGD"),
    (dict(attack=ATTACK.replace(loss="kl")), "method='trades'"),
])
def test_bad_arguments(kwargs, message):
    args = dict(attack=ATTACK)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ardir_tf.AdversarialTrainer(ardir_tf.models.build("small_cnn", (8, 8, 1), 10), **args)
