"""`eval_linear.py --augment batched` (src/eval/batched_probe.py, src/data/augment.py `ResizedCropFlip`):

1. The training crops against torchvision: with the drawn parameters, equal to torchvision's tensor
   `resized_crop` + `hflip` + `Normalize` (within 1e-5); the parameters have `RandomResizedCrop.get_params`'
   distribution at the evaluation's scale (0.08, 1) (Kolmogorov-Smirnov), the flip rate is 1/2, and whole
   crops have the statistics of torchvision's tensor pipeline. Also measured (printed with `pytest -s`):
   the difference to the released PIL pipeline on real CIFAR-10 images.
2. The order of the samples is the released loader's, epoch by epoch and rank by rank, and an epoch made
   again gives the same crops.
3. The classifier's written-out gradient equals autograd's, and its steps equal autograd + torch.optim.SGD.
4. A batched epoch gives the loss, accuracies and weights of eval_linear.py's released per-batch loop run
   on the same crops, on the CPU in float32; the test split likewise.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from scipy import stats

import eval_linear
from src.data.crops import ResizedCropFlip, sample_resized_crop_params
from src.data.constants import CIFAR_MEAN, EVAL_STD
from src.data.datasets import load_split
from src.data.sampling import sampler_order
from src.data.transforms import plain_tensor
from src.eval.batched_probe import BatchedProbe, classifier_gradients, frozen_features, train_on_features
from src.method.resnet import build_model

THREADS = 1  # small tensors: one intra-op thread (tests/conftest.py)
TOL = 1e-5
ALPHA = 0.01
N_KS = 20000
SCALE = (0.08, 1.0)
CIFAR_JPG = Path(__file__).resolve().parent / "data" / "cifar10_jpg_small"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_images(n, seed=0, size=32):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen(seed))


def drawn_params(n, seed, height=32, width=32):
    """The parameters `ResizedCropFlip` draws from a generator seeded with `seed`: crops first, then flips."""
    g = gen(seed)
    top, left, h, w = sample_resized_crop_params(height, width, n, SCALE, generator=g)
    return top, left, h, w, torch.rand(n, generator=g) < 0.5


# ---------------------------------------------------------------------------------------------- 1.

@pytest.mark.parametrize("height,width,size", [(32, 32, 32), (24, 40, 28)])
def test_crops_equal_torchvision_tensor_ops(height, width, size):
    """The drawn crop resized like `resized_crop(antialias=False)` on the float image, mirrored like
    `hflip`, then normalised like `Normalize`."""
    images = torch.randint(0, 256, (40, height, width, 3), dtype=torch.uint8, generator=gen(1))
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    plain = ResizedCropFlip(images, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(idx, generator=gen(2))
    normalised = ResizedCropFlip(images, size, CIFAR_MEAN, EVAL_STD)(idx, generator=gen(2))
    top, left, h, w, flip = drawn_params(len(idx), 2, height, width)
    assert flip.any() and not flip.all()
    ref = []
    for b, i in enumerate(idx.tolist()):
        x = TF.to_tensor(images[i].numpy())
        x = TF.resized_crop(x, int(top[b]), int(left[b]), int(h[b]), int(w[b]), [size, size], antialias=False)
        ref.append(TF.hflip(x) if flip[b] else x)
    ref = torch.stack(ref)
    assert plain.shape == (len(idx), 3, size, size) and plain.dtype == torch.float32
    assert (plain - ref).abs().max().item() <= TOL
    # the same differences, divided by the std
    assert (normalised - T.Normalize(CIFAR_MEAN, EVAL_STD)(ref)).abs().max().item() <= TOL / min(EVAL_STD)


def torchvision_params(n, seed):
    torch.manual_seed(seed)
    img = torch.zeros(3, 32, 32)
    return torch.tensor([T.RandomResizedCrop.get_params(img, list(SCALE), [3.0 / 4.0, 4.0 / 3.0])
                         for _ in range(n)])


def ks(a, b):
    return stats.ks_2samp(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).pvalue


def test_crop_parameters_and_flips_have_torchvision_distributions():
    """What `ResizedCropFlip` draws (its output equals the crops of these draws: test above) against
    `RandomResizedCrop(32).get_params` and `RandomHorizontalFlip()`."""
    top, left, h, w, flip = drawn_params(N_KS, 3)
    ours = torch.stack([top, left, h, w], 1).double()
    ref = torchvision_params(N_KS, 4).double()
    for name, fn in [("area", lambda p: p[:, 2] * p[:, 3]), ("aspect", lambda p: p[:, 3] / p[:, 2]),
                     ("top", lambda p: p[:, 0]), ("left", lambda p: p[:, 1]),
                     ("h", lambda p: p[:, 2]), ("w", lambda p: p[:, 3])]:
        p = ks(fn(ours), fn(ref))
        assert p > ALPHA, f"{name}: KS p = {p:.2g}"
    assert ours[:, 2].min() >= 1 and (ours[:, 0] + ours[:, 2]).max() <= 32 and (ours[:, 1] + ours[:, 3]).max() <= 32
    assert stats.binomtest(int(flip.sum()), N_KS, 0.5).pvalue > ALPHA


def test_flip_rate_seen_on_the_crops():
    """An image whose halves differ: the crops that come out mirrored are half of them."""
    n = 3000
    image = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    image[0, :, :16, 0] = 200
    crops = ResizedCropFlip(image, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = crops(torch.zeros(n, dtype=torch.long), generator=gen(5))
    mirrored = out[:, 0, :, 0] < out[:, 0, :, -1]
    assert mirrored.all(1).sum() + (~mirrored).all(1).sum() == n
    assert stats.binomtest(int(mirrored.all(1).sum()), n, 0.5).pvalue > ALPHA


def test_whole_crops_match_the_torchvision_tensor_pipeline():
    """Per-crop channel means and standard deviations against RandomResizedCrop(32) + RandomHorizontalFlip()
    + Normalize on float tensors (Bonferroni over the 6 statistics)."""
    n = 1500
    u8 = random_images(n, 6, size=4).repeat_interleave(8, 1).repeat_interleave(8, 2)
    u8[:, 8:24, 8:24] //= 2
    ours = ResizedCropFlip(u8, 32, CIFAR_MEAN, EVAL_STD)(torch.arange(n), generator=gen(7))
    torch.manual_seed(8)
    tv = T.Compose([T.RandomResizedCrop(32, antialias=False), T.RandomHorizontalFlip(),
                    T.Normalize(CIFAR_MEAN, EVAL_STD)])
    x = u8.permute(0, 3, 1, 2).float() / 255
    ref = torch.stack([tv(x[i]) for i in range(n)])
    for stat in (lambda t: t.mean((2, 3)), lambda t: t.std((2, 3))):
        for c in range(3):
            p = ks(stat(ours)[:, c], stat(ref)[:, c])
            assert p > ALPHA / 6, p


def test_pil_pipeline_difference_on_real_images(capsys):
    """Information: the released pipeline crops and resizes PIL images (8-bit result); the difference to
    these crops with the same parameters, in 1/255 units before normalisation, on real CIFAR-10 images.
    A 32 px crop of a 32 px image is never downscaled: PIL's rounding only. Loosely bounded."""
    from PIL import Image
    images, _, _ = load_split(str(CIFAR_JPG), train=True, download=False)
    n = len(images)
    top, left, h, w, flip = drawn_params(n, 9)
    ours = ResizedCropFlip(torch.from_numpy(images), 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(torch.arange(n),
                                                                                            generator=gen(9))
    ref = []
    for i in range(n):
        crop = TF.resized_crop(Image.fromarray(images[i]), int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32])
        ref.append(TF.to_tensor(TF.hflip(crop) if flip[i] else crop))
    d = (ours - torch.stack(ref)).abs() * 255
    assert d.max() <= 1.01 and d.mean() < 0.5
    with capsys.disabled():
        print(f"\nlinear-evaluation crops, PIL path vs tensor semantics on {n} real CIFAR-10 images "
              f"(1/255 units): max {d.max():.2f}, mean {d.mean():.3f}")


# ---------------------------------------------------------------------------------------------- 2.

@pytest.mark.parametrize("n,world,batch", [(50, 1, 8), (53, 4, 3), (3, 8, 1)])
def test_sample_order_is_the_released_loaders(n, world, batch):
    """DistributedSampler (seed 0) + DataLoader(drop_last=False): the last batch may be short."""
    data = list(range(n))
    for epoch in (0, 1, 7):
        for rank in range(world):
            sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank)
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler)
            order = sampler_order(n, epoch, rank=rank, world_size=world)
            assert order.tolist() == list(sampler)
            assert [b.tolist() for b in order.split(batch)] == [b.tolist() for b in loader]


class Identity(torch.nn.Module):
    """A 'backbone' returning its input: the features of a crop are its pixels' channel means."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x


def test_epochs_in_loader_order_and_made_again_alike():
    images, labels = random_images(37, 10).numpy(), np.arange(37) % 10
    kw = dict(train_data=(images, labels), test_data=(images[:5], labels[:5]), crop_size=32, batch_size=4,
              seed=31, crops_per_chunk=10)  # 2 batches per chunk
    probe = BatchedProbe(Identity(), rank=1, world_size=2, **kw)
    assert probe.chunk == 8 and probe.samples == 19 and probe.iterations == 5
    chunks = list(probe.epoch_chunks(3))
    assert [first for first, _, _ in chunks] == [0, 2, 4]
    sampler = torch.utils.data.DistributedSampler(list(range(37)), num_replicas=2, rank=1)
    sampler.set_epoch(3)
    assert torch.cat([rows for _, rows, _ in chunks]).tolist() == list(sampler)
    again = list(BatchedProbe(Identity(), rank=1, world_size=2, **kw).epoch_chunks(3))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(chunks, again))
    other = list(probe.epoch_chunks(4))
    assert not torch.equal(other[0][2], chunks[0][2])
    assert probe.test_features.shape == (5, 3)
    torch.testing.assert_close(probe.test_features, plain_tensor(images[:5], CIFAR_MEAN, EVAL_STD).mean((2, 3)))


# ---------------------------------------------------------------------------------------------- 3.

def separable(n=96, classes=5, dim=12, seed=0):
    g = gen(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_gradients_equal_autograd():
    x, y = separable()
    torch.manual_seed(1)
    linear = torch.nn.Linear(12, 5)
    z, grad_w, grad_b = classifier_gradients(linear, x, F.one_hot(y, 5).float())
    loss = F.cross_entropy(linear(x), y)
    loss.backward()
    torch.testing.assert_close(z, linear(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_w, linear.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_b, linear.bias.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("nesterov,wd", [(False, 1e-6), (True, 1e-2)])
def test_steps_equal_autograd_and_sgd(nesterov, wd):
    x, y = separable(n=100)  # batches of 16: the last one has 4 rows
    models = []
    for _ in range(2):
        torch.manual_seed(2)
        linear = torch.nn.Linear(12, 5)
        models.append((linear, torch.optim.SGD(linear.parameters(), lr=0.3, momentum=0.9, weight_decay=wd,
                                               nesterov=nesterov)))
    (ours, ours_opt), (ref, ref_opt) = models
    logits = train_on_features(ours, ours_opt, x, y, 16)
    ref_logits = []
    for start in range(0, 100, 16):
        out = ref(x[start:start + 16])
        loss = F.cross_entropy(out, y[start:start + 16])
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        ref_logits.append(out.detach())
    torch.testing.assert_close(logits, torch.cat(ref_logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-5, atol=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(ours_opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.weight, torch.nn.Linear(12, 5).weight)


# ---------------------------------------------------------------------------------------------- 4.

class Log:
    def info(self, line):
        pass


def probe_and_reference(n=70, batch=8, chunk=24):
    """A narrow real backbone on real CIFAR-10 images, and two copies of the classifier and optimiser."""
    images, labels, _ = load_split(str(CIFAR_JPG), train=True, download=False)
    test_images, test_labels, _ = load_split(str(CIFAR_JPG), train=False, download=False)
    torch.manual_seed(0)
    model = build_model("resnet18", output_dim=0, eval_mode=True, width_per_group=8).eval()
    probe = BatchedProbe(model, (images[:n], labels[:n]), (test_images, test_labels), 32, batch, seed=31,
                         crops_per_chunk=chunk)
    pairs = []
    for _ in range(2):
        torch.manual_seed(1)
        linear = eval_linear.RegLog(10, model.feature_dim)
        pairs.append((linear, torch.optim.SGD(linear.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6)))
    return model, probe, pairs, (test_images, test_labels)


def test_a_batched_epoch_equals_the_released_per_batch_loop():
    model, probe, ((linear, optimizer), (ref, ref_optimizer)), _ = probe_and_reference()
    args = argparse.Namespace(device=torch.device("cpu"), rank=1, log_freq=1)
    for epoch in (0, 1):
        # the released loop, eval_linear.train, on the crops of the same epoch, batch by batch
        crops = torch.cat([c for _, _, c in probe.epoch_chunks(epoch)])
        targets = probe.labels[torch.cat([rows for _, rows, _ in probe.epoch_chunks(epoch)])]
        loader = list(zip(crops.split(8), targets.split(8)))
        assert len(loader) == probe.iterations == math.ceil(70 / 8)
        loop = eval_linear.LinearLoop(args, model, maxk=5, logger=Log(), optimizer=ref_optimizer, train_loader=loader,
                                      linear=ref)
        expected = eval_linear.train(loop, epoch)
        got = probe.train_epoch(linear.linear, optimizer, epoch, 5)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
        for p, q in zip(linear.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], ref_optimizer.state[q]["momentum_buffer"],
                                       rtol=1e-4, atol=1e-6)
    assert not torch.equal(linear.linear.bias, torch.zeros(10))


def test_the_test_split_equals_the_released_validation():
    model, probe, ((linear, _), _), (test_images, test_labels) = probe_and_reference()
    loader = list(zip(plain_tensor(test_images, CIFAR_MEAN, EVAL_STD).split(8),
                      torch.as_tensor(test_labels).split(8)))
    args = argparse.Namespace(device=torch.device("cpu"))
    expected = eval_linear.validate(eval_linear.LinearLoop(args, model, maxk=5, logger=Log(), test_loader=loader,
                                                           linear=linear))
    assert probe.test(linear.linear, 5) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    torch.testing.assert_close(probe.test_features,
                               frozen_features(model, plain_tensor(test_images, CIFAR_MEAN, EVAL_STD), 7))
