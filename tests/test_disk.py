"""disk.GroupSync: the group commit of checkpoints."""
import asyncio
import os
import shutil
import tempfile
import threading
import unittest

from server import disk, threads
from server.ws.storage import BufferBusy, Storage


class SlowStep(disk.GroupSync):
    """Counts its steps; the first one waits until `release` is set."""

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        self.entered, self.release = threading.Event(), threading.Event()
        self.synced = []

    def _step(self, paths):
        self.synced.append(sorted(paths))
        self.entered.set()
        self.release.wait(10)
        super()._step(paths)


def in_threads(n, fn):
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


class TestGroupSync(unittest.TestCase):

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, True)

    def file(self, i):
        path = os.path.join(self.root, 'f%d' % i)
        disk.write_file(path, b'x', sync=False)
        return path

    def test_callers_due_together_share_one_step(self):
        """While a flush runs, whatever is queued goes into the next one:
        eight checkpoints due together cost two steps, not eight."""
        group = SlowStep(self.root)
        first = in_threads(1, lambda i: group.sync([self.file(99)]))
        self.assertTrue(group.entered.wait(10))
        errors = []

        def sync(i):
            try:
                group.sync([self.file(i)])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
        rest = in_threads(7, sync)
        while len(group._queue) < 7:
            threading.Event().wait(0.01)
        group.release.set()
        for t in first + rest:
            t.join(10)
        self.assertEqual(errors, [])
        self.assertEqual(group.steps, 2)
        self.assertEqual(group.synced[1], sorted(
            os.path.join(self.root, 'f%d' % i) for i in range(7)))

    def test_a_failed_step_fails_every_caller_of_it(self):
        group = disk.GroupSync(self.root)

        def broken(paths):
            raise OSError(5, 'Input/output error')
        group._step = broken
        with self.assertRaises(OSError):
            group.sync([self.file(1)])
        del group._step
        group.sync([self.file(2)])  # the thread lives on

    def test_without_syncfs_each_path_is_fsynced_once(self):
        group = disk.GroupSync(self.root, use_syncfs=False)
        synced = []
        real = os.fsync

        def fsync(fd):
            synced.append(os.readlink('/proc/self/fd/%d' % fd))
            real(fd)
        os.fsync = fsync
        try:
            f = self.file(1)
            group.sync([f, self.root, f, self.root])
        finally:
            os.fsync = real
        self.assertEqual(synced, [f, self.root])  # files before folders


class TestCheckpointFlushes(unittest.TestCase):

    def commit(self, flush):
        """(group steps, fsync calls) of one commit of two frame files and
        two state files."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        storage = Storage(root, flush)
        storage.create_stream('s', {'target_id': 't', 'creation_date': 0,
                                    'status': 'OK', 'error_count': 0}, {})
        sizes = storage.append_frames('s', {'a.xtc': b'12', 'b.dcd': b'3'},
                                      10, {})
        calls = []
        real = os.fsync
        os.fsync = lambda fd: calls.append(fd) or real(fd)
        try:
            seq, total = storage.commit('s', 1, {'s1': 'x', 's2': 'y'},
                                        sizes)
        finally:
            os.fsync = real
        self.assertEqual((seq, total), (1, 1))
        self.assertEqual(storage.chunks('s')[0][:2], (1, 1))
        self.assertEqual(storage.stream_files('s'), {'s1': 'x', 's2': 'y'})
        return storage.durable.steps, len(calls)

    def test_a_checkpoint_costs_two_group_steps(self):
        """One before the rename that publishes the chunk, one after. With
        fsync: each file (2 frames, 2 states), the chunk's folder, then
        chunks/; with syncfs: no fsync at all."""
        self.assertEqual(self.commit('fsync'), (2, 6))
        if disk._SYNCFS is not None:
            self.assertEqual(self.commit('syncfs'), (2, 0))


class TestOldChunkLayout(unittest.TestCase):
    """Chunks made before 2026-12 (frames/, state/, meta.json) are read
    like the flat ones: downloads, restarts, byte counts, rollbacks."""

    def test_old_and_new_chunks_read_alike(self):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        storage = Storage(root)
        storage.create_stream('s', {'target_id': 't', 'creation_date': 0,
                                    'status': 'OK', 'error_count': 0},
                              {'state.xml': 'seed', 'system.xml': 'sys'})
        old = os.path.join(storage.chunks_dir('s'), '%010d-2' % 1)
        for sub, name, data in (('frames', 'f.xtc', 'ab'),
                                ('state', 'state.xml', 'S1')):
            os.makedirs(os.path.join(old, sub), exist_ok=True)
            with open(os.path.join(old, sub, name), 'w') as f:
                f.write(data)
        with open(os.path.join(old, 'meta.json'), 'w') as f:
            f.write('{"frames": 2}')
        self.assertEqual(storage.stream_files('s'),
                         {'state.xml': 'S1', 'system.xml': 'sys'})
        self.assertEqual(storage.committed_bytes('s'), 4)
        sizes = storage.append_frames('s', {'f.xtc': b'cde'}, 10, {})
        self.assertEqual(storage.commit('s', 1, {'state.xml': 'S2'}, sizes),
                         (2, 3))
        self.assertEqual(storage.stream_files('s'),
                         {'state.xml': 'S2', 'system.xml': 'sys'})
        self.assertEqual([size for _, size in
                          storage.download_parts('s', 'f.xtc')], [2, 3])
        self.assertEqual(storage.committed_bytes('s'), 9)
        # Rolled back, an old chunk's frames go back to the buffer too.
        self.assertTrue(storage.uncommit('s', 2))
        self.assertEqual(storage.buffer_sizes('s'), {'f.xtc': 3})
        storage.discard_buffer('s')
        self.assertTrue(storage.uncommit('s', 1))
        self.assertEqual(storage.buffer_sizes('s'), {'f.xtc': 2})
        self.assertEqual(storage.chunks('s'), [])


class TestNoChunksFolder(unittest.TestCase):

    def test_a_stream_without_its_chunks_folder_commits(self):
        """A backup of a stream with no chunk restores no chunks/ folder:
        its first commit makes one."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        storage = Storage(root)
        storage.create_stream('s', {'target_id': 't', 'creation_date': 0,
                                    'status': 'OK', 'error_count': 0}, {})
        os.rmdir(storage.chunks_dir('s'))
        self.assertFalse(storage.few_chunks('s'))
        sizes = storage.append_frames('s', {'f.xtc': b'ab'}, 10, {})
        self.assertEqual(storage.commit('s', 1, {'state.xml': 'S'}, sizes),
                         (1, 1))
        self.assertEqual(storage.stream_files('s'), {'state.xml': 'S'})


class TestBufferLock(unittest.TestCase):
    """The buffer's flock: one holder at a time across fds (as across
    processes); a waiter polls for a bounded time."""

    def test_one_holder_and_a_bounded_wait(self):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        storage = Storage(root)
        storage.create_stream('s', {'target_id': 't', 'creation_date': 0,
                                    'status': 'OK', 'error_count': 0}, {})
        held = storage.lock_buffer('s')
        self.assertIsNone(storage.lock_buffer('s', wait=0))
        with self.assertRaises(BufferBusy):
            storage.lock_buffer('s', wait=0.05)
        storage.unlock_buffer(held)
        storage.unlock_buffer(storage.lock_buffer('s', wait=0))
        with self.assertRaises(FileNotFoundError):
            storage.lock_buffer('gone')


class TestThenFrees(unittest.TestCase):
    """threads.Pool.then frees what the thread uses only once the thread
    is done with it, also when its caller is cancelled first."""

    def test_a_cancelled_caller_frees_after_the_thread(self):
        pool = threads.Pool(2, 'test')
        self.addCleanup(lambda: pool.executor and pool.executor.shutdown())
        release, freed = threading.Event(), []

        def work():
            release.wait(10)
            return 'done'

        async def main():
            self.assertEqual(await pool.then(lambda: freed.append('a'),
                                             lambda: 'quick'), 'quick')
            self.assertEqual(freed, ['a'])
            task = asyncio.ensure_future(
                pool.then(lambda: freed.append('b'), work))
            await asyncio.sleep(0.1)
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task
            self.assertEqual(freed, ['a'])  # the thread still works
            release.set()
            for _ in range(100):
                if len(freed) == 2:
                    break
                await asyncio.sleep(0.01)
            self.assertEqual(freed, ['a', 'b'])
        asyncio.run(main())
