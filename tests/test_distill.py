import numpy as np
import pytest
import tensorflow as tf
import keras

import ardir_tf
from ardir_tf import attacks, losses, models
from conftest import batch, tiny_pair

ATTACK = attacks.PGD(eps=0.2, step_size=0.05, steps=3)
FIXED_ATTACK = ATTACK.replace(random_start=False)


def dataset(n=128, batch_size=32, seed=0):
    x, y = batch(n, seed)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def distiller(teacher=None, student=None, optimizer=None, **kw):
    if teacher is None:
        teacher, student = tiny_pair()
    kw.setdefault("layers", [("stage2", "stage2")])
    kw.setdefault("attack", ATTACK)
    d = ardir_tf.ARDIRDistiller(teacher=teacher, student=student, **kw)
    d.compile(optimizer=optimizer or keras.optimizers.SGD(0.05, momentum=0.9))
    return d


def weights(model):
    return [w.numpy().copy() for w in model.weights]


def test_fit_changes_the_student_and_never_the_teacher():
    keras.utils.set_random_seed(0)
    d = distiller(layers=[("stage1", "stage2"), ("stage2", "stage2")])
    teacher_before, student_before = weights(d.teacher), weights(d.student)
    adapters_before = [w.numpy().copy() for a in d.adapters if a for w in a.weights]
    history = d.fit(dataset(), epochs=2, verbose=0)
    for before, after in zip(teacher_before, weights(d.teacher)):
        np.testing.assert_array_equal(before, after)  # bit-identical, BN statistics too
    changed = [not np.array_equal(b, a) for b, a in zip(student_before, weights(d.student))]
    assert all(changed), "every student weight (kernels, BN) should move"
    adapters_after = [w.numpy() for a in d.adapters if a for w in a.weights]
    assert adapters_before and all(not np.array_equal(b, a)
                                   for b, a in zip(adapters_before, adapters_after))
    assert set(history.history) == {"loss", "kd", "ce", "ir", "clean_accuracy", "adv_accuracy"}
    assert np.all(np.isfinite(history.history["loss"]))


def test_adapters_are_not_part_of_the_student(tmp_path):
    d = distiller(layers=[("stage1", "stage2")])
    adapter_ids = {id(w) for a in d.adapters if a for w in a.weights}
    assert adapter_ids and not adapter_ids & {id(w) for w in d.student.weights}
    n_params = d.student.count_params()
    d.fit(dataset(64), epochs=1, verbose=0)
    d.student.save(tmp_path / "student.keras")
    loaded = keras.models.load_model(tmp_path / "student.keras")
    assert loaded.count_params() == n_params
    x, _ = batch(8)
    np.testing.assert_allclose(loaded(x), d.student(x, training=False), atol=1e-5)


def test_mismatched_shapes_need_an_adapter():
    teacher, student = tiny_pair(teacher_width=8, student_width=4)
    with pytest.raises(ValueError) as err:
        distiller(teacher, student, layers=[("stage1", "stage2")], adapters=False)
    assert "(8, 8, 4)" in str(err.value) and "(4, 4, 16)" in str(err.value)
    d = distiller(teacher, student, layers=[("stage1", "stage2"), ("features", "features")])
    assert [a is not None for a in d.adapters] == [True, True]
    assert d.adapters[0](np.zeros((2, 8, 8, 4), np.float32)).shape == (2, 4, 4, 16)
    assert d.adapters[1](np.zeros((2, 8), np.float32)).shape == (2, 16)


def test_same_shapes_need_no_adapter():
    teacher, student = tiny_pair(teacher_width=4, student_width=4)
    d = distiller(teacher, student, layers=[("stage2", "stage2")], adapters=False)
    assert d.adapters == [None]


def test_ir_term_changes_the_gradients_of_early_layers():
    keras.utils.set_random_seed(1)
    teacher, student = tiny_pair()
    s_view = models.expose(student, ["stage2"])
    t_view = models.expose(teacher, ["stage2"])
    x, y = batch(16)
    x_adv = FIXED_ATTACK(lambda z: student(z, training=False), x, y)
    t_out = t_view(x, training=False)
    adapter = ardir_tf.distill.build_adapter((4, 4, 8), (4, 4, 16), "a")
    kernel = student.get_layer("s1_conv1").kernel

    def grad(ir_weight):
        with tf.GradientTape() as tape:
            s_adv = s_view(x_adv, training=True)
            terms = losses.ardir(y, student(x, training=True), s_adv["logits"],
                                 t_out["logits"], [adapter(s_adv["stage2"])],
                                 [t_out["stage2"]], ir_weight=ir_weight)
            loss = tf.reduce_mean(terms["loss"])
        return terms, tape.gradient(loss, kernel).numpy()

    terms0, g0 = grad(0.0)
    terms1, g1 = grad(1.0)
    assert float(tf.reduce_min(terms1["ir"])) > 0
    assert np.abs(g1 - g0).max() > 1e-3 * np.abs(g0).max()


def test_ir_weight_zero_trains_exactly_like_ard():
    def run(**kw):
        keras.utils.set_random_seed(2)
        d = distiller(attack=FIXED_ATTACK, **kw)
        d.fit(dataset(), epochs=1, verbose=0)
        return weights(d.student)

    for a, b in zip(run(method="ardir", ir_weight=0.0), run(method="ard", layers=[])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_each_attack_objective_is_the_one_maximised():
    # The attack aimed at objective O reaches a higher O than the attacks aimed
    # at the other objectives: each objective is wired to the attack.
    keras.utils.set_random_seed(3)
    teacher, student = tiny_pair()
    x, y = batch(64)
    objectives = ("ce", "kl", "ardir")
    ds = {o: distiller(teacher, student, layers=[("stage1", "stage2")], attack_objective=o,
                       attack=FIXED_ATTACK.replace(steps=10)) for o in objectives}
    s_view, t_out = models.expose(student, ["stage1"]), ds["ardir"]._views.teacher(x)
    adapter = ds["ardir"].adapters[0]

    def value(objective, z):
        s_out = s_view(z, training=False)
        if objective == "ce":
            return float(tf.reduce_mean(losses.ce(y, s_out["logits"])))
        kd = losses.kd_kl(t_out["logits"], s_out["logits"])
        if objective == "ardir":
            kd = 0.9 * kd + losses.ir_term([adapter(s_out["stage1"])], [t_out["stage2"]])
        return float(tf.reduce_mean(kd))

    x_adv = {o: ds[o].adversarial_examples(x, y) for o in objectives}
    for o in objectives:
        assert value(o, x_adv[o]) > value(o, x)
        for other in objectives:
            if other != o:
                assert value(o, x_adv[o]) > value(o, x_adv[other]), (o, other)
    h = ds["ardir"].fit(dataset(64), epochs=1, verbose=0)
    assert np.isfinite(h.history["loss"][0])


def test_rslad_and_ard_methods_report_their_terms():
    keras.utils.set_random_seed(4)
    h = distiller(method="rslad", layers=[], alpha=5 / 6).fit(dataset(64), epochs=1, verbose=0)
    assert {"kd", "kd_clean"} <= set(h.history)
    h = distiller(method="ard", layers=[], alpha=1.0).fit(dataset(64), epochs=1, verbose=0)
    assert "ce" not in h.history and "kd" in h.history


def test_evaluate_reports_clean_and_pgd_accuracy():
    d = distiller()
    result = d.evaluate(dataset(64), verbose=0, return_dict=True)
    assert set(result) == {"clean_accuracy", "pgd_accuracy"}
    assert result["pgd_accuracy"] <= result["clean_accuracy"]
    h = d.fit(dataset(64), validation_data=dataset(64), epochs=1, verbose=0)
    assert {"val_clean_accuracy", "val_pgd_accuracy"} <= set(h.history)


def test_one_device_and_two_replicas_train_the_same_weights():
    # Random start off; synchronised BN so both see whole-batch statistics
    # (plain BN normalises each replica's half-batch on its own).
    def run(strategy):
        keras.utils.set_random_seed(5)
        with strategy.scope():
            teacher, student = tiny_pair(sync_batchnorm=True)
            d = distiller(teacher, student, layers=[("stage1", "stage2")],
                          attack=FIXED_ATTACK)
        h = d.fit(dataset(128, 64), epochs=2, verbose=0)
        return weights(d.student), {k: v[-1] for k, v in h.history.items()}

    w1, m1 = run(tf.distribute.get_strategy())
    mirrored = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    assert mirrored.num_replicas_in_sync == 2
    w2, m2 = run(mirrored)
    # Summation order differs between one device and an all-reduce: after 4
    # momentum steps the weights agree to about 1e-5 (measured: 1.0e-5 at most).
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert max(np.abs(a).max() for a in w1) > 0.1  # it trained
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], abs=1e-4), k  # metrics not 1/N


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="kd"), "unknown method 'kd'"),
    (dict(alpha=1.5), "alpha must be in \\[0.0, 1.0\\], got 1.5"),
    (dict(alpha=-0.1), "alpha must be in"),
    (dict(ir_weight=-1.0), "ir_weight must be >= 0"),
    (dict(temperature=0), "temperature must be > 0"),
    (dict(layers=[("stage9", "stage2")]), "'stage9' not in model"),
    (dict(layers=[("stage2", "nope")]), "'nope' not in model"),
    (dict(layers=["stage2"]), "pairs of layer names"),
    (dict(layers=[]), "needs layers="),
    (dict(method="ard"), "layers are matched only by method='ardir'"),
    (dict(attack_objective="fgsm"), "unknown attack_objective 'fgsm'"),
    (dict(attack=None), "attack is required"),
    (dict(attack="pgd"), "must be an ardir_tf.attacks.PGD"),
    (dict(distance="l1"), "unknown distance 'l1'"),
])
def test_bad_arguments_say_which_and_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distiller(**kwargs)


def test_teacher_and_student_must_agree_on_inputs_and_classes():
    teacher = models.build("small_cnn", (8, 8, 1), 10, width=4)
    with pytest.raises(ValueError, match="same input"):
        distiller(teacher, models.build("small_cnn", (28, 28, 1), 10, width=4), layers=[],
                  method="ard")
    with pytest.raises(ValueError, match="same classes"):
        distiller(teacher, models.build("small_cnn", (8, 8, 1), 5, width=4), layers=[],
                  method="ard")


def test_nan_loss_stops_training():
    d = distiller()
    x, y = batch(32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        d.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0)
