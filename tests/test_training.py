import numpy as np
import pytest

from ardir_tf import training
from ardir_tf.workdir import Workdir


def test_piecewise_and_cosine_schedules():
    opt = training.optimizer("sgd", 0.1, schedule="piecewise", epochs=10, steps_per_epoch=5,
                             decay_epochs=(4, 8), decay_factor=0.1)
    lr = opt.learning_rate if not callable(opt._learning_rate) else opt._learning_rate
    assert float(lr(0)) == pytest.approx(0.1)
    assert float(lr(25)) == pytest.approx(0.01)
    assert float(lr(45)) == pytest.approx(0.001)
    cos = training.optimizer("adam", 1.0, schedule="cosine", epochs=2, steps_per_epoch=5)
    assert float(cos._learning_rate(10)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        training.optimizer("rmsprop")
    with pytest.raises(ValueError, match="unknown schedule"):
        training.optimizer(schedule="step")


def test_tidy_history_drops_rows_of_redone_epochs(tmp_path):
    path = str(tmp_path / "history.csv")
    first = training.TidyHistory(path, "student")
    for epoch in range(3):
        first.on_epoch_begin(epoch)
        first.on_epoch_end(epoch, {"loss": float(epoch)})
    other = training.TidyHistory(path, "teacher")
    other.on_epoch_end(0, {"loss": 9.0})
    resumed = training.TidyHistory(path, "student")
    resumed.on_epoch_begin(1)  # epoch 2 is redone
    resumed.on_epoch_end(1, {"loss": 7.0})
    rows = [l.split(",") for l in open(path).read().splitlines()[1:]]
    assert rows == [["student", "1", "loss", "0"], ["teacher", "1", "loss", "9"],
                    ["student", "2", "loss", "7"]]


def test_tidy_history_drops_a_row_cut_short_and_resumes(tmp_path):
    """A history whose last row was cut short (a full disk, a kill while an older
    version appended): the resumed run drops it instead of failing on it."""
    path = tmp_path / "history.csv"
    path.write_text("phase,epoch,name,value\nstudent,1,loss,0.5\nstudent,")
    resumed = training.TidyHistory(str(path), "student")
    resumed.on_epoch_begin(1)
    resumed.on_epoch_end(1, {"loss": 0.25})
    assert path.read_text().splitlines()[1:] == ["student,1,loss,0.5", "student,2,loss,0.25"]


def test_resumable_epoch_reads_the_newest_backup(tmp_path):
    wd = Workdir(tmp_path)
    assert training.resumable_epoch(wd, "student") == 0
    for epoch in (2, 3):
        generation = tmp_path / "backup" / "student" / f"epoch-{epoch:04d}"
        generation.mkdir(parents=True)
        (generation / training.EPOCH).write_text(f'{{"epoch": {epoch}}}')
    # A directory a kill left half-written is no generation.
    (tmp_path / "backup" / "student" / ".tmp-x").mkdir()
    (tmp_path / "backup" / "student" / "epoch-0009").mkdir()  # no epoch.json: unfinished
    assert training.resumable_epoch(wd, "student") == 3
    assert np.isclose(training.steps_per_epoch(130, 64), 3)


def test_backups_are_whole_generations_and_a_damaged_one_falls_back(tmp_path):
    """Each epoch's backup is renamed into place whole; restore takes the newest
    that loads, so a truncated file (what a kill during Keras' in-place write
    left, and Keras then failed to read) costs one epoch, not the run."""
    import keras

    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
        return m
    x, y = np.ones((8, 3), np.float32), np.zeros((8, 2), np.float32)
    trained = model()
    backup = str(tmp_path / "backup")
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append([w.numpy().copy() for w in self.model.weights])
    trained.fit(x, y, epochs=3, verbose=0, callbacks=[
        training.EpochBackup(backup), Snapshot()])
    assert [e for e, _ in training.generations(backup)] == [3, 2]  # the newest two
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["epoch-0002",
                                                                       "epoch-0003"]
    fresh = model()
    assert training.restore(fresh, backup) == 3
    for a, b in zip(fresh.weights, snapshots[2]):
        np.testing.assert_array_equal(a.numpy(), b)
    assert int(fresh.optimizer.iterations.numpy()) == 3  # the optimizer's state too
    # The newest cut short: the one before it is restored.
    newest = tmp_path / "backup" / "epoch-0003" / training.WEIGHTS
    newest.write_bytes(newest.read_bytes()[:2048])
    fresh = model()
    assert training.restore(fresh, backup) == 2
    for a, b in zip(fresh.weights, snapshots[1]):
        np.testing.assert_array_equal(a.numpy(), b)
    older = tmp_path / "backup" / "epoch-0002" / training.WEIGHTS
    older.write_bytes(b"")
    with pytest.raises(ValueError, match="no backup in .* loads .*epoch-0003.*epoch-0002.*"
                                         "delete that directory"):
        training.restore(model(), backup)
    assert training.restore(model(), str(tmp_path / "none")) == 0
