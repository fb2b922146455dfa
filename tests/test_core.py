"""The reference core's protocol loop against a small scripted CC+WS (one
Tornado app over real HTTPS in a thread): retry with backoff while the
server refuses connections or answers 503, recovery, a fresh assignment
after a permanent error, the engine's error reported on /core/stop,
background heartbeats, and checkpoint-then-stop on SIGTERM."""
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import unittest
from types import SimpleNamespace

import tornado.httpserver
import tornado.web

from server import tls
from siegetank import files as wire
from siegetank.core import Backoff, Core, Fatal, make_engine, synthetic
from tools.testing import ROOT, certs, free_port, wait_for


class Script:
    """What the fake servers do and what they saw. `fail[path]` is a list
    of status codes answered (and consumed) before that path succeeds; a
    (code, fields) pair adds fields to the error body, as the WS's
    `ended`."""

    def __init__(self):
        self.fail = {}
        self.calls = []          # (path, token, body) in arrival order
        self.lock = threading.Lock()
        self.tokens = 0

    def next_failure(self, path):
        with self.lock:
            codes = self.fail.get(path)
            return codes.pop(0) if codes else None

    def seen(self, path):
        with self.lock:
            return [c for c in self.calls if c[0] == path]


class Handler(tornado.web.RequestHandler):
    def initialize(self, script, server):
        self.script = script
        self.server = server

    def answer(self, path):
        body = json.loads(self.request.body) if self.request.body else None
        token = self.request.headers.get('Authorization')
        with self.script.lock:
            self.script.calls.append((path, token, body))
        code = self.script.next_failure(path)
        if code:
            code, fields = code if isinstance(code, tuple) else (code, {})
            self.set_status(code)
            self.finish(dict(fields, error='scripted %d' % code))
            return
        if path == 'assign':
            with self.script.lock:
                self.script.tokens += 1
                token = 'token-%d' % self.script.tokens
            self.finish({'token': token, 'uri': self.server.url('/core/start'),
                         'url': self.server.url('/core/start'),
                         'options': {}})
        elif path == 'start':
            seed = wire.encode_files(synthetic.seed_files())
            self.finish({'stream_id': 's1:ws', 'target_id': 't1',
                         'target_files': {}, 'stream_files': seed,
                         'files': seed, 'options': {}})
        else:
            self.finish({})

    def post(self, path):
        self.answer(path)

    def put(self, path):
        self.answer(path)

    def get(self, path):
        self.answer(path)


class FakeServer:
    """CC and WS endpoints in one Tornado app on a fixed port, started and
    stopped on demand (before start, connections are refused)."""

    def __init__(self, script):
        self.script = script
        self.port = free_port()
        self.thread = None

    def url(self, path):
        return 'https://127.0.0.1:%d%s' % (self.port, path)

    def start(self):
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(asyncio.new_event_loop())
            self.loop = asyncio.get_event_loop()
            c = certs()
            ctx = tls.server_context(SimpleNamespace(
                ssl_certfile=c['cert'], ssl_key=c['key']))
            app = tornado.web.Application([
                (r'/core/(assign|start|frame|checkpoint|heartbeat|stop)',
                 Handler, {'script': self.script, 'server': self})])
            self.http = tornado.httpserver.HTTPServer(app, ssl_options=ctx)
            self.http.listen(self.port, '127.0.0.1')
            ready.set()
            self.loop.run_forever()
            self.loop.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait()

    def stop(self):
        if self.thread:
            def shut():
                self.http.stop()
                self.loop.stop()
            self.loop.call_soon_threadsafe(shut)
            self.thread.join()


class RecordingSleep:
    """Backoff sleep that records each delay instead of sleeping and runs
    `on_sleep(n)` (n = delays so far), e.g. to start the server."""

    def __init__(self, on_sleep=None):
        self.delays = []
        self.on_sleep = on_sleep

    def __call__(self, seconds, stop):
        self.delays.append(seconds)
        if self.on_sleep:
            self.on_sleep(len(self.delays))
        return stop.is_set()


class FailingEngine:
    name = 'synthetic'
    version = '1'

    def start(self, stream_files, target_files, options):
        raise RuntimeError('the engine exploded')


class TestBackoff(unittest.TestCase):
    def test_grows_from_one_second_to_five_minutes_with_jitter(self):
        b = Backoff()
        delays = [b.next_delay() for _ in range(14)]
        for n, d in enumerate(delays):
            cap = min(300.0, 2 ** n)
            self.assertTrue(cap * 0.5 <= d <= cap, (n, d))
        self.assertTrue(all(150 <= d <= 300 for d in delays[9:]))
        b.reset()
        self.assertLessEqual(b.next_delay(), 1.0)


class TestCoreLoop(unittest.TestCase):
    def setUp(self):
        self.script = Script()
        self.server = FakeServer(self.script)

    def tearDown(self):
        self.server.stop()

    def core(self, engine=None, sleep=None, **kw):
        kw.setdefault('max_frames', 3)
        return Core('127.0.0.1:%d' % self.server.port,
                    engine or make_engine('synthetic', rate=200),
                    ca=certs()['ca'], backoff=Backoff(sleep=sleep or
                                                      RecordingSleep()),
                    heartbeat_every=30, **kw)

    def test_refused_then_503_then_recovers(self):
        """Connection refused twice, then the server starts and answers 503
        twice on assign and once on a frame: the core backs off 1, 2, 4, 8 s
        (jittered), resets after success, and finishes its frames."""
        self.script.fail = {'assign': [503, 503], 'frame': [503]}
        sleep = RecordingSleep(
            lambda n: n == 2 and self.server.start())
        core = self.core(sleep=sleep)
        stats = core.run()
        self.assertEqual(stats['frames'], 3)
        d = sleep.delays
        self.assertEqual(len(d), 5)
        for got, cap in zip(d[:4], (1, 2, 4, 8), strict=True):
            self.assertTrue(cap / 2 <= got <= cap, d)
        self.assertLessEqual(d[4], 1.0)   # reset after the assignment
        frames = self.script.seen('frame')
        self.assertEqual(len(frames), 4)  # one retried
        self.assertEqual(frames[0][2], frames[1][2])  # same body retried
        self.assertEqual(len({json.dumps(f[2]) for f in frames}), 3)
        paths = [c[0] for c in self.script.calls]
        self.assertEqual(paths[-2:], ['checkpoint', 'stop'])
        checkpoint = self.script.seen('checkpoint')[-1]
        self.assertEqual(checkpoint[1], 'token-1')
        self.assertEqual(checkpoint[2]['frames'], 3)
        state = wire.decode_files(checkpoint[2]['files'])
        self.assertEqual(json.loads(state[synthetic.STATE_FILE])['frame'], 3)
        self.assertEqual(self.script.seen('stop')[-1][2], {})

    def test_permanent_error_gets_a_fresh_assignment(self):
        self.server.start()
        self.script.fail = {'frame': [401]}
        stats = self.core().run()
        self.assertEqual(stats['frames'], 3)
        self.assertEqual(stats['streams'], 2)
        tokens = [c[1] for c in self.script.seen('frame')]
        self.assertEqual(tokens, ['token-1'] + ['token-2'] * 3)
        self.assertEqual(len(self.script.seen('assign')), 2)

    def test_a_stop_by_the_manager_is_no_error(self):
        """The WS answers a frame: the stream was stopped by its manager.
        Counted as such, not as an error, and the next assignment is asked
        for at once (no backoff)."""
        self.server.start()
        self.script.fail = {'frame': [(401, {'ended': 'manager_stop'})]}
        sleep = RecordingSleep()
        stats = self.core(sleep=sleep).run()
        self.assertEqual((stats['frames'], stats['streams'],
                          stats['stopped_by_manager'], stats['errors']),
                         (3, 2, 1, 0))
        self.assertEqual(sleep.delays, [])

    def test_a_deletion_seen_by_a_heartbeat_is_no_error(self):
        """The WS answers a heartbeat: the stream was deleted by its
        manager. The core gives the stream up, no error."""
        self.server.start()
        stop = threading.Event()
        self.script.fail = {'heartbeat': [(401, {'ended': 'deletion'})]}
        sleep = RecordingSleep()
        core = Core('127.0.0.1:%d' % self.server.port,
                    make_engine('synthetic', rate=5), ca=certs()['ca'],
                    backoff=Backoff(sleep=sleep), heartbeat_every=0.05,
                    stop=stop, max_frames=None)
        thread = threading.Thread(target=core.run)
        thread.start()
        try:
            wait_for(lambda: any(c[1] == 'token-2'
                                 for c in self.script.seen('frame')),
                     'a frame of the second stream')
        finally:
            stop.set()
            thread.join()
        self.assertEqual((core.stats['stopped_by_manager'],
                          core.stats['errors']), (1, 0))
        self.assertEqual(sleep.delays, [])

    def test_a_retried_stop_the_ws_had_done_is_no_error(self):
        """/core/stop reached the WS but its reply was lost: the retry's
        401 says the core had stopped it ('stop'); the core is done."""
        self.server.start()
        self.script.fail = {'stop': [503, (401, {'ended': 'stop'})]}
        sleep = RecordingSleep()
        stats = self.core(sleep=sleep).run()
        self.assertEqual((stats['frames'], stats['streams'],
                          stats['errors']), (3, 1, 0))
        self.assertEqual(len(self.script.seen('stop')), 2)
        self.assertEqual(sleep.delays, [])

    def test_engine_error_is_reported_on_stop(self):
        self.server.start()
        stop = threading.Event()
        sleep = RecordingSleep(lambda n: n == 2 and stop.set())
        core = self.core(engine=FailingEngine(), sleep=sleep, stop=stop)
        stats = core.run()
        self.assertEqual(stats['errors'], 2)
        stops = self.script.seen('stop')
        self.assertEqual(len(stops), 2)
        message = base64.b64decode(stops[0][2]['error']).decode()
        self.assertIn('the engine exploded', message)
        self.assertEqual([c[1] for c in stops], ['token-1', 'token-2'])

    def test_unknown_donor_token_is_fatal(self):
        self.server.start()
        self.script.fail = {'assign': [401]}
        with self.assertRaises(Fatal) as e:
            self.core(donor_token='nope').run()
        self.assertIn('scripted 401', str(e.exception))
        self.assertEqual(self.script.seen('assign')[0][2]['donor_token'],
                         'nope')

    def test_heartbeats_in_the_background(self):
        """Frames slower than heartbeats: heartbeats arrive meanwhile."""
        self.server.start()
        stop = threading.Event()
        core = Core('127.0.0.1:%d' % self.server.port,
                    make_engine('synthetic', rate=0.2), ca=certs()['ca'],
                    heartbeat_every=0.05, stop=stop, max_frames=None)
        thread = threading.Thread(target=core.run)
        thread.start()
        try:
            wait_for(lambda: len(self.script.seen('heartbeat')) >= 3,
                     'three heartbeats')
        finally:
            stop.set()
            thread.join()
        beats = self.script.seen('heartbeat')
        self.assertEqual({b[1] for b in beats}, {'token-1'})
        paths = [c[0] for c in self.script.calls if c[0] != 'heartbeat']
        self.assertEqual(paths[-1], 'stop')

    def test_checkpoint_period(self):
        """checkpoint_every=0: a checkpoint after every frame, and none
        left to send at the end."""
        self.server.start()
        self.core(checkpoint_every=0).run()
        paths = [c[0] for c in self.script.calls if c[0] != 'heartbeat']
        self.assertEqual(paths, ['assign', 'start'] +
                         ['frame', 'checkpoint'] * 3 + ['stop'])
        frames = [json.loads(wire.decode_files(c[2]['files'])[
            synthetic.STATE_FILE])['frame']
            for c in self.script.seen('checkpoint')]
        self.assertEqual(frames, [1, 2, 3])


class TestCoreProcess(unittest.TestCase):
    def test_sigterm_checkpoints_then_stops(self):
        script = Script()
        server = FakeServer(script)
        server.start()
        try:
            env = dict(os.environ, PYTHONPATH=ROOT)
            p = subprocess.Popen(
                [sys.executable, '-m', 'siegetank.core', '--cc',
                 '127.0.0.1:%d' % server.port, '--ca', certs()['ca'],
                 '--engine', 'synthetic', '--rate', '20', '--cores', '2',
                 '--checkpoint-every', '3600', '-q'],
                cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
            try:
                wait_for(lambda: len({c[1] for c in script.seen('frame')})
                         == 2, 'frames of two streams')
                self.assertEqual(script.seen('checkpoint'), [])
                p.send_signal(signal.SIGTERM)
                _, err = p.communicate(timeout=60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self.assertEqual(p.returncode, 0, err)
            for token in ('token-1', 'token-2'):
                mine = [c[0] for c in script.calls if c[1] == token]
                self.assertEqual(mine[-2:], ['checkpoint', 'stop'], mine)
            self.assertIn(b'2 streams', err)
        finally:
            server.stop()
