"""The labelled subset of semi-supervised fine-tuning: the same number of images from every class,
chosen from a seed.

The released `eval_semisup.py` downloads SimCLR's fixed ImageNet lists (1 % and 10 % of the training
images). CIFAR has no such lists, so the subset is drawn here: `round(percent / 100 * N / C)` images of
each of the `C` classes (at least one), which is exactly 1 % or 10 % of CIFAR-10/100 (500 or 5,000
images). The draw uses NumPy's `RandomState`, whose stream NumPy keeps fixed across versions, so a seed
names the same images on any machine; it depends only on the labels, the percentage and the seed (not on
the training seed or the number of processes). Per class, the images are the first `k` of one
permutation that does not depend on `k`, so with the same seed the 1 % subset lies inside the 10 % one.
"""
import numpy as np


class SubsetError(ValueError):
    """A subset that cannot be drawn; the message is one line."""


def images_per_class(num_images, num_classes, percent):
    """How many images of each class a `percent` % class-balanced subset takes (at least one)."""
    if not 0 < percent <= 100:
        raise SubsetError(f"the labelled percentage must be in (0, 100], got {percent}")
    return max(1, int(round(num_images * percent / 100.0 / num_classes)))


def balanced_subset(labels, num_classes, percent, seed):
    """Sorted int64 indices into `labels` of a class-balanced `percent` % subset drawn with `seed`.

    Raises SubsetError when a class has fewer images than the subset takes from each class."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    k = images_per_class(len(labels), num_classes, percent)
    rng = np.random.RandomState(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise SubsetError(f"class {c} has {len(members)} training images, fewer than the {k} per class "
                              f"that a class-balanced {percent:g} % subset of {len(labels)} images takes")
        chosen.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(chosen))
