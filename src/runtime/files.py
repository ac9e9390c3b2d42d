"""Files written whole, with the standard library only (the tools import it without torch): `atomic_write`
(and `write_json`) replace a file so that a kill at any instant leaves the old or the new one, never a torn
one; `WRITE_ERRNOS`, what a full disk or an unwritable folder give; `remove_stale_temporaries`, what a
killed writer left; `file_sha256`, a file's identity.
"""
import errno
import glob
import hashlib
import json
import os
import re
import uuid

TMP_SUFFIX = ".tmp"


# What a full disk, a quota, a read-only or unwritable folder, or a file-size limit give when writing.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def atomic_write(path, write):
    """Call `write(f)` on a binary file that becomes `path` only once complete: a temporary file in the
    same folder (`.<name>.<pid>.<random>.tmp`, permissions as for a plain `open`), flush + fsync, rename
    over `path`, fsync of the folder. A kill at any instant leaves the old `path` or the new one. When the
    disk is full or the folder unwritable, the temporary file is removed and a plain OSError naming `path`
    is raised (torch.save buries it under its own RuntimeError)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:  # never created, or the folder became read-only
            pass
        cause = _write_error(e)
        if cause is not None:
            raise OSError(cause.errno, cause.strerror, path) from None
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_error(e):
    """The OSError of a full disk or an unwritable folder in `e` or the exceptions it was raised from."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def remove_stale_temporaries(*folders):
    """Delete the temporary files that `atomic_write` leaves behind when a process is killed mid-write
    (call at start-up, before this run writes anything). Returns the removed paths."""
    removed = []
    for folder in folders:
        for p in glob.glob(os.path.join(glob.escape(folder), ".*" + TMP_SUFFIX)):
            if re.fullmatch(r"\..+\.\d+\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX), os.path.basename(p)):
                try:
                    os.unlink(p)
                    removed.append(p)
                except OSError:
                    pass
    return removed


def write_json(path, obj, **kw):
    """json.dump to `path`, replaced atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, **kw).encode()))


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file's bytes (what binds an evaluation to the checkpoint it evaluates)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
