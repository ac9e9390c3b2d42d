"""`eval_linear.py --augment batched`: the released linear probe with its training crops made on the
device, and the frozen network run on many crops at once.

What stays the released protocol: every epoch, each training image of this process's share, in the order
of the released loader (`DistributedSampler`, seed 0, reshuffled each epoch; the last batch may be
short), is cropped by `RandomResizedCrop(crop_size)`, flipped with probability 1/2, normalised with the
evaluation's mean and std, and passed through the frozen backbone in eval mode; its layer4 map is average
pooled, and the linear classifier takes one SGD step per batch of `--batch_size` (the optimiser and
schedule of the released mode, whose objects hold the weights and the momentum between epochs, so the
checkpoints are the same). The test split is evaluated after every epoch. The training statistics are
those of each batch's outputs before its step, averaged over the epoch's samples as the released
`AverageMeter` does.

What differs, and why:

* The crops are made by src/data/augment.py (`ResizedCropFlip`): torchvision's parameter sampling exactly,
  the crop resized on float tensors (bilinear without antialiasing: torchvision's tensor semantics),
  where the released pipeline resizes PIL images and rounds them to 8 bits. A 32 px CIFAR crop is never
  larger than the 32 px output, so the two differ by PIL's rounding only (on real CIFAR-10 images: at
  most 1/255, about 0.3/255 on average; tests/test_batched_probe.py prints it). The random numbers come
  from a generator seeded per (seed, rank, epoch, chunk): the released distribution, other draws, and an
  epoch run again after an interruption sees the very same crops.
* The network runs on chunks of crops (`--crops_per_chunk`), not batch by batch: in eval mode without
  gradients, a sample's features do not depend on the other samples it is run with, so this gives the
  same features up to the rounding of other kernels; the classifier's per-batch steps then run on them.
* On CUDA the network runs under bfloat16 autocast on channels_last tensors (the pooled features are
  float32 sums of bfloat16 values, about 3 significant digits; the classifier trains in float32). On the
  CPU everything is float32.
* The gradient of the classifier is written out, `(softmax(z) - onehot(y))^T x / B` for the weight and its
  column sums for the bias (what autograd computes for the mean cross-entropy of a linear layer, up to
  rounding), then `optimizer.step()` updates: no autograd graph per batch.
* The test features are computed once: the test transform is deterministic.
"""
import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.crops import ResizedCropFlip
from ..data.constants import CIFAR_MEAN, EVAL_STD
from ..data.sampling import chunk_seed, sampler_order
from ..data.transforms import plain_tensor
from .metrics import correct_counts

# Crops per forward pass of the frozen network, and crops made at once by default, by device type.
FEATURE_BATCH = {"cuda": 2048, "cpu": 16}  # CPU: small batches stay in cache (measured on 2 cores)
CROPS_PER_CHUNK = {"cuda": 32768, "cpu": 2048}


@torch.no_grad()
def frozen_features(model, images, batch_size):
    """(n, D) float32: the layer4 maps of `images` (normalised float, n x 3 x H x W, on the model's device)
    average-pooled as the released classifier pools them. The caller puts the model in eval mode. On
    CUDA the network runs under bfloat16 autocast on channels_last tensors."""
    cuda = images.device.type == "cuda"
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    pooled = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision:
            out = model(x)
        pooled.append(F.adaptive_avg_pool2d(out.float(), 1).flatten(1))
    return torch.cat(pooled)


@torch.no_grad()
def classifier_gradients(linear, x, onehot, out=None):
    """The logits `z = linear(x)` and the gradients of the mean cross-entropy `mean(-log softmax(z)[y])`
    with respect to the weight and the bias: `g = (softmax(z) - onehot) / B`, `g^T x` and `sum(g)`.
    Returns (z, weight gradient, bias gradient); z is written into `out` when given."""
    z = torch.addmm(linear.bias, x, linear.weight.t(), out=out)
    g = torch.softmax(z, dim=1).sub_(onehot).div_(x.shape[0])
    return z, g.t().mm(x), g.sum(dim=0)


@torch.no_grad()
def train_on_features(linear, optimizer, features, labels, batch_size, world_size=1):
    """One SGD step of the classifier `linear` (an nn.Linear that `optimizer` updates) per batch of
    `batch_size` consecutive rows of `features` (the last batch may be shorter). With several processes
    the gradients are averaged over them, as DistributedDataParallel does. Returns the logits (n x C)
    that each batch had before its step."""
    logits = features.new_empty(features.shape[0], linear.out_features)
    onehot = torch.zeros_like(logits).scatter_(1, labels.view(-1, 1), 1.0)
    for start in range(0, features.shape[0], batch_size):
        end = start + batch_size
        _, grad_w, grad_b = classifier_gradients(linear, features[start:end], onehot[start:end],
                                                 out=logits[start:end])
        if world_size > 1:
            for grad in (grad_w, grad_b):
                dist.all_reduce(grad)
                grad.div_(world_size)
        linear.weight.grad, linear.bias.grad = grad_w, grad_b
        optimizer.step()
    return logits


class BatchedProbe:
    """Both splits of the released probe on the device: the training crops, made and run through the
    frozen network chunk by chunk every epoch, and the test features, computed once.

    `train_data`, `test_data`: (uint8 N x H x W x 3 images, labels). A chunk is `crops_per_chunk` crops
    (0: CROPS_PER_CHUNK of the device type) rounded down to whole batches, at least one."""

    def __init__(self, model, train_data, test_data, crop_size, batch_size, seed, rank=0, world_size=1,
                 crops_per_chunk=0):
        self.model, self.batch_size = model, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = next(model.parameters()).device
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        if kind == "cuda":
            torch.backends.cudnn.benchmark = True  # the same batch shapes all along
            model.to(memory_format=torch.channels_last)
        self.feature_batch = FEATURE_BATCH[kind]
        self.chunk = batch_size * max(1, (crops_per_chunk or CROPS_PER_CHUNK[kind]) // batch_size)
        images, labels = train_data
        self.crops = ResizedCropFlip(torch.from_numpy(np.ascontiguousarray(images)).to(self.device), crop_size,
                                     CIFAR_MEAN, EVAL_STD)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.samples = math.ceil(len(self.crops) / world_size)  # this process's share (DistributedSampler)
        self.iterations = math.ceil(self.samples / batch_size)
        self.generator = torch.Generator(device=self.device)
        images, labels = test_data
        test = plain_tensor(images, CIFAR_MEAN, EVAL_STD)  # the released test transform
        self.test_features = torch.cat([frozen_features(model, test[s:s + self.chunk].to(self.device),
                                                        self.feature_batch)
                                        for s in range(0, test.shape[0], self.chunk)])
        self.test_labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)

    def epoch_chunks(self, epoch):
        """Yields (first iteration, sample indices, crops) of each chunk of `epoch`, in the loader's order;
        chunk j's crops are drawn from a generator seeded with `chunk_seed(seed, rank, epoch, j)`."""
        order = sampler_order(len(self.crops), epoch, 0, self.rank, self.world_size).to(self.device)
        for j, start in enumerate(range(0, order.shape[0], self.chunk)):
            self.generator.manual_seed(chunk_seed(self.seed, self.rank, epoch, j))
            rows = order[start:start + self.chunk]
            yield start // self.batch_size, rows, self.crops(rows, generator=self.generator)

    def train_epoch(self, linear, optimizer, epoch, maxk, log_freq=0, log_fn=None):
        """One epoch of the classifier `linear` (nn.Linear) on the crops' features; returns its (loss,
        top-1, top-k) averages over the epoch's samples. `log_fn(iteration, loss, top-1)` receives the
        running averages after each chunk that holds an iteration divisible by `log_freq`."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        counts = torch.zeros(2, dtype=torch.long, device=self.device)
        seen = 0
        for first, rows, crops in self.epoch_chunks(epoch):
            labels = self.labels[rows]
            logits = train_on_features(linear, optimizer, frozen_features(self.model, crops, self.feature_batch),
                                       labels, self.batch_size, self.world_size)
            loss_sum += F.cross_entropy(logits, labels, reduction="none").double().sum()
            counts += correct_counts(logits, labels, (1, maxk))
            seen += rows.shape[0]
            last = first + math.ceil(rows.shape[0] / self.batch_size) - 1
            if log_fn is not None and log_freq and last // log_freq * log_freq >= first:
                log_fn(last, loss_sum.item() / seen, 100.0 * counts[0].item() / seen)
        c1, c5 = counts.tolist()
        return loss_sum.item() / seen, 100.0 * c1 / seen, 100.0 * c5 / seen

    @torch.no_grad()
    def test(self, linear, maxk):
        """(loss, top-1, top-k) of the classifier `linear` on the whole test split."""
        logits = linear(self.test_features)
        c1, c5 = correct_counts(logits, self.test_labels, (1, maxk)).tolist()
        n = self.test_labels.shape[0]
        return F.cross_entropy(logits, self.test_labels).item(), 100.0 * c1 / n, 100.0 * c5 / n
