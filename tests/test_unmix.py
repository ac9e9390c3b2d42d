"""Un-Mix draws, boxes and mixtures: the released arithmetic (tests/reference_unmix.py) and the device
mixing from staged numbers (src/method/unmix.py), which must give the very same tensors."""
import numpy as np
import pytest
import torch

from src.method.staging import StepInputs
from src.method.unmix import UnmixDraws, draw_unmix, mix_pairs, mixing_numbers, pair_sizes, region_box, unmix_views
from tests.reference_unmix import mix_with_reversed, unmix_inputs

# ---------------------------------------------------------------- boxes and mixtures

@pytest.mark.parametrize("w,h,lam,cx,cy,box", [
    (32, 32, 0.75, 16, 16, (8, 8, 24, 24)),      # cut 0.5 -> 16 x 16, centred
    (32, 32, 0.75, 0, 0, (0, 0, 8, 8)),          # clipped at the low border
    (32, 32, 0.75, 31, 2, (23, 0, 32, 10)),      # clipped at the high border (x) and low (y)
    (32, 32, 0.0, 16, 16, (0, 0, 32, 32)),       # cut 1: the whole image
    (32, 32, 1.0, 5, 7, (5, 7, 5, 7)),           # cut 0: empty box
    (10, 10, 0.51, 5, 5, (2, 2, 8, 8)),          # cut_w = int(7.0000001) = 7, 7 // 2 = 3 each side: 6 wide
    (8, 4, 0.75, 7, 0, (5, 0, 8, 1)),            # non-square: cut_w = 4, cut_h = 2
])
def test_region_box(w, h, lam, cx, cy, box):
    assert region_box(w, h, lam, cx, cy) == box


def test_mix_global_is_lam_x_plus_reversed():
    x = torch.arange(3 * 1 * 2 * 2, dtype=torch.float32).reshape(3, 1, 2, 2)
    lam = 0.3
    mixed, used = mix_with_reversed(x, lam, global_mix=True)
    assert used == lam
    for i in range(3):
        assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[2 - i])
    assert torch.equal(x, torch.arange(12, dtype=torch.float32).reshape(3, 1, 2, 2))


def test_mix_region_pastes_the_reversed_box_and_adjusts_lam():
    # size[2] = 4 rows ("W" in the released code), size[3] = 6 columns ("H")
    x = torch.stack([torch.zeros(1, 4, 6), torch.ones(1, 4, 6)])
    # lam 0.75 -> cut 0.5 -> cut_w = 2 (dim 2), cut_h = 3 (dim 3); centre (3, 0):
    # x1 = 2, x2 = min(4, 4) = 4, y1 = max(-1, 0) = 0, y2 = 1 -> 2 x 1 box
    mixed, lam = mix_with_reversed(x, 0.75, global_mix=False, center=(3, 0))
    expected0 = torch.tensor([[0, 0, 0, 0, 0, 0],
                              [0, 0, 0, 0, 0, 0],
                              [1, 0, 0, 0, 0, 0],
                              [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(mixed[0, 0], expected0)
    assert torch.equal(mixed[1, 0], 1 - expected0)
    assert lam == pytest.approx(1 - 2 * 1 / 24)
    assert torch.equal(x[0], torch.zeros(1, 4, 6))  # input untouched


def test_unmix_inputs_order_global():
    bs = 4
    crops = [torch.full((bs, 3, 8, 8), float(v)) + torch.arange(bs).view(bs, 1, 1, 1) for v in (0, 10, 20, 30)]
    inputs, lam = unmix_inputs(crops, UnmixDraws(r=0.1, lam=0.7), unmix_prob=0.5)
    assert lam == 0.7
    assert len(inputs) == 6
    for got, want in zip([inputs[0], inputs[1], inputs[3], inputs[4]], crops):
        assert torch.equal(got, want)
    for m, src in ((inputs[2], crops[0]), (inputs[5], crops[2])):
        assert torch.allclose(m, 0.7 * src + 0.3 * torch.flip(src, dims=[0]))


def test_unmix_inputs_region_lam_of_pair0_sizes_pair1():
    crops = [torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)]) for _ in range(4)]
    draws = UnmixDraws(r=0.9, lam=0.75, centers=[(0, 0), (30, 16)])
    inputs, lam = unmix_inputs(crops, draws, unmix_prob=0.5)
    # pair 0: cut 0.5 -> 16, box (0, 0, 8, 8) -> lam' = 1 - 64 / 1024 = 0.9375
    expected = torch.zeros(32, 32)
    expected[0:8, 0:8] = 1
    assert torch.equal(inputs[2][0, 0], expected)
    # pair 1 uses lam' (cut 0.25 -> 8), not 0.75: box x 26..32 (clipped), y 12..20
    expected = torch.zeros(32, 32)
    expected[26:32, 12:20] = 1
    assert torch.equal(inputs[5][0, 1], expected)
    assert lam == pytest.approx(1 - 6 * 8 / 1024)


def test_odd_number_of_crops_is_a_value_error():
    crops = [torch.zeros(2, 3, 8, 8)] * 3
    with pytest.raises(ValueError, match="pairs"):
        unmix_inputs(crops, UnmixDraws(r=0.1, lam=0.5), 0.5)


def seeds_by_mode():
    glob, region = None, None
    for seed in range(100):
        r = np.random.RandomState(seed).rand(1)[0]
        if r < 0.5 and glob is None:
            glob = seed
        if r >= 0.5 and region is None:
            region = seed
    return glob, region


@pytest.mark.parametrize("mode", ["global", "region"])
def test_draw_unmix_consumes_the_released_sequence(mode):
    seed = seeds_by_mode()[mode == "region"]
    sizes = [(32, 8), (16, 4)]
    rng = np.random.RandomState(seed)
    d = draw_unmix(rng, 1.0, 0.5, sizes)
    ref = np.random.RandomState(seed)
    r = ref.rand(1)[0]
    lam = ref.beta(1.0, 1.0)
    assert d.r == r and d.lam == lam
    if mode == "global":
        assert r < 0.5 and d.centers is None
    else:
        assert r >= 0.5
        centers = []
        for w, h in sizes:
            cx = ref.randint(w)
            cy = ref.randint(h)
            centers.append((cx, cy))
        assert d.centers == centers
    # both streams are at the same point afterwards
    assert rng.randint(1 << 30) == ref.randint(1 << 30)


def test_draw_unmix_without_pairs_draws_r_and_lam_only():
    """Plain SwAV (no pairs) still consumes r and lam, and nothing else, in region mode too."""
    seed = seeds_by_mode()[1]
    rng, ref = np.random.RandomState(seed), np.random.RandomState(seed)
    d = draw_unmix(rng, 1.0, 0.5, [])
    assert d.r == ref.rand(1)[0] and d.lam == ref.beta(1.0, 1.0)
    assert d.centers == []
    assert rng.randint(1 << 30) == ref.randint(1 << 30)


def test_pair_sizes():
    crops = [torch.zeros(2, 3, 32, 24), torch.zeros(2, 3, 32, 24), torch.zeros(2, 3, 16, 12),
             torch.zeros(2, 3, 16, 12)]
    assert pair_sizes(crops) == [(32, 24), (16, 12)]


def test_unmix_views():
    # blocks x0, x1, m0, x2, x3, m1 = 0..5
    assert unmix_views(1) == ((0, 1), (2, 1))
    assert unmix_views(2) == ((0, 1, 3, 4), (2, 1, 5, 4))


# ---------------------------------------------------------------- the numbers and the device mixing

def test_mixing_numbers_global():
    numbers = mixing_numbers(UnmixDraws(r=0.1, lam=0.7), unmix_prob=0.5, pair_sizes=[(32, 32), (16, 16)])
    assert numbers == {"mode": 0, "mix_a": 0.7, "mix_b": 1.0 - 0.7, "boxes": [(0, 0, 0, 0)] * 2, "lam": 0.7,
                       "one_minus_lam": 1.0 - 0.7}


def test_mixing_numbers_region_boxes_and_the_lam_of_the_loss():
    """The released quirk: the lam left by pair 0's box sizes pair 1's box; the loss uses the last one."""
    draws = UnmixDraws(r=0.9, lam=0.75, centers=[(0, 0), (30, 16)])
    numbers = mixing_numbers(draws, unmix_prob=0.5, pair_sizes=[(32, 32), (32, 32)])
    assert numbers["mode"] == 1
    assert numbers["boxes"] == [(0, 0, 8, 8), (26, 12, 32, 20)]
    _, lam = unmix_inputs([torch.zeros(2, 1, 32, 32)] * 4, draws, 0.5)
    assert numbers["lam"] == lam and numbers["one_minus_lam"] == 1.0 - lam


def device_numbers(draws, sizes, unmix_prob=0.5):
    """The numbers as the iteration reads them: staged, then read on the device."""
    staged = StepInputs("cpu", unmix_prob, 1.0, sizes)
    staged.give(0, draws, lr=0.1)
    return staged.next_numbers()


@pytest.mark.parametrize("draws", [UnmixDraws(r=0.1, lam=0.7123), UnmixDraws(r=0.2, lam=0.0),
                                   UnmixDraws(r=0.9, lam=0.6, centers=[(3, 29), (12, 5)]),
                                   UnmixDraws(r=0.9, lam=0.05, centers=[(16, 16), (0, 31)]),
                                   UnmixDraws(r=0.9, lam=1.0, centers=[(7, 7), (8, 8)])],
                         ids=["global", "global-lam0", "region", "region-large", "region-empty"])
def test_device_mixing_equals_the_released_arithmetic_bit_for_bit(draws):
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(6, 3, 32, 32, generator=g) for _ in range(4)]
    ours = mix_pairs(crops, device_numbers(draws, pair_sizes(crops)))
    released, _ = unmix_inputs(crops, draws, 0.5)
    assert len(ours) == len(released) == 6
    for a, b in zip(ours, released):
        assert torch.equal(a, b)


def test_device_mixing_of_pairs_of_other_sizes():
    """Multi-crop: each pair's box and mask have that pair's size."""
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
    draws = UnmixDraws(r=0.7, lam=0.4, centers=[(20, 3), (15, 15)])
    for a, b in zip(mix_pairs(crops, device_numbers(draws, pair_sizes(crops))), unmix_inputs(crops, draws, 0.5)[0]):
        assert torch.equal(a, b)


def test_device_mixing_of_an_odd_number_of_crops_is_a_value_error():
    with pytest.raises(ValueError, match="pairs"):
        mix_pairs([torch.zeros(2, 3, 8, 8)] * 3, device_numbers(UnmixDraws(r=0.1, lam=0.5), [(8, 8)]))
