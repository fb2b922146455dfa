"""End to end with real processes: one cc.py and two ws.py, driven over
verified HTTPS with `requests` the way managers and cores use them.

The 2014 integration scenarios in spirit (accounts, a target, streams
across two WS, a donor's core getting work, frames coming back), plus
concurrent assignment, an offline WS, and deleting a target while a WS is
down. Each test uses its own engine version so assignments of one test
never see another test's targets.
"""
import base64
import collections
import concurrent.futures
import gzip
import os
import sys
import threading
import unittest
import uuid

import requests

from server.cc import keys
from server.tokens import token_hash
from siegetank.client import SiegetankError
from siegetank.core import Core, make_engine, synthetic
from tests.cluster import Cluster
from tools.testing import (
    CC_PASS,
    ServerProcess,
    b64,
    certs,
    command_centers,
    gzb64,
    online,
    tmpdir,
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

    def test_donor_tokens_a_2014_core_accepts(self):
        """A 2014-style core (Core2014, below) with a donor token: new
        tokens have the form it accepts, old ones keep working."""
        joe = self.manager()
        name, donor = self.donor()
        self.assertEqual(str(uuid.UUID(donor)), donor)
        # A token of the old 64-hex form, stored hashed as before.
        old = uuid.uuid4().hex * 2
        cc_redis = self.cc.redis()
        try:
            cc_redis.set(keys.donor_token(token_hash(old)), name)
        finally:
            cc_redis.close()
        tid = self.target(joe, engine_versions=[Core2014.ENGINE_VERSION])
        for i in range(2):
            self.stream(joe, tid, seed=('<State n="%d"/>' % i).encode())
        with self.assertRaises(ValueError):
            Core2014(self.session, self.cc.url, donor_token=old)
        core = Core2014(self.session, self.cc.url, donor_token=donor,
                        target_id=tid)
        files = core.start_stream()
        self.assertEqual(files['system.xml'], b'<System/>')
        self.assertEqual(core.steps_per_frame, 10)
        ws = self.ws_of(core.stream_id)
        active = ws.request('GET', '/active_streams', token=CC_PASS).json()
        self.assertEqual(active[tid][core.stream_id]['donor'], name)
        for frame in (b'frame-one;', b'frame-two;'):
            core.send_frame(frame)
        core.heartbeat()
        core.send_checkpoint(b'<State n="after"/>')
        core.stop_stream()
        r = self.cc.request('GET', '/streams/%s/frames.xtc' % core.stream_id,
                            token=joe)
        self.assertEqual(r.content, b'frame-one;frame-two;')
        # The old token still gets work; a login issues a uuid again and
        # the previous token stops working.
        r = self.assign(engine_version=Core2014.ENGINE_VERSION,
                        donor_token=old, target_id=tid)
        self.assertEqual(r.status_code, 200, r.text)
        r = self.cc.request('POST', '/donors/auth', {'username': name,
                                                     'password': 'pw'})
        self.assertEqual(r.status_code, 200, r.text)
        fresh = r.json()['token']
        self.assertEqual(str(uuid.UUID(fresh)), fresh)
        r = self.assign(engine_version=Core2014.ENGINE_VERSION,
                        donor_token=donor, target_id=tid)
        self.assertEqual(r.status_code, 401, r.text)

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


class Core2014:
    """What the 2014 C++ core (FoldingAtHome/siegetank-backend,
    core/openmm_core/main.cpp and core/base/Core.cpp) does on the wire,
    with its checks: `--donor_token` and `--target_id` must be 36
    characters or it refuses to start; no core key; the assignment must
    carry `options.steps_per_frame`; the start's `files` are decoded by
    their .b64/.gz suffixes; frames carry `frames` and `speed`."""

    ENGINE_VERSION = '6.0'

    def __init__(self, session, cc_url, donor_token='', target_id=''):
        if donor_token and len(donor_token) != 36:
            raise ValueError('donor_token must be 36 characters')
        if target_id and len(target_id) != 36:
            raise ValueError('target_id must be 36 characters')
        self.session, self.cc_url = session, cc_url
        self.donor_token, self.target_id = donor_token, target_id

    def call(self, method, url, body):
        r = self.session.request(method, url, json=body, timeout=30,
                                 headers={'Authorization': self.token})
        if r.status_code != 200:
            raise RuntimeError('%s %s: %d %s' % (method, url, r.status_code,
                                                 r.text))
        return r.json()

    def start_stream(self):
        body = {'engine': 'openmm', 'engine_version': self.ENGINE_VERSION}
        if self.donor_token:
            body['donor_token'] = self.donor_token
        if self.target_id:
            body['target_id'] = self.target_id
        body['core_version'] = '2014'
        r = self.session.post(self.cc_url + '/core/assign', json=body,
                              timeout=30)
        if r.status_code != 200:
            raise RuntimeError('Could not get an assignment from CC, '
                               'reason: %s' % r.json()['error'])
        reply = r.json()
        self.url, self.token = reply['url'], reply['token']
        self.steps_per_frame = int(reply['options']['steps_per_frame'])
        self.base = self.url.rsplit('/core/start', 1)[0]
        start = self.session.get(self.url, timeout=30,
                                 headers={'Authorization': self.token})
        if start.status_code != 200:
            raise RuntimeError('Could not start a stream from SCV')
        start = start.json()
        if self.target_id and start['target_id'] != self.target_id:
            raise RuntimeError('FATAL: Specified target_id mismatch')
        self.stream_id = start['stream_id']
        files = {}
        for name, data in start['files'].items():
            if name.endswith('.b64'):
                name, data = name[:-4], base64.b64decode(data)
                if name.endswith('.gz'):
                    name, data = name[:-3], gzip.decompress(data)
            files[name] = data
        return files

    def send_frame(self, data):
        self.call('PUT', self.base + '/core/frame', {
            'frames': 1, 'speed': 1.5,
            'files': {'frames.xtc.b64': base64.b64encode(data).decode()}})

    def send_checkpoint(self, state):
        self.call('PUT', self.base + '/core/checkpoint', {'files': {
            'state.xml.gz.b64': base64.b64encode(
                gzip.compress(state)).decode()}})

    def heartbeat(self):
        self.call('POST', self.base + '/core/heartbeat', {})

    def stop_stream(self):
        self.call('PUT', self.base + '/core/stop', {})


class TestDrain(unittest.TestCase):
    """An admin drains the WS a core works on: no new placements nor
    assignments go there while the other WS takes them, the running core's
    frames commit, its active count drops to 0; then the WS is stopped,
    removed and started again, and every acknowledged frame downloads."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(n_ws=2, cc_values={
            'stats_interval_in_ms': 300}).start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def ws_entry(self, name):
        return self.cluster.admin.status()['workservers'][name]

    def test_drain_stop_remove_loses_nothing(self):
        c = self.cluster
        target, _ = c.synthetic_target(streams=4)
        stop = threading.Event()
        core = Core(c.address, make_engine('synthetic', rate=20), ca=c.ca,
                    target_id=target.id, checkpoint_every=0.2,
                    heartbeat_every=2, stop=stop)
        thread = threading.Thread(target=core.run)
        thread.start()
        try:
            self.drain_while_running(target, core, stop, thread)
        finally:
            stop.set()
            thread.join(60)

    def drain_while_running(self, target, core, stop, thread):
        c = self.cluster
        stream_id = wait_for(lambda: core.current is not None
                             and core.current.stream_id, 'a running core')
        name = stream_id.split(':', 1)[1]
        drained = next(ws for ws in c.ws if ws.name == name)
        other = next(ws for ws in c.ws if ws.name != name)
        wait_for(lambda: self.ws_entry(name)['active'] == 1,
                 'its active count')
        self.check_drain_permissions(name)
        c.admin.drain_workserver(name)
        self.assertEqual([c.admin.workserver_status()[w.name]['draining']
                          for w in (drained, other)], [True, False])
        entry = self.ws_entry(name)
        self.assertEqual((entry['draining'], entry['online']), (True, True))
        # New streams go to the other WS only.
        placed = [target.add_stream(synthetic.seed_files('n%d' % i))
                  for i in range(4)]
        self.assertEqual({s.split(':', 1)[1] for s in placed}, {other.name})
        # Assignments too: the other WS's 6 idle streams, then nothing,
        # although the drained WS still has an idle stream.
        answers = collections.Counter()
        session = requests.Session()
        session.trust_env = False
        session.verify = c.ca
        for _ in range(7):
            r = session.post('https://%s/core/assign' % c.address, json={
                'engine': synthetic.NAME, 'engine_version': synthetic.VERSION,
                'target_id': target.id}, timeout=30)
            answers[r.status_code] += 1
            if r.status_code == 200:
                self.assertIn(':%d/' % other.port, r.json()['url'])
        self.assertEqual(answers, {200: 6, 503: 1})
        # The running core goes on; stopped, its frames commit.
        frames = core.stats['frames']
        wait_for(lambda: core.stats['frames'] > frames + 5,
                 'frames after the drain')
        stop.set()
        thread.join(60)
        self.assertFalse(thread.is_alive())
        acknowledged = core.stats['frames']
        self.assertEqual(core.stats['streams'], 1)
        wait_for(lambda: self.ws_entry(name)['active'] == 0,
                 'the drained WS empty')
        # Stopped, removed, started again: nothing lost.
        self.assertEqual(drained.stop(), 0)
        wait_for(lambda: not c.admin.workserver_status()[name]['online'],
                 'the drained WS offline')
        c.admin.put('/ws/remove/' + name)
        self.assertNotIn(name, c.admin.workserver_status())
        drained.start()
        wait_for(lambda: c.admin.workserver_status().get(name, {}).get(
            'online'), 'the WS back')
        path = os.path.join(tmpdir('drain'), 'frames.dat')
        c.admin.stream(stream_id).download('frames.dat', path)
        with open(path, 'rb') as f:
            data = f.read()
        self.assertEqual(len(data), acknowledged * 1024)
        numbers = [int(line.split()[1]) for line in data.splitlines()
                   if line.startswith(b'frame ')]
        self.assertEqual(numbers, list(range(1, acknowledged + 1)))
        print('drain: %d frames acknowledged, %d lost; assignments after '
              'the drain: %s; core retries %d, errors %d' % (
                  acknowledged, acknowledged - len(numbers), dict(answers),
                  core.stats['retries'], core.stats['errors']),
              file=sys.stderr)

    def check_drain_permissions(self, name):
        c = self.cluster
        manager = c.client(c.admin.create_manager(
            'drain-%s@test.org' % uuid.uuid4().hex[:6], 'pw'))
        for client, body, path, status in (
                (c.client(), {'drain': True}, name, 401),
                (manager, {'drain': True}, name, 403),
                (c.admin, {'drain': 'yes'}, name, 400),
                (c.admin, {}, name, 400),
                (c.admin, {'drain': True}, 'nope', 404)):
            with self.assertRaises(SiegetankError) as e:
                client.put('/ws/drain/' + path, body)
            self.assertEqual(e.exception.status, status)
        self.assertFalse(self.ws_entry(name)['draining'])

