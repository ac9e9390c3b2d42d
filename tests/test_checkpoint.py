"""Atomic saves, safe loads, RNG state, resume discovery; the resumable distributed sampler."""
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from src.data.sampling import ResumableDistributedSampler
from src.runtime import checkpoint as ck, files, run_folder
from src.runtime.checkpoint import (CheckpointError, atomic_save, epoch_copies, find_resume_checkpoint, rng_state,
                                    safe_load, set_rng_state, strip_module_prefix)
from tests.released_format import APEX_AMP_STATE, released_checkpoint, save_like_numpy1


def good_ckpt(epoch):
    return {"epoch": epoch, "state_dict": {"w": torch.full((2,), float(epoch))}, "optimizer": {}}


# ---------------------------------------------------------------- atomic_save / safe_load

def test_atomic_save_round_trip_leaves_only_the_file(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    atomic_save(good_ckpt(3), str(path))
    atomic_save(good_ckpt(4), str(path))  # overwrite
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]
    loaded = safe_load(str(path))
    assert loaded["epoch"] == 4 and torch.equal(loaded["state_dict"]["w"], torch.full((2,), 4.0))


def test_atomic_save_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    atomic_save(good_ckpt(1), str(path))
    old_bytes = path.read_bytes()

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial bytes of a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save(good_ckpt(2), str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]  # no temporary file left behind
    assert path.read_bytes() == old_bytes
    assert safe_load(str(path))["epoch"] == 1


def test_remove_stale_temporaries(tmp_path):
    stale = tmp_path / ".checkpoint.pth.tar.12345.0a1b2c3d.tmp"
    stale.write_bytes(b"torn")
    keep = [tmp_path / "checkpoint.pth.tar", tmp_path / ".hidden.tmp", tmp_path / "notes.12.0a1b2c3d.tmp",
            tmp_path / ".x.12.0A1B2C3D.tmp"]
    for k in keep:
        k.write_bytes(b"keep")
    assert files.remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted(k.name for k in keep)


def test_atomic_write_temporary_is_recognised_as_stale(tmp_path, monkeypatch):
    """A kill mid-write leaves exactly the kind of file remove_stale_temporaries deletes."""
    left = []

    def killed(f):
        left.append(f.name)
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "unlink", lambda p: None)  # as if the process died before cleaning up
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(str(tmp_path / "stats0.csv"), killed)
    monkeypatch.undo()
    assert os.path.exists(left[0]) and not (tmp_path / "stats0.csv").exists()
    assert files.remove_stale_temporaries(str(tmp_path)) == [left[0]]
    assert os.listdir(tmp_path) == []


def assert_one_line_error(path, match):
    with pytest.raises(CheckpointError) as info:
        safe_load(str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert match in msg
    return msg


def test_safe_load_truncated_garbage_missing_empty(tmp_path):
    full = tmp_path / "full.pth"
    atomic_save(good_ckpt(5), str(full))
    data = full.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    msg = assert_one_line_error(trunc, "cannot be read")
    with pytest.raises(Exception) as torch_error:
        torch.load(str(trunc), weights_only=True)
    assert str(torch_error.value).splitlines()[0] in msg   # what is wrong, in full (not cut at a length)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(64) + b"\n\nnot a checkpoint\n")
    assert_one_line_error(garbage, "cannot be read")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert_one_line_error(empty, "cannot be read")
    assert_one_line_error(tmp_path / "missing.pth", "no such file")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "epoch": 1, "payload": Evil(str(marker))}, str(path))
    assert not marker.exists()
    msg = assert_one_line_error(path, "cannot be read")
    assert not marker.exists()
    # the line says what was refused, not torch's advice to load the file with weights_only=False
    assert "refused by weights_only: Unsupported global: GLOBAL " in msg and "open" in msg, msg
    assert "False" not in msg and "\x1b" not in msg, msg
    # the same file does run code under a plain unpickling load (so the test is meaningful)
    f = torch.load(str(path), weights_only=False)["payload"]
    f.close()
    assert marker.exists()


@pytest.mark.parametrize("numpy1_names", [True, False])
def test_released_checkpoint_with_numpy_learning_rates_loads(tmp_path, numpy1_names):
    """The released optimizer state holds NumPy float64 learning rates; weights_only loads allow exactly
    those (named as NumPy 1 or NumPy 2 pickles them)."""
    model = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.6, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    sgd.step()
    ckpt = released_checkpoint(4, model.state_dict(), sgd.state_dict(), lr=0.123)
    path = tmp_path / "released.pth.tar"
    if numpy1_names:
        save_like_numpy1(ckpt, path)
        assert b"numpy.core.multiarray" in path.read_bytes()
    else:
        torch.save(ckpt, path)
    with pytest.raises(Exception, match="numpy"):  # what a plain weights_only load says
        torch.load(path, weights_only=True)
    got = safe_load(str(path))
    lr = got["optimizer"]["param_groups"][0]["lr"]
    assert type(lr) is np.float64 and lr == 0.123
    assert got["amp"] == APEX_AMP_STATE and set(got["state_dict"]) == {"module.weight", "module.bias"}
    restored = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=1.0, momentum=0.9)
    restored.load_state_dict(got["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["momentum_buffer"], sgd.state_dict()["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("value", [np.int64(3), np.float32(0.5), np.arange(3)])
def test_other_numpy_objects_stay_refused(tmp_path, value):
    path = tmp_path / "x.pth"
    torch.save({"epoch": 1, "state_dict": {}, "x": value}, path)
    assert_one_line_error(path, "cannot be read")


def test_strip_module_prefix():
    sd = {"module.conv1.weight": 1, "bn1.weight": 2, "head.module.x": 3, "module.module.y": 4}
    assert strip_module_prefix(sd) == {"conv1.weight": 1, "bn1.weight": 2, "head.module.x": 3, "module.y": 4}


# ---------------------------------------------------------------- RNG state

def draws(np_rng):
    return (torch.rand(3), np_rng.rand(3), np_rng.randn(), random.random(), random.gauss(0, 1))


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np_rng = np.random.RandomState(3)
    np_rng.randn()        # leaves a cached Gaussian in the NumPy state
    random.gauss(0, 1)    # and one in Python's
    assert np_rng.get_state()[3] == 1
    path = tmp_path / "rng.pth"
    atomic_save({"rng": rng_state(np_rng)}, str(path))
    first = draws(np_rng)
    # scramble everything, then restore from the weights_only file
    torch.manual_seed(99)
    random.seed(99)
    np_rng = np.random.RandomState(99)
    set_rng_state(safe_load(str(path))["rng"], np_rng)
    second = draws(np_rng)
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


# ---------------------------------------------------------------- resume discovery

def test_find_resume_none(tmp_path):
    assert find_resume_checkpoint(str(tmp_path), log=lambda m: None) == (None, None)


def write_epoch_copy(dump, epoch, ok=True):
    os.makedirs(dump / "checkpoints", exist_ok=True)
    p = dump / "checkpoints" / f"ckp-{epoch}.pth"
    if ok:
        atomic_save(good_ckpt(epoch), str(p))
    else:
        p.write_bytes(b"junk")
    return p


def test_find_resume_main_first(tmp_path):
    atomic_save(good_ckpt(30), str(tmp_path / "checkpoint.pth.tar"))
    write_epoch_copy(tmp_path, 25)
    path, ck_ = find_resume_checkpoint(str(tmp_path), log=lambda m: None)
    assert path == str(tmp_path / "checkpoint.pth.tar") and ck_["epoch"] == 30


def test_find_resume_falls_back_to_newest_readable_copy_and_logs(tmp_path):
    (tmp_path / "checkpoint.pth.tar").write_bytes(b"torn")
    write_epoch_copy(tmp_path, 5)
    write_epoch_copy(tmp_path, 25)
    write_epoch_copy(tmp_path, 100, ok=False)  # newest copy unreadable as well
    logs = []
    path, ck_ = find_resume_checkpoint(str(tmp_path), log=logs.append)
    assert path == str(tmp_path / "checkpoints" / "ckp-25.pth") and ck_["epoch"] == 25
    assert len(logs) == 3 and all("\n" not in m for m in logs)
    assert "checkpoint.pth.tar" in logs[0] and "ckp-100" in logs[1] and "ckp-25" in logs[2]


def test_find_resume_newest_copy_first_numerically(tmp_path):
    for e in (5, 25, 100, 9):
        write_epoch_copy(tmp_path, e)
    (tmp_path / "checkpoints" / "ckp-latest.pth").write_bytes(b"ignored")
    assert [os.path.basename(p) for p in epoch_copies(str(tmp_path))] == \
        ["ckp-100.pth", "ckp-25.pth", "ckp-9.pth", "ckp-5.pth"]
    path, ck_ = find_resume_checkpoint(str(tmp_path), log=lambda m: None)
    assert ck_["epoch"] == 100


def test_find_resume_all_corrupt_raises(tmp_path):
    (tmp_path / "checkpoint.pth.tar").write_bytes(b"torn")
    write_epoch_copy(tmp_path, 5, ok=False)
    atomic_save({"not": "a training checkpoint"}, str(tmp_path / "checkpoints" / "ckp-6.pth"))
    with pytest.raises(CheckpointError, match="no readable checkpoint") as info:
        find_resume_checkpoint(str(tmp_path), log=lambda m: None)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- resumable sampler

class Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize("rank", [0, 1])
def test_sampler_resumes_with_the_tail_of_the_epoch(rank):
    ds, bs = Range(23), 3
    for epoch in (0, 4):
        ref = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        ref.set_epoch(epoch)
        order = list(ref)
        assert len(order) == 12
        for k in range(6):
            s = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, batch_size=bs)
            s.set_epoch(epoch, start_iter=k)
            assert list(s) == order[k * bs:]
            assert len(s) == max(0, 12 - k * bs)


def test_sampler_set_epoch_changes_order_and_resets_start():
    s = ResumableDistributedSampler(Range(40), num_replicas=1, rank=0, batch_size=4)
    s.set_epoch(0, start_iter=2)
    assert len(list(s)) == 32 and len(s) == 32
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert len(e0) == 40 and sorted(e0) == list(range(40))
    assert e0 != e1 and sorted(e1) == sorted(e0)


# ---------------------------------------------------------------- integrity: CRC-32 of every record

def flip_a_bit_inside(path, tensor):
    """Flip the lowest bit of one element of `tensor`'s bytes where the file stores them."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes()[16:24])
    assert at > 0
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_flipped_bit_inside_a_tensor_is_found_and_the_epoch_copy_used(tmp_path):
    weights = torch.linspace(-1, 1, 64)
    ckpt = {"epoch": 3, "state_dict": {"w": weights}, "optimizer": {}}
    atomic_save(ckpt, str(tmp_path / "checkpoint.pth.tar"))
    write_epoch_copy(tmp_path, 2)
    flip_a_bit_inside(tmp_path / "checkpoint.pth.tar", weights)
    # torch itself loads it, one weight slightly off: what the check is for
    loaded = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["state_dict"]["w"]
    assert not torch.equal(loaded, weights) and torch.allclose(loaded, weights)
    assert_one_line_error(tmp_path / "checkpoint.pth.tar", "fails its CRC-32 check")
    logs = []
    path, found = find_resume_checkpoint(str(tmp_path), log=logs.append)
    assert path.endswith("ckp-2.pth") and found["epoch"] == 2
    assert "CRC-32" in logs[0] and "resuming from the epoch copy" in logs[1]


def test_legacy_format_without_checksums_still_loads(tmp_path):
    """The released code's torch wrote the pre-zip format, which keeps no checksum."""
    path = tmp_path / "released.pth.tar"
    torch.save(good_ckpt(7), str(path), _use_new_zipfile_serialization=False)
    assert safe_load(str(path))["epoch"] == 7


# ---------------------------------------------------------------- checkpoint fields

def tiny_training_state():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return net, opt


@pytest.mark.parametrize("damage, match", [
    (lambda c: c.update(epoch=-1), "epoch -1 / iteration 0 cannot be negative"),
    (lambda c: c.update(iteration=-5), "cannot be negative"),
    (lambda c: c.update(epoch="two"), "are not whole numbers"),
    (lambda c: c["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(5)), "momentum buffer 0 is (5,)"),
    # load_state_dict's first line only introduces the problem, which is on its second
    (lambda c: c["state_dict"].update(weight=torch.zeros(5, 3)), "size mismatch for weight: copying a param"),
])
def test_checkpoint_fields_that_make_no_sense_are_one_line_errors(tmp_path, damage, match):
    net, opt = tiny_training_state()
    ckpt = {"epoch": 2, "iteration": 0, "state_dict": net.state_dict(), "optimizer": opt.state_dict()}
    damage(ckpt)
    atomic_save(ckpt, str(tmp_path / "checkpoint.pth.tar"))
    fresh_net, fresh_opt = tiny_training_state()
    with pytest.raises(CheckpointError, match=re.escape(match)) as info:
        ck.restart_from_checkpoint(str(tmp_path), fresh_net, fresh_opt, log=lambda m: None)
    assert "\n" not in str(info.value)


def test_every_rank_resumes_its_own_mid_epoch_loss(tmp_path):
    net, opt = tiny_training_state()
    loops = [{"loss_sum": torch.tensor(1.5), "loss_count": 3, "queue_in_use": False},
             {"loss_sum": torch.tensor(7.25), "loss_count": 3, "queue_in_use": True}]
    atomic_save({"epoch": 0, "iteration": 3, "state_dict": net.state_dict(), "optimizer": opt.state_dict(),
                 "loop": loops[0], "loops": loops}, str(tmp_path / "checkpoint.pth.tar"))
    for rank in (0, 1):
        restart = ck.restart_from_checkpoint(str(tmp_path), *tiny_training_state(), log=lambda m: None, rank=rank)
        assert float(restart.loop["loss_sum"]) == float(loops[rank]["loss_sum"])
        assert restart.loop["queue_in_use"] is loops[rank]["queue_in_use"]


# ---------------------------------------------------------------- one run per folder

def test_a_locked_folder_is_refused_before_anything_is_touched(tmp_path):
    held = run_folder.prepare_dump_path(str(tmp_path))
    stale = tmp_path / ".checkpoint.pth.tar.12345.0a1b2c3d.tmp"  # as if the holder were writing it
    stale.write_bytes(b"being written")
    with pytest.raises(CheckpointError) as info:
        run_folder.prepare_dump_path(str(tmp_path))
    msg = str(info.value)
    assert "\n" not in msg and "in use by another run" in msg and f"process {os.getpid()} on " in msg
    assert stale.exists(), "a refused run removed the holder's temporary file"
    held.close()  # what the end of the holding process does
    lock = run_folder.prepare_dump_path(str(tmp_path))
    assert not stale.exists()
    assert (tmp_path / "run.lock").read_text().split()[1] == str(os.getpid())
    lock.close()


def test_the_lock_goes_with_its_process(tmp_path):
    """A holder that was killed leaves the lock free at once (the kernel drops it with the process)."""
    code = (f"import sys, time; sys.path.insert(0, {str(ck.__file__.rsplit('/src/', 1)[0])!r}); "
            f"from src.runtime.run_folder import lock_run_folder; lock = lock_run_folder({str(tmp_path)!r}); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"process {proc.pid} on "):
            run_folder.lock_run_folder(str(tmp_path), wait_for_dead_holder_s=0)
    finally:
        proc.kill()
        proc.wait()
    run_folder.lock_run_folder(str(tmp_path)).close()


@pytest.mark.parametrize("name", ["checkpoint.pth.tar", "params.json", "stats0.csv"])
def test_a_folder_in_place_of_a_run_file_stops_at_start(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(CheckpointError, match=f"{name} is not a regular file"):
        run_folder.prepare_dump_path(str(tmp_path))
    run_folder.lock_run_folder(str(tmp_path)).close()  # the refused run let go of the lock


def test_a_full_disk_is_one_plain_error_and_leaves_the_old_file(tmp_path):
    """A file-size limit (what a full disk looks like to a writer): torch.save's RuntimeError becomes the
    OSError naming the file, no temporary file stays, the old checkpoint is intact. In a child process,
    whose limit goes with it."""
    path = tmp_path / "checkpoint.pth.tar"
    atomic_save(good_ckpt(1), str(path))
    before = path.read_bytes()
    code = ("import resource, sys, torch; sys.path.insert(0, sys.argv[1]); from src.runtime.checkpoint import atomic_save\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))\n"
            "try:\n    atomic_save({'w': torch.zeros(100000)}, sys.argv[2])\n"
            "except OSError as e:\n    print(e.errno, e.strerror, e.filename, e.__suppress_context__)\n")
    out = subprocess.run([sys.executable, "-c", code, ck.__file__.rsplit("/src/", 1)[0], str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["27", "File", "too", "large", str(path), "True"], out.stdout + out.stderr
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"] and path.read_bytes() == before
