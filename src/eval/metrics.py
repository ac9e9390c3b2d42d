"""Top-k accuracy counts, the one definition every classifier here is scored with (the linear
evaluation, the fine-tuning, the cached and batched probes, the kNN monitor)."""
import torch


def correct_counts(output, target, ks=(1, 5)):
    """How many rows of `output` (N x C scores) have their `target` class among their k highest scores,
    for each k in `ks`; k is capped at C (top-5 of 3 classes is top-3). An int64 tensor on `output`'s
    device, one count per k, made without synchronising with the host (`.tolist()` gives the numbers)."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    target = torch.as_tensor(target, device=output.device).view(-1, 1)
    within = pred.eq(target).sum(dim=0).cumsum(dim=0)  # [j]: rows whose target ranks j-th or better
    return torch.stack([within[min(k, maxk) - 1] for k in ks])
