import numpy as np

from ardir_tf import data


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
