"""The SwAV loss with its queue, and the method's hyper-parameters (docs/released-behaviour.md, items 6-8).

What the loss is comes first: `unmix_swav_loss` (which views, the lam weighting) and `swapped_losses`
(which codes each view predicts, the queue window each term sees). How it is computed fast comes after,
under its own names: the queue written once for the three terms (`push_to_queue`) and the codes of
equal Sinkhorn problems computed once, those of one shape in one batched call (`sinkhorn_codes`).
Line numbers cite the released `main_swav_unmix.py`.
"""
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .sinkhorn import sinkhorn
from .unmix import RELEASED_MODES, unmix_views

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
    mixing_modes: tuple = RELEASED_MODES  # src/method/unmix.py: how r picks and makes a mixture

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


def unmix_terms(n_pairs: int, loss_form: str = "released") -> List[Term]:
    """The three losses of Un-Mix on the outputs of [x0, x1, m0, ...]: plain views, mixed views, mixed views
    with the mixture's codes reversed (item 6; released lines 428, 432, 433)."""
    if loss_form not in LOSS_FORMS:
        raise ValueError(f"unknown Un-Mix loss form {loss_form!r}; choose one of {LOSS_FORMS}")
    plain, mixed = unmix_views(n_pairs)
    return [Term(plain), Term(mixed), Term(mixed, reverse=True, reverse_predictions=(loss_form == "paper"))]


def unmix_swav_loss(embedding: torch.Tensor, output: torch.Tensor, bs: int, n_pairs: int, lam, cfg: SwavConfig,
                    queue: Optional[EmbeddingQueue] = None, prototypes=None, loss_form: str = "released",
                    one_minus_lam=None, plan=None) -> torch.Tensor:
    """L(plain) + lam L(mixed) + (1 - lam) L(mixed, reverse) (item 6, released line 435). `lam`: a number
    or a 0-d tensor; `one_minus_lam`: 1 - lam computed in float64 on the host (as the released code's
    Python float), given with a tensor lam.

    loss_form "released": the reverse term reverses only the mixture's codes, so the term "mixture
    predicts the code of the second view" is the same in both mixture losses. "paper": the authors'
    later L_M = lam [l(z_m, q_s) + l(z_s, q_m)] + (1 - lam) [l(z_rm, q_s) + l(z_s, q_rm)]."""
    terms = unmix_terms(n_pairs, loss_form)
    loss, loss_m, loss_rm = swapped_losses(embedding, output, bs, terms, cfg, queue, prototypes, plan)
    if one_minus_lam is None:
        one_minus_lam = 1.0 - lam
    return loss + lam * loss_m + one_minus_lam * loss_rm


def swav_loss(embedding: torch.Tensor, output: torch.Tensor, bs: int, cfg: SwavConfig,
              queue: Optional[EmbeddingQueue] = None, prototypes: Optional[torch.Tensor] = None,
              plan=None) -> torch.Tensor:
    """Plain SwAV (`--run_swav true`, released line 428): one term over sum(nmb_crops) crops of bs rows."""
    term = Term(tuple(range(int(sum(cfg.nmb_crops)))))
    [loss] = swapped_losses(embedding, output, bs, [term], cfg, queue, prototypes, plan)
    return loss


@dataclass(frozen=True)
class Problem:
    """What one crop's codes are computed from (Sinkhorn's input): the scores of output block `view`,
    reversed along the batch when `flip`, with, when the queue is in use, the scores of rows [window,
    window + L) of the queue of the `queue_row`-th assigned crop in front (see `push_to_queue`)."""
    view: int
    flip: bool
    queue_row: Optional[int] = None
    window: Optional[int] = None


def swapped_losses(embedding: torch.Tensor, output: torch.Tensor, bs: int, terms: Sequence[Term],
                   cfg: SwavConfig, queue: Optional[EmbeddingQueue] = None,
                   prototypes: Optional[torch.Tensor] = None, plan=None) -> List[torch.Tensor]:
    """The swapped-prediction loss L of each term (item 7, released `swav_loss`, lines 293-335), in float32,
    as the released code computes the terms one after the other. For each assigned crop: its codes come
    from Sinkhorn on its scores (lines 300-302, 319-325), with the queue's scores in front once the queue
    is in use (lines 305-311); every other crop predicts them through softmax(scores / temperature) (lines
    328-333). Each term pushes its assigned crops' embeddings into the queue after its checks (lines
    313-317), so term c sees the queue behind the pushes of the terms before it. `plan`: the queue's checks
    (`queue.plan`; computed here when not given). The queue's tensor is written; its host count is the
    caller's (`queue.advance`)."""
    assign, n_crops = list(cfg.crops_for_assign), len(terms[0].views)
    if queue is not None and plan is None:
        plan = queue.plan(len(terms), bs)

    def problem(c, i, crop):  # crop 0 of a reverse term: codes of the reversed batch; queue in use: its window
        in_use = queue is not None and plan[c][i]
        return Problem(terms[c].views[crop], terms[c].reverse and crop == 0, i if in_use else None,
                       (len(terms) - c) * bs if in_use else None)

    problems = [[problem(c, i, crop) for i, crop in enumerate(assign)] for c in range(len(terms))]
    queue_scores = push_to_queue(queue, embedding, bs, terms, assign, prototypes,
                                 any(p.window is not None for row in problems for p in row))
    codes = sinkhorn_codes(problems, output.detach().float(), queue_scores, bs, cfg)
    log_p = F.log_softmax(output.float() / cfg.temperature, dim=1)
    losses = []
    for term, term_codes in zip(terms, codes):
        loss = 0.0
        for crop, q in zip(assign, term_codes):
            subloss = 0.0
            for v in range(n_crops):
                if v != crop:
                    p = block(log_p, term.views[v], bs, term.reverse_predictions and v == 0)
                    subloss = subloss - torch.mean(torch.sum(q * p, dim=1))
            loss = loss + subloss / (n_crops - 1)
        losses.append(loss / len(assign))
    return losses


# ------------------------------------------------------------------ how it is computed fast

def block(t: torch.Tensor, b: int, bs: int, flip: bool = False) -> torch.Tensor:
    """Row block b (bs rows) of t, reversed along the batch when `flip`."""
    x = t[b * bs:(b + 1) * bs]
    return torch.flip(x, dims=[0]) if flip else x


def push_to_queue(queue: Optional[EmbeddingQueue], embedding: torch.Tensor, bs: int, terms: Sequence[Term],
                  assign: Sequence[int], prototypes, scores_needed: bool) -> Optional[torch.Tensor]:
    """The queue's writes of all terms at once: every term pushes bs rows per assigned crop on top, so the
    queue states the terms saw are windows of [pushes of the last term, ..., of the first, old queue]:
    term c's at rows [(C - c) bs, (C - c) bs + L). Writes the final state into the queue's tensor and
    returns the windows' scores against the prototypes (assigned crop x rows x K) when `scores_needed`."""
    if queue is None:
        return None
    emb = embedding.detach()
    pushed = torch.stack([block(emb, t.views[crop], bs, t.reverse and crop == 0)
                          for crop in assign for t in reversed(terms)])
    stacked = torch.cat([pushed.view(len(assign), len(terms) * bs, -1), queue.tensor], dim=1)
    scores = stacked @ prototypes.float().t() if scores_needed else None
    queue.tensor.copy_(stacked[:, :queue.length])
    return scores


def sinkhorn_codes(problems: Sequence[Sequence[Problem]], out: torch.Tensor, queue_scores, bs: int,
                   cfg: SwavConfig) -> List[List[torch.Tensor]]:
    """The codes (bs x K) of each problem, as `sinkhorn` gives them one at a time (item 8), computed
    faster: equal problems once (before the queue is in use the three terms share the plain views'
    codes), and all problems of one shape in one batched Sinkhorn."""
    scores = {}
    for p in dict.fromkeys(p for row in problems for p in row):
        x = block(out, p.view, bs, p.flip)
        if p.window is not None:
            length = queue_scores.shape[1] - len(problems) * bs  # the queue's L rows behind the terms' pushes
            x = torch.cat((queue_scores[p.queue_row, p.window:p.window + length], x))
        scores[p] = x
    by_shape, codes = {}, {}
    for p, x in scores.items():
        by_shape.setdefault(tuple(x.shape), []).append(p)
    for group in by_shape.values():
        q = sinkhorn(torch.stack([scores[p] for p in group]), cfg.epsilon, cfg.sinkhorn_iterations,
                     cfg.improve_numerical_stability, cfg.world_size)[:, -bs:]
        codes.update(zip(group, q.unbind(0)))
    return [[codes[p] for p in row] for row in problems]
