"""The checkpoint written in the background (src/runtime/async_save.py): the same file as the synchronous
write, a snapshot of the moment of the save, a write error that surfaces, and a file that a SIGKILL at any
moment leaves loadable."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from src.method.larc import build_optimizer
from src.method.resnet import build_model
from src.runtime.async_save import BackgroundWriter
from src.runtime.checkpoint import safe_load, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def trained_net():
    torch.manual_seed(0)
    net = build_model("resnet18", normalize=True, hidden_mlp=32, output_dim=16, nmb_prototypes=10,
                      width_per_group=8)
    opt = build_optimizer(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    net([torch.randn(4, 3, 16, 16)])[1].sum().backward()
    opt.step()
    return net, opt


def save(folder, net, opt, writer=None):
    folder.mkdir(exist_ok=True)
    (folder / "checkpoints").mkdir(exist_ok=True)
    save_checkpoint(str(folder), 3, 0, net, opt, np.random.RandomState(5), "resnet18",
                    queue=torch.arange(12.0).view(2, 2, 3), copy_path=str(folder / "checkpoints" / "ckp-2.pth"),
                    writer=writer)


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_background_write_gives_the_synchronous_files(tmp_path):
    net, opt = trained_net()
    save(tmp_path / "sync", net, opt)
    writer = BackgroundWriter()
    save(tmp_path / "background", net, opt, writer)
    writer.wait()
    sync, background = files(tmp_path / "sync"), files(tmp_path / "background")
    assert sorted(sync) == sorted(background) == ["checkpoint.pth.tar", "checkpoints/ckp-2.pth", "queue0.pth"]
    for name in sync:  # byte for byte: the records, their order and names, the RNG states
        assert background[name] == sync[name], name


def test_the_file_holds_the_moment_of_the_save_not_later_steps(tmp_path):
    """Training goes on (in-place updates of weights, momentum, BN statistics) while the file is written:
    it holds the values of the save."""
    net, opt = trained_net()
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    momentum = {i: opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(net.parameters())
                if "momentum_buffer" in opt.state[p]}
    writer = BackgroundWriter()
    save(tmp_path, net, opt, writer)
    with torch.no_grad():
        for t in list(net.state_dict().values()) + [opt.state[p]["momentum_buffer"] for p in net.parameters()
                                                    if "momentum_buffer" in opt.state[p]]:
            t.add_(1)
    writer.wait()
    ckpt = safe_load(str(tmp_path / "checkpoint.pth.tar"))
    for k, v in expected.items():
        assert torch.equal(ckpt["state_dict"]["module." + k], v), k
    saved_momentum = ckpt["optimizer"]["state"]
    assert momentum and all(torch.equal(saved_momentum[i]["momentum_buffer"], m) for i, m in momentum.items())


def test_a_failed_background_write_surfaces_at_the_next_wait(tmp_path):
    """A file-size limit (a full disk to the writer) in a child process: the error is the plain OSError of
    the synchronous write, raised by wait() and by the next submit, and the old file is intact."""
    code = (
        "import resource, sys, torch; sys.path.insert(0, sys.argv[1])\n"
        "from src.runtime.async_save import BackgroundWriter\n"
        "from src.runtime.checkpoint import atomic_save\n"
        "atomic_save({'w': torch.zeros(10)}, sys.argv[2])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))\n"
        "w = BackgroundWriter()\n"
        "w.submit([({'w': torch.zeros(100000)}, sys.argv[2])])\n"
        "try:\n    w.wait()\nexcept OSError as e:\n    print('wait', e.errno, e.filename)\n"
        "w.wait()\nprint('then clear')\n"
        "w.submit([({'w': torch.zeros(100000)}, sys.argv[2])])\n"
        "try:\n    w.submit([({'w': torch.ones(3)}, sys.argv[2])])\nexcept OSError as e:\n"
        "    print('submit', e.errno)\n"
        "w.wait()\n")
    path = tmp_path / "checkpoint.pth.tar"
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split("\n")[:3] == [f"wait 27 {path}", "then clear", "submit 27"], out.stdout + out.stderr
    assert torch.equal(safe_load(str(path))["w"], torch.zeros(10))
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


WRITER_LOOP = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from src.runtime.async_save import BackgroundWriter
w = BackgroundWriter()
for version in range(1, 10 ** 6):
    state = {"version": version, "w": torch.full((2_000_000,), float(version))}  # 8 MB
    w.submit([(state, sys.argv[2])])
    print(version, flush=True)
"""


def test_sigkill_during_background_writes_leaves_a_loadable_checkpoint(tmp_path):
    """A process that saves 8 MB checkpoints in the background back to back, killed (SIGKILL) at random
    moments: the file is always one complete version."""
    path = tmp_path / "checkpoint.pth.tar"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", WRITER_LOOP, str(REPO), str(path)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "1"  # the first write is under way
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        kills += p.returncode == -signal.SIGKILL
        if path.exists():
            ckpt = safe_load(str(path))
            assert torch.equal(ckpt["w"], torch.full((2_000_000,), float(ckpt["version"])))
    assert kills == 3
    assert path.exists()  # some write completed across the runs
    leftovers = [q.name for q in tmp_path.iterdir() if q.name != "checkpoint.pth.tar"]
    assert all(q.endswith(".tmp") for q in leftovers), leftovers  # removed at a run's next start


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_snapshot_is_pinned_and_reused(tmp_path):
    writer = BackgroundWriter()
    t = torch.arange(1000.0, device="cuda")
    for k in range(3):
        writer.submit([({"t": t}, str(tmp_path / "c.pth"))])
        t.add_(1)  # after the snapshot
        writer.wait()
        assert torch.equal(safe_load(str(tmp_path / "c.pth"))["t"], torch.arange(1000.0) + k)
    assert len(writer._pinned) == 1 and writer._pinned[0].is_pinned()


@pytest.mark.parametrize("flags, background", [(["--augment", "batched", "--workers", "10"], True),
                                               (["--augment", "released", "--workers", "0"], True),
                                               (["--augment", "released", "--workers", "2"], False),
                                               (["--augment", "auto", "--workers", "2"], False)])
def test_runs_that_fork_dataloader_workers_write_in_the_loop(flags, background):
    """DataLoader workers are forked at each epoch's start: never while a thread writes (on the CPU `auto`
    is the released pipeline)."""
    import main_swav_unmix as M
    args = M.get_parser().parse_args(flags)
    args.device = torch.device("cpu")
    assert (M.Saver(args, None).writer is not None) == background
