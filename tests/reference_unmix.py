"""The released Un-Mix mixing as written (released `main_swav_unmix.py`, `train`): Python numbers, slicing
by host integers. src/method/unmix.py mixes on the device from a staged row instead; tests check that it
gives these very tensors."""
from typing import List, Optional, Sequence, Tuple

import torch

from src.method.unmix import UnmixDraws, region_box


def mix_with_reversed(x: torch.Tensor, lam: float, global_mix: bool,
                      center: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, float]:
    """Mix the batch `x` with itself reversed along the batch.

    Global: lam * x + (1 - lam) * reversed. Region: the box from `region_box` is pasted from the reversed
    batch and lam is replaced by the kept area fraction, which the caller must use from then on.
    Returns (mixed, lam actually used)."""
    reversed_x = torch.flip(x, dims=[0])
    if global_mix:
        return lam * x + (1.0 - lam) * reversed_x, lam
    w, h = x.size(2), x.size(3)
    x1, y1, x2, y2 = region_box(w, h, lam, *center)
    mixed = x.clone()
    mixed[:, :, x1:x2, y1:y2] = reversed_x[:, :, x1:x2, y1:y2]
    return mixed, 1.0 - ((x2 - x1) * (y2 - y1) / (w * h))


def unmix_inputs(crops: Sequence[torch.Tensor], draws: UnmixDraws, unmix_prob: float
                 ) -> Tuple[List[torch.Tensor], float]:
    """Network input [x_k, x_k+1, mixed_k] for each crop pair (k, k+1), k = 0, 2, ... (item 4).

    In region mode the adjusted lam of one pair sizes the box of the next pair (released quirk).
    Returns (inputs, final lam)."""
    if len(crops) % 2:
        raise ValueError(f"Un-Mix needs crops in pairs; got {len(crops)} crops (use --run_swav true "
                         "or an even --nmb_crops total)")
    global_mix = draws.r < unmix_prob
    lam = draws.lam
    inputs = []
    for p in range(len(crops) // 2):
        x1, x2 = crops[2 * p], crops[2 * p + 1]
        center = None if global_mix else draws.centers[p]
        mixed, lam = mix_with_reversed(x1, lam, global_mix, center)
        inputs += [x1, x2, mixed]
    return inputs, lam
