"""Two real cc.py processes with their own data folders on one shared Redis
act as one command center: every endpoint answers the same through either,
a target made through one is placed, assigned and downloaded through the
other, the periodic jobs run once under a Redis lease, and when one CC is
killed the other keeps assigning and probing."""
import os
import unittest
import uuid

import requests

from server import store, web
from server.cc import keys
from server.lease import holder as lease_holder
from tools.testing import (
    CC_PASS,
    ServerProcess,
    b64,
    certs,
    free_port,
    tmpdir,
    wait_for,
)

MAX_BODY = 4 * 1024 * 1024


class TestTwoCommandCenters(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.redis = store.RedisServer(tmpdir('shared-redis'), free_port())
        cls.redis.start()
        shared = dict(name='hub', redis_url=cls.redis.url, redis_options=None,
                      jobs_lease_in_ms=3000, max_body_size=MAX_BODY)
        cls.a = ServerProcess('cc', **shared).start()
        cls.b = ServerProcess('cc', **shared).start()
        # ws1 registers through A, ws2 through B
        cls.ws = [ServerProcess('ws', command_centers={'hub': {
            'url': '127.0.0.1:%d' % cc.port, 'pass': CC_PASS}}).start()
            for cc in (cls.a, cls.b)]
        cls.session = requests.Session()
        cls.session.trust_env = False
        cls.session.verify = certs()['ca']
        cls.sync = store.connect_sync(cls.redis.url)

    @classmethod
    def tearDownClass(cls):
        for s in cls.ws + [cls.a, cls.b]:
            s.kill()
        cls.sync.close()
        cls.redis.stop()

    def setUp(self):
        for cc in (self.a, self.b):
            if cc.process.poll() is not None:
                cc.start()
        for ws in self.ws:
            if ws.process.poll() is not None:
                ws.start()
        wait_for(lambda: all(s['online'] for s in self.status().values())
                 and len(self.status()) == 2, 'both WS online')
        self.version = uuid.uuid4().hex[:8]

    def status(self):
        return self.a.request('GET', '/ws/status').json()

    def same(self, path, token=None, **kwargs):
        """GET `path` through A and B: the same status and body."""
        ra = self.a.request('GET', path, token=token, **kwargs)
        rb = self.b.request('GET', path, token=token, **kwargs)
        self.assertEqual((ra.status_code, ra.content),
                         (rb.status_code, rb.content), path)
        return ra

    def ok(self, cc, method, path, body=None, token=None):
        r = cc.request(method, path, body, token=token)
        self.assertEqual(r.status_code, 200, (path, r.text))
        return r.json()

    admin = None

    def manager(self):
        """An admin made through A from loopback (once: bootstrap closes
        when an admin exists), a manager made by that admin through B and
        logged in through A."""
        cls = type(self)
        if cls.admin is None:
            cls.admin = self.ok(self.a, 'POST', '/managers', {
                'email': 'admin-%s@x.org' % self.version, 'password': 'pw',
                'role': 'admin'})['token']
        admin = cls.admin
        email = 'joe-%s@x.org' % self.version
        self.ok(self.b, 'POST', '/managers', {
            'email': email, 'password': 'pw', 'role': 'manager'}, admin)
        return self.ok(self.a, 'POST', '/managers/auth',
                       {'email': email, 'password': 'pw'})['token']

    def test_every_endpoint_through_either(self):
        self.assertEqual(self.a.request('GET', '/').json()['name'],
                         self.b.request('GET', '/').json()['name'])
        joe = self.manager()
        # donors: made through B, logged in through A
        self.ok(self.b, 'POST', '/donors', {
            'username': 'd' + self.version, 'password': 'pw',
            'email': 'd%s@x.org' % self.version})
        donor = self.ok(self.a, 'POST', '/donors/auth', {
            'username': 'd' + self.version, 'password': 'pw'})['token']
        # a target with a file near max_body_size, made through A
        big = b64(os.urandom(MAX_BODY // 2))
        tid = self.ok(self.a, 'POST', '/targets', {
            'engine': 'openmm', 'engine_versions': [self.version],
            'files': {'system.xml.b64': big, 'integrator.xml.b64': b64(b'i')},
            'options': {'steps_per_frame': 5}}, joe)['target_id']
        self.assertEqual(self.same('/targets/%s/system.xml.b64' % tid,
                                   joe).content, big.encode())
        self.same('/targets', joe)
        self.same('/targets/info/' + tid, joe)
        self.ok(self.b, 'PUT', '/targets/update/' + tid, {'stage': 'public'},
                joe)
        self.same('/targets')
        self.assertEqual(self.same('/targets/info/' + tid).json()['stage'],
                         'public')
        # streams placed through B (it never saw the target's files) and A
        sids = [self.ok(cc, 'POST', '/streams', {
            'target_id': tid, 'files': {'state.xml.b64': b64(b'<S/>')}},
            joe)['stream_id'] for cc in (self.b, self.a)]
        self.assertEqual({s.split(':')[1] for s in sids},
                         {ws.name for ws in self.ws})
        for ws in self.ws:
            r = ws.request('GET', '/targets/streams/' + tid, token=CC_PASS)
            self.assertEqual(r.status_code, 200, r.text)
        self.same('/targets/streams/' + tid, joe)
        for sid in sids:
            self.same('/streams/info/' + sid, joe)
        # a core assigned through each CC; its WS holds the big file
        replies = [self.ok(cc, 'POST', '/core/assign', {
            'engine': 'openmm', 'engine_version': self.version,
            'donor_token': donor}) for cc in (self.a, self.b)]
        started = []
        for reply in replies:
            r = self.session.get(reply['url'], timeout=30,
                                 headers={'Authorization': reply['token']})
            self.assertEqual(r.status_code, 200, r.text)
            self.assertEqual(r.json()['target_files']['system.xml.b64'], big)
            started.append(r.json()['stream_id'])
        self.assertEqual(sorted(started), sorted(sids))
        r = self.a.request('POST', '/core/assign', {
            'engine': 'openmm', 'engine_version': self.version})
        self.assertEqual(r.status_code, 503)
        # frames from the core assigned through A, downloaded through B
        base = replies[0]['url'].rsplit('/core/start', 1)[0]
        hdr = {'Authorization': replies[0]['token']}
        r = self.session.put(base + '/core/frame', json={
            'files': {'frames.xtc.b64': b64(b'frame;')}}, headers=hdr,
            timeout=30)
        self.assertEqual(r.status_code, 200, r.text)
        r = self.session.put(base + '/core/checkpoint', json={
            'files': {'state.xml.b64': b64(b'<S n="1"/>')}}, headers=hdr,
            timeout=30)
        self.assertEqual(r.status_code, 200, r.text)
        r = self.b.request('GET', '/streams/%s/frames.xtc' % started[0],
                           token=joe)
        self.assertEqual((r.status_code, r.content), (200, b'frame;'))
        self.assertEqual(self.a.request(
            'GET', '/streams/%s/frames.xtc' % started[0], token=joe).content,
            b'frame;')
        self.assertEqual(
            self.same('/streams/info/' + started[0], joe).json()['frames'], 1)
        # commands routed through either
        self.ok(self.a, 'PUT', '/streams/stop/' + sids[0], {}, joe)
        self.assertEqual(self.same('/streams/info/' + sids[0],
                                   joe).json()['status'], 'STOPPED')
        self.ok(self.b, 'PUT', '/streams/start/' + sids[0], {}, joe)
        self.ok(self.b, 'PUT', '/streams/delete/' + sids[1], {}, joe)
        self.assertEqual(self.same('/streams/info/' + sids[1],
                                   joe).status_code, 404)
        # workserver registry
        ws = self.ws[0]
        self.ok(self.b, 'PUT', '/ws/disconnect', {'name': ws.name}, CC_PASS)
        self.assertFalse(self.same('/ws/status').json()[ws.name]['online'])
        self.ok(self.a, 'PUT', '/ws/register', {
            'name': ws.name, 'url': '127.0.0.1', 'http_port': ws.port},
            CC_PASS)
        self.assertTrue(self.same('/ws/status').json()[ws.name]['online'])
        # deletion through B is seen through A; neither CC wrote to disk
        self.ok(self.b, 'PUT', '/targets/delete/' + tid, {}, joe)
        self.assertEqual(self.same('/targets/info/' + tid, joe).status_code,
                         404)
        # (the only folder is the per-process scratch of /metrics)
        for cc in (self.a, self.b):
            self.assertEqual(sorted(os.listdir(cc.settings.data_folder)),
                             ['prometheus'])

    def holder(self):
        """The CC (a or b) whose worker holds the jobs lease."""
        return lease_holder(self.sync, keys.JOBS_LEASE,
                            {cc: cc.process.pid for cc in (self.a, self.b)})

    def test_jobs_run_once_and_survive_a_killed_cc(self):
        joe = self.manager()
        tid = self.ok(self.b, 'POST', '/targets', {
            'engine': 'openmm', 'engine_versions': [self.version],
            'stage': 'public'}, joe)['target_id']
        for cc in (self.a, self.b, self.a, self.b):
            self.ok(cc, 'POST', '/streams', {
                'target_id': tid, 'files': {'state.xml.b64': b64(b'<S/>')}},
                joe)
        holder = wait_for(self.holder, 'a CC holding the jobs lease')
        other = self.b if holder is self.a else self.a
        # only the holder probes: the other's log has no probe of a WS
        # that went down, the holder's does
        self.ws[1].kill()
        wait_for(lambda: not self.status()[self.ws[1].name]['online'],
                 'the holder probing the killed WS offline')
        self.assertIn('probe of %s failed' % self.ws[1].name,
                      holder.read_log())
        self.assertNotIn('probe of', other.read_log())
        self.ws[1].start()
        wait_for(lambda: self.status()[self.ws[1].name]['online'],
                 'WS back online')
        # the holder dies: the other takes the lease and keeps probing
        holder.kill(with_redis=False)
        wait_for(lambda: self.holder() is other, 'the lease passing over')
        self.ws[1].kill()
        wait_for(lambda: not other.request('GET', '/ws/status').json()[
            self.ws[1].name]['online'], 'the survivor probing')
        self.assertIn('probe of %s failed' % self.ws[1].name,
                      other.read_log())
        # and assigning
        for _ in range(2):
            r = other.request('POST', '/core/assign', {
                'engine': 'openmm', 'engine_version': self.version})
            self.assertEqual(r.status_code, 200, r.text)
            self.assertTrue(r.json()['url'].endswith(
                ':%d/core/start' % self.ws[0].port))
        # a clean stop hands the lease over at once
        holder.start()
        other.stop()
        wait_for(lambda: self.holder() is holder, 'the lease handed over')

    def test_store_down_is_503_then_resumes(self):
        """Redis stopped under both CCs: every endpoint that needs it is a
        503 with Retry-After (never a 500); back on its own after."""
        joe = self.manager()
        self.redis.stop()
        try:
            for cc in (self.a, self.b):
                for method, path, body, token in (
                        ('GET', '/', None, None),
                        ('GET', '/targets', None, joe),
                        ('GET', '/ws/status', None, None),
                        ('POST', '/managers/auth', {
                            'email': 'x@x.org', 'password': 'pw'}, None),
                        ('POST', '/core/assign', {
                            'engine': 'openmm',
                            'engine_version': self.version}, None)):
                    r = cc.request(method, path, body, token=token)
                    self.assertEqual((r.status_code, 'error' in r.json()),
                                     (503, True), (path, r.text))
                    self.assertEqual(r.headers['Retry-After'],
                                     str(web.RETRY_AFTER_S))
        finally:
            self.redis.start()
        for cc in (self.a, self.b):
            wait_for(lambda cc=cc: cc.request('GET', '/targets', token=joe)
                     .status_code == 200, 'the CC back on its store')
            self.assertNotIn('Traceback', cc.read_log())
            self.assertNotIn(' 500 ', cc.read_log())


if __name__ == '__main__':
    unittest.main()
