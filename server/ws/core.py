"""The endpoints a core calls with its stream token, and the heartbeat
sweep that deactivates cores that went silent.

Both core generations are served: the 2014 cores read `target_files` and
`stream_files`, send `"speed"` extras and no `frames` on checkpoints; later
cores read `files`, send Content-MD5 and `frames` on checkpoints. Unknown
extra fields are ignored.
"""
import base64
import binascii
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import time

from server.web import APIError, APIHandler, check_files, decode_file
from server.ws import streams
from server.ws.storage import run

log = logging.getLogger('siegetank.ws.core')

# The stream of a live token; with ARGV[3] also pushes its expiry.
_TOKEN = """
local sid = redis.call('GET', KEYS[1])
if not sid then return false end
local s = redis.call('HMGET', ARGV[1] .. sid, 'active', 'token')
if s[1] ~= '1' or s[2] ~= ARGV[2] then return false end
local exp = redis.call('ZSCORE', KEYS[2], sid)
if not exp or tonumber(exp) < tonumber(ARGV[3]) then return false end
if ARGV[4] then redis.call('ZADD', KEYS[2], ARGV[4], sid) end
return sid
"""


async def live_stream(app, token, extend=False):
    """The stream id of a live core token, else 401."""
    if not token:
        raise APIError(401, 'missing core token')
    keys = app.keys
    th = streams.token_hash(token)
    now = time.time()
    args = [keys.stream_prefix, th, repr(now)]
    if extend:
        args.append(repr(now + app.config['heartbeat_increment']))
    sid = await app.redis.eval(_TOKEN, 2, keys.token(th), keys.heartbeats,
                               *args)
    if not sid:
        raise APIError(401, 'unknown or expired core token')
    return sid


class CoreHandler(APIHandler):

    def prepare(self):
        super().prepare()
        if self.request.method in ('PUT', 'POST'):
            self.body  # a malformed body is a 400 even where no field is read

    async def stream(self, extend=False):
        return await live_stream(self.application, self.token(), extend)

    @contextlib.asynccontextmanager
    async def locked_stream(self):
        """The token's stream, its lock held and the token checked again
        under the lock (it may have died while we waited)."""
        sid = await self.stream()
        async with streams.stream_lock(self.application, sid):
            if await self.stream() != sid:
                raise APIError(401, 'core token is no longer live')
            try:
                yield sid
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise APIError(503, 'workserver disk is full; nothing '
                                   'was stored, retry later')
                raise


class StartHandler(CoreHandler):
    async def get(self):
        app = self.application
        sid = await self.stream()
        tid = await streams.target_of(app, sid)
        target_files = await run(app.storage.target_files, tid)
        stream_files = await run(app.storage.stream_files, sid)
        files = dict(target_files)
        files.update(stream_files)
        body = json.dumps({'stream_id': sid, 'target_id': tid,
                           'target_files': target_files,
                           'stream_files': stream_files, 'files': files,
                           'options': {}}).encode('utf-8')
        self.set_header('Content-MD5', hashlib.md5(body).hexdigest())
        self.finish(body)


def decoded_frames(files):
    """{stripped name: bytes}; 400 on anything undecodable or ambiguous."""
    out = {}
    for name, value in check_files(files).items():
        stripped, data = decode_file(name, value)
        if stripped in out:
            raise APIError(400, 'two files decode to the name %s' % stripped)
        out[stripped] = data
    return out


class FrameHandler(CoreHandler):
    async def put(self):
        app = self.application
        files = decoded_frames(self.field('files', dict))
        n = self.field('frames', int, 1, check=lambda v: v >= 1)
        md5 = hashlib.md5(self.request.body).hexdigest()
        async with self.locked_stream() as sid:
            key = app.keys.stream(sid)
            if await app.redis.hget(key, 'last_md5') == md5:
                self.write_json({})  # a retry of the accepted frame
                return
            sizes = await run(app.storage.append_frames, sid, files)
            try:
                pipe = app.redis.pipeline(transaction=True)
                pipe.hincrby(key, 'buffer_frames', n)
                pipe.hset(key, 'last_md5', md5)
                await pipe.execute()
            except BaseException:
                await run(app.storage.truncate_buffer, sid, sizes)
                raise
        self.write_json({})


class CheckpointHandler(CoreHandler):
    async def put(self):
        """Commit the buffer with the sent state. `frames` (later cores:
        their own count of frames since the last checkpoint) is recorded in
        the chunk's meta.json; the buffer's count is what counts."""
        app = self.application
        files = check_files(self.field('files', dict))
        for name, value in files.items():
            decode_file(name, value)
        reported = self.field('frames', (int, float), None,
                              check=lambda v: v >= 0)
        async with self.locked_stream() as sid:
            key = app.keys.stream(sid)
            n = int(await app.redis.hget(key, 'buffer_frames') or 0)
            if n == 0:
                self.write_json({})  # nothing buffered: a retry, a no-op
                return
            meta = {'frames': n, 'reported_frames': reported,
                    'time': time.time()}
            total = await run(commit, app.storage, sid, n, files, meta)
            pipe = app.redis.pipeline(transaction=True)
            pipe.hget(key, 'error_count')
            pipe.hset(key, mapping={'frames': total, 'buffer_frames': 0,
                                    'last_md5': '', 'error_count': 0})
            errors = (await pipe.execute())[0]
            if errors not in (None, '0'):
                await run(app.storage.update_stream_meta, sid, error_count=0)
        self.write_json({})


def commit(storage, sid, n, files, meta):
    """Commit and return the stream's committed frames. A buffer already
    gone (committed by a request whose reply was lost before Redis heard
    of it) is not committed twice."""
    if storage.buffer_files(sid):
        storage.commit(sid, n, files, meta)
    return storage.committed_frames(sid)


class HeartbeatHandler(CoreHandler):
    async def post(self):
        await self.stream(extend=True)
        self.write_json({})


class StopHandler(CoreHandler):
    async def put(self):
        app = self.application
        error = self.field('error', str, None)
        if error is not None:
            try:
                error = base64.b64decode(error, validate=True).decode(
                    'utf-8', errors='replace')
            except (binascii.Error, ValueError):
                raise APIError(400, 'error must be base64')
        async with self.locked_stream() as sid:
            tid = await streams.target_of(app, sid)
            if error is not None:
                stamp = datetime.datetime.now(datetime.timezone.utc)
                await run(app.storage.append_error, sid, '--- %s\n%s\n' % (
                    stamp.isoformat(timespec='seconds'), error.rstrip('\n')))
            await streams.deactivate(app, sid, tid,
                                     'stop' if error is None else 'error')
        self.write_json({})


async def sweep(app):
    """Deactivate every stream whose core missed its heartbeat. A stream
    busy right now (its lock held) is left for the next pulse."""
    keys = app.keys
    expired = await app.redis.zrangebyscore(keys.heartbeats, '-inf',
                                            repr(time.time()))
    for sid in expired:
        tid = await app.redis.hget(keys.stream(sid), 'target_id')
        if tid is None:
            await app.redis.zrem(keys.heartbeats, sid)
            continue
        try:
            async with streams.locked(app.redis, keys.stream_lock(sid),
                                      'stream %s' % sid, wait=0):
                if await streams.deactivate(app, sid, tid, 'expire'):
                    log.info('stream %s expired: core went silent', sid)
        except streams.Busy:
            pass


async def sweep_safely(app):
    try:
        await sweep(app)
    except Exception:
        log.exception('heartbeat sweep failed')


default_handlers = [
    (r'/core/start', StartHandler),
    (r'/core/frame', FrameHandler),
    (r'/core/checkpoint', CheckpointHandler),
    (r'/core/heartbeat', HeartbeatHandler),
    (r'/core/stop', StopHandler),
]
