"""Golden values: hand-derived numbers, and numpy re-implementations written
from the formulas in docs/objective.md, at tight tolerance."""

import math

import numpy as np
import pytest
import tensorflow as tf

from ardir_tf import losses

RNG = np.random.default_rng(0)
Y = np.array([0, 3, 1, 2], np.int32)
T_LOGITS = RNG.normal(size=(4, 5)).astype(np.float32) * 3
S_CLEAN = RNG.normal(size=(4, 5)).astype(np.float32) * 2
S_ADV = RNG.normal(size=(4, 5)).astype(np.float32) * 2


def np_log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p_logits, q_logits, t=1.0):
    lp, lq = np_log_softmax(p_logits / t), np_log_softmax(q_logits / t)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_ce(y, z):
    return -np_log_softmax(z)[np.arange(len(y)), y]


def test_hand_derived_values():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2.
    kl = losses.kd_kl([[0.0, 0.0]], [[math.log(3.0), 0.0]], temperature=1.0)
    assert float(kl[0]) == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2), abs=1e-6)
    # CE of a uniform 4-way prediction is ln 4.
    assert float(losses.ce([2], [[1.0, 1.0, 1.0, 1.0]])[0]) == pytest.approx(math.log(4), abs=1e-6)
    u, v = np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])
    assert float(losses.ir_distance(u, v)[0]) == pytest.approx(0.8, abs=1e-6)  # |(0.6,0.8)-(1,0)|^2
    assert float(losses.ir_distance(u, v, "cosine")[0]) == pytest.approx(0.4, abs=1e-6)
    assert float(losses.ir_distance(u, v, "mse")[0]) == pytest.approx(10.0, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_kl_is_t_squared_kl_summed_over_classes(t):
    np.testing.assert_allclose(losses.kd_kl(T_LOGITS, S_ADV, t),
                               t * t * np_kl(T_LOGITS, S_ADV, t), rtol=1e-5)
    np.testing.assert_allclose(losses.kd_kl(T_LOGITS, T_LOGITS, t), 0.0, atol=1e-6)


def test_ir_distances_per_example_on_feature_maps():
    a = RNG.normal(size=(4, 3, 3, 2)).astype(np.float32)
    b = RNG.normal(size=(4, 3, 3, 2)).astype(np.float32)
    fa, fb = a.reshape(4, -1), b.reshape(4, -1)
    na = fa / np.linalg.norm(fa, axis=1, keepdims=True)
    nb = fb / np.linalg.norm(fb, axis=1, keepdims=True)
    np.testing.assert_allclose(losses.ir_distance(a, b), ((na - nb) ** 2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(losses.ir_distance(a, b, "mse"), ((fa - fb) ** 2).mean(1), rtol=1e-5)
    np.testing.assert_allclose(losses.ir_distance(a, b, "cosine"), 1 - (na * nb).sum(1), rtol=1e-5)
    # normalized_mse is scale-free: scaling the teacher's features changes nothing.
    np.testing.assert_allclose(losses.ir_distance(a, 7 * b), losses.ir_distance(a, b), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown distance 'l1'"):
        losses.ir_distance(a, b, "l1")


def test_method_losses_match_their_formulas():
    alpha, t, beta = 0.7, 3.0, 6.0
    def check(terms, expected):
        """Every term by name, and the loss as their sum."""
        assert set(terms) == set(expected) | {"loss"}
        for name, value in expected.items():
            np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(terms["loss"], sum(expected.values()), rtol=1e-5)

    check(losses.ard(Y, S_CLEAN, S_ADV, T_LOGITS, alpha, t),
          {"kd": alpha * t * t * np_kl(T_LOGITS, S_ADV, t),
           "ce": (1 - alpha) * np_ce(Y, S_CLEAN)})
    check(losses.rslad(S_CLEAN, S_ADV, T_LOGITS, 5 / 6),
          {"kd": 5 / 6 * np_kl(T_LOGITS, S_ADV), "kd_clean": 1 / 6 * np_kl(T_LOGITS, S_CLEAN)})
    check(losses.trades(Y, S_CLEAN, S_ADV, beta),
          {"ce": np_ce(Y, S_CLEAN), "kl_adv": beta * np_kl(S_CLEAN, S_ADV)})
    check(losses.pgd_at(Y, S_ADV), {"ce_adv": np_ce(Y, S_ADV)})
    check(losses.natural(Y, S_CLEAN), {"ce": np_ce(Y, S_CLEAN)})


def test_ardir_is_ard_plus_mean_ir_over_pairs():
    feats_s = [RNG.normal(size=(4, 6)).astype(np.float32) for _ in range(2)]
    feats_t = [RNG.normal(size=(4, 6)).astype(np.float32) for _ in range(2)]
    ard = losses.ard(Y, S_CLEAN, S_ADV, T_LOGITS, 0.9, 2.0)["loss"]
    ardir = losses.ardir(Y, S_CLEAN, S_ADV, T_LOGITS, feats_s, feats_t, 0.9, 2.0, ir_weight=2.5)
    ir = np.mean([losses.ir_distance(s, t).numpy() for s, t in zip(feats_s, feats_t)], axis=0)
    np.testing.assert_allclose(ardir["loss"], ard + 2.5 * ir, rtol=1e-5)
    np.testing.assert_allclose(ardir["ir"], 2.5 * ir, rtol=1e-5)
    assert np.all(ardir["ir"].numpy() > 0)
    # With ir_weight = 0, ARDIR is ARD exactly (bit for bit).
    zero = losses.ardir(Y, S_CLEAN, S_ADV, T_LOGITS, feats_s, feats_t, 0.9, 2.0, ir_weight=0.0)
    np.testing.assert_array_equal(zero["loss"].numpy(), ard.numpy())


def test_ardir_ir_inputs_average_their_matches():
    """teacher_input clean / adv / both and the student's clean side: the IR
    term is the mean of the distances of the matches docs/objective.md lists."""
    s_adv, s_clean, t_clean, t_adv = ([RNG.normal(size=(4, 6)).astype(np.float32)]
                                      for _ in range(4))
    def d(s, t):
        return losses.ir_distance(s[0], t[0]).numpy()
    def ir(**kw):
        return losses.ardir(Y, S_CLEAN, S_ADV, T_LOGITS, s_adv, t_clean, 0.9, 1.0,
                            ir_weight=2.0, **kw)["ir"].numpy()
    np.testing.assert_allclose(ir(), 2 * d(s_adv, t_clean), rtol=1e-6)
    np.testing.assert_allclose(ir(teacher_input="adv", teacher_features_adv=t_adv),
                               2 * d(s_adv, t_adv), rtol=1e-6)
    np.testing.assert_allclose(ir(teacher_input="both", teacher_features_adv=t_adv),
                               d(s_adv, t_clean) + d(s_adv, t_adv), rtol=1e-6)
    np.testing.assert_allclose(ir(student_features_clean=s_clean),
                               d(s_adv, t_clean) + d(s_clean, t_clean), rtol=1e-6)
    np.testing.assert_allclose(
        ir(teacher_input="both", teacher_features_adv=t_adv, student_features_clean=s_clean),
        2 / 3 * (d(s_adv, t_clean) + d(s_adv, t_adv) + d(s_clean, t_clean)), rtol=1e-6)
    with pytest.raises(ValueError, match="needs teacher_features_adv"):
        ir(teacher_input="adv")
    with pytest.raises(ValueError, match="unknown teacher_input 'noisy'"):
        ir(teacher_input="noisy")


def test_normalized_mse_is_exactly_twice_cosine():
    a, b = RNG.normal(size=(5, 3, 3, 4)), RNG.normal(size=(5, 3, 3, 4))
    np.testing.assert_allclose(losses.ir_distance(a, b, "normalized_mse"),
                               2 * losses.ir_distance(a, b, "cosine"), rtol=1e-5)


def test_ard_with_alpha_one_needs_no_clean_logits():
    out = losses.ard(Y, None, S_ADV, T_LOGITS, alpha=1.0, temperature=1.0)
    assert set(out) == {"kd", "loss"}
    np.testing.assert_allclose(out["kd"], np_kl(T_LOGITS, S_ADV), rtol=1e-5)
    np.testing.assert_allclose(out["loss"], out["kd"], rtol=0)


def test_losses_are_the_same_inside_tf_function():
    f = tf.function(lambda: losses.ardir(Y, S_CLEAN, S_ADV, T_LOGITS, [S_ADV], [T_LOGITS])["loss"])
    eager = losses.ardir(Y, S_CLEAN, S_ADV, T_LOGITS, [S_ADV], [T_LOGITS])["loss"]
    np.testing.assert_allclose(f(), eager, rtol=1e-6)
