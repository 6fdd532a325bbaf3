"""The Keras work-arounds, gathered in ardir_tf.keras_compat, and importing the
library leaving the process as it was."""

import os
import subprocess
import sys

import keras
import pytest

from ardir_tf import keras_compat
from conftest import ROOT


def test_the_installed_keras_is_one_the_work_arounds_were_checked_on():
    message = keras_compat.check_version()
    assert message is None, message
    # What a user on an unchecked version is told.
    told = keras_compat.check_version("3.16.0")
    assert "checked on Keras 3.15" in told and "3.16.0 is installed" in told
    assert "re-check" in told and "CHECKED_VERSIONS" in told


def test_the_private_keras_methods_they_override_still_exist():
    # Trainer._maybe_symbolic_build (overridden) and Trainer._symbolic_build
    # (called): renamed upstream, the override would silently stop applying.
    assert hasattr(keras.Model, "_maybe_symbolic_build")
    assert hasattr(keras.Model, "_symbolic_build")
    assert hasattr(keras.layers.Layer, "_flatten_layers")
    assert keras_compat.FitBuildMixin._maybe_symbolic_build.__name__ == "_maybe_symbolic_build"


def test_is_graph_model_tells_functional_and_sequential_from_subclassed():
    inputs = keras.Input((3,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    assert keras_compat.is_graph_model(functional) and keras_compat.is_graph_model(sequential)
    assert not keras_compat.is_graph_model(Subclassed())


def test_no_module_but_keras_compat_touches_a_private_keras_name():
    private = ("_maybe_symbolic_build", "_symbolic_build", "_flatten_layers", "data_adapter",
               "_save_model", "keras.src", "_run_through_graph")
    for folder in ("ardir_tf", "export"):
        for name in os.listdir(ROOT / folder):
            if name.endswith(".py") and name != "keras_compat.py":
                text = (ROOT / folder / name).read_text()
                assert not [p for p in private if p in text], f"{folder}/{name}"


@pytest.mark.slow
def test_importing_ardir_tf_changes_no_environment_variable():
    code = ("import os, json; before = dict(os.environ); import ardir_tf; "
            "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
