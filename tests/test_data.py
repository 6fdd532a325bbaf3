import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ardir_tf import data
from conftest import write_npz


def test_digits_split_is_stratified_seeded_and_in_range():
    (x_train, y_train), (x_test, y_test) = data.digits(seed=0)
    assert x_train.shape[1:] == (8, 8, 1) and x_train.dtype == np.float32
    assert len(x_train) + len(x_test) == 1797
    assert 0.0 == min(x_train.min(), x_test.min()) and max(x_train.max(), x_test.max()) == 1.0
    # Stratified: each class's share of the test set is within one example of 20%.
    for c in range(10):
        n = np.sum(y_train == c) + np.sum(y_test == c)
        assert abs(np.sum(y_test == c) - 0.2 * n) <= 1
    (x2, _), _ = data.digits(seed=0)
    (x3, _), _ = data.digits(seed=1)
    np.testing.assert_array_equal(x_train, x2)
    assert not np.array_equal(x_train, x3)


def test_pipeline_batches_with_the_given_size():
    x = np.zeros((10, 8, 8, 1), np.float32)
    y = np.arange(10, dtype=np.int32)
    sizes = [int(b[0].shape[0]) for b in data.pipeline(x, y, 4)]
    assert sizes == [4, 4, 2]
    shuffled = np.concatenate([b[1].numpy() for b in data.pipeline(x, y, 4, shuffle=True)])
    assert sorted(shuffled) == list(range(10))


def test_npz_loads_as_pixels_with_a_channel(tmp_path):
    d = data.load(write_npz(tmp_path / "a.npz"), batch_size=8)
    assert d.input_shape == (6, 6, 1) and d.num_classes == 4 and d.num_train == 20
    assert d.class_names == ("0", "1", "2", "3")
    x, y = next(iter(d.test))
    assert x.dtype == tf.float32 and 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1


@pytest.mark.parametrize("overrides,message", [
    (dict(y_test=None), "missing key\\(s\\) y_test"),
    (dict(x_train=np.zeros((20, 6), np.uint8)), "x_train must have rank 3"),
    (dict(y_train=np.zeros((20, 2), np.int64)), "y_train must be one integer label per image"),
    (dict(y_test=np.full(8, 9)), "labels outside \\[0, 3\\]"),
    (dict(y_train=np.linspace(0, 3, 20)), "y_train must hold integers"),
    (dict(x_test=np.full((8, 6, 6), 2.0)), "finite pixels in \\[0, 1\\]"),
    (dict(x_test=np.full((8, 5, 5), 7, np.uint8)), "test images are"),
    # Silently wrong before: labels from 1 (class 0 empty), channels-first images,
    # a 0/1 uint8 mask read as pixels of 0 and 1/255.
    (dict(y_train=np.arange(20) % 4 + 1, y_test=np.arange(8) % 4 + 1),
     "no example of class 0 of 0..4;.*subtract 1"),
    (dict(x_train=np.full((20, 3, 6, 6), 9, np.uint8)), "looks channels-first"),
    (dict(x_train=np.ones((20, 6, 6), np.uint8)), "uint8 x_train holds only 0 and 1"),
    (dict(x_train=np.uint8(3)), "must be arrays of images and labels"),
    (dict(x_train=np.zeros((0, 6, 6), np.uint8), y_train=np.zeros(0, np.int64)),
     "x_train is empty"),
])
def test_bad_npz_files_say_what_is_wrong(tmp_path, overrides, message):
    with pytest.raises(data.DataError, match=message):
        data.load(write_npz(tmp_path / "bad.npz", **overrides), batch_size=8)


def test_npz_class_names_are_read_and_checked(tmp_path):
    named = write_npz(tmp_path / "named.npz", class_names=np.array(["a", "b", "c", "d"]))
    assert data.load(named, batch_size=8).class_names == ("a", "b", "c", "d")
    with pytest.raises(data.DataError, match="one name per class \\(4\\)"):
        data.load(write_npz(tmp_path / "bad.npz", class_names=np.array(["a", "b"])), 8)


def test_digits_class_names_are_the_digits():
    assert data.load("digits", 8).class_names == tuple("0123456789")


def test_tfds_class_names_come_from_the_label_feature():
    class Info:
        def __init__(self, names):
            self.features = {"label": tfds.features.ClassLabel(names=names)}

    assert data._tfds_class_names(Info(["cat", "dog"]), 2) == ("cat", "dog")
    assert data._tfds_class_names(Info(["cat", "dog"]), 3) == ("0", "1", "2")
    assert data._tfds_class_names(object(), 2) == ("0", "1")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short"], ids=["empty", "truncated"])
def test_an_empty_or_truncated_npz_is_a_data_error(tmp_path, content):
    (tmp_path / "cut.npz").write_bytes(content)
    with pytest.raises(data.DataError, match="cannot read"):
        data.load(f"npz:{tmp_path / 'cut.npz'}", 8)


def test_a_single_array_file_is_not_an_npz(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(data.DataError, match="single array"):
        data.load(f"npz:{tmp_path / 'x.npy'}", 8)


def test_unknown_names_and_missing_files():
    with pytest.raises(data.DataError, match="unknown dataset 'imagenet'.*cifar10"):
        data.load("imagenet", 8)
    with pytest.raises(data.DataError, match="no file"):
        data.load("npz:/no/such/file.npz", 8)


def test_tfds_path_with_mock_data_and_augmentation():
    with tfds.testing.mock_data(num_examples=16):
        d = data.load("cifar10", batch_size=8)
        x, y = next(iter(d.train))
    assert d.input_shape == (32, 32, 3) and d.num_classes == 10
    assert len(d.class_names) == 10  # mocked metadata names the classes "0".."9"
    assert x.shape == (8, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    assert 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1


def test_augmentation_varies_keeps_the_shape_and_repeats_for_a_seed():
    x = tf.reshape(tf.range(4 * 4, dtype=tf.float32), (4, 4, 1))
    augment = data._augmenter(2, True, (4, 4, 1))
    outs = [augment(x, 0, tf.constant([i, 7], tf.int64))[0].numpy() for i in range(20)]
    assert all(o.shape == (4, 4, 1) for o in outs)
    assert len({o.tobytes() for o in outs}) > 5
    np.testing.assert_array_equal(augment(x, 0, tf.constant([3, 7], tf.int64))[0], outs[3])


def epochs_of(d, n=2):
    return [np.concatenate([b[0].numpy().ravel() for b in d.train]) for _ in range(n)]


def test_a_seed_gives_the_same_augmented_epochs_and_epochs_differ():
    with tfds.testing.mock_data(num_examples=32):
        a = epochs_of(data.load("cifar10", 8, seed=4))
        b = epochs_of(data.load("cifar10", 8, seed=4))
        c = epochs_of(data.load("cifar10", 8, seed=5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], c[0])


def test_the_digits_test_set_does_not_depend_on_the_seed():
    def test_set(seed):
        batches = list(data.load("digits", 64, seed=seed).test)
        return (np.concatenate([x.numpy() for x, _ in batches]),
                np.concatenate([y.numpy() for _, y in batches]))

    (x0, y0), (x9, y9) = test_set(0), test_set(9)
    np.testing.assert_array_equal(x0, x9)  # the same images, in the same order
    np.testing.assert_array_equal(y0, y9)
    assert len(y0) == 360


def test_unprepared_tfds_set_fails_fast(tmp_path):
    with pytest.raises(data.DataError, match="not prepared.*--download"):
        data.load("mnist", 8, data_dir=str(tmp_path))
