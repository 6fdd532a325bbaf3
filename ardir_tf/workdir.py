"""A run's working directory: what it holds, and writing it without losing data.

    flags.json      the settings of the run that owns the directory
    natural.keras, teacher.keras, student.keras   finished models
    history.csv     one row per (phase, epoch, metric): phase,epoch,name,value
    metrics.json    one entry per evaluated model (natural, teacher, student)
    logs/PHASE/     TensorBoard logs
    workers/        worker-I.log of each worker a local cluster (--num_workers) ran
    backup/PHASE/   the last finished epoch of an interrupted phase (removed
                    when the phase ends); the same command resumes from it

Every file is written to a temporary name and renamed into place, so a kill
leaves the old file or the new one, never half of one. A directory that holds
another run's settings is never reused silently.
"""

import fcntl
import glob
import json
import os
import shutil
import tempfile


class WorkdirError(ValueError):
    """The directory belongs to another run, or cannot be used."""


def atomic_write(path, write):
    """Calls write(tmp) on a temporary file beside `path`, then renames it over
    `path`: readers see the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Workdir:
    """The directory `path` of one run."""

    SETTINGS = "flags.json"

    def __init__(self, path):
        self.root = os.path.abspath(path)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def exists(self, *parts):
        return os.path.exists(self.path(*parts))

    def read_json(self, name, default=None):
        if not self.exists(name):
            return default
        with open(self.path(name)) as f:
            return json.load(f)

    def write_json(self, name, obj):
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
                f.write("\n")
        atomic_write(self.path(name), write)

    def save_model(self, model, name):
        """Saves `model` as NAME.keras, atomically."""
        atomic_write(self.path(f"{name}.keras"), model.save)
        return self.path(f"{name}.keras")

    def finish_phase(self, model, phase):
        """Saves the phase's model as PHASE.keras, then drops its backup: in
        that order, so a kill between the two loses nothing."""
        path = self.save_model(model, phase)
        shutil.rmtree(self.path("backup", phase), ignore_errors=True)
        if os.path.isdir(self.path("backup")) and not os.listdir(self.path("backup")):
            os.rmdir(self.path("backup"))
        return path

    # What a run writes here (glob patterns); --overwrite deletes these and
    # nothing else, flags.json last of all: it is replaced by the new run's, so a
    # kill half-way leaves a directory the same command can claim again.
    OWNED = ("natural.keras", "teacher.keras", "student.keras", "history.csv",
             "metrics.json", "logs", "backup", "export", "workers", "robustness-*.png",
             "evaluation-partial", "teacher-evaluation-partial", "cell.json",
             "cells", "study.csv", "study.json", "study.png",  # and a study's
             ".export.lock")

    # Keys of flags.json that record how the run was asked for without defining
    # it: why a setting was chosen (auto's reason names this machine's CPU), and
    # the --workdir as written (None for the default; "runs/x", "./runs/x" and
    # an absolute path name one directory). Settings differing only in them are
    # the same run; a resumed run keeps the values it started with.
    NOTES = ("precision_reason", "workdir")

    @classmethod
    def changed_settings(cls, a, b):
        """The sorted keys whose values differ between settings `a` and `b`
        (dicts), notes left out: empty when they define the same run."""
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in cls.NOTES)

    @classmethod
    def same_settings(cls, a, b):
        """Whether settings `a` and `b` (dicts) define the same run."""
        return not cls.changed_settings(a, b)

    LOCK = ".lock"

    def lock(self):
        """Holds an exclusive lock on this run (an flock on <root>/.lock) until
        `unlock` or the process ends, so that a second command on the same
        directory is refused instead of writing beside this one. Raises
        WorkdirError, naming the holder's pid, when another process holds it."""
        if getattr(self, "_lock_fd", None) is not None:
            return
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.path(self.LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirError(f"--workdir {self.root} is in use by another process (pid "
                               f"{holder}); wait for it to finish or stop it, then run the "
                               "command again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def unlock(self):
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def claim(self, settings, overwrite=False):
        """Makes this directory the home of the run with `settings` (a dict).

        A new or empty directory is claimed; one holding the same settings is
        resumed (returns True); one holding other settings raises WorkdirError,
        unless `overwrite`, which first deletes what the other run wrote (only
        that). A non-empty directory that is not a run is always refused.
        """
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise WorkdirError(f"--workdir {self.root} is a file, not a directory")
        try:
            previous = self.read_json(self.SETTINGS)
        except ValueError:
            raise WorkdirError(f"{self.path(self.SETTINGS)} is not valid JSON; is this a run "
                               "of ours? Choose another --workdir") from None
        # A .tmp-* file is what a write killed half-way left: not someone's file;
        # .lock is a run's lock file, .<name>.lock an export's.
        if previous is None and os.path.isdir(self.root) and \
                [n for n in os.listdir(self.root) if not n.startswith(".tmp-") and
                 not (n.startswith(".") and n.endswith(".lock"))]:
            raise WorkdirError(f"--workdir {self.root} is not empty and holds no run of "
                               "ours (no flags.json); choose another --workdir")
        same = previous is not None and self.same_settings(previous, settings)
        if previous is not None and not same:
            if not overwrite:
                changed = self.changed_settings(previous, settings)
                detail = ", ".join(f"--{k} was {previous.get(k)!r}, now {settings.get(k)!r}"
                                   for k in changed[:4])
                raise WorkdirError(f"--workdir {self.root} holds another run ({detail}); "
                                   "choose another --workdir, or pass --overwrite to replace it")
            for target in (t for name in self.OWNED for t in glob.glob(self.path(name))):
                if os.path.isdir(target):
                    shutil.rmtree(target)
                else:
                    os.remove(target)
        os.makedirs(self.root, exist_ok=True)
        if same:  # a resumed run keeps its notes (why auto chose what it chose)
            settings = dict(settings, **{k: previous[k] for k in self.NOTES if k in previous})
        self.write_json(self.SETTINGS, settings)
        return same
