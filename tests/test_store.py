"""The embedded Redis a server owns, and the server process tree: started
with AOF on, stopped on shutdown, nothing left behind."""
import os
import signal
import socket
import unittest
import uuid
import warnings

import redis
from server import processes, store
from server.processes import alive
from tools.testing import ServerProcess, free_port, tmpdir, wait_for


def children_of(pid):
    """Live direct children of `pid`."""
    return processes.live_pids(processes.PARENT, pid)


def mode(path):
    return os.stat(path).st_mode & 0o777


class TestEmbeddedRedis(unittest.TestCase):

    def test_lifecycle_with_aof(self):
        folder = tmpdir('redis')
        server = store.RedisServer(folder, free_port(), requirepass='s3cret',
                                   appendfilename='x.aof')
        server.start()
        try:
            client = redis.Redis.from_url(server.url)
            self.assertEqual(client.config_get('appendonly')['appendonly'],
                             'yes')
            # Written before each reply; fsynced by its owner (AOFSync)
            self.assertEqual(client.config_get('appendfsync')['appendfsync'],
                             'no')
            synced = server.aof_sync.synced
            client.set('k', 'v')
            wait_for(lambda: server.aof_sync.synced > synced,
                     'the AOF fsynced by its owner', timeout=10)
            with self.assertRaises(redis.AuthenticationError):
                redis.Redis(port=server.port).set('a', 'b')
            client.close()
        finally:
            server.stop()
        self.assertFalse(alive(server.process.pid))
        self.assertTrue(os.path.exists(os.path.join(folder, 'x.aof')))
        # The data survives a restart (AOF replayed).
        again = store.RedisServer(folder, free_port(), requirepass='s3cret',
                                  appendfilename='x.aof').start()
        try:
            self.assertEqual(redis.Redis.from_url(again.url).get('k'), b'v')
        finally:
            again.stop()

    def test_aof_sync_syncs_what_changed_and_a_rewrite(self):
        """Each pass fsyncs the AOF files that changed since the last one,
        and their folder when one is new (a rewrite renames it in)."""
        folder = tmpdir('aof')
        path = os.path.join(folder, 'appendonly.aof')
        sync = store.AOFSync(folder, 'appendonly.aof')
        with open(path, 'wb') as f:
            f.write(b'*1\r\n$4\r\nPING\r\n')
        for name in ('redis.log', 'temp-rewriteaof-bg-9.aof'):
            with open(os.path.join(folder, name), 'w') as f:
                f.write('not the AOF (a rewrite syncs its own output)')
        self.assertEqual(sync.sync(), 1)
        self.assertEqual(sync.sync(), 0)  # nothing new
        with open(path, 'ab') as f:
            f.write(b'more')
        self.assertEqual(sync.sync(), 1)
        tmp = os.path.join(folder, 'temp-rewriteaof-bg-1.aof')
        with open(tmp, 'wb') as f:
            f.write(b'rewritten')
        os.rename(tmp, path)
        self.assertEqual(sync.sync(), 1)
        # Redis 7 keeps its AOF files under appendonlydir
        os.mkdir(os.path.join(folder, 'appendonlydir'))
        with open(os.path.join(folder, 'appendonlydir',
                               'appendonly.aof.1.incr.aof'), 'wb') as f:
            f.write(b'x')
        self.assertEqual(sync.sync(), 1)
        self.assertEqual(sync.synced, 4)

    def test_requires_a_generated_password_kept_private(self):
        """No password configured: one is generated into a 0600 file in
        the 0700 Redis folder, never shown on a command line, and a
        client without it can do nothing (not SET a manager token, not
        CONFIG SET)."""
        folder = tmpdir('redis')
        server = store.RedisServer(folder, free_port()).start()
        try:
            stranger = redis.Redis(port=server.port)
            for command in (('SET', 'manager_token:x', 'me@x.org'),
                            ('CONFIG', 'SET', 'dir', '/tmp')):
                with self.assertRaises(redis.AuthenticationError):
                    stranger.execute_command(*command)
            self.assertTrue(redis.Redis.from_url(server.url).ping())
            path = os.path.join(folder, 'password')
            with open(path) as f:
                self.assertEqual(f.read().strip(), server.password)
            self.assertGreaterEqual(len(server.password), 32)
            with open('/proc/%d/cmdline' % server.process.pid, 'rb') as f:
                self.assertNotIn(server.password.encode(), f.read())
            for name in ('password', 'appendonly.aof', 'redis.log'):
                self.assertEqual(mode(os.path.join(folder, name)), 0o600,
                                 name)
            self.assertEqual(mode(folder), 0o700)
        finally:
            server.stop()
        # The same password on the next start (clients keep working).
        self.assertEqual(store.RedisServer(folder, free_port()).password,
                         server.password)

    def test_a_burst_waits_for_a_connection(self):
        """More requests in flight than connections queue, not fail."""
        import asyncio
        server = store.RedisServer(tmpdir('redis'), free_port()).start()

        async def burst():
            client = store.connect(server.url, max_connections=4)
            try:
                return await asyncio.gather(*(
                    client.blpop('nothing', timeout=0.1) for _ in range(40)))
            finally:
                await client.aclose()
        try:
            self.assertEqual(asyncio.run(burst()), [None] * 40)
        finally:
            server.stop()

    def test_binary_lookup(self):
        self.assertEqual(store.find_redis_binary('/x/redis-server'),
                         '/x/redis-server')
        self.assertTrue(os.access(store.find_redis_binary(), os.X_OK))

    def test_stale_server_of_a_killed_owner_is_replaced(self):
        folder = tmpdir('redis')
        port = free_port()
        first = store.RedisServer(folder, port).start()
        # Pretend the owner died without stopping it: a new owner takes over.
        second = store.RedisServer(folder, port).start()
        try:
            self.assertTrue(wait_for(lambda: first.process.poll()
                                       is not None))
            self.assertTrue(redis.Redis(port=port,
                                        password=second.password).ping())
        finally:
            second.stop()

    def test_start_failure_is_reported(self):
        busy = store.RedisServer(tmpdir('redis'), free_port()).start()
        try:
            clash = store.RedisServer(tmpdir('redis'), busy.port)
            with self.assertRaises(RuntimeError):
                clash.start(timeout=10)
        finally:
            busy.stop()


class TestServerProcessTree(unittest.TestCase):
    """SIGTERM stops workers, then Redis, exit 0; nothing is orphaned."""

    def check_clean_stop(self, server):
        redis_pid = server.redis_pid()
        self.assertTrue(redis_pid and alive(redis_pid))
        workers = children_of(server.process.pid)
        self.assertIn(redis_pid, workers)
        self.assertEqual(server.stop(), 0, server.read_log())
        for pid in workers:
            self.assertTrue(wait_for(lambda pid=pid: not alive(pid)),
                            'pid %d left behind' % pid)
        # Its start, requests and stop printed no warning (a synchronous
        # Retry given to the asyncio client used to, in every worker).
        self.assertNotIn('Warning', server.read_log())

    def test_single_process_sigterm(self):
        server = ServerProcess('cc').start()
        self.check_clean_stop(server)

    def test_multi_process_sigterm(self):
        server = ServerProcess('ws', command_centers={}, num_processes=2)
        server.start()
        workers = [p for p in children_of(server.process.pid)
                   if p != server.redis_pid()]
        self.assertEqual(len(workers), 2)
        for _ in range(10):
            self.assertEqual(server.request('GET', '/').status_code, 200)
        # A worker that dies is replaced.
        os.kill(workers[0], signal.SIGKILL)
        self.assertTrue(wait_for(lambda: len(
            [p for p in children_of(server.process.pid)
             if p != server.redis_pid() and alive(p)]) == 2
            and workers[0] not in children_of(server.process.pid)))
        self.assertEqual(server.request('GET', '/').status_code, 200)
        self.check_clean_stop(server)

    def test_data_is_private_to_the_server_user(self):
        """AOF, Redis folder, stream folders: 0600 files, 0700 folders."""
        server = ServerProcess('ws', command_centers={'cc': {
            'url': '127.0.0.1:1', 'pass': 'test-cc-pass'}}).start()
        try:
            r = server.request('POST', '/streams', {
                'target_id': str(uuid.uuid4()),
                'stream_files': {'state.xml': 's'},
                'target_files': {'system.xml': 'x'}}, token='test-cc-pass')
            self.assertEqual(r.status_code, 200, r.text)
            data = server.settings.data_folder
            self.assertEqual(mode(data), 0o700)
            for root, dirs, files in os.walk(data):
                for d in dirs:
                    self.assertEqual(mode(os.path.join(root, d)), 0o700,
                                     os.path.join(root, d))
                for f in files:
                    self.assertEqual(mode(os.path.join(root, f)), 0o600,
                                     os.path.join(root, f))
            self.assertIn('appendonly.aof', os.listdir(
                os.path.join(data, 'redis')))
        finally:
            server.stop()

    def test_killed_owner_takes_its_redis_along(self):
        server = ServerProcess('cc').start()
        redis_pid = server.redis_pid()
        server.kill(with_redis=False)
        self.assertTrue(wait_for(lambda: not alive(redis_pid)),
                        'redis-server outlived its killed owner')


class TestConnect(unittest.TestCase):

    def test_no_warning(self):
        """The asyncio clients get an asyncio Retry: no conversion warning
        at each server start."""
        for url in ('redis://127.0.0.1:1/0', 'redis+sentinel://h1,h2/hub'):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter('always')
                store.connect(url)
            self.assertEqual([str(w.message) for w in seen], [], url)


class TestSentinelURL(unittest.TestCase):

    def test_parse(self):
        self.assertEqual(
            store.parse_sentinel_url(
                'redis+sentinel://u:p%40ss@h1,h2:26380,[::1]:7/hub/3'
                '?sentinel_password=sp'),
            ([('h1', 26379), ('h2', 26380), ('::1', 7)], 'hub',
             {'db': 3, 'username': 'u', 'password': 'p@ss'}, 'sp'))
        self.assertEqual(
            store.parse_sentinel_url('redis+sentinel://h/hub'),
            ([('h', 26379)], 'hub',
             {'db': 0, 'username': None, 'password': None}, None))
        for bad in ('redis://h/0', 'redis+sentinel://h', 'redis+sentinel://h/',
                    'redis+sentinel://h/hub/x', 'redis+sentinel://h:p/hub',
                    'redis+sentinel://h,/hub', 'redis+sentinel://h/a/1/2',
                    'redis+sentinel://h/hub?colour=red'):
            with self.assertRaises(ValueError, msg=bad):
                store.parse_sentinel_url(bad)

    def test_base_conf_stays_untouched(self):
        """CONFIG REWRITE (Sentinel sends it) writes the server's own copy
        of the base configuration."""
        with open(store.BASE_CONF) as f:
            base = f.read()
        server = store.RedisServer(tmpdir('redis'), free_port()).start()
        try:
            client = redis.Redis.from_url(server.url)
            client.config_set('maxmemory-policy', 'noeviction')
            client.config_rewrite()
            client.close()
        finally:
            server.stop()
        with open(store.BASE_CONF) as f:
            self.assertEqual(f.read(), base)
        with open(os.path.join(server.folder, 'redis.conf')) as f:
            self.assertIn('CONFIG REWRITE', f.read())


class TestFreePort(unittest.TestCase):
    """The ports the tests and the demo give their servers come from below
    the kernel's ephemeral range, so no outgoing connection can take one
    between its choice and the server's bind (a restored WS's Redis once
    lost its port so), and a process never gets one twice."""

    def test_below_the_ephemeral_range_and_never_twice(self):
        low = store._ephemeral_low()
        ports = [store.free_port() for _ in range(200)]
        self.assertEqual(len(set(ports)), len(ports))
        for port in ports:
            self.assertGreaterEqual(port, store.FIRST_PORT)
            self.assertLess(port, low)

    def test_a_port_in_use_is_skipped(self):
        taken = store.free_port() + 1  # the next one in turn
        s = socket.socket()
        try:
            s.bind(('127.0.0.1', taken))
            s.listen()
            self.assertNotEqual(store.free_port(), taken)
        finally:
            s.close()
