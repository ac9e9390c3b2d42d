"""Top-k accuracy counts (src/eval/metrics.py), the one definition of every evaluation's top-1/top-5."""
import pytest
import torch

from src.eval.metrics import correct_counts


def rank_of_target(output, target):
    """0-based position of each row's target when the row is sorted by decreasing score (no ties)."""
    order = output.argsort(dim=1, descending=True)
    return (order == target.view(-1, 1)).float().argmax(dim=1)


def test_hand_computed_counts():
    output = torch.tensor([[0.1, 0.9, 0.0],    # target 1: first
                           [0.5, 0.2, 0.3],    # target 2: second
                           [0.2, 0.3, 0.5]])   # target 0: third
    target = torch.tensor([1, 2, 0])
    assert correct_counts(output, target, (1, 2, 3)).tolist() == [1, 2, 3]
    assert correct_counts(output, target, (1, 5)).tolist() == [1, 3]  # top-5 of 3 classes is top-3
    assert correct_counts(output, target, (2,)).tolist() == [2]


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_counts_equal_the_rank_of_the_target(classes):
    g = torch.Generator().manual_seed(classes)
    output = torch.randn(500, classes, generator=g)
    target = torch.randint(0, classes, (500,), generator=g)
    ranks = rank_of_target(output, target)
    counts = correct_counts(output, target, (1, 5))
    assert counts.dtype == torch.int64 and counts.device == output.device
    assert counts.tolist() == [int((ranks < 1).sum()), int((ranks < min(5, classes)).sum())]
    # a list or NumPy target counts alike
    assert correct_counts(output, target.numpy(), (1, 5)).tolist() == counts.tolist()
