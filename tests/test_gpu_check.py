"""benchmarks/gpu_check.sh on the CPU: the dry run goes through every phase (tiny sizes, the fixture) and
reports; a real run refuses to go on without CIFAR-10 (no data, or the test fixture) and unknown phases;
the real run's variant is the fastest one shown equal to eager (benchmarks/pick_variant.py); the report
of the real run states its training images."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_train_step  # noqa: E402
import pick_variant  # noqa: E402
import real_run_report  # noqa: E402


def run_check(tmp_path, *args, **env):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", **env)
    res = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    return res, summary


def fixture_archive(tmp_path):
    """The 400-image fixture packed as the CIFAR-10 JPEG archive is: train/ and test/ at its top."""
    import tarfile
    path = tmp_path / "cifar10-jpg.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        for part in ("train", "test"):
            tar.add(REPO / "tests" / "data" / "cifar10_jpg_small" / part, arcname=part)
    return path


def test_dry_run_goes_through_every_phase(tmp_path):
    """Given DATA and ARCHIVE, the dry run also unpacks the archive as a real run does (into DATA.unpacking,
    moved into DATA once complete, the wait counted in (c)'s limit)."""
    data = tmp_path / "cifar10"
    res, summary = run_check(tmp_path, "--dry-run", DATA=str(data), ARCHIVE=str(fixture_archive(tmp_path)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"- c: unpacking {tmp_path / 'cifar10-jpg.tar.xz'}: tar's status 0, " in summary
    assert sorted(p.name for p in data.iterdir()) == ["test", "train"] and not (tmp_path / "cifar10.unpacking").exists()
    statuses = [line for line in summary.splitlines() if ": status " in line]
    assert [s.split(":")[0] for s in statuses] == ["- a", "- b", "- c"], summary
    assert all(": status 0," in s for s in statuses), summary
    assert "| --augment batched, bf16, channels_last (eager) |" in summary  # the side-by-side table
    assert "- c: variant eager (--augment batched --amp_dtype bfloat16 --channels_last true)" in summary
    assert "- c: trained on 300 training images" in summary and "| 0 |" in summary
    assert "- problems: 0" in summary and "86.8" not in summary and "column" not in summary
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "device.txt", "gpu_check.log", "runs.tar.gz",
                                                     "summary.md"]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["rows"][0]["name"] == "eager"
    # the profiled window and the FLOP count ran too (on the CPU: no kernel, so no busy time)
    assert bench["rows"][0]["profiled_window_s"] > 0 and bench["rows"][0]["gpu_busy_ms"] is None
    assert bench["flops_per_iteration"] > 0 and bench["peak_tflops"] is None


def test_a_real_run_without_data_is_an_error(tmp_path):
    res, summary = run_check(tmp_path, PHASES="c", DATA=str(tmp_path / "none"), ARCHIVE=str(tmp_path / "no.tar.xz"))
    assert res.returncode != 0
    assert f"error: no training data for (c): neither DATA={tmp_path / 'none'}/train nor ARCHIVE=" in summary
    assert "pretraining" not in summary and "trained on" not in summary
    if not torch.cuda.is_available():  # nothing runs: every phase would spend its limit on the CPU
        assert res.returncode == 1 and "- problems: 2" in summary
        assert "- error: torch sees no CUDA device (see device.txt); nothing run (on the CPU: --dry-run)" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop without a GPU")
def test_a_run_that_stops_for_want_of_a_gpu_unpacks_nothing(tmp_path):
    """Before, the archive was unpacked into DATA in a shell the exit trap killed while tar went on: a later
    run took the unpacked (or half-unpacked) DATA/train for the data set."""
    data = tmp_path / "cifar10"
    res, summary = run_check(tmp_path, PHASES="c", DATA=str(data), ARCHIVE=str(fixture_archive(tmp_path)))
    assert res.returncode == 1 and "torch sees no CUDA device" in summary
    time.sleep(2)  # what a background tar would still write
    assert not (data / "train").exists() and not (tmp_path / "cifar10.unpacking").exists()


def test_a_real_run_refuses_the_test_fixture(tmp_path):
    res, summary = run_check(tmp_path, PHASES="c", DATA=str(REPO / "tests" / "data" / "cifar10_jpg_small"))
    assert res.returncode != 0
    assert "is the test fixture (400 images): (c) needs CIFAR-10; not run" in summary
    assert "pretraining" not in summary


def test_unknown_phases_are_refused(tmp_path):
    res, summary = run_check(tmp_path, PHASES="a e")
    assert res.returncode == 2 and "unknown phase 'e'" in res.stderr and summary == ""


@pytest.mark.parametrize("args, status, said", [
    (["--help"], 0, "PHASES="), (["-h"], 0, "--dry-run"),
    (["--hlep"], 2, "unknown argument '--hlep'"), (["--dry-run", "x"], 2, "one argument at most")])
def test_help_and_unknown_arguments_start_nothing(tmp_path, args, status, said):
    """--help shows the usage; before, any argument other than --dry-run started the whole check."""
    res, summary = run_check(tmp_path, *args)
    assert res.returncode == status and said in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr
    assert not (tmp_path / "out").exists() and summary == ""  # nothing run, nothing written


@pytest.mark.parametrize("args, status", [(["--help"], 0), ([], 2), (["only_one.json"], 2)])
def test_pick_variant_usage(args, status):
    """Its usage, not an IndexError's traceback, when called by hand."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pick_variant.py"), *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == status and "BENCH_JSON PYTEST_LOG" in res.stdout + res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_the_real_run_uses_the_fastest_variant_shown_equal():
    rows = [{"name": "eager", "ms": 20.0}, {"name": "compile", "ms": 15.0}, {"name": "cuda_graph", "ms": 12.0},
            {"name": "compile+cuda_graph", "error": "exit 1: RuntimeError"}]
    log = ("tests/test_cuda.py::test_cuda_graph_replays_equal_eager[bf16] FAILED [ 60%]\n"
           "tests/test_cuda.py::test_compiled_step_equals_eager_and_does_not_sync PASSED [ 80%]\n"
           "tests/test_cuda.py::test_compiled_cuda_graph_replays_equal_compiled_eager PASSED [ 90%]\n"
           "tests/test_cuda.py::test_compiled_fast_path_is_close_to_eager_and_does_not_sync PASSED [100%]\n")
    name, why = pick_variant.pick(rows, log)
    assert name == "compile" and "faster but not shown equal: cuda_graph" in why
    # compiled but not shown close to eager under the run's bf16 + channels_last (or cut by the time limit)
    assert pick_variant.pick(rows, log.replace("fast_path_is_close_to_eager_and_does_not_sync PASSED", ""))[0] == "eager"
    assert pick_variant.pick(rows, log.replace("FAILED", "PASSED"))[0] == "cuda_graph"
    assert pick_variant.pick(rows, "")[0] == "eager"   # no test passed: the reference
    assert pick_variant.pick([], log)[0] == "eager"    # no timing
    both = rows[:3] + [{"name": "compile+cuda_graph", "ms": 10.0}]
    assert pick_variant.pick(both, log.replace("FAILED", "PASSED"))[0] == "compile+cuda_graph"
    assert pick_variant.pick(both, log)[0] == "compile"  # its graph check failed
    # eager the fastest: not said to have passed checks it does not have
    name, why = pick_variant.pick([{"name": "eager", "ms": 9.0}] + rows[1:], log)
    assert name == "eager" and why == "the fastest variant, the reference: no check needed (9.0 ms / iteration)"


def test_the_real_run_report_states_its_images_and_refuses_a_subset(tmp_path):
    (tmp_path / "train.log").write_text("INFO - Building data done with 300 images loaded (10 classes, ...)\n")
    pd.DataFrame({"epoch": [0, 1], "loss": [8.1, 7.9], "time": [20.0, 29.5], "knn_top1": [30.0, 33.5],
                  "images_per_s": [5000.0, 5100.0], "max_memory_mb": [4000.0, 4000.0]}).to_csv(
        tmp_path / "stats0.csv", index=False)
    lines, ok = real_run_report.report(str(tmp_path), 200)
    assert not ok and "- c: trained on 300 training images" in lines
    assert any("only 300 training images; CIFAR has 50,000" in line for line in lines)
    assert "| 1 | 7.9000 | 33.50 | 9.5 | 5,100 | 4,000 |" in lines
    assert real_run_report.report(str(tmp_path), 200, dry_run=True)[1]
    (tmp_path / "train.log").write_text("INFO - Building data done with 50000 images loaded (10 classes)\n")
    assert real_run_report.report(str(tmp_path), 200)[1]


def test_gpu_busy_time_is_the_union_of_the_device_intervals():
    """Overlapping kernels (two streams) count once: busy time can never exceed the wall time."""
    spans = [(20, 30), (0, 10), (5, 15), (21, 22), (30, 31)]
    assert bench_train_step.busy_seconds(spans) == pytest.approx(26e-6)
    assert bench_train_step.busy_seconds([]) is None


def test_the_side_by_side_ends_by_its_deadline_and_names_the_worker_it_stopped(tmp_path):
    """A worker not set up by --ready_s (a compile still running) is stopped, well before --deadline_s; the
    table and the JSON are still written, with its row saying why."""
    out, js = tmp_path / "bench.md", tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--quick", "--configs",
                          "eager", "--ready_s", "0.5", "--deadline_s", "100", "--out", str(out), "--json", str(js), "--log_dir",
                          str(tmp_path / "logs")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    row = json.loads(js.read_text())["rows"][0]
    assert row == {"name": "eager", "error": "no reply by the deadline (stopped)"}
    assert "| failed (no reply by the deadline (stopped)) |" in out.read_text()
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["worker0_eager.log"]
