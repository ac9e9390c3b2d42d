"""The labelled subset of semi-supervised fine-tuning: class-balanced, deterministic, nested."""
import numpy as np
import pytest

from src.eval.subset import SubsetError, balanced_subset, images_per_class


def cifar_like_labels(num_classes, per_class, seed=0):
    """Labels in a shuffled order, like CIFAR's batches."""
    return np.random.RandomState(seed).permutation(np.repeat(np.arange(num_classes), per_class))


@pytest.mark.parametrize("num_classes,percent,expected", [(10, 1, 50), (10, 10, 500), (100, 1, 5), (100, 10, 50)])
def test_cifar_sizes_are_exactly_the_percentage(num_classes, percent, expected):
    labels = cifar_like_labels(num_classes, 50000 // num_classes)
    idx = balanced_subset(labels, num_classes, percent, seed=0)
    assert len(idx) == 50000 * percent // 100
    assert np.bincount(labels[idx], minlength=num_classes).tolist() == [expected] * num_classes


def test_sorted_unique_and_deterministic():
    labels = cifar_like_labels(10, 100)
    a = balanced_subset(labels, 10, 10, seed=3)
    assert np.array_equal(a, balanced_subset(labels.copy(), 10, 10, seed=3))
    assert np.array_equal(a, np.unique(a)) and a.dtype == np.int64
    assert not np.array_equal(a, balanced_subset(labels, 10, 10, seed=4))


def test_pinned_draw():
    """The indices of a fixed small case, so that a change of the drawing (or of NumPy's RandomState
    stream) shows: 2 of each class's 6 images, the first two of RandomState(0)'s successive permutations."""
    labels = np.array([0, 1, 2] * 6)
    rs = np.random.RandomState(0)
    by_hand = sorted(np.flatnonzero(labels == c)[rs.permutation(6)[:2]].tolist() for c in range(3))
    assert sorted(sum(by_hand, [])) == [4, 6, 10, 11, 15, 17]
    assert balanced_subset(labels, 3, 34, seed=0).tolist() == [4, 6, 10, 11, 15, 17]


def test_one_percent_lies_inside_ten_percent():
    labels = cifar_like_labels(10, 1000)
    small, large = balanced_subset(labels, 10, 1, seed=7), balanced_subset(labels, 10, 10, seed=7)
    assert set(small.tolist()) < set(large.tolist())


def test_unequal_classes_still_give_the_same_count_per_class():
    labels = np.concatenate([np.zeros(300, int), np.ones(100, int), np.full(50, 2)])
    idx = balanced_subset(labels, 3, 10, seed=0)
    assert np.bincount(labels[idx]).tolist() == [15, 15, 15]


def test_at_least_one_image_per_class():
    assert images_per_class(200, 10, 1) == 1
    assert np.bincount(np.asarray([0, 1] * 20)[balanced_subset([0, 1] * 20, 2, 1, seed=0)]).tolist() == [1, 1]


def test_too_small_class_and_bad_percentage_are_one_line_errors():
    labels = np.concatenate([np.zeros(100, int), np.ones(3, int)])
    with pytest.raises(SubsetError, match="class 1 has 3 training images, fewer than the 5"):
        balanced_subset(labels, 2, 10, seed=0)
    with pytest.raises(SubsetError, match="class 2 has 0"):
        balanced_subset(labels, 3, 10, seed=0)
    with pytest.raises(SubsetError, match=r"\(0, 100\]"):
        balanced_subset(labels, 2, 0, seed=0)
