"""Whole-iteration CUDA graphs (`--cuda_graph true`): forward, loss, Sinkhorn, backward, LARC + fused SGD,
non-finite guard and queue update captured once and replayed, so that an iteration costs one launch
instead of hundreds (the loop is host-bound on a fast GPU; benchmarks/results_gpu_check_h200.md).

An iteration can be replayed because it launches the same operations with the same arguments whatever
its numbers: those enter as device tensors staged before it (src/method/staging.py). What changes the
shape of the work is captured anew: the prototypes frozen or not, the queue's checks of the iteration
(`EmbeddingQueue.plan`), the queue appearing, the crops' shapes. Each such case is first run eagerly a few
times on a side stream (lazy initialisations, cuDNN's autotuning, the optimiser's buffers), then captured
into its own graph and memory pool, then replayed; the crops are copied into the graph's own input
tensors before each replay. As in torch's own whole-network capture, this needs one process (no DDP
collectives) and no GradScaler (bfloat16 autocast or float32).
"""
import torch


class CudaGraphs:
    """The captured iterations of one `UnmixSwAV`, by the shape of their work."""

    WARMUP = 3  # eager iterations of a case before it is captured

    def __init__(self, method):
        if method.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if method.scaler is not None:
            raise ValueError("CUDA graphs are not used with a GradScaler (float16): use bfloat16 or float32")
        if method.cfg.world_size > 1:
            raise ValueError("CUDA graphs run one process (no DDP collectives inside a graph)")
        self.method = method
        self.graphs = {}   # case -> (input tensors, graph, loss tensor)
        self.eager = {}    # case -> eager iterations run so far
        self.captures = 0

    def case(self, crops, frozen, plan):
        m = self.method
        queue = None if m.queue is None else m.queue.tensor.data_ptr()
        bad_steps = None if m.bad_steps is None else m.bad_steps.data_ptr()
        shapes = tuple((tuple(c.shape), c.dtype, c.stride()) for c in crops)
        return frozen, plan, queue, bad_steps, shapes

    def run(self, crops, frozen, plan):
        """One iteration (the method's `iterate`): eager while the case warms up, then replayed."""
        key = self.case(crops, frozen, plan)
        entry = self.graphs.get(key)
        if entry is None:
            if self.eager.get(key, 0) < self.WARMUP:
                self.eager[key] = self.eager.get(key, 0) + 1
                return self._eager_on_side_stream(crops, frozen, plan)
            entry = self.graphs[key] = self._capture(crops, frozen, plan)
        inputs, graph, loss = entry
        for static, c in zip(inputs, crops):
            static.copy_(c)
        graph.replay()
        return loss

    def _eager_on_side_stream(self, crops, frozen, plan):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.method.iterate(crops, frozen, plan)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, crops, frozen, plan):
        """Record one iteration (nothing runs: `run` replays it next). Gradients are allocated inside the
        graph's pool, so they are set to None first."""
        inputs = [c.clone() for c in crops]
        graph = torch.cuda.CUDAGraph()
        self.method.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            loss = self.method.iterate(inputs, frozen, plan)
        self.captures += 1
        return inputs, graph, loss
