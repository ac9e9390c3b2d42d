"""Small distributed utilities that the distributed tests and their torchrun workers use."""
import torch
import torch.distributed as dist


def is_main_process(args) -> bool:
    return getattr(args, "rank", 0) == 0


def all_reduce_sum_(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """In-place sum over all processes (no-op for one process); returns ``tensor``."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
