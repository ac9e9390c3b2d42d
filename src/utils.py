"""Small helpers shared by the entry scripts: boolean flags, running averages, seeding."""
import argparse
import random
import sys

import numpy as np
import torch

_TRUE = {"on", "true", "1"}
_FALSE = {"off", "false", "0"}


def bool_flag(s):
    """Parse a boolean command-line value the released way: on/true/1 and off/false/0, any case."""
    if isinstance(s, bool):
        return s
    if s.lower() in _TRUE:
        return True
    if s.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {s!r} (use on/true/1 or off/false/0)")


class AverageMeter:
    """Running average of a scalar (value of the last update, average of all)."""

    def __init__(self):
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def fix_random_seeds(seed):
    """Seed torch (CPU and CUDA), NumPy's global RNG and Python's `random`, as the released code does."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def fail(msg):
    """Bad input: one line on stderr, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)
