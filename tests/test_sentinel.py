"""The CC's store behind Redis Sentinel, all started here from the one
redis-server binary the project uses: a primary, a replica, three
sentinels, a real cc.py (redis+sentinel:// URL) and a ws.py.

Cores are assigned in a loop while the primary is SIGKILLed: requests get
503 with Retry-After during the switch (never 500) and assignments resume
on their own after the promotion. Accounts and targets acknowledged before
the kill are all there after it, including ones written while the replica
lagged (their replies wait for the replica: WAIT)."""
import os
import signal
import subprocess
import sys
import threading
import time
import unittest
import uuid

import redis
from server import store
from tools.testing import (
    CC_PASS,
    ServerProcess,
    b64,
    free_port,
    tmpdir,
    wait_for,
)

MASTER = 'siegetank'
PASSWORD = 'sentinel-test-pw'  # embedded Redis always requires one


class Sentinels:
    """A primary, a replica and three sentinels on loopback."""

    def __init__(self):
        self.primary = store.RedisServer(tmpdir('primary'), free_port(),
                                         requirepass=PASSWORD)
        self.replica = store.RedisServer(tmpdir('replica'), free_port(),
                                         requirepass=PASSWORD)
        self.ports = [free_port() for _ in range(3)]
        self.procs = []

    @property
    def url(self):
        return 'redis+sentinel://:%s@%s/%s' % (PASSWORD, ','.join(
            '127.0.0.1:%d' % p for p in self.ports), MASTER)

    def start(self):
        self.primary.start()
        self.replica.start()
        for server in (self.primary, self.replica):  # either may lead
            self.client(server).config_set('masterauth', PASSWORD)
        self.client(self.replica).replicaof('127.0.0.1', self.primary.port)
        wait_for(lambda: self.client(self.replica).info('replication')[
            'master_link_status'] == 'up', 'the replica in sync')
        binary = store.find_redis_binary()
        for port in self.ports:
            folder = tmpdir('sentinel')
            conf = os.path.join(folder, 'sentinel.conf')
            with open(conf, 'w') as f:
                f.write('sentinel monitor %s 127.0.0.1 %d 2\n'
                        'sentinel down-after-milliseconds %s 1000\n'
                        'sentinel failover-timeout %s 3000\n'
                        'sentinel parallel-syncs %s 1\n'
                        'sentinel auth-pass %s %s\n'
                        % (MASTER, self.primary.port, MASTER, MASTER, MASTER,
                           MASTER, PASSWORD))
            self.procs.append(subprocess.Popen(
                [binary, conf, '--sentinel', '--port', str(port),
                 '--bind', '127.0.0.1', '--dir', folder,
                 '--logfile', os.path.join(folder, 'sentinel.log')],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for(self.ready, 'sentinels that see each other and the replica')
        return self

    def ready(self):
        for port in self.ports:
            try:
                m = redis.Redis(port=port, decode_responses=True,
                                socket_timeout=1).sentinel_master(MASTER)
            except (redis.RedisError, OSError):
                return False
            if m['num-other-sentinels'] < 2 or m['num-slaves'] < 1:
                return False
        return True

    @staticmethod
    def client(server):
        return redis.Redis(port=server.port, password=PASSWORD,
                           decode_responses=True,
                           socket_timeout=5)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for server in (self.primary, self.replica):
            if server.process is not None and server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
            server.stop()


class TestSentinelFailover(unittest.TestCase):

    def setUp(self):
        self.redis = Sentinels()
        self.addCleanup(self.redis.stop)
        self.redis.start()
        self.cc = ServerProcess('cc', redis_url=self.redis.url,
                                redis_options=None, jobs_lease_in_ms=1000,
                                redis_wait_timeout_in_ms=120000,
                                # one address assigns in a loop
                                client_assigns_per_minute=100000,
                                client_max_held_streams=1000)
        self.addCleanup(self.cc.kill)
        self.cc.start()
        self.ws = ServerProcess('ws', command_centers={'cc': {
            'url': '127.0.0.1:%d' % self.cc.port, 'pass': CC_PASS}})
        self.addCleanup(self.ws.kill)
        self.ws.start()
        wait_for(lambda: self.cc.request('GET', '/ws/status').json(),
                 'the WS registered')

    def ok(self, method, path, body=None, token=None):
        r = self.cc.request(method, path, body, token=token)
        self.assertEqual(r.status_code, 200, (path, r.text))
        return r.json()

    def create(self, kind, token, results):
        """POST a donor or a target; appends (kind, name, status) to
        `results` (the name is the donor's username or the target's
        description)."""
        name = uuid.uuid4().hex[:10]
        if kind == 'donor':
            body = {'username': name, 'password': 'pw',
                    'email': name + '@x.org'}
        else:
            body = {'engine': 'openmm', 'engine_versions': ['1'],
                    'description': name, 'files': {'a.b64': b64(b'a')}}
        try:
            r = self.cc.request('POST', '/%ss' % kind, body, token=token)
            status, reply = r.status_code, r.json()
        except Exception as e:  # noqa: BLE001 - recorded, asserted below
            status, reply = repr(e), None
        results.append((kind, name, status, reply))

    def assign_loop(self, stop, log):
        """Assign and give the stream back at once, until `stop`; logs
        (sent, status, Retry-After, answered)."""
        while not stop.is_set():
            sent = time.monotonic()
            r = self.cc.request('POST', '/core/assign', {
                'engine': 'openmm', 'engine_version': 'loop'})
            log.append((sent, r.status_code, r.headers.get('Retry-After'),
                        time.monotonic()))
            if r.status_code == 200:
                self.ws.session.put(
                    r.json()['url'].replace('/core/start', '/core/stop'),
                    json={}, timeout=30,
                    headers={'Authorization': r.json()['token']})
            else:
                time.sleep(0.05)

    def test_primary_killed_during_assignments(self):
        admin = self.ok('POST', '/managers', {
            'email': 'a@x.org', 'password': 'pw', 'role': 'admin'})['token']
        tid = self.ok('POST', '/targets', {
            'engine': 'openmm', 'engine_versions': ['loop'],
            'stage': 'public'}, admin)['target_id']
        for _ in range(4):
            self.ok('POST', '/streams', {
                'target_id': tid, 'files': {'s.b64': b64(b's')}}, admin)
        results = []
        for kind in ('donor', 'target') * 3:
            self.create(kind, admin, results)
        self.assertTrue(all(r[2] == 200 for r in results), results)
        stop, log = threading.Event(), []
        loop = threading.Thread(target=self.assign_loop, args=(stop, log))
        loop.start()
        try:
            wait_for(lambda: sum(1 for e in log if e[1] == 200) >= 20,
                     'assignments before the kill')
            # The replica stalls behind a backlog: writes now reach only
            # the primary, and a create must not be acknowledged.
            replica, primary = self.redis.replica, self.redis.primary
            os.kill(replica.process.pid, signal.SIGSTOP)
            direct = self.redis.client(primary)
            direct.set('backlog', b'x' * (48 << 20))
            pending = [threading.Thread(target=self.create,
                                        args=(kind, admin, results))
                       for kind in ('donor', 'target')]
            for t in pending:
                t.start()
            wait_for(lambda: len(direct.keys('donor:*')) >= 4
                     and direct.scard('targets') >= 5,
                     'the pending creates on the primary')
            killed_at = time.monotonic()
            primary.process.kill()
            primary.process.wait()
            os.kill(replica.process.pid, signal.SIGCONT)
            wait_for(lambda: any(t > killed_at and s == 200
                                 for t, s, _, _ in log),
                     'assignments after the promotion', timeout=120)
            for t in pending:
                t.join(150)
            wait_for(lambda: sum(1 for t, s, _, _ in log
                                 if t > killed_at and s == 200) >= 20,
                     'assignments going on')
        finally:
            stop.set()
            loop.join(60)
        failed = [e for e in log if e[1] != 200]
        resumed = min(end for sent, s, _, end in log
                      if sent > killed_at and s == 200) - killed_at
        sys.stderr.write('\nSentinel failover: %d assignment requests failed '
                         '(503), assignments resumed %.1f s after the '
                         'primary was killed\n' % (len(failed), resumed))
        self.assertTrue(all(s == 503 and ra for _, s, ra, _ in failed),
                        set((s, ra) for _, s, ra, _ in failed))
        self.assertEqual(self.redis.client(replica).info('replication')[
            'role'], 'master')
        # Nothing acknowledged is lost; the creates caught by the kill were
        # refused (503), so their callers know to try again.
        for kind, name, status, reply in results:
            if status != 200:
                self.assertEqual(status, 503, (kind, name, reply))
                continue
            if kind == 'donor':
                self.ok('POST', '/donors/auth', {'username': name,
                                                 'password': 'pw'})
            else:
                info = self.ok('GET', '/targets/info/' + reply['target_id'],
                               token=admin)
                self.assertEqual(info['description'], name)
        self.assertEqual([r[2] for r in results[-2:]], [503, 503])
        self.create('donor', None, results)
        self.assertEqual(results[-1][2], 200, results[-1])
        log_text = self.cc.read_log()
        self.assertNotIn('Traceback', log_text)
        self.assertNotIn(' 500 ', log_text)


if __name__ == '__main__':
    unittest.main()
