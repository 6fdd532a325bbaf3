"""What a killed evaluation keeps, so that the same evaluation run again resumes
(evaluate.evaluate's `resume_dir`): each finished step (an attack, the sanity
checks) and each finished batch of an attack, under a key naming everything its
result depends on.
"""

import glob
import hashlib
import json
import os

import numpy as np

from ardir_tf.workdir import atomic_write


class Checkpoints:
    """Each finished step of an evaluation (an attack, the sanity checks), kept in
    `directory` as `<step>.npz` under a key naming everything its result
    depends on (the model's weights, the images, the attack's settings, the
    points it ran on, the seed, the evaluation's rules): a killed evaluation
    run again reuses the steps it finished, and a changed one recomputes them.
    None: keeps nothing."""

    def __init__(self, directory, model, x, y, seed, scoring=None):
        weights = getattr(model, "weights", None)
        self.directory = directory if directory and weights else None
        if self.directory:
            digest = hashlib.sha1()
            for w in weights:
                digest.update(np.ascontiguousarray(np.asarray(w)).tobytes())
            digest.update(np.ascontiguousarray(x).tobytes())
            digest.update(np.ascontiguousarray(y).tobytes())
            # scoring: the evaluation's rules (evaluate.SCORING); a step kept under
            # other rules (an older version's) is computed again.
            self.base = {"data_and_weights": digest.hexdigest(), "seed": int(seed),
                         "scoring": scoring}

    def _key(self, key):
        return json.dumps({**self.base, **key}, sort_keys=True, default=repr)

    def parts(self, step, key, batch_size):
        """A `Parts` keeping step's finished batches (None: keeps nothing)."""
        if not self.directory:
            return None
        return Parts(self.directory, step, self._key({**key, "batch_size": batch_size}))

    def __call__(self, step, key, compute):
        """compute() -> {name: array or JSON-able value}, or the stored one.
        Once stored, the step's batches kept by `parts` are deleted."""
        if not self.directory:
            return compute()
        key = self._key(key)
        path = os.path.join(self.directory, f"{step}.npz")
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["key"]) == key:
                    return {k: (json.loads(str(stored[k])) if k.startswith("json_")
                                else stored[k]) for k in stored.files if k != "key"}
        except (OSError, ValueError, KeyError):
            pass  # none yet, or unreadable: compute it
        out = compute()

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), **{
                    k: (np.array(json.dumps(v)) if k.startswith("json_") else np.asarray(v))
                    for k, v in out.items()})
        atomic_write(path, write)
        for part in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.batch-*.npz")):
            os.remove(part)
        return out


class Parts:
    """The finished batches of one step of an evaluation, each kept as
    `<step>.batch-<i>.npz` under the step's key: an attack killed halfway
    resumes at its first unfinished batch. A batch's random draws (random
    starts, Square's proposals) depend on the seed, the attack's name and the
    batch alone (evaluate's runner), so the resumed attack's result is the
    uninterrupted one's."""

    def __init__(self, directory, step, key):
        self.directory, self.step, self.key = directory, step, key
        self.kept_seconds = 0.0  # what the batches read back took when computed

    def _path(self, i):
        return os.path.join(self.directory, f"{self.step}.batch-{i}.npz")

    def get(self, i):
        """Batch i's arrays, or None if not kept under this key."""
        try:
            with np.load(self._path(i), allow_pickle=False) as stored:
                if str(stored["key"]) == self.key:
                    self.kept_seconds += float(stored["seconds"])
                    return [stored[f"a{j}"] for j in range(len(stored.files) - 2)]
        except (OSError, ValueError, KeyError):
            pass
        return None

    def put(self, i, arrays, seconds):
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(self.key), seconds=np.array(float(seconds)),
                         **{f"a{j}": np.asarray(a) for j, a in enumerate(arrays)})
        atomic_write(self._path(i), write)


def kept_seconds(parts):
    return parts.kept_seconds if parts is not None else 0.0


def todo_key(todo):
    return hashlib.sha1(np.ascontiguousarray(todo, np.int64).tobytes()).hexdigest()
