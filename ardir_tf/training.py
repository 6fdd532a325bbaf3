"""Optimisers with the literature's schedules, and resumable training phases.

`optimizer(...)` builds SGD or Adam with a constant, piecewise (decay by a
factor at given epochs) or cosine learning rate. Weight decay is Keras'
decoupled form (applied to the weights, not added to the gradient as in
PyTorch's SGD); the two agree to first order for SGD without momentum.

`fit_phase(...)` trains one phase of a run (natural, teacher, student) with
the callbacks a run needs: a backup of the last finished epoch that the same
command resumes from after a crash or kill -9, a tidy history.csv, and
TensorBoard logs.
"""

import csv
import json
import math
import os
import tempfile

import keras

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "piecewise", "cosine")


def optimizer(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.0,
              schedule="constant", epochs=1, steps_per_epoch=1, decay_epochs=(),
              decay_factor=0.1):
    """A Keras optimiser with a learning-rate schedule over `epochs` epochs."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    lr = learning_rate
    if schedule == "piecewise" and decay_epochs:
        boundaries = [int(e * steps_per_epoch) for e in sorted(decay_epochs)]
        values = [learning_rate * decay_factor ** i for i in range(len(boundaries) + 1)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    elif schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate,
                                                    max(1, epochs * steps_per_epoch))
    wd = weight_decay or None
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum, weight_decay=wd)
    return keras.optimizers.Adam(lr, weight_decay=wd)


def steps_per_epoch(num_examples, batch_size, dataset=None):
    """Batches per epoch: from the size when known, else by counting `dataset`."""
    if num_examples > 0:
        return math.ceil(num_examples / batch_size)
    return sum(1 for _ in dataset)


class TidyHistory(keras.callbacks.Callback):
    """Appends phase,epoch,name,value rows to a CSV file after each epoch.

    One long table serves every phase and survives resumption: rows of epochs
    that are being redone (a kill after the row, before the backup) are dropped
    when the epoch starts again.
    """

    FIELDS = ("phase", "epoch", "name", "value")

    def __init__(self, path, phase):
        super().__init__()
        self.path, self.phase = path, phase

    def on_epoch_begin(self, epoch, logs=None):
        if not os.path.exists(self.path):
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f)
                    if not (r["phase"] == self.phase and int(r["epoch"]) >= epoch + 1)]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def on_epoch_end(self, epoch, logs=None):
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            if new:
                writer.writeheader()
            for name, value in sorted((logs or {}).items()):
                writer.writerow(dict(phase=self.phase, epoch=epoch + 1, name=name,
                                     value=f"{float(value):.6g}"))


def resumable_epoch(workdir, phase):
    """The number of epochs of `phase` its backup holds (0: none)."""
    path = workdir.path("backup", phase, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    try:
        with open(path) as f:
            return int(json.load(f).get("epoch", 0))
    except ValueError:  # cut short by a kill: Keras falls back to the older backup
        return 0


class SharedBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore (once an epoch) for a cluster sharing one backup
    directory: every worker restores from it, only the chief writes it. The
    others save to a throwaway file instead of skipping the save, because under
    a multi-worker strategy reading some variables is a collective every worker
    must join.

    What is backed up is the trainer's weights: for the distiller the student,
    the adapters and the optimizer, not the frozen teacher (see distill.py)."""

    def __init__(self, backup_dir, chief=True, **kwargs):
        super().__init__(backup_dir, save_freq="epoch", **kwargs)
        self.chief = chief

    def on_epoch_end(self, epoch, logs=None):
        if self.chief:
            return super().on_epoch_end(epoch, logs)
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_weights(os.path.join(tmp, "model.weights.h5"))


def fit_phase(trainable, train, epochs, workdir, phase, validation=None, verbose=1,
              chief=True):
    """`trainable.fit` for one phase, resumable from workdir/backup/PHASE.

    `chief=False` (the other workers of a cluster) restores from the backup but
    writes nothing to `workdir`.

    Returns the Keras History of this call (only the epochs it ran).
    """
    # Two generations of backup (a kill while one is written leaves the other),
    # kept after fit: Workdir.finish_phase removes them once the phase's model
    # is saved.
    backup = SharedBackup(workdir.path("backup", phase), chief=chief, double_checkpoint=True,
                          delete_checkpoint=False)
    callbacks = [
        # The row first, then the backup: a kill between them leaves a row of an
        # epoch that will be redone, which TidyHistory drops when it restarts.
        TidyHistory(workdir.path("history.csv"), phase),
        backup,
        keras.callbacks.TensorBoard(workdir.path("logs", phase), write_graph=False),
    ] if chief else [backup]
    # shuffle=False: the datasets shuffle themselves (Keras would otherwise warn
    # that its default shuffle=True is ignored for a tf.data.Dataset).
    return trainable.fit(train, validation_data=validation, epochs=epochs,
                         callbacks=callbacks, verbose=verbose, shuffle=False)
