"""Nothing lost (issue 6): atomic writes, exact continuation, SIGKILL at random moments, unreadable
checkpoints, the non-finite loss guard, and loading that never runs code from a file.

Every run is a tiny CPU pretraining (100 fake CIFAR-10 images, 6 iterations per epoch). The uninterrupted
reference is a real `python main_swav_unmix.py`; the interrupted runs use the ForkRunner (same script,
forked from an interpreter that imported it once) to keep the module within its time budget.
"""
import ast
import os
import pickle
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from src.runtime.checkpoint import CheckpointError, find_resume_checkpoint, safe_load
from src.runtime.files import atomic_write, remove_stale_temporaries
from src.runtime.signals import PREEMPTED_EXIT_CODE
from tests.e2e_helpers import (MAIN, REPO, forked_run_fixtures, kill, pid_alive, run_script, tiny_args,
                               wait_for_log)

pytestmark = pytest.mark.slow

ITERS = 6  # iterations per epoch of the tiny runs


# ----------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------------

work, data, runner = forked_run_fixtures("resume")


@pytest.fixture(scope="module")
def reference(work, data):
    """The uninterrupted 2-epoch run, started as a real `python main_swav_unmix.py`."""
    dump = work / "reference"
    res = run_script(MAIN, tiny_args(data, dump, 2), cwd=work)
    assert res.returncode == 0, res.explain()
    return dump


@pytest.fixture(scope="module")
def stopped(work, data, runner):
    """The same run stopped (resumably) at the end of epoch 0 by --epochs_run_limit 1; tests copy it.
    Returns (dump, seconds the run took)."""
    dump = work / "stopped"
    t0 = time.time()
    res = runner.run(MAIN, tiny_args(data, dump, 2, "--epochs_run_limit", 1), cwd=work)
    seconds = time.time() - t0
    assert res.returncode == 0, res.explain()
    assert "Pretraining paused" in res.stdout
    ck = load(dump)
    assert (ck["epoch"], ck["iteration"]) == (1, 0)
    return dump, seconds


def load(dump, name="checkpoint.pth.tar"):
    return torch.load(Path(dump) / name, map_location="cpu", weights_only=True)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_same_run(dump, ref):
    """Final weights, optimiser state and per-epoch losses equal bit for bit."""
    a, b = load(dump), load(ref)
    assert a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    if b.get("queues") is not None:
        assert all(torch.equal(x, y) for x, y in zip(a["queues"], b["queues"]))
    st, sr = stats(dump), stats(ref)
    assert st["epoch"].tolist() == sr["epoch"].tolist() == list(range(len(sr)))
    assert st["loss"].tolist() == sr["loss"].tolist()
    assert st["lr"].tolist() == sr["lr"].tolist()


def stats(dump):
    return pd.read_csv(Path(dump) / "stats0.csv")


def file_state(path):
    st = os.stat(path)
    return Path(path).read_bytes(), st.st_mtime_ns


def one_line(res):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.explain()
    assert "Traceback" not in res.stderr + res.stdout, res.explain()
    return lines[0]


class _OpensAFile:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------------------
# exact continuation
# ----------------------------------------------------------------------------------------------------------

def test_epoch_boundary_resume_is_bit_exact_and_unpickles_nothing(work, data, runner, stopped, reference):
    dump = copy_run(stopped[0], work / "boundary")
    # booby-trapped pickles in the run folder: resuming must not load them (stats come from the CSV,
    # parameters from params.json, the checkpoint with weights_only=True)
    marker = work / "boundary_unpickled"
    for name in ("params.pkl", "stats0.pkl"):
        (dump / name).write_bytes(pickle.dumps(_OpensAFile(marker)))
    res = runner.run(MAIN, tiny_args(data, dump, 2), cwd=work)
    assert res.returncode == 0, res.explain()
    assert f"Resumed from {dump}/checkpoint.pth.tar: epoch 1, iteration 0." in res.stdout
    assert not marker.exists(), "resuming unpickled a file of the run folder"
    assert_same_run(dump, reference)
    # the pickles are rewritten by the run (released files), not read
    assert isinstance(pd.read_pickle(dump / "stats0.pkl"), pd.DataFrame)


VARIANTS = {
    # DataLoader workers take their seeds from the torch RNG, which the checkpoint restores
    "workers2": dict(epochs=2, stop_after=1, extra=["--workers", 2]),
    # queue of 32 (batch 16) from epoch 1; stopping after epoch 1 puts a full queue into the checkpoint
    "queue": dict(epochs=3, stop_after=2, extra=["--queue_length", 32, "--epoch_queue_starts", 1]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_epoch_boundary_resume_is_bit_exact_variants(work, data, runner, variant):
    v = VARIANTS[variant]
    ref, dump = work / f"{variant}_ref", work / f"{variant}_resumed"
    res = runner.run(MAIN, tiny_args(data, ref, v["epochs"], *v["extra"]), cwd=work)
    assert res.returncode == 0, res.explain()
    res = runner.run(MAIN, tiny_args(data, dump, v["epochs"], *v["extra"], "--epochs_run_limit", v["stop_after"]),
                     cwd=work)
    assert res.returncode == 0, res.explain()
    ck = load(dump)
    assert (ck["epoch"], ck["iteration"]) == (v["stop_after"], 0)
    if variant == "queue":
        assert ck["queues"] is not None and ck["queues"][0].shape == (2, 32, 16)
        assert all(q.abs().sum(-1).gt(0).all() for q in ck["queues"]), "the saved queue should be full"
    res = runner.run(MAIN, tiny_args(data, dump, v["epochs"], *v["extra"]), cwd=work)
    assert res.returncode == 0, res.explain()
    assert f"epoch {v['stop_after']}, iteration 0." in res.stdout
    assert_same_run(dump, ref)


def test_preemption_mid_epoch_continues_at_next_iteration(work, data, runner, reference):
    dump = work / "preempted"
    args = tiny_args(data, dump, 2, "--log_freq", 1)
    h = runner.start(MAIN, args, cwd=work)
    wait_for_log(dump / "train.log", "Epoch: [0][2/6]", alive=lambda: pid_alive(h.pid))
    kill(h.pid, signal.SIGUSR1)
    res = runner.wait(h)
    assert res.returncode == PREEMPTED_EXIT_CODE, res.explain()
    m = re.search(r"checkpoint saved at epoch (\d+), iteration (\d+)\.", res.stdout)
    assert m, res.explain()
    epoch, it = int(m.group(1)), int(m.group(2))
    assert 3 <= epoch * ITERS + it <= 2 * ITERS and 1 <= it <= ITERS, (epoch, it)
    ck = load(dump)
    assert (ck["epoch"], ck["iteration"]) == (epoch, it)
    assert ck["loop"]["loss_count"] == it
    res = runner.run(MAIN, args, cwd=work)
    assert res.returncode == 0, res.explain()
    assert f"Resumed from {dump}/checkpoint.pth.tar: epoch {epoch}, iteration {it}." in res.stdout
    after = res.stdout.split("Resumed from", 1)[1]
    if it < ITERS:  # the rerun starts at the next iteration of the same epoch
        first = re.search(r"Epoch: \[(\d+)\]\[(\d+)/6\]", after)
        assert (int(first.group(1)), int(first.group(2))) == (epoch, it), after[:500]
    # with in-process data loading (--workers 0) the continuation is even bit-exact
    assert_same_run(dump, reference)


def test_sigkill_at_random_moments_then_restart_until_done(work, data, runner, reference):
    """SIGKILL at seeded random moments, restart each time, until the run completes. Each kill picks a
    random point of the run (start-up, the log line of one of its first 11 iterations, or "Epoch 0 done",
    after which the checkpoint and its epoch copy are written; a point the checkpoint has passed means
    start-up) plus a random extra delay, so kills land anywhere: start-up, mid-epoch, and while stats and
    checkpoints are written at an epoch's end. A run that finishes before its kill lands (a kill meant for
    its last iterations, on a loaded machine) is a valid end, checked like the last one; the kills left go
    on in a new folder."""
    dumps = [work / "killed"]
    rng = random.Random(0)
    n_kills = int(os.environ.get("UNMIX_FAULT_KILLS", "6"))
    history, kills = [], 0
    for _ in range(n_kills + 20):
        dump = dumps[-1]
        args, log = tiny_args(data, dump, 2, "--log_freq", 1), dump / "train.log"
        # where the run resumes: a kill between the epoch copy and the checkpoint leaves only the copy
        _, ck = find_resume_checkpoint(str(dump), log=lambda _: None)
        done = 0 if ck is None else ck["epoch"] * ITERS + ck["iteration"]
        offset = log.stat().st_size if log.exists() else 0
        h = runner.start(MAIN, args, cwd=work)
        moment = None
        if kills < n_kills:
            target = rng.randrange(-1, 2 * ITERS)  # -1: during start-up; 2 * ITERS - 1: "Epoch 0 done"
            extra = rng.uniform(0.0, 0.03 if target == 2 * ITERS - 1 else 0.15)
            needle = None
            if target == 2 * ITERS - 1 and done < ITERS:
                needle = "Epoch 0 done"
            elif 0 <= target < 2 * ITERS - 1 and target >= done:
                needle = f"Epoch: [{target // ITERS}][{target % ITERS}/{ITERS}]"
            if needle is not None:
                try:
                    wait_for_log_after(log, offset, needle, alive=lambda: pid_alive(h.pid))
                except TimeoutError:
                    pass
            time.sleep(extra)
            if pid_alive(h.pid):
                kill(h.pid)
                tail = log.read_bytes()[offset:].decode(errors="replace").strip().splitlines() if log.exists() else []
                moment = (tail[-1].split(" - ", 3)[-1][:40] if tail else "before the log") + f" +{extra:.2f}s"
        res = runner.wait(h)
        kills += res.returncode == -signal.SIGKILL
        ck = load(dump) if (dump / "checkpoint.pth.tar").exists() else None
        history.append((dump.name, moment if res.returncode else "not killed", res.returncode,
                        None if ck is None else (ck["epoch"], ck["iteration"])))
        if res.returncode == 0:
            assert "Pretraining done." in res.stdout, res.explain()
            if kills >= n_kills:
                break
            dumps.append(work / f"killed_{len(dumps)}")  # finished before its kill landed: the next kills there
            continue
        assert res.returncode == -signal.SIGKILL, res.explain()
    print("\nSIGKILL history (folder, last log line + extra delay at the kill, exit status, checkpoint after):")
    for row in history:
        print("  ", row)
    assert res.returncode == 0 and "Pretraining done." in res.stdout, res.explain()
    assert kills >= min(n_kills, 4), history
    for dump in dumps:  # every folder holds a finished run, the uninterrupted one's to the bit
        assert_same_run(dump, reference)
        ckp1 = load(dump, "checkpoints/ckp-1.pth")
        assert all(torch.equal(v, load(dump)["state_dict"][k]) for k, v in ckp1["state_dict"].items())
        assert (dump / "checkpoints" / "ckp-0.pth").is_file()
        leftovers = [p.name for p in list(dump.glob(".*")) + list((dump / "checkpoints").glob(".*"))]
        assert not leftovers, f"temporary files left behind in {dump.name}: {leftovers}"


def wait_for_log_after(path, offset, needle, timeout=120, alive=None):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and needle in path.read_bytes()[offset:].decode(errors="replace"):
            return
        if alive is not None and not alive():
            break
        time.sleep(0.002)
    raise TimeoutError(needle)


# ----------------------------------------------------------------------------------------------------------
# unreadable checkpoints
# ----------------------------------------------------------------------------------------------------------

def damage(path, how):
    data = Path(path).read_bytes()
    Path(path).write_bytes(b"\x00garbage, not a checkpoint\n" * 10 if how == "garbage" else data[: len(data) // 2])


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_unreadable_checkpoint_falls_back_to_newest_epoch_copy(work, data, runner, stopped, reference, how):
    dump = copy_run(stopped[0], work / f"fallback_{how}")
    damage(dump / "checkpoint.pth.tar", how)
    res = runner.run(MAIN, tiny_args(data, dump, 2), cwd=work)
    assert res.returncode == 0, res.explain()
    lines = res.stdout.splitlines()
    said = [ln for ln in lines if "unreadable checkpoint, skipped" in ln and "checkpoint.pth.tar" in ln]
    assert len(said) == 1, res.stdout[-2000:]
    assert any("resuming from the epoch copy" in ln and "ckp-0.pth" in ln for ln in lines), res.stdout[-2000:]
    assert "Resumed from" in res.stdout and "ckp-0.pth: epoch 1, iteration 0." in res.stdout
    assert_same_run(dump, reference)


def test_no_readable_checkpoint_stops_instead_of_starting_afresh(work, data, runner, stopped):
    dump = copy_run(stopped[0], work / "nothing_readable")
    damage(dump / "checkpoint.pth.tar", "truncated")
    damage(dump / "checkpoints" / "ckp-0.pth", "garbage")
    before = file_state(dump / "checkpoint.pth.tar")
    res = runner.run(MAIN, tiny_args(data, dump, 2), cwd=work)
    assert res.returncode != 0
    assert "no readable checkpoint" in one_line(res)
    assert "Epoch: [" not in res.stdout, "it trained"
    assert file_state(dump / "checkpoint.pth.tar") == before


# ----------------------------------------------------------------------------------------------------------
# non-finite loss
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_steps", [2, 100])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(work, data, runner, stopped, max_steps):
    """After one good epoch, a learning rate of 1e30 makes the weights blow up and the loss NaN.
    max 2: the guard stops mid-epoch. max 100: the epoch ends inside the streak; its weights are not saved."""
    dump = copy_run(stopped[0], work / f"nonfinite_{max_steps}")
    guarded = ["checkpoint.pth.tar", "checkpoints/ckp-0.pth"]
    before = {name: file_state(dump / name) for name in guarded}
    time.sleep(0.01)  # a rewrite would show in the modification time
    res = runner.run(MAIN, tiny_args(data, dump, 2, "--base_lr", "1e30", "--warmup_epochs", 0,
                                     "--allow_changed_args", "true", "--max_nonfinite_steps", max_steps), cwd=work)
    assert res.returncode != 0, res.explain()
    line = one_line(res)
    assert "non-finite loss" in line and "last good checkpoint" in line, line
    skipped = re.findall(r"non-finite loss at epoch 1 iteration \d+: step skipped", res.stdout)
    assert len(skipped) >= min(max_steps, 2), res.stdout[-2000:]
    assert {name: file_state(dump / name) for name in guarded} == before
    assert not (dump / "checkpoints" / "ckp-1.pth").exists()
    assert load(dump)["epoch"] == 1


# ----------------------------------------------------------------------------------------------------------
# atomic writes and safe loading (no runs)
# ----------------------------------------------------------------------------------------------------------

def test_atomic_write_leaves_old_file_when_interrupted(tmp_path):
    target = tmp_path / "checkpoint.pth.tar"
    target.write_bytes(b"old complete file")

    def half_then_die(f):
        f.write(b"new but incompl")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_die)
    assert target.read_bytes() == b"old complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar"]
    # what a SIGKILL mid-write leaves: a temporary, removed at the next start; other files stay
    stale = tmp_path / ".checkpoint.pth.tar.1234.0123abcd.tmp"
    stale.write_bytes(b"torn")
    (tmp_path / ".keep.tmp").write_bytes(b"not ours")
    assert remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    assert (tmp_path / ".keep.tmp").exists()


def test_params_and_stats_are_replaced_atomically(tmp_path, monkeypatch):
    """A failure (or kill) while params.json / stats are written leaves the previous complete files."""
    from argparse import Namespace

    from src.runtime import logs as L, run_folder
    run_folder.save_params(Namespace(base_lr=0.6, nmb_crops=[2]), str(tmp_path))
    st = L.Stats(str(tmp_path / "stats0"), ["epoch", "loss"])
    st.update({"epoch": 0, "loss": 1.5})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.json, "dumps", boom)  # dies while params.json is being written
    with pytest.raises(KeyboardInterrupt):
        run_folder.save_params(Namespace(base_lr=0.3, nmb_crops=[2]), str(tmp_path))
    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)  # dies while stats0.csv is being written
    with pytest.raises(KeyboardInterrupt):
        st.update({"epoch": 1, "loss": 1.0})
    for name in ("params.json", "stats0.csv"):
        assert (tmp_path / name).read_bytes() == before[name]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert run_folder.load_params_json(str(tmp_path))["base_lr"] == 0.6


def test_damaged_stats_csv_is_set_aside_not_fatal(tmp_path):
    from src.runtime.logs import Stats
    (tmp_path / "stats0.csv").write_text('epoch,loss\n0,1.5\nnot-a-number,"unterminated\n')
    said = []
    st = Stats(str(tmp_path / "stats0"), ["epoch", "loss"], resume_before_epoch=1, log=said.append)
    assert st.df.empty and len(said) == 1 and "unreadable" in said[0]
    assert (tmp_path / "stats0.csv.unreadable").is_file() and not (tmp_path / "stats0.csv").exists()
    (tmp_path / "stats0.csv").write_text("epoch,loss\n0,1.5\n1,1.25\n2,1.0\n")
    st = Stats(str(tmp_path / "stats0"), ["epoch", "loss"], resume_before_epoch=2)
    assert st.df["epoch"].tolist() == [0, 1] and st.df["loss"].tolist() == [1.5, 1.25]


def test_safe_load_refuses_code_in_a_checkpoint(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "checkpoints" / "ckp-3.pth"
    path.parent.mkdir()
    torch.save({"epoch": 4, "state_dict": {"w": torch.zeros(1)}, "evil": _OpensAFile(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        safe_load(path)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        find_resume_checkpoint(str(tmp_path), log=lambda msg: None)
    assert not marker.exists()


def _python_sources():
    files = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "tools").rglob("*.py"))
    return files + [REPO / "main_swav_unmix.py", REPO / "eval_linear.py"]


def test_every_torch_load_uses_weights_only():
    calls, bad = 0, []
    for path in _python_sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls += 1
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
        # also catch aliases such as `from torch import load` or `load = torch.load`
        assert not re.search(r"from torch import[^\n]*\bload\b|=\s*torch\.load\b", path.read_text()), path
    assert calls >= 1
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_resuming_reads_no_pickle_from_the_run_folder():
    """Resuming code (the pretraining script and the checkpoint/logger modules) has no way to unpickle
    arbitrary objects: stats come back from the CSV, arguments from params.json, checkpoints via
    weights_only. The one exception, the stats table of a released run folder, is read by
    `read_released_stats`, whose unpickler resolves only an allow-list (tests/test_logger.py feeds it code)."""
    for name in ("main_swav_unmix.py", "src/runtime/checkpoint.py", "src/runtime/logs.py", "src/runtime/run_folder.py"):
        src = (REPO / name).read_text()
        if name == "src/runtime/logs.py":
            reader = next(n for n in ast.parse(src).body
                          if isinstance(n, ast.FunctionDef) and n.name == "read_released_stats")
            reader_src = ast.get_source_segment(src, reader)
            assert "def find_class" in reader_src and "not in _STATS_PICKLE_GLOBALS" in reader_src
            src = src.replace(reader_src, "")
        for pattern in (r"pickle\.loads?\(", r"read_pickle", r"\bUnpickler\b", r"\.pkl[\"']\s*\)\s*,\s*[\"']rb"):
            assert not re.search(pattern, src), f"{name} matches {pattern}"
    main_src = (REPO / "main_swav_unmix.py").read_text()
    assert "params.pkl" not in main_src and "stats0.pkl" not in main_src


# ----------------------------------------------------------------------------------------------------------
# exact on every path; records that tell the truth; a full disk
# ----------------------------------------------------------------------------------------------------------

def test_batched_crops_preempted_mid_epoch_resume_bit_exact(work, data, runner):
    """--augment batched: the crops of a chunk of iterations come from a generator seeded per chunk, so a
    run preempted inside a chunk (SIGTERM) resumes with the very crops of the uninterrupted run."""
    ref, dump = work / "batched_ref", work / "batched_preempted"
    res = runner.run(MAIN, tiny_args(data, ref, 2, "--augment", "batched"), cwd=work)
    assert res.returncode == 0, res.explain()
    args = tiny_args(data, dump, 2, "--augment", "batched", "--log_freq", 1)
    h = runner.start(MAIN, args, cwd=work)
    wait_for_log(dump / "train.log", "Epoch: [0][1/6]", alive=lambda: pid_alive(h.pid))
    kill(h.pid, signal.SIGTERM)
    res = runner.wait(h)
    assert res.returncode == PREEMPTED_EXIT_CODE, res.explain()
    ck = load(dump)
    assert ck["epoch"] * ITERS + ck["iteration"] < 2 * ITERS and ck["iteration"] % 8 != 0  # inside a chunk of 8
    res = runner.run(MAIN, args, cwd=work)
    assert res.returncode == 0 and f"iteration {ck['iteration']}." in res.stdout, res.explain()
    assert_same_run(dump, ref)


def test_an_epoch_without_a_finite_step_is_recorded_as_nan(work, data, runner):
    """A Sinkhorn epsilon of 1e-30 overflows from the first step: no step is kept. The epoch's loss is NaN
    (not 0.0), and nothing promises a checkpoint, for there is none."""
    dump = work / "all_nonfinite"
    res = runner.run(MAIN, tiny_args(data, dump, 1, "--epsilon", 1e-30, "--max_nonfinite_steps", 100), cwd=work)
    assert res.returncode == 4, res.explain()
    assert "Epoch 0: no finite step, its loss is recorded as NaN" in res.stdout
    assert stats(dump)["loss"].isna().tolist() == [True]
    line = one_line(res)
    assert "no checkpoint was written yet" in line and "kept" not in line, line
    assert not (dump / "checkpoint.pth.tar").exists()


def test_a_full_disk_is_one_line_and_the_last_checkpoint_is_intact(work, data, stopped):
    """A file-size limit (what a full disk looks like to the writer) hits the checkpoint of epoch 1: one
    line, status 6, no temporary file, and the checkpoint of epoch 0 unchanged; without the limit the same
    command resumes."""
    import resource
    import subprocess
    import sys

    from tests.e2e_helpers import RUN_ENV
    dump = copy_run(stopped[0], work / "disk_full")
    before = file_state(dump / "checkpoint.pth.tar")
    limit = (dump / "checkpoint.pth.tar").stat().st_size // 2
    p = subprocess.run([sys.executable, str(MAIN), *map(str, tiny_args(data, dump, 2))], cwd=work, env=RUN_ENV,
                       capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert p.returncode == 6, p.stdout[-2000:] + p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "File too large" in lines[0], p.stderr
    assert file_state(dump / "checkpoint.pth.tar") == before
    leftovers = [q.name for q in list(dump.glob(".*")) + list((dump / "checkpoints").glob(".*"))]
    assert not leftovers, leftovers


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real file system of a given size (tmpfs; needs root, as on CI), unmounted afterwards."""
    import subprocess
    mounted = []

    def mount(size_kb):
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'mount failed'})")
        mounted.append(point)
        return point

    def remount(point, options):
        subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)

    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    yield mount, remount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_really_full_disk_then_a_read_only_folder_lose_nothing(work, data, stopped, reference, small_tmpfs, runner):
    """On a real file system with room for half a checkpoint (ENOSPC, not a size limit): one line, status 6,
    the checkpoint of epoch 0 unchanged, no temporary file. The same folder read-only: one line, status 2,
    before any training. Writable and larger again: the same command resumes and ends exactly as the
    uninterrupted run."""
    mount, remount = small_tmpfs
    pages = lambda p: -(-p.stat().st_size // 4096) * 4096  # noqa: E731 (tmpfs counts whole pages)
    used = sum(pages(p) for p in stopped[0].rglob("*") if p.is_file())
    ckpt_size = (stopped[0] / "checkpoint.pth.tar").stat().st_size
    fs = mount((used + ckpt_size // 2) // 1024)
    dump = copy_run(stopped[0], fs / "run")
    before = file_state(dump / "checkpoint.pth.tar")

    full = runner.run(MAIN, tiny_args(data, dump, 2), cwd=work)
    assert full.returncode == 6, full.explain()
    line = one_line(full)
    assert line.startswith("error: cannot write ") and "No space left on device" in line, line
    assert file_state(dump / "checkpoint.pth.tar") == before
    leftovers = [q.name for q in list(dump.glob(".*")) + list((dump / "checkpoints").glob(".*"))]
    assert not leftovers, leftovers

    remount(fs, "ro")
    read_only = runner.run(MAIN, tiny_args(data, dump, 2), cwd=work)
    assert read_only.returncode == 2, read_only.explain()
    assert "Read-only file system" in one_line(read_only)
    assert "Epoch" not in read_only.stdout  # refused before training

    remount(fs, f"rw,size={(used + 4 * ckpt_size) // 1024}k")
    res = runner.run(MAIN, tiny_args(data, dump, 2), cwd=work)
    assert res.returncode == 0, res.explain()
    assert_same_run(dump, reference)
