"""Workserver endpoints in-process over real HTTPS with a real Redis: the
2014 scenarios (post stream, activate, start, frames, checkpoint, download,
stop, delete) plus retries, expiry, error stops, both core generations,
downloads with Range and signed URLs, the disk guard, bad inputs, and the
rebuild of Redis from disk."""
import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import os
import ssl
import time
import uuid
from typing import NamedTuple
from unittest import mock

from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from tornado.simple_httpclient import HTTPStreamClosedError
from tornado.tcpclient import TCPClient
from tornado.testing import ExpectLog

from server import fastredis, signing, store
from server.fastredis import Multiplexed
from server.lua import Script
from server.sessions_common import REASONS
from server.tokens import token_hash
from server.ws import core, locks, recovery, stream_record
from server.ws.app import WorkServer
from tools.testing import (
    CC_PASS,
    AppTestCase,
    RedisTestCase,
    b64,
    certs,
    command_centers,
    gzb64,
)

OTHER_PASS = 'second-cc-pass'
CONF = {'command_centers': dict(command_centers(),
                                cc2={'url': '127.0.0.1:9',
                                     'pass': OTHER_PASS}),
        'max_stream_fails': 3}


def target_files():
    return {'system.xml.gz.b64': gzb64(b'<System/>'),
            'integrator.xml.gz.b64': gzb64(b'<Integrator/>')}


class WSTestCase(AppTestCase):
    kind = 'ws'
    app_class = WorkServer
    conf = CONF

    def tearDown(self):
        self.io_loop.run_sync(self.app.close)
        super().tearDown()

    def cc(self, path, method='GET', body=None, token=CC_PASS, **kw):
        return self.fetch_json(path, method, body, token=token, **kw)

    def new_stream(self, tid=None, state=b'state0', with_target=True):
        tid = tid or str(uuid.uuid4())
        body = {'target_id': tid,
                'stream_files': {'state.xml.gz.b64': gzb64(state)}}
        if with_target:
            body['target_files'] = target_files()
        code, reply = self.cc('/streams', 'POST', body)
        self.assertEqual(code, 200, reply)
        return tid, reply['stream_id']

    def activate(self, tid, donor=None):
        body = {'target_id': tid}
        if donor:
            body['donor_id'] = donor
        code, reply = self.cc('/streams/activate', 'POST', body)
        self.assertEqual(code, 200, reply)
        return reply['token'], reply['stream_id']

    def frame(self, token, data, n=None, name='frames.xtc.b64', code=200):
        body = {'files': {name: b64(data) if name.endswith('.b64')
                          else data.decode()}}
        if n is not None:
            body['frames'] = n
        got, reply = self.fetch_json('/core/frame', 'PUT', body, token=token)
        self.assertEqual(got, code, reply)
        return reply

    def checkpoint(self, token, state, frames=None, extra=None, code=200):
        body = {'files': {'state.xml.gz.b64': gzb64(state)}}
        body['files'].update(extra or {})
        if frames is not None:
            body['frames'] = frames
        got, reply = self.fetch_json('/core/checkpoint', 'PUT', body,
                                     token=token)
        self.assertEqual(got, code, reply)
        return reply

    def download(self, sid, name='frames.xtc', headers=None, token=CC_PASS,
                 query=''):
        headers = dict(headers or {})
        if token is not None:
            headers['Authorization'] = token
        r = self.fetch('/streams/%s/%s%s' % (sid, name, query),
                       headers=headers)
        return r.code, r.body, r.headers

    def info(self, sid):
        code, reply = self.cc('/streams/info/' + sid)
        self.assertEqual(code, 200, reply)
        return reply

    def core_start(self, token):
        r = self.fetch('/core/start', headers={'Authorization': token})
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(r.headers['Content-MD5'],
                         hashlib.md5(r.body).hexdigest())
        return json.loads(r.body)

    def run_sync(self, func, *args):
        return self.io_loop.run_sync(lambda: func(*args))

    def redis_dump(self):
        async def dump():
            out = {}
            async for k in self.redis.scan_iter('*'):
                t = await self.redis.type(k)
                if t == 'hash':
                    out[k] = await self.redis.hgetall(k)
                elif t == 'set':
                    out[k] = sorted(await self.redis.smembers(k))
                elif t == 'zset':
                    out[k] = await self.redis.zrange(k, 0, -1,
                                                     withscores=True)
                elif t == 'stream':  # ended sessions for the CC: records
                    if not k.startswith(self.app.keys.kept):
                        out[k] = await self.redis.xrange(k)
                else:
                    out[k] = await self.redis.get(k)
            return out
        return self.io_loop.run_sync(dump)

    def disk_dump(self):
        root = self.settings.data_folder
        out = {}
        for folder, dirs, files in os.walk(root):
            for d in dirs:
                out[os.path.relpath(os.path.join(folder, d), root)] = None
            for f in files:
                path = os.path.join(folder, f)
                with open(path, 'rb') as fh:
                    out[os.path.relpath(path, root)] = fh.read()
        return out

    def snapshot(self):
        return self.redis_dump(), self.disk_dump()


class TestStreams(WSTestCase):

    def test_post_stream_stores_files_and_queues(self):
        tid, sid = self.new_stream()
        self.assertTrue(sid.endswith(':' + self.settings.name))
        uuid.UUID(sid.split(':')[0])
        folder = self.settings.data_folder
        with open(os.path.join(folder, 'streams', sid, 'seed',
                               'state.xml.gz.b64')) as f:
            self.assertEqual(gzip.decompress(base64.b64decode(f.read())),
                             b'state0')
        with open(os.path.join(folder, 'targets', tid, 'files',
                               'system.xml.gz.b64')) as f:
            self.assertEqual(f.read(), target_files()['system.xml.gz.b64'])
        keys = self.app.keys
        queue = self.run_sync(self.redis.zrange, keys.queue(tid), 0, -1)
        self.assertEqual(queue, [sid])
        info = self.info(sid)
        self.assertEqual(info['target_id'], tid)
        self.assertEqual((info['status'], info['frames'],
                          info['error_count'], info['active']),
                         ('OK', 0, 0, False))
        self.assertLessEqual(info['creation_date'], time.time())
        # A second stream of a known target needs no target files.
        _, sid2 = self.new_stream(tid, with_target=False)
        code, reply = self.cc('/targets/streams/' + tid)
        self.assertEqual(code, 200)
        self.assertEqual(set(reply), {sid, sid2})
        self.assertEqual(reply[sid], {'status': 'OK', 'frames': 0,
                                      'error_count': 0, 'active': False,
                                      'tags': {}})

    def test_target_files_required_first_time_and_names_consistent(self):
        tid = str(uuid.uuid4())
        before = self.snapshot()
        code, reply = self.cc('/streams', 'POST', {
            'target_id': tid, 'stream_files': {'state.xml': 'x'}})
        self.assertEqual(code, 400)
        self.assertIn('target_files', reply['error'])
        self.assertEqual(self.snapshot(), before)
        self.new_stream(tid)
        before = self.snapshot()
        code, reply = self.cc('/streams', 'POST', {
            'target_id': tid, 'stream_files': {'other.xml': 'x'}})
        self.assertEqual(code, 409)
        self.assertEqual(self.snapshot(), before)

    def test_cc_endpoints_need_cc_pass(self):
        tid, sid = self.new_stream()
        calls = [('/streams', 'POST', {'target_id': tid, 'stream_files':
                                       {'state.xml.gz.b64': gzb64(b'x')}}),
                 ('/streams/activate', 'POST', {'target_id': tid}),
                 ('/streams/start/' + sid, 'PUT', {}),
                 ('/streams/stop/' + sid, 'PUT', {}),
                 ('/streams/delete/' + sid, 'PUT', {}),
                 ('/streams/info/' + sid, 'GET', None),
                 ('/targets/streams/' + tid, 'GET', None),
                 ('/targets/delete/' + tid, 'PUT', {}),
                 ('/active_streams', 'GET', None)]
        before = self.snapshot()
        for path, method, body in calls:
            for token in (None, '', 'wrong', 'Bearer wrong', CC_PASS + 'x'):
                code, reply = self.cc(path, method, body, token=token)
                self.assertEqual(code, 401, (path, token, reply))
                self.assertIn('error', reply)
        code = self.download(sid, token='nope')[0]
        self.assertEqual(code, 401)
        self.assertEqual(self.snapshot(), before)
        # The pass of the CC that made the stream works, bare or as a
        # Bearer token (another CC's: TestTwoCommandCenters).
        self.assertEqual(self.cc('/streams/info/' + sid,
                                 token='Bearer ' + CC_PASS)[0], 200)

    def test_unknown_stream_and_target(self):
        sid = '%s:%s' % (uuid.uuid4(), self.settings.name)
        for path, method in [('/streams/info/', 'GET'),
                             ('/streams/start/', 'PUT'),
                             ('/streams/stop/', 'PUT'),
                             ('/streams/delete/', 'PUT')]:
            code, reply = self.cc(path + sid, method)
            self.assertEqual(code, 404, path)
            self.assertIn('error', reply)
        self.assertEqual(self.download(sid)[0], 404)
        tid = str(uuid.uuid4())
        self.assertEqual(self.cc('/targets/streams/' + tid)[0], 404)
        self.assertEqual(self.cc('/targets/delete/' + tid, 'PUT'), (200, {}))
        code, reply = self.cc('/streams/activate', 'POST', {'target_id': tid})
        self.assertEqual(code, 503)
        self.assertIn('error', reply)


class TestActivation(WSTestCase):

    def test_activate_pops_highest_priority_and_503_when_empty(self):
        tid, s1 = self.new_stream()
        _, s2 = self.new_stream(tid, with_target=False)
        token, first = self.activate(tid)
        self.frame(token, b'a')
        self.checkpoint(token, b'b')
        self.fetch_json('/core/stop', 'PUT', {}, token=token)
        # The stream with committed frames comes first now.
        self.assertEqual(self.activate(tid)[1], first)
        self.assertEqual(self.activate(tid)[1], s2 if first == s1 else s1)
        code, reply = self.cc('/streams/activate', 'POST', {'target_id': tid})
        self.assertEqual(code, 503)
        self.assertIn('no stream', reply['error'])

    def test_many_activations_in_one_call(self):
        """Issue 15: the CC's batched form. Each item is activated on
        its own (a token each, its donor recorded), one beyond the free
        streams gets an error of its own; a bad item refuses the whole
        call before anything is activated."""
        tid, s1 = self.new_stream()
        _, s2 = self.new_stream(tid, with_target=False)
        other = str(uuid.uuid4())
        for bad in ([], [{'target_id': tid}] * 65, [{'target_id': tid}, 5],
                    [{'target_id': tid}, {'target_id': 'nope'}],
                    [{'target_id': tid, 'client': 7}],
                    [{'target_id': tid, 'engine': 'x' * 65}]):
            code, reply = self.cc('/streams/activate', 'POST',
                                  {'activations': bad})
            self.assertEqual(code, 400, bad)
            self.assertIn('error', reply)
        self.assertEqual(self.cc('/active_streams'), (200, {}))
        code, reply = self.cc('/streams/activate', 'POST', {'activations': [
            {'target_id': tid, 'donor_id': 'ann', 'client': 'donor:ann'},
            {'target_id': other},
            {'target_id': tid, 'engine': 'openmm', 'core_version': '8'},
            {'target_id': tid}]})
        self.assertEqual(code, 200, reply)
        got = reply['activations']
        self.assertEqual(['token' in r for r in got],
                         [True, False, True, False])
        self.assertIn('no stream', got[1]['error'])
        self.assertEqual({got[0]['stream_id'], got[2]['stream_id']},
                         {s1, s2})
        code, active = self.cc('/active_streams')
        self.assertEqual(active[tid][got[0]['stream_id']]['donor'], 'ann')
        self.assertIsNone(active[tid][got[2]['stream_id']]['donor'])
        for r in (got[0], got[2]):  # the tokens work
            code, start = self.fetch_json('/core/start', token=r['token'])
            self.assertEqual((code, start['stream_id']),
                             (200, r['stream_id']))

    def test_active_streams(self):
        tid, sid = self.new_stream()
        self.assertEqual(self.cc('/active_streams'), (200, {}))
        token, _ = self.activate(tid, donor='donor7')
        self.frame(token, b'x', n=2)
        code, reply = self.cc('/active_streams')
        self.assertEqual(code, 200)
        entry = reply[tid][sid]
        self.assertEqual(entry['donor'], 'donor7')
        self.assertEqual((entry['total_frames'], entry['buffer_frames']),
                         (0, 2))
        self.assertLessEqual(entry['start_time'], time.time())
        self.assertTrue(self.info(sid)['active'])

    def test_stop_and_start_by_cc(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'lost')
        self.assertEqual(self.cc('/streams/stop/' + sid, 'PUT'), (200, {}))
        info = self.info(sid)
        self.assertEqual((info['status'], info['active']), ('STOPPED', False))
        # The token is dead and the buffer gone; nothing to activate.
        self.assertEqual(self.fetch_json('/core/frame', 'PUT', {
            'files': {'a': 'b'}}, token=token)[0], 401)
        self.assertFalse(os.path.exists(self.app.storage.buffer_dir(sid)))
        self.assertEqual(self.cc('/streams/activate', 'POST',
                                 {'target_id': tid})[0], 503)
        self.assertEqual(self.cc('/streams/start/' + sid, 'PUT'), (200, {}))
        self.assertEqual(self.info(sid)['status'], 'OK')
        self.assertEqual(self.activate(tid)[1], sid)
        self.assertEqual(self.download(sid)[1], b'')

    def test_start_of_an_active_stream_keeps_its_core(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.assertEqual(self.cc('/streams/start/' + sid, 'PUT'), (200, {}))
        self.assertTrue(self.info(sid)['active'])
        self.frame(token, b'still mine')
        self.checkpoint(token, b's')
        self.assertEqual(self.cc('/streams/activate', 'POST',
                                 {'target_id': tid})[0], 503)
        self.fetch_json('/core/stop', 'PUT', {}, token=token)
        self.assertEqual(self.activate(tid)[1], sid)

    def test_reactivation_kills_older_token(self):
        tid, sid = self.new_stream()
        old, _ = self.activate(tid)
        self.cc('/streams/stop/' + sid, 'PUT')
        self.cc('/streams/start/' + sid, 'PUT')
        new, _ = self.activate(tid)
        self.assertEqual(self.fetch_json('/core/heartbeat', 'POST', {},
                                         token=old)[0], 401)
        self.assertEqual(self.fetch_json('/core/heartbeat', 'POST', {},
                                         token=new), (200, {}))

    def test_disk_guard(self):
        tid, sid = self.new_stream()
        self.app.config = self.app.config.replace(min_free_disk_in_mb=1 << 40)
        before = self.snapshot()
        for path, body in [('/streams', {
                'target_id': tid, 'stream_files': {
                    'state.xml.gz.b64': gzb64(b'x')}}),
                ('/streams/activate', {'target_id': tid})]:
            code, reply = self.cc(path, 'POST', body)
            self.assertEqual(code, 503)
            self.assertIn('disk', reply['error'])
        self.assertEqual(self.snapshot(), before)
        self.app.config = self.app.config.replace(min_free_disk_in_mb=1)
        self.activate(tid)


class TestCore(WSTestCase):

    def test_frames_checkpoint_download(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        start = self.core_start(token)
        self.assertEqual(start['stream_id'], sid)
        self.assertEqual(start['target_id'], tid)
        self.assertEqual(start['target_files'], target_files())
        self.assertEqual(start['stream_files'],
                         {'state.xml.gz.b64': gzb64(b'state0')})
        self.assertEqual(start['files'], dict(target_files(),
                                              **start['stream_files']))
        # Nothing committed yet: an empty download.
        self.assertEqual(self.download(sid)[:2], (200, b''))
        self.frame(token, b'f1')
        self.frame(token, b'f2f3', n=2)
        self.assertEqual(self.download(sid)[:2], (200, b''))  # uncommitted
        self.checkpoint(token, b'state3')
        self.assertEqual(self.info(sid)['frames'], 3)
        code, body, headers = self.download(sid)
        self.assertEqual((code, body), (200, b'f1f2f3'))
        self.assertEqual(headers['Content-Type'], 'application/octet-stream')
        self.frame(token, b'f4')
        self.checkpoint(token, b'state4')
        self.assertEqual(self.download(sid)[1], b'f1f2f3f4')
        self.assertEqual(self.info(sid)['frames'], 4)
        # The restart point is the newest checkpoint.
        state = self.core_start(token)['stream_files']['state.xml.gz.b64']
        self.assertEqual(gzip.decompress(base64.b64decode(state)), b'state4')
        # A file never sent once frames were committed is unknown.
        self.assertEqual(self.download(sid, 'other.dat')[0], 404)
        # The chunks on disk.
        chunks = self.app.storage.chunks(sid)
        self.assertEqual([(s, n) for s, n, _ in chunks], [(1, 3), (2, 1)])

    def test_chunks_past_nine_stay_in_order(self):
        """A checkpoint finds the newest chunk and the committed count in
        one listing (Storage.head); seqs past 9 and a commit's temporary
        folder do not confuse it."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        storage = self.app.storage
        os.mkdir(os.path.join(storage.chunks_dir(sid), '.tmp-left'))
        sent = b''
        for i in range(1, 13):
            data = b'<%d>' % i
            self.frame(token, data, n=i)
            sent += data
            self.checkpoint(token, b'state%d' % i)
        total = sum(range(1, 13))
        self.assertEqual(storage.head(sid), (12, total))
        self.assertEqual([(s, n) for s, n, _ in storage.chunks(sid)],
                         [(i, i) for i in range(1, 13)])
        self.assertEqual(self.info(sid)['frames'], total)
        self.assertEqual(self.download(sid)[1], sent)
        state = self.core_start(token)['stream_files']['state.xml.gz.b64']
        self.assertEqual(gzip.decompress(base64.b64decode(state)),
                         b'state12')

    def test_gz_frames_are_gunzipped(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.fetch_json('/core/frame', 'PUT', {'files': {
            'log.txt.gz.b64': gzb64(b'hello '), 'plain.txt': 'text'}},
            token=token)
        self.frame(token, b'world', name='log.txt.b64')
        self.checkpoint(token, b's')
        self.assertEqual(self.download(sid, 'log.txt')[1], b'hello world')
        self.assertEqual(self.download(sid, 'plain.txt')[1], b'text')

    def test_retries_are_idempotent(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'f1')
        self.frame(token, b'f1')  # the same body again: a retry
        self.assertEqual(self.cc('/active_streams')[1][tid][sid]
                         ['buffer_frames'], 1)
        self.frame(token, b'f2')
        self.checkpoint(token, b's2')
        # A retry (empty buffer) is a no-op, but for the core's expiry (a
        # checkpoint is a sign of life).
        def snapshot():
            redis, disk = self.snapshot()
            redis.pop(self.app.keys.heartbeats)
            return redis, disk
        before = snapshot()
        self.checkpoint(token, b's2')
        self.checkpoint(token, b'other')
        self.assertEqual(snapshot(), before)
        self.assertEqual(self.download(sid)[1], b'f1f2')
        self.assertEqual(self.info(sid)['frames'], 2)

    def test_frame_counts_are_variadic(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'abc', n=3)
        self.frame(token, b'defgh', n=5)
        self.checkpoint(token, b's')
        self.assertEqual(self.info(sid)['frames'], 8)
        self.assertEqual(self.download(sid)[1], b'abcdefgh')
        self.assertEqual(self.app.storage.chunks(sid)[0][:2], (1, 8))

    def test_core_2014(self):
        """Reads target_files/stream_files, sends speed, no frames on
        checkpoints, no Content-MD5."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        r = self.fetch('/core/start', headers={'Authorization': token})
        start = json.loads(r.body)
        self.assertIn('system.xml.gz.b64', start['target_files'])
        self.assertIn('state.xml.gz.b64', start['stream_files'])
        for i in range(3):
            code, _ = self.fetch_json('/core/frame', 'PUT', {
                'files': {'frames.xtc.b64': b64(b'<%d>' % i)}}, token=token)
            self.assertEqual(code, 200)
            self.assertEqual(self.fetch_json('/core/heartbeat', 'POST',
                                             {'speed': 0}, token=token),
                             (200, {}))
        self.assertEqual(self.fetch_json('/core/checkpoint', 'PUT', {
            'files': {'state.xml.gz.b64': gzb64(b'S')}, 'speed': 0},
            token=token), (200, {}))
        self.assertEqual(self.fetch_json('/core/stop', 'PUT', {},
                                         token=token), (200, {}))
        self.assertEqual(self.download(sid)[1], b'<0><1><2>')
        info = self.info(sid)
        self.assertEqual((info['frames'], info['active'], info['status']),
                         (3, False, 'OK'))

    def test_later_core(self):
        """Reads `files`, sends Content-MD5, `frames` on checkpoints and an
        extra partial_steps.gz.b64 checkpoint file."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)

        def send(path, method, body):
            raw = json.dumps(body)
            return self.fetch_json(path, method, raw, token=token, headers={
                'Content-MD5': hashlib.md5(raw.encode()).hexdigest()})

        files = self.core_start(token)['files']
        self.assertIn('state.xml.gz.b64', files)
        self.assertIn('integrator.xml.gz.b64', files)
        self.assertEqual(send('/core/frame', 'PUT', {
            'files': {'frames.xtc.b64': b64(b'xy')}, 'frames': 2}), (200, {}))
        # The core's count is only compared with the buffer's (2 frames).
        with self.assertLogs('siegetank.ws.core', 'WARNING') as logs:
            self.assertEqual(send('/core/checkpoint', 'PUT', {
                'files': {'state.xml.gz.b64': gzb64(b'S2'),
                          'partial_steps.gz.b64': gzb64(b'17')},
                'frames': 3.5}), (200, {}))
        self.assertIn('the core counts 3.5 frames since its last '
                      'checkpoint, the buffer holds 2', logs.output[0])
        self.assertEqual(self.info(sid)['frames'], 2)
        files = self.core_start(token)['files']
        self.assertEqual(gzip.decompress(base64.b64decode(
            files['partial_steps.gz.b64'])), b'17')
        self.assertEqual(gzip.decompress(base64.b64decode(
            files['state.xml.gz.b64'])), b'S2')
        # A wrong Content-MD5 is refused and changes nothing.
        before = self.snapshot()
        code, reply = self.fetch_json('/core/frame', 'PUT', json.dumps({
            'files': {'frames.xtc.b64': b64(b'zz')}}), token=token,
            headers={'Content-MD5': hashlib.md5(b'other').hexdigest()})
        self.assertEqual(code, 400)
        self.assertIn('Content-MD5', reply['error'])
        self.assertEqual(self.snapshot(), before)

    def test_stop_with_error_counts_and_stops_stream(self):
        tid, sid = self.new_stream()
        for i in range(2):
            token, _ = self.activate(tid)
            self.frame(token, b'lost')
            self.assertEqual(self.fetch_json('/core/stop', 'PUT', {
                'error': b64(b'NaN at step %d' % i)}, token=token), (200, {}))
            info = self.info(sid)
            self.assertEqual((info['error_count'], info['status'],
                              info['active']), (i + 1, 'OK', False))
        log = self.app.storage.read_errors(sid)
        self.assertIn('NaN at step 0', log)
        self.assertIn('NaN at step 1', log)
        # A successful checkpoint resets the consecutive count.
        token, _ = self.activate(tid)
        self.frame(token, b'ok')
        self.checkpoint(token, b's')
        self.assertEqual(self.info(sid)['error_count'], 0)
        self.assertEqual(self.app.storage.stream_meta(sid)['error_count'], 0)
        self.fetch_json('/core/stop', 'PUT', {}, token=token)
        for _i in range(3):  # max_stream_fails = 3
            token, _ = self.activate(tid)
            self.fetch_json('/core/stop', 'PUT', {'error': b64(b'bad')},
                            token=token)
        info = self.info(sid)
        self.assertEqual((info['status'], info['error_count']),
                         ('STOPPED', 3))
        self.assertEqual(self.app.storage.stream_meta(sid)['status'],
                         'STOPPED')
        self.assertEqual(self.cc('/streams/activate', 'POST',
                                 {'target_id': tid})[0], 503)
        self.cc('/streams/start/' + sid, 'PUT')
        info = self.info(sid)
        self.assertEqual((info['status'], info['error_count']), ('OK', 0))
        self.assertEqual(self.download(sid)[1], b'ok')

    def test_anonymous_error_stops_back_off(self):
        tid, sid = self.new_stream()
        doubling = []
        for i in range(3):
            code, reply = self.cc('/streams/activate', 'POST', {
                'target_id': tid, 'client': 'addr:198.51.%d.7' % i})
            self.assertEqual(code, 200, reply)
            self.fetch_json('/core/stop', 'PUT', {'error': b64(b'x')},
                            token=reply['token'])
            info = self.info(sid)
            self.assertEqual((info['status'], info['error_count']),
                             ('OK', 0))
            # Not handed out until the back-off ends; counted as queued.
            self.assertEqual(self.cc('/streams/activate', 'POST',
                                     {'target_id': tid})[0], 503)
            self.assertEqual(self.cc('/stats/report')[1]['streams'],
                             {'ok': 1, 'active': 0, 'stopped': 0})
            until = self.run_sync(self.redis.zscore, self.app.keys.backoff,
                                  sid)
            doubling.append(until)
            self.run_sync(self.redis.zadd, self.app.keys.backoff, {sid: 1})
            self.assertEqual(self.run_sync(stream_record.requeue_due,
                                           self.app), 1)
        # 60, 120, 240 s from each stop.
        self.assertGreater(doubling[2] - doubling[1], 100)
        # Vouched ones count, once per /24.
        for client in ('addr:198.51.0.7', 'addr:198.51.0.8',
                       'addr:198.51.1.7'):
            code, reply = self.cc('/streams/activate', 'POST', {
                'target_id': tid, 'client': client, 'vouched': True})
            self.fetch_json('/core/stop', 'PUT', {'error': b64(b'x')},
                            token=reply['token'])
        self.assertEqual(self.info(sid)['error_count'], 2)

    def test_heartbeat_expiry_requeues_and_kills_token(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'committed')
        self.checkpoint(token, b's')
        self.frame(token, b'buffered')
        hb = self.app.keys.heartbeats
        before = self.run_sync(self.redis.zscore, hb, sid)
        self.assertEqual(self.fetch_json('/core/heartbeat', 'POST', {},
                                         token=token), (200, {}))
        self.assertGreaterEqual(self.run_sync(self.redis.zscore, hb, sid),
                                before)
        self.run_sync(core.sweep, self.app)  # not expired: nothing happens
        self.assertTrue(self.info(sid)['active'])
        # The core goes silent past its expiry.
        self.run_sync(self.redis.zadd, hb, {sid: time.time() - 1})
        self.assertEqual(self.fetch_json('/core/heartbeat', 'POST', {},
                                         token=token)[0], 401)
        self.run_sync(core.sweep, self.app)
        info = self.info(sid)
        self.assertEqual((info['active'], info['status'], info['frames']),
                         (False, 'OK', 1))
        self.assertIsNone(self.run_sync(self.redis.zscore, hb, sid))
        for path, method in [('/core/start', 'GET'), ('/core/frame', 'PUT'),
                             ('/core/checkpoint', 'PUT'),
                             ('/core/heartbeat', 'POST'),
                             ('/core/stop', 'PUT')]:
            body = None if method == 'GET' else json.dumps(
                {'files': {'a.b64': b64(b'x')}})
            code, _ = self.fetch_json(path, method, body, token=token)
            self.assertEqual(code, 401, path)
        self.assertEqual(self.cc('/active_streams'), (200, {}))
        token2, got = self.activate(tid)
        self.assertEqual(got, sid)
        self.frame(token2, b'next')
        self.checkpoint(token2, b's2')
        self.assertEqual(self.download(sid)[1], b'committednext')

    def test_a_dead_token_says_why_its_activation_ended(self):
        """The 401 of a token whose activation is over names the reason
        (`ended`), so a core tells a manager's stop from its own failure;
        a token never seen gets no reason."""
        self.assertEqual(set(core.ENDED_MESSAGES), set(REASONS))
        tid, sid = self.new_stream()
        for _ in range(2):
            self.new_stream(tid, with_target=False)

        def ended(token, path='/core/heartbeat', method='POST'):
            code, reply = self.fetch_json(path, method, {}, token=token)
            self.assertEqual(code, 401, reply)
            self.assertIn('error', reply)
            return reply.get('ended')

        halted, hsid = self.activate(tid)
        self.cc('/streams/stop/' + hsid, 'PUT')
        self.assertEqual(ended(halted), 'manager_stop')
        self.assertEqual(ended(halted, '/core/frame', 'PUT'), 'manager_stop')
        stopped, _ = self.activate(tid)
        self.assertEqual(self.fetch_json('/core/stop', 'PUT', {},
                                         token=stopped), (200, {}))
        self.assertEqual(ended(stopped, '/core/stop', 'PUT'), 'stop')
        self.assertLessEqual(self.run_sync(self.redis.ttl, self.app.keys.ended(
            token_hash(stopped))), stream_record.STOP_KEPT_S)
        silent, ssid = self.activate(tid)
        self.run_sync(self.redis.zadd, self.app.keys.heartbeats,
                      {ssid: time.time() - 1})
        self.run_sync(core.sweep, self.app)
        self.assertEqual(ended(silent), 'expiry')
        deleted, dsid = self.activate(tid)
        self.cc('/streams/delete/' + dsid, 'PUT')
        self.assertEqual(ended(deleted, '/core/checkpoint', 'PUT'),
                         'deletion')
        self.assertIsNone(ended('never-issued'))
        # It is kept until the token would have expired and a grace more.
        ttl = self.run_sync(self.redis.ttl, self.app.keys.ended(
            token_hash(halted)))
        self.assertGreater(ttl, stream_record.ENDED_GRACE_S)
        self.assertLessEqual(ttl, stream_record.ENDED_GRACE_S
                             + self.app.config.core_start_window_in_s)

    def test_core_endpoints_need_a_live_token(self):
        tid, sid = self.new_stream()
        for token in (None, 'nonsense', ''):
            r = self.fetch('/core/start', headers={'Authorization': token}
                           if token is not None else {})
            self.assertEqual(r.code, 401)
            self.assertIn(b'error', r.body)


class TestFramePath(WSTestCase):
    """Frames of a token this worker saw live take the lean path (no
    RequestHandler): the same replies, errors, log and metrics."""

    def handled(self):
        """Counts FrameHandler requests from now on."""
        seen = []
        real = core.FrameHandler.authenticate

        async def authenticate(handler):
            seen.append(1)
            return await real(handler)
        patch = mock.patch.object(core.FrameHandler, 'authenticate',
                                  authenticate)
        patch.start()
        self.addCleanup(patch.stop)
        return seen

    def test_known_token_takes_the_lean_path(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        seen = self.handled()
        self.frame(token, b'one')  # first: the handler, the token learnt
        self.assertEqual(len(seen), 1)
        r = self.fetch('/core/frame', method='PUT', body=json.dumps(
            {'files': {'frames.xtc.b64': b64(b'two')}}),
            headers={'Authorization': 'Bearer ' + token})
        self.assertEqual((r.code, r.body), (200, b'{}'))
        self.assertEqual(len(seen), 1)
        self.assertEqual(r.headers['Content-Type'],
                         'application/json; charset=UTF-8')
        self.assertIn('Date', r.headers)
        self.assertNotIn('Server', r.headers)
        # Bad bodies: the handler's JSON errors; nothing stored.
        for body, headers, error in (
                (b'{nope', {}, 'not valid JSON'),
                (b'[]', {}, 'must be a JSON object'),
                (b'{}', {}, 'missing field files'),
                (b'{}', {'Content-MD5': 'ab' * 16}, 'Content-MD5')):
            headers['Authorization'] = token
            code, reply = self.fetch_json('/core/frame', 'PUT', body,
                                          headers=headers)
            self.assertEqual(code, 400)
            self.assertIn(error, reply['error'])
        self.frame(token, b'two')  # a retry of the accepted frame
        self.assertEqual(len(seen), 1)
        self.checkpoint(token, b's1')
        self.assertEqual(self.download(sid)[1], b'onetwo')
        # A token ended meanwhile: a 401 once the body is in, saying why.
        self.assertEqual(self.cc('/streams/stop/' + sid, 'PUT'), (200, {}))
        self.assertEqual(self.frame(token, b'x', code=401)['ended'],
                         'manager_stop')
        self.assertEqual(len(seen), 1)
        self.assertFalse(os.path.exists(self.app.storage.buffer_dir(sid)))
        # Now unknown again: the handler refuses it before its body.
        self.frame(token, b'x', code=401)
        self.assertEqual(len(seen), 2)


    def test_a_token_that_keeps_sending_stays_on_the_lean_path(self):
        """Each request Redis found live renews the token's trust."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        seen = self.handled()
        patch = mock.patch.object(core, 'TOKEN_CACHE_S', 0.5)
        patch.start()
        self.addCleanup(patch.stop)
        self.frame(token, b'a')  # the handler: the token learnt
        for data in (b'b', b'c', b'd'):
            time.sleep(0.3)  # 0.9 s after it was learnt, 0.3 after the last
            self.frame(token, data)
        self.assertEqual(len(seen), 1)
        time.sleep(0.6)  # quiet past the trust: Redis is asked again
        self.frame(token, b'e')
        self.assertEqual(len(seen), 2)
        self.checkpoint(token, b's')
        self.assertEqual(self.download(sid)[1], b'abcde')

    def test_checkpoints_and_heartbeats_of_a_known_token_too(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')  # the token learnt
        seen = []
        for cls in (core.CoreHandler, core.LockedCoreHandler):
            real = cls.authenticate

            async def authenticate(handler, real=real):
                seen.append(type(handler).__name__)
                return await real(handler)
            patch = mock.patch.object(cls, 'authenticate', authenticate)
            patch.start()
            self.addCleanup(patch.stop)
        self.assertEqual(self.fetch_json('/core/heartbeat', 'POST', {},
                                         token=token), (200, {}))
        # A bad checkpoint: the handler's 400s, and its lock freed.
        for body, error in ((b'{nope', 'not valid JSON'),
                            (b'{}', 'missing field files'),
                            (json.dumps({'files': {'s.b64': 'x'},
                                         'frames': -1}), 'frames')):
            code, reply = self.fetch_json('/core/checkpoint', 'PUT', body,
                                          token=token)
            self.assertEqual(code, 400, reply)
            self.assertIn(error, reply['error'])
        self.checkpoint(token, b's1')
        self.frame(token, b'two')
        self.checkpoint(token, b's2', frames=1)
        self.assertEqual(seen, [])
        self.assertEqual(self.download(sid)[1], b'onetwo')
        self.assertEqual(self.info(sid)['frames'], 2)
        # Ended meanwhile: a 401 once the body is in, saying why.
        self.assertEqual(self.cc('/streams/stop/' + sid, 'PUT'), (200, {}))
        code, reply = self.fetch_json('/core/heartbeat', 'POST', {},
                                      token=token)
        self.assertEqual((code, reply['ended']), (401, 'manager_stop'))
        self.assertEqual(self.checkpoint(token, b's3', code=401)['ended'],
                         'manager_stop')
        self.assertEqual(seen, [])

    def test_a_core_connection_keeps_its_read_interest(self):
        """Between a core's requests on one connection the loop's interest
        in its reads stays: no epoll change per request, though each
        frame's head and the start of its body come before the rest."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')  # the token learnt
        sent, changes = [b'one'], []
        real = self.io_loop.update_handler

        async def frames():
            ctx = ssl.create_default_context(cafile=certs()['ca'])
            stream = await TCPClient().connect(
                '127.0.0.1', self.get_http_port(), ssl_options=ctx)
            mine = stream.socket.fileno()

            def update(fd, events):
                if getattr(fd, 'fileno', lambda: fd)() != mine:
                    changes.append(events)
                return real(fd, events)
            for k in range(6):
                sent.append(os.urandom(3000))
                body = json.dumps({'files': {'frames.xtc.b64': b64(
                    sent[-1])}}).encode()
                await stream.write(
                    b'PUT /core/frame HTTP/1.1\r\nHost: x\r\n'
                    b'Authorization: %s\r\nContent-Length: %d\r\n\r\n'
                    % (token.encode(), len(body)) + body[:100])
                await asyncio.sleep(0.05)
                await stream.write(body[100:])
                head = await stream.read_until(b'\r\n\r\n')
                self.assertTrue(head.startswith(b'HTTP/1.1 200 '), head)
                self.assertEqual(await stream.read_bytes(2), b'{}')
                if k == 0:  # past the TLS handshake: count from here
                    patch = mock.patch.object(self.io_loop,
                                              'update_handler', update)
                    patch.start()
                    self.addCleanup(patch.stop)
            stream.close()
        self.io_loop.run_sync(frames)
        self.assertEqual(changes, [])
        self.checkpoint(token, b's1')
        self.assertEqual(self.download(sid)[1], b''.join(sent))

    def test_no_deadline_while_a_request_is_served(self):
        """The wait for a request's head has a deadline, serving it none:
        a frame whose head and body came in one read near the end of that
        wait is answered, however long its store takes."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')  # the token learnt
        self.http_server.header_timeout = 1.0
        real = core.store_frame

        async def slow(*args, **kwargs):
            await asyncio.sleep(2.5)  # past the head's deadline
            return await real(*args, **kwargs)

        async def frames():
            ctx = ssl.create_default_context(cafile=certs()['ca'])
            stream = await TCPClient().connect(
                '127.0.0.1', self.get_http_port(), ssl_options=ctx)
            for k, data in enumerate((b'two', b'three')):
                if k:
                    await asyncio.sleep(0.5)
                    patch = mock.patch.object(core, 'store_frame', slow)
                    patch.start()
                    self.addCleanup(patch.stop)
                body = json.dumps({'files': {'frames.xtc.b64': b64(
                    data)}}).encode()
                await stream.write(
                    b'PUT /core/frame HTTP/1.1\r\nHost: x\r\n'
                    b'Authorization: %s\r\nContent-Length: %d\r\n\r\n%s'
                    % (token.encode(), len(body), body))
                head = await asyncio.wait_for(
                    stream.read_until(b'\r\n\r\n'), 10)
                self.assertTrue(head.startswith(b'HTTP/1.1 200 '), head)
                self.assertEqual(await stream.read_bytes(2), b'{}')
            stream.close()
        self.io_loop.run_sync(frames, timeout=30)
        self.checkpoint(token, b's1')
        self.assertEqual(self.download(sid)[1], b'onetwothree')


class TestCheckpointOnTheLoop(WSTestCase):
    """A checkpoint builds its chunk on the event loop and sends only the
    flushes to a disk thread; with the buffer's lock taken it waits for
    it in a thread, as before."""

    def threaded(self):
        """The names of the functions sent to disk threads from now on."""
        names = []
        real = core.threads.disk

        class Recorded:
            async def __call__(self, func, *args, **kw):
                names.append(getattr(func, '__name__', repr(func)))
                return await real(func, *args, **kw)

            async def then(self, free, func, *args):
                names.append(func.__name__)
                return await real.then(free, func, *args)
        patch = mock.patch.object(core.threads, 'disk', Recorded())
        patch.start()
        self.addCleanup(patch.stop)
        return names

    def started(self):
        """A stream past its first checkpoint with a frame buffered, and
        its token."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')
        self.checkpoint(token, b's1')
        self.frame(token, b'two')
        return sid, token

    def test_only_the_flushes_leave_the_loop(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')
        names = self.threaded()
        # A new stream's committed bytes are known (0): no disk scan.
        self.checkpoint(token, b's1')
        self.assertEqual(names, ['publish_chunk'])
        self.frame(token, b'two')
        self.checkpoint(token, b's2')
        self.assertEqual(names, ['publish_chunk'] * 2)
        self.assertEqual(self.download(sid)[1], b'onetwo')

    def test_many_chunks_are_listed_in_a_thread(self):
        sid, token = self.started()
        names = self.threaded()
        patch = mock.patch.object(self.app.storage, 'FEW_CHUNKS', 2)
        patch.start()
        self.addCleanup(patch.stop)
        self.checkpoint(token, b's2')  # one chunk so far: few
        self.frame(token, b'three')
        self.checkpoint(token, b's3')  # two: many
        self.assertEqual(names, ['publish_chunk', 'commit_waiting'])
        self.assertEqual(self.download(sid)[1], b'onetwothree')

    def test_a_busy_buffer_is_waited_for(self):
        sid, token = self.started()
        names = self.threaded()
        storage = self.app.storage
        fd = storage.lock_buffer(sid)
        self.io_loop.call_later(0.3, storage.unlock_buffer, fd)
        self.checkpoint(token, b's2')
        self.assertEqual(names, ['commit_waiting'])
        self.assertEqual(self.download(sid)[1], b'onetwo')
        self.assertEqual(self.info(sid)['frames'], 2)


class TestLostActivation(WSTestCase):
    """An activation whose reply never reached a core (the CC timed out,
    the connection was cut after the request was sent): its stream comes
    back once the start window passes, not after a whole heartbeat."""

    conf = dict(CONF, core_start_window_in_s=1, heartbeat_increment=900)

    def test_token_that_never_reached_core_start_is_taken_back(self):
        tid, _ = self.new_stream()
        self.new_stream(tid, with_target=False)
        started, a = self.activate(tid)
        _lost, b = self.activate(tid)  # the reply of this one is lost
        self.core_start(started)  # out of the start window
        time.sleep(1.2)
        self.run_sync(core.sweep, self.app)
        self.assertTrue(self.info(a)['active'])
        self.assertFalse(self.info(b)['active'])
        self.assertEqual(self.activate(tid)[1], b)
        self.frame(started, b'kept')
        self.checkpoint(started, b's1')
        self.assertEqual(self.download(a)[1], b'kept')


class TestDownload(WSTestCase):

    def setUp(self):
        super().setUp()
        self.tid, self.sid = self.new_stream()
        token, _ = self.activate(self.tid)
        self.data = bytes(range(256)) * 10
        for i in range(0, len(self.data), 700):  # chunks of varying sizes
            self.frame(token, self.data[i:i + 700])
            self.checkpoint(token, b's%d' % i)
        self.assertGreater(len(self.app.storage.chunks(self.sid)), 2)

    def test_full_and_ranges(self):
        data, n = self.data, len(self.data)
        code, body, headers = self.download(self.sid)
        self.assertEqual((code, body), (200, data))
        self.assertEqual(headers['Accept-Ranges'], 'bytes')
        for rng, lo, hi in [('bytes=0-0', 0, 0), ('bytes=10-', 10, n - 1),
                            ('bytes=650-1450', 650, 1450),
                            ('bytes=-5', n - 5, n - 1),
                            ('bytes=100-999999', 100, n - 1),
                            ('bytes=-999999', 0, n - 1)]:
            code, body, headers = self.download(self.sid,
                                                headers={'Range': rng})
            self.assertEqual(code, 206, rng)
            self.assertEqual(body, data[lo:hi + 1], rng)
            self.assertEqual(headers['Content-Range'],
                             'bytes %d-%d/%d' % (lo, hi, n))
        for rng in ('bytes=%d-' % n, 'bytes=-0'):
            code, body, headers = self.download(self.sid,
                                                headers={'Range': rng})
            self.assertEqual(code, 416, rng)
            self.assertEqual(headers['Content-Range'], 'bytes */%d' % n)
            self.assertIn('error', json.loads(body))
        code, body, _ = self.download(self.sid, headers={'Range': 'junk'})
        self.assertEqual((code, body), (200, data))

    def test_signed_urls(self):
        name = 'frames.xtc'
        q = '?' + signing.query(CC_PASS, self.sid, name, 60)
        code, body, _ = self.download(self.sid, token=None, query=q)
        self.assertEqual((code, body), (200, self.data))
        # The key is derived from the pass, never the pass itself; and it
        # is the key of the CC that made the stream.
        expires = int(time.time()) + 60
        raw = hmac.new(CC_PASS.encode(), ('%s/%s/%d' % (
            self.sid, name, expires)).encode(), hashlib.sha256).hexdigest()
        self.assertNotEqual(signing.url_key(CC_PASS), CC_PASS.encode())
        bad = ['expires=%d&signature=%s' % (expires, raw),
               signing.query(OTHER_PASS, self.sid, name, 60),
               signing.query('not-a-cc', self.sid, name, 60),
               signing.query(CC_PASS, self.sid, 'other.xtc', 60),
               'expires=%d&signature=%s' % (
                   int(time.time()) - 5,
                   signing.signature(CC_PASS, self.sid, name,
                                     int(time.time()) - 5)),
               'expires=x&signature=y', '']
        for q in bad:
            code, body, _ = self.download(self.sid, token=None,
                                          query='?' + q)
            self.assertEqual(code, 401, q)
            self.assertIn('error', json.loads(body))


    def test_delete_during_a_download_ends_it_cleanly(self):
        """Whole chunks (frames) sent, then the connection closes; nothing
        logged as uncaught; the next download is a 404."""
        from server.ws import download
        real = download.read_at
        calls = []

        def read_then_delete(f, offset, length):
            data = real(f, offset, length)
            if not calls:  # the stream goes right after the first read
                self.app.storage.remove_stream(self.sid)
            calls.append(length)
            return data
        download.read_at = read_then_delete
        self.addCleanup(setattr, download, 'read_at', real)
        got = []
        with ExpectLog('siegetank', '.*', required=False) as ours, \
                ExpectLog('tornado', '.*', required=False) as tornados:
            with self.assertRaises(HTTPStreamClosedError):  # a short body
                self.fetch('/streams/%s/frames.xtc' % self.sid,
                           headers={'Authorization': CC_PASS},
                           streaming_callback=got.append)
        self.assertEqual(b''.join(got), self.data[:700])  # chunk 1 whole
        self.assertEqual(len(calls), 1)
        self.assertFalse(ours.logged_stack or tornados.logged_stack)
        self.assertEqual(self.cc('/streams/delete/' + self.sid, 'PUT')[0],
                         200)
        self.assertEqual(self.download(self.sid)[0], 404)

    def test_delete_before_the_first_byte_is_a_404(self):
        real = self.app.storage.download_parts

        def parts_then_delete(sid, name):
            parts = real(sid, name)
            self.app.storage.remove_stream(sid)
            return parts
        self.app.storage.download_parts = parts_then_delete
        self.addCleanup(setattr, self.app.storage, 'download_parts', real)
        code, body, _ = self.download(self.sid)
        self.assertEqual(code, 404)
        self.assertIn('deleted', json.loads(body)['error'])
class TestTwoCommandCenters(WSTestCase):
    """A WS serving two CCs: each sees and acts on its own streams and
    targets only; the other's are unknown to it (404), and a stream of the
    other's target cannot be made (403)."""

    def test_streams_belong_to_the_cc_that_made_them(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'f1')
        self.checkpoint(token, b's1')
        before = self.snapshot()
        for path, method in [('/streams/info/', 'GET'),
                             ('/streams/start/', 'PUT'),
                             ('/streams/stop/', 'PUT'),
                             ('/streams/delete/', 'PUT')]:
            code, reply = self.cc(path + sid, method, token=OTHER_PASS)
            self.assertEqual(code, 404, (path, reply))
        for path, method in [('/targets/streams/', 'GET'),
                             ('/targets/delete/', 'PUT')]:
            code, reply = self.cc(path + tid, method, token=OTHER_PASS)
            self.assertEqual(code, 404, (path, reply))
        self.assertEqual(self.cc('/active_streams', token=OTHER_PASS),
                         (200, {}))
        code, reply = self.cc('/streams/activate', 'POST',
                              {'target_id': tid}, token=OTHER_PASS)
        self.assertEqual(code, 503, reply)
        code, reply = self.cc('/streams', 'POST', {
            'target_id': tid, 'target_files': target_files(),
            'stream_files': {'state.xml.gz.b64': gzb64(b'x')}},
            token=OTHER_PASS)
        self.assertEqual(code, 403, reply)
        self.assertEqual(self.download(sid, token=OTHER_PASS)[0], 404)
        q = '?' + signing.query(OTHER_PASS, sid, 'frames.xtc', 60)
        self.assertEqual(self.download(sid, token=None, query=q)[0], 401)
        self.assertEqual(self.snapshot(), before)
        # The owner still does everything.
        self.assertEqual(self.download(sid)[1], b'f1')
        self.assertIn(sid, self.cc('/targets/streams/' + tid)[1])
        self.assertIn(tid, self.cc('/active_streams')[1])
        # The other CC's own target is its own, and unknown to the first.
        code, reply = self.cc('/streams', 'POST', {
            'target_id': str(uuid.uuid4()), 'target_files': target_files(),
            'stream_files': {'state.xml.gz.b64': gzb64(b'x')}},
            token=OTHER_PASS)
        self.assertEqual(code, 200, reply)
        other = reply['stream_id']
        self.assertEqual(self.cc('/streams/info/' + other)[0], 404)
        self.assertEqual(self.cc('/streams/info/' + other,
                                 token=OTHER_PASS)[0], 200)

    def test_each_cc_reports_only_its_own(self):
        mine, s1 = self.new_stream()
        _, s2 = self.new_stream(mine, with_target=False)
        token, _ = self.activate(mine)
        self.frame(token, b'f', n=3)
        self.checkpoint(token, b's')
        theirs = str(uuid.uuid4())
        code, reply = self.cc('/streams', 'POST', {
            'target_id': theirs, 'target_files': target_files(),
            'stream_files': {'state.xml.gz.b64': gzb64(b'x')}},
            token=OTHER_PASS)
        self.assertEqual(code, 200, reply)
        code, reply = self.cc('/streams/activate', 'POST',
                              {'target_id': theirs}, token=OTHER_PASS)
        other = reply['token']
        self.frame(other, b'g', n=5)
        self.checkpoint(other, b's')
        self.fetch_json('/core/stop', 'PUT', {'error': b64(b'x')},
                        token=other)
        for token, tid, ok, active, frames, errors in (
                (CC_PASS, mine, 1, 1, 3, 0),
                (OTHER_PASS, theirs, 1, 0, 5, 1)):
            code, report = self.cc('/stats/report', token=token)
            self.assertEqual(code, 200, report)
            self.assertEqual(list(report['targets']), [tid])
            self.assertEqual(report['streams'], {
                'ok': ok, 'active': active, 'stopped': 0})
            minutes = report['per_minute'].values()
            self.assertEqual(sum(m['frames'] for m in minutes), frames)
            self.assertEqual(sum(m['errors'] for m in minutes), errors)
            self.assertEqual({s['target_id'] for s in report['sessions']},
                             {tid} if errors else set())

    def test_owner_survives_a_rebuild_from_disk(self):
        tid, sid = self.new_stream()
        recovery.prepare(self.settings, self.redis_server.url)
        self.assertEqual(self.cc('/streams/info/' + sid,
                                 token=OTHER_PASS)[0], 404)
        self.assertEqual(self.cc('/streams/info/' + sid)[0], 200)


class TestDelete(WSTestCase):

    def ws_keys(self):
        return sorted(k for k in self.redis_dump()
                      if k.startswith(self.app.keys.prefix))

    def test_delete_stream_and_target_leave_nothing(self):
        tid, s1 = self.new_stream()
        _, s2 = self.new_stream(tid, with_target=False)
        token, active = self.activate(tid)
        self.frame(token, b'x')
        self.checkpoint(token, b'y')
        self.frame(token, b'buffered')
        other_tid, other = self.new_stream()
        keep_redis = {k: v for k, v in self.redis_dump().items()
                      if other in k or other_tid in k}
        self.assertEqual(self.cc('/streams/delete/' + active, 'PUT'),
                         (200, {}))
        self.assertEqual(self.fetch_json('/core/frame', 'PUT', {
            'files': {'a': 'b'}}, token=token)[0], 401)
        dump = json.dumps(self.redis_dump())
        self.assertNotIn(active, dump)
        self.assertFalse(any(active in p for p in self.disk_dump()))
        self.assertEqual(self.cc('/streams/info/' + active)[0], 404)
        # The last stream takes the target with it.
        rest = s2 if active == s1 else s1
        self.assertEqual(self.cc('/streams/delete/' + rest, 'PUT'), (200, {}))
        dump = json.dumps(self.redis_dump())
        self.assertNotIn(tid, dump)
        self.assertFalse(any(tid in p or rest in p
                             for p in self.disk_dump()))
        # Only the other target's stream is left, untouched.
        self.assertEqual({k: v for k, v in self.redis_dump().items()
                          if other in k or other_tid in k}, keep_redis)
        self.assertEqual(self.cc('/targets/delete/' + other_tid, 'PUT'),
                         (200, {}))
        self.assertEqual(self.ws_keys(), [])
        leftovers = [p for p, v in self.disk_dump().items() if v is not None]
        self.assertEqual(leftovers, [])
        self.assertEqual(self.cc('/targets/delete/' + other_tid, 'PUT'),
                         (200, {}))

    def test_delete_target_with_active_streams(self):
        tid, s1 = self.new_stream()
        for _ in range(3):
            self.new_stream(tid, with_target=False)
        token, _ = self.activate(tid)
        self.frame(token, b'x')
        self.checkpoint(token, b'y')
        self.assertEqual(self.cc('/targets/delete/' + tid, 'PUT'), (200, {}))
        self.assertEqual(self.ws_keys(), [])
        self.assertEqual([p for p, v in self.disk_dump().items()
                          if v is not None], [])
        code, reply = self.fetch_json('/core/heartbeat', 'POST', {},
                                      token=token)
        self.assertEqual((code, reply['ended']), (401, 'deletion'))
        self.assertEqual(self.cc('/targets/streams/' + tid)[0], 404)


class TestBadInput(WSTestCase):

    def test_bad_cc_requests_change_nothing(self):
        tid, sid = self.new_stream()
        ok_files = {'state.xml.gz.b64': gzb64(b'x')}
        cases = [
            ('/streams', 'POST', 'not json'),
            ('/streams', 'POST', '[1, 2]'),
            ('/streams', 'POST', {}),
            ('/streams', 'POST', {'target_id': tid}),
            ('/streams', 'POST', {'target_id': 5, 'stream_files': ok_files}),
            ('/streams', 'POST', {'target_id': '../x',
                                  'stream_files': ok_files,
                                  'target_files': target_files()}),
            ('/streams', 'POST', {'target_id': tid, 'stream_files': {}}),
            ('/streams', 'POST', {'target_id': tid, 'stream_files': []}),
            ('/streams', 'POST', {'target_id': tid,
                                  'stream_files': {'../state.xml': 'x'}}),
            ('/streams', 'POST', {'target_id': tid,
                                  'stream_files': {'a' * 129: 'x'}}),
            ('/streams', 'POST', {'target_id': tid,
                                  'stream_files': {'state.xml.gz.b64': 5}}),
            ('/streams', 'POST', {'target_id': tid, 'stream_files':
                                  {'state.xml.gz.b64': '!!notb64'}}),
            ('/streams', 'POST', {'target_id': tid, 'stream_files':
                                  {'state.xml.gz.b64': b64(b'not gzip')}}),
            ('/streams', 'POST', {'target_id': str(uuid.uuid4()),
                                  'stream_files': ok_files,
                                  'target_files': {'sys.b64': '%%'}}),
            ('/streams', 'POST', {'target_id': str(uuid.uuid4()),
                                  'stream_files': ok_files,
                                  'target_files': 'x'}),
            ('/streams/activate', 'POST', {}),
            ('/streams/activate', 'POST', {'target_id': ['x']}),
            ('/streams/activate', 'POST', {'target_id': tid,
                                           'donor_id': 7}),
            ('/streams/info/not-a-stream-id', 'GET', None),
            ('/streams/start/bad%20id', 'PUT', {}),
            ('/streams/start/' + sid, 'PUT', '{'),
            ('/streams/stop/' + sid, 'PUT', '[]'),
            ('/targets/delete/' + tid, 'PUT', 'nope'),
            ('/targets/streams/a..b', 'GET', None),
            ('/targets/delete/a.b', 'PUT', {}),
            ('/stats/ack', 'PUT', {'entries': 'x'}),
            ('/stats/ack', 'PUT', {'entries': ['1-x']}),
            # Numbers past 64 bits that Redis refuses (a fuzzed 500).
            ('/stats/ack', 'PUT', {'entries': ['18446744073709551616-0']}),
            ('/stats/ack', 'PUT', {'entries': ['0-99999999999999999999']}),
        ]
        before = self.snapshot()
        for path, method, body in cases:
            code, reply = self.cc(path, method, body)
            self.assertEqual(code, 400, (path, body, reply))
            self.assertIn('error', reply or {}, (path, body))
        code, _, _ = self.download(sid, name='..')
        self.assertIn(code, (400, 404))
        self.assertEqual(self.download(sid, name='a%20b')[0], 400)
        self.assertEqual(self.snapshot(), before)
        code, reply = self.cc('/stats/ack', 'PUT', {
            'entries': ['18446744073709551615-18446744073709551615']})
        self.assertEqual(code, 200, reply)

    def test_bad_core_requests_change_nothing(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')
        frame_cases = [
            'not json', '"str"', {}, {'files': {}}, {'files': []},
            {'files': {'frames.xtc.b64': '%%%'}},
            {'files': {'frames.xtc.gz.b64': b64(b'not gzip')}},
            {'files': {'frames.xtc.b64': b64(b'ok'), 'x.b64': '???'}},
            {'files': {'../frames.xtc': 'x'}},
            {'files': {'a/b': 'x'}},
            {'files': {'.b64': b64(b'x')}},
            {'files': {'frames.xtc.b64': 5}},
            {'files': {'f.b64': b64(b'x'), 'f': 'y'}},
            {'files': {'f': 'y'}, 'frames': 0},
            {'files': {'f': 'y'}, 'frames': -1},
            {'files': {'f': 'y'}, 'frames': 1.5},
            {'files': {'f': 'y'}, 'frames': '2'},
            {'files': {'f': 'y'}, 'frames': True},
        ]
        checkpoint_cases = [
            'nope', {}, {'files': {}}, {'files': {'s.gz.b64': 'xx!'}},
            {'files': {'s.gz.b64': b64(b'plain')}},
            {'files': {'../s': 'x'}},
            {'files': {'s': 'x'}, 'frames': -1},
            {'files': {'s': 'x'}, 'frames': 'many'},
        ]
        stop_cases = ['bad', {'error': 5}, {'error': '!!!not base64'}]
        before = self.snapshot()
        for path, cases in [('/core/frame', frame_cases),
                            ('/core/checkpoint', checkpoint_cases),
                            ('/core/stop', stop_cases)]:
            for body in cases:
                code, reply = self.fetch_json(path, 'PUT', body, token=token)
                self.assertEqual(code, 400, (path, body, reply))
                self.assertIn('error', reply)
        for path, method in [('/core/heartbeat', 'POST'),
                             ('/core/stop', 'PUT')]:
            code, reply = self.fetch_json(path, method, 'x{', token=token)
            self.assertEqual(code, 400)
            self.assertIn('JSON', reply['error'])
        self.assertEqual(self.snapshot(), before)
        self.checkpoint(token, b's')
        self.assertEqual(self.download(sid)[1], b'one')


class TestRecovery(WSTestCase):

    def sync_redis(self):
        return store.connect_sync(self.redis_server.url)

    def rebuild(self):
        r = self.sync_redis()
        try:
            return recovery.rebuild(self.app.storage, self.app.keys, r)
        finally:
            r.close()

    def test_rebuild_from_disk_alone(self):
        tid, s1 = self.new_stream()
        _, s2 = self.new_stream(tid, with_target=False)
        t2, s3 = self.new_stream()
        token, a = self.activate(tid)
        self.frame(token, b'abc', n=3)
        self.checkpoint(token, b'c1')
        self.frame(token, b'buffered')  # lost on restart
        for _ in range(3):  # max_stream_fails: s3 ends STOPPED
            tk, _ = self.activate(t2)
            self.fetch_json('/core/stop', 'PUT', {'error': b64(b'x')},
                            token=tk)
        infos = {s: self.info(s) for s in (s1, s2, s3)}
        infos[a]['active'] = False
        # Garbage a crash may leave behind.
        storage = self.app.storage
        os.makedirs(os.path.join(storage.chunks_dir(a), '.tmp-dead', 'frames'))
        os.makedirs(os.path.join(storage.streams, '.tmp-half'))
        os.makedirs(os.path.join(storage.trash, 'x'))
        os.makedirs(os.path.join(storage.targets, str(uuid.uuid4()), 'files'))
        for wipe in (False, True):
            if wipe:
                r = self.sync_redis()
                r.flushall()
                r.close()
            self.assertEqual(self.rebuild(), (2, 3, 3))
            for s in (s1, s2, s3):
                self.assertEqual(self.info(s), infos[s], (wipe, s))
            self.assertEqual(self.download(a)[1], b'abc')
            self.assertFalse(os.path.exists(storage.buffer_dir(a)))
            self.assertEqual(self.cc('/active_streams'), (200, {}))
            # Its core is told why (unless Redis lost that too).
            code, reply = self.fetch_json('/core/heartbeat', 'POST', {},
                                          token=token)
            self.assertEqual((code, reply.get('ended')),
                             (401, None if wipe else 'ws_restart'))
            self.assertEqual(self.cc('/streams/activate', 'POST',
                                     {'target_id': t2})[0], 503)
            self.assertEqual(sorted(os.listdir(storage.trash)), [])
            self.assertEqual(storage.target_ids(), sorted([tid, t2]))
        # The stream with frames is handed out first, then the other.
        token, got = self.activate(tid)
        self.assertEqual(got, a)
        self.frame(token, b'd')
        self.checkpoint(token, b'c2')
        self.assertEqual(self.download(a)[1], b'abcd')
        self.assertEqual(self.activate(tid)[1], s2 if a == s1 else s1)

    def test_failed_commit_keeps_buffer_and_state(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')
        self.checkpoint(token, b's1')
        self.frame(token, b'two')
        storage = self.app.storage

        def broken(*args):
            raise OSError(28, 'No space left on device')
        storage.durable.sync_open = broken
        try:
            code, reply = self.fetch_json('/core/checkpoint', 'PUT', {
                'files': {'state.xml.gz.b64': gzb64(b's2')}}, token=token)
            self.assertEqual(code, 503)
            self.assertIn('disk is full', reply['error'])
        finally:
            del storage.durable.sync_open
        self.assertEqual(self.download(sid)[1], b'one')
        self.assertEqual(len(storage.chunks(sid)), 1)
        self.assertEqual(storage.buffer_files(sid), ['frames.xtc'])
        self.assertEqual([n for n in os.listdir(storage.chunks_dir(sid))
                          if n.startswith('.tmp')], [])
        self.checkpoint(token, b's2')  # the core retries
        self.assertEqual(self.download(sid)[1], b'onetwo')
        self.assertEqual(self.info(sid)['frames'], 2)


class TestHoldReleasedLater(WSTestCase):

    def test_shared_target_hold_freed_once_the_store_answers(self):
        """A stream creation whose shared hold on its target could not be
        given back (the store failed just then) gives it back once the
        store answers, rather than blocking the target's deletions until
        the hold's 5 minute TTL (seen in `make chaos`)."""
        tid, _ = self.new_stream()
        redis = self.app.redis
        real = redis.zrem

        async def failing(*args):
            redis.zrem = real
            raise ConnectionError('the store failed just then')
        redis.zrem = failing
        self.addCleanup(setattr, redis, 'zrem', real)
        self.new_stream(tid, with_target=False)
        users = self.app.keys.target_users(tid)
        sync = store.connect_sync(self.redis_server.url)
        self.addCleanup(sync.close)
        self.assertIs(redis.zrem, real)  # the failure happened

        async def freed():
            for _ in range(50):
                if not await redis.zcard(users):
                    return True
                await asyncio.sleep(0.1)
            return False
        self.assertTrue(self.io_loop.run_sync(freed), sync.zrange(users, 0,
                                                                  -1))


class TestLockLost(WSTestCase):
    """A request whose stream lock stopped being its own while it worked
    (expired, or freed as a dead worker's) changes nothing: its frame is
    not counted, its commit is undone, and the core gets a 503 to retry."""

    def steal_lock_during(self, name):
        """Make storage.`name` take the stream's lock from the request;
        returns what puts things back (the lock freed)."""
        storage = self.app.storage
        real = getattr(storage, name)
        sync = store.connect_sync(self.redis_server.url)
        self.addCleanup(sync.close)

        def stealing(sid, *args, **kw):
            sync.set(self.app.keys.stream_lock(sid), 'someone else')
            return real(sid, *args, **kw)

        def give_back(sid):
            setattr(storage, name, real)
            sync.delete(self.app.keys.stream_lock(sid))
        setattr(storage, name, stealing)
        self.addCleanup(setattr, storage, name, real)
        return give_back

    def test_frame_waits_for_the_fence(self):
        """A frame that finds the stream's lock held once it is appended
        (a checkpoint, stop, deletion or repair under way) is cut back and
        waits; it is counted once the lock is free, or is a 503 with
        nothing stored past the wait."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')
        buffer = os.path.join(self.app.storage.buffer_dir(sid), 'frames.xtc')
        give_back = self.steal_lock_during('append_frames')
        with mock.patch.object(locks, 'LOCK_WAIT_S', 0.3):
            reply = self.frame(token, b'two', code=503)
        self.assertIn('retry', reply['error'])
        give_back(sid)
        self.assertEqual(self.redis_dump()[self.app.keys.stream(sid)]
                         ['buffer_frames'], '1')
        with open(buffer, 'rb') as f:
            self.assertEqual(f.read(), b'one')
        give_back = self.steal_lock_during('append_frames')
        self.io_loop.call_later(0.3, give_back, sid)
        self.frame(token, b'two')  # waits, then is counted once
        self.checkpoint(token, b's1')
        self.assertEqual(self.download(sid)[1], b'onetwo')
        self.assertEqual(self.info(sid)['frames'], 2)

    def test_commit_undone(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')
        storage = self.app.storage
        give_back = self.steal_lock_during('buffer_files')
        self.checkpoint(token, b's1', code=503)
        give_back(sid)
        self.assertEqual(storage.chunks(sid), [])
        self.assertEqual(storage.buffer_files(sid), ['frames.xtc'])
        self.assertEqual(self.info(sid)['frames'], 0)
        self.checkpoint(token, b's1')  # the retry
        self.assertEqual(self.download(sid)[1], b'one')
        self.assertEqual(self.info(sid)['frames'], 1)

    def test_uncounted_bytes_in_the_buffer_are_cut(self):
        """A frame appended whose count never reached Redis (its worker
        died, its reply was lost) is not committed."""
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')

        def garbage(name, mode):
            with open(os.path.join(self.app.storage.buffer_dir(sid),
                                   name), mode) as f:
                f.write(b'GARBAGE')
        garbage('frames.xtc', 'ab')
        garbage('other.dat', 'wb')
        self.checkpoint(token, b's1')
        self.assertEqual(self.download(sid)[1], b'one')
        self.assertEqual(self.download(sid, 'other.dat')[0], 404)
        garbage('frames.xtc', 'ab')
        self.frame(token, b'two')
        self.checkpoint(token, b's2')
        self.assertEqual(self.download(sid)[1], b'onetwo')
        # A file Redis never counted beside the frame's own (the first
        # frame of a new name, whose worker died): left out of the frame's
        # sizes (storage.frame_sizes), and cut by the checkpoint.
        self.frame(token, b'three')
        garbage('other.dat', 'wb')
        self.frame(token, b'four')
        self.checkpoint(token, b's3')
        self.assertEqual(self.download(sid)[1], b'onetwothreefour')
        self.assertEqual(self.download(sid, 'other.dat')[0], 404)
        self.assertEqual(self.info(sid)['frames'], 4)


class TestMultiplexedRedis(RedisTestCase):
    """The hot-path connection (server/ws/lua.py): replies matched to their
    commands under concurrency, errors, lost script cache, lost
    connection."""

    ECHO = Script("return {key, tonumber(n) * 2}", keys=('key',),
                  args=('n',))

    def setUp(self):
        super().setUp()
        self.mux = Multiplexed.like(self.redis)

    def tearDown(self):
        self.mux.close()
        super().tearDown()

    def test_loading_and_readonly_replies_are_store_down(self):
        for reply, kind in ((b'-LOADING Redis is loading\r\n',
                             BusyLoadingError),
                            (b'-READONLY replica\r\n', ReadOnlyError),
                            (b'-ERR nope\r\n', ResponseError)):
            self.assertIs(type(fastredis.parse(reply, 0)[0]), kind)
            self.assertEqual(isinstance(fastredis.parse(reply, 0)[0],
                                        store.DOWN), kind is not ResponseError)

    def test_concurrent_calls_get_their_own_replies(self):
        async def go():
            return await asyncio.gather(*(
                self.ECHO(self.mux, key='k%d' % i, n=i) for i in range(300)))
        replies = self.io_loop.run_sync(go)
        self.assertEqual(replies, [['k%d' % i, 2 * i] for i in range(300)])

    def test_errors_and_lost_script_cache_and_connection(self):
        async def go():
            with self.assertRaises(ResponseError):
                await Script("return redis.call('NOPE')")(self.mux)
            self.assertEqual(await self.ECHO(self.mux, key='a', n=1), ['a', 2])
            await self.redis.script_flush()  # NOSCRIPT: loaded again
            self.assertEqual(await self.ECHO(self.mux, key='b', n=2), ['b', 4])
            await self.redis.client_kill_filter(skipme=True,
                                                _type='normal')
            # The next command after the loss connects again.
            for _ in range(50):
                try:
                    return await self.ECHO(self.mux, key='c', n=3)
                except ConnectionError:
                    await asyncio.sleep(0.01)
        self.assertEqual(self.io_loop.run_sync(go), ['c', 6])

    def test_a_stuck_redis_fails_every_command_in_flight(self):
        """A Redis that accepts and never answers: the connection's
        watchdog fails every command in flight with TimeoutError (a
        store-down 503) and drops the connection."""
        async def go():
            server = await asyncio.start_server(
                lambda r, w: None, '127.0.0.1', 0)
            port = server.sockets[0].getsockname()[1]
            mux = Multiplexed(port=port, timeout=0.2)
            try:
                got = await asyncio.gather(
                    *(mux.execute('PING') for _ in range(3)),
                    return_exceptions=True)
                self.assertTrue(mux.protocol.closed)
                return got
            finally:
                mux.close()
                server.close()
        got = self.io_loop.run_sync(go)
        self.assertEqual([type(e) for e in got], [RedisTimeoutError] * 3)
        self.assertTrue(all(isinstance(e, store.DOWN) for e in got))


class Pair(NamedTuple):
    key: str
    doubled: int


class TestNamedScript(RedisTestCase):
    """One Script over the sync client, the asyncio client and the
    multiplexed connection: KEYS and ARGV bound by name, a typed result,
    a lost script cache, and a call with a wrong set of names refused."""

    PAIR = Script("return {thing, tonumber(n) * 2}", keys=('thing',),
                  args=('n',), returns=Pair)

    def test_every_client(self):
        sync = store.connect_sync(self.redis_server.url)
        self.addCleanup(sync.close)
        self.assertEqual(self.PAIR(sync, thing='k', n=1), Pair('k', 2))
        sync.script_flush()
        self.assertEqual(self.PAIR(sync, n=2, thing='s'), Pair('s', 4))
        mux = Multiplexed.like(self.redis)

        async def go():
            try:
                return (await self.PAIR(self.redis, thing='a', n=3),
                        await self.PAIR(mux, thing='m', n=4))
            finally:
                mux.close()
        self.assertEqual(self.io_loop.run_sync(go),
                         (Pair('a', 6), Pair('m', 8)))
        self.assertTrue(self.PAIR.text.startswith('-- KEYS: thing\n'))

    def test_names_must_match(self):
        for named in ({'thing': 'k'}, {'thing': 'k', 'n': 1, 'x': 2},
                      {'thing': 'k', 'n': None}):
            with self.assertRaises(TypeError):
                self.PAIR(None, **named)
        with self.assertRaises(ValueError):
            Script('return 1', keys=('end',))
        with self.assertRaises(ValueError):
            Script('return 1', keys=('a',), args=('a',))
        with self.assertRaises(ValueError):
            Script('return 1', keys=('*a', 'b'))

    def test_a_starred_name_takes_a_list(self):
        """The last key or arg starred takes a list of any length."""
        both = Script('return {#sets, sets[1] or false, first, #rest}',
                      keys=('*sets',), args=('first', '*rest'))
        sync = store.connect_sync(self.redis_server.url)
        self.addCleanup(sync.close)
        self.assertEqual(both(sync, sets=['s1', 's2'], first='f', rest=[]),
                         [2, 's1', 'f', 0])
        self.assertEqual(both(sync, sets=[], first='f', rest=['a', 'b']),
                         [0, None, 'f', 2])
        self.assertIn('-- KEYS: sets...\n', both.text)
