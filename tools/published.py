"""The published linear-evaluation top-1 accuracies (%) of the released Un-Mix + SwAV CIFAR code.

Source: the "Results from this repo" tables of the released README:
ResNet-18 (Bottleneck variant), batch size 128, 1 GPU, linear evaluation with the released protocol
(best test top-1 over 100 epochs). Keyed by data set, then method, then pretraining epochs.
"""

PUBLISHED = {
    "cifar10": {
        "SwAV": {200: 84.9, 400: 88.8, 600: 90.1, 800: 90.8, 1000: 91.5},
        "Un-Mix": {200: 86.8, 400: 90.4, 600: 92.0, 800: 92.5, 1000: 93.0},
    },
    "cifar100": {
        "SwAV": {200: 57.9, 400: 64.5, 600: 65.7, 800: 67.2, 1000: 67.5},
        "Un-Mix": {200: 61.1, 400: 66.1, 600: 68.5, 800: 69.1, 1000: 69.9},
    },
}

METHODS = ("SwAV", "Un-Mix")
DATASETS = ("cifar10", "cifar100")


def published_top1(method, dataset, epochs):
    """Published top-1 (%) for (method, data set, pretraining epochs), or None when the table has no such row."""
    try:
        return PUBLISHED[dataset][method][int(epochs)]
    except (KeyError, TypeError, ValueError):
        return None
