"""Hostile input against both servers (issue 10, bounded I/O): bodies over
their endpoint's limit refused unread, credentials checked before any body
byte, gzip bombs stopped at the decoded limits with nothing stored, caps on
files, frames and error text, whole-string names, signatures and Range
headers that cannot make a 500, registrations that cannot break placement,
emails that cannot collide in Redis keys, and slow clients cut off.

In-process apps over real HTTPS with real Redis; the memory and timeout
tests run real ws.py processes."""
import asyncio
import gzip
import json
import os
import ssl
import time
import unittest
import uuid
import zlib

import psutil
import requests
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from server.cc import keys as cc_keys
from server.cc import workservers
from server.ws import recovery
from tests.test_cc import CCTestCase
from tests.test_ws import CONF, WSTestCase
from tools.testing import (
    CC_PASS,
    ServerProcess,
    b64,
    certs,
    gzb64,
    raw_exchange,
)

PASS = CC_PASS

WS_LIMITS = dict(CONF, max_frame_body_size=200000,
                 max_checkpoint_body_size=200000, max_body_size=200000,
                 max_small_body_size=4096, max_decoded_file_size=1 << 20,
                 max_decoded_request_size=3 << 19, max_files_per_request=4,
                 max_frames_per_request=1000, max_error_length=100,
                 max_errors_log_size=1000, max_stream_fails=100)


def bomb(size):
    """base64 of gzipped zeros: `size` bytes from about size / 1000."""
    return b64(gzip.compress(b'\0' * size, compresslevel=9))


async def send_and_close(port, head, body):
    """Send a request head and part of its body, then hang up."""
    stream = await connect(port)
    await stream.write(head.encode() + b'\r\n\r\n' + body)
    stream.close()


class TestHostileCores(WSTestCase):
    conf = WS_LIMITS

    def raw(self, head, body=b''):
        return self.io_loop.run_sync(lambda: raw_exchange(
            self.get_http_port(), head, body, host='localhost'))

    def put(self, path, body, token):
        return self.fetch_json(path, 'PUT', body, token=token)

    def test_gzip_bombs_are_413_and_store_nothing(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')
        before = self.snapshot()
        big = bomb(64 << 20)  # 64 MiB of zeros in a 90 KB body
        cases = [
            ('/core/frame', {'files': {'frames.xtc.gz.b64': big}}),
            ('/core/frame', {'files': {'a.gz.b64': bomb(1 << 20),
                                       'b.gz.b64': bomb(1 << 20)}}),
            ('/core/checkpoint', {'files': {'state.xml.gz.b64': big}}),
        ]
        for path, body in cases:
            code, reply = self.put(path, body, token)
            self.assertEqual(code, 413, (path, reply))
            self.assertIn('limit per', reply['error'])
        code, reply = self.cc('/streams', 'POST', {
            'target_id': str(uuid.uuid4()),
            'stream_files': {'state.xml.gz.b64': gzb64(b's')},
            'target_files': {'system.xml.gz.b64': big}})
        self.assertEqual(code, 413, reply)
        self.assertEqual(self.snapshot(), before)
        # Exactly at the limits is fine.
        self.put('/core/frame', {'files': {'a.gz.b64': bomb(1 << 20),
                                           'b.gz.b64': bomb(1 << 19)}},
                 token)
        self.checkpoint(token, b's')

    def test_credentials_before_the_body(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        for path, method in (('/core/frame', 'PUT'),
                             ('/core/checkpoint', 'PUT'),
                             ('/core/stop', 'PUT'),
                             ('/core/heartbeat', 'POST')):
            for bad in (None, 'nope'):
                for body in ('{}', 'not json'):
                    code, reply = self.fetch_json(path, method, body,
                                                  token=bad)
                    self.assertEqual(code, 401, (path, bad, body, reply))
            # Only the head, promising a body under the limit: answered
            # at once, the body never read.
            status, _, reply = self.raw(
                '%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: nope\r\n'
                'Content-Length: %d' % (method, path, 4000 if path in (
                    '/core/stop', '/core/heartbeat') else 150000))
            self.assertEqual(status, 401, path)
            self.assertIn('core token', json.loads(reply)['error'])
        status, _, _ = self.raw('POST /streams HTTP/1.1\r\nHost: x\r\n'
                                'Authorization: nope\r\nContent-Length: 9000')
        self.assertEqual(status, 401)
        self.assertEqual(self.fetch('/core/start', headers={
            'Authorization': 'nope'}).code, 401)

    def test_body_limits_per_endpoint(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        for path, length in (('/core/frame', 200001),
                             ('/core/checkpoint', 200001),
                             ('/core/heartbeat', 4097),
                             ('/streams/activate', 4097),
                             ('/streams', 200001)):
            status, _, reply = self.raw(
                'PUT %s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n'
                'Content-Length: %d' % (path, token if path.startswith(
                    '/core') else PASS, length))
            self.assertEqual(status, 413, path)
            self.assertIn('over the limit of %d' % (length - 1),
                          json.loads(reply)['error'])
        # A refused body left the stream's lock free: the core goes on.
        self.frame(token, b'x' * 1000)
        code, _ = self.put('/core/heartbeat', {'pad': 'x' * 5000}, token)
        self.assertEqual(code, 413)
        self.fetch_json('/core/heartbeat', 'POST', {}, token=token)

    def test_lock_freed_when_the_body_never_comes(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.io_loop.run_sync(lambda: send_and_close(
            self.get_http_port(), 'PUT /core/frame HTTP/1.1\r\nHost: x\r\n'
            'Authorization: %s\r\nContent-Length: 1000' % token, b'{"fi'))
        self.frame(token, b'after')  # waits for the lock, then gets it
        for body in ('not json', {'files': {'f': 'x'}, 'frames': 0}):
            self.assertEqual(self.put('/core/frame', body, token)[0], 400)
        self.frame(token, b'more')
        self.checkpoint(token, b's')
        self.assertEqual(self.download(sid)[1], b'aftermore')

    def test_caps_on_files_and_frames(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'one')
        before = self.snapshot()
        five = {'f%d' % i: 'x' for i in range(5)}
        for body, code, word in (
                ({'files': five}, 413, 'the limit is 4'),
                ({'files': {'f': 'x'}, 'frames': 2 ** 63}, 400, '1 to 1000'),
                ({'files': {'f': 'x'}, 'frames': 1001}, 400, '1 to 1000'),
                ({'files': {'evil\n': 'x'}}, 400, 'bad file name')):
            got, reply = self.put('/core/frame', body, token)
            self.assertEqual(got, code, body)
            self.assertIn(word, reply['error'])
        for frames in (2 ** 63, 2 ** 53 + 1, -1):
            got, _ = self.put('/core/checkpoint', {
                'files': {'s': 'x'}, 'frames': frames}, token)
            self.assertEqual(got, 400, frames)
        self.assertEqual(self.snapshot(), before)
        # Across frames, the buffer holds at most 4 files as well.
        self.frame(token, b'two', n=1000)
        self.put('/core/frame', {'files': {'a': 'x', 'b': 'y', 'c': 'z'}},
                 token)
        before = self.snapshot()
        got, reply = self.put('/core/frame', {'files': {'d': 'w'}}, token)
        self.assertEqual(got, 413, reply)
        self.assertEqual(self.snapshot(), before)
        self.checkpoint(token, b's')
        self.assertEqual(self.info(sid)['frames'], 1002)

    def test_error_text_capped_and_errors_log_rotated(self):
        tid, sid = self.new_stream()
        folder = os.path.join(self.settings.data_folder, 'streams', sid)
        text = 'x' * 500 + 'the cause'
        for _i in range(12):
            token, _ = self.activate(tid)
            code, reply = self.put('/core/stop', {'error': b64(
                text.encode())}, token)
            self.assertEqual(code, 200, reply)
            with open(os.path.join(folder, 'errors.log')) as f:
                log = f.read()
            self.assertIn('[409 characters cut]\n' + 'x' * 91 + 'the cause',
                          log)
            self.assertLessEqual(len(log), 1000)
        with open(os.path.join(folder, 'errors.log.1')) as f:
            self.assertLessEqual(len(f.read()), 1000)
        self.assertEqual(sorted(n for n in os.listdir(folder)
                                if n.startswith('errors')),
                         ['errors.log', 'errors.log.1'])

    def test_names_signatures_and_ranges_are_never_a_500(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        self.frame(token, b'0123456789')
        self.checkpoint(token, b's')
        self.assertEqual(self.download(sid, 'frames.xtc%0A')[0], 400)
        self.assertEqual(self.download(sid + '%0A')[0], 400)
        for sig, code in (('%C3%A9', 401), ('a' * 64 + '%C3%A9', 401),
                          ('%FF', 400)):  # not UTF-8: Tornado's 400
            got, body, _ = self.download(sid, token=None, query=(
                '?expires=%d&signature=%s' % (time.time() + 60, sig)))
            self.assertEqual(got, code, sig)
        code, _, _ = self.download(sid, token=None, query=(
            '?expires=%s&signature=ab' % ('9' * 5000)))
        self.assertEqual(code, 401)
        for header in ('bytes=%s-' % ('1' * 4300), 'bytes=0-%s' % ('9' * 4300),
                       'bytes=-%s' % ('7' * 4300), 'bytes=\xb2-\xb9',
                       'bytes=0-1 , 2-3'):
            code, body, _ = self.download(sid, headers={'Range': header})
            self.assertIn(code, (200, 416), header)
            if code == 200:
                self.assertEqual(body, b'0123456789')


MB = 1 << 20


def folder_bytes(root):
    return sum(os.path.getsize(os.path.join(d, f))
               for d, _, names in os.walk(root) for f in names)


def zeros_bomb(size, mark):
    """base64 of gzip: `size` decoded bytes that differ from others' by
    the first (`mark`), from a body of about size / 1000."""
    return b64(gzip.compress(bytes([mark]) + b'\0' * (size - 1), 9))


class TestByteBudgets(WSTestCase):
    """Issue 22 point 2: per-activation and per-stream byte budgets in
    decoded bytes; 413 past them and nothing stored."""
    conf = dict(CONF, max_decoded_file_size=64 * MB,
                max_decoded_request_size=64 * MB,
                max_buffer_size_in_bytes=50 * MB,
                max_checkpoint_size_in_bytes=MB,
                max_stream_size_in_bytes=60 * MB)

    def put_frame(self, token, size, mark):
        return self.fetch_json('/core/frame', 'PUT', {'files': {
            'frames.xtc.gz.b64': zeros_bomb(size, mark)}}, token=token)

    def test_buffer_checkpoint_and_stream_budgets(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        root = self.app.storage.root
        empty = folder_bytes(root)
        for mark in (1, 2):  # 40 MB buffered
            self.assertEqual(self.put_frame(token, 20 * MB, mark), (200, {}))
        before = self.snapshot()
        for mark in range(3, 8):  # each differs by a byte: still refused
            code, reply = self.put_frame(token, 20 * MB, mark)
            self.assertEqual(code, 413, reply)
            self.assertIn('max_buffer_size_in_bytes', reply['error'])
        self.assertEqual(self.snapshot(), before)
        self.assertLessEqual(folder_bytes(root) - empty, 50 * MB)
        # A checkpoint over its budget: 413, the buffer kept.
        code, reply = self.fetch_json('/core/checkpoint', 'PUT', {'files': {
            'state.xml.gz.b64': zeros_bomb(2 * MB, 1)}}, token=token)
        self.assertEqual(code, 413, reply)
        self.assertIn('max_checkpoint_size_in_bytes', reply['error'])
        self.assertEqual(self.snapshot(), before)
        self.checkpoint(token, b's1')
        self.assertEqual(self.info(sid)['frames'], 2)
        # The stream's total: 40 MB committed, 15 more fit, then no more.
        self.assertEqual(self.put_frame(token, 15 * MB, 9), (200, {}))
        self.checkpoint(token, b's2')
        before = self.snapshot()
        code, reply = self.put_frame(token, 15 * MB, 10)
        self.assertEqual(code, 413, reply)
        self.assertIn('max_stream_size_in_bytes', reply['error'])
        self.assertEqual(self.snapshot(), before)
        # A new activation of the same stream is bound by the same total.
        self.fetch_json('/core/stop', 'PUT', {}, token=token)
        token, _ = self.activate(tid)
        code, reply = self.put_frame(token, 15 * MB, 11)
        self.assertEqual(code, 413, reply)
        self.assertEqual(self.info(sid)['frames'], 3)

    def test_the_stream_total_survives_a_rebuild(self):
        tid, sid = self.new_stream()
        token, _ = self.activate(tid)
        for mark in (1, 2):
            self.assertEqual(self.put_frame(token, 20 * MB, mark), (200, {}))
        self.checkpoint(token, b's1')
        # Redis rebuilt from the disk alone: the total is not indexed, the
        # next checkpoint reads it from the chunks.
        recovery.prepare(self.settings, self.redis_server.url)
        token, _ = self.activate(tid)
        self.assertEqual(self.put_frame(token, 15 * MB, 3), (200, {}))
        self.checkpoint(token, b's2')
        code, reply = self.put_frame(token, 15 * MB, 4)
        self.assertEqual(code, 413, reply)
        self.assertIn('max_stream_size_in_bytes', reply['error'])


class TestHostileManagers(CCTestCase):
    conf = {'max_body_size': 200000, 'max_small_body_size': 4096,
            'max_decoded_file_size': 1 << 20,
            'max_decoded_request_size': 3 << 19, 'max_files_per_target': 3,
            'max_files_per_request': 2, 'max_streams_per_target': 2}

    def raw(self, head, body=b''):
        return self.io_loop.run_sync(lambda: raw_exchange(
            self.get_http_port(), head, body, host='localhost'))

    def dbsize(self):
        return self.sync(lambda: self.redis.dbsize())

    def test_bombs_and_caps_on_targets_and_streams(self):
        token = self.add_manager()
        size = self.dbsize()
        for files, word in (({'system.xml.gz.b64': bomb(64 << 20)},
                             'limit per file'),
                            ({'a.gz.b64': bomb(1 << 20),
                              'b.gz.b64': bomb(1 << 20)}, 'limit per request'),
                            ({'a': 'x', 'b': 'x', 'c': 'x', 'd': 'x'},
                             'the limit is 3')):
            c, reply = self.fetch_json('/targets', 'POST', {
                'engine': 'openmm', 'engine_versions': ['6.0'],
                'files': files}, token=token)
            self.assertError(c, 413, reply)
            self.assertIn(word, reply['error'])
        self.assertEqual(self.dbsize(), size)
        self.assertFalse(os.listdir(os.path.join(
            self.settings.data_folder, 'targets'))
            if os.path.isdir(os.path.join(self.settings.data_folder,
                                          'targets')) else [])
        tid = self.post_target(token)
        self.add_ws('w1')
        for files, code in (({'state.xml.gz.b64': bomb(64 << 20)}, 413),
                            ({'a': 'x', 'b': 'x', 'c': 'x'}, 413),
                            ({'s.xml': 'x'}, 200), ({'s.xml': 'y'}, 200),
                            ({'s.xml': 'z'}, 409)):
            c, reply = self.fetch_json('/streams', 'POST', {
                'target_id': tid, 'files': files}, token=token)
            self.assertEqual(c, code, reply)
        self.assertIn('2 streams', reply['error'])
        self.assertEqual(self.sync(lambda: self.redis.hgetall(
            cc_keys.target_ws(tid))), {'w1': '2'})

    def test_credentials_before_the_body(self):
        token = self.add_manager()
        for path in ('/targets', '/streams'):
            for auth in ('', 'Authorization: nope\r\n'):
                status, _, reply = self.raw(
                    'POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: 150000'
                    % (path, auth))
                self.assertEqual(status, 401, (path, auth))
            self.assertEqual(self.fetch_json(path, 'POST', 'junk')[0], 401)
        status, _, _ = self.raw('PUT /ws/register HTTP/1.1\r\nHost: x\r\n'
                                'Content-Length: 3000')
        self.assertEqual(status, 401)
        status, _, _ = self.raw('POST /targets HTTP/1.1\r\nHost: x\r\n'
                                'Authorization: %s\r\nContent-Length: 200001'
                                % token)
        self.assertEqual(status, 413)
        status, _, _ = self.raw('POST /core/assign HTTP/1.1\r\nHost: x\r\n'
                                'Content-Length: 4097')
        self.assertEqual(status, 413)

    def test_emails_cannot_collide_in_keys(self):
        victim = self.add_manager('a@b.org')
        self.post_target(victim)
        for email in ('a@b.org:targets', 'a@b.org:x'):
            c, body = self.fetch_json('/managers/auth', 'POST', {
                'email': email, 'password': 'riesling'})
            self.assertError(c, 401, body)
            token = self.add_manager(email)
            c, body = self.fetch_json('/targets', token=token)
            self.assertEqual((c, body), (200, {'targets': []}))
        c, body = self.fetch_json('/targets', token=victim)
        self.assertEqual(len(body['targets']), 1)

    def test_registration_is_validated(self):
        good = {'name': 'w', 'url': 'ws.example.org', 'http_port': '443'}
        for change in ({'url': ':'}, {'url': 'host:443'}, {'url': ''},
                       {'url': 'a/b'}, {'url': 'https://h'}, {'url': 'h\n'},
                       {'url': '-h'}, {'http_port': '\u00b2'},
                       {'http_port': '0'}, {'http_port': 70000},
                       {'http_port': '1e3'}, {'http_port': True},
                       {'http_port': '٤٤٣'}, {'name': 'w\n'}):
            c, body = self.fetch_json('/ws/register', 'PUT',
                                      dict(good, **change), token=CC_PASS)
            self.assertError(c, 400, body)
        self.assertEqual(self.fetch_json('/ws/register', 'PUT', good,
                                         token=CC_PASS)[0], 200)

    def test_a_ws_failure_of_any_kind_releases_its_reservation(self):
        """A WS registered before validation existed (url ':') and holding
        a stream: placement and assignment skip it and give back what they
        reserved (before: a 500 and a slot never given back), and the probe
        loop goes on."""
        token = self.add_manager()
        tid = self.post_target(token, stage='public')
        self.sync(lambda: workservers.register(self.app, 'bad', ':', 1,
                                                       '127.0.0.1'))
        self.sync(lambda: self.redis.hset(cc_keys.target_ws(tid), 'bad', 1))
        c, reply = self.fetch_json('/streams', 'POST', {
            'target_id': tid, 'files': {'s.xml': 'x'}}, token=token)
        self.assertError(c, 503, reply)
        self.assertEqual(self.sync(lambda: self.redis.hgetall(
            cc_keys.target_ws(tid))), {'bad': '1'})
        c, reply = self.fetch_json('/core/assign', 'POST', {
            'engine': 'openmm', 'engine_version': '6.0'})
        self.assertError(c, 503, reply)
        self.sync(lambda: workservers.probe_all(self.app))


async def connect(port):
    ctx = ssl.create_default_context(cafile=certs()['ca'])
    return await TCPClient().connect('127.0.0.1', port, ssl_options=ctx)


async def trickle(port, head, piece, every=0.5, most=60):
    """Send `head`, then `piece` every `every` s, at most `most` times,
    until the server hangs up. Returns how many pieces it took (None: the
    connection was never cut)."""
    stream = await connect(port)
    closed = asyncio.ensure_future(stream.read_until_close())
    try:
        await stream.write(head)
        for i in range(most):
            await asyncio.sleep(every)
            if closed.done():
                return i
            try:
                await stream.write(piece)
            except StreamClosedError:
                return i
        return None
    finally:
        stream.close()
        closed.cancel()


async def big_body(port, path, token, length, send_most):
    """A request promising `length` body bytes: its reply is awaited
    before any body byte is sent, then up to `send_most` bytes are sent in
    1 MiB pieces while the server keeps the connection. Returns (status,
    bytes the server took before it hung up, None if it never did)."""
    stream = await connect(port)
    try:
        await stream.write(('PUT %s HTTP/1.1\r\nHost: x\r\nAuthorization: '
                            '%s\r\nContent-Length: %d\r\n\r\n'
                            % (path, token, length)).encode())
        head = await asyncio.wait_for(stream.read_until(b'\r\n\r\n'), 30)
        closed = asyncio.ensure_future(stream.read_until_close())
        piece = b'x' * (1 << 20)
        sent = 0
        while sent < send_most and not closed.done():
            try:
                await stream.write(piece)
            except StreamClosedError:
                break
            sent += len(piece)
            await asyncio.sleep(0.01)
        return int(head.split()[1]), sent if closed.done() or \
            stream.closed() else None
    finally:
        stream.close()


class TestSlowAndGreedyClients(unittest.TestCase):
    """Real ws.py processes."""

    def ws(self, **conf):
        ws = ServerProcess('ws', command_centers={'cc': {
            'url': '127.0.0.1:9', 'pass': PASS}}, **conf)
        self.addCleanup(ws.stop)
        return ws.start()

    def test_slow_headers_bodies_and_idle_connections_are_cut(self):
        ws = self.ws(header_timeout_in_s=2.0, body_timeout_in_s=2.0)
        head = ('POST /streams/activate HTTP/1.1\r\nHost: x\r\n'
                'Authorization: %s\r\nContent-Length: 1000\r\n\r\n'
                % PASS).encode()
        # A body byte every half second: cut, not kept for 30 s.
        self.assertIsNotNone(asyncio.run(trickle(ws.port, head, b' ')))
        # Headers a byte at a time, and a connection that sends nothing.
        self.assertIsNotNone(asyncio.run(trickle(ws.port, b'P', b'U')))
        self.assertIsNotNone(asyncio.run(trickle(ws.port, b'', b'')))
        self.assertEqual(ws.request('GET', '/').status_code, 200)

    def test_big_bodies_with_a_bad_token_cost_no_memory(self):
        """Issue 10: four concurrent 200 MB bodies with the token `nope`
        took the WS to 2.5 GB. Now each is answered before its body (413:
        over the frame limit) and cut after LINGER_MAX; four 30 MB ones
        (under the limit) get their 401 at once and are read and
        dropped."""
        ws = self.ws()
        process = psutil.Process(ws.process.pid)
        before = process.memory_info().rss

        async def attack(length, send_most):
            return await asyncio.gather(*(
                big_body(ws.port, '/core/frame', 'nope', length, send_most)
                for _ in range(4)))
        for status, taken in asyncio.run(attack(200 << 20, 64 << 20)):
            self.assertEqual(status, 413)
            self.assertIsNotNone(taken)  # hung up
            self.assertLess(taken, 16 << 20)
        for status, _ in asyncio.run(attack(30 << 20, 30 << 20)):
            self.assertEqual(status, 401)
        grown = process.memory_info().rss - before
        self.assertLess(grown, 32 << 20, grown)
        self.assertEqual(ws.request('GET', '/').status_code, 200)

    def test_refusals_before_the_body_close_the_connection_cleanly(self):
        """A request answered before its body is read ends its connection:
        the reply says so (`Connection: close`), so a client's keep-alive
        pool never sends the next request into a closed connection."""
        ws = self.ws()
        for method, path, body, token in (
                ('PUT', '/core/frame', b'{', 'nope'),
                ('GET', '/nowhere', None, None),
                ('POST', '/streams/activate', b'', 'x')):
            r = ws.request(method, path, data=body, token=token)
            self.assertIn(r.status_code, (401, 404))
            self.assertEqual(r.headers.get('Connection'), 'close')
        errors = 0
        for _ in range(100):
            for method, path, body, token in (
                    ('PUT', '/core/frame', b'{}', 'nope'),
                    ('GET', '/nowhere', None, None), ('GET', '/', None, None)):
                try:
                    ws.request(method, path, data=body, token=token)
                except requests.ConnectionError:
                    errors += 1
        self.assertEqual(errors, 0)

    def test_a_gzip_bomb_frame_costs_no_memory(self):
        """Issue 10: a 1.4 MB frame inflating to 1 GiB took the WS from 60
        MB to 2.1 GB. Now the inflate stops at the per-file limit (128 MiB
        by default) and writes as it goes: the peak barely moves."""
        ws = self.ws()
        tid = str(uuid.uuid4())
        assert ws.request('POST', '/streams', {
            'target_id': tid, 'stream_files': {'s.xml': 's'},
            'target_files': {}}, token=PASS).status_code == 200
        token = ws.request('POST', '/streams/activate', {'target_id': tid},
                           token=PASS).json()['token']
        zeros = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = b'\0' * (16 << 20)
        data = b''.join([zeros.compress(block) for _ in range(32)] +
                        [zeros.flush()])  # 512 MiB in 500 KB
        pid = ws.process.pid
        with open('/proc/%d/clear_refs' % pid, 'w') as f:
            f.write('5')  # the peak starts from now
        before = peak_rss(pid)
        r = ws.request('PUT', '/core/frame', {'files': {
            'frames.xtc.gz.b64': b64(data)}}, token=token)
        self.assertEqual(r.status_code, 413, r.text)
        grown = peak_rss(pid) - before
        self.assertLess(grown, 48 << 20, grown)
        r = ws.request('PUT', '/core/frame', {'files': {'frames.xtc.b64': b64(
            b'ok')}}, token=token)
        self.assertEqual(r.status_code, 200, r.text)


def peak_rss(pid):
    """The peak resident size of a process (VmHWM), in bytes."""
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    raise AssertionError('no VmHWM for %d' % pid)
