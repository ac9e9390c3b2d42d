"""Device placement of the CUDA code paths, checked on the CPU: torch's FakeTensorMode gives tensors on 'cuda'
without a GPU (shapes, dtypes, devices and strides, no values), and every operation that mixes a CUDA tensor
with a CPU tensor of one or more dimensions fails, as it would on a GPU. On top of it `OneDevicePerOp` fails
what CUDA would accept with a hidden copy (a CPU index into a CUDA tensor); a read of a value on the host
(`.item()`, `.tolist()`, `int(t)`) fails too (fake tensors have no values): the training iteration must not
read any.

At tiny width (resnet18, 8 channels per group, batch 16, 16-pixel crops) this runs what main_swav_unmix.py
builds for a CUDA run: the optimiser, schedule and mixed precision of `build_method` (float32, bfloat16
autocast, float16 autocast with its GradScaler) around a channels_last network; the Un-Mix + SwAV iteration
(`UnmixSwAV.step`) with its staged numbers, the prototypes frozen and then not, the queue before, while and
after it comes into use, the non-finite guard; LARC and the fused SGD kernel's arguments; the batched
augmentation on the device (`--augment batched`, and the linear evaluation's crops); the kNN monitor in
bfloat16 with its bank on the device or pinned, up to its one read of the result; the host snapshot of a
background checkpoint up to its wait for the device.

Where fake mode cannot go, what stands in (each named in `fake_cuda`):
- backward: the autograd engine needs a real CUDA context for fake CUDA tensors (pytorch issue 92627); the
  stand-in gives every parameter a zero gradient of its own device, dtype and strides, as autograd's
  AccumulateGrad does (the project has no autograd function of its own);
- `torch._fused_sgd_` has no fake kernel: the stand-in checks what the CUDA kernel needs (params, grads and
  momentum buffers on one device with equal dtypes, shapes and strides; lr, found_inf and grad_scale float32
  tensors on that device) and changes nothing;
- pinned memory (`pin_memory()`) needs the driver: the stand-in returns the CPU tensor itself;
- autocast refuses 'cuda' when torch sees no GPU: the availability checks are answered yes, the autocast is
  real;
- not run at all: CUDA streams, events and graphs (src/method/cuda_graph.py beyond its bookkeeping, see
  tests/test_cuda_graph_cpu.py), `torch.cuda.synchronize`, CUDA random generators (`BatchedCrops` draws from
  one; the crops here from the default stream), `torch.compile` (tests/test_compile.py, on the CPU), DDP.
tests/test_cuda.py runs all of it with values on a GPU.
"""
import argparse
import logging

import numpy as np
import pytest
import torch
import torch.cuda.amp.common
from torch._subclasses.fake_impls import _deregister_op_impl, register_op_impl
from torch._subclasses.fake_tensor import (DataDependentOutputException, FakeTensorDeviceMismatchError, FakeTensorMode,
                                          unset_fake_temporarily)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import main_swav_unmix as M
from src.data.augment import GPUMultiCrop
from src.data.constants import CIFAR_MEAN, PRETRAIN_STD
from src.data.crops import ResizedCropFlip, _log_ratio
from src.data.sampling import DistributedBatchSampler
from src.eval.knn import knn_monitor, monitor_images
from src.runtime.async_save import HostSnapshot

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten
TRANSFERS = {aten._to_copy.default, aten.copy_.default}  # the explicit copies between devices


class OneDevicePerOp(TorchDispatchMode):
    """Fails an operation whose tensor arguments of one or more dimensions lie on several devices, beyond what
    fake mode refuses (CUDA accepts a CPU index tensor with a hidden copy and a wait); explicit copies
    (`.to`, `copy_`) excepted."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in TRANSFERS:
            devices = {str(t.device) for t in tree_flatten((args, kwargs))[0]
                       if isinstance(t, torch.Tensor) and t.dim() > 0}
            if len(devices) > 1:
                raise FakeTensorDeviceMismatchError(func, *sorted(devices)[:2])
        return func(*args, **kwargs)


def fused_sgd_checks(fake_mode, func, params, grads, momentum_buffers, **kwargs):
    """What the CUDA kernel of `torch._fused_sgd_` needs of its arguments (it updates nothing here). Fake mode
    caches the verdict by the arguments' metadata, which is all it depends on."""
    device = params[0].device
    for name, tensors in (("params", params), ("grads", grads), ("momentum buffers", momentum_buffers)):
        for p, t in zip(params, tensors):
            assert (t.device, t.dtype, t.shape, t.stride()) == (device, p.dtype, p.shape, p.stride()), \
                f"{name}: {t.device} {t.dtype} {tuple(t.shape)} {t.stride()} for a parameter {p.device} {p.stride()}"
    for name in ("lr", "grad_scale", "found_inf"):
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor):
            assert (t.device, t.dtype) == (device, torch.float32), f"{name}: {t.device} {t.dtype}"


class FakeCuda:
    """What stands in for backward on the fake CUDA device: `train(net)` makes `backward` give the parameters
    of `net` their gradients; `losses` are the losses it was called with."""

    def __init__(self):
        self.params = []
        self.losses = []

    def backward(self, loss, *args, **kwargs):
        assert loss.device == CUDA and loss.dim() == 0 and loss.dtype == torch.float32, (loss.device, loss.dtype)
        self.losses.append(loss)
        for p in self.params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)

    def train(self, net):
        self.params = list(net.parameters())


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.Tensor, "backward", lambda t, *a, **k: fake.backward(t, *a, **k))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: t)
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for op in (aten._fused_sgd_.default, aten._fused_sgd_.tensor_lr):
        register_op_impl(op)(fused_sgd_checks)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), OneDevicePerOp():
            yield fake
    finally:
        for op in (aten._fused_sgd_.default, aten._fused_sgd_.tensor_lr):
            _deregister_op_impl(op)


def test_a_tensor_on_the_wrong_device_fails(fake_cuda):
    x = torch.ones(4, 4, device="cuda")
    with pytest.raises(FakeTensorDeviceMismatchError):
        x + torch.ones(4, 4)  # created without device=
    with pytest.raises(FakeTensorDeviceMismatchError):
        x[torch.tensor([0, 1])]  # a CPU index
    with pytest.raises(FakeTensorDeviceMismatchError):
        x * torch.rand(4, 1)  # a CPU random draw
    with pytest.raises(DataDependentOutputException):
        x.sum().item()  # a read on the host
    assert (x + torch.tensor(2.0)).device == CUDA  # a 0-d CPU tensor is a number to CUDA too


def tiny_args(*extra):
    args = M.get_parser().parse_args([
        "--arch", "resnet18", "--width_per_group", "8", "--hidden_mlp", "32", "--feat_dim", "16",
        "--nmb_prototypes", "10", "--batch_size", "16", "--size_crops", "16", "--workers", "0", "--epochs", "2",
        "--warmup_epochs", "1", "--queue_length", "64", "--epoch_queue_starts", "0",
        "--freeze_prototypes_niters", "1", "--channels_last", "true", *extra])
    M.check_args(args)
    args.world_size, args.device = 1, torch.device("cpu")
    return args


def cuda_method(fake_cuda, args, iters_per_epoch=4):
    """The network of `build_network` (built on the CPU: a module made under fake mode cannot be converted
    again) moved to the fake device, and `build_method` of a CUDA run around it."""
    log = logging.getLogger("test_device_placement")
    with unset_fake_temporarily():
        net = M.build_network(args, log)
    cuda_args = argparse.Namespace(**{**vars(args), "device": CUDA})
    net = net.to(CUDA)
    fake_cuda.train(net)
    method = M.build_method(cuda_args, net, iters_per_epoch, np.random.RandomState(0), log=log.warning)
    method.start_epoch(0, iters_per_epoch)
    return method


AMP = {"fp32": ["--use_fp16", "false"], "bf16": ["--amp_dtype", "bfloat16"], "fp16": ["--amp_dtype", "float16"]}
MULTI_CROP = ["--nmb_crops", "2", "2", "--size_crops", "16", "8", "--min_scale_crops", "0.14", "0.05",
              "--max_scale_crops", "1", "0.14"]
CASES = {"fp32": AMP["fp32"], "fp16": AMP["fp16"],
         "bf16-multicrop": AMP["bf16"] + MULTI_CROP,  # two crop sizes: Un-Mix pairs and Sinkhorn problems of each
         "fp16-no_guard": AMP["fp16"] + ["--max_nonfinite_steps", "0"],
         "fp32-swav-no_guard": AMP["fp32"] + ["--run_swav", "true", "--max_nonfinite_steps", "0",
                                              "--queue_length", "32"]}  # one term a step: in use after 2


def crops_of(args):
    return [torch.randn(16, 3, size, size, device="cuda")
            for size, n in zip(args.size_crops, args.nmb_crops) for _ in range(n)]


@pytest.mark.parametrize("case", list(CASES))
def test_training_iterations_stay_on_the_device(fake_cuda, case):
    args = tiny_args(*CASES[case])
    method = cuda_method(fake_cuda, args)
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case.split("-")[0]]
    assert (method.scaler is not None) == case.startswith("fp16") and (method.guard is None) == ("guard" in case)
    outputs = []
    method.net.register_forward_hook(lambda module, inputs, out: outputs.append(out[1].dtype))
    crops = crops_of(args)
    terms = 1 if args.run_swav else 3
    plans = []
    for it in range(3):  # frozen prototypes, then not; the queue before, while and after it comes into use
        plans.append(method.queue.plan(terms, 16))
        out = method.step(crops, iteration=it)
        assert out.loss.device == CUDA and out.loss.dtype == torch.float32
    assert any(not any(flags) for flags in plans[0]) and all(all(flags) for flags in plans[-1])
    assert outputs == [expected] * 3 and len(fake_cuda.losses) == 3
    assert all(group["fused"] for group in method.optimizer.param_groups)  # stepped by torch._fused_sgd_
    net = method.net
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers()),
               "queue": method.queue.tensor, "meter": method.meter,
               "staged numbers": method.inputs.table, "staged position": method.inputs.pos,
               **{f"momentum of {n}": method.optimizer.state[p]["momentum_buffer"] for n, p in net.named_parameters()}}
    if method.scaler is not None:
        tensors["scale"] = method.scaler._scale
    if method.guard is not None:
        tensors["bad_steps"] = method.bad_steps
    assert {name: t.device for name, t in tensors.items() if t.device != CUDA} == {}
    conv = net.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert method.optimizer.state[conv]["momentum_buffer"].stride() == conv.stride()


def test_batched_augmentation_on_the_device(fake_cuda):
    with unset_fake_temporarily():  # a host number from a CPU tensor, computed once (fake tensors have no values)
        _log_ratio((3.0 / 4.0, 4.0 / 3.0))
    images = torch.from_numpy(np.zeros((40, 32, 32, 3), dtype=np.uint8)).to(CUDA)
    multicrop = GPUMultiCrop(images, [16, 8], [2, 1], [0.14, 0.05], [1.0, 0.14], CIFAR_MEAN, PRETRAIN_STD,
                             channels_last=True)
    sampler = DistributedBatchSampler(40, 16, device=CUDA)
    crops = multicrop(next(iter(sampler)))
    assert [(tuple(c.shape), c.device, c.dtype) for c in crops] == \
        [((16, 3, 16, 16), CUDA, torch.float32)] * 2 + [((16, 3, 8, 8), CUDA, torch.float32)]
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in crops)
    evaluation = ResizedCropFlip(images, 32, CIFAR_MEAN, PRETRAIN_STD)(torch.arange(16, device=CUDA))
    assert (tuple(evaluation.shape), evaluation.device) == ((16, 3, 32, 32), CUDA)


@pytest.mark.parametrize("bank_on_device", [True, False], ids=["bank_on_device", "bank_pinned"])
def test_knn_monitor_on_the_device(fake_cuda, bank_on_device):
    """As end_of_epoch calls it on CUDA, up to its one read of the result on the host."""
    method = cuda_method(fake_cuda, tiny_args("--amp_dtype", "bfloat16"))
    net = method.net.eval()
    train = monitor_images(torch.randn(40, 3, 32, 32), CUDA, bank_on_device)
    test = monitor_images(torch.randn(20, 3, 32, 32), CUDA, bank_on_device)
    assert (train.device, train.dtype) == (CUDA if bank_on_device else torch.device("cpu"), torch.bfloat16)
    with pytest.raises(DataDependentOutputException) as read:
        knn_monitor(net.forward_backbone, train, np.arange(40) % 10, test, np.arange(20) % 10, 10, batch_size=16,
                    device=CUDA, k=5, autocast_dtype=torch.bfloat16)
    last = read.traceback.filter(lambda entry: "src/eval/knn.py" in str(entry.path))[-1]
    assert last.name == "knn_monitor" and "int(correct_counts(" in str(last.statement)


def test_a_run_resumed_from_the_checkpoint_snapshot_steps(fake_cuda):
    """HostSnapshot.take as a background save calls it: every tensor lands in a host buffer laid out as the
    tensor (the wait for the copies, `finish`, needs a GPU). Loaded again, the momentum buffers keep their
    parameters' channels_last strides, which the fused SGD kernel needs of parameters, gradients and buffers
    alike: the first step of the resumed run runs."""
    args = tiny_args("--amp_dtype", "bfloat16")
    crops = crops_of(args)
    method = cuda_method(fake_cuda, args)
    for it in range(2):
        method.step(crops, iteration=it)
    state = {"state_dict": method.net.state_dict(), "optimizer": method.optimizer.state_dict(),
             "queue": method.state_dict()["queue"]}
    snapshot = HostSnapshot()
    host = snapshot.take(state)
    pairs = [(t, h) for t, h in zip(tree_flatten(state)[0], tree_flatten(host)[0]) if isinstance(t, torch.Tensor)]
    assert pairs and snapshot._cuda and len(snapshot.buffers) == len({id(t) for t, _ in pairs})
    assert [(h.device.type, h.stride()) for _, h in pairs] == [("cpu", t.stride()) for t, _ in pairs]
    resumed = cuda_method(fake_cuda, args)
    resumed.optimizer.load_state_dict(host["optimizer"])
    conv = resumed.net.conv1.weight
    assert resumed.optimizer.state[conv]["momentum_buffer"].stride() == conv.stride()
    resumed.step(crops, iteration=2)
