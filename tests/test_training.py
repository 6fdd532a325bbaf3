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


def test_resumable_epoch_reads_the_backup(tmp_path):
    wd = Workdir(tmp_path)
    assert training.resumable_epoch(wd, "student") == 0
    (tmp_path / "backup" / "student").mkdir(parents=True)
    (tmp_path / "backup" / "student" / "training_metadata.json").write_text('{"epoch": 3}')
    assert training.resumable_epoch(wd, "student") == 3
    assert np.isclose(training.steps_per_epoch(130, 64), 3)
