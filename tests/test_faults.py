"""Faults of the store under real server processes: a paused Redis (every
request answers a JSON 503 with Retry-After within the timeouts, none
hangs), a killed Redis (503, never 500, while the master starts it again
from its AOF; service resumes by itself), a Redis that comes back empty
(the WS indexes its disk again), and `redis_url` in full (unix socket,
password, db) on the hot path too."""
import os
import signal
import subprocess
import time
import unittest
import uuid

from server import store
from server.processes import alive
from tools.testing import CC_PASS as PASS
from tools.testing import (
    ServerProcess,
    b64,
    command_centers,
    free_port,
    tmpdir,
    wait_for,
)

CCS = command_centers()
FAST = {'redis_timeout_in_s': 1.0, 'redis_connect_timeout_in_s': 1.0}


def no_tracebacks(test, server):
    log = server.read_log()
    test.assertNotIn('Traceback', log)
    test.assertNotIn('uncaught exception', log)


class WSFixture:
    """A WS process with one target, one stream and a core on it."""

    def start_ws(self, **values):
        conf = dict(FAST, command_centers=CCS)
        conf.update(values)
        self.ws = ServerProcess('ws', **conf).start()
        self.addCleanup(self.ws.kill)
        self.tid = str(uuid.uuid4())
        r = self.ws.request('POST', '/streams', {
            'target_id': self.tid, 'stream_files': {'state.xml': 's0'},
            'target_files': {'system.xml': 'sys'}}, token=PASS)
        self.assertEqual(r.status_code, 200, r.text)
        self.sid = r.json()['stream_id']
        r = self.ws.request('POST', '/streams/activate',
                            {'target_id': self.tid}, token=PASS)
        self.assertEqual(r.status_code, 200, r.text)
        self.token = r.json()['token']
        self.assertEqual(self.frame(b'one').status_code, 200)
        self.assertEqual(self.ws.request('PUT', '/core/checkpoint', {
            'files': {'state.xml': 's1'}}, token=self.token).status_code, 200)

    def frame(self, data):
        return self.ws.request('PUT', '/core/frame', {
            'files': {'frames.xtc.b64': b64(data)}}, token=self.token)

    def assert_store_down(self, r):
        self.assertEqual(r.status_code, 503, r.text)
        self.assertIn('error', r.json())
        self.assertTrue(r.headers.get('Retry-After', '').isdigit())

    def every_kind_of_request(self):
        """One request of each kind: health, CC call, core call."""
        return [self.ws.request('GET', '/'),
                self.ws.request('GET', '/streams/info/' + self.sid,
                                token=PASS),
                self.ws.request('POST', '/streams/activate',
                                {'target_id': self.tid}, token=PASS),
                self.frame(b'during'),
                self.ws.request('POST', '/core/heartbeat', {},
                                token=self.token)]


class TestRedisPaused(WSFixture, unittest.TestCase):

    def test_paused_redis_is_503_not_a_hang_then_resumes(self):
        self.start_ws(num_processes=2)
        pid = self.ws.redis_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            for r in self.every_kind_of_request():  # each bounded (30 s)
                self.assert_store_down(r)
            self.assertIn('store down', self.ws.request('GET', '/')
                          .json()['error'])
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: self.ws.request('GET', '/').status_code == 200,
                 'health after SIGCONT')
        self.assertEqual(self.frame(b'two').status_code, 200)
        self.assertEqual(self.ws.request('GET', '/streams/%s/frames.xtc'
                                         % self.sid, token=PASS).content,
                         b'one')
        no_tracebacks(self, self.ws)

    def test_paused_redis_of_the_cc(self):
        cc = ServerProcess('cc', **FAST).start()
        self.addCleanup(cc.kill)
        pid = cc.redis_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            for r in (cc.request('GET', '/'),
                      cc.request('GET', '/ws/status'),
                      cc.request('POST', '/core/assign', {
                          'engine': 'openmm', 'engine_version': '8'})):
                self.assert_store_down(r)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: cc.request('GET', '/').status_code == 200,
                 'CC health after SIGCONT')
        no_tracebacks(self, cc)


class TestRedisKilled(WSFixture, unittest.TestCase):

    def test_killed_redis_is_restarted_from_its_aof(self):
        self.start_ws()
        pid = self.ws.redis_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 'redis gone')
        codes = set()

        def back():
            r = self.ws.request('GET', '/')
            codes.add(r.status_code)
            return r.status_code == 200
        wait_for(back, 'the master to restart redis')
        self.assertLessEqual(codes, {200, 503})
        self.assertNotEqual(self.ws.redis_pid(), pid)
        # The AOF had everything: the core goes on with its token.
        self.assertEqual(wait_for(lambda: self.frame(b'two').status_code
                                  != 503 and self.frame(b'two')).status_code,
                         200)
        self.assertEqual(self.ws.request('PUT', '/core/checkpoint', {
            'files': {'state.xml': 's2'}}, token=self.token).status_code, 200)
        self.assertEqual(self.ws.request('GET', '/streams/%s/frames.xtc'
                                         % self.sid, token=PASS).content,
                         b'onetwo')
        self.assertIn('restarted from its AOF', self.ws.read_log())
        no_tracebacks(self, self.ws)

    def test_frames_told_kept_while_its_fsyncs_are_slow_survive(self):
        """A Redis killed while its disk is slow keeps every write it
        acknowledged. Redis' own `appendfsync everysec` postpones its AOF
        writes (up to 2 s) while a background fsync runs, and answers
        meanwhile: a kill then lost the record of a frame the core was
        told was kept, the next frame cut it from the buffer, and the
        checkpoint committed a trajectory with a hole. strace holds each
        fsync of Redis for 3 s (a slow disk)."""
        self.start_ws()
        pid = self.ws.redis_pid()
        slow = subprocess.Popen(
            ['strace', '-f', '-qq', '-o', '/dev/null', '-p', str(pid),
             '-e', 'trace=fsync,fdatasync',
             '-e', 'inject=fsync,fdatasync:delay_enter=3000000'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(slow.kill)
        time.sleep(1.5)  # attached; a second since Redis' last fsync
        self.assertEqual(self.frame(b'two').status_code, 200)  # fsync due
        time.sleep(0.3)
        self.assertEqual(self.frame(b'three').status_code, 200)
        os.kill(pid, signal.SIGKILL)
        slow.kill()
        wait_for(lambda: not alive(pid), 'redis gone')
        four = wait_for(lambda: (r := self.frame(b'four')).status_code
                        != 503 and r, 'redis back')
        self.assertEqual(four.status_code, 200, four.text)
        self.assertEqual(self.ws.request('PUT', '/core/checkpoint', {
            'files': {'state.xml': 's2'}}, token=self.token).status_code, 200)
        self.assertEqual(self.ws.request('GET', '/streams/%s/frames.xtc'
                                         % self.sid, token=PASS).content,
                         b'onetwothreefour')
        no_tracebacks(self, self.ws)

    def test_every_request_while_redis_is_dead_is_503(self):
        self.start_ws()
        # Keep the master from restarting it for a moment: stop the
        # master, kill redis, ask, then let the master go on.
        os.kill(self.ws.process.pid, signal.SIGSTOP)
        pid = self.ws.redis_pid()
        try:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alive(pid), 'redis gone')
            for r in self.every_kind_of_request():
                self.assert_store_down(r)
        finally:
            os.kill(self.ws.process.pid, signal.SIGCONT)
        wait_for(lambda: self.ws.request('GET', '/').status_code == 200,
                 'restart')
        no_tracebacks(self, self.ws)

    def test_redis_back_empty_the_ws_indexes_its_disk_again(self):
        self.start_ws()
        self.assertEqual(self.frame(b'lost').status_code, 200)  # buffered
        folder = os.path.join(self.ws.settings.data_folder, 'redis')
        pid = self.ws.redis_pid()
        os.kill(self.ws.process.pid, signal.SIGSTOP)
        try:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alive(pid), 'redis gone')
            for name in os.listdir(folder):
                if 'aof' in name or name.endswith('.rdb'):
                    os.unlink(os.path.join(folder, name))
        finally:
            os.kill(self.ws.process.pid, signal.SIGCONT)

        def info():
            r = self.ws.request('GET', '/streams/info/' + self.sid,
                                token=PASS)
            return r.status_code == 200 and r.json()
        found = wait_for(info, 'the stream indexed again')
        self.assertEqual((found['frames'], found['active']), (1, False))
        # The forgotten token is dead, its buffer gone; the stream is
        # back in its queue with its committed frames.
        self.assertEqual(self.frame(b'x').status_code, 401)
        r = self.ws.request('POST', '/streams/activate',
                            {'target_id': self.tid}, token=PASS)
        self.assertEqual((r.status_code, r.json()['stream_id']),
                         (200, self.sid))
        token = r.json()['token']
        self.ws.request('PUT', '/core/frame', {'files': {
            'frames.xtc.b64': b64(b'two')}}, token=token)
        self.ws.request('PUT', '/core/checkpoint', {'files': {
            'state.xml': 's2'}}, token=token)
        self.assertEqual(self.ws.request('GET', '/streams/%s/frames.xtc'
                                         % self.sid, token=PASS).content,
                         b'onetwo')
        self.assertIn('indexing the disk again', self.ws.read_log())
        no_tracebacks(self, self.ws)


class TestRedisURL(WSFixture, unittest.TestCase):
    """An existing Redis named by redis_url, reached the way the URL says
    by every connection (the hot path's frames and checkpoints too)."""

    def own_redis(self, **kw):
        server = store.RedisServer(tmpdir('redis'), free_port(), **kw)
        server.start()
        self.addCleanup(server.stop)
        return server

    def check_works_and_lands_in(self, client, db_keys):
        self.assertEqual(self.frame(b'two').status_code, 200)
        self.assertEqual(self.ws.request('PUT', '/core/checkpoint', {
            'files': {'state.xml': 's2'}}, token=self.token).status_code, 200)
        info = self.ws.request('GET', '/streams/info/' + self.sid,
                               token=PASS).json()
        self.assertEqual(info['frames'], 2)
        key = 'wsd:%s:stream:%s' % (self.ws.name, self.sid)
        self.assertEqual(client.hget(key, 'frames'), '2')
        self.assertEqual(db_keys(), 0)

    def test_unix_socket_and_db(self):
        sock = os.path.join(tmpdir('sock'), 'redis.sock')
        server = self.own_redis(unixsocket=sock)
        url = 'unix://:%s@%s?db=%%d' % (server.password, sock)
        self.start_ws(redis_url=url % 3, redis_options=None)
        client = store.connect_sync(url % 3)
        db0 = store.connect_sync(url % 0)
        self.check_works_and_lands_in(client, db0.dbsize)
        self.assertTrue(server.process.poll() is None)

    def test_password_and_db(self):
        server = self.own_redis(requirepass='pw-%s' % uuid.uuid4().hex)
        url = 'redis://:%s@127.0.0.1:%d/5' % (server.password, server.port)
        self.start_ws(redis_url=url, redis_options=None)
        client = store.connect_sync(url)
        db0 = store.connect_sync(url[:-1] + '0')
        self.check_works_and_lands_in(client, db0.dbsize)


class TestWorkerDeath(WSFixture, unittest.TestCase):
    """A worker killed with -9 while it holds a stream's lock: the master
    frees the lock when it notices (not after the lock's 5 minute TTL)
    and repairs what the worker left half done; the core's retry works
    and the trajectory is whole."""

    def kill_holder_during(self, send):
        """Run `send()` in a thread; kill -9 the worker as soon as it holds
        the stream's lock; returns the holder seen."""
        import threading
        redis = self.ws.redis()
        self.addCleanup(redis.close)
        key = 'wsd:%s:lock:stream:%s' % (self.ws.name, self.sid)
        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        holder = wait_for(lambda: redis.get(key), 'the lock taken', 60)
        os.kill(int(holder.split('.')[0]), signal.SIGKILL)
        thread.join(60)
        wait_for(lambda: redis.get(key) != holder, 'the lock freed')
        return holder

    def send_quietly(self, method, path, body):
        def send():
            try:
                self.ws.request(method, path, body, token=self.token)
            except Exception:
                pass  # the worker died under it
        return send

    def test_mid_commit(self):
        self.start_ws(num_processes=2, max_files_per_request=400)
        self.assertEqual(self.frame(b'two').status_code, 200)
        # Many state files: a commit that takes a while (one fsync each).
        state = {'s%03d.txt' % i: 'x' * 1000 for i in range(400)}
        self.kill_holder_during(self.send_quietly(
            'PUT', '/core/checkpoint', {'files': state}))
        r = self.ws.request('PUT', '/core/checkpoint', {'files': state},
                            token=self.token)
        self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(self.ws.request('GET', '/streams/%s/frames.xtc'
                                         % self.sid, token=PASS).content,
                         b'onetwo')
        info = self.ws.request('GET', '/streams/info/' + self.sid,
                               token=PASS).json()
        self.assertEqual(info['frames'], 2)
        self.assertIn('freed 1 locks of dead worker', self.ws.read_log())

    def test_worker_dies_while_its_redis_is_stuck(self):
        """The master cannot free a dead worker's lock while the store
        does not answer (chaos: a worker killed while its Redis was being
        restarted left the lock for its whole TTL); it tries again until
        the store answers, then frees it, and the core's retry works."""
        self.start_ws(num_processes=2, max_checkpoint_body_size=64 << 20)
        self.assertEqual(self.frame(b'two').status_code, 200)
        redis = self.ws.redis()
        self.addCleanup(redis.close)
        key = 'wsd:%s:lock:stream:%s' % (self.ws.name, self.sid)
        # A large state: the lock is held while its body comes in.
        big = {'files': {'state.xml': 'x' * (24 << 20)}}
        import threading
        thread = threading.Thread(target=self.send_quietly(
            'PUT', '/core/checkpoint', big), daemon=True)
        thread.start()
        holder = wait_for(lambda: redis.get(key), 'the lock taken', 60)
        store_pid = self.ws.redis_pid()
        os.kill(store_pid, signal.SIGSTOP)
        try:
            os.kill(int(holder.split('.')[0]), signal.SIGKILL)
            wait_for(lambda: 'trying again' in self.ws.read_log(),
                     'the master to fail to free it', 30)
        finally:
            os.kill(store_pid, signal.SIGCONT)
        thread.join(60)
        wait_for(lambda: redis.get(key) != holder, 'the lock freed', 30)
        wait_for(lambda: 'at last' in self.ws.read_log(),
                 'the master to say it freed it', 30)
        for _ in range(2):
            r = self.ws.request('PUT', '/core/checkpoint', big,
                                token=self.token)
            self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(self.ws.request(
            'GET', '/streams/%s/frames.xtc' % self.sid, token=PASS).content,
            b'onetwo')

    def buffer_lock_holder(self):
        """The pid holding the flock of the stream's buffer (/proc/locks),
        or None."""
        path = os.path.join(self.ws.settings.data_folder, 'streams',
                            self.sid, 'buffer.lock')
        try:
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            return None
        with open('/proc/locks') as f:
            for line in f:
                parts = line.split()
                if 'FLOCK' in parts and \
                        parts[-3].rsplit(':', 1)[-1] == str(inode):
                    return int(parts[-4])
        return None

    def test_mid_frame(self):
        """A worker killed while it appends a frame (its buffer lock held,
        freed by the kernel): the bytes it wrote are cut by the retry,
        whether or not Redis counted them."""
        self.start_ws(num_processes=2, max_frame_body_size=64 << 20)
        big = os.urandom(24 << 20)
        body = {'files': {'frames.xtc.b64': b64(big)}}
        import threading
        thread = threading.Thread(target=self.send_quietly(
            'PUT', '/core/frame', body), daemon=True)
        thread.start()
        pid = wait_for(self.buffer_lock_holder, 'the buffer locked', 60,
                       interval=0.005)
        os.kill(pid, signal.SIGKILL)
        thread.join(60)
        for _ in range(2):  # the retry, and a retry of the retry
            r = self.ws.request('PUT', '/core/frame', body, token=self.token)
            self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(self.ws.request('PUT', '/core/checkpoint', {
            'files': {'state.xml': 's2'}}, token=self.token).status_code, 200)
        got = self.ws.request('GET', '/streams/%s/frames.xtc' % self.sid,
                              token=PASS).content
        self.assertEqual(len(got), 3 + len(big))
        self.assertTrue(got == b'one' + big)
        info = self.ws.request('GET', '/streams/info/' + self.sid,
                               token=PASS).json()
        self.assertEqual(info['frames'], 2)


class TestDeathMidDeletion(WSFixture, unittest.TestCase):
    """A worker SIGKILLed while deleting an active stream, after the disk
    removal (one rename) and before the Redis step: what the master finds
    is the state built here (the worker's locks, the stream gone from disk
    but still in the index), and it runs what the master runs
    (recovery.free_dead_holder)."""

    def test_master_frees_every_lock_and_ends_the_session_once(self):
        from server.ws import recovery
        from server.ws.keys import Keys
        from server.ws.storage import Storage
        self.start_ws()
        redis = self.ws.redis()
        self.addCleanup(redis.close)
        keys = Keys(self.ws.name)
        prefix = '999999.7.'   # a dead worker's mark (runner.holder_prefix)
        other = str(uuid.uuid4())
        redis.set(keys.target_lock(self.tid), prefix + 'a')
        redis.set(keys.stream_lock(self.sid), prefix + 'b')
        redis.set(keys.stream_lock('elsewhere'), prefix + 'c')
        redis.zadd(keys.target_users(other), {prefix + 'd': 2 ** 50})
        self.assertEqual(redis.hget(keys.stream(self.sid), 'active'), '1')
        Storage(self.ws.settings.data_folder).remove_stream(self.sid)
        url = store.RedisServer.from_settings(self.ws.settings).url
        self.assertEqual(recovery.free_dead_holder(self.ws.settings, url,
                                                   prefix), 4)
        self.assertEqual(redis.keys('wsd:%s:lock*' % self.ws.name), [])
        self.assertFalse(redis.exists(keys.stream(self.sid)))
        self.assertFalse(redis.sismember(keys.active, self.sid))
        self.assertFalse(redis.sismember(keys.targets, self.tid))
        self.assertEqual(recovery.free_dead_holder(self.ws.settings, url,
                                                   prefix), 0)
        ended = [f for _, f in redis.xrange(keys.outbox('cc'))
                 if f['stream_id'] == self.sid]
        self.assertEqual(len(ended), 1)
        self.assertEqual(ended[0]['reason'], 'deletion')
        self.assertEqual(ended[0]['frames'], '1')
        r = self.ws.request('POST', '/core/heartbeat', {}, token=self.token)
        self.assertEqual(r.status_code, 401, r.text)
