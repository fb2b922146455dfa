"""The workserver's disk: the truth for targets, streams and committed
frames. Redis is an index rebuilt from here on every start (recovery.py).

Layout under `data_folder`:

    targets/<tid>/meta.json, files/<name>      target files as sent (JSON str)
    streams/<sid>/stream.json, seed/<name>     target_id, creation_date,
                                               status, error_count, tags
                                               (if any); seed files
    streams/<sid>/buffer/<name>                uncommitted frames (decoded)
    streams/<sid>/buffer.lock                  the buffer's lock (an flock:
                                               see lock_buffer)
    streams/<sid>/chunks/<seq>-<n>/frame+<name>, state+<name>
                                               one committed checkpoint
                                               (before 2026-12: frames/,
                                               state/ and meta.json; read
                                               alike: chunk_files)
    streams/<sid>/errors.log, errors.log.1     messages of error stops (the
                                               newest; rotated at a size)

Every directory that must appear whole (a target, a stream, a chunk) is
built under a temporary name, made durable, then renamed into place and
the rename made durable: the rename is the commit. After a crash a chunk
is there entirely or not at all; temporary directories, buffers and the
trash are garbage and are removed on start. Committed frames = sum of the
chunks' n; the restart point = the newest chunk's state files; a download
= that file of every chunk in seq order.

A checkpoint (`commit`) writes nothing durable until it has built its
chunk: the buffer's files are renamed into it, the state files written
to the page cache. Then two flushes (disk.GroupSync):
  1. before the rename: the chunk's files (their data) and its
     directory (their entries) are on disk, else a crash after the
     rename reached the disk could leave a published chunk with missing
     or short files;
  2. after the rename: the chunk's entry in chunks/ is on disk before
     Redis counts its frames and the core hears they are safe, else a
     crash would lose frames the core was told were kept.
Nothing else is flushed: frame appends go to the page cache (a crash
discards the buffer anyway, and the core's activation with it), and the
buffer's own entries never matter after a crash. With `checkpoint_flush`
"fsync" (the default) flush 1 is an fsync of each file then of the
chunk's folder (one frame file and one state file: 3) and flush 2 one of
chunks/, as POSIX needs, made by the checkpoint's own disk thread (the
journal commits the fsyncs of concurrent checkpoints together). With "syncfs"
each flush is one step of a group commit: one thread makes one syncfs of
the filesystem for every checkpoint of the process due at that moment
(2 calls per checkpoint at most, fewer when checkpoints come together),
which also writes back every other dirty page there: only for a data
folder on a filesystem of its own (on a shared one it slows the WS
Redis's AOF fsync, and a Redis killed meanwhile loses the writes it had
postponed).

Everything here blocks. Handlers call it in a thread (`threads.disk`),
except a small frame's append (`append_frames`), which runs on the event
loop when its body is small enough to decode there (web.bounded: a thread
hop costs more than the write to the page cache), and a small
checkpoint's `build_chunk` (core.commit), whose `publish_chunk` alone
goes to the disk pool."""
import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import time
import uuid

from server.disk import (
    GroupSync,
    atomic_write,
    build_dir,
    create_file,
    fsync_dir,
    open_dir,
    read_text,
    unlink,
    write_file,
)

CHUNK = re.compile(r'([0-9]{10})-([0-9]+)')
# A chunk's files: `frame+<name>`, `state+<name>` (sent names never hold
# a `+`).
FRAME, STATE = 'frame+', 'state+'


class TooManyFiles(ValueError):
    """A frame would make the buffer hold more files than allowed."""



def _read_files(folder):
    """{name: str} of the files in `folder` (as the JSON strings sent)."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return {}
    return {n: read_text(os.path.join(folder, n)) for n in names}


def _names(folder):
    """Sorted names in `folder` but the hidden (temporary) ones."""
    try:
        return sorted(n for n in os.listdir(folder) if not n.startswith('.'))
    except FileNotFoundError:
        return []


def _read_json(path):
    """The JSON in `path`, None if there is no such file."""
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        return None


class Storage:
    def __init__(self, root, flush='fsync'):
        self.root = os.path.abspath(root)
        self.targets = os.path.join(self.root, 'targets')
        self.streams = os.path.join(self.root, 'streams')
        self.trash = os.path.join(self.root, 'trash')
        self.durable = GroupSync(self.root, use_syncfs=flush == 'syncfs')

    def ensure(self):
        for folder in (self.targets, self.streams, self.trash):
            os.makedirs(folder, exist_ok=True)

    FREE_TTL_S = 1.0  # free space is read at most this often

    _free = (float('-inf'), 0.0)  # (when, MB)

    def free_mb(self):
        """Free MB under the root, as of at most FREE_TTL_S ago (checked on
        every activation and stream creation: a statfs each was 1.5% of an
        activation's CPU)."""
        when, free = self._free
        now = time.monotonic()
        if now - when >= self.FREE_TTL_S:
            os.makedirs(self.root, exist_ok=True)
            free = shutil.disk_usage(self.root).free / (1024.0 * 1024.0)
            self._free = (now, free)
        return free

    # paths

    def target_dir(self, target_id):
        return os.path.join(self.targets, target_id)

    def stream_dir(self, stream_id):
        return os.path.join(self.streams, stream_id)

    def buffer_dir(self, stream_id):
        return os.path.join(self.stream_dir(stream_id), 'buffer')

    def chunks_dir(self, stream_id):
        return os.path.join(self.stream_dir(stream_id), 'chunks')

    # targets

    def _create(self, parent, final, files_folder, files, meta_name, meta,
                empty=()):
        """Build `final` whole: `files` in `files_folder`, the folders
        `empty`, and `meta` as the JSON file `meta_name` (build_dir)."""
        self.ensure()

        def fill(tmp):
            os.mkdir(os.path.join(tmp, files_folder))
            for folder in empty:
                os.mkdir(os.path.join(tmp, folder))
            for name, value in files.items():
                write_file(os.path.join(tmp, files_folder, name), value)
            write_file(os.path.join(tmp, meta_name), json.dumps(meta))
        build_dir(parent, final, fill)

    def target_meta(self, target_id):
        """{stream_files: [names], cc: the command center that made it}
        or None for an unknown target."""
        return _read_json(os.path.join(self.target_dir(target_id),
                                       'meta.json'))

    def create_target(self, target_id, target_files, stream_names, cc=None):
        self._create(self.targets, self.target_dir(target_id), 'files',
                     target_files, 'meta.json',
                     {'stream_files': sorted(stream_names), 'cc': cc})

    def target_files(self, target_id):
        return _read_files(os.path.join(self.target_dir(target_id), 'files'))

    def remove_target(self, target_id):
        self._remove(self.target_dir(target_id))

    # streams

    def create_stream(self, stream_id, meta, seed_files):
        self._create(self.streams, self.stream_dir(stream_id), 'seed',
                     seed_files, 'stream.json', meta, empty=('chunks',))

    def stream_meta(self, stream_id):
        """{target_id, creation_date, status, error_count, tags?, cc} or
        None."""
        return _read_json(os.path.join(self.stream_dir(stream_id),
                                       'stream.json'))

    def update_stream_meta(self, stream_id, **changes):
        """Rewrite stream.json atomically; False if the stream is gone."""
        meta = self.stream_meta(stream_id)
        if meta is None:
            return False
        meta.update(changes)
        atomic_write(os.path.join(self.stream_dir(stream_id), 'stream.json'),
                     json.dumps(meta))
        return True

    def remove_stream(self, stream_id):
        with self.buffer_locked(stream_id):
            self._remove(self.stream_dir(stream_id))

    def _remove(self, path):
        """Move to the trash in one step (the disk no longer holds it, even
        if we crash now), then delete. The trash is emptied on start."""
        self.ensure()
        doomed = os.path.join(self.trash, uuid.uuid4().hex)
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return False
        fsync_dir(os.path.dirname(path))
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def append_error(self, stream_id, text, max_size):
        """Append to errors.log; one that would grow past `max_size` bytes
        becomes errors.log.1 first (the one before is dropped), so a stream
        keeps at most about twice that."""
        path = os.path.join(self.stream_dir(stream_id), 'errors.log')
        try:
            if os.path.getsize(path) + len(text.encode('utf-8')) > max_size:
                os.replace(path, path + '.1')
        except FileNotFoundError:
            pass
        with open(path, 'a', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def read_errors(self, stream_id):
        try:
            return read_text(os.path.join(self.stream_dir(stream_id),
                                           'errors.log'))
        except FileNotFoundError:
            return ''

    # frames and checkpoints

    def append_frames(self, stream_id, files, max_files, recorded):
        """Append decoded `files` {name: bytes, or an iterator of bytes
        written as it comes} to the buffer (page cache only: the commit
        fsyncs); the buffer holds at most `max_files` files (TooManyFiles).
        The buffer is what `recorded` says (sizes {name: bytes} as counted
        in Redis): bytes past it (a frame whose count never reached Redis:
        its worker killed, its reply lost) are cut off first; BufferLost if
        it is shorter. All or nothing: on any failure (also one the
        iterator raises) the buffer is cut back to where it was. Returns
        the buffer's sizes with this frame."""
        folder = self.buffer_dir(stream_id)
        sizes = dict(recorded)
        touched = {}
        try:
            for name, data in files.items():
                path = os.path.join(folder, name)
                want = recorded.get(name, 0)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                except FileNotFoundError:
                    if want:
                        raise BufferLost(stream_id, name) from None
                    fd = self._new_buffer_file(stream_id, path, max_files)
                try:
                    have = os.fstat(fd).st_size
                    if have < want:
                        raise BufferLost(stream_id, name)
                    # On failure: cut back, or removed if Redis knew none.
                    touched[name] = want if name in recorded else None
                    if have > want:
                        os.ftruncate(fd, want)
                    written = 0
                    for piece in [data] if isinstance(data, bytes) else data:
                        view = memoryview(piece)
                        written += len(view)
                        while view:
                            view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                sizes[name] = want + written
        except BaseException:
            self.truncate_buffer(stream_id, touched)
            raise
        return sizes

    def trim_buffer(self, stream_id, recorded, keep=True):
        """Make the buffer exactly what Redis counted: files it does not
        know are removed, longer ones cut; BufferLost if one is short. An
        empty count with `keep` false leaves no buffer folder."""
        if not recorded and not keep:
            shutil.rmtree(self.buffer_dir(stream_id), ignore_errors=True)
            return
        self._trim(stream_id, self.buffer_files(stream_id), recorded)

    def _trim(self, stream_id, names, recorded):
        """`trim_buffer` of the listed `names`; returns those kept."""
        folder = self.buffer_dir(stream_id)
        kept = []
        for name in names:
            path = os.path.join(folder, name)
            if name not in recorded:
                unlink(path)
                continue
            size = os.path.getsize(path)
            if size < recorded[name]:
                raise BufferLost(stream_id, name)
            if size > recorded[name]:
                os.truncate(path, recorded[name])
            kept.append(name)
        return kept

    def _new_buffer_file(self, stream_id, path, max_files):
        if not os.path.isdir(self.stream_dir(stream_id)):
            raise FileNotFoundError(self.stream_dir(stream_id))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if len(os.listdir(os.path.dirname(path))) >= max_files:
            raise TooManyFiles('the frames of a checkpoint may have at most '
                               '%d files' % max_files)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                       os.O_EXCL, 0o644)

    def truncate_buffer(self, stream_id, sizes):
        folder = self.buffer_dir(stream_id)
        for name, size in sizes.items():
            path = os.path.join(folder, name)
            if size is None:
                unlink(path)
            else:
                try:
                    os.truncate(path, size)
                except FileNotFoundError:
                    pass

    def buffer_files(self, stream_id):
        try:
            return sorted(os.listdir(self.buffer_dir(stream_id)))
        except FileNotFoundError:
            return []

    def discard_buffer(self, stream_id):
        with self.buffer_locked(stream_id):
            shutil.rmtree(self.buffer_dir(stream_id), ignore_errors=True)

    # The buffer's lock: every writer of a stream's buffer holds it (frames
    # for their append and its record in Redis, checkpoints, deactivations,
    # deletions, the master's repair). An flock of `buffer.lock` in the
    # stream's folder, so it is shared by the worker processes and freed
    # by the kernel when its holder dies.

    BUFFER_WAIT_S = 30.0  # a writer waits this long for the buffer's lock

    def lock_buffer(self, stream_id, wait=BUFFER_WAIT_S):
        """The fd of the held lock (give it to unlock_buffer); None if busy
        and `wait` is 0; BufferBusy if still busy after `wait` seconds;
        FileNotFoundError if the stream is gone. A wait polls rather than
        blocks in the kernel: a disk thread blocked on the lock of a frame
        that needs a disk thread to finish could, with the pool full of
        such waits, never be woken."""
        fd = os.open(os.path.join(self.stream_dir(stream_id), 'buffer.lock'),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        delay = 0.001
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if not wait:
                        os.close(fd)
                        return None
                    if time.monotonic() >= deadline:
                        raise BufferBusy(stream_id) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def unlock_buffer(fd):
        os.close(fd)  # the flock goes with its last fd

    @contextlib.contextmanager
    def buffer_locked(self, stream_id):
        """The buffer's lock held for the block (waits; a stream whose
        folder is gone has no buffer to guard)."""
        try:
            fd = self.lock_buffer(stream_id)
        except FileNotFoundError:
            fd = None
        try:
            yield
        finally:
            if fd is not None:
                self.unlock_buffer(fd)

    def frame_sizes(self, stream_id, names):
        """{name: bytes} of these buffer files, None unless each is a file
        there: a frame of the same files as the one before needs no listing
        of the buffer (a stat each; Redis' record of the buffer's sizes
        tells if other files are there)."""
        folder = self.buffer_dir(stream_id)
        sizes = {}
        for name in names:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
            sizes[name] = st.st_size
        return sizes

    def buffer_sizes(self, stream_id):
        """{name: bytes} of the buffer's files as the disk has them; None
        if there is no buffer folder."""
        folder = self.buffer_dir(stream_id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return None
        return {name: os.path.getsize(os.path.join(folder, name))
                for name in names}

    def _chunk_names(self, stream_id):
        """The names of the committed chunks, unordered."""
        try:
            names = os.listdir(self.chunks_dir(stream_id))
        except FileNotFoundError:
            return []
        return [name for name in names if CHUNK.fullmatch(name)]

    def chunks(self, stream_id):
        """[(seq, nframes, path)] of the committed chunks, in order."""
        folder = self.chunks_dir(stream_id)
        return [(int(name[:10]), int(name[11:]), os.path.join(folder, name))
                for name in sorted(self._chunk_names(stream_id))]

    def newest_chunk(self, stream_id):
        """(seq, path) of the newest chunk, None before the first."""
        names = self._chunk_names(stream_id)
        if not names:
            return None
        name = max(names)  # seqs are zero-padded: the newest sorts last
        return int(name[:10]), os.path.join(self.chunks_dir(stream_id), name)

    def head(self, stream_id):
        """(the newest chunk's seq, the committed frames), 0 and 0 before
        the first: what a checkpoint needs, from one listing and without
        a sorted list of paths (a stream checkpointed for weeks has
        thousands of chunks, and `chunks` took 13 ms at 5,000)."""
        names = self._chunk_names(stream_id)
        if not names:
            return 0, 0
        return int(max(names)[:10]), sum(int(name[11:]) for name in names)

    FEW_CHUNKS = 1000  # a listing of fewer is quick enough for the loop

    def few_chunks(self, stream_id):
        """True if the stream has fewer than FEW_CHUNKS chunks, from its
        chunks folder's link count (one per subfolder, on ext4 and xfs;
        a filesystem that counts otherwise says False): a commit lists
        them (`head`), and takes 5 ms at 10,000."""
        try:
            links = os.stat(self.chunks_dir(stream_id)).st_nlink
        except FileNotFoundError:
            return False
        return 2 <= links < 2 + self.FEW_CHUNKS

    def committed_frames(self, stream_id):
        return self.head(stream_id)[1]

    def committed_bytes(self, stream_id):
        """The bytes of every chunk's frames and state files, as stored:
        the committed total Redis has not counted (after a rebuild, or a
        commit whose record was lost). Stats every file: only then."""
        return sum(size for _, _, path in self.chunks(stream_id)
                   for _, _, size in chunk_files(path))

    def commit(self, stream_id, nframes, state_files, recorded):
        """Make the buffer (holding `nframes` frames, `recorded` sizes) and
        `state_files` {name: str} the stream's newest chunk, crash-safely
        (the protocol at the top). The caller holds the stream's lock and
        its buffer's.
        Returns (the chunk's seq, the stream's committed frames with it);
        (None, the committed frames) if the buffer is empty."""
        chunk = self.build_chunk(stream_id, nframes, state_files, recorded)
        if chunk is None:
            return None, self.committed_frames(stream_id)
        try:
            return self.publish_chunk(chunk)
        finally:
            chunk.close()

    def build_chunk(self, stream_id, nframes, state_files, recorded):
        """The first half of `commit`, in the page cache only (no fsync:
        a caller may run it on the event loop): the chunk built under a
        temporary name; None if the buffer is empty (committed by a
        request whose reply was lost). On failure nothing of it is left.
        The buffer is listed once."""
        names = self.buffer_files(stream_id)
        if not names:
            return None
        names = self._trim(stream_id, names, recorded)
        seq, total = self.head(stream_id)
        chunk = _Chunk(self.chunks_dir(stream_id), seq + 1, nframes,
                       total + nframes)
        os.makedirs(chunk.tmp)  # and chunks/, if a restore left none
        buffer = self.buffer_dir(stream_id)
        try:
            for name in names:
                src = os.path.join(buffer, name)
                dst = os.path.join(chunk.tmp, FRAME + name)
                os.rename(src, dst)
                chunk.moved.append((src, dst))
                chunk.fds.append(os.open(dst, os.O_RDONLY | os.O_CLOEXEC))
            for name, value in state_files.items():
                path = os.path.join(chunk.tmp, STATE + name)
                chunk.fds.append(create_file(path, value, 0o644))
                chunk.written.append(path)
            chunk.fds.append(open_dir(chunk.tmp))
            chunk.fds.append(open_dir(chunk.folder))
        except BaseException:
            chunk.undo()
            raise
        return chunk

    def publish_chunk(self, chunk):
        """The second half of `commit`: the built chunk made durable and
        published (it waits on the disk: a thread's work; its fds stay
        open, `chunk.close()` them). Returns (its seq, the stream's
        committed frames with it); on failure before the rename, the
        buffer is given back."""
        try:
            # Flush 1: the chunk's files and entry are on disk before the
            # rename that publishes it can be.
            self.durable.sync_open(chunk.fds[:-1], [
                dst for _, dst in chunk.moved] + chunk.written + [chunk.tmp])
            os.rename(chunk.tmp, chunk.final)
        except BaseException:
            chunk.undo()
            raise
        # Flush 2: the rename is on disk before Redis counts the frames
        # and the core hears they are safe.
        self.durable.sync_open(chunk.fds[-1:], [chunk.folder])
        return chunk.seq, chunk.total

    def uncommit(self, stream_id, seq):
        """Undo the commit of chunk `seq` (the newest): its frames go back
        to the buffer, the chunk away, as one rename first."""
        with self.buffer_locked(stream_id):
            newest = self.newest_chunk(stream_id)
            if newest is None or newest[0] != seq:
                return False
            folder = self.chunks_dir(stream_id)
            tmp = os.path.join(folder, '.tmp-%s' % uuid.uuid4().hex)
            os.rename(newest[1], tmp)
            fsync_dir(folder)
            restore_frames(tmp, self.buffer_dir(stream_id))
            shutil.rmtree(tmp, ignore_errors=True)
            return True

    def restore_interrupted(self, stream_id):
        """Frames a commit had moved out of the buffer when its process
        died (before the rename) go back to the buffer; its temporary
        chunk is removed. Only while the dead holder's lock is still
        held."""
        folder = self.chunks_dir(stream_id)
        with self.buffer_locked(stream_id):
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                return
            for name in names:
                if name.startswith('.tmp-'):
                    tmp = os.path.join(folder, name)
                    restore_frames(tmp, self.buffer_dir(stream_id))
                    shutil.rmtree(tmp, ignore_errors=True)

    def stream_files(self, stream_id):
        """The seed files with the newest checkpoint's files in place of
        those of the same name (and any extra checkpoint files)."""
        files = _read_files(os.path.join(self.stream_dir(stream_id), 'seed'))
        newest = self.newest_chunk(stream_id)
        if newest is not None:
            files.update((name, read_text(path)) for kind, name, path
                         in chunk_files(newest[1], sizes=False)
                         if kind == STATE)
        return files

    def download_parts(self, stream_id, filename):
        """[(path, size)] of `filename` in every committed chunk, in order;
        None if chunks exist but none has that file."""
        chunks = self.chunks(stream_id)
        parts = []
        for _, _, path in chunks:
            for p in (os.path.join(path, FRAME + filename),
                      os.path.join(path, 'frames', filename)):  # old layout
                try:
                    parts.append((p, os.path.getsize(p)))
                    break
                except FileNotFoundError:
                    pass
        if chunks and not parts:
            return None
        return parts

    # recovery

    def clean_garbage(self):
        """Remove what no committed state refers to: the trash, temporary
        directories, buffers of streams that were active. Only at start,
        before anything serves."""
        self.ensure()
        shutil.rmtree(self.trash, ignore_errors=True)
        os.makedirs(self.trash)
        for parent in (self.targets, self.streams):
            for name in os.listdir(parent):
                if name.startswith('.tmp-'):
                    shutil.rmtree(os.path.join(parent, name),
                                  ignore_errors=True)
        for sid in self.stream_ids():
            shutil.rmtree(self.buffer_dir(sid), ignore_errors=True)
            folder = self.stream_dir(sid)
            for name in os.listdir(folder):
                if '.tmp-' in name:  # an interrupted stream.json rewrite
                    unlink(os.path.join(folder, name))
            chunks = self.chunks_dir(sid)
            if os.path.isdir(chunks):
                for name in os.listdir(chunks):
                    if name.startswith('.tmp-'):
                        shutil.rmtree(os.path.join(chunks, name),
                                      ignore_errors=True)

    def target_ids(self):
        return _names(self.targets)

    def stream_ids(self):
        return _names(self.streams)


class _Chunk:
    """A chunk being built: its temporary folder, the buffer files moved
    into it (src, dst), the state files written there, and fds open on
    what its flushes need (its files, its folder, chunks/)."""

    def __init__(self, folder, seq, nframes, total):
        self.folder, self.seq, self.total = folder, seq, total
        self.final = os.path.join(folder, '%010d-%d' % (seq, nframes))
        self.tmp = os.path.join(folder, '.tmp-%s' % uuid.uuid4().hex)
        self.moved = []
        self.written = []
        self.fds = []

    def close(self):
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def undo(self):
        """Give the buffer its files back (for a retry), drop the rest."""
        self.close()
        for src, dst in self.moved:
            try:
                os.rename(dst, src)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


class BufferBusy(Exception):
    """The buffer's lock stayed taken past the wait."""

    def __init__(self, stream_id):
        super().__init__('the buffer of stream %s stayed busy' % stream_id)


class BufferLost(Exception):
    """The buffer on disk is shorter than Redis counted: it cannot be
    committed (the activation is ended)."""

    def __init__(self, stream_id, name):
        super().__init__('buffer file %s of stream %s is shorter than '
                         'counted' % (name, stream_id))


def chunk_files(chunk, sizes=True):
    """[(FRAME or STATE, name, path or size)] of the files of a chunk
    folder, sorted by name within a kind; the size of each if `sizes`,
    else its path. Chunks made before 2026-12 keep frames/<name>,
    state/<name> and a meta.json instead (read alike)."""
    out: list[tuple[str, str, int | str]] = []
    for kind, old in ((FRAME, 'frames'), (STATE, 'state')):
        for folder, prefix in ((chunk, kind), (os.path.join(chunk, old), '')):
            try:
                with os.scandir(folder) as entries:
                    found = sorted((e.name[len(prefix):], e) for e in entries
                                   if e.name.startswith(prefix)
                                   and e.is_file())
            except FileNotFoundError:
                continue
            out.extend((kind, name, e.stat().st_size if sizes else e.path)
                       for name, e in found)
    return out


def restore_frames(chunk, buffer):
    """Move the frames of an uncommitted `chunk` folder back to `buffer`
    (a name already back there wins)."""
    files = [(name, path) for kind, name, path
             in chunk_files(chunk, sizes=False) if kind == FRAME]
    if files:
        os.makedirs(buffer, exist_ok=True)
    for name, path in files:
        if not os.path.exists(os.path.join(buffer, name)):
            os.rename(path, os.path.join(buffer, name))


def encode_sizes(sizes):
    """The buffer's sizes as kept in the stream's Redis hash."""
    return ';'.join('%s=%d' % item for item in sorted(sizes.items()))


def decode_sizes(text):
    if not text:
        return {}
    return {name: int(size) for name, size in
            (item.split('=') for item in text.split(';'))}
