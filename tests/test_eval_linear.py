"""The linear classifier of eval_linear.py (released `RegLog`)."""
import pytest
import torch

from eval_linear import RegLog


@pytest.mark.parametrize("use_bn", [False, True])
def test_reglog_with_global_pooling_has_no_batchnorm_as_released(use_bn):
    """Released: the BatchNorm of --use_bn exists only without global pooling; with it, pooling + linear."""
    torch.manual_seed(0)
    head = RegLog(10, 64, global_avg=True, use_bn=use_bn)
    assert head.bn is None
    assert set(head.state_dict()) == {"linear.weight", "linear.bias"}
    assert head.linear.weight.std().item() == pytest.approx(0.01, rel=0.1) and not head.linear.bias.any()
    x = torch.randn(4, 64, 5, 5)
    expected = x.mean(dim=(2, 3)) @ head.linear.weight.T + head.linear.bias
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_reglog_without_global_pooling_is_refused():
    with pytest.raises(ValueError, match="--global_pooling true"):
        RegLog(10, 64, global_avg=False, use_bn=True)
