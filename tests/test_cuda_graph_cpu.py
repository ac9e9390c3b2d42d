"""The bookkeeping of whole-iteration CUDA graphs (src/method/cuda_graph.py), on the CPU: which case is
warmed up, captured, replayed or, after a failed capture, run eagerly; that callers get losses of their
own; and what the CUDA backend asks of torch (one memory pool, one stream, "thread_local" capture). The
real graphs are checked in tests/test_cuda.py on a GPU."""
import contextlib

import numpy as np
import torch

from src.method import cuda_graph
from src.method.cuda_graph import CudaBackend, CudaGraphs
from src.method.larc import build_optimizer
from src.method.resnet import resnet18
from src.method.swav import SwavConfig
from src.method.train_step import UnmixSwAV

THREADS = 1  # small tensors: one intra-op thread (tests/conftest.py)
BS, ITERS, FREEZE = 4, 12, 5


class ReplayByRunning:
    """CudaBackend's stand-in on the CPU: `capture` records the iteration without running it, like a
    capture; the graph's `replay` runs it and writes its loss into the graph's own loss tensor, like a
    replay. `fail(n)`: whether the n-th capture (from 0) fails."""

    def __init__(self, fail=lambda n: False):
        self.fail, self.tries = fail, 0

    def eager(self, fn):
        return fn()

    def capture(self, fn):
        self.tries += 1
        if self.fail(self.tries - 1):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        loss = torch.zeros(())
        return Replay(lambda: loss.copy_(fn())), loss


class Replay:
    def __init__(self, run):
        self.replay = run


def method(backend=None, log=None):
    """The same small method each time; with `backend`, its iterations go through CudaGraphs."""
    torch.manual_seed(0)
    net = resnet18(width_per_group=8, output_dim=16, hidden_mlp=32, nmb_prototypes=10, normalize=True)
    opt = build_optimizer(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-6)
    cfg = SwavConfig(freeze_prototypes_niters=FREEZE, batch_size=BS, feat_dim=16, size_crops=(16,))
    m = UnmixSwAV(net, opt, cfg, rng=np.random.RandomState(3), lr_schedule=np.linspace(0.6, 0.01, ITERS),
                  skip_nonfinite=True, chunk=4)
    if backend is not None:
        m.graphs = CudaGraphs(m, backend=backend, log=log if log is not None else print)
    m.start_epoch(0, iters_per_epoch=ITERS)
    return m


def train(m):
    g = torch.Generator().manual_seed(1)
    return [m.step([torch.randn(BS, 3, 16, 16, generator=g) for _ in range(2)], it).loss for it in range(ITERS)]


def same_run(a, la, b, lb):
    assert torch.equal(torch.stack(la), torch.stack(lb))
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert a.read_meter() == b.read_meter()


def test_each_case_warms_up_then_is_captured_once_and_replayed():
    eager = method()
    graphed = method(ReplayByRunning())
    same_run(eager, train(eager), graphed, train(graphed))
    g = graphed.graphs
    assert g.captures == 2 and not g.failed  # frozen prototypes, then free
    assert sorted(g.eager.values()) == [CudaGraphs.WARMUP] * 2


def test_replayed_losses_are_the_callers_own():
    """Every replay writes the graph's one loss tensor: what the caller got before keeps its value."""
    losses = train(method(ReplayByRunning()))
    replayed = losses[CudaGraphs.WARMUP + 1:FREEZE]
    assert len(replayed) >= 1 and len({t.untyped_storage().data_ptr() for t in losses}) == ITERS
    assert len(set(t.item() for t in losses)) == ITERS


def test_a_failed_capture_leaves_its_case_eager_logged_once():
    """The second case's capture fails (as cuDNN's autotuning did when the prototypes unfroze): that case
    runs eagerly from then on, one log line says so, the run goes on and equals the eager run."""
    logs = []
    eager = method()
    backend = ReplayByRunning(fail=lambda n: n == 1)
    graphed = method(backend, log=logs.append)
    same_run(eager, train(eager), graphed, train(graphed))
    g = graphed.graphs
    assert g.captures == 1 and len(g.failed) == 1 and backend.tries == 2  # not tried again
    assert len(logs) == 1 and "operation not permitted when stream is capturing" in logs[0]
    assert "\n" not in logs[0]
    assert sorted(g.eager.values()) == [CudaGraphs.WARMUP, ITERS - FREEZE]


def test_the_cuda_backend_captures_every_graph_into_one_pool_on_one_stream(monkeypatch):
    """What CudaBackend.capture asks of torch, recorded: the same pool and stream for every graph, and
    capture_error_mode "thread_local", so that a DataLoader's pin-memory thread allocating pinned memory
    during a capture (--augment released) does not make it fail."""
    calls = []

    @contextlib.contextmanager
    def graph(g, **kwargs):
        calls.append(kwargs)
        yield

    monkeypatch.setattr(cuda_graph.torch.cuda, "graph", graph)
    monkeypatch.setattr(cuda_graph.torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda_graph.torch.cuda, "current_stream", lambda: "main")
    monkeypatch.setattr(cuda_graph.torch.cuda, "set_stream", lambda s: None)
    backend = object.__new__(CudaBackend)  # its __init__ needs a GPU for the stream and the pool
    backend.stream, backend.pool = "stream", "pool"
    for _ in range(3):
        assert backend.capture(lambda: "loss")[1] == "loss"
    assert calls == [{"pool": "pool", "stream": "stream", "capture_error_mode": "thread_local"}] * 3


def test_a_failed_cuda_capture_gives_back_the_stream_and_says_the_first_error(monkeypatch):
    """torch.cuda.graph's exit ends an invalidated capture with an error of its own and then skips putting
    the previous stream back. CudaBackend.capture puts it back (the rest of the run stays on its stream),
    and the log line names the error that broke the capture, not the one from ending it."""
    current = ["main"]

    class Graph:  # the order of torch.cuda.graph's __enter__ / __exit__ (torch/cuda/graphs.py)
        def __init__(self, g, stream, **kwargs):
            self.stream = stream

        def __enter__(self):
            current[0] = self.stream

        def __exit__(self, kind, error, tb):
            if error is not None:  # cudaStreamEndCapture fails; the stream context is not exited
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            current[0] = "main"

    monkeypatch.setattr(cuda_graph.torch.cuda, "graph", Graph)
    monkeypatch.setattr(cuda_graph.torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda_graph.torch.cuda, "current_stream", lambda: current[0])
    monkeypatch.setattr(cuda_graph.torch.cuda, "set_stream", lambda s: current.__setitem__(0, s))
    backend = object.__new__(CudaBackend)
    backend.stream, backend.pool = "capture stream", "pool"
    assert backend.capture(lambda: "loss")[1] == "loss" and current == ["main"]

    def host_read():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    try:
        backend.capture(host_read)
    except RuntimeError as e:
        assert cuda_graph.first_line(cuda_graph.original_error(e)) == (
            "CUDA error: operation not permitted when stream is capturing")
    assert current == ["main"]
