"""Whole-iteration CUDA graphs (`--cuda_graph true`): forward, loss, Sinkhorn, backward, LARC + fused SGD,
non-finite guard and queue update captured once and replayed, so that an iteration costs one launch
instead of hundreds (the loop is host-bound on a fast GPU; benchmarks/results_gpu_check_h200.md).

An iteration can be replayed because it launches the same operations with the same arguments whatever
its numbers: those enter as device tensors staged before it (src/method/staging.py). What changes the
shape of the work is captured anew: the prototypes frozen or not, the queue's checks of the iteration
(`EmbeddingQueue.plan`), the queue appearing, the crops' shapes. Each such case is first run eagerly a few
times on the warm-up stream (lazy initialisations, cuDNN's autotuning, the optimiser's buffers), then
captured, then replayed; the crops are copied into the graph's own input tensors before each replay. All
graphs share one memory pool and one warm-up (and capture) stream. Sharing the pool is safe in any order
of replays: within a replay a graph writes each of its pool's tensors (activations, gradients, its loss)
before reading it, and what lives from one iteration to the next (weights, momentum, BN statistics,
queue, meter) was allocated outside the captures, by the eager warm-up. A case whose capture fails runs
eagerly from then on (one log line) and the run goes on. As in torch's own whole-network capture, this
needs one process (no DDP collectives) and no GradScaler (bfloat16 autocast or float32).

The bookkeeping (`CudaGraphs`) is apart from the CUDA calls (`CudaBackend`), so that it can be run with
another backend.
"""
import torch


class CudaBackend:
    """The CUDA calls: one warm-up stream, on which graphs are also captured, and one memory pool."""

    def __init__(self, device):
        if torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def eager(self, fn):
        """Run fn on the warm-up stream, ordered after and before the current stream's work."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, fn):
        """Record fn into a new graph (nothing runs). Returns (graph, fn's output). "thread_local": another
        thread (a DataLoader's pin-memory thread) may allocate pinned memory meanwhile, which the
        default mode ("global") turns into a failed capture. The stream current before is current after,
        also when the capture fails: torch.cuda.graph's exit does not put it back when ending an
        invalidated capture raises, which would leave the rest of the run on the capture stream."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        outer = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                out = fn()
        finally:
            torch.cuda.set_stream(outer)
        return graph, out


class CudaGraphs:
    """The captured iterations of one `UnmixSwAV`, by the shape of their work."""

    WARMUP = 3  # eager iterations of a case before it is captured

    def __init__(self, method, backend=None, log=print):
        if method.scaler is not None:
            raise ValueError("CUDA graphs are not used with a GradScaler (float16): use bfloat16 or float32")
        if method.cfg.world_size > 1:
            raise ValueError("CUDA graphs run one process (no DDP collectives inside a graph)")
        self.method = method
        self.backend = backend if backend is not None else CudaBackend(method.device)
        self.log = log
        self.graphs = {}   # case -> (input tensors, graph, loss tensor)
        self.eager = {}    # case -> eager iterations run so far
        self.failed = {}   # case -> why its capture failed (it runs eagerly)
        self.captures = 0

    def case(self, crops, frozen, plan):
        m = self.method
        queue = None if m.queue is None else m.queue.tensor.data_ptr()
        bad_steps = None if m.bad_steps is None else m.bad_steps.data_ptr()
        shapes = tuple((tuple(c.shape), c.dtype, c.stride()) for c in crops)
        return frozen, plan, queue, bad_steps, shapes

    def run(self, crops, frozen, plan):
        """One iteration (the method's `iterate`): eager while the case warms up (or after its capture
        failed), then replayed. Returns the loss, a tensor of its own (the graph's is overwritten by the
        next replay)."""
        key = self.case(crops, frozen, plan)
        entry = self.graphs.get(key)
        if entry is None and key not in self.failed and self.eager.get(key, 0) >= self.WARMUP:
            entry = self._capture(key, crops, frozen, plan)
        if entry is None:
            self.eager[key] = self.eager.get(key, 0) + 1
            return self.backend.eager(lambda: self.method.iterate(crops, frozen, plan))
        inputs, graph, loss = entry
        for static, c in zip(inputs, crops):
            static.copy_(c)
        graph.replay()
        return loss.clone()

    def _capture(self, key, crops, frozen, plan):
        """Record the case's iteration (nothing runs: `run` replays it next), or None when the capture
        fails. Gradients are allocated inside the graph's pool, so they are set to None first (and after
        a failed capture, which leaves nothing else behind: the iteration writes in place)."""
        inputs = [c.clone() for c in crops]
        self.method.optimizer.zero_grad(set_to_none=True)
        try:
            graph, loss = self.backend.capture(lambda: self.method.iterate(inputs, frozen, plan))
        except RuntimeError as e:
            self.method.optimizer.zero_grad(set_to_none=True)
            reason = first_line(original_error(e))
            self.failed[key] = reason
            self.log(f"CUDA graph: capturing a new case of the iteration failed ({reason}); it runs eagerly "
                     f"from now on ({len(self.failed)} such case(s), {self.captures} captured)")
            return None
        self.captures += 1
        self.graphs[key] = (inputs, graph, loss)
        return self.graphs[key]


def original_error(e):
    """The error that made a capture fail: ending an invalidated capture raises its own error ("operation
    failed due to a previous error during capture") while the first one is being handled."""
    while isinstance(e.__context__, RuntimeError):
        e = e.__context__
    return e


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
