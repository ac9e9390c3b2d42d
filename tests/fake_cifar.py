"""The synthetic CIFAR data of the tests (tools/synthetic_cifar.py), and where the small real-image set is."""
from pathlib import Path

from tools.synthetic_cifar import (  # noqa: F401
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    write_cifar10,
    write_cifar100,
    write_image_folder,
)

# 400 real CIFAR-10 images (JPEG): train/<class>/ 30 each, test/<class>/ 10 each (tests/data/README.md)
CIFAR10_JPG_SMALL = Path(__file__).resolve().parent / "data" / "cifar10_jpg_small"
