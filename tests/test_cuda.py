"""CUDA checks (skipped without a GPU): the golden iteration in float32, no host syncs in a steady-state
step, torch.compile equal to eager, and finite mixed-precision training."""
import numpy as np
import pytest
import torch

from src.larc import LARC
from src.resnet import build_model
from src.train_step import train_step
from src.unmix import SwavConfig, draw_unmix, pair_sizes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_tf32():
    """TF32 matmuls/convolutions round to 10 mantissa bits: far outside the golden tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_golden_iteration_on_cuda(no_tf32):
    from tests.test_golden import check_iteration, golden
    cases = golden()["cases"]
    for case in cases:
        check_iteration(case, "cuda")


def c10_setup(width=64, batch=128, amp_dtype=None, channels_last=False):
    torch.manual_seed(0)
    model = build_model("resnet18", normalize=True, hidden_mlp=512, output_dim=128, nmb_prototypes=100,
                        width_per_group=width).cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = LARC(torch.optim.SGD(model.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6),
               trust_coefficient=0.001, clip=False)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    g = torch.Generator(device="cuda").manual_seed(0)
    crops = [torch.randn(batch, 3, 32, 32, device="cuda", generator=g) for _ in range(2)]
    return model, opt, scaler, crops


def run_steps(model, opt, scaler, crops, n, amp_dtype=None, channels_last=False, skip_nonfinite=False,
              rng=None):
    rng = rng or np.random.RandomState(31)
    cfg = SwavConfig(crops_for_assign=[0, 1], nmb_crops=[2])
    losses = []
    for i in range(n):
        draws = draw_unmix(rng, 1.0, 0.5, pair_sizes(crops))
        out = train_step(model, opt, crops, draws, cfg, lr=0.6, iteration=10**6, freeze_prototypes_niters=0,
                         run_swav=False, unmix_prob=0.5, scaler=scaler, autocast_dtype=amp_dtype,
                         channels_last=channels_last, skip_nonfinite=skip_nonfinite)
        losses.append(out.loss)
    return losses


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["no_guard", "guard"])
def test_steady_state_step_does_not_sync(skip_nonfinite):
    model, opt, scaler, crops = c10_setup(amp_dtype=torch.bfloat16, channels_last=True)
    rng = np.random.RandomState(31)
    run_steps(model, opt, scaler, crops, 3, torch.bfloat16, True, skip_nonfinite, rng)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_steps(model, opt, scaler, crops, 4, torch.bfloat16, True, skip_nonfinite, rng)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_stays_finite(amp_dtype):
    model, opt, scaler, crops = c10_setup(amp_dtype=amp_dtype, channels_last=True)
    losses = torch.stack(run_steps(model, opt, scaler, crops, 30, amp_dtype, True))
    assert torch.isfinite(losses).all(), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compiled_forward_equals_eager(no_tf32):
    model, _, _, crops = c10_setup(width=16, batch=64)
    model.eval()
    with torch.no_grad():
        eager = model(crops)
        compiled = torch.compile(model)(crops)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


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
