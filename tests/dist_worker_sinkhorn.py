"""torchrun worker for tests/test_distributed.py: distributed Sinkhorn on 2 processes (gloo, CPU).

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker_sinkhorn.py OUT_PREFIX
Joins the group through src.runtime.launch.init_distributed (torchrun variables), takes its slice of a
fixed score matrix, runs sinkhorn(world_size=2), then the start-up agreement helpers on values that
agree and disagree, and writes OUT_PREFIX.rank{r}.pt.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.method.sinkhorn import sinkhorn  # noqa: E402
from src.runtime import launch, signals, startup  # noqa: E402
from tests.dist_helpers import all_reduce_sum_  # noqa: E402

BATCH_PER_RANK = 7  # odd on purpose
PROTOTYPES = 5
CASES = [  # (epsilon, iterations, improve_numerical_stability)
    (0.05, 3, False),
    (0.05, 3, True),
    (0.5, 10, False),
]


def full_scores(world_size):
    """Cosine-like scores in [-1, 1] for the concatenated batch (same on every rank, no global RNG)."""
    g = torch.Generator().manual_seed(2024)
    return torch.rand(world_size * BATCH_PER_RANK, PROTOTYPES, generator=g) * 2 - 1


def main():
    out_prefix = sys.argv[1]
    args = argparse.Namespace(dist_url="env://", rank=0, world_size=-1, local_rank=0)
    env = launch.init_distributed(args)
    assert env.source == "torchrun" and args.world_size == 2, env
    assert args.device.type == "cpu"
    scores = full_scores(args.world_size)
    mine = scores[args.rank * BATCH_PER_RANK:(args.rank + 1) * BATCH_PER_RANK]
    results = [sinkhorn(mine, eps, it, stab, world_size=args.world_size) for eps, it, stab in CASES]
    flag = all_reduce_sum_(torch.tensor([float(args.rank + 1)]), args.world_size)
    handler = signals.PreemptionHandler()
    if args.rank == 1:
        handler.requested = True  # as if only rank 1 got SIGUSR1
    agreed = handler.should_stop(args.world_size, args.device)
    flags = argparse.Namespace(base_lr=0.6, nmb_crops=[2], rank=args.rank, data_path=f"/node{args.rank}/data")
    agreement = {
        "same": startup.first_disagreement({"images": 100, "pixels": startup.fingerprint(b"same")}, args.world_size),
        "count": startup.first_disagreement({"images": 100 - 10 * args.rank, "pixels": 7}, args.world_size),
        "hash": startup.first_disagreement({"images": 100, "pixels": startup.fingerprint(bytes([args.rank]))}, args.world_size),
        "per_process_flags": startup.first_disagreement(startup.flag_fingerprints(flags), args.world_size),
        "flags": startup.first_disagreement(startup.flag_fingerprints(argparse.Namespace(**dict(
            vars(flags), base_lr=0.6 + args.rank))), args.world_size),
        "no_problem": startup.first_problem(None, args.world_size),
        "problem": startup.first_problem("refused by rank 1" if args.rank == 1 else None, args.world_size),
    }
    torch.save({"env": vars(env), "results": results, "sum": flag.item(), "agreed_stop": agreed,
                "agreement": agreement}, f"{out_prefix}.rank{args.rank}.pt")
    launch.barrier(args.world_size)
    launch.cleanup()


if __name__ == "__main__":
    main()
