"""What every adversarial trainer here shares: reduction, update, metrics, test_step.

`RobustModel` is a `keras.Model` wrapping the network being trained. Subclasses
(`ARDIRDistiller`, `AdversarialTrainer`) write `train_step`; this base gives
them the pieces whose correctness does not depend on the method:

- per-example losses are reduced once with the global batch size
  (`tf.nn.compute_average_loss`), the true one: the batch's size summed over
  the replicas, so that a last batch the replicas split unevenly (1,437 digits
  = 22 x 64 + 29) is averaged over its 29 examples. Keras sums gradients
  across replicas, so a per-replica mean would make the update N times too
  large on N replicas;
- `compile` takes the optimizer only (these models compute their own losses
  and metrics; a `loss=` or `metrics=` would be silently ignored, so it is
  refused) and builds it at once, so `train_step` is traced once, not twice;
- the loss is scaled for mixed precision inside the tape (`optimizer.scale_loss`);
- a NaN or Inf loss stops training with an error instead of training on;
- metrics are `keras.metrics.Mean` trackers fed per-example values, so they
  report the mean over the global batch whatever the number of replicas; a
  step that has no clean logits of its own does not report clean accuracy
  (one forward pass in 30 or so, spent on a number validation gives anyway);
- `test_step` reports clean accuracy and accuracy under the evaluation attack.
"""

import types

import keras
import tensorflow as tf

from ardir_tf import attacks, precision
from ardir_tf.keras_compat import FitBuildMixin, fit_logs


def check_attack(attack, name="attack"):
    if not isinstance(attack, attacks.PGD):
        raise ValueError(
            f"{name} must be an ardir_tf.attacks.PGD, e.g. "
            f"PGD(eps=8/255, step_size=2/255, steps=10); got {attack!r}")
    return attack


def check_logits_model(model, role):
    """Raises ValueError unless `model` is a built keras.Model whose output is
    logits."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"the {role} must be a keras.Model, got {type(model).__name__}"
                         + (" (load it first: keras.models.load_model(path))"
                            if isinstance(model, str) else ""))
    if not model.built or not model.weights:
        # Its variables must exist before compile builds the optimizer on them.
        raise ValueError(f"the {role} {model.name!r} is not built (it has no weights yet): "
                         "give it an input shape (keras.Input, or input_shape=) or call it "
                         "on a batch before passing it")
    last = model.layers[-1] if model.layers else None
    activation = getattr(last, "activation", None)
    if isinstance(last, keras.layers.Softmax) or getattr(activation, "__name__", "") == "softmax":
        raise ValueError(f"the {role} {model.name!r} ends in a softmax; the losses and attacks "
                         "take logits: build it without the final softmax")


# How a method that runs the network on the clean x as well as on x' (ARD,
# ARDIR, RSLAD, TRADES) treats BatchNorm in its clean pass. BatchNorm's moving
# statistics are what the deployed model, and every attack (the training
# attack included), normalise with.
#   "split": each pass is normalised by its own batch, as in the reference
#            code, but the moving statistics are learnt from the adversarial
#            batches alone (the clean pass's update is undone);
#   "adv":   the clean pass runs in inference mode: normalised by the moving
#            statistics, which only the adversarial batches update;
#   "both":  each pass in training mode, both update the moving statistics: the
#            methods' reference PyTorch code. Under a large threat model the two
#            batches' statistics differ so much that their average is neither
#            network (docs/results/mnist.md: the MNIST students were found
#            masked this way).
BN_STATISTICS = ("split", "adv", "both")


def check_bn_statistics(value):
    if value not in BN_STATISTICS:
        raise ValueError(f"unknown bn_statistics {value!r}; valid: split (each pass "
                         "normalised by its own batch, the moving statistics from the "
                         "adversarial batches), adv (the clean pass in inference mode) or "
                         "both (the reference code's)")
    return value


def moving_statistics(model):
    """The moving mean and variance of every BatchNormalization layer in
    `model`, nested models included."""
    found = []
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, keras.layers.BatchNormalization):
            found += [layer.moving_mean, layer.moving_variance]
        elif getattr(layer, "layers", None):
            found += moving_statistics(layer)
    return found


def clean_pass(network, x, bn_statistics, moving):
    """`network` on the clean batch x as `bn_statistics` says (see
    BN_STATISTICS); `moving` are its `moving_statistics`."""
    if bn_statistics == "adv":
        return network(x, training=False)
    if bn_statistics == "both" or not moving:
        return network(x, training=True)
    # Program order orders the reads, the pass's own updates and the restores
    # (automatic control dependencies on each variable).
    saved = [tf.identity(v.value) for v in moving]
    out = network(x, training=True)
    for v, value in zip(moving, saved):
        v.assign(value)
    return out


def accuracy(y, logits):
    """Per-example 0/1 correctness of argmax(logits) against integer labels."""
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(pred, tf.cast(y, tf.int32)), tf.float32)


class RobustModel(FitBuildMixin, keras.Model):
    """Base of the adversarial trainers: see the module docstring.

    Args:
      network: the keras.Model being trained (the student, or the teacher-to-be).
      attack: the training attack, an `attacks.PGD`.
      eval_attack: the attack `test_step` (fit's validation, `evaluate`) uses;
        defaults to `attack` with the CE loss.
      train_metrics: names of the per-example terms `train_step` reports,
        besides "loss", "clean_accuracy" and "adv_accuracy".
      adversarial: False for a model trained on clean inputs only (no
        "adv_accuracy"; `attack` is then only the threat model of validation).
      clean_accuracy: False when `train_step` does not run the network on the
        clean batch (PGD-AT; ARD with alpha = 1): "clean_accuracy" is then not
        a training metric, rather than costing a forward pass per step
        (validation and `evaluate` still report it).
    """

    def __init__(self, network, attack, eval_attack=None, train_metrics=(),
                 adversarial=True, clean_accuracy=True, **kwargs):
        super().__init__(**kwargs)
        self.attack = check_attack(attack)
        self.eval_attack = check_attack(
            eval_attack if eval_attack is not None else attack.replace(loss="ce"),
            "eval_attack")
        names = ["loss", *train_metrics] + (["clean_accuracy"] if clean_accuracy else []) + (
            ["adv_accuracy"] if adversarial else [])
        self._train_trackers = {n: keras.metrics.Mean(name=n) for n in names}
        # Distinct metric names for the test side, but reported under the
        # plain keys (Keras prefixes them with "val_" during fit).
        self._test_trackers = {n: keras.metrics.Mean(name=f"test_{n}")
                               for n in ("clean_accuracy", "pgd_accuracy")}
        # Views of the networks (exposed graphs sharing their layers) are kept
        # out of Keras' tracking so each variable is saved once, under the
        # network that owns it.
        self._views = types.SimpleNamespace()
        # The network for inference-mode passes (the attacks, validation): the
        # network itself, or under mixed_bfloat16 a view computing BatchNorm in
        # bfloat16 (precision.inference_view).
        self._views.inference = precision.inference_view(network)
        # Every variable lives in already-built networks (and adapters built
        # at construction), so this wrapper is built: save_weights and
        # checkpoint callbacks work before and during fit.
        self.built = True

    @property
    def network(self):
        raise NotImplementedError

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, *, loss_weights=None,
                weighted_metrics=None, **kwargs):
        """`keras.Model.compile` for a model that computes its own loss and metrics.

        Takes the optimizer (and Keras' run options: `jit_compile`,
        `steps_per_execution`, `run_eagerly`); `loss=`, `metrics=`,
        `loss_weights=` and `weighted_metrics=` raise ValueError, since the
        method defines the loss and every metric is reported already (see the
        class docstring). The optimizer is built here, before the first trace
        of `train_step`: built during it, its new variables make TensorFlow
        trace the step a second time.
        """
        given = [name for name, value in (("loss", loss), ("metrics", metrics),
                                          ("loss_weights", loss_weights),
                                          ("weighted_metrics", weighted_metrics))
                 if value is not None]
        if given:
            raise ValueError(
                f"{type(self).__name__}.compile takes an optimizer, not "
                f"{', '.join(n + '=' for n in given)}: the loss is the method's own, and "
                f"fit already reports {', '.join(self._train_trackers)} (evaluate and "
                "validation: clean_accuracy, pgd_accuracy). Compute other metrics on "
                f"`{type(self).__name__}.network` after training")
        super().compile(optimizer=optimizer, **kwargs)
        with self.distribute_strategy.scope():
            self.optimizer.build(self.trainable_variables)

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
            # One Assert op whose data are strings: TensorFlow then adds no
            # tf.cond around it, whose branch functions the function registry
            # kept after every trace (a study grew by them, cell after cell).
            tf.debugging.Assert(
                tf.logical_and(low >= float(clip[0]), high <= float(clip[1])),
                [f"inputs must be finite pixels in {clip} (the attack's clip range); "
                 "scale 0-255 images by 1/255"])
        return x, tf.reshape(tf.cast(y, tf.int32), [-1])

    def _inference(self, z):
        return self._views.inference(z, training=False)

    def _reduce(self, per_example):
        """The scalar to differentiate: the sum over this replica's examples
        divided by the global batch's size (all-reduced, so that replicas
        holding unequal shares of a last, partial batch still divide by its
        true size)."""
        per_example = tf.debugging.check_numerics(
            per_example, "the training loss is NaN or Inf (lower the learning "
            "rate, or check the inputs are finite pixels in [0, 1])")
        local = tf.shape(per_example)[0]
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return tf.nn.compute_average_loss(per_example, global_batch_size=local)
        # Summed as float32 (exact for any batch size, and a dtype every
        # collective implementation, NCCL on GPUs included, reduces).
        global_size = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                         tf.cast(local, tf.float32))
        return tf.nn.compute_average_loss(per_example,
                                          global_batch_size=tf.cast(global_size, tf.int32))

    def _apply(self, tape, scaled_loss):
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(grads, variables)

    def _report(self, y, terms, logits_clean, logits_adv=None):
        for name, values in terms.items():
            self._train_trackers[name].update_state(values)
        if logits_clean is not None:
            self._train_trackers["clean_accuracy"].update_state(accuracy(y, logits_clean))
        if logits_adv is not None:
            self._train_trackers["adv_accuracy"].update_state(accuracy(y, logits_adv))
        return self._logs(self._train_trackers)

    def _logs(self, trackers):
        """The trackers' results, shaped as `fit` can reduce them (keras_compat)."""
        return fit_logs(self.distribute_strategy,
                        {n: t.result() for n, t in trackers.items()})

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
