"""torchrun worker for tests/test_knn.py: kNN monitor on 2 processes (gloo, CPU).

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker_knn.py OUT_PREFIX
Each rank writes OUT_PREFIX.rank{r}.pt with its gathered features, the monitor's kNN top-1 and the top-5
of the kNN classifier on the gathered features.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.eval.knn import extract_features, knn_monitor  # noqa: E402
from tests.reference_knn import knn_accuracy  # noqa: E402


def make_problem():
    """Deterministic images with class structure and a fixed tiny conv 'backbone' (no global RNG)."""
    g = torch.Generator().manual_seed(1234)
    num_classes = 4
    protos = torch.randn(num_classes, 3, 8, 8, generator=g)

    def split(n):
        y = torch.arange(n) % num_classes
        x = protos[y] + 1.5 * torch.randn(n, 3, 8, 8, generator=g)
        return x, y

    train_x, train_y = split(37)   # odd sizes: shards of unequal length need padding
    test_x, test_y = split(23)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        conv.bias.zero_()
    conv.eval()

    def backbone_fn(x):
        return torch.relu(conv(x)).mean(dim=(2, 3))

    return backbone_fn, train_x, train_y, test_x, test_y, num_classes


def main():
    out_prefix = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    backbone_fn, train_x, train_y, test_x, test_y, c = make_problem()
    feats = extract_features(backbone_fn, train_x, batch_size=5, device="cpu", rank=rank, world_size=world)
    top1 = knn_monitor(backbone_fn, train_x, train_y, test_x, test_y, c, batch_size=5, device="cpu",
                       rank=rank, world_size=world, k=7, temperature=0.1)
    test_feats = extract_features(backbone_fn, test_x, batch_size=5, device="cpu", rank=rank, world_size=world)
    _, top5 = knn_accuracy(feats, train_y, test_feats, test_y, c, k=7, temperature=0.1)
    top1_only = knn_monitor(backbone_fn, train_x, train_y, test_x, test_y, c, batch_size=4, device="cpu",
                            rank=rank, world_size=world, k=7, temperature=0.1)
    torch.save({"features": feats, "top1": top1, "top5": top5, "top1_only": top1_only},
               f"{out_prefix}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
