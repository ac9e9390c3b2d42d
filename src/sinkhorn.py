"""Sinkhorn-Knopp equipartition of prototype scores (the older SwAV form the released code uses).

Behaviour doc, item 8: Q = exp(scores / epsilon).T is K x B; infinities are replaced by the largest
value; Q is normalised to sum 1 over all processes; then `iterations` rounds of row scaling (row sums
all-reduced, target 1/K) and column scaling (target 1/(world_size * B)); the columns of the result are
normalised to sum 1 and returned as B x K in float32.
"""
import torch
import torch.distributed as dist


def _all_reduce(t, world_size, op=dist.ReduceOp.SUM):
    if world_size > 1:
        dist.all_reduce(t, op=op)
    return t


def shoot_infs(t):
    """Replace +-inf by the maximum of the tensor with the infinities set to 0 (released `shoot_infs`)."""
    mask = torch.isinf(t)
    m = torch.where(mask, torch.zeros_like(t), t).max()
    return torch.where(mask, m, t)


@torch.no_grad()
def sinkhorn(scores, epsilon, iterations, improve_numerical_stability=False, world_size=1):
    """Soft assignments (B x K, rows sum to 1) of the scores B x K of this process's batch.

    With world_size > 1 the normalisations are all-reduced over the default process group, so the
    result equals one process running on the concatenated batch.
    """
    out = scores.detach().float()
    if improve_numerical_stability:
        m = _all_reduce(out.max().clone(), world_size, dist.ReduceOp.MAX)
        out = out - m
    q = shoot_infs(torch.exp(out / epsilon).t())
    q = q / _all_reduce(q.sum(), world_size)
    k, b = q.shape
    r = torch.full((k,), 1.0 / k, device=q.device, dtype=q.dtype)
    c = torch.full((b,), 1.0 / (world_size * b), device=q.device, dtype=q.dtype)
    for _ in range(iterations):
        u = _all_reduce(q.sum(dim=1), world_size)
        u = shoot_infs(r / u)
        q = q * u.unsqueeze(1)
        q = q * (c / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t().float()
