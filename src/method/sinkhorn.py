"""Sinkhorn-Knopp equipartition of prototype scores (the older SwAV form the released code uses).

docs/released-behaviour.md, item 8: Q = exp(scores / epsilon).T is K x B; infinities are replaced by the largest
value; Q is normalised to sum 1 over all processes; then `iterations` rounds of row scaling (row sums
all-reduced, target 1/K) and column scaling (target 1/(world_size * B)); the columns of the result are
normalised to sum 1 and returned as B x K in float32.

Several problems of equal shape can be solved at once (scores n x B x K): each is normalised on its
own, with one all-reduce per step for all of them, so a training iteration launches one Sinkhorn.
"""
import torch
import torch.distributed as dist


def _all_reduce(t, world_size, op=dist.ReduceOp.SUM):
    if world_size > 1:
        dist.all_reduce(t, op=op)
    return t


def shoot_infs(t, dims=None):
    """Replace +-inf by the maximum of the tensor with the infinities set to 0 (released `shoot_infs`);
    `dims`: take that maximum over these dimensions only (one per problem of a batch of problems)."""
    mask = torch.isinf(t)
    finite = torch.where(mask, torch.zeros_like(t), t)
    m = finite.max() if dims is None else finite.amax(dim=dims, keepdim=True)
    return torch.where(mask, m, t)


@torch.no_grad()
def sinkhorn(scores, epsilon, iterations, improve_numerical_stability=False, world_size=1):
    """Soft assignments (B x K, rows sum to 1) of the scores B x K of this process's batch, or of each
    of n problems given as n x B x K.

    With world_size > 1 the normalisations are all-reduced over the default process group, so the
    result equals one process running on the concatenated batch.
    """
    out = scores.detach().float()
    single = out.dim() == 2
    if single:
        out = out.unsqueeze(0)
    both = (-2, -1)  # per problem: all of its K x B entries
    if improve_numerical_stability:
        m = _all_reduce(out.amax(dim=both, keepdim=True), world_size, dist.ReduceOp.MAX)
        out = out - m
    q = shoot_infs(torch.exp(out / epsilon).transpose(-2, -1), both)  # n x K x B
    q = q / _all_reduce(q.sum(dim=both, keepdim=True), world_size)
    k, b = q.shape[-2:]
    r = 1.0 / k
    c = 1.0 / (world_size * b)
    for _ in range(iterations):
        u = _all_reduce(q.sum(dim=-1, keepdim=True), world_size)  # n x K x 1
        q = q * shoot_infs(r / u, both)
        q = q * (c / q.sum(dim=-2, keepdim=True))
    q = (q / q.sum(dim=-2, keepdim=True)).transpose(-2, -1)
    return q[0] if single else q
