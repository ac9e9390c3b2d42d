"""A start that stops before its run starts leaves its run folder as it found it.

An entry script claims its folder (creates and locks it, writes its log) before every check has passed:
the data are read, the model built and the checkpoint resumed only after that. When the process then ends
before the run has started (a bad data path, data with other classes, a checkpoint that cannot be resumed,
a folder of another kind, ...), `StartUndo` puts the folder back: one this start created is removed, with
the parent folders it created while still empty; an existing one keeps every file exactly (new entries are
removed, files that grew, the log among them, are cut back to their length, the lock file gets its bytes
back, an earlier evaluation set aside is moved back). A run has started once it wrote its own params.json,
which each entry script does when every check has passed; from then on its files are kept whatever happens.
Code that moves an existing folder's files before that point must say where (`set_aside_into`), or the undo
would take the moved files for new ones. With several processes rank 0 undoes, once every process has stopped
with it or another was lost (src/runtime/startup.py, `StartVote`); the others write nothing in the folder
before the start.
"""
import atexit
import os
import shutil


def _first_missing(path):
    """The outermost folder of `path` (absolute) that does not exist yet, None when `path` exists."""
    missing = None
    while not os.path.lexists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _stat_key(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class StartUndo:
    """What one start did to its run folder `dump_path`, to be undone when the start stops before its run
    starts. Make it before the folder is created; `note_folder` records the folder under the lock (before the
    lock file names its new holder), `hold` gives it the lock and arms it, `set_aside_into` records a folder
    the earlier files were moved into. Armed, it undoes at the process's exit unless the run has started;
    `undo` does it now. Undoing happens under the lock, which it then releases."""

    def __init__(self, dump_path, lock_name):
        self.path = os.path.abspath(dump_path)
        self.created = _first_missing(self.path)
        self.lock_name = lock_name
        self.lock_existed = os.path.lexists(os.path.join(self.path, lock_name))
        self.lock_bytes, self.lengths, self.params, self.set_aside = b"", None, None, []  # see note_folder
        self.lock = None

    def note_folder(self):
        """Under the lock: the folder's entries, the lengths of its files, the lock file's bytes, params.json."""
        self.lengths = {}
        for entry in os.scandir(self.path):
            self.lengths[entry.name] = entry.stat().st_size if entry.is_file(follow_symlinks=False) else None
        with open(os.path.join(self.path, self.lock_name), "rb") as f:
            self.lock_bytes = f.read()
        self.params = _stat_key(os.path.join(self.path, "params.json"))

    def hold(self, lock):
        self.lock = lock
        atexit.register(self._at_exit)

    def set_aside_into(self, folder):
        if folder:
            self.set_aside.append(folder)

    def started(self):
        """The run wrote its params.json: every check passed."""
        now = _stat_key(os.path.join(self.path, "params.json"))
        return now is not None and now != self.params

    def _at_exit(self):
        if self.lock is not None and not self.started():
            self.undo()

    def undo(self):
        """Put the folder back as the start found it, then release the lock."""
        if self.lock is None:
            return
        try:
            if self.created is not None:
                self._remove_created()
            else:
                self._restore_existing()
        finally:
            self.lock.close()
            self.lock = None

    def _remove_created(self):
        shutil.rmtree(self.path, ignore_errors=True)
        path = os.path.dirname(self.path)
        while len(path) >= len(self.created):  # the parents this start created, while empty
            try:
                os.rmdir(path)
            except OSError:
                break
            path = os.path.dirname(path)

    def _restore_existing(self):
        if self.lengths is None:  # never recorded (a file system without locks): nothing is touched
            return
        for folder in self.set_aside:
            for name in os.listdir(folder):
                os.replace(os.path.join(folder, name), os.path.join(self.path, name))
        for entry in os.scandir(self.path):
            if entry.name == self.lock_name:
                continue
            if entry.name not in self.lengths:
                shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.remove(entry.path)
            elif self.lengths[entry.name] is not None and entry.stat().st_size > self.lengths[entry.name]:
                os.truncate(entry.path, self.lengths[entry.name])
        lock_path = os.path.join(self.path, self.lock_name)
        if not self.lock_existed:
            os.remove(lock_path)
        else:
            with open(lock_path, "rb") as f:
                same = f.read() == self.lock_bytes
            if not same:
                with open(lock_path, "wb") as f:
                    f.write(self.lock_bytes)
