import numpy as np
import pytest
import tensorflow as tf
from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

from ardir_tf import attacks, models
from conftest import DIGITS_ATTACK, batch


@pytest.fixture(scope="module")
def tiny():
    model = models.build("small_cnn", (8, 8, 1), 10, width=4)
    return lambda z: model(z, training=False)


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model(x, training=False), -1) == y))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_result_stays_in_the_ball_and_the_clip_range(tiny, norm, eps, loss):
    x, y = batch(16)
    x_adv = attacks.pgd(tiny, x, y, eps=eps, step_size=eps / 2, steps=5, norm=norm, loss=loss)
    delta = (x_adv - x).numpy().reshape(16, -1)
    if norm == "linf":
        assert np.abs(delta).max() <= eps + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-5
    assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0
    assert np.abs(delta).max() > 0  # it moved


def test_l2_attack_reaches_the_sphere(tiny):
    # Big steps from x: each step lands outside the ball and is projected back.
    x, y = batch(8)
    x_adv = attacks.pgd(tiny, x, y, eps=0.5, step_size=1.0, steps=3, norm="l2",
                        random_start=False, clip=None)
    norms = np.linalg.norm((x_adv - x).numpy().reshape(8, -1), axis=1)
    np.testing.assert_allclose(norms, 0.5, rtol=1e-4)


def test_eps_zero_returns_x(tiny):
    x, y = batch(4)
    np.testing.assert_array_equal(attacks.pgd(tiny, x, y, eps=0, step_size=0.1, steps=3), x)
    np.testing.assert_array_equal(attacks.fgsm(tiny, x, y, eps=0.0), x)


def test_eager_and_tf_function_agree(tiny):
    x, y = batch(8)
    kw = dict(eps=0.1, step_size=0.02, steps=4, random_start=False)
    eager = attacks.pgd(tiny, x, y, **kw)
    graph = tf.function(lambda a, b: attacks.pgd(tiny, a, b, **kw))(x, y)
    np.testing.assert_allclose(eager, graph, atol=1e-6)


def _graph_size(model_fn, steps):
    fn = tf.function(lambda a, b: attacks.pgd(model_fn, a, b, eps=0.1, step_size=0.01,
                                              steps=steps))
    graph = fn.get_concrete_function(tf.TensorSpec([None, 8, 8, 1]),
                                     tf.TensorSpec([None], tf.int32)).graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


def test_step_loop_is_one_compiled_loop(tiny):
    # The traced graph (what XLA or grappler compiles) is the same size for 10
    # and 50 steps: the loop is a while op, not 50 copies of the step.
    size10, size50 = _graph_size(tiny, 10), _graph_size(tiny, 50)
    assert size10 == size50
    assert size10 < 2 * _graph_size(tiny, 1) + 50


def test_targeted_attack_moves_predictions_to_the_target(trained):
    model = trained["natural"]
    x, _ = batch(64, seed=5)
    target = np.full(64, 3, np.int32)
    fn = lambda z: model(z, training=False)  # noqa: E731
    x_adv = attacks.pgd(fn, x, target, targets=target, eps=0.3, step_size=0.05, steps=20)
    before = np.mean(np.argmax(fn(x), -1) == 3)
    after = np.mean(np.argmax(fn(x_adv), -1) == 3)
    assert after > max(0.8, before + 0.3)


def test_kl_loss_pushes_away_from_the_reference(trained):
    model = trained["natural"]
    fn = lambda z: model(z, training=False)  # noqa: E731
    x, y = batch(32, seed=6)
    p = tf.nn.softmax(fn(x))
    x_adv = attacks.pgd(fn, x, y, eps=0.2, step_size=0.05, steps=10, loss="kl", targets=p)
    kl_adv = attacks.attack_objective("kl", fn(x_adv), y, p)
    assert float(tf.reduce_mean(kl_adv)) > 1.0
    with pytest.raises(ValueError, match="loss='kl' needs targets"):
        attacks.pgd(fn, x, y, eps=0.2, step_size=0.05, steps=1, loss="kl")


def test_pgd_is_stronger_than_fgsm_and_not_weaker_than_cleverhans(trained, digits):
    _, (x_test, y_test) = digits
    x, y = x_test, y_test
    eps, step, steps = DIGITS_ATTACK["eps"], DIGITS_ATTACK["step_size"], DIGITS_ATTACK["steps"]
    for name in ("teacher", "student"):
        model = trained[name]
        fn = lambda z: model(z, training=False)  # noqa: E731
        tf.random.set_seed(0)
        ours = accuracy(model, attacks.pgd(fn, x, y, eps=eps, step_size=step, steps=steps), y)
        theirs = accuracy(model, projected_gradient_descent(
            fn, x, eps, step, steps, np.inf, clip_min=0.0, clip_max=1.0, y=y,
            rand_init=True, sanity_checks=False), y)
        ours_fgsm = accuracy(model, attacks.fgsm(fn, x, y, eps=eps), y)
        theirs_fgsm = accuracy(model, fast_gradient_method(
            fn, x, eps, np.inf, clip_min=0.0, clip_max=1.0, y=y, sanity_checks=False), y)
        # A robust model keeps between 10% and 90%: the comparison is not vacuous.
        assert 0.1 < theirs < 0.9, (name, theirs)
        assert ours <= theirs + 0.01, (name, ours, theirs)
        assert abs(ours_fgsm - theirs_fgsm) <= 0.01, (name, ours_fgsm, theirs_fgsm)
        assert ours <= ours_fgsm + 0.005, (name, ours, ours_fgsm)


@pytest.mark.parametrize("kwargs,message", [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(step_size=0.0), "step_size must be > 0"),
    (dict(norm="l1"), "unknown norm 'l1'"),
    (dict(loss="hinge"), "unknown attack loss 'hinge'"),
    (dict(clip=(1.0, 0.0)), "clip must be"),
])
def test_bad_arguments_raise_value_errors(tiny, kwargs, message):
    args = dict(eps=0.1, step_size=0.01, steps=3)
    args.update(kwargs)
    x, y = batch(2)
    with pytest.raises(ValueError, match=message):
        attacks.pgd(tiny, x, y, **args)
    with pytest.raises(ValueError, match=message):
        attacks.PGD(**args)


def test_numpy_scalars_are_accepted(tiny):
    x, y = batch(2)
    x_adv = attacks.pgd(tiny, x, y, eps=np.float32(0.1), step_size=np.float64(0.05),
                        steps=np.int64(2))
    assert np.abs(x_adv - x).max() <= 0.1 + 1e-6


def test_pgd_config_calls_pgd_and_replace_validates(tiny):
    attack = attacks.PGD(eps=0.1, step_size=0.02, steps=3, random_start=False)
    x, y = batch(4)
    np.testing.assert_allclose(
        attack(tiny, x, y),
        attacks.pgd(tiny, x, y, eps=0.1, step_size=0.02, steps=3, random_start=False))
    with pytest.raises(ValueError, match="steps"):
        attack.replace(steps=-1)
    with pytest.raises(Exception):
        attack.eps = 0.5  # frozen


def test_apgd_checkpoints_are_the_papers():
    # Croce & Hein 2020: p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99.
    assert attacks._apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_loss_golden_values():
    z = tf.constant([[4.0, 1.0, 3.0, 0.0]])
    # Untargeted, y = 0: -(4 - 3) / (4 - 1).
    assert float(attacks.attack_objective("dlr", z, [0])[0]) == pytest.approx(-1 / 3)
    # Targeted to t = 2, y = 0: -(4 - 3) / (4 - (1 + 0) / 2).
    assert float(attacks.attack_objective("dlr", z, [0], targets=[2])[0]) == pytest.approx(-1 / 3.5)
    # Scale-invariant: the same for 10x the logits.
    assert float(attacks.attack_objective("dlr", 10 * z, [0])[0]) == pytest.approx(-1 / 3)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_apgd_stays_in_the_ball_and_the_clip_range(tiny, norm, eps):
    x, y = batch(16)
    for x_adv in (attacks.apgd(tiny, x, y, eps=eps, steps=8, norm=norm),
                  attacks.apgd(tiny, x, y, eps=eps, steps=8, norm=norm, loss="dlr"),
                  attacks.apgd_targeted(tiny, x, y, eps=eps, steps=5, norm=norm, n_targets=2)):
        delta = (x_adv - x).numpy().reshape(16, -1)
        size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert size.max() <= eps + 1e-5
        assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0


def test_apgd_is_one_compiled_loop(tiny):
    def size(steps):
        fn = tf.function(lambda a, b: attacks.apgd(tiny, a, b, eps=0.1, steps=steps))
        g = fn.get_concrete_function(tf.TensorSpec([None, 8, 8, 1]),
                                     tf.TensorSpec([None], tf.int32)).graph.as_graph_def()
        return len(g.node) + sum(len(f.node_def) for f in g.library.function)

    assert size(20) == size(100)


def test_apgd_ce_is_at_least_as_strong_as_pgd_20(trained, digits):
    _, (x, y) = digits
    for name, eps in (("natural", 0.05), ("student", 0.15)):
        model = trained[name]
        fn = lambda z: model(z, training=False)  # noqa: E731
        tf.random.set_seed(0)
        pgd20 = accuracy(model, attacks.pgd(fn, x, y, eps=eps, step_size=eps / 4, steps=20), y)
        apgd20 = accuracy(model, attacks.apgd(fn, x, y, eps=eps, steps=20), y)
        assert 0.3 < pgd20 < 0.95, (name, pgd20)  # not a vacuous comparison
        assert apgd20 <= pgd20 + 0.005, (name, apgd20, pgd20)


def test_apgd_bad_arguments(tiny):
    x, y = batch(2)
    np.testing.assert_array_equal(attacks.apgd(tiny, x, y, eps=0.0, steps=5), x)
    with pytest.raises(ValueError, match="apgd takes loss 'ce' or 'dlr'"):
        attacks.apgd(tiny, x, y, eps=0.1, steps=5, loss="cw")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.apgd(tiny, x, y, eps=-1.0)
    with pytest.raises(ValueError, match="n_targets must be an integer >= 1"):
        attacks.apgd_targeted(tiny, x, y, eps=0.1, n_targets=0)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        attacks.apgd(tiny, x, y, eps=0.1, restarts=0)


# --- restarts, per-example radii, Square -------------------------------------

def test_first_success_keeps_the_first_run_that_fooled_each_example():
    # model_fn is the identity: the "pixels" are the logits; every label is 0.
    identity = lambda z: z  # noqa: E731
    y = tf.constant([0, 0, 0])
    run1 = tf.constant([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # fools example 2
    run2 = tf.constant([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0]])  # fools example 0
    out = attacks._first_success(identity, y, [lambda: run1, lambda: run2]).numpy()
    np.testing.assert_array_equal(out, [[0.0, 1.0], [2.0, 0.0], [0.0, 1.0]])


def test_restarts_break_more_and_stay_in_the_ball(trained, digits):
    _, (x, y) = digits
    model = trained["student"]
    fn = lambda z: model(z, training=False)  # noqa: E731
    # One step from a random start: a weak attack, whose outcome depends on the
    # start, so that further starts must break examples the first one missed.
    # Seeded, so it does not depend on what ran before on this worker; measured
    # over seeds 0-5 on the committed student: 3 restarts lower accuracy by
    # 0.019-0.042 (7-15 of 360 examples), against the 0.01 asked for here.
    tf.random.set_seed(0)
    one = attacks.pgd(fn, x, y, eps=0.15, step_size=0.15, steps=1)
    three = attacks.pgd(fn, x, y, eps=0.15, step_size=0.15, steps=1, restarts=3)
    assert accuracy(model, three, y) < accuracy(model, one, y) - 0.01
    assert np.abs(three - x).max() <= 0.15 + 1e-6
    with pytest.raises(ValueError, match="restarts > 1 needs random_start"):
        attacks.pgd(fn, x, y, eps=0.1, step_size=0.1, steps=1, random_start=False, restarts=2)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_per_example_keeps_each_example_in_its_own_ball(tiny, norm):
    x, y = batch(6)
    eps = np.array([0.0, 0.05, 0.1, 0.2, 0.5, 1.0], np.float32)
    x_adv = attacks.pgd_per_example(tiny, x, y, eps=eps, step_size=eps / 2, steps=4, norm=norm)
    delta = (x_adv - x).numpy().reshape(6, -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert np.all(size <= eps + 1e-5), (size, eps)
    assert size[0] == 0 and size[-1] > 0.1
    assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0


def test_square_schedule_and_l2_pattern_are_the_papers():
    assert attacks._square_p(0.8, 5, 10000) == 0.8
    assert attacks._square_p(0.8, 30, 10000) == 0.4
    assert attacks._square_p(0.8, 2500, 5000) == 0.8 / 128  # 5000 of 10,000: (4000, 6000]
    assert attacks._square_p(0.8, 9999, 10000) == 0.8 / 512
    for s in (1, 3, 5, 8):
        p = attacks._square_l2_pattern(s)
        assert p.shape == (s, s) and np.sum(p ** 2) == pytest.approx(1.0)
    p = attacks._square_l2_pattern(5)
    assert p[:2].sum() > 0 and p[2:].sum() < 0  # two bumps of opposite sign


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_square_stays_in_the_ball_and_lowers_the_margin(tiny, norm, eps):
    x, y = batch(16)
    # Labels the model gets right on half the inputs, wrong on the other half.
    pred = np.argmax(tiny(x), -1)
    y = np.where(np.arange(16) < 8, pred, (pred + 1) % 10)
    x_adv = attacks.square(tiny, x, y, eps=eps, queries=50, norm=norm)
    delta = (x_adv - x).numpy().reshape(16, -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps + 1e-5 and size.max() > 0
    assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0

    def margin(z):
        logits = tiny(z).numpy()
        true = logits[np.arange(16), y]
        logits[np.arange(16), y] = -np.inf
        return true - logits.max(1)
    right = margin(x) > 0
    assert right.sum() == 8
    # Accepted queries only ever lower the margin of a correctly classified input.
    assert np.all(margin(x_adv)[right] <= margin(x)[right] + 1e-6)
    # A misclassified input comes back unchanged.
    np.testing.assert_array_equal(x_adv.numpy()[~right], x[~right])


def test_square_queries_only_the_points_still_standing(tiny):
    """A point already fooled (here: the 8 of 16 misclassified from the start)
    is never sent to the model again: 2 x 16 examples for the clean and the
    starting margins, then at most 8 a query (16 without the pruning)."""
    x, y = batch(16)
    pred = np.argmax(tiny(x), -1)
    y = np.where(np.arange(16) < 8, pred, (pred + 1) % 10)
    seen = tf.Variable(0)

    def counted(z):
        seen.assign_add(tf.shape(z)[0])
        return tiny(z)

    attacks.square(tf.function(counted), x, y, eps=0.1, queries=50)
    # At least one query; at most 8 a query. (Not 49 at least: on this untrained
    # model the search may fool all 8 before its last query, and then it stops
    # asking, which is the point.)
    assert 32 < int(seen.numpy()) <= 32 + 49 * 8


def test_square_breaks_a_natural_model_without_gradients(trained, digits):
    _, (x, y) = digits
    x, y = x[:100], y[:100]
    model = trained["natural"]
    tf.random.set_seed(0)
    x_adv = attacks.square(lambda z: model(z, training=False), x, y, eps=0.15, queries=300)
    assert accuracy(model, x, y) > 0.95
    assert accuracy(model, x_adv, y) < 0.3


def test_square_rejects_flat_inputs_and_bad_p_init(tiny):
    x, y = batch(2)
    with pytest.raises(ValueError, match="square needs images"):
        attacks.square(lambda z: tiny(tf.reshape(z, [-1, 8, 8, 1])), x.reshape(2, 64), y,
                       eps=0.1, queries=5)
    with pytest.raises(ValueError, match="p_init must be in"):
        attacks.square(tiny, x, y, eps=0.1, queries=5, p_init=0.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_is_one_compiled_loop(tiny, norm):
    def size(queries):
        fn = tf.function(lambda a, b: attacks.square(tiny, a, b, eps=0.1, queries=queries,
                                                     norm=norm))
        g = fn.get_concrete_function(tf.TensorSpec([None, 8, 8, 1]),
                                     tf.TensorSpec([None], tf.int32)).graph.as_graph_def()
        return len(g.node) + sum(len(f.node_def) for f in g.library.function)

    assert size(100) == size(5000)


@pytest.mark.parametrize("targets_per_run", [1, 2, 4, None])
def test_apgd_targeted_routes_each_target_to_its_example(monkeypatch, targets_per_run):
    """However the attempts are grouped into tiled runs, example i is attacked
    towards its own j-th ranked class, and the first attempt that fools the
    model wins. A stand-in APGD "reaches" only even target classes, writing the
    target into pixel 0; the model reads it back as its prediction."""
    n = 6
    rank_base = tf.constant(np.arange(n) * 3 % 10, tf.float32)  # example i's top class

    def model_fn(z):
        moved = tf.cast(tf.round(z[:, 0, 0, 0] * 100), tf.int32) - 1
        base = tf.cast(tf.round(z[:, 0, 0, 1] * 10), tf.int32)
        ranked = -tf.cast(tf.math.floormod(tf.range(10)[None] - base[:, None], 10), tf.float32)
        return tf.where((moved >= 0)[:, None], tf.one_hot(tf.maximum(moved, 0), 10), ranked)

    calls = []

    def fake_apgd(fn, x, y, *, targets, **settings):
        calls.append(int(x.shape[0]) // n)
        reach = tf.equal(targets % 2, 0)
        marked = tf.concat([tf.cast(targets + 1, tf.float32)[:, None] / 100, x[:, 0, 0, 1:]], -1)
        return tf.where(reach[:, None, None, None], tf.reshape(marked, x.shape), x)

    monkeypatch.setattr(attacks, "apgd", fake_apgd)
    x = tf.stack([tf.zeros(n), rank_base / 10], -1)[:, None, None, :]
    y = tf.cast(rank_base, tf.int32)
    x_adv = attacks.apgd_targeted(model_fn, x, y, eps=1.0, n_targets=4,
                                  targets_per_run=targets_per_run)
    # Example i's j-th target is (top + 1 + j) mod 10: the first even one wins.
    top = np.arange(n) * 3 % 10
    expected = [next(t for t in ((b + 1 + j) % 10 for j in range(4)) if t % 2 == 0)
                for b in top]
    np.testing.assert_array_equal(tf.argmax(model_fn(x_adv), -1).numpy(), expected)
    per_run = 4 if targets_per_run is None else targets_per_run
    assert calls == [min(per_run, 4 - i) for i in range(0, 4, per_run)]


def test_evaluate_runs_apgd_t_targets_together_within_the_memory_budget():
    from ardir_tf import evaluate
    small = models.build("small_cnn", (8, 8, 1), 10, width=16)
    large = models.build("resnet18", (32, 32, 3), 10)
    apgd_t = evaluate.standard(0.1)["apgd_t"]

    def per_run(model, batch):
        return evaluate._batch_targets(apgd_t, model, batch).run.keywords["targets_per_run"]

    # small_cnn(16): 38.6 kB of activations an example; ResNet-18 8.2 MB.
    assert per_run(small, 256) == 9
    assert per_run(large, 256) == 1
    assert per_run(large, 64) == 2  # 1 GiB holds 2 x 64; groups of 2
    assert evaluate._batch_targets(apgd_t, lambda z: z, 256).run.keywords[
        "targets_per_run"] == 1  # size unknown: one target at a time
    # The report records the grouping; bad n_targets are left for the attack to refuse.
    assert evaluate._batch_targets(apgd_t, large, 64).settings["targets_per_run"] == 2
    bad = evaluate.standard(0.1, n_targets=0)["apgd_t"]
    assert evaluate._batch_targets(bad, small, 256) is bad
    with pytest.raises(ValueError, match="targets_per_run must be an integer >= 1"):
        attacks.apgd_targeted(lambda z: tf.zeros([2, 10]), tf.zeros([2, 8, 8, 1]),
                              tf.zeros([2], tf.int32), eps=0.1, targets_per_run=0)


# --- FAB and FAB-T ------------------------------------------------------------

def linear_classifier(seed=0, n=24, d=64, k=10):
    """logits = W x + b on [n, 8, 8, 1] inputs, and each example's exact least
    distance to another class: min_j |f_y - f_j| / ||w_j - w_y||_q (q the dual
    norm), which holds while the nearest point of that boundary lies inside the
    box (checked)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, k)).astype(np.float32) * 0.3
    b = rng.normal(size=k).astype(np.float32) * 0.1
    x = rng.uniform(0.35, 0.65, size=(n, 8, 8, 1)).astype(np.float32)
    model = lambda z: tf.reshape(z, [-1, d]) @ w + b  # noqa: E731
    logits = model(x).numpy()
    y = logits.argmax(1)
    exact = {}
    for norm, q in (("linf", 1), ("l2", 2)):
        dw = w.T[None, :, :] - w.T[y][:, None, :]  # grad of f_j - f_y: [n, k, d]
        gap = logits[np.arange(n), y][:, None] - logits
        size = np.linalg.norm(dw, ord=q, axis=2)
        dist = np.where(np.arange(k)[None] == y[:, None], np.inf,
                        gap / np.where(size > 0, size, 1))
        j = dist.argmin(1)
        exact[norm] = dist[np.arange(n), j]
        g = dw[np.arange(n), j]
        step = np.sign(g) * exact[norm][:, None] if norm == "linf" else \
            g * (exact[norm] / np.linalg.norm(g, axis=1))[:, None]
        nearest = x.reshape(n, d) + step
        assert nearest.min() >= 0 and nearest.max() <= 1  # the closed form holds
    return model, x, y, exact


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack", ["fab", "fab_targeted"])
def test_fab_finds_the_nearest_boundary_of_a_linear_classifier(norm, attack):
    model, x, y, exact = linear_classifier()
    x_adv, norms = getattr(attacks, attack)(model, x, y, eps=10.0, norm=norm, steps=100,
                                            return_norms=True)
    ratio = norms.numpy() / exact[norm]
    assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 1.03, ratio  # the exact minimum
    measured = np.abs((x_adv.numpy() - x).reshape(len(x), -1))
    measured = measured.max(1) if norm == "linf" else np.sqrt((measured ** 2).sum(1))
    np.testing.assert_allclose(measured, norms.numpy(), rtol=1e-4)
    assert np.all(model(x_adv).numpy().argmax(1) != y)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_restarts_and_target_groups_keep_the_least_norm(norm):
    model, x, y, exact = linear_classifier(seed=2)
    eps = float(exact[norm].max()) * 1.1  # every point within reach
    tf.random.set_seed(0)
    for attack, kwargs in ((attacks.fab, dict(restarts=2)),
                           (attacks.fab_targeted, dict(restarts=2, targets_per_run=4))):
        x_adv, norms = attack(model, x, y, eps=eps, norm=norm, steps=60, return_norms=True,
                              **kwargs)
        ratio = norms.numpy() / exact[norm]
        assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 1.03, ratio
        delta = (x_adv.numpy() - x).reshape(len(x), -1)
        size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
        assert size.max() <= eps * (1 + 1e-5) and np.all(model(x_adv).numpy().argmax(1) != y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_breaks_only_what_it_can_within_eps_and_never_reports_a_correct_point(norm):
    model, x, y, exact = linear_classifier(seed=1)
    eps = float(np.median(exact[norm]))  # half the points are out of reach
    for attack in (attacks.fab, attacks.fab_targeted):
        x_adv = attack(model, x, y, eps=eps, norm=norm, steps=50).numpy()
        changed = np.any(x_adv != x, axis=(1, 2, 3))
        wrong = model(x_adv).numpy().argmax(1) != y
        assert np.array_equal(changed, wrong)  # a changed point is a broken one
        assert not np.any(changed[exact[norm] > eps])  # nothing below the true minimum
        assert np.all(changed[exact[norm] * 1.03 < eps])  # and all within reach


def test_box_projection_is_the_least_displacement_onto_the_hyperplane():
    from scipy.optimize import linprog
    rng = np.random.default_rng(0)
    n, d = 14, 10
    t = rng.uniform(0, 1, (n, d)).astype(np.float32)
    t[::3, 1], t[1::3, 2] = 0.0, 1.0  # coordinates with no room one way
    w = rng.normal(size=(n, d)).astype(np.float32)
    w[:, 0] = 0.0  # a coordinate the hyperplane does not depend on
    w[-1] = 0.0  # a hyperplane that does not depend on x at all (w . z = w . t)
    # Targets from near (box inactive) to far (box active) to unreachable, on
    # both sides of t (c = w . t - b of either sign), and t already on it.
    side = np.where(np.arange(n) % 2, 1.0, -1.0)
    reach = {s: np.where(s * w > 0, t, 1 - t) * np.abs(w) for s in (1.0, -1.0)}
    fall = np.linspace(0.02, 1.3, n) * np.where(side > 0, reach[1.0].sum(1),
                                                reach[-1.0].sum(1))
    fall[-2] = 0.0
    b = ((w * t).sum(1) - side * fall).astype(np.float32)
    for norm in ("linf", "l2"):
        delta = attacks.box_projection(tf.constant(t), tf.constant(w), tf.constant(b),
                                       norm).numpy()
        z = t + delta
        assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6 and np.all(delta[:, 0] == 0)
        np.testing.assert_array_equal(delta[-2:], 0)  # already on it
        for i in range(n - 2):
            toward = side[i] * w[i]  # the direction that lowers side * (w . z)
            room = np.where(toward > 0, t[i], 1 - t[i])
            corner = -np.sign(toward) * room
            if fall[i] > reach[side[i]][i].sum():  # unreachable: the nearest corner
                np.testing.assert_allclose(delta[i], corner, atol=1e-6)
                continue
            assert abs(w[i] @ z[i] - b[i]) < 1e-4 * (1 + abs(b[i]))
            if norm == "linf":  # min s: |delta_j| <= s, w.delta = b - w.t, box
                cost = np.r_[np.zeros(d), 1.0]
                a_ub = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
                best = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * d),
                               A_eq=np.r_[w[i], 0.0][None], b_eq=[b[i] - w[i] @ t[i]],
                               bounds=[(-t[i, j], 1 - t[i, j]) for j in range(d)] +
                               [(0, None)]).fun
                assert np.abs(delta[i]).max() <= best * (1 + 1e-4) + 1e-6
            else:  # the KKT point: |delta_j| = min(mu |w_j|, room_j), found by bisection
                lo, hi = 0.0, 1e6
                for _ in range(200):
                    mu = (lo + hi) / 2
                    lo, hi = (mu, hi) if (np.abs(w[i]) * np.minimum(mu * np.abs(w[i]), room)
                                          ).sum() < fall[i] else (lo, mu)
                want = -np.sign(toward) * np.minimum(lo * np.abs(w[i]), room)
                np.testing.assert_allclose(delta[i], want, atol=1e-4)
        # Another box is the same problem scaled: [-1, 2] is [0, 1] times 3, minus 1.
        scaled = attacks.box_projection(tf.constant(3 * t - 1), tf.constant(w),
                                        tf.constant(3 * b - w.sum(1)), norm, -1.0, 2.0)
        np.testing.assert_allclose(scaled.numpy(), 3 * delta, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.4)])
def test_fab_t_breaks_as_many_natural_digits_as_pgd_20_and_stays_in_the_ball(
        trained, digits, norm, eps):
    _, (x, y) = digits
    x, y = x[:180], y[:180]  # half the test digits: 9 x 100 FAB steps each
    model = trained["natural"]
    fn = lambda z: model(z, training=False)  # noqa: E731
    tf.random.set_seed(0)
    pgd20 = accuracy(model, attacks.pgd(fn, x, y, eps=eps, step_size=eps / 4, steps=20,
                                        norm=norm), y)
    compiled = tf.function(lambda a, b: attacks.fab_targeted(fn, a, b, eps=eps, norm=norm),
                           autograph=False)  # eagerly, the loop would run op by op
    x_adv = compiled(tf.constant(x), tf.constant(y))
    fab_t = accuracy(model, x_adv, y)
    assert 0.05 < pgd20 < 0.95, pgd20  # not a vacuous comparison
    assert fab_t <= pgd20, (fab_t, pgd20)
    delta = (x_adv.numpy() - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
    assert size.max() <= eps * (1 + 1e-5) and x_adv.numpy().min() >= 0
    assert x_adv.numpy().max() <= 1


@pytest.mark.parametrize("attack", ["fab", "fab_targeted"])
def test_fab_is_one_compiled_loop(tiny, attack):
    def size(steps):
        fn = tf.function(lambda a, b: getattr(attacks, attack)(tiny, a, b, eps=0.1,
                                                               steps=steps, n_targets=3)
                         if attack == "fab_targeted" else
                         attacks.fab(tiny, a, b, eps=0.1, steps=steps))
        g = fn.get_concrete_function(tf.TensorSpec([None, 8, 8, 1]),
                                     tf.TensorSpec([None], tf.int32)).graph.as_graph_def()
        return len(g.node) + sum(len(f.node_def) for f in g.library.function)

    assert size(10) == size(100)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=-1), "eps must be >= 0"),
    (dict(eps=0.1, clip=None), "fab needs a box"),
    (dict(eps=0.1, eta=0.5), "eta must be"),
    (dict(eps=0.1, beta=0.0), "beta must be"),
    (dict(eps=0.1, restarts=0), "restarts must be"),
    (dict(eps=0.1, alpha_max=None), "alpha_max must be"),
    (dict(eps=0.1, alpha_max=2.0), "alpha_max must be"),
    (dict(eps=0.1, norm="l1"), "unknown norm"),
])
def test_fab_bad_arguments(tiny, kwargs, message):
    x, y = batch(2)
    with pytest.raises(ValueError, match=message):
        attacks.fab(tiny, x, y, **kwargs)


def test_attacks_draw_from_the_generator_they_are_traced_with():
    """attacks.uniform/normal inside drawing_from(g) at trace time draw from g:
    resetting g repeats the draws (what evaluate does before each batch);
    traced outside it, they are TensorFlow's stateful ops, which g leaves alone."""
    g = tf.random.Generator.from_seed(3)
    with attacks.drawing_from(g):
        drawn = tf.function(lambda: tf.concat([attacks.uniform([4]), attacks.normal([4])], 0)
                            ).get_concrete_function()
    plain = tf.function(lambda: attacks.uniform([4])).get_concrete_function()
    g.reset_from_seed(7)
    first = drawn().numpy()
    g.reset_from_seed(7)
    np.testing.assert_array_equal(drawn().numpy(), first)
    g.reset_from_seed(8)
    assert not np.array_equal(drawn().numpy(), first)
    state = g.state.numpy()
    plain()
    np.testing.assert_array_equal(g.state.numpy(), state)


def test_fab_keeps_the_least_candidate_that_passes_the_final_check():
    """Of FAB's candidates (one a target or restart), the one of least norm is
    not adversarial once checked (here: a run reported a point that is not);
    the next one is. The result is that next one, not x."""
    from ardir_tf.attacks._fab import _fab_finish

    def model_fn(z):  # class 0 while z[0] > 0.5, else class 1
        return tf.stack([z[:, 0], tf.fill(tf.shape(z)[:1], 0.5)], axis=1)
    x, y = tf.constant([[0.7, 0.0]]), tf.constant([0])
    near, far = tf.constant([[0.55, 0.0]]), tf.constant([[0.4, 0.0]])
    candidates = [(near, tf.constant([0.15])), (far, tf.constant([0.3]))]
    x_adv, norms = _fab_finish(model_fn, x, y, candidates, 0.35, "linf", (0.0, 1.0), True)
    np.testing.assert_allclose(x_adv.numpy(), far.numpy())
    assert norms.numpy()[0] == pytest.approx(0.3)
    # Beyond eps, the least norm found is reported as it was (x is returned).
    x_adv, norms = _fab_finish(model_fn, x, y, candidates, 0.1, "linf", (0.0, 1.0), True)
    np.testing.assert_allclose(x_adv.numpy(), x.numpy())
    assert norms.numpy()[0] == pytest.approx(0.15)
    # No candidate passes within eps: x, and no norm to show.
    x_adv, norms = _fab_finish(model_fn, x, y, candidates[:1], 0.35, "linf", (0.0, 1.0), True)
    np.testing.assert_allclose(x_adv.numpy(), x.numpy())
    assert norms.numpy()[0] == np.inf


def test_pgd_per_example_keeps_the_first_iterate_that_broke_a_point():
    """A model whose CE gradient always pushes the pixel up, misclassifying it
    only in the band (0.45, 0.55): steps of 0.1 cross the band (from a start
    below it) and leave it. The last iterate, which `pgd` returns, is right
    again; pgd_per_example (the sanity checks' PGD) returns the iterate in the
    band, so more steps can never un-break a point."""
    def model_fn(z):
        band = tf.stop_gradient(tf.cast(tf.abs(z[:, 0] - 0.5) < 0.05, tf.float32))
        return tf.stack([5.0 - 5.0 * z[:, 0], 40.0 * band - 20.0, tf.zeros_like(z[:, 0])], 1)
    n = 64
    x, y = tf.fill([n, 1], 0.3), tf.zeros([n], tf.int64)
    tf.random.set_seed(0)
    kept = attacks.pgd_per_example(model_fn, x, y, eps=tf.fill([n], 0.7),
                                   step_size=tf.fill([n], 0.1), steps=20)
    last = attacks.pgd(model_fn, x, y, eps=0.7, step_size=0.1, steps=20)
    fooled = lambda z: np.argmax(model_fn(z).numpy(), 1) != 0  # noqa: E731
    assert not fooled(last).any()  # every trajectory ends at 1.0, classified right
    # Starts below 0.45 (u < 0.214 of uniform(-1, 1): about 60%) cross the band.
    assert 0.4 < fooled(kept).mean() < 0.8, fooled(kept).mean()
    assert np.abs(kept.numpy() - 0.3).max() <= 0.7 + 1e-6
