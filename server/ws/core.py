"""The endpoints a core calls with its stream token, and the heartbeat
sweep that deactivates cores that went silent.

Both core generations are served: the 2014 cores read `target_files` and
`stream_files`, send `"speed"` extras and no `frames` on checkpoints; later
cores read `files`, send Content-MD5 and `frames` on checkpoints. Unknown
extra fields are ignored.
"""
import asyncio
import base64
import binascii
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any

from server import metrics, store, threads
from server.tokens import token_hash
from server.web import (
    INLINE_DECODE_MAX,
    APIError,
    APIHandler,
    Permission,
    TooLarge,
    allow,
    bounded,
    check_files,
    decoded_name,
    decoded_size,
    decoded_streams,
    encoded_size,
    get_field,
    role,
)
from server.ws import budgets, locks, stream_record, streams
from server.ws.storage import (
    BufferBusy,
    BufferLost,
    TooManyFiles,
    decode_sizes,
)

log = logging.getLogger('siegetank.ws.core')

class LockLost(APIError):
    """The stream's lock stopped being this request's while it worked
    (expired, or freed as a dead worker's): its change was undone."""

    def __init__(self, sid):
        super().__init__(503, 'stream %s was taken from this request '
                         'meanwhile; nothing was stored, retry' % sid)

# What a core is told when its token's activation ended (the reply's
# `ended` names the reason): only 'manager_stop' and 'deletion' end it
# for no fault of the core; 'stop' and 'error' mean it had stopped it.
ENDED_MESSAGES = {
    'manager_stop': 'its stream was stopped by its manager',
    'deletion': 'its stream was deleted by its manager',
    'stop': 'it was stopped already',
    'error': 'it was stopped already, with an error',
    'expiry': 'it expired (no heartbeat, frame or checkpoint in time)',
    'ws_restart': 'the workserver restarted',
}


async def refused(app: Any, hashed: str) -> APIError:
    """The 401 for a token that is not live, saying why its activation
    ended when the WS knows (stream_record.ended)."""
    reason = await stream_record.ended(app, hashed)
    if reason not in ENDED_MESSAGES:
        return APIError(401, 'unknown or expired core token')
    return APIError(401, 'this core token\'s activation is over: %s; ask '
                    'the command center for a new assignment'
                    % ENDED_MESSAGES[reason], fields={'ended': reason})


async def live_stream(app: Any, token: str | None,
                      extend: float | None = None) -> str:
    """The stream id of a live core token, else 401. `extend` (seconds)
    pushes its expiry to at least now + extend."""
    if not token:
        raise APIError(401, 'missing core token')
    return await live_hashed(app, token_hash(token), extend)


async def live_hashed(app: Any, hashed: str,
                      extend: float | None = None) -> str:
    """live_stream of a token's hash."""
    now = time.time()
    sid = await stream_record.live(app, hashed, now,
                                   now + extend if extend else None)
    if not sid:
        raise await refused(app, hashed)
    return sid


class Held(stream_record.Held):
    """A stream whose lock this request holds: the record's changes
    (stream_record.Held) recorded with the lock freed in one round trip;
    otherwise the lock is freed on exit."""

    def __init__(self, app: Any, holder: str,
                 got: stream_record.Hold) -> None:
        super().__init__(app, holder, got)
        self.released = False
        self.in_use = False

    async def done(self, record: Awaitable[bool]) -> bool:
        """Await `record` (a record_* call): True if the lock was still
        ours and the change is recorded."""
        self.released = True
        try:
            return await record
        except store.DOWN:
            # Its outcome is unknown (it may still run): nothing is undone,
            # the retry finds out (Redis' sizes and digest tell); the lock
            # is freed later if it is still ours.
            locks.release_later(self.app, self.lock, self.holder)
            raise

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await locks.release(self.app, self.lock, self.holder)

    def abandon(self) -> None:
        """The request ends before its work began (the body was refused or
        never came): free the lock in the background."""
        if not (self.in_use or self.released):
            task = asyncio.ensure_future(self.release())
            _abandoned.add(task)
            task.add_done_callback(_abandoned.discard)


_abandoned: set[asyncio.Future[None]] = set()  # release tasks in flight


@role('core', 'missing core token')
async def _core(handler: Any, rule: Permission) -> str | None:
    """A core with a live stream token; what the token opens (the stream,
    its lock, its start window) is the handler's `authenticate`."""
    await handler.authenticate()
    return handler.token()


class CoreHandler(APIHandler):
    """Endpoints for cores: `Authorization: <stream token>`, checked from
    the headers before the body is read, so a missing or unknown token is
    a 401 whatever the body."""

    async def authenticate(self):
        self.sid = await live_stream(self.application, self.token())

    async def hold(self) -> Held:
        token = self.token()
        if not token:
            raise APIError(401, 'missing core token')
        return await hold(self.application, token_hash(token))


async def hold(app: Any, hashed: str) -> Held:
    """The stream of the token `hashed` with its lock held, checked and
    taken in one step (a token that dies while we wait is seen on the
    next try)."""
    holder = locks.new_holder(app)
    seen = ''

    async def attempt() -> stream_record.Hold | None:
        nonlocal seen
        try:
            got = await stream_record.hold(app, hashed, holder, time.time(),
                                           locks.LOCK_TTL_MS)
        except store.DOWN:
            # It may still run and take the lock: free it when Redis
            # answers again (the token tells which stream).
            locks.release_later(app, None, holder,
                                token_key=app.keys.token(hashed))
            raise
        if got is None:
            raise await refused(app, hashed)
        seen = got.sid
        return got if got.taken == 1 else None
    got = await locks.wait_turn(attempt, lambda: 'stream %s' % seen)
    return Held(app, holder, got)


class LockedCoreHandler(CoreHandler):
    """Checkpoints, stops: the token is checked and the stream's lock
    taken in one round trip before the body is read; the lock is freed
    when the request ends, also when its body is refused or never
    comes."""

    held = None

    async def authenticate(self):
        self.held = await self.hold()

    def on_finish(self):
        if self.held is not None:
            self.held.abandon()

    def on_connection_close(self):
        super().on_connection_close()
        if self.held is not None:
            self.held.abandon()

    def locked_stream(self):
        """The token's stream (a Held), its lock held for the block."""
        assert self.held is not None  # authenticate() found it
        return locked(self.application, self.held)


@contextlib.asynccontextmanager
async def locked(app: Any, held: Held) -> Any:
    """`held` in use for the block, its lock freed at the end; the
    disk's failures as the core's replies."""
    held.in_use = True
    try:
        yield held
    except BufferLost as e:
        # Bytes Redis counted are gone from the disk: this activation
        # cannot be committed whole. End it; the core asks again.
        log.error('%s: the activation is ended', e)
        tid = await streams.target_of(app, held.sid)
        await streams.deactivate(app, held.sid, tid, 'stop')
        raise APIError(409, 'the stream\'s buffer was lost; this '
                       'activation is over, ask for a new one') from e
    except BufferBusy as e:
        raise APIError(503, str(e) + '; nothing was stored, '
                       'retry') from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise APIError(503, 'workserver disk is full; nothing '
                           'was stored, retry later') from e
        raise
    finally:
        await held.release()


class CoreStartHandler(CoreHandler):
    async def authenticate(self):
        # Reaching /core/start ends the token's start window (see
        # streams.activate): the core has the first-heartbeat window to
        # show it works (a heartbeat or a frame).
        self.sid = await live_stream(
            self.application, self.token(),
            streams.early_windows(self.config)[1])

    @allow('core')
    async def get(self):
        app = self.application
        sid = self.sid
        tid = await streams.target_of(app, sid)
        target_files = await threads.disk(app.storage.target_files, tid)
        stream_files = await threads.disk(app.storage.stream_files, sid)
        files = dict(target_files)
        files.update(stream_files)
        body = json.dumps({'stream_id': sid, 'target_id': tid,
                           'target_files': target_files,
                           'stream_files': stream_files, 'files': files,
                           'options': {}}).encode('utf-8')
        self.set_header('Content-MD5', hashlib.md5(body).hexdigest())
        self.finish(body)


TOKEN_CACHE_S = 30.0   # a frame trusts a token seen live this long
TOKEN_CACHE_MAX = 100_000


class LiveTokens:
    """Tokens this worker saw live lately, {hash: (sid, until)}: a frame's
    token is checked from here before its body is read (a 401 for one
    never seen live), in Redis when it is not here; the frame's one round
    trip (stream_record.record_frame) checks it again either way, so a
    token ended meanwhile is a 401 once the body is in. Every request
    Redis found live renews its token's entry."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, float]] = {}

    def get(self, hashed: str) -> str | None:
        got = self.seen.get(hashed)
        if got is None:
            return None
        if got[1] < time.monotonic():
            del self.seen[hashed]
            return None
        return got[0]

    def add(self, hashed: str, sid: str) -> None:
        now = time.monotonic()
        if len(self.seen) >= TOKEN_CACHE_MAX:
            self.seen = {h: v for h, v in self.seen.items() if v[1] >= now}
            if len(self.seen) >= TOKEN_CACHE_MAX:
                self.seen.clear()
        self.seen[hashed] = (sid, now + TOKEN_CACHE_S)

    def forget(self, hashed: str) -> None:
        self.seen.pop(hashed, None)


def live_tokens(app: Any) -> LiveTokens:
    tokens: LiveTokens | None = getattr(app, 'live_tokens', None)
    if tokens is None:
        tokens = app.live_tokens = LiveTokens()
    return tokens


def frame_digest(md5: str | None, raw: bytes) -> str:
    """What tells a retry from a new frame: the Content-MD5 already checked
    (later cores send it), else the body's SHA-1 (a third cheaper than MD5
    here). A core sends a retry the way it sent the original."""
    return md5 if md5 is not None else hashlib.sha1(raw).hexdigest()


def body_digest(handler):
    return frame_digest(handler.body_md5, handler.request.body)


async def frame_token(app: Any, token: str | None) -> tuple[str, str]:
    """(hash, stream id) of a frame's token: from the tokens this worker
    saw live lately, else checked in Redis (401)."""
    if not token:
        raise APIError(401, 'missing core token')
    hashed = token_hash(token)
    tokens = live_tokens(app)
    sid = tokens.get(hashed)
    if sid is None:
        sid = await live_stream(app, token)
        tokens.add(hashed, sid)
    return hashed, sid


class FrameHandler(CoreHandler):
    """Frames whose token this worker has not seen live lately (the first
    of an activation, a bad request); the others take the lean path
    (ws/frame_path.py). Both run `store_frame`."""
    body_limit = 'max_frame_body_size_in_bytes'

    async def authenticate(self):
        self.hashed, self.sid = await frame_token(self.application,
                                                  self.token())

    @allow('core')
    async def put(self):
        await store_frame(self.application, self.sid, self.hashed,
                          self.body, body_digest(self))
        self.write_json({})


async def store_frame(app: Any, sid: str, hashed: str, body: dict[str, Any],
                      digest: str) -> None:
    """A frame costs one Redis round trip: appended to the buffer under the
    buffer's lock (storage.lock_buffer, no Redis lock), then recorded by
    one script that refuses if the token died or another writer of the
    buffer holds the stream's lock, and the append is cut back then."""
    config = app.config
    most = config.max_files_per_request
    files = check_files(get_field(body, 'files', dict), max_files=most)
    n = get_field(body, 'frames', int, 1)
    if not 1 <= n <= config.max_frames_per_request:
        raise APIError(400, 'frames must be from 1 to %d'
                       % config.max_frames_per_request)
    storage = app.storage

    async def attempt() -> str | None:
        fd = storage.lock_buffer(sid, wait=False)
        if fd is None:
            return None
        try:
            return await _append(app, sid, hashed, files, n, digest)
        finally:
            storage.unlock_buffer(fd)
    try:
        done = await locks.wait_turn(attempt, lambda: 'stream %s' % sid,
                                     locks.LOCK_WAIT_S)
    except FileNotFoundError as e:  # the stream's folder: deleted
        live_tokens(app).forget(hashed)
        raise await refused(app, hashed) from e
    except BufferLost as e:
        await _end_lost(app, sid, hashed, e)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise APIError(503, 'workserver disk is full; nothing '
                           'was stored, retry') from e
        raise
    if done == 'ok':
        metrics.count('frames_received', n)


async def _append(app: Any, sid: str, hashed: str, files: dict[str, Any],
                  n: int, digest: str) -> str | None:
    """With the buffer's lock held: append and record (ok), or find the
    body is the frame last accepted (retry), or the stream's lock held
    (None: try again); the append is cut back unless recorded. A buffer
    longer than Redis counted (a frame whose record was lost) is cut to
    the count and the frame appended again. The first try takes the
    buffer's sizes from its files this frame names (storage.frame_sizes),
    the others from a listing."""
    storage = app.storage
    for attempt in range(3):
        found = None if attempt else storage.frame_sizes(
            sid, {decoded_name(name) for name in files})
        if found is not None:
            had, before = True, found
        else:
            sizes = storage.buffer_sizes(sid)
            had = sizes is not None  # a cut back leaves the folder as found
            before = sizes or {}

        def undo(before: dict[str, int] = before, had: bool = had,
                 listed: bool = found is None) -> None:
            """Cut the append back: to the listing, or (sizes of this
            frame's files only) each of them to its size before."""
            if listed:
                storage.trim_buffer(sid, before, keep=had)
            else:
                storage.truncate_buffer(sid, before)

        def work(budget: Any, before: dict[str, int] = before) -> Any:
            return storage.append_frames(
                sid, decoded_streams(files, budget),
                app.config.max_files_per_request, before)
        try:
            after = await bounded(
                app.config, encoded_size(files), work, threads.disk,
                room=budgets.frame_room(app.config,
                                        sum(before.values())))
        except TooManyFiles as e:
            raise TooLarge(str(e)) from e
        # Redis down: the outcome is unknown, the bytes stay (the next
        # frame's record tells whether Redis counted them).
        got = await stream_record.record_frame(
            app, hashed, sid, n, digest, before, after,
            app.config.max_stream_size_in_bytes)
        if got.outcome == 'ok':
            return 'ok'
        if got.outcome == 'full':
            undo()
            budgets.stream_full(app.config, sum(before.values())
                                + int(got.committed_bytes or 0))
        if got.outcome in ('cut', 'retry'):
            storage.trim_buffer(sid, decode_sizes(got.sizes))
            if got.outcome == 'retry':
                return 'retry'
            continue
        undo()
        if got.outcome == 'busy':
            return None
        live_tokens(app).forget(hashed)
        raise await refused(app, hashed)
    raise APIError(503, 'the buffer of stream %s keeps changing; nothing '
                   'was stored, retry' % sid)


async def _end_lost(app: Any, sid: str, hashed: str,
                    error: BufferLost) -> None:
    """Bytes Redis counted are gone from the disk: this activation cannot
    be committed whole. It ends (if still this token's); the core asks
    again."""
    log.error('%s: the activation is ended', error)
    async with locks.stream_locked(app, sid):
        if await stream_record.live(app, hashed, time.time()) == sid:
            tid = await streams.target_of(app, sid)
            await streams.deactivate(app, sid, tid, 'stop')
    raise APIError(409, 'the stream\'s buffer was lost; this activation '
                   'is over, ask for a new one') from error


# What a checkpoint's `frames` may be: a count a JSON double holds exactly.
MAX_REPORTED_FRAMES = 2 ** 53


class CheckpointHandler(LockedCoreHandler):
    body_limit = 'max_checkpoint_body_size_in_bytes'

    @allow('core')
    async def put(self):
        assert self.held is not None  # authenticate() found it
        await store_checkpoint(self.application, self.held, self.body)
        self.write_json({})


async def store_checkpoint(app: Any, held: Held, body: dict[str, Any]) \
        -> None:
    """Commit the buffer of `held` with the sent state and free its lock.
    The buffer's count of frames is what counts; `frames` (later cores:
    their own count since the last checkpoint) is only compared with it,
    and a difference of a frame or more logged (frames lost between the
    core and the disk)."""
    try:
        files = check_files(get_field(body, 'files', dict),
                            max_files=app.config.max_files_per_request)
        reported = get_field(body, 'frames', (int, float), None,
                             check=lambda v: 0 <= v <= MAX_REPORTED_FRAMES)
    except APIError:
        held.abandon()
        raise
    async with locked(app, held):
        n = held.buffer_frames
        if n == 0:
            return  # nothing buffered: a retry, a no-op
        state = await decoded_size(app.config, files,
                                   budgets.checkpoint_room(app.config))
        if reported is not None and abs(reported - n) >= 1:
            log.warning('stream %s: the core counts %s frames since its '
                        'last checkpoint, the buffer holds %d', held.sid,
                        reported, n)
        seq, total = await commit(app, held, n, files)
        stored = await budgets.committed(app, held, seq, state)
        new = max(total - held.frames, 0)
        if not await held.done(held.record_commit(total, new, stored)):
            if seq is not None:
                await threads.disk(app.storage.uncommit, held.sid, seq)
            raise LockLost(held.sid)
        metrics.count('checkpoints')
        metrics.count('frames_committed', new)


async def commit(app: Any, held: Held, n: int,
                 files: dict[str, str]) -> tuple[int | None, int]:
    """Commit; returns (the new chunk's seq or None, the stream's committed
    frames as the disk has them). A buffer already gone (committed by a
    request whose reply was lost before Redis heard of it) is not committed
    twice. A successful checkpoint resets the error count (errors are
    consecutive). With the buffer's lock free, small state files and few
    chunks the chunk is built on the event loop and only its flushes (5
    system calls) go to a thread: each system call a disk thread makes
    takes the GIL back from the loop, a context switch each."""
    storage, sid = app.storage, held.sid
    fd = None
    if encoded_size(files) <= INLINE_DECODE_MAX and storage.few_chunks(sid):
        try:
            fd = storage.lock_buffer(sid, wait=0)
        except FileNotFoundError:
            pass
    if fd is None:
        seq, total = await threads.disk(commit_waiting, storage, sid, n,
                                        files, held.sizes)
    else:
        try:
            chunk = storage.build_chunk(sid, n, files, held.sizes)
        except BaseException:
            storage.unlock_buffer(fd)
            raise
        if chunk is None:
            try:
                seq, total = None, storage.committed_frames(sid)
            finally:
                storage.unlock_buffer(fd)
        else:
            def free() -> None:
                chunk.close()
                storage.unlock_buffer(fd)
            seq, total = await threads.disk.then(free, storage.publish_chunk,
                                                 chunk)
    if held.error_count != 0:
        await threads.disk(storage.update_stream_meta, sid, error_count=0)
    return seq, total


def commit_waiting(storage: Any, sid: str, n: int, files: dict[str, str],
                   sizes: dict[str, int]) -> tuple[int | None, int]:
    """`commit` in a disk thread, waiting for the buffer's lock."""
    with storage.buffer_locked(sid):
        return storage.commit(sid, n, files, sizes)


class HeartbeatHandler(CoreHandler):
    @allow('core')
    async def post(self):
        await live_stream(self.application, self.token(),
                          self.config.heartbeat_increment_in_s)
        self.write_json({})


def error_text(error, limit):
    """The message of an error stop (base64 of UTF-8 text), its last
    `limit` characters when longer (a traceback ends with the cause)."""
    try:
        text = base64.b64decode(error, validate=True).decode(
            'utf-8', errors='replace')
    except (binascii.Error, ValueError):
        raise APIError(400, 'error must be base64') from None
    text = text.rstrip('\n')
    if len(text) > limit:
        text = '[%d characters cut]\n%s' % (len(text) - limit, text[-limit:])
    return text


class CoreStopHandler(LockedCoreHandler):
    @allow('core')
    async def put(self):
        app = self.application
        error = self.field('error', str, None)
        if error is not None:
            error = error_text(error, app.config.max_error_length_in_chars)
        async with self.locked_stream() as held:
            sid = held.sid
            tid = await streams.target_of(app, sid)
            if error is not None:
                stamp = datetime.datetime.now(datetime.UTC)
                await threads.disk(app.storage.append_error, sid,
                                   '--- %s\n%s\n' % (
                                       stamp.isoformat(timespec='seconds'),
                                       error),
                                   app.config.max_errors_log_size_in_bytes)
            await streams.deactivate(app, sid, tid,
                                     'stop' if error is None else 'error')
        self.write_json({})


SWEEP_BATCH = 64


async def sweep(app: Any) -> None:
    """Deactivate every stream whose core missed its heartbeat, a batch at
    a time (each under its own lock, so a burst of thousands of dead cores
    is requeued in seconds). A stream busy right now (its lock held) is
    left for the next pulse."""
    keys = app.keys
    expired = await app.redis.zrangebyscore(keys.heartbeats, '-inf',
                                            repr(time.time()))

    async def expire(sid: str) -> bool | None:
        tid, _ = await stream_record.target_and_owner(app, sid)
        if tid is None:
            await app.redis.zrem(keys.heartbeats, sid)
            return False
        try:
            async with locks.stream_locked(app, sid, wait=0):
                return await streams.deactivate(app, sid, tid, 'expire')
        except locks.Busy:
            return False

    done = 0
    for i in range(0, len(expired), SWEEP_BATCH):
        batch = expired[i:i + SWEEP_BATCH]
        done += sum(bool(r) for r in await asyncio.gather(
            *(expire(sid) for sid in batch)))
    if done:
        log.info('%d streams expired (their cores went silent): requeued',
                 done)


async def sweep_safely(app):
    try:
        await sweep(app)
    except store.DOWN as e:
        log.warning('heartbeat sweep skipped, redis down: %s', e)
    except Exception:
        log.exception('heartbeat sweep failed')


default_handlers = [
    (r'/core/start', CoreStartHandler),
    (r'/core/frame', FrameHandler),
    (r'/core/checkpoint', CheckpointHandler),
    (r'/core/heartbeat', HeartbeatHandler),
    (r'/core/stop', CoreStopHandler),
]
