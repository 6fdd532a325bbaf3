"""The masking probe (ardir_tf.masking) on an honest model and on a masked one."""

import json

import pytest

from ardir_tf import masking
from test_evaluate import Quantised

EPS = 0.15
SETTINGS = dict(steps=(5, 20), apgd_steps=20, square_queries=300)


@pytest.fixture(scope="module")
def images(digits):
    _, (x, y) = digits
    return x[:96], y[:96]


def test_an_honest_model_passes_and_its_gradients_are_alive(trained, images):
    import tensorflow as tf
    tf.random.set_seed(123)
    expected = tf.random.uniform([3]).numpy()  # the caller's next draw
    tf.random.set_seed(123)
    r = masking.probe(trained["student"], *images, EPS, **SETTINGS)
    assert (tf.random.uniform([3]).numpy() == expected).all()  # its random state untouched
    json.dumps(r)  # all of it is JSON
    assert r["square_share_passes"], r
    assert r["clean"] > 0.9 and 0.3 < r["gradient_worst"] < r["clean"], r
    assert r["worst"] <= r["gradient_worst"] <= min(r["pgd"].values())
    assert r["gradient_worst"] <= r["apgd_ce"]
    g = r["gradients"]["clean"]
    assert g["n"] == round(r["clean"] * 96) and g["zero_gradient_share"] == 0.0
    assert 0 < g["quantiles"]["0.1"] <= g["quantiles"]["0.5"] <= g["quantiles"]["0.9"]
    assert sum(g["histogram"]["counts"]) + g["histogram"]["zeros"] == g["n"]
    # At the PGD-5 point the model is less sure than at x: larger CE gradients.
    assert r["gradients"]["pgd5"]["quantiles"]["0.5"] > g["quantiles"]["0.5"]
    assert r["logits"]["mean_max"] > 0 and r["logits"]["mean_margin"] > 0
    text = masking.format_probe(r, "student")
    assert "passes" in text and "PGD-20" in text and "APGD-CE" in text


def test_a_masked_model_fails_and_its_gradients_are_zero(trained, images):
    r = masking.probe(Quantised(trained["natural"]), *images, EPS, **SETTINGS)
    # PGD sees no gradient: it leaves almost everything standing; Square does not.
    assert r["gradient_worst"] > 0.8, r
    assert not r["square_share_passes"] and r["square_share"] > 0.5, r
    assert r["worst"] < r["gradient_worst"] - 0.4
    for where in ("clean", "pgd5"):
        assert r["gradients"][where]["zero_gradient_share"] == 1.0
        assert r["gradients"][where]["zero_pixel_share"] == 1.0
    assert "FAILS" in masking.format_probe(r)


def test_bad_steps_are_refused(trained, images):
    with pytest.raises(ValueError, match="positive step counts"):
        masking.probe(trained["student"], *images, EPS, steps=(0,))


def test_the_callback_records_the_probe_each_epoch_into_the_history(images):
    import keras
    import tensorflow as tf
    from ardir_tf import AdversarialTrainer, attacks, models
    keras.utils.set_random_seed(0)
    x, y = images
    model = models.build("small_cnn", (8, 8, 1), 10, width=4)
    trainer = AdversarialTrainer(model, attack=attacks.PGD(eps=EPS, step_size=EPS / 4,
                                                           steps=2))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    probe = masking.ProbeCallback(model, x[:40], y[:40], EPS, steps=(2, 6), every=1)
    history = trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=2,
                          callbacks=[probe], verbose=0)
    assert [e["epoch"] for e in probe.history] == [1, 2]
    for entry in probe.history:
        assert 0 <= entry["pgd6"] <= 1 and 0 <= entry["pgd2"] <= 1
        assert entry["grad_median"] > 0 and entry["zero_gradient_share"] == 0.0
    # The same numbers reach fit's History (and so CSV loggers and TensorBoard).
    assert history.history["probe_pgd6"] == [e["pgd6"] for e in probe.history]
    assert history.history["probe_grad_median"] == [e["grad_median"] for e in probe.history]


def test_the_callback_probes_a_mixed_precision_model_as_its_float32_copy(images):
    """Under mixed_bfloat16 the callback attacks the float32 copy of the model,
    with the weights the model has at the epoch's end."""
    import keras
    import numpy as np
    from ardir_tf import models, precision
    x, y = images
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build("small_cnn", (8, 8, 1), 10, width=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    probe = masking.ProbeCallback(model, x[:16], y[:16], EPS, steps=(2,))
    assert precision.compute_dtypes(model) == "mixed_bfloat16"
    assert precision.compute_dtypes(probe.probed) == "float32"
    model.set_weights([w + 0.01 for w in model.get_weights()])  # as an epoch of training
    probe.on_epoch_end(0)
    for got, want in zip(probe.probed.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert 0 <= probe.history[0]["pgd2"] <= 1
