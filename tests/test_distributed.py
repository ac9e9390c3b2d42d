"""src/runtime/launch.py, signals.py, startup.py: host lists, launcher/Slurm/--dist_url parsing, preemption flag, and a 2-process
torchrun run whose Sinkhorn equals one process on the concatenated batch."""
import argparse
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from src.runtime import launch, signals
from src.runtime.cli import LOST_PEER_EXIT_CODE  # noqa: E402
from src.runtime.launch import DistEnv, DistError, expand_hostlist, resolve_dist_env  # noqa: E402
from tests.dist_helpers import all_reduce_sum_, is_main_process  # noqa: E402


def resolve(environ, dist_url="env://", rank=0, world_size=-1, local_rank=0):
    return resolve_dist_env(environ, dist_url, rank, world_size, local_rank)


def raises(environ, match, **kw):
    with pytest.raises(DistError, match=match) as e:
        resolve(environ, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------------------------------
# host lists
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("x[1,3-4]y,z[5]", ["x1y", "x3y", "x4y", "z5"]),
    ("node[01-02]", ["node01", "node02"]),
    ("host-1.cluster,host-2.cluster", ["host-1.cluster", "host-2.cluster"]),
    (" gpu[1-2] ", ["gpu1", "gpu2"]),
])
def test_expand_hostlist(s, hosts):
    assert expand_hostlist(s) == hosts


@pytest.mark.parametrize("s", ["", "   ", "gpu[1-", "gpu]1", "gpu[3-1]", "gpu[a-b]", "gpu[[1]]", "a,,b",
                               "gpu[]", "gpu[1-2-3]", "gpu[1,]", "a b"])
def test_expand_hostlist_errors(s):
    with pytest.raises(DistError) as e:
        expand_hostlist(s)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# torchrun / launcher variables
# --------------------------------------------------------------------------------------------------

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}

SLURM_2x4 = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NTASKS": "8",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
             "SLURM_NNODES": "2", "SLURM_STEP_ID": "0"}


def test_torchrun_variables():
    assert resolve(TORCHRUN) == DistEnv(3, 4, 1, "env://", "torchrun")


def test_torch_distributed_launch_env_and_local_rank_arg():
    # python -m torch.distributed.launch (torch 2.x) exports the variables AND passes --local-rank=N
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501"}
    assert resolve(env, local_rank=1) == DistEnv(1, 2, 1, "env://", "torchrun")
    # a launcher without LOCAL_RANK in the environment: the --local_rank argument is used
    env.pop("LOCAL_RANK")
    assert resolve(env, local_rank=1).local_rank == 1


def test_torchrun_one_process():
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}   # no MASTER_* needed for one process
    assert resolve(env) == DistEnv(0, 1, 0, "env://", "torchrun")


def test_launcher_without_master_uses_tcp_dist_url():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert resolve(env, dist_url="tcp://10.1.1.1:23456").init_method == "tcp://10.1.1.1:23456"
    raises(env, "MASTER_ADDR and MASTER_PORT")


@pytest.mark.parametrize("env, match", [
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, r"rank 2 .*outside \[0, 1\]"),
    ({"RANK": "-1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank -1"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "world size 0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
     "LOCAL_RANK='' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "local rank -1"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
      "MASTER_PORT": "1"}, "LOCAL_WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "99999"}, "MASTER_PORT=99999"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "abc"}, "MASTER_PORT='abc'"),
])
def test_torchrun_bad_values(env, match):
    raises(env, match)


# --------------------------------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------------------------------

def test_slurm_two_nodes_four_tasks():
    e = resolve(SLURM_2x4)
    assert (e.rank, e.world_size, e.local_rank, e.source) == (5, 8, 1, "slurm")
    assert e.init_method == f"tcp://node01:{10000 + 123456 % 20000}"


def test_slurm_world_size_from_ntasks_not_tasks_per_node():
    # the released code took the first character of SLURM_TASKS_PER_NODE: '1' for '12(x2)'
    env = dict(SLURM_2x4, SLURM_NTASKS="24", SLURM_TASKS_PER_NODE="12(x2)", SLURM_PROCID="13", SLURM_LOCALID="1")
    assert resolve(env).world_size == 24


def test_slurm_every_task_gets_the_same_rendezvous():
    inits = set()
    for r in range(8):
        env = dict(SLURM_2x4, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % 4))
        e = resolve(env)
        assert (e.rank, e.local_rank) == (r, r % 4)
        inits.add(e.init_method)
    assert len(inits) == 1


def test_slurm_port_from_dist_url_host_ignored():
    e = resolve(SLURM_2x4, dist_url="tcp://localhost:10001")
    assert e.init_method == "tcp://node01:10001"


def test_slurm_master_overrides():
    e = resolve(dict(SLURM_2x4, MASTER_ADDR="10.2.3.4", MASTER_PORT="40000"))
    assert e.init_method == "tcp://10.2.3.4:40000"


def test_slurm_step_nodelist_and_complex_lists():
    env = dict(SLURM_2x4, SLURM_JOB_NODELIST="gpu[07,01-03],cpu5")
    assert resolve(env).init_method.startswith("tcp://gpu07:")
    env["SLURM_STEP_NODELIST"] = "gpu[02-03]"
    assert resolve(env).init_method.startswith("tcp://gpu02:")
    env = {k: v for k, v in SLURM_2x4.items() if k != "SLURM_JOB_NODELIST"}
    env["SLURM_NODELIST"] = "rack[1-2]-n[1-2]"
    assert resolve(env).init_method.startswith("tcp://rack1-n1:")


def test_slurm_one_task_is_single_process_ok():
    # a one-task job, in the batch script itself (no SLURM_STEP_ID) or under srun
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "vm"}
    e = resolve(env)
    assert (e.rank, e.world_size, e.local_rank, e.source) == (0, 1, 0, "slurm")


def test_slurm_batch_script_of_multi_task_job_is_refused():
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "vm"}
    raises(env, "srun")
    env["SLURM_STEP_ID"] = "0"
    assert resolve(env).world_size == 2


@pytest.mark.parametrize("change, match", [
    ({"SLURM_PROCID": "8"}, r"rank 8 .*outside \[0, 7\]"),
    ({"SLURM_PROCID": "five"}, "SLURM_PROCID='five' is not an integer"),
    ({"SLURM_NTASKS": None}, "SLURM_NTASKS is not"),
    ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not"),
    ({"SLURM_JOB_NODELIST": "node[01-"}, "bad Slurm host list"),
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not"),
    ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc'"),
])
def test_slurm_bad_values(change, match):
    env = dict(SLURM_2x4)
    for k, v in change.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    raises(env, match)


def test_slurm_nprocs_fallback():
    env = dict(SLURM_2x4)
    env["SLURM_NPROCS"] = env.pop("SLURM_NTASKS")
    assert resolve(env).world_size == 8


# --------------------------------------------------------------------------------------------------
# precedence
# --------------------------------------------------------------------------------------------------

def test_torchrun_wins_over_slurm():
    # e.g. one srun task per node that runs torchrun
    e = resolve(dict(SLURM_2x4, **TORCHRUN), dist_url="tcp://h:1234", rank=7, world_size=9)
    assert e == DistEnv(3, 4, 1, "env://", "torchrun")


def test_slurm_wins_over_dist_url():
    e = resolve(SLURM_2x4, dist_url="tcp://h:1234", rank=7, world_size=9, local_rank=3)
    assert (e.rank, e.world_size, e.local_rank, e.source) == (5, 8, 1, "slurm")


# --------------------------------------------------------------------------------------------------
# --dist_url and single process
# --------------------------------------------------------------------------------------------------

def test_dist_url_tcp_with_flags():
    assert resolve({}, dist_url="tcp://10.0.0.5:23456", rank=2, world_size=4, local_rank=2) == \
        DistEnv(2, 4, 2, "tcp://10.0.0.5:23456", "dist_url")
    # LOCAL_RANK from the environment wins over the legacy flag
    assert resolve({"LOCAL_RANK": "1"}, dist_url="tcp://h:1", rank=1, world_size=2).local_rank == 1


def test_dist_url_file():
    e = resolve({}, dist_url="file:///shared/rdv", rank=0, world_size=2)
    assert e == DistEnv(0, 2, 0, "file:///shared/rdv", "dist_url")


def test_single_process_defaults():
    assert resolve({}) == DistEnv(0, 1, 0, "env://", "single")
    assert resolve({}, world_size=1) == DistEnv(0, 1, 0, "env://", "single")
    # the released scripts' tcp://localhost:10001 with one process
    assert resolve({}, dist_url="tcp://localhost:10001").world_size == 1
    # legacy --local_rank picks the GPU of a lone process
    assert resolve({}, local_rank=1).local_rank == 1


@pytest.mark.parametrize("kw, match", [
    ({"dist_url": "tcp://host"}, "not tcp://host:port"),
    ({"dist_url": "tcp://host:0"}, "port 0"),
    ({"dist_url": "http://host:1"}, "use env://"),
    ({"dist_url": "file://relative/path"}, "absolute path"),
    ({"dist_url": ""}, "empty"),
    ({"world_size": 4}, "--world_size 4"),
    ({"dist_url": "tcp://h:1", "rank": 4, "world_size": 4}, r"rank 4 .*outside"),
    ({"rank": 1}, "--rank 1"),
    ({"world_size": 0}, "--world_size 0"),
])
def test_dist_url_bad_values(kw, match):
    raises({}, match, **kw)


def test_malformed_dist_url_is_an_error_even_under_a_launcher():
    raises(TORCHRUN, "not tcp://host:port", dist_url="tcp://oops")


def test_resolve_is_pure(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve({}) == DistEnv(0, 1, 0, "env://", "single")


# --------------------------------------------------------------------------------------------------
# init_distributed, helpers
# --------------------------------------------------------------------------------------------------

def test_init_distributed_single_process(monkeypatch):
    for k in list(os.environ):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(dist_url="env://", rank=0, world_size=-1, local_rank=0)
    env = launch.init_distributed(args)
    assert env.source == "single"
    assert (args.rank, args.world_size, args.local_rank, args.gpu_to_work_on) == (0, 1, 0, 0)
    assert args.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert is_main_process(args)
    t = torch.ones(3)
    assert all_reduce_sum_(t, 1) is t and t.tolist() == [1.0, 1.0, 1.0]
    launch.barrier(1)
    launch.cleanup()


def test_init_distributed_reports_dist_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DistError, match="RANK is set but WORLD_SIZE is not"):
        launch.init_distributed(argparse.Namespace(dist_url="env://", rank=0, world_size=-1, local_rank=0))


def test_preempted_exit_code_is_distinct():
    assert signals.PREEMPTED_EXIT_CODE not in (0, 1, 2, 11, 21, 120) and signals.PREEMPTED_EXIT_CODE < 128


# --------------------------------------------------------------------------------------------------
# preemption
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_flag_from_signal(sig):
    before = signal.getsignal(sig)
    h = signals.PreemptionHandler().install()
    try:
        assert not h.requested and not h.should_stop(1, torch.device("cpu"))
        os.kill(os.getpid(), sig)
        # the Python-level handler runs at the next bytecode boundary
        for _ in range(100):
            if h.requested:
                break
        assert h.requested and h.signum == sig
        assert h.should_stop(1, torch.device("cpu"))
    finally:
        h.uninstall()
    assert signal.getsignal(sig) == before


def test_sigint_is_a_stop_signal_too():
    h = signals.PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a flag, no KeyboardInterrupt
        for _ in range(100):
            if h.requested:
                break
        assert h.requested and h.signum == signal.SIGINT
    finally:
        h.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# A process whose main thread is blocked in C code, as in a collective whose peer is gone: Python signal
# handlers set the flag but the loop never gets to read it.
BLOCKED = """import os, sys; sys.path.insert(0, sys.argv[1])
from src.runtime.signals import PreemptionHandler
PreemptionHandler(grace_s=float(sys.argv[2])).install()
r, w = os.pipe()
print("blocked", flush=True)
os.read(r, 1)
"""


def _blocked_process(grace_s):
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED, ROOT, str(grace_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "blocked"
    return proc


def test_a_blocked_process_stops_after_the_grace_period():
    proc = _blocked_process(1.0)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == signals.PREEMPTED_EXIT_CODE and 0.9 < time.time() - t0 < 10
    assert err.strip().splitlines() == ["error: not stopped 1 s after SIGTERM (blocked waiting for another "
                                        "process?): stopped at once, without a new checkpoint (a rerun resumes "
                                        "from the last one, if any)"]


def test_a_second_signal_stops_at_once_and_a_copy_of_the_first_does_not():
    proc = _blocked_process(120.0)
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # the same Ctrl-C, forwarded by the launching shell
        time.sleep(2.0)  # the SIGTERM below: 1 s (repeat_s) after the first, even if the watchdog read it late
        assert proc.poll() is None, "a copy of the first signal counted as a second one"
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == signals.PREEMPTED_EXIT_CODE and time.time() - t0 < 5
    assert err.startswith("error: SIGTERM received again: stopped at once") and len(err.splitlines()) == 1


def test_requeue_outside_slurm_is_false():
    assert signals.PreemptionHandler().requeue(environ={}) is False


def _fake_scontrol(tmp_path, rc=0):
    log = tmp_path / "scontrol.log"
    exe = tmp_path / "bin" / "scontrol"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit {rc}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return log, str(exe.parent)


def test_requeue_calls_scontrol(tmp_path, monkeypatch):
    log, bindir = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    h = signals.PreemptionHandler()
    assert h.requeue(environ={"SLURM_JOB_ID": "4242"}) is True
    assert h.requeue(environ={"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4200",
                              "SLURM_ARRAY_TASK_ID": "3"}) is True
    assert log.read_text().splitlines() == ["requeue 4242", "requeue 4200_3"]


def test_requeue_failure_is_false(tmp_path, monkeypatch, capsys):
    _, bindir = _fake_scontrol(tmp_path, rc=1)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    assert signals.PreemptionHandler().requeue(environ={"SLURM_JOB_ID": "1"}) is False
    assert "scontrol requeue 1 failed" in capsys.readouterr().err


def test_worker_helper_ignores_signals():
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]);"
            "from src.runtime.signals import ignore_preemption_signals_in_worker as f; f(0);"
            "os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGTERM); "
            "os.kill(os.getpid(), signal.SIGINT); print('alive')")
    r = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "alive" in r.stdout, r.stderr


# --------------------------------------------------------------------------------------------------
# 2 processes under torchrun: one Sinkhorn spread over processes
# --------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sinkhorn_equals_one_process(tmp_path):
    pytest.importorskip("src.method.sinkhorn")
    import dist_worker_sinkhorn as w

    from src.method.sinkhorn import sinkhorn

    prefix = str(tmp_path / "sk")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "tests", "dist_worker_sinkhorn.py"), prefix]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(2):
        assert f"distributed: rank {r}/2 local_rank {r} device cpu (torchrun, gloo, env://)" in proc.stdout

    full = w.full_scores(2)
    outs = [torch.load(f"{prefix}.rank{r}.pt") for r in range(2)]
    for i, (eps, iters, stab) in enumerate(w.CASES):
        single = sinkhorn(full, eps, iters, stab, world_size=1)
        both = torch.cat([o["results"][i] for o in outs])
        torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-7)
        # each slice on its own is a different (wrong) answer: the processes really cooperated
        alone = torch.cat([sinkhorn(full[:w.BATCH_PER_RANK], eps, iters, stab),
                           sinkhorn(full[w.BATCH_PER_RANK:], eps, iters, stab)])
        assert not torch.allclose(alone, single, rtol=1e-4, atol=1e-6)
    for r, o in enumerate(outs):
        assert o["env"] == {"rank": r, "world_size": 2, "local_rank": r, "init_method": "env://",
                            "source": "torchrun"}
        assert o["sum"] == 3.0
        assert o["agreed_stop"] is True  # only rank 1 was flagged; both stop
    # start-up agreement: every rank gets the same one-line verdict
    a, b = (o["agreement"] for o in outs)
    assert a == b
    assert a["same"] is None and a["per_process_flags"] is None and a["no_problem"] is None
    assert a["count"].startswith("the processes disagree on images (rank 0: 100, rank 1: 90)")
    assert a["hash"].startswith("the processes disagree on pixels (rank 1 differs from rank 0)")
    assert a["flags"].startswith("the processes disagree on --base_lr")
    assert a["problem"] == "refused by rank 1"


# --------------------------------------------------------------------------------------------------
# 2 processes of the pretraining script (started one by one, as on two nodes): they agree or stop
# --------------------------------------------------------------------------------------------------

def _two_ranks(tmp_path, args_of_rank, tag, script=None, env_of_rank=lambda r: {}):
    """Start `script` (main_swav_unmix.py) as ranks 0 and 1 of one job (file:// rendezvous), each with the
    environment variables `env_of_rank(rank)` added; returns the processes."""
    from tests.e2e_helpers import MAIN, RUN_ENV
    env = {k: v for k, v in RUN_ENV.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                       "MASTER_PORT")}
    store = tmp_path / f"rendezvous_{tag}"
    return [subprocess.Popen([sys.executable, str(script or MAIN), *map(str, args_of_rank(r)), "--dist_url", f"file://{store}",
                              "--world_size", "2", "--rank", str(r)], cwd=tmp_path, env=dict(env, **env_of_rank(r)),
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]


def _finish(procs, timeout=180):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@pytest.fixture(scope="module")
def data10(tmp_path_factory):
    from tests.e2e_helpers import make_fake_cifar10
    from tests.fake_cifar import write_cifar10
    root = tmp_path_factory.mktemp("two_ranks")
    make_fake_cifar10(root / "c10")
    write_cifar10(root / "c10_fewer", n_train_per_batch=16, n_test=20)  # a node-local copy with 80 images
    return root


def _tiny(data, dump, *extra):
    from tests.e2e_helpers import tiny_args
    return tiny_args(data, dump, 1, "--batch_size", 8, "--log_freq", 1, *extra)


@pytest.mark.slow
def test_ranks_given_different_data_stop_at_start_with_one_line(data10, tmp_path):
    procs = _two_ranks(tmp_path, lambda r: _tiny(data10 / ("c10" if r == 0 else "c10_fewer"), tmp_path / "run"), "data")
    for rank, (rc, out, err) in enumerate(_finish(procs)):
        assert rc == 2, err[-2000:]
        assert err.strip().splitlines() == ([  # one line for the job: rank 0 says it
            "error: the processes disagree on the number of training images (rank 0: 100, rank 1: 80); every "
            "process needs the same arguments and the same data"] if rank == 0 else []), err
    assert not (tmp_path / "run" / "checkpoint.pth.tar").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["main_swav_unmix.py", "eval_semisup.py"])
def test_a_rank_that_cannot_read_its_data_stops_the_job_with_its_line_and_leaves_no_folder(data10, tmp_path, script):
    """Rank 1's copy of the data is missing (a node-local --data_path): it refuses while rank 0, which read
    its data, goes on to the next collective of its start-up (the comparison of the data's fingerprints; the
    fine-tuning's DDP). They meet in the start-up's vote there: rank 1 says its line, both exit 2 (not rank 0
    with 5 after a timeout), and the new run folder rank 0 created is removed."""
    dump = tmp_path / "new" / "run"
    if script == "main_swav_unmix.py":
        args = lambda r: _tiny(data10 / ("c10" if r == 0 else "missing"), dump, "--dist_timeout", 60)  # noqa: E731
    else:
        args = lambda r: ["--data_path", data10 / ("c10" if r == 0 else "missing"), "--dump_path", dump,  # noqa: E731
                          "--pretrained", "", "--arch", "resnet18", "--width_per_group", 8, "--epochs", 1,
                          "--batch_size", 8, "--workers", 0, "--labels_perc", 10, "--dist_timeout", 60]
    results = _finish(_two_ranks(tmp_path, args, "missing", script=os.path.join(ROOT, script)), timeout=120)
    assert [rc for rc, _, _ in results] == [2, 2], [err[-2000:] for _, _, err in results]
    lines = [err.strip().splitlines() for _, _, err in results]
    assert lines[0] == [] and len(lines[1]) == 1 and str(data10 / "missing") in lines[1][0], lines
    assert not (tmp_path / "new").exists(), sorted(map(str, (tmp_path / "new").rglob("*")))


@pytest.mark.slow
def test_a_rank_refusing_after_the_data_comparison_meets_the_others_before_ddp(data10, tmp_path):
    """Rank 1's copy of the data has the same training images but no test split, which the kNN monitor
    (--knn_freq) reads after the comparison of the training data's fingerprints: rank 1 refuses there while
    rank 0 goes on to build its network. They meet in the start-up's vote before DDP's first collective:
    rank 1 says its line, both exit 2 (not rank 0 with 5 after a timeout), no folder is left."""
    no_test = tmp_path / "c10_no_test"
    shutil.copytree(data10 / "c10", no_test)
    (no_test / "cifar-10-batches-py" / "test_batch").unlink()
    dump = tmp_path / "new" / "run"
    args = lambda r: _tiny(data10 / "c10" if r == 0 else no_test, dump, "--knn_freq", 1,  # noqa: E731
                           "--dist_timeout", 60)
    results = _finish(_two_ranks(tmp_path, args, "no_test"), timeout=120)
    assert [rc for rc, _, _ in results] == [2, 2], [err[-2000:] for _, _, err in results]
    lines = [err.strip().splitlines() for _, _, err in results]
    assert lines[0] == [] and len(lines[1]) == 1 and "test_batch" in lines[1][0], lines
    assert not (tmp_path / "new").exists(), sorted(map(str, (tmp_path / "new").rglob("*")))


# NVIDIA apex's `apex.parallel` as `--sync_bn apex` uses it (apex needs CUDA): its process groups, made by every
# process of the job (collectives), and a model it would convert left as it is.
FAKE_APEX = """import torch.distributed as dist


def create_syncbn_process_group(group_size):
    return dist.new_group(list(range(group_size)))


def convert_syncbn_model(model, process_group=None):
    return model
"""


@pytest.mark.slow
def test_sync_bn_apex_missing_on_one_rank_meets_the_others_before_its_process_groups(data10, tmp_path):
    """--sync_bn apex where rank 0's node has no apex and rank 1's has (a stand-in here: apex needs CUDA):
    rank 0 refuses, rank 1 goes on to create apex's process groups. They meet in the start-up's vote first:
    rank 0 says its line, both exit 2 (not both after --dist_timeout), no folder is left."""
    (tmp_path / "apex_site" / "apex").mkdir(parents=True)
    (tmp_path / "apex_site" / "apex" / "__init__.py").write_text("from . import parallel  # noqa: F401\n")
    (tmp_path / "apex_site" / "apex" / "parallel.py").write_text(FAKE_APEX)
    dump = tmp_path / "new" / "run"
    args = lambda r: _tiny(data10 / "c10", dump, "--sync_bn", "apex", "--syncbn_process_group_size", 2,  # noqa: E731
                           "--dist_timeout", 30)
    began = time.time()
    results = _finish(_two_ranks(tmp_path, args, "apex", env_of_rank=lambda r: {
        "PYTHONPATH": str(tmp_path / "apex_site")} if r == 1 else {}), timeout=120)
    assert [rc for rc, _, _ in results] == [2, 2], [err[-2000:] for _, _, err in results]
    lines = [err.strip().splitlines() for _, _, err in results]
    assert lines[1] == [] and lines[0] == ["error: --sync_bn apex needs NVIDIA apex, which is not installed; use "
                                           "--sync_bn pytorch"], lines
    assert time.time() - began < 25, "waited for --dist_timeout"
    assert not (tmp_path / "new").exists(), sorted(map(str, (tmp_path / "new").rglob("*")))


@pytest.mark.slow
def test_a_rank_lost_during_the_start_up_leaves_no_folder(data10, tmp_path):
    """Rank 1 killed during the start-up, after rank 0 created and claimed a new folder (its train.log is
    there), before the run starts: rank 0 stops as after any lost process (status 5, one line) and removes
    the folder it created, as a refused start does."""
    from tests.e2e_helpers import wait_for_log
    dump = tmp_path / "new" / "run"
    procs = _two_ranks(tmp_path, lambda r: _tiny(data10 / "c10", dump), "lost")
    wait_for_log(dump / "train.log", "Process rank 0", alive=lambda: procs[0].poll() is None)
    procs[1].kill()
    (rc, _, err), _ = _finish(procs)
    assert rc == LOST_PEER_EXIT_CODE and err.startswith("error: another process of the job stopped"), err[-2000:]
    assert not (tmp_path / "new").exists(), sorted(map(str, (tmp_path / "new").rglob("*")))


@pytest.mark.slow
def test_after_sigterm_of_one_rank_both_save_and_resume_their_own_statistics(data10, tmp_path):
    """SIGTERM to rank 0 only, mid-epoch: both ranks agree, save and exit 3; the rerun finishes the epoch,
    and each rank's stats file holds its own loss, the uninterrupted run's to the bit."""
    from tests.e2e_helpers import wait_for_log
    args = lambda dump: (lambda r: _tiny(data10 / "c10", tmp_path / dump, "--preempt_check_freq", 1))  # noqa: E731
    for rc, _, err in _finish(_two_ranks(tmp_path, args("reference"), "ref")):
        assert rc == 0, err[-2000:]
    procs = _two_ranks(tmp_path, args("stopped"), "stop")
    wait_for_log(tmp_path / "stopped" / "train.log", "Epoch: [0][2/6]", alive=lambda: procs[0].poll() is None)
    procs[0].send_signal(signal.SIGTERM)
    for rc, _, err in _finish(procs):
        assert rc == signals.PREEMPTED_EXIT_CODE, err[-2000:]
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pth.tar", weights_only=True)
    assert 3 <= saved["iteration"] < 6 and [lp["loss_count"] for lp in saved["loops"]] == [saved["iteration"]] * 2
    for rc, _, err in _finish(_two_ranks(tmp_path, args("stopped"), "resume")):
        assert rc == 0, err[-2000:]
    import pandas as pd
    for rank in (0, 1):
        ref = pd.read_csv(tmp_path / "reference" / f"stats{rank}.csv")["loss"].tolist()
        assert pd.read_csv(tmp_path / "stopped" / f"stats{rank}.csv")["loss"].tolist() == ref
    assert pd.read_csv(tmp_path / "reference" / "stats0.csv")["loss"].tolist() != ref  # each rank its own


def test_a_rendezvous_port_in_use_is_one_line_naming_the_flag(tmp_path):
    """Two jobs on one node with the released --dist_url tcp://localhost:10001: the second's rank 0 cannot
    listen. A one-line error that names the port and the flag, not a lost-peer message."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
        code = ("import argparse, sys; sys.path.insert(0, sys.argv[1]); from src.runtime.startup import start_processes; "
                f"start_processes(argparse.Namespace(dist_url='tcp://127.0.0.1:{port}', rank=0, world_size=2, "
                "local_rank=0, dist_timeout=20, seed=0))")
        p = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"tcp://127.0.0.1:{port} is already in use" in lines[0] and "--dist_url" in lines[0], \
        p.stderr


@pytest.mark.parametrize("rendezvous", ["file", "tcp"])
def test_a_process_that_never_joins_ends_the_others_with_one_line_and_status_5(tmp_path, rendezvous):
    """Rank 1 stops before the rendezvous (e.g. an evaluation's --pretrained missing on its node): rank 0 waits
    --dist_timeout, then one line and status 5, as for a process lost later. Was a traceback of torch's
    'Wait timeout' and status 1 with a file:// rendezvous."""
    if rendezvous == "file":
        url = f"file://{tmp_path / 'rendezvous'}"
    else:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            url = f"tcp://127.0.0.1:{free.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    code = ("import argparse, sys; sys.path.insert(0, sys.argv[1]); from src.runtime.startup import start_processes; "
            f"start_processes(argparse.Namespace(dist_url={url!r}, rank=0, world_size=2, local_rank=0, "
            "dist_timeout=1, seed=0))")
    p = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == LOST_PEER_EXIT_CODE and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith(f"error: rank 0: not every process of the job joined the rendezvous {url} within "
                               "--dist_timeout 1 s"), lines
