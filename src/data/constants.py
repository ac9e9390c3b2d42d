"""Per-data-set constants, in one place: the normalisation each part of the released code uses.
"""


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)


PRETRAIN_STD = (0.2023, 0.1994, 0.2010)


EVAL_STD = (0.2470, 0.2435, 0.2616)
