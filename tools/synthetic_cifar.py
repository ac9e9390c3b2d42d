"""Synthetic CIFAR data in torchvision's exact on-disk formats, for runs and measurements that do not need
the real data sets (the tests, benchmarks/): `write_cifar10(root)` writes `root/cifar-10-batches-py/`,
which `--data_path root` reads.

    python tools/synthetic_cifar.py data/synthetic --dataset cifar10 --n_train 500 --n_test 100

Images are random but class-dependent (a class colour and a class stripe pattern, plus noise), so a
classifier can learn something from them.
"""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.runtime.cli import ArgumentParser, fail  # noqa: E402

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
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder to write cifar-10-batches-py/ or cifar-100-python/ into")
    parser.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10",
                        help="whose format, classes and folder name to write (default: cifar10)")
    parser.add_argument("--n_train", type=int, default=None,
                        help="training images (CIFAR-10: a multiple of 5, its five batches; default: 100 for cifar10, "
                             "200 for cifar100)")
    parser.add_argument("--n_test", type=int, default=None, help="test images (default: 20 for cifar10, 100 for cifar100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and labels (default: 0)")
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    for name, n in sizes.items():
        if n < 1 or (name == "n_train" and args.dataset == "cifar10" and n % 5):
            fail(f"--{name} {n}: give a positive number of images" + (
                ", a multiple of 5 for cifar10 (its five training batches)" if name == "n_train" and
                args.dataset == "cifar10" else ""))
    try:
        if args.dataset == "cifar10":
            sizes = {"n_train_per_batch": sizes.pop("n_train") // 5, **sizes} if "n_train" in sizes else sizes
            folder = write_cifar10(args.root, seed=args.seed, **sizes)
        else:
            folder = write_cifar100(args.root, seed=args.seed, **sizes)
    except OSError as e:
        fail(f"{args.root}: cannot write ({e.strerror})")
    print(f"wrote {folder} (synthetic {args.dataset}); --data_path {args.root} reads it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
