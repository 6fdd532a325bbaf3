"""Data: the embedded digits data set and tf.data pipelines.

`digits()` is scikit-learn's handwritten digits (1,797 real 8x8 images, 16 grey
levels, 10 classes), shipped inside scikit-learn, so it works offline. Pixels
are scaled to [0, 1]; the train/test split is stratified and fixed by a seed.

Left out here (the command-line issue adds them): tfds data sets and user .npz
files.
"""

import numpy as np
import tensorflow as tf

DIGITS_SHAPE = (8, 8, 1)


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


def pipeline(x, y, batch_size, shuffle=False, seed=0):
    """A tf.data.Dataset of (x, y) batches: cached, shuffled (each epoch anew,
    reproducibly for a seed), batched with the global batch size, prefetched."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


def digits_datasets(batch_size=64, seed=0):
    """(train_ds, test_ds) pipelines over `digits(seed=seed)`; train shuffled."""
    (x_train, y_train), (x_test, y_test) = digits(seed=seed)
    return (pipeline(x_train, y_train, batch_size, shuffle=True, seed=seed),
            pipeline(x_test, y_test, batch_size))
