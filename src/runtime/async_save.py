"""Checkpoint writes off the training loop's critical path.

`BackgroundWriter.submit(jobs)` first waits for the previous write (and raises its error, if it had one),
then takes a host snapshot of every tensor in the jobs' objects (from CUDA into pinned host buffers,
reused from one save to the next; CPU tensors are cloned, since training goes on changing them in place),
and writes the files, in order, with `atomic_save` in a background thread. The loop goes on training while
the file is pickled, written and fsynced. A kill at any instant still leaves the previous complete file or
the new one (the write is atomic); the temporary file a kill leaves is removed at the next start
(`remove_stale_temporaries`).

The files hold the same records as a synchronous write; on CUDA the tensors are stored as CPU tensors
(loads with any `map_location` give the same values). `wait()` (at the next save, before a stop, at the
end of a run) joins the write and raises its error, e.g. the OSError of a full disk that the entry
scripts turn into exit status 6. The thread is not a daemon and `atexit` joins it too, so a process that
ends otherwise (exit 4, an exception) does not cut a write short.
"""
import atexit
import threading

import torch

from .checkpoint import atomic_save


class BackgroundWriter:
    """One checkpoint write at a time in a background thread (module docstring)."""

    def __init__(self):
        self._thread = None
        self._error = None
        self._pinned = []  # host buffers of the last snapshot, in traversal order, reused when they fit
        atexit.register(self._join)

    def submit(self, jobs):
        """Write each (obj, path) of `jobs`, in order, atomically, in the background, from a host snapshot
        taken now: what the caller changes afterwards does not reach the files."""
        self.wait()
        snapshot = HostSnapshot(self._pinned)
        jobs = [(snapshot.take(obj), path) for obj, path in jobs]
        snapshot.finish()
        self._pinned = snapshot.buffers
        self._thread = threading.Thread(target=self._write, args=(jobs,), name="checkpoint-writer")
        self._thread.start()

    def _write(self, jobs):
        try:
            for obj, path in jobs:
                atomic_save(obj, path)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def _join(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self):
        """Wait for the write in flight; raise its error (once)."""
        self._join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def busy(self):
        return self._thread is not None and self._thread.is_alive()


class HostSnapshot:
    """Host copies of the tensors in nested dicts / lists / tuples. A tensor met twice (the same object)
    is copied once, so the file keeps what the synchronous save would share. CUDA tensors go into pinned
    buffers with non-blocking copies, waited for in `finish()`."""

    def __init__(self, pinned=()):
        self._reuse = list(pinned)
        self.buffers = []
        self._seen = {}
        self._cuda = False

    def take(self, obj):
        if isinstance(obj, torch.Tensor):
            key = id(obj)
            if key not in self._seen:
                self._seen[key] = (obj, self._copy(obj))  # the original kept alive: ids stay unique
            return self._seen[key][1]
        if isinstance(obj, dict):
            return type(obj)((k, self.take(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
            return type(obj)(self.take(v) for v in obj)
        return obj

    def _copy(self, t):
        if t.device.type != "cuda":
            return t.detach().clone()
        self._cuda = True
        buf = self._buffer(t)
        buf.copy_(t.detach(), non_blocking=True)
        return buf

    def _buffer(self, t):
        """A pinned buffer laid out as `t`: a channels_last momentum buffer loaded from the file stays
        channels_last, as the fused SGD kernel needs (parameters, gradients and buffers of equal strides)."""
        while self._reuse:
            old = self._reuse.pop(0)
            if old.shape == t.shape and old.dtype == t.dtype and old.stride() == t.stride():
                self.buffers.append(old)
                return old
        buf = torch.empty_like(t, device="cpu", pin_memory=True)
        self.buffers.append(buf)
        return buf

    def finish(self):
        """The copies are complete (one wait for the device on CUDA)."""
        if self._cuda:
            torch.cuda.synchronize()
        self._seen.clear()
