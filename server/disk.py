"""Crash-safe writes, the one way every part of the project puts a file or
a directory in place: written under a temporary name, fsynced, renamed, and
the parent directory fsynced, so after a crash the old or the new version
is there, never a part. (The client has its own small one,
siegetank.files.write_json: it installs without the servers.)"""
import ctypes
import errno
import os
import shutil
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes | str, sync: bool = True,
               mode: int = 0o666) -> None:
    """Create `path` with `data` (str is UTF-8), fsynced unless `sync` is
    false; `mode` before the umask."""
    if isinstance(data, str):
        data = data.encode('utf-8')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def create_file(path: str, data: bytes | str, mode: int = 0o666) -> int:
    """Create `path` with `data` (str is UTF-8) in the page cache; returns
    its fd, still open for a later fsync (GroupSync.sync_open)."""
    if isinstance(data, str):
        data = data.encode('utf-8')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def unlink(path: str) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write(path: str, data: bytes | str, mode: int = 0o666) -> None:
    """Replace `path` by `data` as one step that survives a crash. A mode
    stricter than the default is set exactly (a file holding a secret)."""
    tmp = '%s.tmp-%s' % (path, uuid.uuid4().hex)
    try:
        write_file(tmp, data, mode=mode)
        if mode != 0o666:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def publish_dir(tmp: str, final: str) -> None:
    """fsync the built directory `tmp` and rename it to `final`
    (FileExistsError if `final` exists)."""
    for folder, _dirs, _files in os.walk(tmp, topdown=False):
        fsync_dir(folder)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(e.errno, 'exists', final) from e
        raise
    fsync_dir(os.path.dirname(final))


def build_dir(parent: str, final: str,
              fill: Callable[[str], object]) -> None:
    """Build a directory under a temporary name in `parent` with
    `fill(tmp)`, then publish it as `final` in one step."""
    tmp = os.path.join(parent, '.tmp-%s' % uuid.uuid4().hex)
    os.makedirs(tmp)
    try:
        fill(tmp)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_text(path: str) -> str:
    with open(path, 'rb') as f:
        return f.read().decode('utf-8')


def _syncfs_call() -> Any:
    """libc's syncfs(2) (Linux), or None."""
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    return call


_SYNCFS = _syncfs_call()


class _Job:
    """One caller's paths, woken when the step that took them is done."""

    __slots__ = ('paths', 'done', 'error')

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.done = threading.Event()
        self.error: OSError | None = None


class GroupSync:
    """Group commit: makes files and directories durable for many callers
    at once. Callers (disk pool threads) queue what they need durable and
    wait; one thread per process takes everything queued, makes it durable
    in one step, and wakes them all. What is queued while a step runs goes
    into the next one, so N checkpoints due in the same moment share one
    flush of the journal instead of costing one each.

    The step is one syncfs(2) of the filesystem under `root` (its files'
    data and its directories' entries, one journal commit and one cache
    flush, whatever the number of paths). Without syncfs (`use_syncfs`
    false, or no syncfs here) each caller fsyncs its own paths in its own
    thread, files before directories: fsyncs made at once from many
    threads are what the journal commits together, and one thread making
    them in turn would commit it once per file (measured: checkpoints
    twice as slow)."""

    def __init__(self, root: str, use_syncfs: bool = True) -> None:
        self.root = root
        self.use_syncfs = use_syncfs and _SYNCFS is not None
        self.steps = 0  # flushes made by this process (measurement)
        self._reset()
        ref = weakref.ref(self)

        def after_fork() -> None:
            group = ref()
            if group is not None:
                group._reset()
        os.register_at_fork(after_in_child=after_fork)

    def _reset(self) -> None:
        """A fresh queue and no thread (after a fork: the child has no
        commit thread and may have inherited a held lock)."""
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._thread: threading.Thread | None = None

    def sync(self, paths: Iterable[str]) -> None:
        """Return once every path in `paths` (files, directories, all under
        `root`) is durable; the step's OSError if it failed."""
        if not self.use_syncfs:
            self._step(list(paths))
            return
        job = _Job(list(paths))
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name='group-sync', daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error

    def sync_open(self, fds: Iterable[int], paths: Iterable[str]) -> None:
        """`sync` of `paths`, already open as `fds` (files first, then
        folders): without syncfs, one fsync per fd and no other system
        call, for a thread whose every call takes the GIL back from the
        event loop (a context switch each)."""
        if self.use_syncfs:
            self.sync(paths)
            return
        self.steps += 1
        for fd in fds:
            os.fsync(fd)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch, self._queue = self._queue, []
            error = None
            try:
                self._step([p for job in batch for p in job.paths])
            except OSError as e:
                error = e
            for job in batch:
                job.error = error
                job.done.set()

    def _step(self, paths: list[str]) -> None:
        self.steps += 1
        if self.use_syncfs:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _SYNCFS(fd) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e), self.root)
            finally:
                os.close(fd)
            return
        dirs = []
        for path in dict.fromkeys(paths):
            if os.path.isdir(path):
                dirs.append(path)
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for path in dirs:
            fsync_dir(path)
