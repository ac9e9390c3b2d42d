"""A ``--dist_url file:///path`` rendezvous that can be used again by the next run of the same command.

torch's FileStore appends keys to the file and never forgets them, and it removes the file only when every
process drops its store, which a process that exits, fails or is killed often does not. A later run
sharing the file reads the earlier run's addresses and fails ("Gloo connectFullMesh failed") or waits far
past ``--dist_timeout``. So:

- every process of a job holds a shared ``flock`` on ``<file>.lock`` from before it opens the file until
  it exits (the kernel drops it with the process, killed or not);
- at start, a process that can take that lock exclusively knows that no live process uses the file: it
  removes a file left by an earlier run (and says so in one line), then holds its shared lock. A process
  that cannot (another process of this job already waits in the rendezvous) uses the file as it is;
- rank 0 removes the file and its lock file when it leaves, after a clean end or a failure.

flock is what FileStore itself relies on, so this works wherever the file rendezvous does (one host, or
a shared file system with working locks).
"""
import fcntl
import os
from typing import List, Optional

LOCK_SUFFIX = ".lock"


class RendezvousFile:
    """The rendezvous file of this process and the shared lock that marks it as in use."""

    def __init__(self, path: str, rank: int, lock_fd: int, removed_stale: bool):
        self.path, self.rank, self.lock_fd, self.removed_stale = path, rank, lock_fd, removed_stale


# The files this process joined: their locks must stay held for the life of the process (as torch keeps
# its process group), and the exit paths of an entry script (src/runtime/cli.py) must find them.
_JOINED: List[RendezvousFile] = []


def claim(path: str, rank: int) -> RendezvousFile:
    """Before the process group opens `path`: take the shared lock, removing first a stale file that no
    live process uses. OSError when the lock file cannot be created (e.g. an unwritable folder)."""
    fd = os.open(path + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    removed = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # a live process of this job (or of another one) already uses the file: leave it alone
    else:
        removed = _remove(path)
    # (a conversion from the exclusive lock releases it first: another starting process may check in
    # between, before this one has touched the file, which is harmless)
    fcntl.flock(fd, fcntl.LOCK_SH)
    joined = RendezvousFile(path, rank, fd, removed)
    _JOINED.append(joined)
    return joined


def leave() -> Optional[str]:
    """At exit: rank 0 removes the rendezvous file and its lock file; every process drops its lock.
    Returns the removed rendezvous file, if any. Safe to call more than once."""
    removed = None
    while _JOINED:
        joined = _JOINED.pop()
        if joined.rank == 0:
            removed = joined.path if _remove(joined.path) else removed
            _remove(joined.path + LOCK_SUFFIX)
        try:
            os.close(joined.lock_fd)
        except OSError:
            pass
    return removed


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:  # e.g. a read-only folder: nothing to clean there
        return False
