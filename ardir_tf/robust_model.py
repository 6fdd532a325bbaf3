"""What every adversarial trainer here shares: reduction, update, metrics, test_step.

`RobustModel` is a `keras.Model` wrapping the network being trained. Subclasses
(`ARDIRDistiller`, `AdversarialTrainer`) write `train_step`; this base gives
them the pieces whose correctness does not depend on the method:

- per-example losses are reduced once with the global batch size
  (`tf.nn.compute_average_loss`): Keras sums gradients across replicas, so a
  per-replica mean would make the update N times too large on N replicas;
- the loss is scaled for mixed precision inside the tape (`optimizer.scale_loss`);
- a NaN or Inf loss stops training with an error instead of training on;
- metrics are `keras.metrics.Mean` trackers fed per-example values, so they
  report the mean over the global batch whatever the number of replicas;
- `test_step` reports clean accuracy and accuracy under the evaluation attack.
"""

import types

import keras
import tensorflow as tf

from ardir_tf import attacks


def check_attack(attack, name="attack"):
    if not isinstance(attack, attacks.PGD):
        raise ValueError(
            f"{name} must be an ardir_tf.attacks.PGD, e.g. "
            f"PGD(eps=8/255, step_size=2/255, steps=10); got {attack!r}")
    return attack


def check_logits_model(model, role):
    """Raises ValueError unless `model` is a keras.Model whose output is logits."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"the {role} must be a keras.Model, got {type(model).__name__}"
                         + (" (load it first: keras.models.load_model(path))"
                            if isinstance(model, str) else ""))
    last = model.layers[-1] if model.layers else None
    activation = getattr(last, "activation", None)
    if isinstance(last, keras.layers.Softmax) or getattr(activation, "__name__", "") == "softmax":
        raise ValueError(f"the {role} {model.name!r} ends in a softmax; the losses and attacks "
                         "take logits: build it without the final softmax")


def accuracy(y, logits):
    """Per-example 0/1 correctness of argmax(logits) against integer labels."""
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(pred, tf.cast(y, tf.int32)), tf.float32)


class RobustModel(keras.Model):
    """Base of the adversarial trainers: see the module docstring.

    Args:
      network: the keras.Model being trained (the student, or the teacher-to-be).
      attack: the training attack, an `attacks.PGD`.
      eval_attack: the attack `test_step` (fit's validation, `evaluate`) uses;
        defaults to `attack` with the CE loss.
      train_metrics: names of the per-example terms `train_step` reports,
        besides "loss", "clean_accuracy" and "adv_accuracy".
    """

    def __init__(self, network, attack, eval_attack=None, train_metrics=(),
                 **kwargs):
        super().__init__(**kwargs)
        self.attack = check_attack(attack)
        self.eval_attack = check_attack(
            eval_attack if eval_attack is not None else attack.replace(loss="ce"),
            "eval_attack")
        names = ["loss", *train_metrics, "clean_accuracy", "adv_accuracy"]
        self._train_trackers = {n: keras.metrics.Mean(name=n) for n in names}
        # Distinct metric names for the test side, but reported under the
        # plain keys (Keras prefixes them with "val_" during fit).
        self._test_trackers = {n: keras.metrics.Mean(name=f"test_{n}")
                               for n in ("clean_accuracy", "pgd_accuracy")}
        # Views of the networks (exposed graphs sharing their layers) are kept
        # out of Keras' tracking so each variable is saved once, under the
        # network that owns it.
        self._views = types.SimpleNamespace()
        # Every variable lives in already-built networks (and adapters built
        # at construction), so this wrapper is built: save_weights and
        # checkpoint callbacks work before and during fit.
        self.built = True

    @property
    def network(self):
        raise NotImplementedError

    @property
    def metrics(self):
        return [*self._train_trackers.values(), *self._test_trackers.values()]

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def _unpack(self, data):
        """(pixels as float32, integer labels [batch]) with their contracts checked."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError("adversarial training needs labels: give (x, y) batches")
        if sample_weight is not None:
            raise ValueError("sample weights are not supported; give (x, y) batches")
        x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        if y.shape.rank not in (None, 1) and not (y.shape.rank == 2 and y.shape[-1] == 1):
            raise ValueError(f"labels must be integer class ids of shape [batch], got shape "
                             f"{tuple(y.shape)}; for one-hot labels pass their argmax")
        x = tf.cast(x, tf.float32)
        clip = self.attack.clip
        if clip is not None:
            # The attack clips to this range: 0-255 images would silently
            # become black and white. A cheap check, once per batch.
            low, high = tf.reduce_min(x), tf.reduce_max(x)
            tf.debugging.assert_greater_equal(
                low, float(clip[0]), message=f"inputs must be finite pixels in {clip} "
                "(the attack's clip range); scale 0-255 images by 1/255")
            tf.debugging.assert_less_equal(
                high, float(clip[1]), message=f"inputs must be finite pixels in {clip} "
                "(the attack's clip range); scale 0-255 images by 1/255")
        return x, tf.reshape(tf.cast(y, tf.int32), [-1])

    def _inference(self, z):
        return self.network(z, training=False)

    def _reduce(self, per_example):
        """The scalar to differentiate: sum over the replica's examples divided
        by the global batch size."""
        per_example = tf.debugging.check_numerics(
            per_example, "the training loss is NaN or Inf (lower the learning "
            "rate, or check the inputs are finite pixels in [0, 1])")
        return tf.nn.compute_average_loss(per_example)

    def _apply(self, tape, scaled_loss):
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(grads, variables)

    def _report(self, y, terms, logits_clean, logits_adv):
        for name, values in terms.items():
            self._train_trackers[name].update_state(values)
        self._train_trackers["clean_accuracy"].update_state(accuracy(y, logits_clean))
        self._train_trackers["adv_accuracy"].update_state(accuracy(y, logits_adv))
        return self._logs(self._train_trackers)

    def _multi_worker(self):
        return isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def _logs(self, trackers):
        """The trackers' results; of shape [1] under MultiWorkerMirroredStrategy,
        where Keras 3.15's fit reduces each log with strategy.reduce(MEAN, axis=0),
        which fails on a scalar (keras-team/keras#20585); the reduction brings
        them back to scalars."""
        logs = {n: t.result() for n, t in trackers.items()}
        if self._multi_worker():
            logs = {n: tf.reshape(v, [1]) for n, v in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds from zeros shaped like the data, never from the data itself.

        Under any strategy, Keras 3.15 pulls a batch from a fresh iterator of
        the dataset to build from: with a dataset that reshuffles each
        iteration, that iterator is an extra epoch, so training under a
        strategy saw the shuffle order one epoch later than on one device
        (and the same seed gave other weights). Under MultiWorkerMirroredStrategy
        it then reduces that batch with strategy.reduce(MEAN), which fails
        (keras-team/keras#20585). Every variable of this model already exists
        (see __init__); the build needs only shapes and dtypes.
        """
        if iterator is not None:
            spec = iterator.data_adapter.get_tf_dataset().element_spec
            data_batch = tf.nest.map_structure(
                lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype), spec)
        return super()._maybe_symbolic_build(iterator=None, data_batch=data_batch)

    def test_step(self, data):
        x, y = self._unpack(data)
        logits = self._inference(x)
        x_adv = self.eval_attack(self._inference, x, y)
        self._test_trackers["clean_accuracy"].update_state(accuracy(y, logits))
        self._test_trackers["pgd_accuracy"].update_state(
            accuracy(y, self._inference(x_adv)))
        return self._logs(self._test_trackers)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.network(x, training=False)
