"""End to end on digits: robust training and ARDIR distillation buy real robustness."""

import numpy as np

from ardir_tf import attacks
from conftest import DIGITS_ATTACK


def pgd_accuracy(model, x, y):
    fn = lambda z: model(z, training=False)  # noqa: E731
    x_adv = attacks.pgd(fn, x, y, **DIGITS_ATTACK)
    return float(np.mean(np.argmax(fn(x_adv), -1) == y))


def clean_accuracy(model, x, y):
    return float(np.mean(np.argmax(model(x, training=False), -1) == y))


def test_teacher_and_student_beat_a_natural_model_under_pgd(trained, digits):
    _, (x_test, y_test) = digits
    acc = {name: (clean_accuracy(trained[name], x_test, y_test),
                  pgd_accuracy(trained[name], x_test, y_test))
           for name in ("natural", "teacher", "student")}
    print(acc)
    assert acc["natural"][0] > 0.95  # a good model ...
    assert acc["natural"][1] < 0.30  # ... that the attack breaks
    for name in ("teacher", "student"):
        assert acc[name][0] > 0.9, (name, acc)
        assert acc[name][1] > acc["natural"][1] + 0.4, (name, acc)
