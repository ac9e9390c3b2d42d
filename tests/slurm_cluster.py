"""A private one-node Slurm (munged + slurmctld + slurmd) for tests.

    with one_at_a_time(), SlurmCluster.start() as cluster:   # or the ``cluster`` pytest fixture
        job = cluster.sbatch(["--ntasks-per-node=2", "script.sh"], env={...}, cwd=workdir)
        state = cluster.wait(job, timeout=120)

Everything lives in a fresh folder under /tmp (0755, so the ``munge`` user can reach its socket):
a private munge key and socket, private TCP ports for slurmctld/slurmd, private state and spool
folders, one node (this host, on loopback) in partition ``batch``. ``cluster.env`` is ``os.environ``
plus ``SLURM_CONF`` (and /usr/sbin on PATH); pass it to ``sbatch``/``squeue``/``scontrol``. ``stop()``
cancels the jobs left, then stops every daemon it started by process id (SIGTERM, then SIGKILL).

Needs root (slurmd runs jobs as their owner) and Debian's ``slurm-wlm`` + ``munge``
(``.ci/install_slurm.sh`` installs them). ``missing_reason()`` says why a cluster cannot start here.
"""
import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

SBIN = ("/usr/sbin", "/sbin")
_FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                 "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


def _which(name: str) -> Optional[str]:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


def missing_reason() -> Optional[str]:
    """None when a private cluster can be started here, else the reason (for pytest.skip)."""
    missing = [n for n in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun")
               if _which(n) is None]
    if missing:
        return (f"Slurm is not installed (missing {', '.join(missing)}); "
                f"run `sudo bash .ci/install_slurm.sh` to install slurm-wlm and munge")
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (slurmd runs jobs as their owner)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' does not exist (munge package incomplete)"
    return None


# Held while a private cluster runs (``one_at_a_time``). Not a name that people lock by hand around a
# whole test run (such a lock, taken again inside the run, would wait for itself).
LOCK = os.path.join(tempfile.gettempdir(), "unmix-tests-slurm-cluster.lock")


@contextlib.contextmanager
def one_at_a_time(path: str = LOCK):
    """Wait until no other private cluster runs on this machine, and hold the lock in the meantime: each
    numbers its jobs from 1, so the ranks of two clusters' jobs would meet on the same rendezvous port
    (``10000 + SLURM_JOB_ID``, src/runtime/launch.py)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge", "munge.socket")
        self._procs: Dict[str, subprocess.Popen] = {}
        self._pids: Dict[str, int] = {}
        path = os.environ.get("PATH", "")
        for d in SBIN:
            if d not in path.split(os.pathsep):
                path += os.pathsep + d
        self.env = dict(os.environ, SLURM_CONF=self.conf, PATH=path)
        for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
            self.env.pop(k, None)  # a test run inside a Slurm job must not leak its job into ours

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start(cls, timeout: float = 60.0, keep_root: bool = False) -> "SlurmCluster":
        reason = missing_reason()
        if reason:
            raise SlurmError(reason)
        root = tempfile.mkdtemp(prefix="slurmtest-")
        os.chmod(root, 0o755)
        cluster = cls(root)
        cluster._keep_root = keep_root
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def _spawn(self, name: str, argv: List[str], **kw) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.stdout"), "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=self.env, start_new_session=True, **kw)
        log.close()
        self._procs[name] = p
        self._pids[name] = p.pid
        return p

    def _start(self, timeout: float) -> None:
        root = self.root
        munge = pwd.getpwnam("munge")
        mdir = os.path.join(root, "munge")
        os.makedirs(mdir)
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        os.chmod(mdir, 0o755)
        key = os.path.join(mdir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)
        for d in ("state", "spool"):
            os.makedirs(os.path.join(root, d), mode=0o755)

        # munged in the foreground, as the munge user, private socket/key/pid/log/seed
        self._spawn("munged", [_which("munged"), "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={mdir}/munged.pid",
                               f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed",
                               "--num-threads=2"],
                    user=munge.pw_uid, group=munge.pw_gid)
        self._wait_for(lambda: os.path.exists(self.munge_socket), 15, "munged socket", "munged")

        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        cpus = os.cpu_count() or 1
        with open(self.conf, "w") as f:
            f.write(f"""# private test cluster (tests/slurm_cluster.py)
ClusterName=unmixtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
MessageTimeout=20
PlugStackConfig={root}/plugstack.conf
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=batch Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        open(os.path.join(root, "plugstack.conf"), "w").close()

        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
        self._wait_for(self._ctld_up, 30, "slurmctld to answer", "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf, "-N", self.host])
        self._wait_for(lambda: self.node_state() == "idle", timeout, "the node to be idle", "slurmd")

    def _ctld_up(self) -> bool:
        r = subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True, timeout=20)
        return r.returncode == 0 and "UP" in r.stdout

    def node_state(self) -> str:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=20)
        return r.stdout.strip()

    def _wait_for(self, cond, timeout: float, what: str, daemon: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = self._procs.get(daemon)
            if p is not None and p.poll() is not None:
                raise SlurmError(f"{daemon} exited with {p.returncode} while waiting for {what}:\n"
                                 + self.daemon_logs())
            try:
                if cond():
                    return
            except (subprocess.TimeoutExpired, OSError):
                pass
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.daemon_logs())

    def daemon_logs(self, tail: int = 30) -> str:
        out = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log", "munged.stdout",
                     "slurmctld.stdout", "slurmd.stdout"):
            p = os.path.join(self.root, name)
            if os.path.exists(p):
                with open(p, errors="replace") as f:
                    lines = f.read().splitlines()[-tail:]
                if lines:
                    out.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel jobs, then stop slurmd, slurmctld, munged by pid (TERM, then KILL)."""
        if "slurmctld" in self._pids and _alive(self._pids["slurmctld"]):
            try:
                subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=20)
                deadline = time.time() + 20
                while time.time() < deadline and self.squeue_ids():
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            pids = {self._pids.get(name)}
            pidfile = {"slurmd": "slurmd.pid", "slurmctld": "slurmctld.pid",
                       "munged": "munge/munged.pid"}[name]
            pids.add(_read_pid(os.path.join(self.root, pidfile)))
            for pid in pids - {None}:
                self._terminate(pid, self._procs.get(name) if pid == self._pids.get(name) else None)
        self._procs.clear()
        if not getattr(self, "_keep_root", False):
            shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _terminate(pid: int, proc: Optional[subprocess.Popen]) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not _alive(pid):
                break
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline:
                if proc is not None:
                    if proc.poll() is not None:
                        break
                elif not _alive(pid):
                    break
                time.sleep(0.1)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    # ------------------------------------------------------------------ jobs
    def run(self, argv: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 30), **kw)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, argv: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
        """``sbatch --parsable <argv>``; returns the job id. ``env`` entries are added to ``self.env``."""
        full_env = dict(self.env, **(env or {}))
        r = self.run(["sbatch", "--parsable"] + list(argv), env=full_env, cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def squeue_ids(self) -> List[str]:
        r = self.run(["squeue", "-h", "-o", "%i"], check=False)
        return r.stdout.split()

    def job_info(self, job_id: str) -> Dict[str, str]:
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        info = {}
        for m in re.finditer(r"(\w+)=(\S*)", r.stdout):
            info.setdefault(m.group(1), m.group(2))
        return info

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, timeout: float, states=_FINAL_STATES, poll: float = 0.5) -> str:
        """Wait until the job reaches one of ``states``; returns the state (raises on timeout)."""
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise SlurmError(f"job {job_id} still {state} after {timeout:.0f}s\n" + self.daemon_logs())
