"""The core's protocol loop (docs/api.md): assign on the CC, start on the WS,
then frames, periodic checkpoints and background heartbeats until told to
stop; a checkpoint before `/core/stop` on SIGINT/SIGTERM; `/core/stop` with
the error when the engine fails.

Failure policy, written for thousands of volunteer machines:
- transient (connection refused/reset, timeouts, 429/502/503/504): the same
  request is retried after a jittered backoff growing from 1 s to 5 min.
  Retrying is safe: a repeated frame is a no-op on the WS and so is a
  checkpoint with an empty buffer.
- permanent (any other non-2xx, e.g. 401 for an expired token, 404 for a
  deleted stream): the stream is given up and the core asks for a fresh
  assignment (after the same backoff, so a broken target cannot make cores
  hammer the CC).
- ended by its manager (the WS's 401 says `ended`: 'manager_stop' or
  'deletion'): no error; counted as `stopped_by_manager` and the core asks
  for a fresh assignment at once. A 401 saying the core had stopped the
  activation itself ('stop', 'error': a retried /core/stop whose first
  reply was lost) means the stop is done.
- fatal (the CC refuses the core's own request on assign: 400/401/403/404,
  e.g. an unknown donor token): the core exits with the server's message.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import json
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import requests

from siegetank import files as wire

log = logging.getLogger('siegetank.core')
CORE_VERSION = '1.0'
TRANSIENT_CODES = (429, 502, 503, 504)
# The WS's `ended` (why a token's activation is over) when the stream's
# manager stopped or deleted it, and when the core had stopped it itself.
BY_MANAGER = ('manager_stop', 'deletion')
BY_CORE = ('stop', 'error')
T = TypeVar('T')
Files = dict[str, bytes]


class Run(Protocol):
    """One stream's simulation, as an engine's `start` returns it."""

    def next_frame(self, stop: threading.Event) -> tuple[Files, int] | None:
        ...

    def checkpoint(self) -> Files: ...

    def close(self) -> None: ...


class Engine(Protocol):
    """What a core runs (siegetank.core.synthetic, openmm_engine)."""

    name: str
    version: str

    def start(self, stream_files: Files, target_files: Files,
              options: Mapping[str, Any]) -> Run: ...


class Transient(Exception):
    """Worth retrying the same request."""


class Permanent(Exception):
    """The server said no; retrying the same request will not help.
    `ended`: the WS's reason why the token's activation is over, if it
    said (BY_MANAGER, BY_CORE)."""

    def __init__(self, status: int, message: str,
                 ended: str | None = None) -> None:
        super().__init__('%s %s' % (status, message))
        self.status = status
        self.message = message
        self.ended = ended

    @property
    def by_manager(self) -> bool:
        return self.ended in BY_MANAGER


class Fatal(Exception):
    """The core cannot work at all (e.g. unknown donor token)."""


class Backoff:
    """Waits 1 s, 2 s, 4 s ... capped at 5 min, each scaled by a random
    factor in [0.5, 1] so a fleet of cores does not retry in lockstep.
    `sleep(seconds, stop)` is injectable for tests; it returns True if
    `stop` was set meanwhile."""

    def __init__(self, first: float = 1.0, cap: float = 300.0,
                 sleep: Callable[[float, threading.Event], bool] | None
                 = None, rng: random.Random | None = None) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0
        self.sleep = sleep or (lambda seconds, stop: stop.wait(seconds))
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2 ** self.attempt)
        self.attempt += 1
        return delay * self.rng.uniform(0.5, 1.0)

    def wait(self, stop: threading.Event) -> bool:
        """Sleep the next delay; False if `stop` was set meanwhile."""
        return not self.sleep(self.next_delay(), stop)

    def reset(self) -> None:
        self.attempt = 0


def _error_of(reply: requests.Response) -> tuple[str, str | None]:
    """The error message of a refusal and its `ended` (None if absent)."""
    try:
        body = reply.json()
        ended = body.get('ended')
        return body['error'], ended if isinstance(ended, str) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return (reply.text or reply.reason or '').strip()[:200], None


def call(session: requests.Session, method: str, url: str,
         token: str | None = None, body: Any = None,
         verify: bool | str = True, timeout: float = 30) -> Any:
    """One HTTPS request; returns the JSON reply (or {}), raises Transient
    or Permanent."""
    headers: dict[str, str] = {}
    data = None
    if token:
        headers['Authorization'] = token
    if body is not None:
        data = json.dumps(body).encode()
        headers['Content-Type'] = 'application/json'
        headers['Content-MD5'] = hashlib.md5(data).hexdigest()
    try:
        reply = session.request(method, url, data=data, headers=headers,
                                verify=verify, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise Transient('%s %s: %s' % (method, url, type(e).__name__)) from e
    except requests.RequestException as e:
        raise Transient('%s %s: %s' % (method, url, e)) from e
    if reply.status_code in TRANSIENT_CODES:
        raise Transient('%s %s: %d %s' % (method, url, reply.status_code,
                                          _error_of(reply)[0]))
    if not 200 <= reply.status_code < 300:
        raise Permanent(reply.status_code, *_error_of(reply))
    md5 = reply.headers.get('Content-MD5')
    if md5 and hashlib.md5(reply.content).hexdigest() != md5:
        raise Transient('%s %s: Content-MD5 mismatch' % (method, url))
    if not reply.content:
        return {}
    try:
        return reply.json()
    except ValueError:
        raise Transient('%s %s: reply is not JSON' % (method, url)) from None


class Heartbeats:
    """One background thread sending every core's heartbeats, so a long
    frame never lets a token expire and thousands of cores in one process
    need one thread, not thousands. A permanent failure (token expired or
    stream gone) flags the activation as lost."""

    def __init__(self, verify: bool | str = True,
                 timeout: float = 30) -> None:
        self.verify = verify
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE must not win
        self.heap: list[tuple[float, int, Activation, float]] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name='siegetank-heartbeats')
        self.thread.start()

    def add(self, activation: Activation, interval: float) -> None:
        with self.cond:
            heapq.heappush(self.heap, (time.monotonic() + interval,
                                       id(activation), activation, interval))
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()
        self.session.close()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and (
                        not self.heap or self.heap[0][0] > time.monotonic()):
                    self.cond.wait(self.heap[0][0] - time.monotonic()
                                   if self.heap else None)
                if self.closed:
                    return
                _, key, activation, interval = heapq.heappop(self.heap)
            if activation.done:
                continue
            delay = interval
            try:
                call(self.session, 'POST', activation.base + '/core/heartbeat',
                     activation.token, {}, self.verify, self.timeout)
                activation.heartbeats += 1
            except Transient as e:
                log.info('heartbeat failed, will retry: %s', e)
                delay = min(interval, 5.0)
            except Permanent as e:
                # BY_CORE: this heartbeat crossed the core's own stop.
                (log.warning if e.ended not in BY_CORE + BY_MANAGER
                 else log.info)(
                    'heartbeat refused (%s): stream %s lost', e,
                    activation.stream_id)
                activation.ended = e.ended
                activation.lost = True
                continue
            with self.cond:
                heapq.heappush(self.heap, (time.monotonic() + delay, key,
                                           activation, interval))


class Activation:
    """One stream worked on by one core, from /core/start to /core/stop."""

    def __init__(self, token: str, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != 'https' or not parts.netloc:
            raise Permanent(0, 'assignment url %r is not https' % url)
        self.base = 'https://' + parts.netloc
        self.token = token
        self.stream_id: str | None = None
        self.target_id: str | None = None
        self.frames = 0
        self.heartbeats = 0
        self.lost = False
        self.ended: str | None = None  # the WS's reason, when lost
        self.unsent = False
        self.buffered = 0       # frames sent since the last checkpoint
        self.done = False


class Core:
    """One core: loops over assignments until `stop` is set or it has sent
    `max_frames` frames. `stats` counts what it did."""

    def __init__(self, cc: str, engine: Engine, ca: str | None = None,
                 donor_token: str | None = None,
                 target_id: str | None = None, stage: str | None = None,
                 checkpoint_every: float = 60.0,
                 heartbeat_every: float = 60.0,
                 max_frames: int | None = None, timeout: float = 30,
                 backoff: Backoff | None = None,
                 stop: threading.Event | None = None,
                 heartbeats: Heartbeats | None = None, name: str = 'core',
                 core_key: str | None = None) -> None:
        self.cc = cc if cc.startswith('https://') else 'https://' + cc
        self.engine = engine
        self.verify: bool | str = ca or True
        self.donor_token = donor_token
        self.core_key = core_key  # sent as Authorization on assign (2015)
        # what to ask for: a target (else any), a stage (else public)
        self.target_id, self.stage = target_id, stage
        self.checkpoint_every = checkpoint_every
        self.heartbeat_every = heartbeat_every
        self.max_frames, self.timeout = max_frames, timeout
        self.backoff = backoff or Backoff()
        self.stop = stop or threading.Event()
        self.own_heartbeats = heartbeats is None
        self.heartbeats = heartbeats or Heartbeats(self.verify, timeout)
        self.name = name
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE must not win
        self.stats = {'frames': 0, 'checkpoints': 0, 'streams': 0,
                      'stopped_by_manager': 0, 'errors': 0, 'retries': 0}
        self.current: Activation | None = None

    # -- plumbing ---------------------------------------------------------
    def _call(self, method: str, url: str, token: str | None = None,
              body: Any = None) -> Any:
        return call(self.session, method, url, token, body, self.verify,
                    self.timeout)

    def _retry(self, what: str, fn: Callable[[], T],
               finishing: bool = False) -> T | None:
        """fn() until it does not raise Transient. Gives up (returns None)
        when the core is stopping, except while `finishing` (the final
        checkpoint and stop), which get a few quick attempts."""
        attempts = 0
        while True:
            try:
                result = fn()
                self.backoff.reset()
                return result
            except Transient as e:
                self.stats['retries'] += 1
                attempts += 1
                log.info('%s: %s failed (%s), retrying', self.name, what, e)
                if finishing:
                    if attempts >= 3:
                        raise
                    time.sleep(min(1.0, self.backoff.first))
                elif not self.backoff.wait(self.stop):
                    return None

    @property
    def finished(self) -> bool:
        return self.stop.is_set() or (
            self.max_frames is not None
            and self.stats['frames'] >= self.max_frames)

    # -- protocol ---------------------------------------------------------
    def assign(self) -> Any:
        body = {'engine': self.engine.name,
                'engine_version': self.engine.version,
                'core_version': CORE_VERSION}
        if self.donor_token:
            body['donor_token'] = self.donor_token
        if self.target_id:
            body['target_id'] = self.target_id
        if self.stage:
            body['stage'] = self.stage
        try:
            return self._retry('assign', lambda: self._call(
                'POST', self.cc + '/core/assign', self.core_key, body))
        except Permanent as e:
            if e.status in (400, 401, 403, 404):
                raise Fatal('the command center refused this core: %s'
                            % e.message) from e
            raise

    def run(self) -> dict[str, int]:
        """Work until stopped; returns stats. Raises Fatal."""
        try:
            while not self.finished:
                try:
                    reply = self.assign()
                    if reply is None:
                        break
                    self.work(reply)
                except Permanent as e:
                    if e.by_manager:
                        # Not the core's fault, nor the target's: the
                        # researcher moves cores on (adaptive sampling).
                        self.stats['stopped_by_manager'] += 1
                        log.info('%s: stream stopped by the manager (%s); '
                                 'asking for a new assignment', self.name,
                                 e.message)
                        continue
                    self.stats['errors'] += 1
                    log.warning('%s: %s; asking for a new assignment',
                                self.name, e)
                    if not self.backoff.wait(self.stop):
                        break
        finally:
            self.session.close()
            if self.own_heartbeats:
                self.heartbeats.close()
        return self.stats

    def work(self, assignment: Any) -> None:
        """One activation: start, frames, checkpoints, stop."""
        try:
            token, url = assignment['token'], assignment['url']
        except (KeyError, TypeError):
            raise Permanent(0, 'assignment without token/url: %r'
                            % (assignment,)) from None
        act = self.current = Activation(token, url)
        start = self._retry('start', lambda: self._call(
            'GET', act.base + '/core/start', token))
        if start is None:
            return
        act.stream_id = start.get('stream_id')
        act.target_id = start.get('target_id')
        self.stats['streams'] += 1
        log.info('%s: working on stream %s', self.name, act.stream_id)
        self.heartbeats.add(act, self.heartbeat_every)
        run: Run | None = None
        try:
            try:
                files = start.get('files') or dict(
                    start.get('target_files') or {},
                    **(start.get('stream_files') or {}))
                target_files = wire.decode_files(
                    start.get('target_files') or files)
                stream_files = wire.decode_files(
                    start.get('stream_files') or files)
                options = start.get('options') or assignment.get(
                    'options') or {}
                run = self.engine.start(stream_files, target_files, options)
                self._frames(act, run)
            except (Transient, Permanent):
                raise
            except Exception:
                self._fail(act, traceback.format_exc())
                return
            self._finish(act, run)
        finally:
            act.done = True
            if run is not None:
                run.close()
            self.current = None

    def _frames(self, act: Activation, run: Run) -> None:
        last_checkpoint = time.monotonic()
        while not self.finished and not act.lost:
            produced = run.next_frame(self.stop)
            if produced is None:
                break
            frame_files, n = produced
            body = {'files': wire.encode_files(frame_files), 'frames': n}
            send = functools.partial(self._call, 'PUT',
                                     act.base + '/core/frame', act.token, body)
            if self._retry('frame', send) is None:
                act.unsent = True  # the state is ahead of the sent frames
                break
            act.frames += n
            act.buffered += n
            self.stats['frames'] += n
            if time.monotonic() - last_checkpoint >= self.checkpoint_every:
                self._checkpoint(act, run)
                last_checkpoint = time.monotonic()
        if act.lost:
            raise Permanent(401, 'stream %s lost (heartbeat refused)'
                            % act.stream_id, act.ended)

    def _checkpoint(self, act: Activation, run: Run,
                    finishing: bool = False) -> None:
        body = {'files': wire.encode_files(run.checkpoint()),
                'frames': act.buffered}
        if self._retry('checkpoint', lambda: self._call(
                'PUT', act.base + '/core/checkpoint', act.token, body),
                finishing) is not None:
            act.buffered = 0
            self.stats['checkpoints'] += 1

    def _finish(self, act: Activation, run: Run) -> None:
        """Checkpoint the frames sent since the last checkpoint (if any),
        then give the stream back. If the WS
        cannot be reached now, the stream comes back when its token
        expires; the uncommitted frames are lost either way."""
        try:
            if act.buffered and not act.unsent:
                self._checkpoint(act, run, finishing=True)
            self._retry('stop', lambda: self._stop(act, {}), finishing=True)
        except Transient as e:
            log.warning('%s: could not finish stream %s: %s', self.name,
                        act.stream_id, e)
            return
        log.info('%s: stopped stream %s after %d frames', self.name,
                 act.stream_id, act.frames)

    def _fail(self, act: Activation, message: str) -> None:
        """The engine failed: report it so the WS counts it (and stops a
        stream that keeps failing), then take a fresh assignment."""
        self.stats['errors'] += 1
        log.warning('%s: engine failed on stream %s:\n%s', self.name,
                    act.stream_id, message)
        error = base64.b64encode(message.encode()[-4000:]).decode()
        try:
            self._retry('stop', lambda: self._stop(act, {'error': error}),
                        finishing=True)
        except (Transient, Permanent) as e:
            log.warning('%s: could not report the error: %s', self.name, e)
        self.backoff.wait(self.stop)

    def _stop(self, act: Activation, body: dict[str, str]) -> None:
        """/core/stop; done too when the WS says this activation was
        stopped by the core already (a retry whose first reply was lost)."""
        try:
            self._call('PUT', act.base + '/core/stop', act.token, body)
        except Permanent as e:
            if e.ended not in BY_CORE:
                raise
