"""Un-Mix image mixtures (docs/released-behaviour.md, items 3-5).

Un-Mix mixes each first crop of a pair with the same batch in reversed order (sample i meets sample
B-1-i), globally (mixup, probability `unmix_prob`) or by a region (CutMix). The random numbers are drawn
on the host in the released order (`draw_unmix`); `host_row` turns them into the numbers an iteration
needs (mixing weights, region boxes, the lam of the loss), and `mix_pairs` mixes on the device from such
a row, with the same operations whatever was drawn (global and region mixing are one weighted sum whose
weights are per-pixel masks). tests/reference_unmix.py keeps the released arithmetic as written, the reference these are checked against.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class UnmixDraws:
    """The random numbers of one iteration: r picks global (r < unmix_prob) vs region mixing, lam ~ Beta,
    and for region mixing one box centre (cx, cy) per crop pair, in draw order."""
    r: float
    lam: float
    centers: Optional[List[Tuple[int, int]]] = None


def draw_unmix(rng: np.random.RandomState, unmix_beta: float, unmix_prob: float,
               pair_sizes: Sequence[Tuple[int, int]]) -> UnmixDraws:
    """Draw in the released order from a NumPy RandomState (the released code used NumPy's global RNG,
    seeded with --seed, which is the same stream): r, lam, then cx = randint(W), cy = randint(H) per pair
    when region mixing is picked. `pair_sizes` gives (W, H) = (size[2], size[3]) of each pair's crops."""
    r = float(rng.rand(1)[0])
    lam = float(rng.beta(unmix_beta, unmix_beta))
    centers = None
    if r >= unmix_prob:
        centers = []
        for w, h in pair_sizes:
            cx = int(rng.randint(w))
            cy = int(rng.randint(h))
            centers.append((cx, cy))
    return UnmixDraws(r=r, lam=lam, centers=centers)


def region_box(w: int, h: int, lam: float, cx: int, cy: int) -> Tuple[int, int, int, int]:
    """CutMix box (released `rand_bbox`): side sqrt(1 - lam) of the image, centred at (cx, cy), clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * cut), int(h * cut)
    x1 = min(max(cx - cut_w // 2, 0), w)
    y1 = min(max(cy - cut_h // 2, 0), h)
    x2 = min(max(cx + cut_w // 2, 0), w)
    y2 = min(max(cy + cut_h // 2, 0), h)
    return x1, y1, x2, y2


def pair_sizes(crops: Sequence[torch.Tensor]) -> List[Tuple[int, int]]:
    """(size[2], size[3]) of the first crop of each pair: what the box centre is drawn over."""
    return [(crops[k].size(2), crops[k].size(3)) for k in range(0, len(crops) - 1, 2)]


def unmix_views(n_pairs: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Which row blocks of the network output (ordered [x0, x1, m0, x2, x3, m1, ...], bs rows each) make
    the plain views [x0, x1, x2, x3, ...] and the mixed views [m0, x1, m1, x3, ...] (item 5)."""
    plain, mixed = [], []
    for p in range(n_pairs):
        plain += [3 * p, 3 * p + 1]
        mixed += [3 * p + 2, 3 * p + 1]
    return tuple(plain), tuple(mixed)


# ------------------------------------------------------------------ one iteration's numbers, as a row

# Fields of a row; then the box (x1, y1, x2, y2) of each pair. Numbers are float32; the learning rate is
# rounded to float32 as the fused SGD kernel takes it.
LR, MIX_A, MIX_B, LAM, ONE_MINUS_LAM, GLOBAL, SLOT = range(7)
BOXES = 7


def row_width(n_pairs: int) -> int:
    return BOXES + 4 * n_pairs


def host_row(draws: UnmixDraws, lr: float, slot: int, unmix_prob: float,
             pair_sizes: Sequence[Tuple[int, int]]) -> List[float]:
    """The numbers of one iteration, computed on the host in float64 as the released Python code does:
    global mixing weights lam and 1 - lam; each pair's region box, sized by the lam left by the pair
    before (released quirk); the lam of the loss (after the boxes) and 1 - lam; whether mixing is global;
    the iteration's slot in its epoch; the learning rate."""
    global_mix = draws.r < unmix_prob
    lam = draws.lam
    row = [float(lr), lam, 1.0 - lam, 0.0, 0.0, float(global_mix), float(slot)]
    for p, (w, h) in enumerate(pair_sizes):
        if global_mix:
            row += [0.0, 0.0, 0.0, 0.0]
        else:
            x1, y1, x2, y2 = region_box(w, h, lam, *draws.centers[p])
            lam = 1.0 - ((x2 - x1) * (y2 - y1) / (w * h))
            row += [x1, y1, x2, y2]
    row[LAM], row[ONE_MINUS_LAM] = lam, 1.0 - lam
    return row


def mix_pairs(crops: Sequence[torch.Tensor], row: torch.Tensor) -> List[torch.Tensor]:
    """Network input [x_k, x_k+1, mixed_k] for each crop pair (k, k+1) from a row of `host_row` on the
    device: mixed = x * A + reversed * B, with A = lam, B = 1 - lam everywhere for global mixing, and
    A = 1 - box, B = box (box: 1 inside the pair's region) for region mixing. These are the released
    results bit for bit: the same two float32 products and sum, and an exact copy of the box's pixels."""
    if len(crops) % 2:
        raise ValueError(f"Un-Mix needs crops in pairs; got {len(crops)} crops (use --run_swav true "
                         "or an even --nmb_crops total)")
    global_mix = row[GLOBAL] > 0
    inputs = []
    for p in range(len(crops) // 2):
        x1, x2 = crops[2 * p], crops[2 * p + 1]
        box = row[BOXES + 4 * p:BOXES + 4 * p + 4]
        rows = torch.arange(x1.size(2), device=x1.device, dtype=row.dtype)
        cols = torch.arange(x1.size(3), device=x1.device, dtype=row.dtype)
        inside = (((rows >= box[0]) & (rows < box[2]))[:, None] & ((cols >= box[1]) & (cols < box[3]))[None, :])
        inside = inside.to(x1.dtype)
        a = torch.where(global_mix, row[MIX_A].to(x1.dtype), 1 - inside)
        b = torch.where(global_mix, row[MIX_B].to(x1.dtype), inside)
        inputs += [x1, x2, x1 * a + torch.flip(x1, dims=[0]) * b]
    return inputs
