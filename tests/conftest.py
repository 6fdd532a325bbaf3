"""Test set-up: quiet TensorFlow, two logical CPU devices, shared trained models.

The CPU is split into two logical devices before TensorFlow starts, so that
MirroredStrategy tests run on this machine; everything else uses CPU:0 as usual.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import ardir_tf  # noqa: E402

# The digits threat model used by the tests and quoted in the README.
DIGITS_EPS = 0.15
DIGITS_ATTACK = dict(eps=DIGITS_EPS, step_size=DIGITS_EPS / 4, steps=10)
EPOCHS = 15


@pytest.fixture(scope="session")
def digits():
    return ardir_tf.data.digits(seed=0)


@pytest.fixture(scope="session")
def digits_ds(digits):
    (x_train, y_train), (x_test, y_test) = digits
    return (ardir_tf.data.pipeline(x_train, y_train, 64, shuffle=True),
            ardir_tf.data.pipeline(x_test, y_test, 256))


@pytest.fixture(scope="session")
def trained(digits_ds):
    """Natural, PGD-AT teacher and ARDIR student on digits, same epoch budget."""
    train_ds, _ = digits_ds
    attack = ardir_tf.attacks.PGD(**DIGITS_ATTACK)

    keras.utils.set_random_seed(0)
    natural = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=16)
    natural.compile(optimizer=keras.optimizers.Adam(3e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    natural.fit(train_ds, epochs=EPOCHS, verbose=0)

    teacher = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=32)
    trainer = ardir_tf.AdversarialTrainer(teacher, attack=attack)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
    trainer.fit(train_ds, epochs=EPOCHS, verbose=0)

    student = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=16)
    distiller = ardir_tf.ARDIRDistiller(teacher=teacher, student=student,
                                        layers=[("stage2", "stage2")], attack=attack)
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
    distiller.fit(train_ds, epochs=EPOCHS, verbose=0)
    return dict(natural=natural, teacher=teacher, student=student, attack=attack)


def tiny_pair(teacher_width=8, student_width=4, **build):
    """A small teacher and student on 8x8x1 inputs."""
    teacher = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=teacher_width, **build)
    student = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=student_width, **build)
    return teacher, student


def batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 8, 8, 1), dtype=np.float32),
            rng.integers(0, 10, n).astype(np.int32))


def write_npz(path, n_train=20, n_test=8, size=6, classes=4, **overrides):
    """A user's .npz data set (uint8 images, integer labels); a key set to None
    is left out. Returns the --dataset name, "npz:PATH"."""
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
                  y_train=np.arange(n_train) % classes,
                  x_test=rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
                  y_test=np.arange(n_test) % classes)
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return f"npz:{path}"
