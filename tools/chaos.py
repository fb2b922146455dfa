"""`make chaos`: kill -9 at a thousand points of a running system and check,
after every restart, that nothing a client was told is stored was lost.

One CC and one WS (two worker processes), each with its embedded Redis,
on loopback. Synthetic cores keep sending frames, checkpoints and
heartbeats through the real protocol (assign on the CC, then the WS),
retrying like real cores; a manager keeps downloading every stream through
the CC and creating and deleting scratch streams. The killer picks a
victim (a WS worker -- the one holding a buffer's or a stream's lock
when there is one --, the whole WS, the WS's Redis, the CC, the CC's
Redis) and a moment: while a frame, a checkpoint (a random delay into it,
so before and after its rename), an activation, a stream creation or
deletion is in flight, or while the WS registers after a restart, or
idle.

After every kill, once everything answers again:
- every stream downloads, byte for byte, as the frames of one checkpoint
  that is no older than the last checkpoint acknowledged to its core
  (no acknowledged frame lost, no torn or mixed checkpoint);
- the CC's map of streams equals the WS's streams (after the repairs of
  the reconciliation): no stream lost, duplicated or unknown;
and every `--deep-every` points and at the end, with every core stopped
dead, no stream is still active once the heartbeat window has passed.

Prints a table (victim, moment, count, outcome) and exits 1 on any loss.
`python -m tools.chaos --points 1000` (the default); `--minutes` bounds
the run. The test suite runs a short version (tests/test_chaos.py).
"""
import argparse
import base64
import collections
import os
import random
import signal
import sys
import threading
import time

import requests

from server import processes
from server.cc import keys
from tools.testing import (
    CC_PASS,
    ServerProcess,
    TimedOut,
    certs,
    command_centers,
    online,
    wait_for,
)

ENGINE, VERSION = 'chaos', '1'
HEARTBEAT_S = 3
VICTIMS = {'ws_worker': 3, 'ws': 2, 'ws_redis': 2, 'cc': 2, 'cc_redis': 2}
MOMENTS = ('frame', 'checkpoint', 'assign', 'create', 'delete',
           'registration', 'idle')
RETRYABLE = (429, 502, 503, 504)


def frame_bytes(stream, i):
    """About 1 KB that say which stream and frame they are."""
    return (b'%s %08d\n' % (stream.encode()[:8], i)) * 57


def frames(stream, lo, hi):
    return b''.join(frame_bytes(stream, i) for i in range(lo, hi))


def state_text(total):
    """A checkpoint: the frame count it follows, and bulk (a commit that
    takes a moment, so kills land inside it)."""
    return '%d\n%s' % (total, 'x' * 65536)


def session():
    s = requests.Session()
    s.trust_env = False
    s.verify = certs()['ca']
    return s


class Gone(Exception):
    """The activation is over (401, 409, ...): ask the CC again."""


class Ledger:
    """What the servers acknowledged, and what went wrong."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = collections.defaultdict(int)   # stream -> frames
        self.sent = collections.defaultdict(lambda: {0})
        self.failures = []
        self.inflight = {m: threading.Event() for m in MOMENTS}

    def ack(self, sid, total):
        with self.lock:
            self.acked[sid] = max(self.acked[sid], total)

    def fail(self, what, detail):
        with self.lock:
            self.failures.append((what, detail))
        print('FAILURE %s: %s (%s)' % (what, detail, time.strftime(
            '%H:%M:%S')), flush=True)

    def starting(self, moment):
        self.inflight[moment].set()


class Core(threading.Thread):
    """A synthetic core: assign, start, frames and checkpoints, heartbeats;
    connection errors and 503s retried, anything else ends the activation."""

    def __init__(self, chaos, seed):
        super().__init__(daemon=True)
        self.chaos, self.ledger = chaos, chaos.ledger
        self.rng = random.Random(seed)
        self.stopping = False
        self.http = session()

    def call(self, method, url, body=None, token=None, moment=None):
        for attempt in range(8):
            if self.stopping:
                raise Gone('stopping')
            if moment:
                self.ledger.starting(moment)
            try:
                r = self.http.request(method, url, json=body, timeout=20,
                                      headers={'Authorization': token or ''})
            except requests.RequestException:
                time.sleep(0.1 * (attempt + 1))
                continue
            if r.status_code == 200:
                return r
            if r.status_code not in RETRYABLE:
                raise Gone('%s %s: %d' % (method, url, r.status_code))
            time.sleep(0.1 * (attempt + 1))
        raise Gone('%s %s: no success' % (method, url))

    def run(self):
        while not self.stopping:
            try:
                self.activation()
            except Gone:
                time.sleep(0.05)
            except Exception as e:  # a bug in the harness: say it
                self.ledger.fail('harness', repr(e))
                time.sleep(0.5)

    def activation(self):
        chaos = self.chaos
        r = self.call('POST', chaos.cc.url + '/core/assign', {
            'engine': ENGINE, 'engine_version': VERSION}, moment='assign')
        token, url = r.json()['token'], r.json()['url']
        start = self.call('GET', url, token=token).json()
        sid = start['stream_id']
        base = url.rsplit('/core/start', 1)[0]
        k = int(start['stream_files']['state.txt'].split('\n', 1)[0])
        with self.ledger.lock:
            acked, sent = self.ledger.acked[sid], set(self.ledger.sent[sid])
        if k < acked or k not in sent:
            self.ledger.fail('lost', '%s restarts at %d, acked %d'
                             % (sid, k, acked))
        nxt = k
        for _ in range(self.rng.randint(1, 6)):
            if self.stopping:
                return
            for _ in range(self.rng.randint(1, 3)):
                n = self.rng.choice((1, 1, 2))
                self.call('PUT', base + '/core/frame', {
                    'files': {'frames.dat.b64': base64.b64encode(
                        frames(sid, nxt, nxt + n)).decode()},
                    'frames': n}, token=token, moment='frame')
                nxt += n
            if self.rng.random() < 0.3:
                self.call('POST', base + '/core/heartbeat', {}, token=token)
            with self.ledger.lock:
                self.ledger.sent[sid].add(nxt)
            self.call('PUT', base + '/core/checkpoint', {
                'files': {'state.txt': state_text(nxt)}, 'frames': nxt},
                token=token, moment='checkpoint')
            self.ledger.ack(sid, nxt)
            time.sleep(0.02)
        self.call('PUT', base + '/core/stop', {}, token=token)


class Manager(threading.Thread):
    """Downloads streams through the CC (checked against the ledger) and
    creates and deletes scratch streams; `paused` stops it between steps."""

    def __init__(self, chaos, seed):
        super().__init__(daemon=True)
        self.chaos, self.ledger = chaos, chaos.ledger
        self.rng = random.Random(seed)
        self.stopping = False
        self.paused = threading.Event()
        self.idle = threading.Event()
        self.http = session()

    def run(self):
        while not self.stopping:
            if self.paused.is_set():
                self.idle.set()
                time.sleep(0.02)
                continue
            self.idle.clear()
            try:
                self.chaos.check_download(self.http, self.rng.choice(
                    self.chaos.streams), quiet=True)
                if self.rng.random() < 0.5:
                    self.scratch()
            except requests.RequestException:
                time.sleep(0.1)

    def scratch(self):
        chaos = self.chaos
        self.ledger.starting('create')
        r = chaos.cc_call(self.http, 'POST', '/streams', {
            'target_id': chaos.scratch_target,
            'files': {'state.txt': state_text(0)}})
        if r.status_code != 200:
            return
        sid = r.json()['stream_id']
        for _ in range(20):
            self.ledger.starting('delete')
            r = chaos.cc_call(self.http, 'PUT', '/streams/delete/' + sid)
            if r.status_code in (200, 404):
                return
            time.sleep(0.2)


class Chaos:
    def __init__(self, seed, n_streams=6, n_cores=4, cc_processes=1):
        self.rng = random.Random(seed)
        self.seed = seed
        self.ledger = Ledger()
        self.n_streams, self.n_cores = n_streams, n_cores
        self.cc = ServerProcess('cc', ws_timeout_in_s=3.0,
                                ws_probe_interval_in_ms=200, max_ws_fails=2,
                                reconcile_interval_in_s=1.0,
                                redis_timeout_in_s=2.0,
                                # the cores share one address and re-ask
                                # after every kill: no abuse limits here
                                client_assigns_per_minute=1000000,
                                client_max_held_streams=1000000,
                                num_processes=cc_processes)
        self.ws = ServerProcess('ws', command_centers=command_centers(self.cc),
                                num_processes=2,
                                heartbeat_increment=HEARTBEAT_S,
                                pulse_frequency_in_ms=200,
                                register_retry_max_in_s=0.5,
                                redis_timeout_in_s=2.0)
        self.http = session()
        self.cores, self.manager = [], None
        self.results = collections.Counter()
        self.verified = collections.defaultdict(int)  # stream -> frames
        self.seconds = collections.Counter()
        self.observed = collections.Counter()

    # setup and checks

    def cc_call(self, http, method, path, body=None):
        return http.request(method, self.cc.url + path, json=body,
                            timeout=30, headers={'Authorization': self.admin})

    def start(self):
        self.cc.start()
        self.ws.start()
        r = self.http.post(self.cc.url + '/managers', json={
            'email': 'chaos@test.org', 'password': 'chaos-pass',
            'role': 'admin'}, timeout=30)
        self.admin = r.json()['token']
        self.wait_healthy()
        target = {'description': 'chaos', 'engine': ENGINE,
                  'engine_versions': [VERSION], 'stage': 'public',
                  'files': {'system.txt': 'chaos'}}
        self.target = self.cc_call(self.http, 'POST', '/targets',
                                   target).json()['target_id']
        target['stage'] = 'private'
        self.scratch_target = self.cc_call(self.http, 'POST', '/targets',
                                           target).json()['target_id']
        self.streams = []
        for _ in range(self.n_streams):
            r = self.cc_call(self.http, 'POST', '/streams', {
                'target_id': self.target,
                'files': {'state.txt': state_text(0)}})
            self.streams.append(r.json()['stream_id'])
        self.start_clients()

    def start_clients(self):
        self.cores = [Core(self, self.rng.random())
                      for _ in range(self.n_cores)]
        self.manager = Manager(self, self.rng.random())
        for t in self.cores + [self.manager]:
            t.start()

    def stop_clients(self):
        for t in self.cores + [self.manager]:
            t.stopping = True
        for t in self.cores + [self.manager]:
            t.join(60)

    def wait_healthy(self, timeout=90):
        def up(server):
            try:
                return self.http.get(server.url + '/', timeout=5) \
                    .status_code == 200
            except requests.RequestException:
                return False

        wait_for(lambda: up(self.cc) and up(self.ws)
                 and online(self.cc, self.ws.name),
                 'the CC and the WS answering, the WS online', timeout,
                 errors=(requests.RequestException, ValueError))

    def check_download(self, http, sid, quiet=False, full=False):
        """The stream downloads as the frames of a sent checkpoint no
        older than the acknowledged one: in full, or (cheaper, between full
        checks) its length and the bytes past those verified last time,
        asked with Range. False if it could not be asked."""
        size = len(frame_bytes(sid, 0))
        with self.ledger.lock:
            acked = self.ledger.acked[sid]
        start = 0 if full else self.verified[sid]
        headers = {'Authorization': self.admin}
        if start:
            headers['Range'] = 'bytes=%d-' % (start * size)
        r = http.get(self.cc.url + '/streams/%s/frames.dat' % sid,
                     headers=headers, timeout=60)
        if r.status_code == 416:  # nothing past what was verified
            total, body = int(r.headers['Content-Range'].split('/')[1]), b''
        elif r.status_code in (200, 206):
            body = r.content
            total = start * size + len(body)
        else:
            if not quiet:
                self.ledger.fail('unavailable', '%s download: %d'
                                 % (sid, r.status_code))
            return False
        k = total // size
        with self.ledger.lock:
            sent = set(self.ledger.sent[sid])
        if k < acked or total < start * size:
            self.ledger.fail('lost', '%s: %d frames downloadable, %d acked'
                             % (sid, k, acked))
        elif body != frames(sid, start, k) or k not in sent:
            self.ledger.fail('torn', '%s: bytes %d-%d are not the frames of '
                             'a checkpoint' % (sid, start * size, total))
        else:
            self.verified[sid] = k
        return True

    def maps(self):
        """(CC's streams, WS's streams) as sets of ids."""
        cc_redis = self.cc.redis()
        try:
            prefix = keys.stream('')
            cc = {k[len(prefix):] for k in
                  cc_redis.scan_iter(match=keys.stream('*'), count=1000)}
        finally:
            cc_redis.close()
        r = self.http.get(self.ws.url + '/streams', timeout=30,
                          headers={'Authorization': CC_PASS})
        r.raise_for_status()  # a 503 while a Redis restarts: not yet
        return cc, set(r.json()['streams'])

    def check(self):
        """After a kill: everything answers, every stream is whole, and
        the CC's map equals the WS's streams (within a few reconciliations)."""
        self.wait_healthy()
        for sid in self.streams:
            wait_for(lambda sid=sid: self.check_download(
                self.http, sid, quiet=True),
                     'a download of %s' % sid, 60,
                     errors=(requests.RequestException,))
        self.manager.paused.set()
        try:
            self.manager.idle.wait(60)
            last = [None]

            def same():
                cc, ws = self.maps()
                last[0] = (cc, ws)
                return cc == ws
            try:
                wait_for(same, 'the CC map to equal the WS streams', 30,
                         errors=(requests.RequestException, ValueError))
            except TimedOut:
                cc, ws = last[0] or (set(), set())
                self.ledger.fail('map', 'CC only %s, WS only %s'
                                 % (sorted(cc - ws), sorted(ws - cc)))
            cc, ws = last[0] or (set(), set())
            for sid in self.streams:
                if sid not in cc or sid not in ws:
                    self.ledger.fail('lost', 'stream %s gone' % sid)
        finally:
            self.manager.paused.clear()

    def check_no_wedged(self):
        """Every core stopped dead: after the heartbeat window no stream
        is active, and every stream can be activated again."""
        self.stop_clients()
        for sid in self.streams:  # every byte, not only the new ones
            # a 503 (a store the last kill restarted) is retried, as in
            # check(); only what a download serves can fail it
            try:
                wait_for(lambda sid=sid: self.check_download(
                    self.http, sid, quiet=True, full=True),
                    'a download of %s' % sid, 60,
                    errors=(requests.RequestException,))
            except TimedOut as e:
                self.ledger.fail('unavailable', str(e).splitlines()[0])
        time.sleep(HEARTBEAT_S + 1.5)

        def quiet():
            r = self.http.get(self.ws.url + '/active_streams', timeout=30,
                              headers={'Authorization': CC_PASS})
            return r.status_code == 200 and r.json() == {}
        try:
            wait_for(quiet, 'no active stream after the expiry window', 15,
                     errors=(requests.RequestException,))
        except TimedOut:
            self.ledger.fail('wedged', 'streams still active: %s; %s' % (
                self.http.get(self.ws.url + '/active_streams', timeout=30,
                              headers={'Authorization': CC_PASS}).text,
                self.ws_locks()))
        self.start_clients()

    # killing

    def ws_workers(self):
        redis = self.ws.redis_pid()
        return [pid for pid in processes.live_pids(processes.PARENT,
                                                   self.ws.process.pid)
                if pid != redis]

    def lock_holder(self):
        """The pid of a WS worker holding a stream's lock now, or None."""
        r = self.ws.redis()
        try:
            for key in r.scan_iter(match='wsd:%s:lock:stream:*'
                                   % self.ws.name, count=100):
                holder = r.get(key)
                if holder and holder.split('.')[0].isdigit():
                    return int(holder.split('.')[0])
        except Exception:
            return None
        finally:
            r.close()
        return None

    def buffer_lock_holder(self, workers):
        """The pid of a WS worker holding a buffer's flock now (a frame
        being appended and recorded), or None."""
        try:
            with open('/proc/locks') as f:
                for line in f:
                    parts = line.split()
                    if 'FLOCK' in parts and int(parts[-4]) in workers:
                        return int(parts[-4])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def ws_locks(self):
        """The WS's locks and heartbeats now (why a stream is stuck)."""
        r = self.ws.redis()
        try:
            prefix = 'wsd:%s:' % self.ws.name
            found = {k: r.get(k) for k in r.scan_iter(
                match=prefix + 'lock:stream:*') if r.type(k) == 'string'}
            return 'locks %s, heartbeats %s, now %.1f' % (
                found, r.zrange(prefix + 'heartbeats', 0, -1,
                                withscores=True), time.time())
        finally:
            r.close()

    def tmp_chunks(self):
        """Whether an interrupted commit left a temporary chunk."""
        root = os.path.join(self.ws.settings.data_folder, 'streams')
        for sid in self.streams:
            folder = os.path.join(root, sid, 'chunks')
            try:
                if any(n.startswith('.tmp-') for n in os.listdir(folder)):
                    return True
            except OSError:
                pass
        return False

    def kill(self, victim, moment):
        if moment == 'registration':
            if victim != 'ws':  # the WS restarts; strike as it registers
                self.ws.kill()
                self.ws.start()
            else:
                self.ws.kill()
                self.ws.start()
                time.sleep(self.rng.uniform(0, 0.3))
        elif moment != 'idle':
            event = self.ledger.inflight[moment]
            event.clear()
            event.wait(10)
            delay = 0.03 if moment == 'checkpoint' else 0.01
            time.sleep(self.rng.uniform(0, delay))
        if victim == 'ws_worker':
            workers = self.ws_workers()
            pid = None
            if moment == 'frame':
                pid = self.buffer_lock_holder(workers)
            if moment in ('frame', 'checkpoint') and pid is None:
                pid = self.lock_holder()
            if pid not in workers:
                pid = self.rng.choice(workers) if workers else None
            if pid:
                os.kill(pid, signal.SIGKILL)
            if moment == 'checkpoint':
                self.observed['tmp chunk at kill' if self.tmp_chunks()
                              else 'no tmp chunk at kill'] += 1
        elif victim == 'ws':
            self.ws.kill()
            if moment == 'checkpoint':
                self.observed['tmp chunk at kill' if self.tmp_chunks()
                              else 'no tmp chunk at kill'] += 1
            self.ws.start()
        elif victim == 'cc':
            self.cc.kill()
            self.cc.start()
        else:
            server = self.ws if victim == 'ws_redis' else self.cc
            pid = server.redis_pid()
            if pid:
                os.kill(pid, signal.SIGKILL)

    def run(self, points, deep_every, minutes):
        deadline = time.monotonic() + 60 * minutes
        names = list(VICTIMS)
        weights = [VICTIMS[n] for n in names]
        done = 0
        for _point in range(points):
            if time.monotonic() > deadline:
                print('time bound reached after %d kill points' % done)
                break
            victim = self.rng.choices(names, weights)[0]
            moment = self.rng.choice(MOMENTS)
            before = len(self.ledger.failures)
            began = time.monotonic()
            try:
                self.kill(victim, moment)
                self.check()
            except (TimedOut, RuntimeError) as e:
                self.ledger.fail('unavailable', str(e).splitlines()[0])
                self.recover()
            except Exception as e:  # the harness itself: say it, go on
                self.ledger.fail('harness', repr(e))
                self.recover()
            ok = len(self.ledger.failures) == before
            self.seconds[(victim, moment)] += time.monotonic() - began
            self.results[(victim, moment, 'ok' if ok else 'FAILED')] += 1
            done += 1
            if deep_every and done % deep_every == 0:
                self.check_no_wedged()
            if done % 25 == 0:
                print('%d kill points, %d failures' % (
                    done, len(self.ledger.failures)), flush=True)
        self.check_no_wedged()
        return done

    def recover(self):
        """A server that did not come back (a harness-level failure): start
        it again so the run goes on."""
        for server in (self.cc, self.ws):
            if server.process.poll() is not None:
                server.kill()
                server.start()

    def stop(self):
        self.stop_clients()
        for server in (self.ws, self.cc):
            if server.process is not None and server.process.poll() is None:
                server.stop()

    def report(self, done):
        lines = ['', 'victim      moment        count  outcome  s/point',
                 '----------  ------------  -----  -------  -------']
        for (victim, moment, outcome), n in sorted(self.results.items()):
            runs = sum(c for (v, m, _), c in self.results.items()
                       if (v, m) == (victim, moment))
            lines.append('%-10s  %-12s  %5d  %-7s  %7.1f' % (
                victim, moment, n, outcome,
                self.seconds[(victim, moment)] / runs))
        lines.append('%-10s  %-12s  %5d' % ('total', '', done))
        for what, n in sorted(self.observed.items()):
            lines.append('checkpoint kills: %s: %d' % (what, n))
        with self.ledger.lock:
            acked = sum(self.ledger.acked.values())
        lines.append('acknowledged frames checked: %d in %d streams'
                     % (acked, len(self.streams)))
        r = self.cc.redis()
        try:
            lines.append('reconciliation repairs: %s'
                         % (r.hgetall(keys.RECONCILE_STATS) or {}))
        finally:
            r.close()
        kinds = collections.Counter(what for what, _ in self.ledger.failures)
        lines.append('failures: %s' % (dict(kinds) or 0))
        for what, detail in self.ledger.failures[:20]:
            lines.append('  %s: %s' % (what, detail))
        return '\n'.join(lines)


def run(points, seed=None, deep_every=100, minutes=240):
    """Returns (kill points done, failures [(kind, detail)], report)."""
    seed = seed if seed is not None else random.randrange(1 << 30)
    chaos = Chaos(seed)
    try:
        chaos.start()
        done = chaos.run(points, deep_every, minutes)
        report = chaos.report(done) + '\nseed: %d' % seed
    finally:
        chaos.stop()
    return done, list(chaos.ledger.failures), report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--points', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=None)
    parser.add_argument('--deep-every', type=int, default=100)
    parser.add_argument('--minutes', type=float, default=240)
    args = parser.parse_args(argv)
    # A TERM (a timeout, an impatient operator) stops the servers too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    done, failures, report = run(args.points, args.seed, args.deep_every,
                                 args.minutes)
    print(report)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
