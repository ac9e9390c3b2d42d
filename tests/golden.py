"""Loading the released code's golden vectors (../shared/golden) for the tests."""
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "unmix_swav_golden.pt"


def load_golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden vectors not found at {GOLDEN} (../shared is absent)")
    return torch.load(GOLDEN, weights_only=True)
