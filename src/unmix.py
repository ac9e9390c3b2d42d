"""Un-Mix image mixtures and the Un-Mix SwAV loss (behaviour doc, items 3-8).

Un-Mix mixes each first crop of a pair with the same batch in reversed order (sample i meets sample
B-1-i), globally (mixup, probability `unmix_prob`) or by a region (CutMix). The mixture must predict a
lam-weighted mix of the two codes; the released code writes that as
    L(x1, x2) + lam * L(mixed, x2) + (1 - lam) * L(mixed, x2, reverse=True)
where the reverse call reverses the codes (and queued embedding) of the mixture only.
"""
import math
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .sinkhorn import sinkhorn

LOSS_FORMS = ("released", "paper")


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


def pair_sizes(crops: Sequence[torch.Tensor]) -> List[Tuple[int, int]]:
    """(size[2], size[3]) of the first crop of each pair: what the box centre is drawn over."""
    return [(crops[k].size(2), crops[k].size(3)) for k in range(0, len(crops) - 1, 2)]


def split_triples(t: torch.Tensor, bs: int, n_pairs: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """From rows ordered [x0, x1, m0, x2, x3, m1, ...] (bs rows each) build
    plain = [x0, x1, x2, x3, ...] and mixed = [m0, x1, m1, x3, ...] (item 5)."""
    plain, mixed = [], []
    for p in range(n_pairs):
        o = 3 * p * bs
        a, b, m = t[o:o + bs], t[o + bs:o + 2 * bs], t[o + 2 * bs:o + 3 * bs]
        plain += [a, b]
        mixed += [m, b]
    return torch.cat(plain), torch.cat(mixed)


@dataclass
class SwavConfig:
    """Arguments of the SwAV loss (released flag names)."""
    crops_for_assign: Sequence[int] = (0, 1)
    nmb_crops: Sequence[int] = (2,)
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    improve_numerical_stability: bool = False
    world_size: int = 1

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def swav_loss(embedding: torch.Tensor, output: torch.Tensor, bs: int, cfg: SwavConfig,
              queue: Optional[torch.Tensor] = None, prototypes: Optional[torch.Tensor] = None,
              queue_in_use: bool = False, reverse: bool = False, reverse_predictions: bool = False
              ) -> Tuple[torch.Tensor, bool]:
    """Swapped prediction loss (item 7), in float32.

    `embedding`/`output` hold sum(nmb_crops) chunks of bs rows. For each assigned crop, its codes come
    from Sinkhorn (with the queue prepended once it is in use) and every other crop predicts them.
    `queue` (len(crops_for_assign) x L x D) is updated in place; `prototypes` is the K x D weight.
    `reverse`: reverse the codes and queued embedding of crop 0 (released). `reverse_predictions`:
    also reverse crop 0's predictions (the authors' later formula). Returns (loss, queue_in_use)."""
    output = output.float()
    n_crops = int(sum(cfg.nmb_crops))
    loss = 0.0
    for i, crop_id in enumerate(cfg.crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            emb = embedding[bs * crop_id: bs * (crop_id + 1)].detach()
            if reverse and crop_id == 0:
                out, emb = torch.flip(out, dims=[0]), torch.flip(emb, dims=[0])
            if queue is not None:
                if queue_in_use or not torch.all(queue[i, -1, :] == 0):
                    queue_in_use = True
                    out = torch.cat((queue[i] @ prototypes.float().t(), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = emb
            q = sinkhorn(out, cfg.epsilon, cfg.sinkhorn_iterations, cfg.improve_numerical_stability,
                         cfg.world_size)[-bs:]
        subloss = 0.0
        for v in range(n_crops):
            if v == crop_id:
                continue
            x = output[bs * v: bs * (v + 1)]
            if reverse_predictions and v == 0:
                x = torch.flip(x, dims=[0])
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(x / cfg.temperature, dim=1), dim=1))
        loss = loss + subloss / (n_crops - 1)
    return loss / len(cfg.crops_for_assign), queue_in_use


def unmix_swav_loss(embedding: torch.Tensor, output: torch.Tensor, bs: int, n_pairs: int, lam: float,
                    cfg: SwavConfig, queue=None, prototypes=None, queue_in_use=False,
                    loss_form: str = "released") -> Tuple[torch.Tensor, bool]:
    """L(plain) + lam L(mixed) + (1 - lam) L(mixed, reverse) on the outputs of [x0, x1, m0, ...] (item 6).

    loss_form "released": the reverse term reverses only the mixture's codes, so the term "mixture
    predicts the code of the second view" is the same in both mixture losses. "paper": the authors'
    later L_M = lam [l(z_m, q_s) + l(z_s, q_m)] + (1 - lam) [l(z_rm, q_s) + l(z_s, q_rm)]."""
    if loss_form not in LOSS_FORMS:
        raise ValueError(f"unknown Un-Mix loss form {loss_form!r}; choose one of {LOSS_FORMS}")
    emb_plain, emb_mixed = split_triples(embedding, bs, n_pairs)
    out_plain, out_mixed = split_triples(output, bs, n_pairs)
    kw = dict(queue=queue, prototypes=prototypes)
    loss, queue_in_use = swav_loss(emb_plain, out_plain, bs, cfg, queue_in_use=queue_in_use, **kw)
    loss_m, queue_in_use = swav_loss(emb_mixed, out_mixed, bs, cfg, queue_in_use=queue_in_use, **kw)
    loss_rm, queue_in_use = swav_loss(emb_mixed, out_mixed, bs, cfg, queue_in_use=queue_in_use,
                                      reverse=True, reverse_predictions=(loss_form == "paper"), **kw)
    return loss + lam * loss_m + (1.0 - lam) * loss_rm, queue_in_use
