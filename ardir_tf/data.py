"""Data: the embedded digits, tensorflow-datasets sets, user .npz files; tf.data pipelines.

`load(name, batch_size, ...)` returns a `Data` with train and test pipelines of
(pixels in [0, 1] as float32 [B, H, W, C], integer labels [B]):

    digits          scikit-learn's 1,797 real 8x8 digits (shipped inside it, so
                    offline); one fixed stratified 80/20 split, whatever the
                    seed, so every run is tested on the same 360 digits
    mnist, fashion_mnist, cifar10, cifar100, svhn_cropped
                    tensorflow-datasets; never downloaded unless asked
                    (download=True): an unprepared set fails at once with how
                    to prepare it, instead of minutes of network retries
    npz:PATH        your arrays: keys x_train, y_train, x_test, y_test; images
                    [N, H, W] or [N, H, W, C], uint8 0-255 or float in [0, 1];
                    integer labels from 0; optional class_names (one string
                    per class, e.g. np.array(["cat", "dog"]))

Pipelines cache the decoded images, shuffle each epoch (reproducibly for a
seed), augment (random crop after padding, and horizontal flips where the
classes allow it; stateless random ops seeded per example, so a seed gives the
same crops even with parallel mapping), batch with the global batch size, and
prefetch.
"""

import dataclasses
import os
import zipfile

import numpy as np
import tensorflow as tf

DIGITS_SHAPE = (8, 8, 1)


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    shape: tuple
    num_classes: int
    pad: int          # random-crop padding (pixels)
    flip: bool        # horizontal flips keep the class


TFDS = {
    "mnist": TfdsSpec((28, 28, 1), 10, 2, False),
    "fashion_mnist": TfdsSpec((28, 28, 1), 10, 2, True),
    "cifar10": TfdsSpec((32, 32, 3), 10, 4, True),
    "cifar100": TfdsSpec((32, 32, 3), 100, 4, True),
    # Digits: a flipped 2 is not a 2.
    "svhn_cropped": TfdsSpec((32, 32, 3), 10, 4, False),
}
NAMES = ("digits", *TFDS, "npz:PATH")


class DataError(ValueError):
    """A data set that cannot be loaded as asked; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Data:
    name: str
    train: tf.data.Dataset
    test: tf.data.Dataset
    input_shape: tuple
    num_classes: int
    num_train: int    # -1 when unknown (mocked tfds)
    num_test: int
    class_names: tuple = ()   # one name per class; "0", "1", ... when the data has none


def check_name(name):
    """Raises DataError unless `name` names a data set this module loads."""
    if name == "digits" or name in TFDS:
        return
    if name.startswith("npz:"):
        if not os.path.isfile(name[4:]):
            raise DataError(f"--dataset={name}: no file {name[4:]!r}")
        return
    raise DataError(f"unknown dataset {name!r}; valid: {', '.join(NAMES)}")


def digits(test_fraction=0.2, seed=0):
    """The digits data as ((x_train, y_train), (x_test, y_test)).

    x: float32 [N, 8, 8, 1] in [0, 1]; y: int32 [N]. Same split for the same seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return (x_train, y_train), (x_test, y_test)


def _augmenter(pad, flip, shape):
    """augment(x, y, seed) with stateless ops: the same seed, the same crop."""
    def augment(x, y, seed):
        if pad:
            x = tf.image.pad_to_bounding_box(x, pad, pad, shape[0] + 2 * pad,
                                             shape[1] + 2 * pad)
            x = tf.image.stateless_random_crop(x, shape, seed=seed)
        if flip:
            x = tf.image.stateless_random_flip_left_right(x, seed=seed[::-1])
        return x, y
    return augment


def _batched(ds, batch_size, shuffle, seed, augment, buffer):
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if augment is not None:
        # A pair of seeds per example, new each epoch, fixed by `seed`.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, pair: augment(xy[0], xy[1], pair),
            num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


def pipeline(x, y, batch_size, shuffle=False, seed=0, augment=None):
    """A tf.data.Dataset of (x, y) batches from arrays: cached, shuffled (each
    epoch anew, reproducibly for a seed), augmented (a function of (x, y)),
    batched with the global batch size, prefetched."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return _batched(ds, batch_size, shuffle, seed, augment, len(x))


def digits_datasets(batch_size=64, seed=0):
    """(train_ds, test_ds) pipelines over `digits(seed=seed)`; train shuffled."""
    (x_train, y_train), (x_test, y_test) = digits(seed=seed)
    return (pipeline(x_train, y_train, batch_size, shuffle=True, seed=seed),
            pipeline(x_test, y_test, batch_size))


def load_npz(path):
    """((x_train, y_train), (x_test, y_test), num_classes) from a user's .npz,
    checked: every problem raises DataError naming the key and what is expected."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # empty, truncated
        raise DataError(f"cannot read {path!r} as a .npz file: {err or type(err).__name__}") \
            from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise DataError(f"{path!r} holds a single array; expected a .npz archive "
                        "(np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))")
    keys = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in keys if k not in arrays.files]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; expected keys "
                        f"{', '.join(keys)} (found: {', '.join(arrays.files) or 'none'})")
    out = []
    for split in ("train", "test"):
        try:
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        # Object arrays, corrupt or truncated members.
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: cannot read x_{split}/y_{split} as numeric arrays: "
                            f"{err}") from None
        if x.ndim == 0 or y.ndim == 0:
            raise DataError(f"{path}: x_{split} and y_{split} must be arrays of images and "
                            f"labels, got a single value")
        if len(x) == 0:
            raise DataError(f"{path}: x_{split} is empty")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise DataError(f"{path}: x_{split} must have rank 3 [N, H, W] or 4 [N, H, W, C], "
                            f"got shape {x.shape}")
        if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
            raise DataError(f"{path}: x_{split} of shape {x.shape} looks channels-first "
                            "[N, C, H, W]; images are [N, H, W, C]: store "
                            "np.transpose(x, (0, 2, 3, 1))")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{path}: y_{split} must be one integer label per image, shape "
                            f"({len(x)},), got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split} must hold integers, got dtype {y.dtype}")
        if x.dtype == np.uint8:
            if x.max() <= 1:
                raise DataError(f"{path}: uint8 x_{split} holds only 0 and 1, which would be "
                                "pixels of 0 and 1/255; store 0-255 (x * 255) or floats in "
                                "[0, 1]")
            x = x.astype(np.float32) / 255.0
        elif np.issubdtype(x.dtype, np.floating):
            if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
                raise DataError(f"{path}: float x_{split} must be finite pixels in [0, 1], "
                                f"got values in [{x.min()}, {x.max()}]; store uint8 0-255 "
                                "or scale to [0, 1]")
            x = x.astype(np.float32)
        else:
            raise DataError(f"{path}: x_{split} must be uint8 (0-255) or float ([0, 1]), "
                            f"got dtype {x.dtype}")
        out.append((x, y.astype(np.int32)))
    (x_train, y_train), (x_test, y_test) = out
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: train images are {x_train.shape[1:]} but test images "
                        f"are {x_test.shape[1:]}")
    num_classes = int(y_train.max()) + 1
    for split, y in (("train", y_train), ("test", y_test)):
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{path}: y_{split} has labels outside [0, {num_classes - 1}] "
                            f"(the classes seen in y_train): min {y.min()}, max {y.max()}")
    if num_classes < 2:
        raise DataError(f"{path}: y_train has a single class; need at least 2")
    absent = sorted(set(range(num_classes)) - set(np.unique(y_train).tolist()))
    if absent:
        raise DataError(f"{path}: y_train has no example of class {', '.join(map(str, absent[:5]))}"
                        f"{', ...' if len(absent) > 5 else ''} of 0..{num_classes - 1}; labels "
                        "must be 0..K-1 with every class present"
                        + (" (labels from 1? subtract 1)" if absent == [0] else ""))
    return (x_train, y_train), (x_test, y_test), num_classes


def _numbered(num_classes):
    return tuple(str(i) for i in range(num_classes))


def npz_class_names(path, num_classes):
    """The optional `class_names` array of a .npz (one string per class), else
    "0", "1", ...; a `class_names` of the wrong length raises DataError."""
    with np.load(path, allow_pickle=False) as arrays:
        if "class_names" not in arrays.files:
            return _numbered(num_classes)
        names = arrays["class_names"]
    if names.ndim != 1 or len(names) != num_classes:
        raise DataError(f"{path}: class_names must hold one name per class ({num_classes}), "
                        f"got shape {names.shape}")
    return tuple(str(n) for n in names)


def _tfds_class_names(info, num_classes):
    try:
        names = tuple(info.features["label"].names)
    except (KeyError, AttributeError):
        names = ()
    return names if len(names) == num_classes else _numbered(num_classes)


def _load_tfds(name, data_dir, download):
    import tensorflow_datasets as tfds

    try:
        splits, info = tfds.load(name, split=["train", "test"], data_dir=data_dir,
                                 as_supervised=True, with_info=True, download=download)
    except AssertionError as err:
        # download=False on an unprepared set: tfds asserts at once.
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise DataError(
            f"dataset {name!r} is not prepared in {where}. On a machine with internet, "
            f"run with --download (or: python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\") and pass "
            f"--data_dir=DIR here. ({str(err).splitlines()[0][:200]})") from None
    return splits, info


def load(name, batch_size, seed=0, data_dir=None, download=False, augment=True):
    """The data set `name` (see the module docstring) as a `Data`.

    Args:
      name: "digits", a tfds name of TFDS, or "npz:PATH".
      batch_size: global batch size of both pipelines.
      seed: shuffling and augmentation seed (the digits split is fixed).
      data_dir: where tfds keeps prepared data (None: its default).
      download: let tfds download and prepare a missing set (needs internet).
      augment: random crops and flips on the training pipeline (not digits).

    Raises:
      DataError: unknown name, unreadable or malformed npz, unprepared tfds set.
    """
    check_name(name)
    if name == "digits":
        (x_train, y_train), (x_test, y_test) = digits(seed=0)
        return Data(name, pipeline(x_train, y_train, batch_size, True, seed),
                    pipeline(x_test, y_test, batch_size), DIGITS_SHAPE, 10,
                    len(x_train), len(x_test), _numbered(10))
    if name.startswith("npz:"):
        (x_train, y_train), (x_test, y_test), classes = load_npz(name[4:])
        return Data(name, pipeline(x_train, y_train, batch_size, True, seed),
                    pipeline(x_test, y_test, batch_size), tuple(x_train.shape[1:]),
                    classes, len(x_train), len(x_test), npz_class_names(name[4:], classes))

    spec = TFDS[name]
    (train, test), info = _load_tfds(name, data_dir, download)

    def to_pixels(x, y):
        return tf.cast(x, tf.float32) / 255.0, tf.cast(y, tf.int32)

    train = train.map(to_pixels, num_parallel_calls=tf.data.AUTOTUNE)
    test = test.map(to_pixels, num_parallel_calls=tf.data.AUTOTUNE)
    sizes = {k: v.num_examples for k, v in info.splits.items()}  # empty when mocked
    aug = _augmenter(spec.pad, spec.flip, spec.shape) if augment else None
    return Data(name, _batched(train, batch_size, True, seed, aug, 10_000),
                _batched(test, batch_size, False, seed, None, 0), spec.shape,
                spec.num_classes, sizes.get("train", -1), sizes.get("test", -1),
                _tfds_class_names(info, spec.num_classes))
