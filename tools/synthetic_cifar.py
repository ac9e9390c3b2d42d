"""Synthetic CIFAR data in torchvision's exact on-disk formats, for runs and measurements that do not need
the real data sets (the tests, benchmarks/): `write_cifar10(root)` writes `root/cifar-10-batches-py/`,
which `--data_path root` reads. From the command line, to try the CIFAR paths without the real data:

    python tools/synthetic_cifar.py cifar100 /tmp/c100 [--train 1000 --test 200]

Images are random but class-dependent (a class colour and a class stripe pattern, plus noise), so a
classifier can learn something from them.
"""
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]

CIFAR100_COARSE = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]

def class_images(labels, num_classes, rng, size=32, noise=24.0):
    """uint8 images N x size x size x 3 whose colour and stripe pattern depend on the label."""
    labels = np.asarray(labels)
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        c = int(c)
        hue = c / num_classes
        base = 128 + 80 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
        angle = np.pi * ((c * 3) % 8) / 8
        freq = 2 + (c % 3)
        stripes = np.cos(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        img = base[None, None, :] + 40 * stripes[..., None] \
            + rng.normal(0, noise, size=(size, size, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _balanced_labels(n, num_classes, rng):
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    return labels


def _to_rows(images):
    """N x 32 x 32 x 3 (HWC) -> N x 3072 uint8, channel-major rows (CIFAR's on-disk order)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _filenames(labels, names, start):
    return [f"{names[int(c)]}_s_{start + i:06d}.png" for i, c in enumerate(labels)]


def write_cifar10(root, n_train_per_batch=20, n_test=20, seed=0):
    """Write `root/cifar-10-batches-py/` in torchvision's exact format; returns that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [("data_batch_%d" % (b + 1), "training batch %d of 5" % (b + 1), n_train_per_batch)
               for b in range(5)] + [("test_batch", "testing batch 1 of 1", n_test)]
    count = 0
    for name, batch_label, n in batches:
        labels = _balanced_labels(n, 10, rng)
        images = class_images(labels, 10, rng)
        _dump({"batch_label": batch_label,
               "labels": [int(c) for c in labels],
               "data": _to_rows(images),
               "filenames": _filenames(labels, CIFAR10_CLASSES, count)}, folder / name)
        count += n
    _dump({"num_cases_per_batch": n_train_per_batch, "label_names": list(CIFAR10_CLASSES),
           "num_vis": 3072}, folder / "batches.meta")
    return folder


def write_cifar100(root, n_train=200, n_test=100, seed=0):
    """Write `root/cifar-100-python/{train,test,meta}` in torchvision's exact format; returns it."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, batch_label, n in [("train", "training batch 1 of 1", n_train),
                                 ("test", "testing batch 1 of 1", n_test)]:
        labels = _balanced_labels(n, 100, rng)
        images = class_images(labels, 100, rng)
        _dump({"filenames": _filenames(labels, CIFAR100_CLASSES, count),
               "batch_label": batch_label,
               "fine_labels": [int(c) for c in labels],
               "coarse_labels": [int(c) % 20 for c in labels],  # not the real mapping
               "data": _to_rows(images)}, folder / name)
        count += n
    _dump({"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": list(CIFAR100_COARSE)},
          folder / "meta")
    return folder


def write_image_folder(root, n_per_class_train, n_per_class_test, classes=("cat", "dog", "frog"),
                       size=32, fmt="jpg", seed=0):
    """Write `root/{train,test}/<class>/NNNN.<fmt>` synthetic images; returns `root`.

    `size` is an int (square) or `(width, height)`.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    w, h = (size, size) if isinstance(size, int) else size
    for split, n in (("train", n_per_class_train), ("test", n_per_class_test)):
        for idx, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            images = class_images(np.full(n, idx), len(classes), rng, size=max(w, h))
            for i, img in enumerate(images):
                Image.fromarray(img[:h, :w]).save(d / f"{i:04d}.{fmt}")
    return root



def main(argv=None):
    import argparse
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src.runtime.cli import ArgumentParser, fail
    p = ArgumentParser(description="Synthetic CIFAR-10/100 in torchvision's pickled format (class-dependent "
                       "random images), for trying the CIFAR paths without the real data.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", choices=["cifar10", "cifar100"])
    p.add_argument("root", help="folder to write cifar-10-batches-py/ or cifar-100-python/ into")
    p.add_argument("--train", type=int, default=1000, help="training images (cifar10: a multiple of 5 batches)")
    p.add_argument("--test", type=int, default=200, help="test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the images")
    a = p.parse_args(argv)
    classes = 10 if a.dataset == "cifar10" else 100
    if a.train < classes or a.test < 1 or (a.dataset == "cifar10" and a.train % 5):
        fail(f"--train {a.train} --test {a.test}: {a.dataset} needs at least {classes} training images"
             f"{' in 5 equal batches (a multiple of 5)' if classes == 10 else ''} and 1 test image")
    if a.dataset == "cifar10":
        folder = write_cifar10(a.root, a.train // 5, a.test, a.seed)
    else:
        folder = write_cifar100(a.root, a.train, a.test, a.seed)
    print(f"wrote {folder}: {a.train} training and {a.test} test images of {classes} classes; "
          f"use --data_path {a.root} (the scripts' DATASET_PATH={a.root})")


if __name__ == "__main__":
    main()
