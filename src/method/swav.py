"""The SwAV loss with its queue, and the method's hyper-parameters (docs/released-behaviour.md, items 6-8).

Each crop chosen for assignment gets codes from Sinkhorn-Knopp on its prototype scores (with the queue's
scores in front once the queue is in use); every other crop predicts them through a softmax of its own
scores. Un-Mix adds the same loss on the mixed views, once as is and once with the mixture's codes
reversed, weighted by lam and 1 - lam:
    L(x1, x2) + lam * L(mixed, x2) + (1 - lam) * L(mixed, x2, reverse=True)
(released `main_swav_unmix.py`, `train`).
"""
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .sinkhorn import sinkhorn
from .unmix import unmix_views

LOSS_FORMS = ("released", "paper")


@dataclass
class SwavConfig:
    """The method's hyper-parameters, under the released flag names: `SwavConfig.from_dict(vars(args))`."""
    crops_for_assign: Sequence[int] = (0, 1)
    nmb_crops: Sequence[int] = (2,)
    size_crops: Sequence[int] = (32,)
    batch_size: int = 64
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

    @property
    def crop_sizes(self) -> List[int]:
        """The size of each crop, in crop order."""
        return [s for s, n in zip(self.size_crops, self.nmb_crops) for _ in range(n)]

    @property
    def pair_sizes(self) -> List[Tuple[int, int]]:
        """(W, H) of the first crop of each Un-Mix pair (what a box centre is drawn over); none for SwAV."""
        sizes = self.crop_sizes
        return [] if self.run_swav else [(sizes[k], sizes[k]) for k in range(0, len(sizes) - 1, 2)]

    @property
    def queue_rows(self) -> int:
        """This process's queue length: --queue_length less its remainder by the global batch (released: 120
        with a global batch of 128 gives no queue), shared by the processes."""
        total = self.queue_length - self.queue_length % (self.batch_size * self.world_size)
        return total // self.world_size


class EmbeddingQueue:
    """SwAV's queue (item 7): for each assigned crop, the latest L embeddings, newest first.

    Before each use the released code checks whether the queue's last row is non-zero; from then on (for
    the rest of the epoch) the queue's scores are put in front of the batch's before Sinkhorn. After the
    check the queue shifts down by bs rows and takes the batch's embeddings on top. Here the check is made
    from a count of the rows written so far, kept on the host, so that no iteration waits for the device:
    `plan` gives an iteration's checks without changing anything (the shape of its work), `advance` counts
    its rows afterwards. `recount()` reads the tensor instead (a queue loaded from a file, or after steps
    that the non-finite guard undid: until the loop's next check the count runs ahead of the tensor by
    those steps' rows, which matters only while the queue is still filling)."""

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

    def plan(self, n_terms: int, bs: int) -> Tuple[Tuple[bool, ...], ...]:
        """The released checks of one iteration of `n_terms` losses, in order: for each term and assigned
        crop i, whether the queue is in use (it is once full after the rows written so far, and stays so)."""
        in_use, out = self.in_use, []
        for c in range(n_terms):
            flags = []
            for filled in self.filled:
                in_use = in_use or min(self.length, filled + c * bs) >= self.length
                flags.append(in_use)
            out.append(tuple(flags))
        return tuple(out)

    def advance(self, plan, bs: int):
        """After the iteration of `plan`: its checks were made and each term pushed bs rows."""
        self.in_use = self.in_use or any(any(flags) for flags in plan)
        self.filled = [min(self.length, f + len(plan) * bs) for f in self.filled]


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
                   prototypes: Optional[torch.Tensor] = None, plan=None) -> List[torch.Tensor]:
    """The SwAV loss (item 7) of each term, in float32, as the released code computes them one after the
    other: for each assigned crop, codes from Sinkhorn (after the queue check, with the queue's scores in
    front once it is in use) predicted by every other crop; each term pushes its assigned crops'
    embeddings into the queue after its checks. `plan`: the queue's checks (`queue.plan`; computed here
    when not given). The queue's tensor is written; its host count is the caller's (`queue.advance`).

    The codes are computed together: equal Sinkhorn inputs once (before the queue is in use, the terms
    share codes), and all problems of one shape in one batched Sinkhorn; the queue is written once."""
    n_crops = len(terms[0].views)
    assign = list(cfg.crops_for_assign)
    out = output.detach().float()
    emb = embedding.detach()
    if queue is not None and plan is None:
        plan = queue.plan(len(terms), bs)

    def block(t, b, flip):
        x = t[b * bs:(b + 1) * bs]
        return torch.flip(x, dims=[0]) if flip else x

    # 1. which Sinkhorn problem each (term, assigned crop) needs, in the released order of checks
    keys, problems = [], {}
    for c, term in enumerate(terms):
        keys.append([])
        for i, crop_id in enumerate(assign):
            flip = term.reverse and crop_id == 0
            key = ("queue", c, i) if queue is not None and plan[c][i] else (term.views[crop_id], flip)
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
              queue: Optional[EmbeddingQueue] = None, prototypes: Optional[torch.Tensor] = None,
              plan=None) -> torch.Tensor:
    """Swapped prediction loss of sum(nmb_crops) crops of bs rows each (item 7, plain SwAV). `queue`: an
    EmbeddingQueue (its tensor is updated in place), `prototypes`: the K x D weight."""
    term = Term(tuple(range(int(sum(cfg.nmb_crops)))))
    [loss] = swapped_losses(embedding, output, bs, [term], cfg, queue, prototypes, plan)
    return loss


def unmix_terms(n_pairs: int, loss_form: str = "released") -> List[Term]:
    """The three losses of Un-Mix on the outputs of [x0, x1, m0, ...]: plain views, mixed views, mixed views
    with the mixture's codes reversed (item 6)."""
    if loss_form not in LOSS_FORMS:
        raise ValueError(f"unknown Un-Mix loss form {loss_form!r}; choose one of {LOSS_FORMS}")
    plain, mixed = unmix_views(n_pairs)
    return [Term(plain), Term(mixed), Term(mixed, reverse=True, reverse_predictions=(loss_form == "paper"))]


def unmix_swav_loss(embedding: torch.Tensor, output: torch.Tensor, bs: int, n_pairs: int, lam, cfg: SwavConfig,
                    queue: Optional[EmbeddingQueue] = None, prototypes=None, loss_form: str = "released",
                    one_minus_lam=None, plan=None) -> torch.Tensor:
    """L(plain) + lam L(mixed) + (1 - lam) L(mixed, reverse) (item 6). `lam`: a number or a 0-d tensor;
    `one_minus_lam`: 1 - lam computed in float64 on the host (as the released code's Python float), given
    with a tensor lam.

    loss_form "released": the reverse term reverses only the mixture's codes, so the term "mixture
    predicts the code of the second view" is the same in both mixture losses. "paper": the authors'
    later L_M = lam [l(z_m, q_s) + l(z_s, q_m)] + (1 - lam) [l(z_rm, q_s) + l(z_s, q_rm)]."""
    terms = unmix_terms(n_pairs, loss_form)
    loss, loss_m, loss_rm = swapped_losses(embedding, output, bs, terms, cfg, queue, prototypes, plan)
    if one_minus_lam is None:
        one_minus_lam = 1.0 - lam
    return loss + lam * loss_m + one_minus_lam * loss_rm
