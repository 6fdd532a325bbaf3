"""Every work-around of a Keras private API or upstream bug, in one place.

Each is needed by the Keras version in `CHECKED_VERSIONS` and was checked on it;
`check_version()` says when the installed Keras is one they were not checked on
(tests/test_keras_compat.py fails then, with what to re-check). Nothing outside
this module touches a private Keras name.

1. `FitBuildMixin._maybe_symbolic_build` (private `Trainer._maybe_symbolic_build`).
   Under a tf.distribute strategy Keras 3.15 builds the model before training from
   a batch pulled out of a *fresh* iterator of the dataset. With a dataset that
   reshuffles each iteration that iterator is an extra epoch, so training under
   any strategy saw the shuffle order one epoch later than on one device. Under
   MultiWorkerMirroredStrategy it then reduces that batch with
   `strategy.reduce("MEAN", ...)`, which fails (keras-team/keras#20585). Our
   trainers are fully built before `fit` (networks, adapters, and the optimizer
   in `compile`), so the build needs no data at all.
2. `fit_logs(strategy, logs)`. Under MultiWorkerMirroredStrategy Keras 3.15's
   `fit` reduces each returned log with `strategy.reduce(MEAN, axis=0)`, which
   fails on a scalar (keras-team/keras#20585): logs are returned with shape [1]
   there, and the reduction brings them back to scalars.
3. `UnsavedAttributesMixin.__dir__`. Keras 3.15's weight saving
   (`saving_lib._walk_saveable`, used by `save_weights` and so by
   BackupAndRestore) saves every Keras object that any name in `dir(model)`
   leads to, properties included. A property that returns an object kept out of
   tracking (the distiller's frozen teacher) would still be written into every
   backup; leaving the name out of `dir()` keeps it out.
4. `all_layers(model)` (private `Layer._flatten_layers`). Keras 3.15 has no
   public way to list every layer nested in a model, sublayers of custom
   layers included (`model.layers` is one level).
5. `is_graph_model(model)` (private `keras.src.models.functional.Functional`).
   Keras 3.15 has no public way to tell a functional model (which
   `keras.models.clone_model(clone_function=...)` can rebuild) from a subclassed
   one (which it refuses).
"""

import keras
import tensorflow as tf

# The Keras versions (major.minor) the work-arounds below were checked on.
CHECKED_VERSIONS = ("3.15",)


def check_version(version=None):
    """None when `version` (default: the installed Keras) is one the work-arounds
    were checked on, else a message saying what to re-check."""
    version = version or keras.__version__
    if ".".join(version.split(".")[:2]) in CHECKED_VERSIONS:
        return None
    return (f"ardir_tf's Keras work-arounds (ardir_tf/keras_compat.py) were checked on "
            f"Keras {', '.join(CHECKED_VERSIONS)}, but Keras {version} is installed: re-check "
            "each one listed in that module's docstring (is the upstream issue fixed? does "
            "the private method still exist with the same signature?), then add the version "
            "to CHECKED_VERSIONS")


class FitBuildMixin:
    """For keras.Model subclasses whose every variable exists before `fit`
    (see work-around 1 in the module docstring)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # With everything built, Trainer._symbolic_build reads no data; it only
        # runs Keras' post-build bookkeeping, in the strategy's scope.
        with self.distribute_strategy.scope():
            self._symbolic_build(iterator=None, data_batch=None)


def fit_logs(strategy, logs):
    """`logs` ({name: scalar tensor}) as `fit` can reduce them under `strategy`
    (work-around 2 in the module docstring)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


class UnsavedAttributesMixin:
    """Names in `UNSAVED` are left out of `dir()`, and so out of the weights
    Keras saves (work-around 3 in the module docstring)."""

    UNSAVED = ()

    def __dir__(self):
        return [name for name in super().__dir__() if name not in self.UNSAVED]


def all_layers(model):
    """Every layer inside `model` (not `model` itself), nested models' and custom
    layers' sublayers included (work-around 4 in the module docstring)."""
    return model._flatten_layers(include_self=False, recursive=True)


def is_graph_model(model):
    """Whether `model` is a functional or Sequential keras.Model, whose graph
    `keras.models.clone_model` can rebuild (work-around 5)."""
    from keras.src.models.functional import Functional
    return isinstance(model, (Functional, keras.Sequential))
