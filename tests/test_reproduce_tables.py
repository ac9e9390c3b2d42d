"""scripts/reproduce_tables.sh (tools/reproduce_tables.py, scripts/table_cell.sh): the plan, bad input, cell
statuses, and tiny tables run for real, here one cell after another and through a job array and a report job
on a private one-node Slurm (tests/slurm_cluster.py; skipped with the reason when Slurm is missing)."""
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import reproduce_tables as rt  # noqa: E402
import table_plan  # noqa: E402
import table_records  # noqa: E402
import table_pace  # noqa: E402
import table_settings  # noqa: E402
import table_submit  # noqa: E402
from fake_cifar import write_cifar10, write_cifar100, write_image_folder  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "reproduce_tables.sh")
TINY_ENV = {"BATCH_SIZE": "8", "WORKERS": "0", "EVAL_EPOCHS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "EXTRA_ARGS": "--width_per_group 8 --hidden_mlp 32 --nmb_prototypes 10 --feat_dim 16 --warmup_epochs 0 "
                          "--freeze_prototypes_niters 2 --download false --log_freq 1",
            "EVAL_EXTRA_ARGS": "--width_per_group 8 --batch_size 16 --download false"}
PER_CELL = ("DATASET_PATH", "DATASET_PATH_C10", "DATASET_PATH_C100", "EPOCHS", "RUN_SWAV", "EXPERIMENT_PATH",
            "EXTRA_ARGS", "EVAL_EXTRA_ARGS", "BATCH_SIZE", "WORKERS", "EVAL_EPOCHS", "NPROC", "SBATCH_ARGS")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in PER_CELL and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def _run(args, env, cwd, timeout=300):
    return subprocess.run(["bash", SCRIPT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _cell_lines(stdout):
    return re.findall(r"^  (c1\d+_\w+_\d+ep_seed\d+) .* (done|running|pending|failed|interrupted|missing)\b",
                      stdout, flags=re.M)


def _sabotage(folder):
    """A file where the cell's folder goes: the job body cannot create it and stops at once (exit 2)."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    open(folder, "w").close()


# --------------------------------------------------------------------------------------------------
# plan, bad input
# --------------------------------------------------------------------------------------------------

def test_dry_run_lists_the_20_published_cells(tmp_path):
    r = _run(["--dry-run", "--experiments", str(tmp_path / "exp")], _clean_env(), tmp_path)
    assert r.returncode == 0, r.stderr
    cells = _cell_lines(r.stdout)
    assert [name for name, _ in cells] == [f"{d}_{m}_{e}ep_seed31" for d in ("c10", "c100") for m in ("swav", "unmix")
                                           for e in (200, 400, 600, 800, 1000)]
    assert {status for _, status in cells} == {"missing"}
    assert "20 cells: 20 missing" in r.stdout and "dry run: would run 20 cell(s)" in r.stdout
    assert not (tmp_path / "exp").exists()                        # nothing written, nothing submitted


@pytest.mark.parametrize("argv, env, message", [
    (["--datasets", "c10,svhn"], {}, "--datasets: unknown 'svhn' (choose from c10, c100)"),
    (["--methods", "swav,simclr"], {}, "--methods: unknown 'simclr' (choose from swav, unmix)"),
    (["--epochs", "200,0"], {}, "--epochs: 0 must be positive"),
    (["--epochs", "-400"], {}, "--epochs: -400 must be positive"),
    (["--epochs", "ten"], {}, "--epochs: 'ten' is not an integer"),
    (["--seeds", "31,x"], {}, "--seeds: 'x' is not an integer"),
    ([], {"DATASET_PATH": "c10only"}, "DATASET_PATH=c10only lacks cifar100: expected cifar-100-python/ in it"),
    (["--datasets", "c100"], {"DATASET_PATH_C100": "c10only"}, "DATASET_PATH_C100=c10only lacks cifar100"),
    (["--datasets", "c10"], {"DATASET_PATH": "cifar100"}, "DATASET_PATH=cifar100 lacks cifar10"),
    ([], {"DATASET_PATH": "/nonexistent"}, "DATASET_PATH=/nonexistent is not a folder"),
    ([], {"EPOCHS": "400"}, "EPOCHS is set per cell (by --epochs); unset it"),
    ([], {"RUN_SWAV": "true"}, "RUN_SWAV is set per cell (by --methods)"),
    ([], {"EXTRA_ARGS": "--width_per_group 8 --seed=3"}, "EXTRA_ARGS sets --seed, which each cell sets itself"),
    (["--seedz", "31"], {}, "unrecognized arguments: --seedz 31; did you mean --seeds?"),  # was argparse's usage block
])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, argv, env, message):
    write_cifar10(tmp_path / "c10only", n_train_per_batch=2, n_test=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        rt.main(argv + ["--dry-run", "--experiments", str(tmp_path / "exp")], env)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "exp").exists()


def test_bad_input_through_the_script(tmp_path):
    r = _run(["--datasets", "c10", "--epochs", "0"], _clean_env(), tmp_path)
    assert r.returncode == 2 and r.stderr == "error: --epochs: 0 must be positive\n" and r.stdout == ""


def test_no_submission_when_the_queue_cannot_be_read(tmp_path, capsys):
    """squeue failing (controller busy): queued cells would look interrupted and be submitted twice."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("squeue", "exit 1"), ("sbatch", f"touch {tmp_path}/submitted")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit) as e:
        rt.main(["--datasets", "c10", "--epochs", "1", "--experiments", str(tmp_path / "exp")], env)
    assert e.value.code == 2 and "squeue failed" in capsys.readouterr().err
    assert not (tmp_path / "submitted").exists() and not (tmp_path / "exp").exists()


def test_data_paths(tmp_path):
    both = tmp_path / "both"
    write_cifar10(both, n_train_per_batch=2, n_test=2)
    write_cifar100(both, n_train=4, n_test=2)
    env = {"DATASET_PATH": str(both)}
    assert table_plan.dataset_path_for("cifar10", env) == str(both / "cifar-10-batches-py")   # each its own folder
    assert table_plan.dataset_path_for("cifar100", env) == str(both / "cifar-100-python")
    c100 = str(both / "cifar-100-python")
    assert table_plan.dataset_path_for("cifar100", {"DATASET_PATH": c100}) == c100               # the folder itself
    assert table_plan.dataset_path_for("cifar10", {}) == "cifar10"                               # the scripts' default
    assert table_plan.dataset_path_for("cifar100", {"DATASET_PATH": "cifar100"}) == "cifar100"
    jpg = write_image_folder(tmp_path / "jpg", 1, 1, classes=[f"c{i}" for i in range(10)])
    env = {"DATASET_PATH": str(jpg), "DATASET_PATH_C100": str(both)}
    assert table_plan.dataset_path_for("cifar10", env) == str(jpg)                              # 10 class folders
    assert table_plan.dataset_path_for("cifar100", env) == str(both / "cifar-100-python")       # own variable first
    with pytest.raises(ValueError, match="lacks cifar100.*set DATASET_PATH_C100"):
        table_plan.dataset_path_for("cifar100", {"DATASET_PATH": str(jpg)})


def test_plan_file_and_helpers(tmp_path):
    cells = table_plan.plan_cells(["cifar10", "cifar100"], ["swav", "unmix"], [200, 400], [31, 32], str(tmp_path),
                          {"cifar10": "cifar10", "cifar100": "/data/cifar 100"}, "_linear_eval_cached")
    assert len(cells) == 16 and [c.index for c in cells] == list(range(16))
    assert cells[5].name == "c10_unmix_200ep_seed32"
    assert cells[5].eval_path == str(tmp_path / cells[5].name) + "_linear_eval_cached"
    path = table_plan.write_plan(str(tmp_path), cells)
    assert table_plan.write_plan(str(tmp_path), cells) == path                    # same cells, same file
    assert table_plan.read_plan(path) == cells                                    # a path with a space survives
    assert table_submit.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and table_submit.array_spec([3]) == "3"
    assert table_plan.eval_folder_suffix("") == table_plan.eval_folder_suffix("--probe released") == "_linear_eval"
    assert table_plan.eval_folder_suffix("--batch_size 4 --probe cached") == "_linear_eval_cached"
    assert table_plan.eval_folder_suffix("--probe=cached --probe released") == "_linear_eval"   # the last one wins


def _stats(folder, epochs, seconds_per_epoch):
    """A statistics table as a run writes it (src.runtime.logs.Stats): `epochs` rows, `time` cumulative."""
    from src.runtime.logs import Stats
    os.makedirs(folder, exist_ok=True)
    stats = Stats(os.path.join(folder, "stats0"), ["epoch", "loss", "time"])
    for e in range(epochs):
        stats.update({"epoch": e, "loss": 1.0, "time": (e + 1) * seconds_per_epoch})


def test_local_cells_say_how_long_the_rest_will_take(tmp_path):
    """Was only `[1/20] c10_swav_200ep_seed31: done`: days of cells run here with no word of the time left.
    The estimate is per finished epoch (pretraining, evaluation), per data set, plus the rest of a cell's
    time once per cell; a resumed cell counts only the epochs it ran (it was counted as a whole cell run in
    the time of its last part, which made the rest look faster), and a cell left counts only its epochs left."""
    cells = table_plan.plan_cells(["cifar10", "cifar100"], ["swav"], [200, 400], [31], str(tmp_path),
                                  {"cifar10": "cifar10", "cifar100": "cifar100"}, "_linear_eval")
    c10_200, c10_400, c100_200, c100_400 = cells
    pace = table_pace.Pace()
    assert pace.time_left(cells[1:]) == ""  # nothing finished yet: no pace
    assert table_pace.read_progress(c10_200) == table_pace.Progress()  # no folders yet
    # c10_200 resumed at pretraining epoch 150 (earlier processes: 150 epochs in 300 s), run to the end here
    _stats(c10_200.experiment_path, 150, 2.0)
    before = table_pace.read_progress(c10_200)
    assert before == table_pace.Progress(150, 300.0, 0, 0.0)
    _stats(c10_200.experiment_path, 200, 2.0)        # 50 epochs in 100 s
    _stats(c10_200.eval_path, 100, 2.0)              # 100 evaluation epochs in 200 s
    after = table_pace.read_progress(c10_200)
    assert after == table_pace.Progress(200, 400.0, 100, 200.0)
    pace.add(c10_200, before, after, 330.0)          # 30 s outside both clocks
    assert pace.attempts == [table_pace.Attempt("cifar10", 50, 100.0, 100, 200.0, 30.0)]
    # c10_400 half done: 200 pretraining epochs at 2 s, its 100 evaluation epochs at 2 s, + 30 s
    _stats(c10_400.experiment_path, 200, 2.0)
    assert pace.time_left([c10_400]) == "; about 0:10:30 for the 1 cell(s) left at this pace"
    # CIFAR-100 at the CIFAR-10 pace until a CIFAR-100 cell has finished, then at its own
    assert table_pace.seconds_left(pace.attempts, [("cifar100", 400, 100)]) == 800 + 200 + 30
    pace.add(c100_200, table_pace.Progress(), table_pace.Progress(200, 800.0, 100, 300.0), 1110.0)
    assert table_pace.seconds_left(pace.attempts, [("cifar100", 400, 100)]) == 1600 + 300 + 20
    assert table_pace.seconds_left(pace.attempts, [("cifar10", 0, 0)]) == 20   # only the rest of a cell
    assert pace.time_left([]) == ""


def test_the_pace_of_an_attempt_that_started_afresh_and_without_a_part():
    """A part whose folder was replaced (fewer epochs after than before) counts from zero; an estimate that
    needs a part no finished cell ran is none (not a guess)."""
    attempt = table_pace.attempt("cifar10", table_pace.Progress(300, 900.0, 100, 250.0),
                                 table_pace.Progress(200, 400.0, 100, 250.0), 450.0)
    assert attempt == table_pace.Attempt("cifar10", 200, 400.0, 0, 0.0, 50.0)
    assert table_pace.seconds_left([attempt], [("cifar10", 10, 0)]) == 10 * 2.0 + 50.0
    assert table_pace.seconds_left([attempt], [("cifar10", 10, 5)]) is None   # no evaluation epoch ran yet
    assert table_pace.seconds_left([], [("cifar10", 10, 0)]) is None


def test_progress_is_read_from_the_last_readable_row(tmp_path):
    with open(tmp_path / "stats0.csv", "w") as f:
        f.write("epoch,loss,time\n0,1.0,2.5\n1,1.0,5.0\n2,1.0,nan\n")   # a time not written (NaN)
    assert table_pace.epochs_and_seconds(str(tmp_path)) == (2, 5.0)
    (tmp_path / "stats0.csv").write_text("epoch,loss\n0,1.0\n")            # no time column
    assert table_pace.epochs_and_seconds(str(tmp_path)) == (0, 0.0)


def test_cell_status(tmp_path):
    cells = table_plan.plan_cells(["cifar10"], ["unmix"], [1], list(range(8)), str(tmp_path), {"cifar10": "cifar10"},
                          "_linear_eval")
    cells_dir, host = str(tmp_path / "_cells"), socket.gethostname()
    os.makedirs(cells_dir)
    done, failed, preempted, killed, here, queued, started, missing = cells
    os.makedirs(done.eval_path)
    open(os.path.join(done.eval_path, "results.json"), "w").close()
    table_records.write_state(cells_dir, done, "exit 21 5_0")                         # results.json decides
    table_records.write_state(cells_dir, failed, "exit 11 5_1")
    table_records.write_state(cells_dir, preempted, "exit 3 5_2")
    dead = subprocess.Popen(["true"])
    dead.wait()
    table_records.write_state(cells_dir, killed, f"running local:{dead.pid}@{host}")
    table_records.write_state(cells_dir, here, f"running local:{os.getpid()}@{host}")   # alive, but not a cell's shell
    table_records.write_state(cells_dir, queued, "queued 6_5")
    os.makedirs(started.experiment_path)                                  # started by hand, no record
    status = {c.name: table_records.cell_status(c, cells_dir, {"6_5": "pending", "5_2": "pending"}, host) for c in cells}
    assert [status[c.name][0] for c in cells] == ["done", "failed", "pending", "interrupted", "interrupted",
                                                  "pending", "interrupted", "missing"]
    assert status[failed.name][1] == "exit 11: pretraining failed, job 5_1"
    assert table_records.cell_status(preempted, cells_dir, None, host)[0] == "interrupted"    # not requeued (no queue)
    assert table_records.cell_status(queued, cells_dir, {}, host)[0] == "interrupted"         # gone from the queue


def _proc_start(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def test_a_local_cell_is_running_only_while_its_own_shell_runs(tmp_path):
    """table_cell.sh records `running local:PID.START@HOST`: the cell is running while that shell runs; once
    it is gone (killed: no exit record), or when its PID belongs to another process (another start time, or
    another program), it is not."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "script_unmix_c10.sh").write_text("sleep 60\n")   # a cell that runs until killed
    cells = table_plan.plan_cells(["cifar10"], ["unmix"], [1], [31], str(tmp_path), {"cifar10": "cifar10"}, "_linear_eval")
    cells_dir, host, cell = str(tmp_path / "_cells"), socket.gethostname(), cells[0]
    os.makedirs(cells_dir)
    plan = table_plan.write_plan(cells_dir, cells)
    shell = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "table_cell.sh"), plan, "0"], stdout=subprocess.DEVNULL,
                             env=_clean_env(CODE_DIR=str(code)), start_new_session=True)
    try:
        deadline = time.time() + 30
        while (table_records.read_state(cells_dir, cell) or ("",))[0] != "running":
            assert time.time() < deadline and shell.poll() is None
            time.sleep(0.05)
        record = table_records.read_state(cells_dir, cell)[1]
        assert record == f"local:{shell.pid}.{_proc_start(shell.pid)}@{host}"
        assert table_records.cell_status(cell, cells_dir, None, host) == ("running", f"pid {shell.pid}")
        table_records.write_state(cells_dir, cell, f"running local:{shell.pid}.1@{host}")            # the PID, another start
        assert table_records.cell_status(cell, cells_dir, None, host)[0] == "interrupted"
        me = os.getpid()
        table_records.write_state(cells_dir, cell, f"running local:{me}.{_proc_start(me)}@{host}")  # another program
        assert table_records.cell_status(cell, cells_dir, None, host)[0] == "interrupted"
        table_records.write_state(cells_dir, cell, f"running {record}")
        assert table_records.cell_status(cell, cells_dir, None, host)[0] == "running"
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    assert table_records.read_state(cells_dir, cell)[:2] == ("running", record)    # killed: no exit record
    assert table_records.cell_status(cell, cells_dir, None, host)[0] == "interrupted"


def test_a_cell_started_with_other_settings_is_not_taken_for_this_one(tmp_path, capsys):
    """A finished cell whose record names other EXTRA_ARGS, EVAL_EXTRA_ARGS, data path or data: the command
    stops with one line naming the setting and what to do, instead of reporting its numbers as these
    settings' or resuming it with others; --status shows it; the same settings (defaults spelt out or not,
    other spacing) go on."""
    data = tmp_path / "c10"
    write_cifar10(data, n_train_per_batch=2, n_test=2)
    argv = ["--local", "--datasets", "c10", "--methods", "unmix", "--epochs", "1", "--experiments",
            str(tmp_path / "exp")]
    env = {"DATASET_PATH": str(data), "EXTRA_ARGS": "--width_per_group 8", "EVAL_EXTRA_ARGS": "--probe cached"}
    cell = table_plan.plan_cells(["cifar10"], ["unmix"], [1], [31], str(tmp_path / "exp"), {"cifar10": ""},
                         "_linear_eval_cached")[0]
    cells_dir = str(tmp_path / "exp" / "_cells")
    os.makedirs(cell.eval_path)
    open(os.path.join(cell.eval_path, "results.json"), "w").close()
    os.makedirs(cells_dir)
    path = str(data / "cifar-10-batches-py")
    recorded = table_settings.cell_settings(env, path, table_settings.data_identity(path), through_sbatch=False)
    table_settings.write_settings(cells_dir, cell, recorded)
    assert rt.main(argv + ["--dry-run"], dict(env, EXTRA_ARGS=" --width_per_group  8 ", BATCH_SIZE="128")) == 0
    assert "dry run: would run 0 cell(s)" in capsys.readouterr().out
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"other data")
    for other, named in (({"EXTRA_ARGS": "--width_per_group 16"}, "EXTRA_ARGS: '--width_per_group 8' -> "
                          "'--width_per_group 16'"), ({"EVAL_EXTRA_ARGS": "--probe cached --lr 1"}, "EVAL_EXTRA_ARGS"),
                         ({}, "data: "), ({"ARCH": "resnet50"}, "ARCH: 'resnet18' -> 'resnet50'")):
        with pytest.raises(SystemExit) as e:
            rt.main(argv, dict(env, **other))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and named in err, err
        assert f"cell {cell.name} was started with other settings" in err and "another --experiments" in err
    assert rt.main(argv + ["--status"], env) == 0
    assert f"{cell.name}: started with other settings (data: " in capsys.readouterr().out


FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_PY_LOG"
"""


def test_job_body_gives_the_cached_probe_its_own_folder(tmp_path):
    py = tmp_path / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    for i, (probe, folder) in enumerate((("", "_linear_eval"), ("--probe cached", "_linear_eval_cached"),
                                         ("--probe=cached", "_linear_eval_cached"),
                                         ("--probe cached --probe released", "_linear_eval"))):
        log = tmp_path / f"calls{i}.log"
        env = _clean_env(PYTHON=str(py), FAKE_PY_LOG=str(log), CUDA_VISIBLE_DEVICES="", EXPERIMENT_PATH="exp/run",
                         EVAL_EXTRA_ARGS=probe)
        r = subprocess.run(["bash", os.path.join(ROOT, "script_unmix_c10.sh")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"--dump_path exp/run{folder}" in log.read_text().splitlines()[1], probe


# --------------------------------------------------------------------------------------------------
# tiny tables, for real
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_train_per_batch=16, n_test=20)   # 80 train images: 10 iterations of 8
    return str(root)


def _report_cells(report):
    """{cell: status} and the grid's 'ours' rows of results.md."""
    md = open(report).read()
    cells = dict(re.findall(r"^\| (c10_\w+) \| cifar10 \| [^|]+ \| \d+ \| \d+ \| (\w+)", md, flags=re.M))
    ours = dict(re.findall(r"^\| (SwAV|Un-Mix) \(ours\) \| ([^|]+) \|", md, flags=re.M))
    return cells, {k: v.strip() for k, v in ours.items()}, md


@pytest.mark.slow
def test_local_table_reports_a_failing_cell_and_the_others(cifar, tmp_path):
    exp = tmp_path / "exp"
    _sabotage(exp / "c10_unmix_1ep_seed32")
    args = ["--local", "--datasets", "c10", "--methods", "unmix", "--epochs", "1", "--seeds", "31,32",
            "--experiments", str(exp), "--report", str(tmp_path / "report")]
    env = _clean_env(DATASET_PATH=cifar, **TINY_ENV)
    r = _run(args, env, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[2/2] c10_unmix_1ep_seed32: failed (exit 2: bad input" in r.stdout
    assert re.search(r"^\[1/2\] c10_unmix_1ep_seed31: done after 0:0\d:\d\d; about 0:0\d:\d\d for the 1 cell\(s\) left "
                     r"at this pace$", r.stdout, re.M), r.stdout
    cells, ours, md = _report_cells(tmp_path / "report" / "results.md")
    assert cells == {"c10_unmix_1ep_seed31": "done", "c10_unmix_1ep_seed32": "failed"}, md
    assert re.fullmatch(r"\d+\.\d\d \(1\) †", ours["Un-Mix"]), md   # the seed that finished († 1 epoch: not compared)
    assert "cannot create" in (exp / "_cells" / "c10_unmix_1ep_seed32.log").read_text()
    done = os.path.join(exp, "c10_unmix_1ep_seed31_linear_eval", "results.json")
    with open(done) as f:
        result = f.read()
    r = _run(args, dict(env, EXTRA_ARGS=env["EXTRA_ARGS"] + " --knn_freq 1"), tmp_path)   # other settings: refused
    assert r.returncode == 2 and "c10_unmix_1ep_seed31 was started with other settings (EXTRA_ARGS: " in r.stderr
    with open(done) as f:
        assert f.read() == result
    r = _run(args + ["--status"], env, tmp_path)
    assert r.returncode == 0 and _cell_lines(r.stdout) == [("c10_unmix_1ep_seed31", "done"),
                                                           ("c10_unmix_1ep_seed32", "failed")]


@pytest.mark.slurm
def test_slurm_tiny_table_array_report_failure_and_rerun(cluster, cifar, tmp_path):
    t0 = time.time()
    exp, report = tmp_path / "exp", tmp_path / "report"
    _sabotage(exp / "c10_swav_1ep_seed32")
    args = ["--datasets", "c10", "--epochs", "1", "--seeds", "31,32", "--experiments", str(exp),
            "--report", str(report)]
    env = dict(cluster.env, DATASET_PATH=cifar, **TINY_ENV,
               SBATCH_ARGS="--cpus-per-task=1 --gres=none --mem=500M --time=10", REPORT_SBATCH_ARGS="--mem=500M")

    def submit():
        r = _run(args, env, tmp_path, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        job = re.search(r"^submitted report job (\d+)", r.stdout, flags=re.M).group(1)
        state = cluster.wait(job, timeout=150)
        assert state == "COMPLETED", r.stdout + open(next((exp / "_cells").glob(f"report-{job}.out"))).read()
        return r.stdout

    # 1. the array runs every cell; the report job, after all of them, reports the failed one too
    out = submit()
    array = re.search(r"^submitted job array (\d+): 4 cell\(s\)", out, flags=re.M).group(1)
    assert f"(after {array})" in out
    cells, ours, md = _report_cells(report / "results.md")
    assert cells == {"c10_swav_1ep_seed31": "done", "c10_swav_1ep_seed32": "failed",
                     "c10_unmix_1ep_seed31": "done", "c10_unmix_1ep_seed32": "done"}, md
    assert re.search(rf"\| failed \(exit 2: bad input, job {array}_1\) \|", md)
    assert re.fullmatch(r"\d+\.\d\d (± \d+\.\d\d \(2\)) †", ours["Un-Mix"]), md   # † tiny runs: not compared
    assert re.fullmatch(r"\d+\.\d\d \(1\) †", ours["SwAV"]), md
    log = (exp / "_cells" / "c10_unmix_1ep_seed31.log").read_text()
    assert f"job {array}_2 (restart 0)" in log and re.search(r"slurm job \d+ \(restart 0\), 1 task\(s\)", log)
    assert "Top-1 test accuracy" in log
    first = time.time() - t0

    # 2. rerun after the cause is gone: only the failed cell runs again, the finished ones are skipped
    os.remove(exp / "c10_swav_1ep_seed32")
    out = submit()
    assert re.search(r"^submitted job array \d+: 1 cell\(s\)", out, flags=re.M), out
    assert dict(_cell_lines(out)) == {"c10_swav_1ep_seed31": "done", "c10_swav_1ep_seed32": "failed",
                                      "c10_unmix_1ep_seed31": "done", "c10_unmix_1ep_seed32": "done"}
    cells, ours, md = _report_cells(report / "results.md")
    assert set(cells.values()) == {"done"}, md
    assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d \(2\) †", v) for v in ours.values()), md
    for name in ("c10_swav_1ep_seed31", "c10_unmix_1ep_seed31", "c10_unmix_1ep_seed32"):
        assert (exp / "_cells" / f"{name}.log").read_text().count("==== cell") == 1      # ran once
    assert (exp / "_cells" / "c10_swav_1ep_seed32.log").read_text().count("==== cell") == 2
    print(f"\n[tiny table through Slurm: first submission {first:.0f}s, rerun {time.time() - t0 - first:.0f}s]")


# --------------------------------------------------------------------------------------------------
# what a cell's settings record holds
# --------------------------------------------------------------------------------------------------

def test_the_data_identity_covers_every_byte(tmp_path):
    """A CIFAR pickle changed past its first 64 KiB (a pickle is 30 MB) is other data."""
    folder = write_cifar10(tmp_path / "c10", n_train_per_batch=40, n_test=2)
    before = table_settings.data_identity(str(folder))
    batch = folder / "data_batch_1"
    data = bytearray(batch.read_bytes())
    assert len(data) > 2 * 65536
    data[-1000] ^= 1                                          # one bit of one pixel, near the end
    batch.write_bytes(bytes(data))
    assert table_settings.data_identity(str(folder)) != before
    assert table_settings.data_identity("cifar10") == "cifar10"           # a keyword is its own identity


@pytest.mark.parametrize("name, one, other", [
    ("WORKERS", "2", "4"),                   # DataLoader workers seed each crop's randomness
    ("WORKERS", "", "0"),
    ("SEMISUP_LABELS", "", "10"),            # the fine-tunings the report shows
    ("SEMISUP_EXTRA_ARGS", "", "--epochs 5"),
    ("DEVICE", "", "cpu"),
    ("SBATCH_ARGS", "-p gpu", "-p gpu --ntasks-per-node=2"),   # processes, hence the global batch
    ("SBATCH_ARGS", "", "-N 2"),
    ("SBATCH_ARGS", "--nodes=2", "--nodes 1"),
])
def test_settings_that_change_a_cell_are_recorded(name, one, other):
    sbatch = name == "SBATCH_ARGS"
    assert table_settings.cell_settings({name: one}, "cifar10", "cifar10", sbatch) != \
        table_settings.cell_settings({name: other}, "cifar10", "cifar10", sbatch)


@pytest.mark.parametrize("name, one, other", [
    ("WORKERS", "", "2"),                    # the scripts' default spelt out
    ("SBATCH_ARGS", "", "-p gpu --time=24:00:00 --mem=40G"),   # where and how long, not what
    ("SBATCH_ARGS", "--ntasks-per-node 2", "-p x --ntasks-per-node=2"),
    ("PYTHON", "", "python3"),
    ("REPORT_SBATCH_ARGS", "", "-p cpu"),
])
def test_settings_that_do_not_change_a_cell_are_not_recorded(name, one, other):
    for sbatch in (False, True):
        assert table_settings.cell_settings({name: one}, "cifar10", "cifar10", sbatch) == \
            table_settings.cell_settings({name: other}, "cifar10", "cifar10", sbatch)


def test_the_process_count_recorded_is_the_one_that_runs(tmp_path):
    """Through sbatch NPROC is ignored (the tasks of SBATCH_ARGS count): it changes nothing. Run here, the
    processes are NPROC, else one per visible GPU: 2 visible GPUs are NPROC=2 and another count than 1; and
    SBATCH_ARGS is unused there. A record of format 2 (NPROC as set, wherever) is still compared as written."""
    def here(**env):
        return table_settings.cell_settings(env, "cifar10", "cifar10", through_sbatch=False)

    def sbatch(**env):
        return table_settings.cell_settings(env, "cifar10", "cifar10", through_sbatch=True)
    assert sbatch(NPROC="4", SBATCH_ARGS="-p gpu") == sbatch(SBATCH_ARGS="-p gpu")
    assert sbatch(SBATCH_ARGS="--ntasks-per-node=2") != sbatch(SBATCH_ARGS="--ntasks-per-node=4")
    assert here(CUDA_VISIBLE_DEVICES="0,1") == here(NPROC="2") != here(CUDA_VISIBLE_DEVICES="0")
    assert here(CUDA_VISIBLE_DEVICES="0") == here(CUDA_VISIBLE_DEVICES="") == here(NPROC="1")
    assert here(NPROC="1", SBATCH_ARGS="--ntasks-per-node=4") == here(NPROC="1")
    assert here(NPROC="2") != here(NPROC="3")
    # no CUDA_VISIBLE_DEVICES: nvidia-smi's GPUs, as scripts/unmix_job.sh counts them (a stand-in here)
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: A (UUID: a)'\necho 'GPU 1: B (UUID: b)'\n")
    smi.chmod(0o755)
    assert here(PATH=str(smi.parent)) == here(NPROC="2") and here(PATH=str(tmp_path)) == here(NPROC="1")
    # --local inside a Slurm allocation: the script runs srun's SLURM_NTASKS tasks, whatever NPROC says
    assert here(SLURM_JOB_ID="7", SLURM_NTASKS="2", NPROC="4") == here(NPROC="2")
    # a table begun with format 2 goes on: NPROC unset then and now is no change, NPROC set since is one
    cell = table_plan.plan_cells(["cifar10"], ["unmix"], [1], [31], str(tmp_path / "exp"), {"cifar10": ""},
                                 "_linear_eval")[0]
    cells_dir = tmp_path / "_cells"
    cells_dir.mkdir()
    format_2 = {**here(CUDA_VISIBLE_DEVICES="0"), "NPROC": "", "format": 2}
    (cells_dir / f"{cell.name}.settings").write_text(json.dumps(format_2))
    for env, changed in (({"CUDA_VISIBLE_DEVICES": "0"}, []), ({"NPROC": "2"}, ["NPROC: '' -> '2'"])):
        settings = {"cifar10": here(**env)}
        as_set = table_settings.processes_as_set(env)
        assert table_settings.compare_with_records([cell], str(cells_dir), settings, as_set)[0] == {cell.name: changed}


def test_the_worker_count_changes_the_released_crops():
    """Why WORKERS is recorded: the released pipeline's crops draw from per-worker random streams (seeded
    base + worker id, each worker handling every n-th batch), so the same seed gives other crops with
    another number of workers."""
    import numpy as np
    import torch
    from src.data.transforms import MultiCropDataset, MultiCropTransform
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    dataset = MultiCropDataset(images, MultiCropTransform([16], [2], [0.14], [1.0]))

    def crops(workers):
        torch.manual_seed(31)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers)
        return torch.cat([torch.cat(batch) for batch in loader])
    assert torch.equal(crops(2), crops(2))                    # the same count: the same crops
    assert not torch.equal(crops(1), crops(2)) and not torch.equal(crops(0), crops(1))


def _earlier_version_data_digest(path):
    """The data digest of records written before the whole data was hashed: relative path, size and
    first 64 KiB of each file (what such a record holds, to write one here)."""
    import hashlib
    digest = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                head, size = f.read(1 << 16), os.fstat(f.fileno()).st_size
            digest.update(f"{os.path.relpath(full, path)}\0{size}\0".encode() + hashlib.sha1(head).digest())
    return digest.hexdigest()


def test_a_record_of_an_earlier_version_is_still_read(tmp_path, capsys):
    """A table upgraded mid-way: a cell recorded by the earlier version (no WORKERS etc., the data's first
    64 KiB per file) is compared on what it recorded, said in one line, and refused when that differs."""
    folder = write_cifar10(tmp_path / "c10", n_train_per_batch=2, n_test=2)
    argv = ["--local", "--datasets", "c10", "--methods", "unmix", "--epochs", "1", "--experiments",
            str(tmp_path / "exp")]
    env = {"DATASET_PATH": str(folder), "EXTRA_ARGS": "--width_per_group 8"}
    cell = table_plan.plan_cells(["cifar10"], ["unmix"], [1], [31], str(tmp_path / "exp"), {"cifar10": ""},
                         "_linear_eval")[0]
    os.makedirs(cell.eval_path)
    open(os.path.join(cell.eval_path, "results.json"), "w").close()
    cells_dir = tmp_path / "exp" / "_cells"
    cells_dir.mkdir()
    earlier = {"ARCH": "resnet18", "AUGMENT": "", "BATCH_SIZE": "128", "DATASET_PATH": str(folder),
               "EVAL_EPOCHS": "100", "EVAL_EXTRA_ARGS": "", "EXTRA_ARGS": "--width_per_group 8", "NPROC": "",
               "data": _earlier_version_data_digest(str(folder))}
    (cells_dir / f"{cell.name}.settings").write_text(json.dumps(earlier, indent=1, sort_keys=True) + "\n")
    assert rt.main(argv + ["--dry-run"], dict(env, WORKERS="4")) == 0
    out = capsys.readouterr().out
    assert "dry run: would run 0 cell(s)" in out
    assert re.search(r"^1 cell\(s\) recorded by an earlier version .*WORKERS.* not checked", out, flags=re.M), out
    with pytest.raises(SystemExit) as e:
        rt.main(argv, dict(env, ARCH="resnet50"))
    assert e.value.code == 2 and "ARCH: 'resnet18' -> 'resnet50'" in capsys.readouterr().err
    (folder / "batches.meta").write_bytes(b"other data")
    with pytest.raises(SystemExit) as e:
        rt.main(argv, env)
    assert e.value.code == 2 and "data: " in capsys.readouterr().err
