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


def test_trades_loss_is_ce_plus_beta_kl():
    keras.utils.set_random_seed(1)
    model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    trainer = ardir_tf.AdversarialTrainer(model, attack=ATTACK, method="trades", beta=2.0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: metrics of one fixed model
    h = trainer.fit(ds(32), epochs=1, verbose=0).history
    assert h["loss"][0] == pytest.approx(h["ce"][0] + h["kl_adv"][0], rel=1e-5)
    assert h["kl_adv"][0] > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="mart"), "unknown method 'mart'"),
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(attack=None), "attack is required"),
])
def test_bad_arguments(kwargs, message):
    args = dict(attack=ATTACK)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ardir_tf.AdversarialTrainer(ardir_tf.models.build("small_cnn", (8, 8, 1), 10), **args)
