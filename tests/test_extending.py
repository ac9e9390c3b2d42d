"""docs/extending.md is true: a mixing mode added from outside src/method through the public structure
(`MixingMode`, `SwavConfig.mixing_modes`) is drawn, staged and mixed on the device, and the iteration
still launches one op trace whatever mode was drawn."""
import numpy as np
import torch

from src.method.larc import build_optimizer
from src.method.resnet import resnet18
from src.method.staging import StepInputs
from src.method.swav import SwavConfig
from src.method.train_step import UnmixSwAV
from src.method.unmix import GLOBAL, REGION, MixingMode, UnmixDraws, draw_unmix, mix_pairs, pick_mode
from tests.test_train_step import OpTrace

THREADS = 1  # small tensors: one intra-op thread (tests/conftest.py)


def mosaic_box(lam, w, h, center):
    """A 2 x 2 mosaic split at the drawn point: the pair's "box" holds the split; lam = the kept area."""
    cx, cy = center
    return (cx, cy, cx, cy), (cx * cy + (w - cx) * (h - cy)) / (w * h)


def mosaic_weights(numbers, box, rows, cols):
    """Top-left and bottom-right quarters from x, the other two from the reversed batch."""
    other = ((rows < box[0])[:, None] ^ (cols < box[1])[None, :]).to(numbers.mix_a.dtype)
    return 1 - other, other


MOSAIC = MixingMode("mosaic", picked=lambda r, unmix_prob: r >= 0.75, draws_centers=True, box=mosaic_box,
                    weights=mosaic_weights)
MODES = (GLOBAL, MOSAIC, REGION)  # r < 0.5 global, r >= 0.75 mosaic, else region


def mosaic_by_hand(x, cx, cy):
    reversed_x = torch.flip(x, dims=[0])
    mixed = x.clone()
    mixed[:, :, :cx, cy:] = reversed_x[:, :, :cx, cy:]
    mixed[:, :, cx:, :cy] = reversed_x[:, :, cx:, :cy]
    return mixed


def test_a_new_mode_is_drawn_staged_and_mixed():
    seed = next(s for s in range(100) if np.random.RandomState(s).rand(1)[0] >= 0.75)
    draws = draw_unmix(np.random.RandomState(seed), 1.0, 0.5, [(8, 8)], MODES)
    assert draws.centers is not None  # the mode asked for a point per pair
    staged = StepInputs("cpu", 0.5, 1.0, [(8, 8)], modes=MODES)
    staged.give(0, draws, lr=0.1)
    numbers = staged.next_numbers()
    assert numbers.mode.item() == 1
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cx, cy = draws.centers[0]
    assert torch.equal(mix_pairs([x, x], numbers, MODES)[2], mosaic_by_hand(x, cx, cy))
    assert numbers.lam.item() == np.float32(mosaic_box(draws.lam, 8, 8, (cx, cy))[1])
    # the released modes are untouched by the new one
    staged.give(1, UnmixDraws(r=0.6, lam=0.75, centers=[(4, 4)]), lr=0.1)
    assert staged.next_numbers().mode.item() == 2


def test_training_with_the_new_mode_launches_one_trace():
    torch.manual_seed(0)
    net = resnet18(width_per_group=8, output_dim=16, hidden_mlp=32, nmb_prototypes=10, normalize=True)
    cfg = SwavConfig(batch_size=4, feat_dim=16, size_crops=(16,), mixing_modes=MODES)
    method = UnmixSwAV(net, build_optimizer(net.parameters(), lr=0.5), cfg, rng=np.random.RandomState(0),
                       lr_schedule=np.linspace(0.6, 0.1, 10), skip_nonfinite=True, chunk=10)
    method.start_epoch(0, iters_per_epoch=10)
    g = torch.Generator().manual_seed(1)
    same_stream = np.random.RandomState(0)
    modes = {pick_mode(draw_unmix(same_stream, 1.0, 0.5, [(16, 16)], MODES).r, 0.5, MODES) for _ in range(10)}
    traces = set()
    for it in range(10):
        method.inputs.ensure(it)  # staged outside the traced steps
        crops = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
        with OpTrace() as t:
            loss = method.step(crops, it).loss
        assert torch.isfinite(loss) and t.host_reads == []
        if it > 0:  # the first iteration creates the momentum buffers
            traces.add(tuple(t.ops))
    assert modes == {0, 1, 2} and len(traces) == 1
