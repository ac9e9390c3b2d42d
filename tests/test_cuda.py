"""CUDA checks (skipped without a GPU): the golden iteration in float32, no host syncs in a steady-state
step, torch.compile equal to eager, finite mixed-precision training, and CUDA graph replays equal to eager
iterations without syncs."""
import contextlib

import numpy as np
import pytest
import torch

from src.method.larc import build_optimizer
from src.method.resnet import build_model
from src.method.train_step import UnmixSwAV
from src.method.swav import SwavConfig
from src.method.unmix import draw_unmix, pair_sizes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_tf32():
    """TF32 matmuls/convolutions round to 10 mantissa bits: far outside the golden tolerances. Newer torch
    has per-backend fp32_precision settings (cuDNN convolutions default to TF32 there); older, two flags."""
    backends = [getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul]
    if all(hasattr(b, "fp32_precision") for b in backends):
        saved = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        yield
        for b, value in zip(backends, saved):
            b.fp32_precision = value
    else:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("fast_path", [False, True], ids=["plain", "fast_path"])
def test_golden_iteration_on_cuda(no_tf32, fast_path):
    from tests.test_golden import check_iteration, golden
    torch.backends.cudnn.deterministic = True
    try:
        for case in golden()["cases"]:
            check_iteration(case, "cuda", fast_path)
    finally:
        torch.backends.cudnn.deterministic = False


def c10_method(width=64, batch=128, amp_dtype=None, channels_last=False, skip_nonfinite=True, compile=False,
               cuda_graph=False, **cfg):
    """The c10 configuration as the training loop builds it (fused LARC/SGD, device-side guard)."""
    torch.manual_seed(0)
    net = build_model("resnet18", normalize=True, hidden_mlp=512, output_dim=128, nmb_prototypes=100,
                      width_per_group=width).cuda()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = build_optimizer(net.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    method = UnmixSwAV(net, opt, SwavConfig(batch_size=batch, **cfg), scaler=scaler,
                       autocast_dtype=amp_dtype, channels_last=channels_last, skip_nonfinite=skip_nonfinite,
                       cuda_graph=cuda_graph)
    if compile:
        method.model = torch.compile(net)
    method.start_epoch(0, 1000)
    g = torch.Generator(device="cuda").manual_seed(0)
    crops = [torch.randn(batch, 3, 32, 32, device="cuda", generator=g) for _ in range(2)]
    return method, crops


@contextlib.contextmanager
def sync_is_an_error():
    """Inside: any wait of the host for the device raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def given_step(method, crops, draws, lr, iteration):
    method.give(iteration, draws, lr, crops=crops)
    return method.step(crops, iteration)


def run_steps(method, crops, n, rng=None, start=0):
    rng = rng or np.random.RandomState(31)
    return [given_step(method, crops, draw_unmix(rng, 1.0, 0.5, pair_sizes(crops)), 0.6, start + i).loss
            for i in range(n)]


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16, None], ids=["bf16", "fp16", "fp32"])
def test_steady_state_step_does_not_sync(amp_dtype):
    """With the non-finite guard on (the default): no step waits for the device."""
    method, crops = c10_method(amp_dtype=amp_dtype, channels_last=True)
    rng = np.random.RandomState(31)
    run_steps(method, crops, 3, rng)  # warm-up (cuDNN autotuning, first momentum buffers)
    with sync_is_an_error():
        run_steps(method, crops, 4, rng, start=3)
    assert method.read_meter()["kept"] == 7


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_stays_finite(amp_dtype):
    method, crops = c10_method(amp_dtype=amp_dtype, channels_last=True)
    losses = torch.stack(run_steps(method, crops, 30))
    assert torch.isfinite(losses).all(), losses
    assert all(torch.isfinite(p).all() for p in method.net.parameters())
    assert not any(method.read_meter()["bad_steps"][:30])


def test_semisup_fine_tuning_runs_on_cuda(tmp_path):
    """eval_semisup.py on the GPU (tiny data, random weights, 2 epochs): finishes and reports."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.fake_cifar import write_cifar10
    write_cifar10(tmp_path / "c10", n_train_per_batch=40, n_test=40)
    script = Path(__file__).resolve().parents[1] / "eval_semisup.py"
    res = subprocess.run([sys.executable, str(script), "--data_path", str(tmp_path / "c10"), "--dump_path",
                          str(tmp_path / "ft"), "--arch", "resnet18", "--width_per_group", "8", "--epochs", "2",
                          "--batch_size", "8", "--workers", "2"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "device cuda:0" in res.stdout
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["epochs"] == 2


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def graph_vs_eager(iters, amp_dtype, channels_last, compile=False, **cfg):
    """Per-step losses, final weights and queue of the same iterations run eagerly and with CUDA graphs
    (with `compile`: the torch.compile'd network in both)."""
    results = []
    for cuda_graph in (False, True):
        method, crops = c10_method(amp_dtype=amp_dtype, channels_last=channels_last, cuda_graph=cuda_graph,
                                   compile=compile, **cfg)
        g = torch.Generator(device="cuda").manual_seed(1)
        rng = np.random.RandomState(31)
        losses = []
        for it in range(iters):
            crops = [torch.randn_like(c, generator=g) for c in crops]  # other crops every iteration
            draws = draw_unmix(rng, 1.0, 0.5, pair_sizes(crops))
            losses.append(given_step(method, crops, draws, 0.6 - 0.02 * it, it).loss)  # a copy of the graph's
        queue = None if method.queue is None else method.queue.tensor.clone()
        results.append((torch.stack(losses), [p.detach().clone() for p in method.net.parameters()], queue, method))
    return results


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, None], ids=["bf16", "fp32"])
def test_cuda_graph_replays_equal_eager(no_tf32, deterministic_cudnn, amp_dtype):
    """20 iterations with other crops, draws and learning rates, across the prototypes' unfreezing and
    the queue coming into use: replayed graphs give the eager losses, weights and queue (the compiled-vs-
    eager tolerance), and a graph was captured for each shape of the work."""
    # the queue fills in iterations 0-4 (3 terms x 128 rows each), is in use from 5; prototypes free from 9
    (la, wa, qa, _), (lb, wb, qb, graphed) = graph_vs_eager(20, amp_dtype, True, freeze_prototypes_niters=9,
                                                            queue_length=3 * 128 * 5, epoch_queue_starts=0)
    torch.testing.assert_close(lb, la, rtol=1e-3, atol=1e-3)
    for a, b in zip(wa, wb):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(qb, qa, rtol=1e-3, atol=1e-3)
    assert graphed.graphs.captures == 3  # filling (frozen), in use (frozen), in use (unfrozen)
    assert not graphed.graphs.failed
    assert len({graph.pool() for _, graph, _ in graphed.graphs.graphs.values()}) == 1  # one memory pool
    assert graphed.read_meter()["kept"] == 20


def test_cuda_graph_replays_do_not_sync():
    method, crops = c10_method(amp_dtype=torch.bfloat16, channels_last=True, cuda_graph=True)
    rng = np.random.RandomState(31)
    run_steps(method, crops, 5, rng)  # 3 eager, capture, replay
    with sync_is_an_error():
        run_steps(method, crops, 4, rng, start=5)
    assert method.graphs.captures == 1 and method.read_meter()["kept"] == 9


def test_cuda_graph_capture_while_a_thread_pins_memory():
    """A DataLoader's pin-memory thread allocates pinned memory at any time, also while a graph is
    captured (--augment released): the capture still succeeds (capture_error_mode "thread_local")."""
    import threading
    method, crops = c10_method(width=16, batch=64, amp_dtype=torch.bfloat16, cuda_graph=True)
    stop = threading.Event()

    def pin():
        while not stop.is_set():
            torch.empty(1 << 16).pin_memory()

    thread = threading.Thread(target=pin, daemon=True)
    thread.start()
    try:
        losses = run_steps(method, crops, 6)
    finally:
        stop.set()
        thread.join()
    assert method.graphs.captures == 1 and not method.graphs.failed
    assert torch.isfinite(torch.stack(losses)).all()


def test_cuda_graph_failed_capture_runs_eagerly():
    """A capture that fails (here: the iteration reads a value on the host, which a capture forbids)
    leaves that case eager, logged once, and the run goes on with the eager results."""
    logs = []
    method, crops = c10_method(width=16, batch=64, amp_dtype=torch.bfloat16, cuda_graph=True)
    method.graphs.log = logs.append
    iterate = method.iterate

    def iterate_with_a_host_read(*args):
        loss = iterate(*args)
        if torch.cuda.is_current_stream_capturing():
            loss.item()  # not allowed while capturing: the capture fails
        return loss

    method.iterate = iterate_with_a_host_read
    losses = run_steps(method, crops, 8)
    assert method.graphs.captures == 0 and len(method.graphs.failed) == 1 and len(logs) == 1
    assert "previous error during capture" not in logs[0]  # the error that broke it, not the end's
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the run stays on its own stream
    assert method.read_meter()["kept"] == 8 and torch.isfinite(torch.stack(losses)).all()


def test_knn_monitor_in_bf16_on_the_device_agrees_with_float32_on_the_cpu():
    """The monitor as a CUDA run calls it (bf16 autocast, images in bf16 on the device or pinned) gives
    the CPU's float32 top-1 within 5 points (100 test images against 300, real CIFAR, a random network)."""
    from pathlib import Path

    from src.data.constants import CIFAR_MEAN, PRETRAIN_STD
    from src.data.datasets import load_split
    from src.data.transforms import plain_tensor
    from src.eval.knn import knn_monitor, monitor_images
    root = Path(__file__).resolve().parent / "data" / "cifar10_jpg_small"
    (xtr, ytr, _), (xte, yte, _) = load_split(str(root), train=True), load_split(str(root), train=False)
    torch.manual_seed(0)
    net = build_model("resnet18", normalize=True, hidden_mlp=512, output_dim=128, nmb_prototypes=100,
                      width_per_group=16).eval()
    tr, te = plain_tensor(xtr, CIFAR_MEAN, PRETRAIN_STD), plain_tensor(xte, CIFAR_MEAN, PRETRAIN_STD)
    cpu = knn_monitor(net.forward_backbone, tr, ytr, te, yte, 10, 64, "cpu", k=20)
    net.cuda()
    for on_device in (True, False):
        gtr, gte = monitor_images(tr, "cuda", on_device), monitor_images(te, "cuda", on_device)
        assert gtr.dtype == torch.bfloat16 and (gtr.is_cuda if on_device else gtr.is_pinned())
        gpu = knn_monitor(net.forward_backbone, gtr, ytr, gte, yte, 10, 64, "cuda", k=20,
                          autocast_dtype=torch.bfloat16)
        assert abs(gpu - cpu) <= 5.0, (gpu, cpu)


# The compiling tests last: the GPU check runs this file under a time limit, and they take the longest.

def test_compiled_step_equals_eager_and_does_not_sync(no_tf32):
    eager, crops = c10_method(width=16, batch=64)
    compiled, _ = c10_method(width=16, batch=64, compile=True)
    a = torch.stack(run_steps(eager, crops, 3))
    b = torch.stack(run_steps(compiled, crops, 3))
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    with sync_is_an_error():
        run_steps(compiled, crops, 2, start=3)


def test_compiled_cuda_graph_replays_equal_compiled_eager(no_tf32, deterministic_cudnn):
    """--compile --cuda_graph under the real run's settings (bf16, channels_last; width 16, batch 64 to
    compile quickly): 20 iterations of the compiled network replayed from CUDA graphs give the losses,
    weights and queue of the same compiled network run eagerly, across the prototypes' unfreezing and the
    queue coming into use (compiled vs plain eager: test_compiled_step_equals_eager_and_does_not_sync)."""
    import torch._dynamo
    torch._dynamo.reset()
    (la, wa, qa, _), (lb, wb, qb, graphed) = graph_vs_eager(20, torch.bfloat16, True, compile=True, width=16,
                                                            batch=64, freeze_prototypes_niters=9,
                                                            queue_length=3 * 64 * 5, epoch_queue_starts=0)
    torch.testing.assert_close(lb, la, rtol=1e-3, atol=1e-3)
    for a, b in zip(wa, wb):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(qb, qa, rtol=1e-3, atol=1e-3)
    assert graphed.graphs.captures == 3 and graphed.read_meter()["kept"] == 20


def test_compiled_fast_path_is_close_to_eager_and_does_not_sync():
    """--compile with bf16 autocast and channels_last (the run's fast path): 5 steps within bf16's
    rounding of the eager ones, then steps without a host sync."""
    import torch._dynamo
    torch._dynamo.reset()
    eager, crops = c10_method(width=16, batch=64, amp_dtype=torch.bfloat16, channels_last=True)
    compiled, _ = c10_method(width=16, batch=64, amp_dtype=torch.bfloat16, channels_last=True, compile=True)
    a = torch.stack(run_steps(eager, crops, 5))
    b = torch.stack(run_steps(compiled, crops, 5))
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    with sync_is_an_error():
        run_steps(compiled, crops, 2, start=5)
