"""Which images each process trains on, iteration by iteration: the released sampler made resumable
mid-epoch (`ResumableDistributedSampler`), its order as index tensors for the batched paths
(`sampler_order`; `epoch_indices`, `DistributedBatchSampler` for full batches), the batched crops of a
pretraining epoch (`BatchedCrops`) and the seed of each chunk of crops (`chunk_seed`).

Per-rank sampling: :func:`sampler_order` is the order of ``DistributedSampler(dataset, num_replicas,
rank, shuffle=True, seed=0, drop_last=False)`` after ``set_epoch(epoch)``; :func:`epoch_indices` /
:class:`DistributedBatchSampler` give exactly its batches through ``DataLoader(batch_size,
drop_last=True)`` (the released pretraining loader).
"""
import math

import torch
from torch.utils.data.distributed import DistributedSampler

from .augment import GPUMultiCrop


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after `start_iter` batches of `batch_size` (a run resumed
    from a mid-epoch checkpoint skips what it already trained on without loading it)."""

    def __init__(self, dataset, num_replicas, rank, batch_size, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.start_iter = 0

    def set_epoch(self, epoch, start_iter=0):
        super().set_epoch(epoch)
        self.start_iter = start_iter

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_iter * self.batch_size:])

    def __len__(self):
        return max(0, self.num_samples - self.start_iter * self.batch_size)


def sampler_order(n, epoch, seed=0, rank=0, world_size=1, shuffle=True):
    """The indices that ``DistributedSampler(n items, world_size, rank, shuffle, seed, drop_last=False)``
    yields after ``set_epoch(epoch)``, as an int64 CPU tensor of ``ceil(n / world_size)`` (the last ones
    repeat the first where n does not divide). The permutation is drawn on the CPU as the sampler does."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        indices = torch.randperm(n, generator=g)
    else:
        indices = torch.arange(n)
    num_samples = math.ceil(n / world_size)
    total_size = num_samples * world_size
    padding = total_size - n
    if padding > 0:
        indices = torch.cat([indices, indices.repeat(math.ceil(padding / n))[:padding]])
    return indices[rank:total_size:world_size]


def epoch_indices(n, epoch, seed=0, rank=0, world_size=1, batch_size=1, shuffle=True):
    """The batches of :func:`sampler_order` through ``DataLoader(batch_size, drop_last=True)``: an int64
    CPU tensor (num_batches, batch_size)."""
    indices = sampler_order(n, epoch, seed, rank, world_size, shuffle)
    nb = indices.shape[0] // batch_size
    return indices[:nb * batch_size].view(nb, batch_size)


def chunk_seed(seed, rank, epoch, j):
    """The seed of the generator that draws the crops of chunk `j` of `epoch` on `rank`: a chunk of an epoch
    made again (a resumed run) gets the very same crops."""
    return (((seed * 1000003 + rank) * 1000003 + epoch) * 1000003 + j) % 2**63


class DistributedBatchSampler:
    """Iterates the per-iteration index batches of one rank (see :func:`epoch_indices`); call
    ``set_epoch`` every epoch like ``DistributedSampler``. With ``device``, each epoch's index tensor is
    moved there once, so the batches are device tensors (no copy per iteration)."""

    def __init__(self, n, batch_size, num_replicas=1, rank=0, shuffle=True, seed=0, device=None):
        self.n, self.batch_size = n, batch_size
        self.device = device
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(self.n / self.num_replicas) // self.batch_size

    def batches(self):
        """This epoch's batches as one (num_batches, batch_size) index tensor (on ``device`` if given)."""
        batches = epoch_indices(self.n, self.epoch, self.seed, self.rank, self.num_replicas,
                                self.batch_size, self.shuffle)
        return batches if self.device is None else batches.to(self.device)

    def __iter__(self):
        return iter(self.batches().unbind(0))


class BatchedCrops:
    """The training crops of one rank, epoch by epoch, made on the device several iterations per call
    (fewer, larger launches: ``chunk`` iterations, at most ``max_bytes`` of crops at once).

    Chunk ``j`` of an epoch draws from a generator seeded with (seed, rank, epoch, j), so an epoch
    resumed at any iteration yields the very crops an uninterrupted run would have seen."""

    def __init__(self, multicrop: "GPUMultiCrop", sampler: DistributedBatchSampler, seed=0, rank=0, chunk=8,
                 max_bytes=256 * 2**20):
        self.multicrop, self.sampler = multicrop, sampler
        self.seed, self.rank = seed, rank
        per_iteration = sampler.batch_size * sum(3 * s * s * k for s, k in zip(multicrop.size_crops,
                                                                               multicrop.nmb_crops)) * 4
        self.chunk = max(1, min(chunk, max_bytes // per_iteration))
        self.generator = torch.Generator(device=multicrop.device)

    def __len__(self):
        return len(self.sampler)

    def epoch(self, epoch, first_iter=0):
        """Yields the crops (a list of ``sum(nmb_crops)`` tensors) of iterations ``first_iter``, ... of
        ``epoch``."""
        self.sampler.set_epoch(epoch)
        batches = self.sampler.batches()
        bs, k = self.sampler.batch_size, self.chunk
        for j in range(first_iter // k, (len(batches) + k - 1) // k):
            self.generator.manual_seed(chunk_seed(self.seed, self.rank, epoch, j))
            crops = self.multicrop(batches[j * k:(j + 1) * k].reshape(-1), generator=self.generator)
            for it in range(max(j * k, first_iter), min((j + 1) * k, len(batches))):
                t = it - j * k
                yield [c[t * bs:(t + 1) * bs] for c in crops]
