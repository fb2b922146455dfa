"""Issue 10's attacks by anonymous and donor cores, against real cc.py and
ws.py processes: error stops that halt a target, a burst of assignments
that hogs every stream, assignment floods, and streams taken but never
worked on. Each test starts its own CC and WS with the limits it needs.
"""
import asyncio
import base64
import concurrent.futures
import os
import time
import unittest
import uuid

import requests

from tests.test_balancer import exchange
from tests.test_limits import trickle
from tools.testing import (
    CC_PASS,
    ServerProcess,
    b64,
    certs,
    command_centers,
    online,
    wait_for,
)


class AbuseTestCase(unittest.TestCase):
    cc_conf = {}
    ws_conf = {}

    def setUp(self):
        self.cc = ServerProcess('cc', **self.cc_conf).start()
        self.addCleanup(self.cc.kill)
        self.ws = ServerProcess('ws', command_centers=command_centers(
            self.cc), pulse_frequency_in_ms=200, **self.ws_conf).start()
        self.addCleanup(self.ws.kill)
        wait_for(lambda: online(self.cc, self.ws.name), 'the WS online')
        self.admin = self.cc.request('POST', '/managers', {
            'email': 'admin@x.org', 'password': 'pw',
            'role': 'admin'}).json()['token']
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = certs()['ca']
        self.version = uuid.uuid4().hex[:8]

    def target(self, streams):
        r = self.cc.request('POST', '/targets', {
            'description': 'public', 'engine': 'openmm',
            'engine_versions': [self.version], 'stage': 'public',
            'files': {'system.xml.b64': b64(b'<System/>')}},
            token=self.admin)
        tid = r.json()['target_id']
        sids = [self.cc.request('POST', '/streams', {
            'target_id': tid, 'files': {'state.xml.b64': b64(b'<S/>')}},
            token=self.admin).json()['stream_id'] for _ in range(streams)]
        return tid, sids

    def donor(self):
        name = uuid.uuid4().hex[:8]
        return self.cc.request('POST', '/donors', {
            'username': name, 'email': name + '@d.org',
            'password': 'pw'}).json()['token']

    def assign(self, key=None, **fields):
        body = {'engine': 'openmm', 'engine_version': self.version}
        body.update(fields)
        return self.cc.request('POST', '/core/assign', body, token=key)

    def core(self, method, reply, path, body=None):
        base = reply['url'].rsplit('/core/start', 1)[0]
        return self.session.request(method, base + path, json=body,
                                    headers={'Authorization': reply['token']},
                                    timeout=30)

    def streams(self, tid):
        return self.ws.request('GET', '/targets/streams/' + tid,
                               token=CC_PASS).json()

    def active(self):
        return {sid for streams in self.ws.request(
            'GET', '/active_streams', token=CC_PASS).json().values()
            for sid in streams}


class TestErrorStops(AbuseTestCase):
    """Error stops STOP a stream only on the word of clients the CC vouches
    for (a core key, a donor with credited frames), each network or donor
    once; anonymous ones back the stream off (issue 22 point 4)."""
    ws_conf = {'error_backoff_in_s': 1, 'max_error_backoff_in_s': 2}

    def assign_from(self, source, key=None, **fields):
        body = {'engine': 'openmm', 'engine_version': self.version}
        body.update(fields)
        got = exchange(self.cc.port, source, 'POST', '/core/assign', body,
                       headers={'Authorization': key} if key else None)
        return got

    def test_ten_anonymous_networks_cannot_stop_a_target(self):
        tid, sids = self.target(3)
        error = base64.b64encode(b'the GPU fell off').decode()
        stops = 0
        for i in range(90):  # ten /24s, each assigning and error-stopping
            status, reply = self.assign_from('127.0.%d.1' % (i % 10 + 1))
            self.assertIn(status, (200, 503), reply)
            if status == 200:
                r = self.core('PUT', reply, '/core/stop', {'error': error})
                self.assertEqual(r.status_code, 200, r.text)
                stops += 1
        self.assertGreaterEqual(stops, 3)
        streams = self.streams(tid)
        self.assertEqual({s['status'] for s in streams.values()}, {'OK'})
        self.assertEqual({s['error_count'] for s in streams.values()}, {0})
        # Backed off, not stopped: an honest donor gets work again.
        token = self.donor()
        wait_for(lambda: self.assign(donor_token=token).status_code == 200,
                 'an honest donor assigned')

    def test_vouched_failures_still_stop_a_stream(self):
        tid, (sid,) = self.target(1)
        key = self.cc.request('POST', '/engines/keys', {
            'engine': 'openmm'}, token=self.admin).json()['key']
        error = base64.b64encode(b'NaN').decode()
        # One network with a key counts once, however often it stops.
        for _ in range(3):
            status, reply = self.assign_from('127.0.1.1', key, target_id=tid)
            self.assertEqual(status, 200, reply)
            self.core('PUT', reply, '/core/stop', {'error': error})
        self.assertEqual(self.streams(tid)[sid]['error_count'], 1)
        for n in range(2, 11):  # max_stream_fails (10) networks
            status, reply = self.assign_from('127.0.%d.1' % n, key,
                                             target_id=tid)
            self.assertEqual(status, 200, reply)
            self.core('PUT', reply, '/core/stop', {'error': error})
        info = self.streams(tid)[sid]
        self.assertEqual((info['status'], info['error_count']),
                         ('STOPPED', 10))

    def test_a_checkpoint_ends_a_run_of_errors(self):
        tid, (sid,) = self.target(1)
        key = self.cc.request('POST', '/engines/keys', {
            'engine': 'openmm'}, token=self.admin).json()['key']
        error = base64.b64encode(b'NaN').decode()
        status, reply = self.assign_from('127.0.1.1', key, target_id=tid)
        self.core('PUT', reply, '/core/stop', {'error': error})
        self.assertEqual(self.streams(tid)[sid]['error_count'], 1)
        status, reply = self.assign_from('127.0.1.1', key, target_id=tid)
        self.core('PUT', reply, '/core/frame',
                  {'files': {'f.b64': b64(b'x')}})
        self.core('PUT', reply, '/core/checkpoint',
                  {'files': {'state.xml.b64': b64(b'<S/>')}})
        self.assertEqual(self.streams(tid)[sid]['error_count'], 0)
        self.core('PUT', reply, '/core/stop', {'error': error})
        self.assertEqual(self.streams(tid)[sid]['error_count'], 1)


class TestVouchedDonors(AbuseTestCase):
    """A donor with credited frames is vouched for: its error stops count
    (once per donor); a donor without any backs the stream off."""
    cc_conf = {'stats_interval_in_ms': 200}
    ws_conf = {'max_stream_fails': 2, 'error_backoff_in_s': 1,
               'max_error_backoff_in_s': 1}

    def take(self, token, tid):
        """An assignment of the target's stream, once it is free."""
        return wait_for(lambda: (lambda r: r.status_code == 200 and r.json())(
            self.assign(donor_token=token, target_id=tid)), 'the stream')

    def test_donors_with_history_stop_a_stream(self):
        tid, (sid,) = self.target(1)
        error = base64.b64encode(b'NaN').decode()
        donors = {}
        for _ in range(2):
            name = uuid.uuid4().hex[:8]
            donors[name] = self.cc.request('POST', '/donors', {
                'username': name, 'email': name + '@d.org',
                'password': 'pw'}).json()['token']
        # No history yet: their error stops only back the stream off.
        for token in donors.values():
            self.core('PUT', self.take(token, tid), '/core/stop',
                      {'error': error})
        self.assertEqual(self.streams(tid)[sid]['error_count'], 0)
        for name, token in donors.items():
            reply = self.take(token, tid)
            self.core('PUT', reply, '/core/frame',
                      {'files': {'f.b64': b64(b'x')}})
            self.core('PUT', reply, '/core/checkpoint',
                      {'files': {'state.xml.b64': b64(b'<S/>')}})
            self.core('PUT', reply, '/core/stop', {})
            wait_for(lambda name=name: self.cc.request(
                'GET', '/donors/stats/' + name).json()['frames'],
                'frames credited to ' + name)
        for token in donors.values():
            self.core('PUT', self.take(token, tid), '/core/stop',
                      {'error': error})
        info = self.streams(tid)[sid]
        self.assertEqual((info['status'], info['error_count']),
                         ('STOPPED', 2))


class TestHogging(AbuseTestCase):
    cc_conf = {'client_max_held_streams': 2, 'client_hold_in_s': 6}
    ws_conf = {'core_start_window_in_s': 2, 'first_heartbeat_window_in_s': 3}

    def test_a_burst_of_assigns_cannot_starve_an_honest_core(self):
        tid, sids = self.target(3)
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            replies = list(pool.map(lambda _: self.assign(), range(40)))
        codes = sorted(r.status_code for r in replies)
        self.assertEqual(codes, [200] * 2 + [429] * 38)
        for r in replies:
            if r.status_code == 429:
                self.assertIn('error', r.json())
                self.assertTrue(1 <= int(r.headers['Retry-After']) <= 6)
        # An honest core (another client) still gets work and keeps it.
        honest = self.assign(donor_token=self.donor())
        self.assertEqual(honest.status_code, 200, honest.text)
        mine = self.core('GET', honest.json(), '/core/start').json()
        self.assertEqual(self.core('POST', honest.json(), '/core/heartbeat',
                                   {}).status_code, 200)
        # The burst's streams were never started: back in the queue soon.
        wait_for(lambda: self.active() == {mine['stream_id']},
                 'the unstarted streams to be taken back')
        # Their holds end too: the same address is served again.
        r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
            self.assign()), 'the address to be served again')
        # A core that starts but never shows a sign of life loses its
        # stream too; a heartbeat or a frame keeps it.
        sid = self.core('GET', r.json(), '/core/start').json()['stream_id']
        self.assertIn(sid, self.active())
        wait_for(lambda: sid not in self.active(), 'the silent stream')
        self.assertEqual(self.core('POST', r.json(), '/core/heartbeat',
                                   {}).status_code, 401)
        self.assertIn(mine['stream_id'], self.active())
        worker = self.assign(donor_token=self.donor())
        wid = self.core('GET', worker.json(), '/core/start').json()[
            'stream_id']
        self.assertEqual(self.core('PUT', worker.json(), '/core/frame', {
            'files': {'f.b64': b64(b'x')}}).status_code, 200)
        # A silent core started after the worker marks its window's end.
        clock = self.assign(donor_token=self.donor())
        cid = self.core('GET', clock.json(), '/core/start').json()[
            'stream_id']
        wait_for(lambda: cid not in self.active(), 'the later silent stream')
        self.assertEqual(self.core('POST', worker.json(), '/core/heartbeat',
                                   {}).status_code, 200)
        self.assertIn(wid, self.active())


class TestHoldsWhileHeld(AbuseTestCase):
    """Issue 22, point 3: holds count while the streams are held, not by
    the age of their assignments; a core key may carry its own limits."""
    cc_conf = {'client_max_held_streams': 2, 'client_hold_in_s': 2,
               'stats_interval_in_ms': 200}

    def take(self, key=None):
        r = self.assign(key)
        self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(self.core('GET', r.json(), '/core/start')
                         .status_code, 200)
        return r.json()

    def test_live_streams_stay_counted(self):
        self.target(6)
        held = [self.take() for _ in range(2)]
        self.assertEqual(self.assign().status_code, 429)
        # Kept alive past the old window (client_hold_in_s): still held.
        for _ in range(3):
            time.sleep(1)
            for reply in held:
                self.assertEqual(self.core('POST', reply, '/core/heartbeat',
                                           {}).status_code, 200)
        r = self.assign()
        self.assertEqual(r.status_code, 429, r.text)
        self.assertTrue(1 <= int(r.headers['Retry-After']) <= 2)
        # A stream given back (its session's record reaches the CC) frees
        # one hold.
        self.assertEqual(self.core('PUT', held[0], '/core/stop', {})
                         .status_code, 200)
        wait_for(lambda: self.assign().status_code == 200,
                 'the hold of the stopped stream to be given back')
        self.assertEqual(self.assign().status_code, 429)
        # A core key made with its own, higher limits counts as one client
        # with those; a key made without keeps the anonymous ones.
        r = self.cc.request('POST', '/engines/keys', {
            'engine': 'openmm', 'limits': {'held': 3, 'per_minute': 50}},
            token=self.admin)
        self.assertEqual(r.status_code, 200, r.text)
        key = r.json()['key']
        listed = self.cc.request('GET', '/engines/keys', token=self.admin)
        self.assertEqual(listed.json()[r.json()['key_id']]['limits'],
                         {'held': 3, 'per_minute': 50})
        for _ in range(3):
            self.take(key)
        r = self.assign(key)
        self.assertEqual(r.status_code, 429, r.text)
        self.assertIn('core key', r.json()['error'])
        for bad in ({'held': 0}, {'held': True}, {'other': 1}, [3]):
            r = self.cc.request('POST', '/engines/keys', {
                'engine': 'openmm', 'limits': bad}, token=self.admin)
            self.assertEqual(r.status_code, 400, r.text)


class TestAssignRate(AbuseTestCase):
    cc_conf = {'client_assigns_per_minute': 3}

    def test_assignments_per_minute(self):
        self.target(1)
        codes = [self.assign().status_code for _ in range(4)]
        self.assertEqual(codes[:3], [200, 503, 503])
        self.assertEqual(codes[3], 429)
        r = self.assign()
        self.assertEqual(r.status_code, 429)
        self.assertTrue(1 <= int(r.headers['Retry-After']) <= 60)
        # Another client has its own budget; an unknown donor token is
        # still a 401, not counted against anyone.
        donor = self.donor()
        self.assertEqual(self.assign(donor_token=donor).status_code, 503)
        self.assertEqual(self.assign(donor_token='nope').status_code, 401)


class TestSlowBody(AbuseTestCase):
    """Issue 22, point 12: a frame dripped on a live core token is cut
    once it falls under the minimum rate after the grace, long before
    `body_timeout_in_s`, and the stream's lock is freed with it."""

    ws_conf = {'body_timeout_in_s': 600, 'body_grace_in_s': 4,
               'min_body_rate_in_bytes_per_s': 100}

    def test_a_drip_is_cut_and_the_lock_freed(self):
        self.target(1)
        r = self.assign()
        self.assertEqual(r.status_code, 200, r.text)
        reply = r.json()
        sid = self.core('GET', reply, '/core/start').json()['stream_id']
        head = ('PUT /core/frame HTTP/1.1\r\nHost: x\r\nAuthorization: '
                '%s\r\nContent-Length: 100000\r\n\r\n{' % reply['token']
                ).encode()
        frame = {'files': {'f.b64': b64(b'x')}}
        # 1 byte every 2 s, for at most 60 s (a tenth of the body timeout).
        pieces = asyncio.run(trickle(self.ws.port, head, b' ', every=2,
                                     most=30))
        self.assertIsNotNone(pieces, 'the drip was never cut')
        r = self.core('PUT', reply, '/core/frame', frame)
        self.assertEqual(r.status_code, 200, r.text)

        async def drip_and_frame():
            # Half the minimum rate (cut some seconds after the grace);
            # meanwhile a frame of the same core waits for the lock the
            # drip holds, longer than its own grace: the wait does not
            # count against its body.
            drip = asyncio.ensure_future(trickle(
                self.ws.port, head, b' ' * 100, every=2, most=30))
            await asyncio.sleep(0.5)
            waiting = asyncio.get_running_loop().run_in_executor(
                None, self.core, 'PUT', reply, '/core/frame', frame)
            return await drip, await waiting
        pieces, waited = asyncio.run(drip_and_frame())
        self.assertIsNotNone(pieces, 'the drip was never cut')
        self.assertEqual(waited.status_code, 200, waited.text)
        r = self.core('PUT', reply, '/core/frame', frame)
        self.assertEqual(r.status_code, 200, r.text)
        self.assertIn(sid, self.active())


class TestLogAmplification(unittest.TestCase):
    """Issue 22, point 9: a request's path and the values its refusal
    quotes reach the log cut to a bounded length, once."""

    def test_long_paths_and_values_are_logged_cut(self):
        with ServerProcess('cc') as cc:
            admin = cc.request('POST', '/managers', {
                'email': 'admin@x.org', 'password': 'pw',
                'role': 'admin'}).json()['token']
            before = os.path.getsize(cc.log_path)
            n = 20
            for i in range(n):
                r = cc.request('GET', '/%d/' % i + 'a' * 60000)
                self.assertEqual(r.status_code, 404)
                self.assertLess(len(r.content), 2048)
                r = cc.request('POST', '/streams', {
                    'target_id': 'b' * 60000, 'files': {}}, token=admin)
                self.assertEqual(r.status_code, 400)
                self.assertLess(len(r.content), 2048)
            cc.stop()
            grown = os.path.getsize(cc.log_path) - before
            self.assertLess(grown, 2 * n * 1024, cc.read_log()[-3000:])
            # Each 404's path once (cut), not again in its message.
            self.assertEqual(cc.read_log().count('a' * 100), n)


if __name__ == '__main__':
    unittest.main()
