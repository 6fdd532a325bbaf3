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
    assert set(h.history) == {"loss", "clean_accuracy", "adv_accuracy"} | terms
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


def np_log_softmax(z):
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_trades_step_computes_ce_plus_beta_kl_on_its_attack():
    keras.utils.set_random_seed(1)
    model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    trainer = ardir_tf.AdversarialTrainer(model, attack=ATTACK.replace(random_start=False),
                                          method="trades", beta=2.0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: one fixed model
    x, y = batch(32)
    x_adv = trainer.adversarial_examples(x, y).numpy()
    # TRADES' attack maximises KL(f(x) || f(x')), from the inference-mode model.
    p = tf.nn.softmax(model(x, training=False))
    kl = lambda z: float(tf.reduce_mean(ardir_tf.attacks.attack_objective(  # noqa: E731
        "kl", model(z, training=False), y, p)))
    assert kl(x_adv) > kl(x) + 1e-3
    h = trainer.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    # Training-mode logits use batch statistics, so they can be read after fit.
    clean = np_log_softmax(model(x, training=True).numpy())
    adv = np_log_softmax(model(x_adv, training=True).numpy())
    expected = (-clean[np.arange(32), y] + 2.0 * (np.exp(clean) * (clean - adv)).sum(-1)).mean()
    assert h["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_pgd_at_trains_on_the_attack_loss():
    keras.utils.set_random_seed(2)
    model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    trainer = ardir_tf.AdversarialTrainer(model, attack=ATTACK.replace(random_start=False))
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))
    x, y = batch(32)
    x_adv = trainer.adversarial_examples(x, y)
    h = trainer.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    adv = np_log_softmax(model(x_adv, training=True).numpy())
    assert h["loss"][0] == pytest.approx(-adv[np.arange(32), y].mean(), rel=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="mart"), "unknown method 'mart'"),
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(attack=None), "attack is required"),
    (dict(attack=ATTACK.replace(loss="kl")), "method='trades'"),
])
def test_bad_arguments(kwargs, message):
    args = dict(attack=ATTACK)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ardir_tf.AdversarialTrainer(ardir_tf.models.build("small_cnn", (8, 8, 1), 10), **args)
