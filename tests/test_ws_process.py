"""Workserver behaviour across processes and crashes, against real ws.py
processes (embedded Redis, HTTPS): kill -9 of the WS and its Redis while a
core streams, Redis data lost, concurrent activations served by two worker
processes, and heartbeat expiry by the real sweep."""
import base64
import concurrent.futures
import glob
import gzip
import os
import random
import sys
import threading
import time
import unittest
import uuid

import requests

from tools.testing import (
    CC_PASS,
    ServerProcess,
    b64,
    certs,
    command_centers,
    gzb64,
)

CCS = command_centers()
KILL_POINTS = 20


def unb64gz(text):
    return gzip.decompress(base64.b64decode(text))


def frame_bytes(i):
    """4 KB that say which frame they are: order and completeness show."""
    return (b'frame %08d\n' % i) * 273


def frames(lo, hi):
    return b''.join(frame_bytes(i) for i in range(lo, hi))


def state_of(total):
    """A checkpoint that says how many frames it follows (+ bulk)."""
    return b'%d\n' % total + os.urandom(48 * 1024)


class Failed(Exception):
    pass


class Core(threading.Thread):
    """Streams frames (1 or 2 per request) and checkpoints until the WS
    dies. `acked` is the frame count of the last checkpoint the WS
    acknowledged; `sent` every checkpoint it was sent."""

    def __init__(self, ws, token, start, seed):
        super().__init__(daemon=True)
        self.ws, self.token, self.next = ws, token, start
        self.acked = start
        self.sent = {start}
        self.rng = random.Random(seed)
        self.sending = {'frame': threading.Event(),
                        'checkpoint': threading.Event()}
        self.inflight = None
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = certs()['ca']

    def send(self, kind, path, body):
        self.inflight = kind
        self.sending[kind].set()
        r = self.session.put(self.ws.url + path, json=body, timeout=30,
                             headers={'Authorization': self.token})
        self.inflight = None
        if r.status_code != 200:
            raise Failed('%s: %d %s' % (path, r.status_code, r.text))

    def run(self):
        try:
            while True:
                for _ in range(self.rng.randint(1, 3)):
                    n = self.rng.choice([1, 1, 2])
                    self.send('frame', '/core/frame', {
                        'files': {'frames.xtc.b64': b64(
                            frames(self.next, self.next + n))},
                        'frames': n})
                    self.next += n
                total = self.next
                self.sent.add(total)
                self.send('checkpoint', '/core/checkpoint', {
                    'files': {'state.xml.gz.b64': gzb64(state_of(total))},
                    'frames': total})
                self.acked = total
        except (requests.RequestException, Failed):
            pass


class TestCrashes(unittest.TestCase):

    def test_kill_9_at_random_points_never_loses_or_mixes(self):
        rng = random.Random(int(os.environ.get('CRASH_SEED', '0')) or None)
        ws = ServerProcess('ws', command_centers=CCS)
        ws.start()
        tid, other_tid = str(uuid.uuid4()), str(uuid.uuid4())
        seed = {'state.xml.gz.b64': gzb64(state_of(0))}
        r = ws.request('POST', '/streams', {
            'target_id': tid, 'stream_files': seed,
            'target_files': {'system.xml': '<System/>'}}, token=CC_PASS)
        self.assertEqual(r.status_code, 200, r.text)
        sid = r.json()['stream_id']
        # A bystander stream with one commit that must never change.
        r = ws.request('POST', '/streams', {
            'target_id': other_tid, 'stream_files': seed,
            'target_files': {'system.xml': '<Other/>'}}, token=CC_PASS)
        other = r.json()['stream_id']
        token = ws.request('POST', '/streams/activate', {
            'target_id': other_tid}, token=CC_PASS).json()['token']
        ws.request('PUT', '/core/frame', {'files': {
            'frames.xtc.b64': b64(b'bystander')}}, token=token)
        ws.request('PUT', '/core/checkpoint', {'files': seed}, token=token)
        chunks = os.path.join(ws.settings.data_folder, 'streams', sid,
                              'chunks')
        acked, sent, report = 0, {0}, []
        try:
            for point in range(KILL_POINTS):
                committed = self.check(ws, sid, other, acked, sent)
                r = ws.request('POST', '/streams/activate',
                               {'target_id': tid}, token=CC_PASS)
                self.assertEqual(r.status_code, 200, r.text)
                token = r.json()['token']
                start = ws.request('GET', '/core/start', token=token).json()
                self.assertEqual(int(unb64gz(start['stream_files'][
                    'state.xml.gz.b64']).split(b'\n')[0]), committed)
                core = Core(ws, token, committed, rng.random())
                core.start()
                mode = ('random', 'checkpoint', 'frame')[point % 3]
                if mode == 'random':
                    time.sleep(rng.uniform(0.05, 1.0))
                else:
                    # Let a few checkpoints pass, then strike as one goes.
                    time.sleep(rng.uniform(0.05, 0.4))
                    core.sending[mode].clear()
                    core.sending[mode].wait(30)
                    time.sleep(rng.uniform(0, 0.008))
                inflight = core.inflight
                ws.kill()
                core.join(60)
                self.assertFalse(core.is_alive())
                tmp = glob.glob(os.path.join(chunks, '.tmp-*'))
                buffered = os.path.isdir(os.path.join(
                    os.path.dirname(chunks), 'buffer'))
                acked, sent = core.acked, sent | core.sent
                ws.start()
                after = self.check(ws, sid, other, acked, sent)
                report.append((point, mode, inflight or '-', acked, after,
                               'mid-commit' if tmp else
                               'buffer' if buffered else '-'))
        finally:
            ws.kill()
        lines = ['kill point  mode        in flight   acked  on disk '
                 'after restart  left on disk']
        for p, mode, inflight, a, k, left in report:
            lines.append('%10d  %-10s  %-10s  %5d  %5d %s  %s' % (
                p, mode, inflight, a, k,
                '(= acked)      ' if k == a else '(newer, unacked)', left))
        sys.stderr.write('\n' + '\n'.join(lines) + '\n')
        self.assertEqual(len(report), KILL_POINTS)

    def check(self, ws, sid, other, acked, sent):
        """The stream holds exactly the frames of one checkpoint that is
        not older than the last acknowledged one, with that checkpoint's
        state; returns its frame count."""
        info = ws.request('GET', '/streams/info/' + sid, token=CC_PASS).json()
        k = info['frames']
        self.assertFalse(info['active'])
        self.assertGreaterEqual(k, acked)
        self.assertIn(k, sent)
        r = ws.request('GET', '/streams/%s/frames.xtc' % sid, token=CC_PASS)
        self.assertEqual(r.status_code, 200)
        self.assertEqual(len(r.content), len(frames(0, k)))
        self.assertEqual(r.content, frames(0, k))
        r = ws.request('GET', '/streams/%s/frames.xtc' % other, token=CC_PASS)
        self.assertEqual(r.content, b'bystander')
        return k


class TestRestarts(unittest.TestCase):

    def setUp(self):
        self.ws = ServerProcess('ws', command_centers=CCS, max_stream_fails=2)
        self.ws.start()

    def tearDown(self):
        self.ws.kill()

    def req(self, *args, **kw):
        kw.setdefault('token', CC_PASS)
        r = self.ws.request(*args, **kw)
        return r.status_code, r.json() if r.headers.get(
            'Content-Type', '').startswith('application/json') else r.content

    def new_stream(self, tid, state=b's0', tags=None):
        body = {'target_id': tid,
                'stream_files': {'state.xml.gz.b64': gzb64(state)},
                'target_files': {'system.xml': 'sys'}}
        if tags:
            body['tags'] = tags
        code, reply = self.req('POST', '/streams', body)
        self.assertEqual(code, 200, reply)
        return reply['stream_id']

    def work(self, tid, data, fail=False):
        code, reply = self.req('POST', '/streams/activate',
                               {'target_id': tid})
        self.assertEqual(code, 200, reply)
        token = reply['token']
        self.req('PUT', '/core/frame', {'files': {
            'frames.xtc.b64': b64(data)}}, token=token)
        if fail:
            self.req('PUT', '/core/stop', {'error': b64(b'oops')},
                     token=token)
        else:
            self.req('PUT', '/core/checkpoint', {'files': {
                'state.xml.gz.b64': gzb64(data)}}, token=token)
        return reply['stream_id'], token

    def test_redis_data_lost_rebuilds_from_disk(self):
        t1, t2 = str(uuid.uuid4()), str(uuid.uuid4())
        a, b = self.new_stream(t1, tags={'parent': 'x:y', 'frame': '7'}), \
            self.new_stream(t1)
        c = self.new_stream(t2)
        first, _ = self.work(t1, b'alpha')
        self.work(t2, b'x', fail=True)
        self.work(t2, b'y', fail=True)  # max_stream_fails=2: c STOPPED
        # One more stream left active with a buffer at the crash.
        second, token = self.work(t1, b'beta')
        self.req('PUT', '/core/frame', {'files': {
            'frames.xtc.b64': b64(b'uncommitted')}}, token=token)
        before = {t: self.req('GET', '/targets/streams/' + t)[1]
                  for t in (t1, t2)}
        for streams in before.values():
            for entry in streams.values():
                entry['active'] = False  # cores die with the WS
        self.ws.kill()
        aof = glob.glob(os.path.join(self.ws.settings.data_folder,
                                     'redis', '*.aof'))
        self.assertTrue(aof)
        for path in aof:
            os.unlink(path)
        self.ws.start()
        after = {t: self.req('GET', '/targets/streams/' + t)[1]
                 for t in (t1, t2)}
        self.assertEqual(after, before)
        self.assertEqual(after[t1][a]['tags'], {'parent': 'x:y',
                                                'frame': '7'})
        self.assertEqual(after[t1][b]['tags'], {})
        self.assertEqual(after[t2][c]['status'], 'STOPPED')
        self.assertEqual(after[t2][c]['error_count'], 2)
        self.assertEqual(self.req('GET', '/streams/%s/frames.xtc' % first),
                         (200, b'alpha'))
        self.assertEqual(self.req('GET', '/streams/%s/frames.xtc' % second),
                         (200, b'beta'))
        self.assertEqual(self.req('GET', '/active_streams'), (200, {}))
        self.assertEqual(self.req('POST', '/core/heartbeat', {},
                                  token=token)[0], 401)
        self.assertEqual(self.req('POST', '/streams/activate',
                                  {'target_id': t2})[0], 503)
        self.assertEqual({first, second}, {a, b})
        got = [self.req('POST', '/streams/activate',
                        {'target_id': t1})[1]['stream_id'] for _ in range(2)]
        self.assertEqual(set(got), {a, b})
        self.assertEqual(self.req('POST', '/streams/activate',
                                  {'target_id': t1})[0], 503)
        code, reply = self.req('GET', '/streams/info/' + c)
        self.assertEqual(code, 200)
        self.assertEqual(reply['target_id'], t2)

    def test_expired_core_is_swept_by_the_running_server(self):
        self.ws.stop()
        self.ws = ServerProcess('ws', command_centers=CCS,
                                heartbeat_increment=1,
                                pulse_frequency_in_ms=100)
        self.ws.start()
        tid = str(uuid.uuid4())
        sid = self.new_stream(tid)
        _, token = self.work(tid, b'kept')
        self.req('PUT', '/core/frame', {'files': {
            'frames.xtc.b64': b64(b'dropped')}}, token=token)
        deadline = time.monotonic() + 60
        while self.req('GET', '/streams/info/' + sid)[1]['active']:
            self.assertLess(time.monotonic(), deadline, 'never swept')
            time.sleep(0.05)
        self.assertEqual(self.req('POST', '/core/heartbeat', {},
                                  token=token)[0], 401)
        self.assertEqual(self.req('PUT', '/core/checkpoint', {'files': {
            'state.xml': 'x'}}, token=token)[0], 401)
        self.assertEqual(self.req('GET', '/streams/%s/frames.xtc' % sid),
                         (200, b'kept'))
        code, reply = self.req('POST', '/streams/activate',
                               {'target_id': tid})
        self.assertEqual((code, reply['stream_id']), (200, sid))


class TestConcurrentActivation(unittest.TestCase):

    def test_two_workers_never_hand_out_a_stream_twice(self):
        ws = ServerProcess('ws', command_centers=CCS, num_processes=2)
        ws.start()
        try:
            tid = str(uuid.uuid4())
            streams = set()
            for i in range(12):
                r = ws.request('POST', '/streams', {
                    'target_id': tid,
                    'stream_files': {'state.xml': 's%d' % i},
                    'target_files': {'system.xml': 'sys'}}, token=CC_PASS)
                self.assertEqual(r.status_code, 200, r.text)
                streams.add(r.json()['stream_id'])
            local = threading.local()

            def activate(_):
                if not hasattr(local, 'session'):
                    local.session = requests.Session()
                    local.session.trust_env = False
                    local.session.verify = certs()['ca']
                r = local.session.post(ws.url + '/streams/activate',
                                       json={'target_id': tid}, timeout=60,
                                       headers={'Authorization': CC_PASS})
                return r.status_code, r.json()

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                results = list(pool.map(activate, range(40)))
            won = [reply['stream_id'] for code, reply in results
                   if code == 200]
            refused = [reply for code, reply in results if code == 503]
            self.assertEqual(len(won) + len(refused), 40, results)
            self.assertEqual(sorted(won), sorted(streams))
            self.assertTrue(all('error' in r for r in refused))
            active = ws.request('GET', '/active_streams', token=CC_PASS).json()
            self.assertEqual(set(active[tid]), streams)
        finally:
            ws.stop()
