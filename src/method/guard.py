"""The non-finite guard's undo: a step whose loss or gradients are not finite is skipped on the device by
the fused SGD kernel (`found_inf`), and what its forward pass already changed -- the BN running statistics
and the queue -- is put back, also on the device, so that no iteration waits for the host to decide."""
from typing import Optional

import torch

from .swav import EmbeddingQueue


class BufferGuard:
    """Undo a step's side effects on the network's buffers (BN running statistics) and on the queue, on
    the device. The buffers are moved into one flat tensor per dtype, each module keeping a view of its
    part, so saving them is one copy and undoing a step one select per dtype."""

    def __init__(self, net):
        by_dtype = {}
        for module in net.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    by_dtype.setdefault(buf.dtype, []).append((module, name, buf))
        self.flat = []
        for items in by_dtype.values():
            flat = torch.cat([buf.detach().reshape(-1) for _, _, buf in items])
            offset = 0
            for module, name, buf in items:
                module._buffers[name] = flat[offset:offset + buf.numel()].view_as(buf)
                offset += buf.numel()
            self.flat.append(flat)
        self.saved = [torch.empty_like(f) for f in self.flat]
        self.saved_queue = None

    def save(self, queue: Optional[EmbeddingQueue]):
        live, saved = list(self.flat), list(self.saved)
        if queue is not None:
            if self.saved_queue is None or self.saved_queue.shape != queue.tensor.shape:
                self.saved_queue = torch.empty_like(queue.tensor)
            live.append(queue.tensor)
            saved.append(self.saved_queue)
        torch._foreach_copy_(saved, live)

    def restore_if(self, bad: torch.Tensor, queue: Optional[EmbeddingQueue]):
        live, saved = list(self.flat), list(self.saved)
        if queue is not None:
            live.append(queue.tensor)
            saved.append(self.saved_queue)
        keep = bad == 0
        torch._foreach_copy_(live, [torch.where(keep, x, s) for x, s in zip(live, saved)])
