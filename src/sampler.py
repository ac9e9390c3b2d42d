"""The released data order (DistributedSampler, seed 0, set_epoch) with a resumable start inside an epoch."""
from torch.utils.data.distributed import DistributedSampler


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
