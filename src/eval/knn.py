"""Weighted k-nearest-neighbour monitor (InstDisc / DINO style).

The test split is classified against the un-augmented training split with cosine similarity of
L2-normalised backbone features: the k most similar training samples vote for their label with weight
exp(similarity / temperature). Everything here runs without gradients and draws no random numbers, so
calling it between training epochs leaves the training RNG streams (torch, CUDA, NumPy) untouched.

Distributed use: every process computes the features of its strided shard (`images[rank::world_size]`);
the training features are gathered back in their original order on every rank, the test samples are
classified shard by shard and the counts are summed, so every rank returns the same accuracy.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .linear_probe import extract_frozen_features
from .metrics import correct_counts

__all__ = ["extract_features", "knn_scores", "knn_monitor"]


def _dist_active(world_size):
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _comm_device(device):
    """NCCL needs CUDA tensors; every other backend (gloo) gets CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device(device)
    return torch.device("cpu")


@torch.no_grad()
def _local_features(backbone_fn, images, batch_size, device):
    """L2-normalised float32 features of `images`, in order, on `device` (None when `images` is empty)."""
    if images.shape[0] == 0:
        return None
    return F.normalize(extract_frozen_features(backbone_fn, images, batch_size, device), dim=1)


@torch.no_grad()
def extract_features(backbone_fn, images, batch_size, device, rank=0, world_size=1):
    """Features of all `images` (N x 3 x H x W, normalised float), L2-normalised, N x D float32 on `device`.

    Each rank runs `backbone_fn` on `images[rank::world_size]`; with `world_size > 1` (and an initialised
    process group) the shards are padded to equal length, all-gathered and interleaved back into the
    original order, so every rank returns the same N x D tensor. No random numbers are drawn.
    """
    device = torch.device(device)
    n = images.shape[0]
    if not _dist_active(world_size):
        out = _local_features(backbone_fn, images, batch_size, device)
        if out is None:
            raise ValueError("extract_features: no images")
        return out

    local = _local_features(backbone_fn, images[rank::world_size], batch_size, device)
    cdev = _comm_device(device)
    # the feature width, known to every rank even when its shard is empty (n < world_size)
    dim = torch.tensor([0 if local is None else local.shape[1]], dtype=torch.long, device=cdev)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    dim = int(dim.item())
    per_rank = (n + world_size - 1) // world_size
    padded = torch.zeros(per_rank, dim, dtype=torch.float32, device=cdev)
    if local is not None:
        padded[:local.shape[0]] = local.to(cdev)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    # row m of rank r is sample m * world_size + r; padding rows land after sample n - 1
    full = torch.stack(gathered, dim=1).reshape(per_rank * world_size, dim)[:n]
    return full.to(device)


@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1,
               batch_size=256):
    """Class scores (N_test x num_classes): sum over the k most cosine-similar training samples of
    one_hot(label) * exp(similarity / temperature). Features are L2-normalised here (no-op if already)."""
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float().to(train_features.device), dim=1)
    train_labels = torch.as_tensor(train_labels, dtype=torch.long, device=train_features.device)
    k = min(k, train_features.shape[0])
    out = []
    for start in range(0, test_features.shape[0], batch_size):
        q = test_features[start:start + batch_size]
        sim = q @ train_features.T                                  # B x N_train
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[top_idx]                    # B x k
        weights = (top_sim / temperature).exp()                     # B x k
        one_hot = torch.zeros(q.shape[0], k, num_classes, device=q.device)
        one_hot.scatter_(2, neighbour_labels.unsqueeze(-1), 1.0)
        out.append((one_hot * weights.unsqueeze(-1)).sum(dim=1))
    if not out:
        return torch.zeros(0, num_classes, device=train_features.device)
    return torch.cat(out)


@torch.no_grad()
def knn_monitor(backbone_fn, train_images, train_labels, test_images, test_labels, num_classes, batch_size,
                device, rank=0, world_size=1, k=200, temperature=0.1, autocast_dtype=None):
    """Weighted-kNN top-1 (%) of the test split against the training split; the same value on all ranks.

    `backbone_fn(x)` returns pooled backbone features (B x D) or a layer4 map (pooled here); the caller puts
    the model in eval mode. Training features are computed in shards and gathered; test samples are
    classified in shards (`test_images[rank::world_size]`) and the correct counts are all-reduced.
    `autocast_dtype` (e.g. bfloat16 on CUDA): the backbone runs under autocast; the features, their
    similarities and the votes stay float32. The images may already be on `device` (no copy then) or in
    pinned host memory (copied without blocking).
    """
    device = torch.device(device)
    backbone_fn = _under_autocast(backbone_fn, device, autocast_dtype)
    train_f = extract_features(backbone_fn, train_images, batch_size, device, rank, world_size)
    train_labels = torch.as_tensor(train_labels, dtype=torch.long).to(device)
    test_labels = torch.as_tensor(test_labels, dtype=torch.long)
    distributed = _dist_active(world_size)
    if distributed:
        test_images, test_labels = test_images[rank::world_size], test_labels[rank::world_size]
    test_f = _local_features(backbone_fn, test_images, batch_size, device)
    if test_f is None:
        c1 = n = 0
    else:
        scores = knn_scores(train_f, train_labels, test_f, num_classes, k, temperature, batch_size)
        c1, n = int(correct_counts(scores, test_labels.to(device), (1,))), test_f.shape[0]
    if distributed:
        counts = torch.tensor([c1, n], dtype=torch.float64, device=_comm_device(device))
        dist.all_reduce(counts)
        c1, n = (float(v) for v in counts.tolist())
    return 100.0 * c1 / max(n, 1)


def _under_autocast(backbone_fn, device, dtype):
    """`backbone_fn` run under autocast to `dtype` (None: as it is)."""
    if dtype is None:
        return backbone_fn

    def run(x):
        with torch.autocast(device.type, dtype=dtype):
            return backbone_fn(x)
    return run


def monitor_images(images, device, on_device):
    """Where and in which type the monitor keeps its (normalised float32) images: as they are for a CPU
    run (float32: CPU results unchanged); for CUDA in bfloat16, the monitor's precision there (autocast
    casts a convolution's input to it anyway), on the device when `on_device` (the bank is copied once,
    not every epoch), else in pinned host memory (non-blocking copies of each batch)."""
    device = torch.device(device)
    if device.type != "cuda":
        return images
    images = images.to(torch.bfloat16)
    return images.to(device) if on_device else images.pin_memory()
