"""Crash-safe writes, the one way every part of the project puts a file or
a directory in place: written under a temporary name, fsynced, renamed, and
the parent directory fsynced, so after a crash the old or the new version
is there, never a part. (The client has its own small one,
siegetank.files.write_json: it installs without the servers.)"""
import errno
import os
import shutil
import uuid
from collections.abc import Callable


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
