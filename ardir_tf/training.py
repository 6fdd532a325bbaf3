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
import shutil
import tempfile

import keras

from ardir_tf.workdir import atomic_write

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

    def _rows(self):
        """The file's rows; a row cut short (a full disk, an older version killed
        while appending) is dropped."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return [r for r in csv.DictReader(f)
                    if None not in r.values() and str(r.get("epoch", "")).isdigit()]

    def _write(self, rows):
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.FIELDS)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.path, write)

    def on_epoch_begin(self, epoch, logs=None):
        if os.path.exists(self.path):
            self._write([r for r in self._rows()
                         if not (r["phase"] == self.phase and int(r["epoch"]) >= epoch + 1)])

    def on_epoch_end(self, epoch, logs=None):
        self._write(self._rows() + [
            dict(phase=self.phase, epoch=epoch + 1, name=name, value=f"{float(value):.6g}")
            for name, value in sorted((logs or {}).items())])


# A backup generation: backup/PHASE/epoch-NNNN/ holding these two files.
# epoch.json, written last, also marks the generation complete.
GENERATION = "epoch-"
WEIGHTS = "trainer.weights.h5"
EPOCH = "epoch.json"


def generations(backup_dir):
    """[(epoch, directory)] of the backup generations in `backup_dir`, newest first."""
    found = []
    if os.path.isdir(backup_dir):
        for name in os.listdir(backup_dir):
            path = os.path.join(backup_dir, name)
            if name.startswith(GENERATION) and name[len(GENERATION):].isdigit() and \
                    os.path.isfile(os.path.join(path, EPOCH)):
                found.append((int(name[len(GENERATION):]), path))
    return sorted(found, reverse=True)


def resumable_epoch(workdir, phase):
    """The number of epochs of `phase` its newest backup holds (0: none)."""
    found = generations(workdir.path("backup", phase))
    return found[0][0] if found else 0


def restore(trainable, backup_dir, log=None):
    """Loads the newest backup generation that loads into `trainable` (its
    weights, the optimizer's included) and returns its epoch; 0 when there is
    none. A generation that does not load is skipped, and `log` (fn(str), or
    None) told. Raises ValueError when there are generations and none loads (a
    damaged disk: a kill never leaves a generation half-written)."""
    failures = []
    found = generations(backup_dir)
    optimizer = getattr(trainable, "optimizer", None)
    if found and optimizer is not None and not optimizer.built:
        with trainable.distribute_strategy.scope():  # so that its state loads too
            optimizer.build(trainable.trainable_variables)
    for epoch, path in found:
        try:
            trainable.load_weights(os.path.join(path, WEIGHTS))
            if failures and log is not None:
                log(f"the newer backup did not load ({'; '.join(failures)}); resumed after "
                    f"epoch {epoch} instead")
            return epoch
        except Exception as err:  # h5py and Keras raise many kinds for a bad file
            text = str(err).strip()
            failures.append(f"{os.path.basename(path)}: "
                            f"{text.splitlines()[0] if text else type(err).__name__}")
    if failures:
        raise ValueError(f"no backup in {backup_dir} loads ({'; '.join(failures)}); delete "
                         "that directory to train the phase from its start")
    return 0


class EpochBackup(keras.callbacks.Callback):
    """The trainer's weights (the optimizer's included) after every epoch, so
    that the same command resumes after a crash or kill -9.

    Each epoch is a generation backup_dir/epoch-NNNN/ (the weights, and the
    epoch number), written into a temporary directory and renamed into place:
    a kill at any moment leaves every generation whole, never a truncated file
    that a resume would read (Keras' BackupAndRestore overwrites its one file
    in place, and falls back to the previous only on an OSError, where a
    truncated HDF5 file raises RuntimeError). The newest two are kept.

    For a cluster sharing one backup directory: every worker restores from it
    (`restore`), only the chief writes it. The others save to a throwaway file
    instead of skipping the save, because under a multi-worker strategy
    reading some variables is a collective every worker must join.

    What is backed up is the trainer's weights: for the distiller the student,
    the adapters and the optimizer, not the frozen teacher (see distill.py)."""

    def __init__(self, backup_dir, chief=True, keep=2):
        super().__init__()
        self.backup_dir, self.chief, self.keep = backup_dir, chief, keep

    def on_epoch_end(self, epoch, logs=None):
        if not self.chief:
            with tempfile.TemporaryDirectory() as tmp:
                self.model.save_weights(os.path.join(tmp, WEIGHTS))
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self.backup_dir)
        self.model.save_weights(os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, EPOCH), "w") as f:
            json.dump({"epoch": epoch + 1}, f)
        final = os.path.join(self.backup_dir, f"{GENERATION}{epoch + 1:04d}")
        if os.path.isdir(final):  # an epoch redone after a resume from an older one
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in generations(self.backup_dir)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(self.backup_dir):  # what kills left half-written
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.backup_dir, name), ignore_errors=True)


def fit_phase(trainable, train, epochs, workdir, phase, validation=None, verbose=1,
              chief=True, log=None):
    """`trainable.fit` for one phase, resumable from workdir/backup/PHASE.

    `chief=False` (the other workers of a cluster) restores from the backup but
    writes nothing to `workdir`. `log` (fn(str), or None) is told when a newer
    backup did not load and an older one was resumed instead.

    Returns the Keras History of this call (only the epochs it ran).
    """
    # Restored here, before fit (every worker of a cluster reads the same
    # backup); Workdir.finish_phase removes the backups once the phase's model
    # is saved.
    backup_dir = workdir.path("backup", phase)
    done = restore(trainable, backup_dir, log)
    backup = EpochBackup(backup_dir, chief=chief)
    callbacks = [
        # The row first, then the backup: a kill between them leaves a row of an
        # epoch that will be redone, which TidyHistory drops when it restarts.
        TidyHistory(workdir.path("history.csv"), phase),
        backup,
        keras.callbacks.TensorBoard(workdir.path("logs", phase), write_graph=False),
    ] if chief else [backup]
    return trainable.fit(train, validation_data=validation, epochs=epochs, initial_epoch=done,
                         callbacks=callbacks, verbose=verbose, shuffle=False)
