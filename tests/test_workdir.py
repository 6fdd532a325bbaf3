import json
import os

import pytest

from ardir_tf.workdir import Workdir, WorkdirError


def test_claim_resume_and_refuse(tmp_path):
    wd = Workdir(tmp_path / "run")
    assert wd.claim({"eps": 0.1}) is False  # new
    assert wd.claim({"eps": 0.1}) is True   # same run: resume
    wd.write_json("metrics.json", {"student": 1})
    with pytest.raises(WorkdirError, match="--eps was 0.1, now 0.2"):
        wd.claim({"eps": 0.2})
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"student": 1}
    (tmp_path / "run" / "my_notes.txt").write_text("keep")
    (tmp_path / "run" / "cells" / "ard-seed0").mkdir(parents=True)  # a study's cells
    (tmp_path / "run" / "study.csv").write_text("method,seed")
    wd.claim({"eps": 0.2}, overwrite=True)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "cells").exists()
    assert not (tmp_path / "run" / "study.csv").exists()
    assert (tmp_path / "run" / "my_notes.txt").read_text() == "keep"  # not the run's: kept
    assert json.loads((tmp_path / "run" / "flags.json").read_text()) == {"eps": 0.2}


def test_the_same_directory_named_another_way_is_the_same_run(tmp_path):
    """flags.json records --workdir as written (None: the default); giving the
    same directory by name, or another spelling of it, resumes the run."""
    wd = Workdir(tmp_path / "run")
    assert wd.claim({"eps": 0.1, "workdir": None}) is False
    assert wd.claim({"eps": 0.1, "workdir": str(tmp_path / "run")}) is True
    assert wd.claim({"eps": 0.1, "workdir": "./run"}) is True
    assert json.loads((tmp_path / "run" / "flags.json").read_text())["workdir"] is None
    with pytest.raises(WorkdirError, match="--eps was 0.1, now 0.2"):
        wd.claim({"eps": 0.2, "workdir": None})


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "paper.tex").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(WorkdirError, match="holds no run of ours"):
            Workdir(tmp_path).claim({"eps": 0.1}, overwrite=overwrite)
    assert (tmp_path / "paper.tex").read_text() == "x"
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="is a file"):
        Workdir(tmp_path / "file").claim({})


def test_a_failed_write_leaves_the_old_file(tmp_path):
    wd = Workdir(tmp_path)
    wd.write_json("metrics.json", {"a": 1})

    class Boom:
        def save(self, path):
            with open(path, "w") as f:
                f.write("half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wd.save_model(Boom(), "student")
    assert not (tmp_path / "student.keras").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left
    with pytest.raises(TypeError):
        wd.write_json("metrics.json", {"a": object()})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1}


def test_a_killed_write_or_overwrite_leaves_a_directory_the_command_can_claim(tmp_path,
                                                                             monkeypatch):
    # A write of the first flags.json killed half-way leaves only its .tmp-* file.
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / ".tmp-x1.json").write_text('{"eps"')
    # ...and an export killed before deleting its lock file, its .export.lock.
    (tmp_path / "new" / ".export.lock").write_text("")
    assert Workdir(tmp_path / "new").claim({"eps": 0.1}) is False
    # --overwrite killed after deleting the old run's files and before writing the
    # new flags.json: the old flags.json is still there, so the same command
    # claims the directory again. Every file the run wrote goes, others stay.
    wd = Workdir(tmp_path / "run")
    wd.claim({"eps": 0.1})
    for name in ("student.keras", "robustness-linf-0.1.png", "cell.json", "metrics.json",
                 ".export.lock"):
        (tmp_path / "run" / name).write_text("x")
    (tmp_path / "run" / "evaluation-partial").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(wd, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        wd.claim({"eps": 0.2}, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["flags.json", "notes.txt"]
    monkeypatch.undo()
    assert Workdir(tmp_path / "run").claim({"eps": 0.2}, overwrite=True) is False
    assert json.loads((tmp_path / "run" / "flags.json").read_text()) == {"eps": 0.2}


def test_a_locked_run_refuses_a_second_holder_until_released(tmp_path):
    first, second = Workdir(tmp_path / "run"), Workdir(tmp_path / "run")
    first.claim({"eps": 0.1})
    first.lock()
    with pytest.raises(WorkdirError, match=rf"in use by another process \(pid {os.getpid()}\)"):
        second.lock()
    first.unlock()
    second.lock()  # free again
    second.unlock()
    # The lock file makes no directory "a run's": a new one with only it is claimed.
    (tmp_path / "new").mkdir()
    locked = Workdir(tmp_path / "new")
    locked.lock()
    assert Workdir(tmp_path / "new").claim({"eps": 0.1}) is False
    locked.unlock()
