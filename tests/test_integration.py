"""End to end with real processes: one cc.py and two ws.py, driven over
verified HTTPS with `requests` the way managers and cores use them.

The 2014 integration scenarios in spirit (accounts, a target, streams
across two WS, a donor's core getting work, frames coming back), plus
concurrent assignment, an offline WS, and deleting a target while a WS is
down. Each test uses its own engine version so assignments of one test
never see another test's targets.
"""
import concurrent.futures
import unittest
import uuid

import requests

from server.cc import keys
from tools.testing import (
    CC_PASS,
    ServerProcess,
    b64,
    certs,
    command_centers,
    gzb64,
    online,
    wait_for,
)

SYSTEM = gzb64(b'<System/>')
INTEGRATOR = b64(b'<Integrator/>')


class TestIntegration(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.cc = ServerProcess('cc').start()
        centers = command_centers(cls.cc)
        cls.ws1 = ServerProcess('ws', command_centers=centers)
        cls.ws2 = ServerProcess('ws', command_centers=centers)
        cls.ws1.start()
        cls.ws2.start()
        r = cls.cc.request('POST', '/managers', {
            'email': 'admin@x.org', 'password': 'pw', 'role': 'admin'})
        cls.admin = r.json()['token']
        cls.session = requests.Session()
        cls.session.trust_env = False
        cls.session.verify = certs()['ca']

    @classmethod
    def tearDownClass(cls):
        for s in (cls.ws1, cls.ws2, cls.cc):
            s.kill()

    def setUp(self):
        for ws in (self.ws1, self.ws2):
            if ws.process.poll() is not None:
                ws.start()
            wait_for(lambda ws=ws: online(self.cc, ws.name),
                     'WS %s online' % ws.name)
        self.version = uuid.uuid4().hex[:8]

    # helpers

    def manager(self):
        email = '%s@x.org' % uuid.uuid4().hex[:8]
        r = self.cc.request('POST', '/managers', {
            'email': email, 'password': 'pw', 'role': 'manager'},
            token=self.admin)
        self.assertEqual(r.status_code, 200, r.text)
        r = self.cc.request('POST', '/managers/auth', {'email': email,
                                                       'password': 'pw'})
        self.assertEqual(r.status_code, 200)
        return r.json()['token']

    def donor(self):
        name = uuid.uuid4().hex[:8]
        r = self.cc.request('POST', '/donors', {
            'username': name, 'email': name + '@d.org', 'password': 'pw'})
        self.assertEqual(r.status_code, 200, r.text)
        return name, r.json()['token']

    def target(self, token, stage='public', **fields):
        body = {'description': 'it', 'engine': 'openmm',
                'engine_versions': [self.version], 'stage': stage,
                'files': {'system.xml.gz.b64': SYSTEM,
                          'integrator.xml.b64': INTEGRATOR},
                'options': {'steps_per_frame': 10}}
        body.update(fields)
        r = self.cc.request('POST', '/targets', body, token=token)
        self.assertEqual(r.status_code, 200, r.text)
        return r.json()['target_id']

    def stream(self, token, tid, seed=b'<State/>'):
        r = self.cc.request('POST', '/streams', {
            'target_id': tid, 'files': {'state.xml.b64': b64(seed)}},
            token=token)
        self.assertEqual(r.status_code, 200, r.text)
        return r.json()['stream_id']

    def assign(self, **fields):
        body = {'engine': 'openmm', 'engine_version': self.version}
        body.update(fields)
        return self.cc.request('POST', '/core/assign', body)

    def core_start(self, reply):
        r = self.session.get(reply['url'], headers={
            'Authorization': reply['token']}, timeout=30)
        self.assertEqual(r.status_code, 200, r.text)
        return r.json()

    def ws_of(self, sid):
        return self.ws1 if sid.endswith(':' + self.ws1.name) else self.ws2

    # tests

    def test_manager_donor_core_scenario(self):
        joe = self.manager()
        name, donor = self.donor()
        tid = self.target(joe, stage='private')
        sids = [self.stream(joe, tid, seed=('<State n="%d"/>' % i).encode())
                for i in range(6)]
        self.assertEqual(len(set(sids)), 6)
        per_ws = {ws.name: [s for s in sids if s.endswith(':' + ws.name)]
                  for ws in (self.ws1, self.ws2)}
        self.assertEqual(sorted(len(v) for v in per_ws.values()), [3, 3])
        info = self.cc.request('GET', '/targets/info/' + tid, token=joe).json()
        self.assertEqual(info['striated_ws'], sorted(per_ws))
        r = self.cc.request('GET', '/targets/streams/' + tid, token=joe)
        self.assertNotIn('X-Unreachable-Workservers', r.headers)
        listing = r.json()
        self.assertEqual({k: sorted(v) for k, v in listing.items()},
                         {k: sorted(v) for k, v in per_ws.items()})
        for v in listing.values():
            for s in v.values():
                self.assertEqual((s['status'], s['frames'], s['active']),
                                 ('OK', 0, False))
        # private: never handed out, not even by id
        self.assertEqual(self.assign().status_code, 503)
        self.assertEqual(self.assign(stage='beta').status_code, 503)
        self.assertEqual(self.assign(target_id=tid).status_code, 403)
        # beta: only to a core that asks for it
        r = self.cc.request('PUT', '/targets/update/' + tid,
                            {'stage': 'beta'}, token=joe)
        self.assertEqual(r.status_code, 200)
        self.assertEqual(self.assign().status_code, 503)
        r = self.assign(stage='beta', donor_token=donor)
        self.assertEqual(r.status_code, 200, r.text)
        reply = r.json()
        self.assertEqual(reply['options'], {'steps_per_frame': 10})
        self.assertEqual(reply['uri'], reply['url'])
        start = self.core_start(reply)
        sid = start['stream_id']
        ws = self.ws_of(sid)
        self.assertEqual(reply['url'],
                         'https://127.0.0.1:%d/core/start' % ws.port)
        self.assertEqual(start['target_id'], tid)
        self.assertEqual(start['target_files'],
                         {'system.xml.gz.b64': SYSTEM,
                          'integrator.xml.b64': INTEGRATOR})
        active = ws.request('GET', '/active_streams', token=CC_PASS).json()
        self.assertEqual(active[tid][sid]['donor'], name)
        # the core sends frames and a checkpoint; the manager downloads them
        hdr = {'Authorization': reply['token']}
        base = reply['url'].rsplit('/core/start', 1)[0]
        for chunk in (b'frame-one;', b'frame-two;'):
            r = self.session.put(base + '/core/frame', json={
                'files': {'frames.xtc.b64': b64(chunk)}}, headers=hdr,
                timeout=30)
            self.assertEqual(r.status_code, 200, r.text)
        r = self.session.put(base + '/core/checkpoint', json={
            'files': {'state.xml.b64': b64(b'<State n="new"/>')}},
            headers=hdr, timeout=30)
        self.assertEqual(r.status_code, 200, r.text)
        info = self.cc.request('GET', '/streams/info/' + sid, token=joe)
        self.assertEqual(info.status_code, 200)
        self.assertEqual((info.json()['frames'], info.json()['target_id']),
                         (2, tid))
        r = self.cc.request('GET', '/streams/%s/frames.xtc' % sid, token=joe)
        self.assertEqual((r.status_code, r.content),
                         (200, b'frame-one;frame-two;'))
        self.assertEqual(r.history[0].status_code, 307)
        r = self.cc.request('GET', '/streams/%s/frames.xtc' % sid, token=joe,
                            headers={'Range': 'bytes=10-'})
        self.assertEqual((r.status_code, r.content), (206, b'frame-two;'))
        other = self.manager()
        r = self.cc.request('GET', '/streams/%s/frames.xtc' % sid,
                            token=other, allow_redirects=False)
        self.assertEqual(r.status_code, 403)
        # stop / start / delete routed to the stream's WS
        victim = per_ws[self.ws2.name][0]
        for action in ('stop', 'start', 'delete'):
            r = self.cc.request('PUT', '/streams/%s/%s' % (action, victim),
                                token=joe)
            self.assertEqual(r.status_code, 200, (action, r.text))
        r = self.cc.request('GET', '/streams/info/' + victim, token=joe)
        self.assertEqual(r.status_code, 404)
        r = self.ws2.request('GET', '/streams/info/' + victim, token=CC_PASS)
        self.assertEqual(r.status_code, 404)
        # the target file as it was posted
        r = self.cc.request('GET', '/targets/%s/integrator.xml.b64' % tid,
                            token=joe)
        self.assertEqual(r.content, INTEGRATOR.encode())

    def test_target_without_files(self):
        joe = self.manager()
        tid = self.target(joe, files={})
        sid = self.stream(joe, tid)
        r = self.assign(target_id=tid)
        self.assertEqual(r.status_code, 200, r.text)
        start = self.core_start(r.json())
        self.assertEqual(start['stream_id'], sid)
        self.assertEqual(start['target_files'], {})

    def test_concurrent_assigns_distinct(self):
        joe = self.manager()
        tid = self.target(joe)
        n = 8
        sids = {self.stream(joe, tid) for _ in range(n)}
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: self.assign(), range(n + 4)))
        ok = [r.json() for r in replies if r.status_code == 200]
        refused = [r for r in replies if r.status_code != 200]
        self.assertEqual(len(ok), n)
        self.assertTrue(all(r.status_code == 503 and 'error' in r.json()
                            for r in refused))
        got = [self.core_start(reply)['stream_id'] for reply in ok]
        self.assertEqual(sorted(got), sorted(sids))

    def test_assignment_skips_offline_ws(self):
        joe = self.manager()
        tid = self.target(joe)
        sids = [self.stream(joe, tid) for _ in range(4)]
        self.ws2.kill()
        wait_for(lambda: online(self.cc, self.ws2.name, False), 'WS2 offline')
        got = set()
        for _ in range(2):
            r = self.assign()
            self.assertEqual(r.status_code, 200, r.text)
            got.add(self.core_start(r.json())['stream_id'])
        self.assertEqual(got, {s for s in sids
                               if s.endswith(':' + self.ws1.name)})
        r = self.assign()
        self.assertEqual(r.status_code, 503)
        self.assertIn('error', r.json())
        # new streams go to the WS that is up
        extra = self.stream(joe, tid)
        self.assertTrue(extra.endswith(':' + self.ws1.name))
        # the listing reports the down WS instead of failing
        r = self.cc.request('GET', '/targets/streams/' + tid, token=joe)
        self.assertEqual(r.status_code, 200)
        self.assertEqual(r.headers['X-Unreachable-Workservers'],
                         self.ws2.name)
        listing = r.json()
        self.assertEqual(listing[self.ws2.name], {})
        self.assertEqual(len(listing[self.ws1.name]), 3)
        self.ws2.start()
        wait_for(lambda: online(self.cc, self.ws2.name), 'WS2 back')
        got = set()
        for _ in range(3):
            r = self.assign()
            self.assertEqual(r.status_code, 200, r.text)
            got.add(self.core_start(r.json())['stream_id'])
        self.assertEqual(got, {extra} | {s for s in sids
                                         if s.endswith(':' + self.ws2.name)})

    def test_delete_target_with_ws_down(self):
        joe = self.manager()
        tid = self.target(joe)
        for _ in range(4):
            self.stream(joe, tid)
        self.ws2.kill()
        r = self.cc.request('PUT', '/targets/delete/' + tid, token=joe)
        self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(self.cc.request('GET', '/targets/info/' + tid,
                                         token=joe).status_code, 404)
        r = self.ws1.request('GET', '/targets/streams/' + tid, token=CC_PASS)
        self.assertEqual(r.status_code, 404)
        cc_redis = self.cc.redis()
        try:
            self.assertEqual(cc_redis.smembers(
                keys.ws_pending_deletes(self.ws2.name)), {tid})
            self.ws2.start()
            # still there on ws2 until the CC catches it up
            wait_for(lambda: self.ws2.request(
                'GET', '/targets/streams/' + tid,
                token=CC_PASS).status_code == 404, 'deletion on WS2')
            wait_for(lambda: not cc_redis.smembers(
                keys.ws_pending_deletes(self.ws2.name)), 'pending cleared')
        finally:
            cc_redis.close()

    def test_bad_input_never_500(self):
        joe = self.manager()
        tid = self.target(joe)
        sid = self.stream(joe, tid)
        junk = [b'', b'{', b'[]', b'null', b'"x"', b'{"a": 1}',
                b'\xff\xfe', b'{"files": {"../x": "a"}}',
                b'{"target_id": {"$ne": 1}, "files": {"a": "b"}}']
        paths = [('POST', '/managers'), ('POST', '/managers/auth'),
                 ('POST', '/donors'), ('POST', '/donors/auth'),
                 ('POST', '/targets'), ('PUT', '/targets/update/' + tid),
                 ('POST', '/streams'), ('POST', '/core/assign'),
                 ('PUT', '/ws/register')]
        for method, path in paths:
            for body in junk:
                r = self.cc.session.request(
                    method, self.cc.url + path, data=body, timeout=30,
                    headers={'Authorization': joe if 'ws' not in path
                             else CC_PASS})
                self.assertIn(r.status_code, (400, 401, 403, 503),
                              (path, body, r.text))
                self.assertIn('error', r.json())
        for method, path in (('GET', '/streams/info/%s' % sid[:-1]),
                             ('GET', '/streams/%s/%%2e%%2e' % sid),
                             ('PUT', '/streams/start/%00'),
                             ('GET', '/targets/info/%s' % ('a' * 5000))):
            r = self.cc.session.request(method, self.cc.url + path,
                                        headers={'Authorization': joe},
                                        timeout=30)
            self.assertIn(r.status_code, (400, 404), (path, r.text))
            self.assertIn('error', r.json())
        log = self.cc.read_log()
        self.assertNotIn('Traceback', log)
        self.assertNotIn(' 500 ', log)
