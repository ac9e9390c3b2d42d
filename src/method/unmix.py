"""Un-Mix image mixtures and the Un-Mix SwAV loss (docs/released-behaviour.md, items 3-8).

Un-Mix mixes each first crop of a pair with the same batch in reversed order (sample i meets sample
B-1-i), globally (mixup, probability `unmix_prob`) or by a region (CutMix). The mixture must predict a
lam-weighted mix of the two codes; the released code writes that as
    L(x1, x2) + lam * L(mixed, x2) + (1 - lam) * L(mixed, x2, reverse=True)
where the reverse call reverses the codes (and queued embedding) of the mixture only.
"""
import math
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

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


def unmix_views(n_pairs: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Which row blocks of the network output (ordered [x0, x1, m0, x2, x3, m1, ...], bs rows each) make
    the plain views [x0, x1, x2, x3, ...] and the mixed views [m0, x1, m1, x3, ...] (item 5)."""
    plain, mixed = [], []
    for p in range(n_pairs):
        plain += [3 * p, 3 * p + 1]
        mixed += [3 * p + 2, 3 * p + 1]
    return tuple(plain), tuple(mixed)


@dataclass
class SwavConfig:
    """The method's hyper-parameters, under the released flag names: `SwavConfig.from_dict(vars(args))`."""
    crops_for_assign: Sequence[int] = (0, 1)
    nmb_crops: Sequence[int] = (2,)
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    improve_numerical_stability: bool = False
    world_size: int = 1
    run_swav: bool = False
    unmix_prob: float = 0.5
    unmix_beta: float = 1.0
    unmix_loss_form: str = "released"
    freeze_prototypes_niters: int = 0
    queue_length: int = 0
    epoch_queue_starts: int = 15
    feat_dim: int = 128

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class EmbeddingQueue:
    """SwAV's queue (item 7): for each assigned crop, the latest L embeddings, newest first.

    Before each use the released code checks whether the queue's last row is non-zero; from then on (for
    the rest of the epoch) the queue's scores are put in front of the batch's before Sinkhorn. After the
    check the queue shifts down by bs rows and takes the batch's embeddings on top. Here the check is
    made from a count of the rows written so far, kept on the host, so that no iteration waits for the
    device to answer; `recount()` reads the tensor once instead (a queue loaded from a file, or after
    steps that the non-finite guard undid: until the loop's next check the count runs ahead of the tensor
    by those steps' rows, which matters only while the queue is still filling)."""

    def __init__(self, tensor: torch.Tensor, in_use: bool = False, filled: Optional[List[int]] = None):
        self.tensor = tensor
        self.in_use = bool(in_use)
        self.filled = list(filled) if filled is not None else self.recount()

    @property
    def length(self) -> int:
        return self.tensor.shape[1]

    def recount(self) -> List[int]:
        """Rows written, per assigned crop, read from the tensor: embeddings are never all zero, and they
        enter at the top and move down, so the filled rows are the leading non-zero ones."""
        nonzero = (self.tensor != 0).any(dim=2)
        first_zero = torch.where(nonzero.all(dim=1), self.length, (~nonzero).long().argmax(dim=1))
        self.filled = [self.length if last else int(n) for n, last in zip(first_zero.tolist(),
                                                                          nonzero[:, -1].tolist())]
        return self.filled

    def check(self, i: int, written: int = 0) -> bool:
        """The released check of queue i after `written` more rows went in: in use once it is full."""
        self.in_use = self.in_use or min(self.length, self.filled[i] + written) >= self.length
        return self.in_use


def as_queue(queue: Union[None, torch.Tensor, EmbeddingQueue], in_use: bool = False) -> Optional[EmbeddingQueue]:
    if queue is None or isinstance(queue, EmbeddingQueue):
        return queue
    return EmbeddingQueue(queue, in_use)


@dataclass(frozen=True)
class Term:
    """One swapped-prediction loss: the output row block of each crop, in crop order. `reverse`: reverse
    the codes and queued embedding of crop 0 (released); `reverse_predictions`: also crop 0's
    predictions (the authors' later formula)."""
    views: Tuple[int, ...]
    reverse: bool = False
    reverse_predictions: bool = False


def swapped_losses(embedding: torch.Tensor, output: torch.Tensor, bs: int, terms: Sequence[Term],
                   cfg: SwavConfig, queue: Optional[EmbeddingQueue] = None,
                   prototypes: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """The SwAV loss (item 7) of each term, in float32, as the released code computes them one after the
    other: for each assigned crop, codes from Sinkhorn (after the queue check, with the queue's scores in
    front once it is in use) predicted by every other crop; each term pushes its assigned crops'
    embeddings into the queue after its checks.

    The codes are computed together: equal Sinkhorn inputs once (before the queue is in use, the terms
    share codes), and all problems of one shape in one batched Sinkhorn; the queue is written once."""
    n_crops = len(terms[0].views)
    assign = list(cfg.crops_for_assign)
    out = output.detach().float()
    emb = embedding.detach()

    def block(t, b, flip):
        x = t[b * bs:(b + 1) * bs]
        return torch.flip(x, dims=[0]) if flip else x

    # 1. which Sinkhorn problem each (term, assigned crop) needs, in the released order of checks
    keys, problems = [], {}
    for c, term in enumerate(terms):
        keys.append([])
        for i, crop_id in enumerate(assign):
            flip = term.reverse and crop_id == 0
            in_use = queue is not None and queue.check(i, written=c * bs)
            key = ("queue", c, i) if in_use else (term.views[crop_id], flip)
            keys[-1].append(key)
            problems.setdefault(key, (c, i, term.views[crop_id], flip))

    # 2. the queue: the state each term saw is a window of [newest pushes ..., old queue]
    if queue is not None:
        C = len(terms)
        pushed = torch.stack([block(emb, t.views[crop_id], t.reverse and crop_id == 0)
                              for i, crop_id in enumerate(assign) for t in reversed(terms)])
        stacked = torch.cat([pushed.view(len(assign), C * bs, -1), queue.tensor], dim=1)
        if any(k[0] == "queue" for k in problems):
            queue_scores = stacked @ prototypes.float().t()
        queue.tensor.copy_(stacked[:, :queue.length])
        queue.filled = [min(queue.length, f + C * bs) for f in queue.filled]

    # 3. Sinkhorn, batched over the problems of equal shape
    scores = {}
    for key, (c, i, b, flip) in problems.items():
        x = block(out, b, flip)
        if key[0] == "queue":
            start = (len(terms) - c) * bs
            x = torch.cat((queue_scores[i, start:start + queue.length], x))
        scores[key] = x
    codes = {}
    by_shape = {}
    for key, x in scores.items():
        by_shape.setdefault(tuple(x.shape), []).append(key)
    for group in by_shape.values():
        q = sinkhorn(torch.stack([scores[k] for k in group]), cfg.epsilon, cfg.sinkhorn_iterations,
                     cfg.improve_numerical_stability, cfg.world_size)[:, -bs:]
        codes.update(zip(group, q.unbind(0)))

    # 4. every other crop predicts the codes (cross-entropy with softmax(output / temperature))
    log_p = F.log_softmax(output.float() / cfg.temperature, dim=1)
    losses = []
    for term, term_keys in zip(terms, keys):
        loss = 0.0
        for crop_id, key in zip(assign, term_keys):
            subloss = 0.0
            for v in range(n_crops):
                if v != crop_id:
                    x = block(log_p, term.views[v], term.reverse_predictions and v == 0)
                    subloss = subloss - torch.mean(torch.sum(codes[key] * x, dim=1))
            loss = loss + subloss / (n_crops - 1)
        losses.append(loss / len(assign))
    return losses


def swav_loss(embedding: torch.Tensor, output: torch.Tensor, bs: int, cfg: SwavConfig,
              queue=None, prototypes: Optional[torch.Tensor] = None, queue_in_use: bool = False,
              reverse: bool = False, reverse_predictions: bool = False) -> Tuple[torch.Tensor, bool]:
    """Swapped prediction loss of sum(nmb_crops) crops of bs rows each (item 7). `queue`: an
    EmbeddingQueue, or its tensor (len(crops_for_assign) x L x D, updated in place); `prototypes`: the
    K x D weight. Returns (loss, queue in use)."""
    queue = as_queue(queue, queue_in_use)
    term = Term(tuple(range(int(sum(cfg.nmb_crops)))), reverse, reverse_predictions)
    [loss] = swapped_losses(embedding, output, bs, [term], cfg, queue, prototypes)
    return loss, queue_in_use if queue is None else queue.in_use


def unmix_swav_loss(embedding: torch.Tensor, output: torch.Tensor, bs: int, n_pairs: int, lam: float,
                    cfg: SwavConfig, queue=None, prototypes=None, queue_in_use=False,
                    loss_form: str = "released") -> Tuple[torch.Tensor, bool]:
    """L(plain) + lam L(mixed) + (1 - lam) L(mixed, reverse) on the outputs of [x0, x1, m0, ...] (item 6).

    loss_form "released": the reverse term reverses only the mixture's codes, so the term "mixture
    predicts the code of the second view" is the same in both mixture losses. "paper": the authors'
    later L_M = lam [l(z_m, q_s) + l(z_s, q_m)] + (1 - lam) [l(z_rm, q_s) + l(z_s, q_rm)]."""
    if loss_form not in LOSS_FORMS:
        raise ValueError(f"unknown Un-Mix loss form {loss_form!r}; choose one of {LOSS_FORMS}")
    queue = as_queue(queue, queue_in_use)
    plain, mixed = unmix_views(n_pairs)
    terms = [Term(plain), Term(mixed), Term(mixed, reverse=True, reverse_predictions=(loss_form == "paper"))]
    loss, loss_m, loss_rm = swapped_losses(embedding, output, bs, terms, cfg, queue, prototypes)
    return loss + lam * loss_m + (1.0 - lam) * loss_rm, queue_in_use if queue is None else queue.in_use
