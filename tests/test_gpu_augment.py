"""The batched on-device multi-crop augmentation (src/data/augment.py) against torchvision.

1. For fixed per-sample parameters every batched op (and its per-operation form in
   tests/reference_augment.py) equals torchvision's functional tensor ops applied image by image (max abs
   difference <= 1e-5 on float images).
2. Its random draws have torchvision's distributions: Kolmogorov-Smirnov tests against
   `RandomResizedCrop.get_params` (also where the centre-crop fallback is frequent), uniform jitter
   factors, application rates, uniform op orders.
3. The per-rank batches equal DistributedSampler + DataLoader(drop_last=True).
4. GPUMultiCrop: shapes, order, dtypes, normalisation, determinism, whole-pipeline distribution.
Also measured (printed with `pytest -s`, loosely bounded): the difference between torchvision's PIL path
(what the released code runs) and the tensor semantics matched here, on real CIFAR-10 images.
"""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from scipy import stats

from src.data import augment as ga, constants, sampling
from src.data import crops as batch_crops
from tests import reference_augment as ref_ops

TOL = 1e-5
ALPHA = 0.01
N_KS = 20000
CIFAR_JPG = Path(__file__).resolve().parent / "data" / "cifar10_jpg_small" / "train"


THREADS = 1  # small tensors: one intra-op thread (tests/conftest.py)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_images(n=24, h=32, w=32, seed=0):
    """Float images in [0, 1] with the hard cases mixed in: grey pixels, black/white, saturated colours,
    ties between channel maxima, and smooth colour gradients."""
    g = gen(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    x[2] = torch.rand(1, h, w, generator=g).expand(3, h, w)  # grey
    x[3, 0], x[3, 1], x[3, 2] = 1.0, 0.0, 0.0  # pure red
    x[4, :2] = torch.rand(1, h, w, generator=g)  # r == g ties
    x[5, 1:] = torch.rand(1, h, w, generator=g)  # g == b ties
    x[6] = (torch.rand(3, h, w, generator=g) * 4).round() / 4  # many exact ties
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    x[7] = torch.stack([yy, xx, 1 - yy * xx])
    x[7] = x[7].clamp(0, 1)
    return x


def per_image(fn, x, *args):
    return torch.stack([fn(x[i], *[a[i] if isinstance(a, (list, tuple)) else a for a in args])
                        for i in range(x.shape[0])])


def maxdiff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- 1.

@pytest.mark.parametrize("h,w,size", [(32, 32, 32), (32, 32, 16), (32, 32, 48), (24, 40, 28)])
def test_resized_crop_matches_torchvision(h, w, size):
    x = make_images(16, h, w)
    top, left, ch, cw = batch_crops.sample_resized_crop_params(h, w, 16, (0.02, 1.0), generator=gen(1))
    # include the full image, 1-pixel crops and crops touching every border
    top[:4] = torch.tensor([0, 0, h - 1, 0])
    left[:4] = torch.tensor([0, w - 1, 0, 0])
    ch[:4] = torch.tensor([h, 1, 1, h])
    cw[:4] = torch.tensor([w, 1, 1, 1])
    params = [(int(top[i]), int(left[i]), int(ch[i]), int(cw[i])) for i in range(16)]
    out = batch_crops.resized_crop(x, top, left, ch, cw, size)
    ref2 = torch.stack([TF2.resized_crop(x[i], *params[i], [size, size], antialias=False) for i in range(16)])
    ref1 = torch.stack([TF.resized_crop(x[i], *params[i], [size, size], antialias=False) for i in range(16)])
    assert out.shape == (16, 3, size, size)
    assert maxdiff(out, ref2) <= TOL
    assert maxdiff(out, ref1) <= TOL
    # the flip folded into the resampling grid is a hflip after the crop
    flip = torch.rand(16, generator=gen(2)) < 0.5
    out_f = batch_crops.resized_crop(x, top, left, ch, cw, size, flip=flip)
    ref_f = torch.stack([TF.hflip(ref1[i]) if flip[i] else ref1[i] for i in range(16)])
    assert maxdiff(out_f, ref_f) <= TOL
    # uint8 input is converted to float first
    u8 = (x * 255).round().to(torch.uint8)
    assert maxdiff(batch_crops.resized_crop(u8, top, left, ch, cw, size),
                   batch_crops.resized_crop(u8.float(), top, left, ch, cw, size)) == 0


def test_flip_and_grayscale_match_torchvision():
    x = make_images()
    mask = torch.rand(x.shape[0], generator=gen(3)) < 0.5
    ref = torch.stack([TF.hflip(x[i]) if mask[i] else x[i] for i in range(x.shape[0])])
    assert maxdiff(ref_ops.hflip(x, mask), ref) == 0
    ref = torch.stack([TF.rgb_to_grayscale(x[i], 3) if mask[i] else x[i] for i in range(x.shape[0])])
    assert maxdiff(ref_ops.grayscale(x, mask), ref) <= TOL
    assert maxdiff(ga.rgb_to_grayscale(x), per_image(TF.rgb_to_grayscale, x)) <= TOL


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blend_ops_match_torchvision(name):
    x = make_images()
    f = torch.rand(x.shape[0], generator=gen(4)) * 2.0  # 0 .. 2, beyond the jitter range
    f[0], f[1], f[2] = 0.0, 1.0, 2.0
    ours = getattr(ref_ops, "adjust_" + name)(x, f)
    ref = torch.stack([getattr(TF, "adjust_" + name)(x[i], float(f[i])) for i in range(x.shape[0])])
    assert maxdiff(ours, ref) <= TOL
    # a Python number is one factor for every sample
    assert maxdiff(getattr(ref_ops, "adjust_" + name)(x, 0.7),
                   per_image(getattr(TF, "adjust_" + name), x, 0.7)) <= TOL


def test_hue_matches_torchvision():
    x = make_images(32)
    f = torch.rand(x.shape[0], generator=gen(5)) - 0.5
    f[:5] = torch.tensor([-0.5, 0.5, 0.0, 0.1, -0.1])
    ours = ref_ops.adjust_hue(x, f)
    ref = torch.stack([TF.adjust_hue(x[i], float(f[i])) for i in range(x.shape[0])])
    assert maxdiff(ours, ref) <= TOL


def _jitter_reference(x, factors, order, applied, ops=(True, True, True, True)):
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i in range(x.shape[0]):
        y = x[i]
        if applied[i]:
            for k in order[i].tolist():
                if ops[k]:
                    y = fns[k](y, float(factors[i, k]))
        out.append(y)
    return torch.stack(out)


def test_color_jitter_fixed_orders_match_torchvision():
    """Every one of the 24 orders, with per-sample factors and the p=0.8 mask, as torchvision's
    ColorJitter.forward applies them."""
    perms = torch.tensor(list(itertools.permutations(range(4))))
    x = make_images(48)
    order = torch.cat([perms, perms])
    factors, _, _ = ga.sample_color_jitter_params(48, generator=gen(6))
    applied = torch.rand(48, generator=gen(7)) < 0.8
    ours = ga.apply_color_jitter(x, factors, order, applied)
    assert maxdiff(ours, _jitter_reference(x, factors, order, applied)) <= TOL
    assert maxdiff(ga.apply_color_jitter(x, factors, order, torch.zeros(48, dtype=torch.bool)), x) == 0
    # ops switched off (torchvision's None), e.g. ColorJitter(0.4, 0, 0.4, 0)
    ops = (True, False, True, False)
    ours = ga.apply_color_jitter(x, factors, order, applied, ops=ops)
    assert maxdiff(ours, _jitter_reference(x, factors, order, applied, ops)) <= TOL
    # color_jitter with random parameters returns what it applied
    out, (f2, o2, a2) = ref_ops.color_jitter(x, generator=gen(8), return_params=True)
    assert maxdiff(out, _jitter_reference(x, f2, o2, a2)) <= TOL


def test_normalisation_matches_torchvision():
    """Crop = whole image, no flip, jitter or grey: GPUMultiCrop gives ToTensor + Normalize."""
    u8 = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=gen(9))
    mc = ga.GPUMultiCrop(u8, [32], [1], [1.0], [1.0], ratio=(1.0, 1.0), jitter_p=0.0, flip_p=0.0,
                         grayscale_p=0.0)
    (out,) = mc(torch.arange(6))
    norm = T.Normalize(constants.CIFAR_MEAN, constants.PRETRAIN_STD)
    ref = torch.stack([norm(TF.to_tensor(u8[i].numpy())) for i in range(6)])
    assert maxdiff(out, ref) <= TOL
    x = u8.permute(0, 3, 1, 2).float() / 255
    assert maxdiff(ref_ops.normalize(x, constants.CIFAR_MEAN, constants.PRETRAIN_STD), ref) <= TOL


# ---------------------------------------------------------------------------------------------- 2.

def _torchvision_params(n, scale, ratio, seed):
    torch.manual_seed(seed)
    img = torch.zeros(3, 32, 32)
    return torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


def _ks(a, b):
    return stats.ks_2samp(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).pvalue


@pytest.mark.parametrize("scale,ratio,fallback_expected", [
    ((0.14, 1.0), (3.0 / 4.0, 4.0 / 3.0), False),  # the CIFAR recipe
    ((0.7, 1.0), (1.3, 2.0), True),  # ~64 % of the samples take the centre-crop fallback
])
def test_crop_params_distribution(scale, ratio, fallback_expected):
    ref = _torchvision_params(N_KS, scale, ratio, seed=10)  # (i, j, h, w)
    top, left, h, w = batch_crops.sample_resized_crop_params(32, 32, N_KS, scale, ratio, generator=gen(11))
    ours = torch.stack([top, left, h, w], 1)
    for name, fn in [("area", lambda p: p[:, 2] * p[:, 3]), ("aspect", lambda p: p[:, 3] / p[:, 2]),
                     ("top", lambda p: p[:, 0]), ("left", lambda p: p[:, 1]),
                     ("h", lambda p: p[:, 2]), ("w", lambda p: p[:, 3])]:
        p = _ks(fn(ours.double()), fn(ref.double()))
        assert p > ALPHA, f"{name}: KS p = {p:.2g}"
    assert ours.min() >= 0 and (top + h).max() <= 32 and (left + w).max() <= 32 and h.min() >= 1
    # the fallback: torchvision's centre crop with the ratio clamped (in_ratio 1 < min(ratio))
    fh = int(round(32 / min(ratio))) if fallback_expected else 32
    fb = torch.tensor([(32 - fh) // 2, 0, fh, 32])
    rate_ours = (ours == fb).all(1).double().mean().item()
    rate_ref = (ref == fb).all(1).double().mean().item()
    if fallback_expected:
        assert rate_ref > 0.3
    pooled = (rate_ours + rate_ref) / 2
    z = abs(rate_ours - rate_ref) / max(math.sqrt(2 * pooled * (1 - pooled) / N_KS), 1e-12)
    assert z < 2.58, (rate_ours, rate_ref)


def test_crop_params_fallback_exact():
    """No try can succeed: every sample gets exactly torchvision's fallback (both ratio clamps)."""
    img_wide = torch.zeros(3, 20, 40)
    for (hh, ww, img), ratio in [((32, 32, torch.zeros(3, 32, 32)), (5.0, 6.0)),
                                 ((32, 32, torch.zeros(3, 32, 32)), (0.1, 0.15)),
                                 ((20, 40, img_wide), (0.2, 0.3))]:
        ref = T.RandomResizedCrop.get_params(img, [0.99, 1.0], list(ratio))
        t, l, h, w = batch_crops.sample_resized_crop_params(hh, ww, 50, (0.99, 1.0), ratio, generator=gen(12))
        for v, r in zip((t, l, h, w), ref):
            assert (v == r).all()


def test_jitter_factor_distributions_and_rates():
    n = N_KS
    factors, order, applied = ga.sample_color_jitter_params(n, generator=gen(13))
    for k in range(3):
        p = stats.kstest(factors[:, k].double().numpy(), stats.uniform(loc=0.6, scale=0.8).cdf).pvalue
        assert p > ALPHA, (k, p)
    p = stats.kstest(factors[:, 3].double().numpy(), stats.uniform(loc=-0.1, scale=0.2).cdf).pvalue
    assert p > ALPHA
    # factors independent of each other (no shared draw): correlations near 0
    c = np.corrcoef(factors.double().numpy().T)
    assert np.abs(c - np.eye(4)).max() < 4 / math.sqrt(n)
    # orders: uniform over the 24 permutations
    assert (order.sort(1).values == torch.arange(4)).all()
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[torch.tensor(
        [sum(v * m for v, m in zip(pm, (64, 16, 4, 1))) for pm in itertools.permutations(range(4))])]
    assert counts.sum() == n
    assert stats.chisquare(counts.numpy()).pvalue > ALPHA
    # application rates: RandomApply p=0.8, flip 0.5, grey 0.2
    assert stats.binomtest(int(applied.sum()), n, 0.8).pvalue > ALPHA
    x = torch.rand(n, 3, 1, 2, generator=gen(14))
    _, flipped = ref_ops.random_hflip(x, 0.5, generator=gen(15), return_mask=True)
    assert stats.binomtest(int(flipped.sum()), n, 0.5).pvalue > ALPHA
    _, grey = ref_ops.random_grayscale(x, 0.2, generator=gen(16), return_mask=True)
    assert stats.binomtest(int(grey.sum()), n, 0.2).pvalue > ALPHA
    # torchvision's ranges for other strengths, including "off"
    f2, _, _ = ga.sample_color_jitter_params(1000, brightness=1.5, contrast=0, saturation=(0.2, 0.3),
                                             hue=0.5, generator=gen(17))
    assert f2[:, 0].min() >= 0 and f2[:, 0].max() <= 2.5 and (f2[:, 1] == 1).all()
    assert f2[:, 2].min() >= 0.2 and f2[:, 2].max() <= 0.3 and f2[:, 3].abs().max() <= 0.5


def test_gpumulticrop_rates():
    """The per-crop draws of GPUMultiCrop: flip 0.5, grey 0.2, jitter 0.8, observed on the outputs."""
    n = 3000
    img = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    img[0, :, :16, 0] = 200  # red left half: a flip is visible, grey has equal channels
    img[0, :, 16:, 1] = 120
    common = dict(ratio=(1.0, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    mc = ga.GPUMultiCrop(img, [32], [1], [1.0], [1.0], jitter_p=0.0, grayscale_p=0.0, **common)
    (out,) = mc(torch.zeros(n, dtype=torch.long), generator=gen(18))
    flipped = out[:, 0, :, 0].mean(1) < out[:, 0, :, -1].mean(1)
    assert stats.binomtest(int(flipped.sum()), n, 0.5).pvalue > ALPHA
    mc = ga.GPUMultiCrop(img, [32], [1], [1.0], [1.0], jitter_p=0.0, **common)
    (out,) = mc(torch.zeros(n, dtype=torch.long), generator=gen(18))
    grey = (out[:, 0] == out[:, 1]).all(-1).all(-1)
    assert stats.binomtest(int(grey.sum()), n, 0.2).pvalue > ALPHA
    mc = ga.GPUMultiCrop(img, [32], [1], [1.0], [1.0], flip_p=0.0, grayscale_p=0.0, **common)
    (out,) = mc(torch.zeros(n, dtype=torch.long), generator=gen(19))
    jittered = (out - img.permute(0, 3, 1, 2).float() / 255).abs().flatten(1).max(1).values > 1e-4
    assert stats.binomtest(int(jittered.sum()), n, 0.8).pvalue > ALPHA


def test_whole_pipeline_distribution_matches_torchvision_tensor_pipeline():
    """Per-crop channel statistics of GPUMultiCrop vs the torchvision transforms on tensors."""
    n = 1500
    u8 = torch.randint(0, 256, (n, 4, 4, 3), dtype=torch.uint8, generator=gen(20))
    u8 = u8.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 32x32 with some structure
    u8[:, 8:24, 8:24] //= 2
    mc = ga.GPUMultiCrop(u8, [32], [1], [0.14], [1.0])
    (ours,) = mc(torch.arange(n), generator=gen(21))
    torch.manual_seed(22)
    tv = T.Compose([T.RandomResizedCrop(32, scale=(0.14, 1.0), antialias=False), T.RandomHorizontalFlip(),
                    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                    T.Normalize(constants.CIFAR_MEAN, constants.PRETRAIN_STD)])
    x = u8.permute(0, 3, 1, 2).float() / 255
    ref = torch.stack([tv(x[i]) for i in range(n)])
    for stat in (lambda t: t.mean((2, 3)), lambda t: t.std((2, 3))):
        for c in range(3):
            p = _ks(stat(ours)[:, c], stat(ref)[:, c])
            assert p > ALPHA / 6, p  # Bonferroni over the 6 statistics


# ---------------------------------------------------------------------------------------------- 3.

@pytest.mark.parametrize("n,world,batch", [(50, 1, 8), (50, 4, 4), (53, 4, 3), (3, 8, 1), (1000, 3, 64)])
def test_epoch_indices_equal_distributed_sampler(n, world, batch):
    data = list(range(n))
    for epoch in (0, 1, 7):
        for rank in range(world):
            sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=0, drop_last=False)
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True)
            ref = [b.tolist() for b in loader]
            ours = sampling.epoch_indices(n, epoch, seed=0, rank=rank, world_size=world, batch_size=batch)
            assert ours.tolist() == ref
            bs = sampling.DistributedBatchSampler(n, batch, num_replicas=world, rank=rank)
            bs.set_epoch(epoch)
            assert [b.tolist() for b in bs] == ref and len(bs) == len(ref)
    # shuffle=False and another seed
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=0, shuffle=False)
    ref = [b.tolist() for b in torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler,
                                                           drop_last=True)]
    assert sampling.epoch_indices(n, 3, 0, 0, world, batch, shuffle=False).tolist() == ref
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=0, seed=31)
    sampler.set_epoch(2)
    ref = [b.tolist() for b in torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler,
                                                           drop_last=True)]
    assert sampling.epoch_indices(n, 2, 31, 0, world, batch).tolist() == ref


# ---------------------------------------------------------------------------------------------- 4.

def test_gpumulticrop_shapes_order_dtypes_determinism():
    u8 = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=gen(23))
    mc = ga.GPUMultiCrop(u8, [32, 16, 32], [2, 3, 1], [0.14, 0.05, 0.5], [1.0, 0.14, 1.0])
    assert mc.data.shape == (40, 3, 32, 32) and mc.data.dtype == torch.uint8 and len(mc) == 40
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    crops = mc(idx, generator=gen(24))
    assert [tuple(c.shape) for c in crops] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3 + [(8, 3, 32, 32)]
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    # normalised range: (0 - mean) / std .. (1 - mean) / std
    lo = (-torch.tensor(constants.CIFAR_MEAN) / torch.tensor(constants.PRETRAIN_STD)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(constants.CIFAR_MEAN)) / torch.tensor(constants.PRETRAIN_STD)).view(1, 3, 1, 1)
    assert all(((c >= lo - 1e-5) & (c <= hi + 1e-5)).all() for c in crops)
    # deterministic under a seeded generator, different for another seed, crops differ from each other
    again = mc(idx, generator=gen(24))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    other = mc(idx, generator=gen(25))
    assert not torch.equal(crops[0], other[0])
    assert not torch.equal(crops[0], crops[1])
    # repeated index: the same image gets independent crops
    assert not torch.equal(crops[0][1], crops[0][3])
    # dtype / channels_last output
    c32 = ga.GPUMultiCrop(u8, [32], [2], [0.14], [1.0])(idx, generator=gen(24))
    mc16 = ga.GPUMultiCrop(u8, [32], [2], [0.14], [1.0], dtype=torch.bfloat16, channels_last=True)
    c16 = mc16(idx, generator=gen(24))
    assert all(c.dtype == torch.bfloat16 and c.is_contiguous(memory_format=torch.channels_last) for c in c16)
    assert all(maxdiff(a.float(), b) < 0.02 for a, b in zip(c16, c32))  # same draws, bfloat16 rounding
    # the index tensor may come from DistributedBatchSampler
    batch = next(iter(sampling.DistributedBatchSampler(40, 8)))
    assert mc(batch)[0].shape == (8, 3, 32, 32)


# ---------------------------------------------------------------------------------------------- info

def _real_images(n):
    """The first `n` training images of the small real CIFAR-10 set (classes in turn)."""
    from PIL import Image
    files = sorted(CIFAR_JPG.glob("*/*.jpg"), key=lambda f: (f.stem, f.parent.name))[:n]
    return [np.array(Image.open(f).convert("RGB")) for f in files]


def test_pil_vs_tensor_semantics_on_real_images(capsys):
    """Information: the released pipeline runs on PIL images (uint8 after every op; PIL's bilinear
    resize; PIL's uint8 HSV hue). The differences to the tensor semantics matched here, in 1/255 units,
    on real CIFAR-10 images. Loosely bounded so that a regression shows."""
    imgs = _real_images(64)
    assert len(imgs) == 64
    from PIL import Image
    n = len(imgs)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    pil = [Image.fromarray(im) for im in imgs]
    g = gen(26)
    t, l, h, w = batch_crops.sample_resized_crop_params(32, 32, n, (0.14, 1.0), generator=g)
    lines = []
    ours = batch_crops.resized_crop(x, t, l, h, w, 32)
    ref = torch.stack([TF.to_tensor(TF.resized_crop(pil[i], int(t[i]), int(l[i]), int(h[i]), int(w[i]),
                                                    [32, 32])) for i in range(n)])
    d = (ours - ref).abs() * 255
    lines.append(f"RandomResizedCrop 32->32: max {d.max():.2f}, mean {d.mean():.3f}")
    assert d.max() <= 1.01 and d.mean() < 0.5  # only PIL's uint8 rounding (crops are never > 32 px)
    # a smaller output (not the CIFAR recipe): PIL's bilinear filter antialiases crops larger than it
    ours = batch_crops.resized_crop(x, t, l, h, w, 16)
    ref = torch.stack([TF.to_tensor(TF.resized_crop(pil[i], int(t[i]), int(l[i]), int(h[i]), int(w[i]),
                                                    [16, 16])) for i in range(n)])
    d = (ours - ref).abs() * 255
    lines.append(f"RandomResizedCrop 32->16 (PIL antialiases downscaling): max {d.max():.2f}, "
                 f"mean {d.mean():.3f}")
    assert d.mean() < 5
    f = torch.rand(n, generator=g) * 0.8 + 0.6
    hf = torch.rand(n, generator=g) * 0.2 - 0.1
    for name, fac, bound in [("brightness", f, 2), ("contrast", f, 2), ("saturation", f, 2), ("hue", hf, 16)]:
        ours = getattr(ref_ops, "adjust_" + name)(x, fac)
        ref = torch.stack([TF.to_tensor(getattr(TF, "adjust_" + name)(pil[i], float(fac[i]))) for i in range(n)])
        d = (ours - ref).abs() * 255
        lines.append(f"adjust_{name}: max {d.max():.2f}, mean {d.mean():.3f}")
        assert d.max() <= bound and d.mean() < 1.0
    d = (ga.rgb_to_grayscale(x, 3) - torch.stack([TF.to_tensor(TF.rgb_to_grayscale(p, 3)) for p in pil])).abs()
    lines.append(f"rgb_to_grayscale: max {d.max() * 255:.2f}, mean {d.mean() * 255:.3f}")
    with capsys.disabled():
        print("\nPIL path vs tensor semantics on real CIFAR-10 images (1/255 units):\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_never_synchronises():
    """On the GPU: the same fixed-parameter results as on the CPU (hence as torchvision), and a
    GPUMultiCrop call that never synchronises with the host (sync debug mode 'error')."""
    dev = torch.device("cuda")
    x = make_images(48)
    top, left, h, w = batch_crops.sample_resized_crop_params(32, 32, 48, (0.02, 1.0), generator=gen(30))
    flip = torch.rand(48, generator=gen(31)) < 0.5
    factors, order, applied = ga.sample_color_jitter_params(48, generator=gen(32))
    cpu = ga.apply_color_jitter(batch_crops.resized_crop(x, top, left, h, w, 32, flip=flip), factors, order, applied)
    on = [t.to(dev) for t in (x, top, left, h, w, flip, factors, order, applied)]
    gpu = ga.apply_color_jitter(batch_crops.resized_crop(*on[:5], 32, flip=on[5]), *on[6:])
    assert maxdiff(gpu.cpu(), cpu) <= TOL
    hue_gpu = ref_ops.adjust_hue(on[0], factors[:, 3].to(dev)).cpu()
    assert maxdiff(hue_gpu, ref_ops.adjust_hue(x, factors[:, 3])) <= TOL
    u8 = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=gen(33)).to(dev)
    mc = ga.GPUMultiCrop(u8, [32, 16], [2, 1], [0.14, 0.05], [1.0, 0.14], dtype=torch.bfloat16,
                         channels_last=True)
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    batches = list(sampling.DistributedBatchSampler(64, 16, device=dev))
    mc(batches[0], generator=g)  # warm-up (workspace allocation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches:
            crops = mc(b, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [tuple(c.shape) for c in crops] == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)]
    assert all(c.device.type == "cuda" and c.dtype == torch.bfloat16 for c in crops)
    g.manual_seed(0)
    first = mc(batches[0], generator=g)
    g.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(first, mc(batches[0], generator=g)))


def test_batched_crops_resume_at_any_iteration_exactly():
    """Chunks of iterations share one augmentation call; each chunk's generator is seeded from (seed, rank,
    epoch, chunk), so an epoch started at iteration i yields the very crops of the full epoch from i on."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 12, 12, 3), dtype=torch.uint8, generator=g)
    mc = ga.GPUMultiCrop(images, [8, 6], [2, 1], [0.3, 0.2], [1.0, 0.5])
    crops = sampling.BatchedCrops(mc, sampling.DistributedBatchSampler(70, 8), seed=5, rank=0, chunk=3)
    assert len(crops) == 8
    full = list(crops.epoch(2))
    assert len(full) == 8 and all(len(c) == 3 for c in full)
    assert [tuple(c.shape) for c in full[0]] == [(8, 3, 8, 8), (8, 3, 8, 8), (8, 3, 6, 6)]
    for start in (1, 3, 5, 7):
        resumed = list(crops.epoch(2, start))
        assert len(resumed) == 8 - start
        for a, b in zip(resumed, full[start:]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = list(crops.epoch(3))
    assert not torch.equal(other[0][0], full[0][0])  # another epoch, other crops
    # the same images as the sampler's batches, in order
    crops.sampler.set_epoch(2)
    batches = list(crops.sampler)
    one = ga.GPUMultiCrop(images, [8, 6], [2, 1], [0.3, 0.2], [1.0, 0.5])
    assert torch.equal(batches[0], crops.sampler.batches()[0])
    assert one(batches[0])[0].shape == full[0][0].shape


def test_batched_crops_chunk_fits_the_memory_budget():
    images = torch.zeros(64, 32, 32, 3, dtype=torch.uint8)
    mc = ga.GPUMultiCrop(images, [32], [2], [0.14], [1.0])
    per_iteration = 16 * 2 * 3 * 32 * 32 * 4
    assert sampling.BatchedCrops(mc, sampling.DistributedBatchSampler(64, 16), chunk=8).chunk == 8
    assert sampling.BatchedCrops(mc, sampling.DistributedBatchSampler(64, 16), chunk=8, max_bytes=3 * per_iteration).chunk == 3
    assert sampling.BatchedCrops(mc, sampling.DistributedBatchSampler(64, 16), chunk=8, max_bytes=1).chunk == 1
