import h5py
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
    # The ardir path (layers given, losses.ardir called) with ir_weight=0 and
    # the ard path give bit-identical students.
    def run(**kw):
        keras.utils.set_random_seed(2)
        d = distiller(attack=FIXED_ATTACK, **kw)
        d.fit(dataset(), epochs=1, verbose=0)
        return weights(d.student)

    ardir = run(method="ardir", ir_weight=0.0, layers=[("stage1", "stage2")])
    for a, b in zip(ardir, run(method="ard", layers=[])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("teacher_input,student_input", [
    ("clean", "adv"), ("adv", "adv"), ("both", "adv"), ("clean", "both")])
def test_the_ir_inputs_are_the_ones_the_step_matches(teacher_input, student_input):
    # The step's reported IR term against one computed by hand from the
    # teacher's and the student's representations on x and x'.
    keras.utils.set_random_seed(3)
    d = distiller(attack=FIXED_ATTACK, ir_teacher_input=teacher_input,
                  ir_student_input=student_input, alpha=1.0)
    x, y = batch(16)
    start = weights(d.student)
    x_adv = d.adversarial_examples(x, y)
    t_view = models.expose(d.teacher, ["stage2"])
    t_clean, t_adv = t_view(x, training=False)["stage2"], t_view(x_adv, training=False)["stage2"]
    s_adv = d._adapted(d._views.student(x_adv, training=True))[0]
    s_clean = d._adapted(d._views.student(x, training=True))[0]  # its own batch's statistics
    matches = {"clean": [(s_adv, t_clean)], "adv": [(s_adv, t_adv)],
               "both": [(s_adv, t_clean), (s_adv, t_adv)]}[teacher_input]
    if student_input == "both":
        matches.append((s_clean, t_clean))
    expected = np.mean([losses.ir_distance(s, t).numpy() for s, t in matches], axis=0).mean()
    d.student.set_weights(start)  # the hand passes moved BatchNorm's moving statistics
    logs = d.train_on_batch(x, y, return_dict=True)
    assert logs["ir"] == pytest.approx(float(expected), rel=1e-5)
    assert ("clean_accuracy" in logs) == (student_input == "both")  # alpha = 1: no CE pass


@pytest.mark.parametrize("kd_input", ["clean", "adv"])
def test_the_kd_target_is_the_teachers_output_on_the_input_asked_for(kd_input):
    # The step's KD term against KL(t(x) || s(x')) or KL(t(x') || s(x')) by hand.
    keras.utils.set_random_seed(4)
    d = distiller(method="ard", layers=[], attack=FIXED_ATTACK, kd_teacher_input=kd_input,
                  alpha=1.0)
    x, y = batch(16)
    start = weights(d.student)
    x_adv = d.adversarial_examples(x, y)
    target = d.teacher(x if kd_input == "clean" else x_adv, training=False)
    other = d.teacher(x_adv if kd_input == "clean" else x, training=False)
    s_adv = d.student(x_adv, training=True)
    expected = losses.kd_kl(target, s_adv).numpy().mean()
    d.student.set_weights(start)
    logs = d.train_on_batch(x, y, return_dict=True)
    assert logs["kd"] == pytest.approx(float(expected), rel=1e-5)
    # The two targets differ enough on this batch for the check to tell them apart.
    assert abs(losses.kd_kl(other, s_adv).numpy().mean() - expected) > 1e-3 * expected


def one_step(ir_weight, seed=6):
    """The student's weights after one SGD step (lr 0.1) of a fresh distiller."""
    keras.utils.set_random_seed(seed)
    d = distiller(attack=FIXED_ATTACK, ir_weight=ir_weight, layers=[("stage1", "stage2")],
                  optimizer=keras.optimizers.SGD(0.1))
    start = weights(d.student)
    d.fit(dataset(32), epochs=1, verbose=0)
    return d, start, weights(d.student)


def test_ir_term_changes_the_update_of_early_layers_in_the_distiller():
    d0, start0, end0 = one_step(0.0)
    d1, start1, end1 = one_step(1.0)
    k = [w.path for w in d0.student.weights].index("s1_conv1/kernel")
    np.testing.assert_array_equal(start0[k], start1[k])  # same start
    step0, step1 = end0[k] - start0[k], end1[k] - start1[k]
    assert np.abs(step1 - step0).max() > 0.05 * np.abs(step0).max()


@pytest.mark.parametrize("bn_statistics", ["split", "adv", "both"])
def test_attack_runs_in_inference_mode_and_the_update_in_training_mode(bn_statistics):
    # With lr 0 one step changes only BN moving statistics. They must be what
    # the training-mode calls give: x' alone ("split": the clean pass's update
    # is undone; "adv": it runs in inference mode), or x' then x ("both", the
    # reference code's). An attack run in training mode would have added K more.
    keras.utils.set_random_seed(7)
    teacher, student = tiny_pair()
    d = distiller(teacher, student, attack=FIXED_ATTACK, optimizer=keras.optimizers.SGD(0.0),
                  bn_statistics=bn_statistics)
    x, y = batch(32)
    x_adv = d.adversarial_examples(x, y)
    twin = keras.models.clone_model(student)
    twin.set_weights(student.get_weights())
    twin(x_adv, training=True)
    if bn_statistics == "both":
        twin(x, training=True)
    d.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0)
    moving = [i for i, w in enumerate(student.weights) if "moving" in w.path]
    assert moving
    for i in moving:
        np.testing.assert_allclose(student.weights[i].numpy(), twin.weights[i].numpy(),
                                   atol=1e-6)
    # ...and x moves them: the two settings are told apart.
    twin(x, training=True)
    assert any(not np.allclose(student.weights[i].numpy(), twin.weights[i].numpy(),
                               atol=1e-4) for i in moving)


def test_standard_callbacks_work(tmp_path):
    d = distiller()
    stop = keras.callbacks.EarlyStopping(monitor="val_pgd_accuracy", mode="max", patience=1)
    best = keras.callbacks.ModelCheckpoint(tmp_path / "best.weights.h5", save_weights_only=True,
                                           monitor="val_pgd_accuracy", mode="max",
                                           save_best_only=True)
    log = keras.callbacks.CSVLogger(tmp_path / "history.csv")
    h = d.fit(dataset(64), validation_data=dataset(32), epochs=6, verbose=0,
              callbacks=[stop, best, log])
    assert (tmp_path / "best.weights.h5").exists()
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss", "ir", "val_pgd_accuracy"} <= set(header)
    assert len(h.history["loss"]) == len((tmp_path / "history.csv").read_text().splitlines()) - 1


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


@pytest.mark.parametrize("ir_student_input", ["adv", "both"])
def test_the_ardir_attack_objective_is_the_part_of_the_loss_that_moves_with_x_adv(
        ir_student_input):
    """attack_objective="ardir": the loss at two points x'1, x'2 differs by what
    the attack's objective differs by, also when the IR term averages x''s match
    with the clean one (ir_student_input="both", where x''s match weighs half)."""
    keras.utils.set_random_seed(5)
    teacher, student = tiny_pair()
    x, y = batch(16)
    rng = np.random.default_rng(0)
    x1, x2 = (np.clip(x + rng.uniform(-0.2, 0.2, x.shape), 0, 1).astype("float32")
              for _ in range(2))
    d = distiller(teacher, student, layers=[("stage1", "stage2")], attack_objective="ardir",
                  ir_student_input=ir_student_input)
    view, t_out = d._views.student, d._views.teacher(x, training=False)
    s_clean = view(x, training=False)

    def loss(z):
        return d._loss_terms(y, s_clean, view(z, training=False), t_out)["loss"]

    def objective(z):
        return d._ardir_attack_loss(view(z, training=False), t_out["logits"],
                                    d._teacher_features(t_out))
    moved = (loss(x1) - loss(x2)).numpy()
    assert np.abs(moved).max() > 1e-3  # the two points differ in the loss
    np.testing.assert_allclose(moved, (objective(x1) - objective(x2)).numpy(), atol=1e-5)


def test_an_ir_term_switched_off_runs_no_clean_pass_and_reports_no_clean_accuracy():
    keras.utils.set_random_seed(6)
    h = distiller(ir_weight=0.0, ir_student_input="both", alpha=1.0).fit(
        dataset(64), epochs=1, verbose=0)
    assert "clean_accuracy" not in h.history and "adv_accuracy" in h.history


def test_rslad_and_ard_methods_report_their_terms():
    keras.utils.set_random_seed(4)
    h = distiller(method="rslad", layers=[], alpha=5 / 6).fit(dataset(64), epochs=1, verbose=0)
    assert {"kd", "kd_clean"} <= set(h.history)
    h = distiller(method="ard", layers=[], alpha=1.0).fit(dataset(64), epochs=1, verbose=0)
    assert "ce" not in h.history and "kd" in h.history
    # alpha = 1 has no clean pass: no forward pass per step for the metric.
    assert "clean_accuracy" not in h.history and "adv_accuracy" in h.history


def test_evaluate_reports_clean_and_pgd_accuracy(trained, digits):
    _, (x_test, y_test) = digits
    d = distiller(trained["teacher"], trained["student"], attack=trained["attack"])
    result = d.evaluate(x_test, y_test, batch_size=128, verbose=0, return_dict=True)
    assert set(result) == {"clean_accuracy", "pgd_accuracy"}
    student = trained["student"]
    clean = np.mean(np.argmax(student(x_test, training=False), -1) == y_test)
    assert result["clean_accuracy"] == pytest.approx(clean, abs=1e-6)
    x_adv = trained["attack"](lambda z: student(z, training=False), x_test, y_test)
    robust = np.mean(np.argmax(student(x_adv, training=False), -1) == y_test)
    assert result["pgd_accuracy"] == pytest.approx(robust, abs=0.03)  # random starts differ
    assert result["pgd_accuracy"] < clean - 0.1


def test_fit_with_validation_reports_val_metrics():
    h = distiller().fit(dataset(64), validation_data=dataset(64), epochs=1, verbose=0)
    assert {"val_clean_accuracy", "val_pgd_accuracy"} <= set(h.history)


@pytest.mark.slow
def test_one_device_and_two_replicas_train_the_same_weights(mirrored):
    # Random start off; synchronised BN so both see whole-batch statistics
    # (plain BN normalises each replica's half-batch on its own).
    def run(strategy):
        keras.utils.set_random_seed(5)
        with strategy.scope():
            teacher, student = tiny_pair(sync_batchnorm=True)
            d = distiller(teacher, student, layers=[("stage1", "stage2")],
                          attack=FIXED_ATTACK)
        # 157 = 2 x 64 + 29: the last batch splits 15/14 over two replicas.
        h = d.fit(dataset(157, 64), epochs=2, verbose=0)
        return weights(d.student), {k: v[-1] for k, v in h.history.items()}

    w1, m1 = run(tf.distribute.get_strategy())
    w2, m2 = run(mirrored)
    # Summation order differs between one device and an all-reduce: after 6
    # momentum steps the weights agree to about 1e-5 (measured: 1.0e-5 at most).
    # Without the all-reduced global batch size in the reduction, the uneven
    # last batch moved them by 2.9e-4 (measured).
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert max(np.abs(a).max() for a in w1) > 0.1  # it trained
    for k in m1:
        # Metrics not 1/N. The clean pass reads BN's moving statistics, which the
        # replicas update in their own context: the clean accuracy moved by 1.2e-4
        # between the two (measured), far from a factor of 2.
        assert m1[k] == pytest.approx(m2[k], rel=1e-2, abs=1e-4), k


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="kd"), "unknown method 'kd'"),
    (dict(alpha=1.5), "alpha must be in \\[0.0, 1.0\\], got 1.5"),
    (dict(alpha=-0.1), "alpha must be in"),
    (dict(ir_weight=-1.0), "ir_weight must be >= 0"),
    (dict(temperature=0), "temperature must be > 0"),
    (dict(layers=[("stage9", "stage2")]), "'stage9' not in model"),
    (dict(layers=[("stage2", "nope")]), "'nope' not in model"),
    (dict(layers=["stage2"]), "tuples of layer names"),
    (dict(layers=[]), "needs layers="),
    (dict(method="ard"), "layers are matched only by method='ardir'"),
    (dict(attack_objective="fgsm"), "unknown attack_objective 'fgsm'"),
    (dict(attack=None), "attack is required"),
    (dict(attack="pgd"), "must be an ardir_tf.attacks.PGD"),
    (dict(distance="l1"), "unknown distance 'l1'"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(teacher="teacher.keras"), "teacher must be a keras.Model.*load_model"),
    (dict(attack=ATTACK.replace(loss="kl")), "attack_objective='kl'"),
    (dict(method="rslad", layers=[], temperature=4.0), "rslad' uses temperature 1"),
    (dict(ir_teacher_input="noisy"), "unknown ir_teacher_input 'noisy'"),
    (dict(ir_student_input="clean"), "unknown ir_student_input 'clean'"),
    (dict(method="ard", layers=[], ir_student_input="both"), "only method='ardir' has"),
    (dict(attack_objective="ardir", ir_teacher_input="adv"), "the targets move with x'"),
    (dict(kd_teacher_input="both"), "unknown kd_teacher_input 'both'"),
    (dict(bn_statistics="clean"), "unknown bn_statistics 'clean'"),
    (dict(method="rslad", layers=[], kd_teacher_input="adv"), "is for ard and ardir"),
    (dict(attack_objective="ardir", kd_teacher_input="adv"), "the targets move with x'"),
])
def test_bad_arguments_say_which_and_why(kwargs, message):
    if "teacher" in kwargs:
        kwargs["student"] = tiny_pair()[1]
    with pytest.raises(ValueError, match=message):
        distiller(**kwargs)


def test_models_ending_in_softmax_are_rejected():
    teacher, _ = tiny_pair()
    probs = keras.Model(teacher.input, keras.layers.Softmax()(teacher.output))
    with pytest.raises(ValueError, match="ends in a softmax"):
        distiller(probs, tiny_pair()[1])


def test_rslad_defaults_follow_the_paper():
    d = distiller(method="rslad", layers=[])
    assert d.alpha == pytest.approx(5 / 6) and d.attack_objective == "kl"


def test_bad_batches_get_clear_errors():
    d = distiller()
    x, y = batch(32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="scale 0-255 images by 1/255"):
        d.fit(x * 255, y, batch_size=32, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="one-hot labels"):
        d.fit(x, np.eye(10, dtype=np.float32)[y], batch_size=32, epochs=1, verbose=0)


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
    bias = d.student.get_layer("logits").bias
    bias.assign(np.full(bias.shape, np.nan, np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        d.fit(dataset(32), epochs=1, verbose=0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_makes_the_float32_update_and_the_attack_still_bites(policy):
    """An epoch of SGD under a mixed policy moves the student as float32 does:
    under float16 the loss is scaled inside the tape and unscaled by the
    optimizer (without scale_loss, LossScaleOptimizer would shrink the update
    about 2^15 times); bfloat16 has float32's range and needs no scaling. The
    update runs at eps 0: PGD's sign steps on a 16-bit model craft other
    inputs than on a float32 one, which would hide what is compared here."""
    same_inputs = FIXED_ATTACK.replace(eps=0.0)
    keras.utils.set_random_seed(3)
    teacher32, student32 = tiny_pair()
    keras.mixed_precision.set_global_policy(policy)
    try:
        teacher16, student16 = tiny_pair()
        d16 = distiller(teacher16, student16, layers=[("stage1", "stage2")],
                        attack=same_inputs, optimizer=keras.optimizers.SGD(0.1))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    teacher16.set_weights(teacher32.get_weights())
    student16.set_weights(student32.get_weights())
    d32 = distiller(teacher32, student32, layers=[("stage1", "stage2")],
                    attack=same_inputs, optimizer=keras.optimizers.SGD(0.1))
    def adapters(d, student):
        own = {id(v) for v in student.trainable_variables}
        return [v for v in d.trainable_variables if id(v) not in own]

    for v16, v32 in zip(adapters(d16, student16), adapters(d32, student32), strict=True):
        v16.assign(v32)  # the IR adapters start apart otherwise
    assert (type(d16.optimizer).__name__ == "LossScaleOptimizer") == (policy == "mixed_float16")
    assert student16(batch()[0]).dtype == "float32"  # logits stay float32
    assert student16.get_layer("stage1").compute_dtype == policy.split("_")[1]
    def trainable(student):  # not BN's moving statistics: they move either way
        return np.concatenate([v.numpy().ravel() for v in student.trainable_variables])

    start = trainable(student32)
    deltas = []
    for d, student in ((d32, student32), (d16, student16)):
        d.fit(dataset(64, 64), epochs=1, verbose=0)
        deltas.append(trainable(student) - start)
    cosine = deltas[0] @ deltas[1] / np.linalg.norm(deltas[0]) / np.linalg.norm(deltas[1])
    ratio = np.linalg.norm(deltas[1]) / np.linalg.norm(deltas[0])
    assert cosine > 0.99 and 0.9 < ratio < 1.1, (cosine, ratio)

    # The attack on the float16 student: float32 pixels, within eps, and it works.
    x, y = batch(64)
    y = student16.predict(x, verbose=0).argmax(1)  # its own answers, all "correct"
    x_adv = FIXED_ATTACK(lambda z: student16(z, training=False), x, y)
    assert x_adv.dtype == tf.float32
    assert float(tf.reduce_max(tf.abs(x_adv - x))) <= FIXED_ATTACK.eps + 1e-6
    fooled = np.mean(student16.predict(x_adv, verbose=0).argmax(1) != y)
    assert fooled > 0.3, fooled


@pytest.mark.slow
def test_a_jit_compiled_step_makes_the_update_of_the_plain_step():
    def one_epoch(jit):
        keras.utils.set_random_seed(2)
        d = distiller(attack=FIXED_ATTACK, optimizer=keras.optimizers.SGD(0.05))
        d.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=jit)
        start = np.concatenate([w.numpy().ravel() for w in d.student.trainable_weights])
        history = d.fit(dataset(64, 32), epochs=1, verbose=0).history
        end = np.concatenate([w.numpy().ravel() for w in d.student.trainable_weights])
        return start, end - start, history

    start, plain, h_plain = one_epoch(False)
    start_xla, xla, h_xla = one_epoch(True)
    np.testing.assert_array_equal(start, start_xla)
    # XLA fuses and reorders float32 arithmetic: a PGD sign step on a near-zero
    # gradient can flip, so the two updates agree closely, not bit for bit.
    cosine = plain @ xla / np.linalg.norm(plain) / np.linalg.norm(xla)
    ratio = np.linalg.norm(xla) / np.linalg.norm(plain)
    assert cosine > 0.99 and 0.95 < ratio < 1.05, (cosine, ratio)
    assert h_xla["loss"][0] == pytest.approx(h_plain["loss"][0], rel=1e-2)


def test_the_step_is_traced_once():
    traces = []

    class Counting(ardir_tf.ARDIRDistiller):
        def train_step(self, data):
            traces.append(1)  # runs once per trace, not per step
            return super().train_step(data)

    teacher, student = tiny_pair()
    d = Counting(teacher=teacher, student=student, layers=[("stage2", "stage2")],
                 attack=ATTACK)
    d.compile(optimizer=keras.optimizers.Adam(1e-3))
    d.fit(dataset(128, 32), epochs=2, verbose=0)  # 8 steps of one shape
    assert len(traces) == 1


@pytest.mark.parametrize("kwargs", [dict(loss="mse"), dict(metrics=["accuracy"]),
                                    dict(loss_weights=[1.0]), dict(weighted_metrics=["mae"])])
def test_compile_refuses_what_it_would_ignore(kwargs):
    d = distiller()
    with pytest.raises(ValueError, match=f"takes an optimizer, not {next(iter(kwargs))}=.*"
                                         "kd, ce, ir.*clean_accuracy"):
        d.compile(optimizer="adam", **kwargs)
    trainer = ardir_tf.AdversarialTrainer(tiny_pair()[1], attack=ATTACK)
    with pytest.raises(ValueError, match="takes an optimizer"):
        trainer.compile(optimizer="adam", **kwargs)


def test_layer_pairs_by_name_dict_or_tuple_are_the_same_pairs():
    pairs = [ardir_tf.LayerPair(student="stage1", teacher="stage2"),
             {"student": "stage1", "teacher": "stage2"}, ("stage1", "stage2")]
    built = [distiller(layers=[p]) for p in pairs]
    assert {d.pairs[0] for d in built} == {ardir_tf.LayerPair("stage1", "stage2")}
    # The student's stage1 (8x8x4) is adapted to the teacher's stage2 (4x4x16).
    assert all(d.adapters[0](np.zeros((1, 8, 8, 4), np.float32)).shape == (1, 4, 4, 16)
               for d in built)
    swapped = distiller(layers=[{"teacher": "stage1", "student": "stage2"}])
    assert swapped.pairs[0] == ardir_tf.LayerPair(student="stage2", teacher="stage1")
    for bad, message in (({"student": "stage1"}, 'exactly the keys "student" and "teacher"'),
                         ({"student": "stage1", "teacher": 2}, "LayerPair.teacher must be a"),
                         (("stage1",), r"LayerPair\(student=..., teacher=...\)")):
        with pytest.raises(ValueError, match=message):
            distiller(layers=[bad])


def test_attack_is_a_required_keyword():
    teacher, student = tiny_pair()
    with pytest.raises(TypeError, match="attack"):
        ardir_tf.ARDIRDistiller(teacher=teacher, student=student, method="ard")
    with pytest.raises(TypeError):
        ardir_tf.ARDIRDistiller(teacher, student, [("stage2", "stage2")], ATTACK)


def test_the_distillers_weights_are_what_training_changes(tmp_path):
    """Its backups (save_weights, as BackupAndRestore writes them) hold the
    student, the adapters and the optimizer, not the frozen teacher."""
    teacher, student = tiny_pair(teacher_width=32, student_width=4)
    d = distiller(teacher, student, layers=[("stage2", "stage2")],
                  optimizer=keras.optimizers.Adam(1e-3))
    teacher_ids = {id(v) for v in teacher.weights}
    assert d.teacher is teacher and not teacher_ids & {id(v) for v in d.weights}
    # Frozen by being out of the distiller, not by flipping the caller's flag: the
    # same teacher object can still be trained on its own (main.py does).
    assert teacher.trainable and teacher.trainable_weights
    assert {id(v) for v in student.weights} <= {id(v) for v in d.weights}
    d.fit(dataset(64, 32), epochs=1, callbacks=[keras.callbacks.BackupAndRestore(
        tmp_path / "backup", delete_checkpoint=False)], verbose=0)
    backup = (tmp_path / "backup" / "latest.weights.h5").stat().st_size
    with h5py.File(tmp_path / "backup" / "latest.weights.h5") as f:
        assert "teacher" not in f and "optimizer" in f and "adapters" in f, list(f)
    # Student + adapter parameters, with Adam's two slots each: 3 floats apiece.
    trained = student.count_params() + sum(a.count_params() for a in d.adapters if a)
    assert teacher.count_params() > 10 * trained  # a teacher inside would be plain
    assert backup < 3 * 4 * trained + 200_000, (backup, trained)
    # The backup restores into a fresh distiller on the same teacher.
    d2 = distiller(teacher, keras.models.clone_model(student), layers=[("stage2", "stage2")],
                   optimizer=keras.optimizers.Adam(1e-3))
    d2.load_weights(tmp_path / "backup" / "latest.weights.h5")
    for a, b in zip(d.student.weights, d2.student.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
