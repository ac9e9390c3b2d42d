"""Un-Mix image mixtures (docs/released-behaviour.md, items 3-5; released `main_swav_unmix.py`, `train`).

Un-Mix mixes each first crop x of a pair with the same batch in reversed order (sample i meets sample
B-1-i): mixed = x * a + reversed * b. How a and b are made is a mixing mode (`MixingMode`): global
(mixup, a = lam, b = 1 - lam) when r < unmix_prob, else region (CutMix, b = 1 inside a box). The random
numbers are drawn on the host in the released order (`draw_unmix`); `mixing_numbers` turns them into the
iteration's numbers by name (the mode, the global weights, each pair's box, the lam of the loss), which
src/method/staging.py stages on the device; `mix_pairs` mixes on the device from them with the same
operations whatever was drawn (every mode's weights are made, the drawn one is selected).
tests/reference_unmix.py keeps the released arithmetic as written, the reference these are checked against.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class UnmixDraws:
    """The random numbers of one iteration: r picks the mixing mode (released: global when r < unmix_prob,
    else region), lam ~ Beta, and for a mode that needs them one point (cx, cy) per crop pair, in draw
    order (region mixing: the box centre)."""
    r: float
    lam: float
    centers: Optional[List[Tuple[int, int]]] = None


class MixingMode(NamedTuple):
    """One way to mix a pair's first crop x with its reversed batch, mixed = x * a + reversed * b.

    picked(r, unmix_prob): whether the draw r picks this mode (the first mode that says so is used).
    draws_centers: whether the mode draws a point (cx = randint(W), cy = randint(H)) per pair.
    box(lam, w, h, center): on the host, in float64: the pair's box (x1, y1, x2, y2), staged for the
        device, and the lam after this pair (used by the loss and by the next pair).
    weights(numbers, box, rows, cols): on the device: (a, b) as tensors that broadcast to a crop (H x W
        masks or 0-d), from the iteration's staged numbers, the pair's staged box and the pixel indices."""
    name: str
    picked: Callable
    draws_centers: bool
    box: Callable
    weights: Callable


def region_box(w: int, h: int, lam: float, cx: int, cy: int) -> Tuple[int, int, int, int]:
    """CutMix box (released `rand_bbox`, main_swav_unmix.py:274-290): side sqrt(1 - lam) of the image,
    centred at (cx, cy), clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * cut), int(h * cut)
    x1 = min(max(cx - cut_w // 2, 0), w)
    y1 = min(max(cy - cut_h // 2, 0), h)
    x2 = min(max(cx + cut_w // 2, 0), w)
    y2 = min(max(cy + cut_h // 2, 0), h)
    return x1, y1, x2, y2


def box_mask(box: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """1 inside [x1, x2) x [y1, y2) (dimension 2 by x, dimension 3 by y, as released), 0 elsewhere."""
    return ((rows >= box[0]) & (rows < box[2]))[:, None] & ((cols >= box[1]) & (cols < box[3]))[None, :]


def _region_box(lam, w, h, center):
    """Item 4, released main_swav_unmix.py:376-378: the box, then lam = 1 - its area fraction."""
    x1, y1, x2, y2 = region_box(w, h, lam, *center)
    return (x1, y1, x2, y2), 1.0 - ((x2 - x1) * (y2 - y1) / (w * h))


def _region_weights(numbers, box, rows, cols):
    inside = box_mask(box, rows, cols).to(numbers.mix_a.dtype)
    return 1 - inside, inside  # the box's pixels copied from the reversed batch, exactly


# Item 4, released main_swav_unmix.py:372-378.
GLOBAL = MixingMode("global", picked=lambda r, unmix_prob: r < unmix_prob, draws_centers=False,
                    box=lambda lam, w, h, center: ((0, 0, 0, 0), lam),
                    weights=lambda numbers, box, rows, cols: (numbers.mix_a, numbers.mix_b))
REGION = MixingMode("region", picked=lambda r, unmix_prob: True, draws_centers=True, box=_region_box,
                    weights=_region_weights)
RELEASED_MODES = (GLOBAL, REGION)


def pick_mode(r: float, unmix_prob: float, modes: Sequence[MixingMode] = RELEASED_MODES) -> int:
    """The index of the mode that the draw r picks."""
    return next(k for k, mode in enumerate(modes) if mode.picked(r, unmix_prob))


def draw_unmix(rng: np.random.RandomState, unmix_beta: float, unmix_prob: float,
               pair_sizes: Sequence[Tuple[int, int]], modes: Sequence[MixingMode] = RELEASED_MODES) -> UnmixDraws:
    """Draw in the released order (main_swav_unmix.py:363-366, 282-283) from a NumPy RandomState (the
    released code used NumPy's global RNG, seeded with --seed, which is the same stream): r, lam, then
    cx = randint(W), cy = randint(H) per pair when the picked mode needs them (region mixing).
    `pair_sizes` gives (W, H) = (size[2], size[3]) of each pair's crops."""
    r = float(rng.rand(1)[0])
    lam = float(rng.beta(unmix_beta, unmix_beta))
    centers = None
    if modes[pick_mode(r, unmix_prob, modes)].draws_centers:
        centers = []
        for w, h in pair_sizes:
            cx = int(rng.randint(w))
            cy = int(rng.randint(h))
            centers.append((cx, cy))
    return UnmixDraws(r=r, lam=lam, centers=centers)


def mixing_numbers(draws: UnmixDraws, unmix_prob: float, pair_sizes: Sequence[Tuple[int, int]],
                   modes: Sequence[MixingMode] = RELEASED_MODES) -> dict:
    """The mixing's numbers of one iteration, by name, computed on the host in float64 as the released
    Python code does: the mode; the global weights lam and 1 - lam; each pair's box, sized by the lam left
    by the pair before (released quirk); the lam of the loss (after the boxes) and 1 - lam."""
    mode = pick_mode(draws.r, unmix_prob, modes)
    lam, boxes = draws.lam, []
    for p, (w, h) in enumerate(pair_sizes):
        box, lam = modes[mode].box(lam, w, h, draws.centers[p] if draws.centers else None)
        boxes.append(box)
    return {"mode": mode, "mix_a": draws.lam, "mix_b": 1.0 - draws.lam, "boxes": boxes, "lam": lam,
            "one_minus_lam": 1.0 - lam}


def pair_sizes(crops: Sequence[torch.Tensor]) -> List[Tuple[int, int]]:
    """(size[2], size[3]) of the first crop of each pair: what the box centre is drawn over."""
    return [(crops[k].size(2), crops[k].size(3)) for k in range(0, len(crops) - 1, 2)]


def unmix_views(n_pairs: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Which row blocks of the network output (ordered [x0, x1, m0, x2, x3, m1, ...], bs rows each) make
    the plain views [x0, x1, x2, x3, ...] and the mixed views [m0, x1, m1, x3, ...] (item 5, released
    main_swav_unmix.py:403-420)."""
    plain, mixed = [], []
    for p in range(n_pairs):
        plain += [3 * p, 3 * p + 1]
        mixed += [3 * p + 2, 3 * p + 1]
    return tuple(plain), tuple(mixed)


def mix_pairs(crops: Sequence[torch.Tensor], numbers, modes: Sequence[MixingMode] = RELEASED_MODES
              ) -> List[torch.Tensor]:
    """Network input [x_k, x_k+1, mixed_k] for each crop pair (k, k+1) (released main_swav_unmix.py:369-382),
    on the device from the iteration's staged numbers (`staging.StepNumbers`): every mode's weights are
    made and the drawn mode's are selected, so the operations do not depend on the draw. These are the
    released results bit for bit: the same two float32 products and sum, and an exact copy of a box's
    pixels."""
    if len(crops) % 2:
        raise ValueError(f"Un-Mix needs crops in pairs; got {len(crops)} crops (use --run_swav true "
                         "or an even --nmb_crops total)")
    chosen = [numbers.mode == k for k in range(1, len(modes))]
    inputs = []
    for p in range(len(crops) // 2):
        x1, x2 = crops[2 * p], crops[2 * p + 1]
        box = numbers.boxes[p]
        rows = torch.arange(x1.size(2), device=x1.device, dtype=box.dtype)
        cols = torch.arange(x1.size(3), device=x1.device, dtype=box.dtype)
        a, b = modes[0].weights(numbers, box, rows, cols)
        for k, mode in enumerate(modes[1:]):
            ak, bk = mode.weights(numbers, box, rows, cols)
            a, b = torch.where(chosen[k], ak, a), torch.where(chosen[k], bk, b)
        a, b = a.to(x1.dtype), b.to(x1.dtype)
        inputs += [x1, x2, x1 * a + torch.flip(x1, dims=[0]) * b]
    return inputs
