"""Loading the released code's golden vectors for the tests (UNMIX_GOLDEN names another copy)."""
import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(os.environ.get("UNMIX_GOLDEN")
              or Path(__file__).resolve().parents[2] / "shared" / "golden" / "unmix_swav_golden.pt")


def load_golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden vectors not found at {GOLDEN}")
    return torch.load(GOLDEN, weights_only=True)
