"""Loading the released code's golden vectors for the tests (tests/data/golden/README.md).
The environment variable UNMIX_GOLDEN names another copy."""
import os
from pathlib import Path

import torch

GOLDEN = Path(os.environ.get("UNMIX_GOLDEN")
              or Path(__file__).resolve().parent / "data" / "golden" / "unmix_swav_golden.pt")


def load_golden():
    if not GOLDEN.exists():
        raise FileNotFoundError(f"golden vectors not found at {GOLDEN} (UNMIX_GOLDEN names another copy)")
    return torch.load(GOLDEN, weights_only=True)
