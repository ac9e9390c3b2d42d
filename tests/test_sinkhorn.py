"""Sinkhorn-Knopp (older SwAV form): marginals, equivariance, infinities, stability, dtypes."""
import numpy as np
import pytest
import torch

from src.method.sinkhorn import shoot_infs, sinkhorn


def reference(scores, epsilon, iterations):
    """docs/released-behaviour.md, item 8, written out with NumPy in float64 and explicit loops."""
    s = np.asarray(scores, dtype=np.float64)
    b, k = s.shape
    q = np.exp(s / epsilon).T  # K x B
    q = q / q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row] *= (1.0 / k) / q[row].sum()
        for col in range(b):
            q[:, col] *= (1.0 / b) / q[:, col].sum()
    return (q / q.sum(axis=0, keepdims=True)).T


def scores(b=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, 8, generator=g), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(k, 8, generator=g), dim=1)
    return emb @ protos.t()  # cosine scores in [-1, 1], as in training


@pytest.mark.parametrize("iterations", [0, 1, 3, 10])
def test_matches_explicit_formula(iterations):
    s = scores()
    q = sinkhorn(s, 0.05, iterations)
    assert q.shape == s.shape and q.dtype == torch.float32
    np.testing.assert_allclose(q.numpy(), reference(s.numpy(), 0.05, iterations), rtol=1e-4, atol=1e-6)


def test_rows_sum_to_one():
    q = sinkhorn(scores(), 0.05, 3)
    assert torch.allclose(q.sum(dim=1), torch.ones(12), atol=1e-6)
    assert torch.all(q >= 0)


def test_columns_become_uniform_with_iterations():
    s = scores(b=12, k=4)
    b, k = s.shape
    few = sinkhorn(s, 0.05, 0).sum(dim=0)
    many = sinkhorn(s, 0.05, 200).sum(dim=0)
    uniform = torch.full((k,), b / k)
    assert torch.allclose(many, uniform, atol=1e-3)
    assert not torch.allclose(few, uniform, atol=0.1)  # the iterations are what equipartitions


def test_permutation_equivariant_over_the_batch():
    s = scores(b=10, k=5, seed=3)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sinkhorn(s[perm], 0.05, 3), sinkhorn(s, 0.05, 3)[perm], atol=1e-6)


def test_shoot_infs_uses_max_with_infs_zeroed():
    t = torch.tensor([[1.0, float("inf"), 3.0], [2.0, 5.0, -float("inf")]])
    assert torch.equal(shoot_infs(t), torch.tensor([[1.0, 5.0, 3.0], [2.0, 5.0, 5.0]]))
    # all finite values negative: the zeros put in place of the infinities are the maximum
    t = torch.tensor([-1.0, float("inf"), -3.0])
    assert torch.equal(shoot_infs(t), torch.tensor([-1.0, 0.0, -3.0]))
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(shoot_infs(t), t)


def test_inf_scores_are_shot_down():
    s = scores(b=6, k=3)
    s[2, 1] = float("inf")
    s[4, 0] = 10.0  # exp(10 / 0.05) overflows float32 too
    q = sinkhorn(s, 0.05, 3)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-6)
    # the overflowed entries took the largest finite value, so those samples go mostly to that prototype
    assert q[2].argmax() == 1 and q[4].argmax() == 0


def test_improve_numerical_stability():
    s = scores()
    assert torch.allclose(sinkhorn(s, 0.05, 3, improve_numerical_stability=True), sinkhorn(s, 0.05, 3),
                          atol=1e-5)
    huge = 6.0 + scores()  # scores >= 5: exp(s / 0.05) >= exp(100) is inf everywhere in float32
    plain = sinkhorn(huge, 0.05, 3)
    stable = sinkhorn(huge, 0.05, 3, improve_numerical_stability=True)
    assert not torch.isfinite(plain).all()
    assert torch.isfinite(stable).all()
    assert torch.allclose(stable.sum(dim=1), torch.ones(12), atol=1e-6)
    # shifting all scores by a constant does not change the assignment
    assert torch.allclose(stable, sinkhorn(s, 0.05, 3), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_gives_float32(dtype):
    s = scores().to(dtype)
    q = sinkhorn(s, 0.05, 3)
    assert q.dtype == torch.float32
    assert torch.equal(q, sinkhorn(s.float(), 0.05, 3))
    assert torch.isfinite(q).all()


def test_no_gradient_and_input_untouched():
    s = scores().requires_grad_(True)
    before = s.detach().clone()
    q = sinkhorn(s, 0.05, 3)
    assert not q.requires_grad
    assert torch.equal(s.detach(), before)


def test_batched_problems_each_equal_their_own_solution():
    """n x B x K: each problem normalised on its own, as n separate calls (to float round-off)."""
    probs = torch.stack([scores(seed=s) for s in range(3)] + [6.0 + scores(seed=4)])
    for stable in (False, True):
        batched = sinkhorn(probs, 0.05, 3, improve_numerical_stability=stable)
        assert batched.shape == probs.shape
        for p, q in zip(probs, batched):
            torch.testing.assert_close(q, sinkhorn(p, 0.05, 3, improve_numerical_stability=stable),
                                       rtol=0, atol=1e-6, equal_nan=True)


def test_shoot_infs_per_problem():
    t = torch.tensor([[[1.0, float("inf")]], [[7.0, float("inf")]]])
    assert torch.equal(shoot_infs(t, dims=(-2, -1)), torch.tensor([[[1.0, 1.0]], [[7.0, 7.0]]]))
