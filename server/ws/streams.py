"""Targets and streams of the workserver: the model (Redis index over the
disk of storage.py) and the endpoints the command center calls.

Concurrency: several worker processes serve the same streams. Every
check-then-set on Redis is one Lua script or a MULTI; everything that also
touches a stream's disk (frames, checkpoints, deactivation, start/stop,
deletion) runs under that stream's Redis lock; stream creations share a
hold on their target, and the target's creation and deletions lock it
(target before stream, never the other way), so a buffer is never
committed and discarded at once, a stale core can never write after its
token died, and no stream is made in a target being deleted.
"""
import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
import time
import uuid

from server import signing
from server.web import (APIError, APIHandler, check_file_name, check_files,
                        decode_file)
from server.scripts import Script
from server.ws.storage import plan_range, read_at, run

ID = re.compile(r'^[A-Za-z0-9_-]{1,64}$')
STREAM_ID = re.compile(r'^[A-Za-z0-9_-]{1,64}:[A-Za-z0-9._-]{1,64}$')

LOCK_TTL_MS = 300000   # a holder that died frees the lock after this
LOCK_WAIT_S = 30.0     # a request waits this long for a busy stream


class Busy(APIError):
    def __init__(self, what):
        super().__init__(503, '%s is busy with another request, retry' % what)


RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


async def wait_turn(deadline, delay, what):
    """Sleep before another try at a busy lock; Busy past the deadline.
    Returns the next delay."""
    if time.monotonic() >= deadline:
        raise Busy(what)
    await asyncio.sleep(delay)
    return min(delay * 2, 0.05)


@contextlib.asynccontextmanager
async def locked(redis, key, what, wait=LOCK_WAIT_S):
    """Hold the Redis lock `key` (shared by all processes); Busy if it is
    not free within `wait` seconds."""
    holder = secrets.token_hex(12)
    deadline = time.monotonic() + wait
    delay = 0.002
    while not await redis.set(key, holder, nx=True, px=LOCK_TTL_MS):
        delay = await wait_turn(deadline, delay, what)
    try:
        yield
    finally:
        await RELEASE(redis, [key], [holder])


def token_hash(token):
    return hashlib.sha256(token.encode('utf-8')).hexdigest()


def check_disk(app):
    """Refuse new work before the disk is too full to take it."""
    floor = app.config['min_free_disk_in_mb']
    free = app.storage.free_mb()
    if free < floor:
        raise APIError(503, 'workserver disk is nearly full (%.0f MB free, '
                       'floor %d MB): no new streams or activations'
                       % (free, floor))


def index_stream(pipe, keys, stream_id, meta, frames):
    """Queue the commands that put one stream into the Redis index (used
    on creation and by the rebuild from disk)."""
    tid = meta['target_id']
    pipe.hset(keys.stream(stream_id), mapping={
        'target_id': tid, 'status': meta['status'], 'frames': frames,
        'error_count': meta.get('error_count', 0),
        'creation_date': repr(float(meta['creation_date'])), 'active': 0})
    pipe.sadd(keys.target_streams(tid), stream_id)
    pipe.sadd(keys.targets, tid)
    if meta['status'] == 'OK':
        pipe.zadd(keys.queue(tid), {stream_id: frames})


# A shared hold on a target: refused (0) while its exclusive lock is held.
_SHARE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
""")


@contextlib.asynccontextmanager
async def target_shared(app, target_id):
    """Many requests at once may hold a target this way (stream creations),
    none while it is locked (deletions, see target_locked)."""
    keys = app.keys
    users = keys.target_users(target_id)
    holder = secrets.token_hex(12)
    deadline = time.monotonic() + LOCK_WAIT_S
    delay = 0.002
    while True:
        now = int(time.time() * 1000)
        if await _SHARE(app, [keys.target_lock(target_id), users], [
                holder, now + LOCK_TTL_MS, now, LOCK_TTL_MS]):
            break
        delay = await wait_turn(deadline, delay, 'target %s' % target_id)
    try:
        yield
    finally:
        await app.redis.zrem(users, holder)


@contextlib.asynccontextmanager
async def target_locked(app, target_id):
    """The target's exclusive lock, once the shared holds taken before it
    are given back (no new one is granted meanwhile)."""
    keys = app.keys
    what = 'target %s' % target_id
    async with locked(app.redis, keys.target_lock(target_id), what):
        deadline = time.monotonic() + LOCK_WAIT_S
        delay = 0.002
        while await app.redis.zcount(keys.target_users(target_id),
                                     int(time.time() * 1000), '+inf'):
            delay = await wait_turn(deadline, delay, what)
        yield


def _new_stream(storage, target_id, stream_id, meta, stream_files):
    """Make the stream on disk if its target exists with the same stream
    file names; returns the target's meta (None: no such target)."""
    target = storage.target_meta(target_id)
    if target is not None and target['stream_files'] == sorted(stream_files):
        storage.create_stream(stream_id, meta, stream_files)
    return target


async def create_stream(app, target_id, stream_files, target_files):
    """A stream of a known target needs only a shared hold on it (creations
    run in parallel); the first stream of a target creates the target
    under its exclusive lock."""
    check_disk(app)
    names = sorted(stream_files)
    stream_id = '%s:%s' % (uuid.uuid4(), app.config['name'])
    meta = {'target_id': target_id, 'creation_date': time.time(),
            'status': 'OK', 'error_count': 0}
    async with target_shared(app, target_id):
        target = await run(_new_stream, app.storage, target_id, stream_id,
                           meta, stream_files)
        if target is not None:
            return await _indexed(app, target, names, stream_id, meta)
    async with target_locked(app, target_id):
        target = await run(_new_stream, app.storage, target_id, stream_id,
                           meta, stream_files)
        if target is None:
            if target_files is None:
                raise APIError(400, 'target %s is new on this workserver: '
                               'target_files are required' % target_id)
            await run(app.storage.create_target, target_id, target_files,
                      names)
            await run(app.storage.create_stream, stream_id, meta,
                      stream_files)
            target = {'stream_files': names}
        return await _indexed(app, target, names, stream_id, meta)


async def _indexed(app, target, names, stream_id, meta):
    """Index the stream just made on disk (409 if it was not made: its
    file names differ from those of the target's other streams)."""
    if target['stream_files'] != names:
        raise APIError(409, 'stream_files %s differ from the files of '
                       'the target\'s other streams %s'
                       % (names, target['stream_files']))
    pipe = app.redis.pipeline(transaction=True)
    index_stream(pipe, app.keys, stream_id, meta, 0)
    await pipe.execute()
    return stream_id


# Pop the best OK inactive stream of a target and give it a fresh token.
_ACTIVATE = Script("""
while true do
  local popped = redis.call('ZPOPMAX', KEYS[1])
  if #popped == 0 then return false end
  local sid = popped[1]
  local key = ARGV[1] .. sid
  local s = redis.call('HMGET', key, 'status', 'active')
  if s[1] == 'OK' and s[2] == '0' then
    redis.call('HSET', key, 'active', '1', 'token', ARGV[3], 'donor', ARGV[5],
               'start_time', ARGV[6], 'buffer_frames', '0', 'digest', '')
    redis.call('SET', ARGV[2] .. ARGV[3], sid)
    redis.call('ZADD', KEYS[2], ARGV[4], sid)
    redis.call('SADD', KEYS[3], sid)
    return sid
  end
end
""")


async def activate(app, target_id, donor_id):
    """(token, stream_id) of a freshly activated stream, or 503."""
    check_disk(app)
    keys = app.keys
    token = secrets.token_urlsafe(32)
    now = time.time()
    sid = await _ACTIVATE(app, [
        keys.queue(target_id), keys.heartbeats, keys.active], [
        keys.stream_prefix, keys.token_prefix, token_hash(token),
        repr(now + app.config['heartbeat_increment']), donor_id or '',
        repr(now)])
    if not sid:
        raise APIError(503, 'no stream of target %s is free on this '
                       'workserver' % target_id)
    return token, sid


# Deactivate a stream (any mode) and/or change its status, atomically.
# ARGV: sid, token prefix, mode, max_fails, now. Modes: expire (only if
# still active and expired), stop (core stop), error (core stop with an
# error: count it, STOPPED at max_fails), halt (CC stop: STOPPED).
_DEACTIVATE = Script("""
local s = redis.call('HMGET', KEYS[1], 'active', 'token', 'status', 'frames',
                     'error_count')
if not s[3] then return false end
local mode = ARGV[3]
if mode == 'expire' then
  local exp = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if s[1] ~= '1' or not exp or tonumber(exp) >= tonumber(ARGV[5]) then
    return false
  end
end
local was_active = 0
if s[1] == '1' then
  was_active = 1
  if s[2] and s[2] ~= '' then redis.call('DEL', ARGV[2] .. s[2]) end
  redis.call('HSET', KEYS[1], 'active', '0')
  redis.call('HDEL', KEYS[1], 'token', 'donor', 'start_time', 'buffer_frames',
             'digest')
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
local status = s[3]
local errors = tonumber(s[5])
if mode == 'error' then
  errors = errors + 1
  if errors >= tonumber(ARGV[4]) then status = 'STOPPED' end
elseif mode == 'halt' then
  status = 'STOPPED'
end
redis.call('HSET', KEYS[1], 'status', status, 'error_count', errors)
if status == 'OK' then
  redis.call('ZADD', KEYS[4], s[4], ARGV[1])
else
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return {was_active, status, errors}
""")


async def deactivate(app, stream_id, target_id, mode):
    """Run with the stream's lock held. Ends the live activation if any
    (token dead, buffer discarded), requeues the stream unless STOPPED and
    records status/error changes on disk. Returns was_active, or None if
    nothing was done (unknown stream, or mode expire and not expired)."""
    keys = app.keys
    result = await _DEACTIVATE(app, [
        keys.stream(stream_id), keys.heartbeats, keys.active,
        keys.queue(target_id)], [
        stream_id, keys.token_prefix, mode, app.config['max_stream_fails'],
        repr(time.time())])
    if not result:
        return None
    was_active, status, errors = int(result[0]), result[1], int(result[2])
    if was_active:
        await run(app.storage.discard_buffer, stream_id)
    if mode in ('error', 'halt'):
        await run(app.storage.update_stream_meta, stream_id, status=status,
                  error_count=errors)
    return bool(was_active)


_START = Script("""
local s = redis.call('HMGET', KEYS[1], 'active', 'frames', 'status')
if not s[3] then return false end
redis.call('HSET', KEYS[1], 'status', 'OK', 'error_count', '0')
if s[1] ~= '1' then redis.call('ZADD', KEYS[2], s[2], ARGV[1]) end
return 1
""")


async def target_of(app, stream_id):
    tid = await app.redis.hget(app.keys.stream(stream_id), 'target_id')
    if tid is None:
        raise APIError(404, 'unknown stream %s' % stream_id)
    return tid


def stream_lock(app, stream_id):
    return locked(app.redis, app.keys.stream_lock(stream_id),
                  'stream %s' % stream_id)


async def start_stream(app, stream_id):
    tid = await target_of(app, stream_id)
    async with stream_lock(app, stream_id):
        if not await _START(app, [app.keys.stream(stream_id),
                                        app.keys.queue(tid)], [stream_id]):
            raise APIError(404, 'unknown stream %s' % stream_id)
        await run(app.storage.update_stream_meta, stream_id, status='OK',
                  error_count=0)


async def stop_stream(app, stream_id):
    tid = await target_of(app, stream_id)
    async with stream_lock(app, stream_id):
        if await deactivate(app, stream_id, tid, 'halt') is None:
            raise APIError(404, 'unknown stream %s' % stream_id)


# Drop one stream from the index; the target too when it was the last.
# KEYS: stream, target streams, queue, heartbeats, active, targets.
_DELETE = Script("""
local tok = redis.call('HGET', KEYS[1], 'token')
if tok and tok ~= '' then redis.call('DEL', ARGV[2] .. tok) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
local left = redis.call('SCARD', KEYS[2])
if left == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('SREM', KEYS[6], ARGV[3])
end
return left
""")


async def _drop_stream(app, stream_id, target_id):
    """With the target's lock held: every byte of the stream, disk first
    (one rename: gone even if we crash right after), then its keys.
    Returns how many streams the target has left."""
    keys = app.keys
    async with stream_lock(app, stream_id):
        await run(app.storage.remove_stream, stream_id)
        return await _DELETE(app, [
            keys.stream(stream_id), keys.target_streams(target_id),
            keys.queue(target_id), keys.heartbeats, keys.active,
            keys.targets], [stream_id, keys.token_prefix, target_id])


async def delete_stream(app, stream_id):
    tid = await target_of(app, stream_id)
    async with target_locked(app, tid):
        if not await app.redis.exists(app.keys.stream(stream_id)):
            raise APIError(404, 'unknown stream %s' % stream_id)
        if await _drop_stream(app, stream_id, tid) == 0:
            await run(app.storage.remove_target, tid)


async def delete_target(app, target_id):
    """Every stream of the target, then the target; fine if unknown."""
    keys = app.keys
    async with target_locked(app, target_id):
        for sid in sorted(await app.redis.smembers(
                keys.target_streams(target_id))):
            await _drop_stream(app, sid, target_id)
        await run(app.storage.remove_target, target_id)
        pipe = app.redis.pipeline(transaction=True)
        pipe.delete(keys.target_streams(target_id), keys.queue(target_id))
        pipe.srem(keys.targets, target_id)
        await pipe.execute()


def _public(h):
    return {'status': h['status'], 'frames': int(h['frames']),
            'error_count': int(h['error_count']),
            'active': h['active'] == '1'}


async def stream_info(app, stream_id):
    h = await app.redis.hgetall(app.keys.stream(stream_id))
    if not h:
        raise APIError(404, 'unknown stream %s' % stream_id)
    info = _public(h)
    info.update(target_id=h['target_id'],
                creation_date=float(h['creation_date']))
    return info


async def _hashes(app, stream_ids):
    pipe = app.redis.pipeline(transaction=False)
    for sid in stream_ids:
        pipe.hgetall(app.keys.stream(sid))
    return [(sid, h) for sid, h in zip(stream_ids, await pipe.execute()) if h]


async def target_streams(app, target_id):
    sids = sorted(await app.redis.smembers(
        app.keys.target_streams(target_id)))
    if not sids:
        raise APIError(404, 'unknown target %s' % target_id)
    return {sid: _public(h) for sid, h in await _hashes(app, sids)}


async def active_streams(app):
    result = {}
    for sid, h in await _hashes(app, sorted(
            await app.redis.smembers(app.keys.active))):
        if h['active'] != '1':
            continue
        result.setdefault(h['target_id'], {})[sid] = {
            'donor': h['donor'] or None,
            'start_time': float(h['start_time']),
            'total_frames': int(h['frames']),
            'buffer_frames': int(h['buffer_frames'])}
    return result


# handlers

def cc_passes(config):
    return [cc['pass'] for cc in config['command_centers'].values()]


class CCHandler(APIHandler):
    """Endpoints for the command centers: `Authorization: <cc_pass>`."""

    def prepare(self):
        super().prepare()
        if not self.is_cc():
            raise APIError(401, 'missing or wrong cc_pass')
        if self.request.method in ('PUT', 'POST'):
            self.body  # a malformed body is a 400 even where no field is read

    def is_cc(self):
        token = (self.token() or '').encode('utf-8')
        found = False
        for p in cc_passes(self.config):  # no early exit: constant time
            found |= hmac.compare_digest(token, p.encode('utf-8'))
        return found and bool(token)

    def target_id(self):
        return self.field('target_id', str, check=ID.match)


def check_stream_id(stream_id):
    if not STREAM_ID.match(stream_id):
        raise APIError(400, 'bad stream id %r' % stream_id)
    return stream_id


def check_target_id(target_id):
    if not ID.match(target_id):
        raise APIError(400, 'bad target id %r' % target_id)
    return target_id


def check_encoded(files, what, allow_empty=False):
    """400 unless every `.b64` / `.gz.b64` file decodes."""
    check_files(files, what, allow_empty)
    for name, value in files.items():
        decode_file(name, value)
    return files


class CreateStreamHandler(CCHandler):
    async def post(self):
        tid = self.target_id()
        stream_files = check_encoded(self.field('stream_files', dict),
                                     'stream_files')
        target_files = self.field('target_files', dict, None)
        if target_files is not None:
            # A target may have no files of its own (API.md: files?).
            check_encoded(target_files, 'target_files', allow_empty=True)
        sid = await create_stream(self.application, tid, stream_files,
                                  target_files)
        self.write_json({'stream_id': sid})


class ActivateHandler(CCHandler):
    async def post(self):
        tid = self.target_id()
        donor = self.field('donor_id', (str, type(None)), None)
        token, sid = await activate(self.application, tid, donor)
        self.write_json({'token': token, 'stream_id': sid})


class StartHandler(CCHandler):
    async def put(self, stream_id):
        await start_stream(self.application, check_stream_id(stream_id))
        self.write_json({})


class StopHandler(CCHandler):
    async def put(self, stream_id):
        await stop_stream(self.application, check_stream_id(stream_id))
        self.write_json({})


class DeleteHandler(CCHandler):
    async def put(self, stream_id):
        await delete_stream(self.application, check_stream_id(stream_id))
        self.write_json({})


class InfoHandler(CCHandler):
    async def get(self, stream_id):
        self.write_json(await stream_info(self.application,
                                          check_stream_id(stream_id)))


class TargetStreamsHandler(CCHandler):
    async def get(self, target_id):
        self.write_json(await target_streams(self.application,
                                             check_target_id(target_id)))


class DeleteTargetHandler(CCHandler):
    async def put(self, target_id):
        await delete_target(self.application, check_target_id(target_id))
        self.write_json({})


class ActiveStreamsHandler(CCHandler):
    async def get(self):
        self.write_json(await active_streams(self.application))


RANGE = re.compile(r'^bytes=(\d*)-(\d*)$')


def parse_range(header, total):
    """(start, end) inclusive, None for the whole file, or 'unsatisfiable'.
    One range only; a malformed header is ignored (RFC 9110)."""
    if not header:
        return None
    m = RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # the last n bytes
        n = int(m.group(2))
        if n == 0 or total == 0:
            return 'unsatisfiable'
        return max(total - n, 0), total - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else total - 1
    if start >= total:
        return 'unsatisfiable'
    if end < start:
        return None
    return start, min(end, total - 1)


class DownloadHandler(CCHandler):
    """A file's committed frames, streamed from disk a chunk at a time.
    The CC's pass, or a URL the CC signed, may download."""

    def prepare(self):
        APIHandler.prepare(self)

    async def get(self, stream_id, filename):
        check_stream_id(stream_id)
        check_file_name(filename)
        if not self.is_cc():
            expires = self.get_query_argument('expires', None)
            sig = self.get_query_argument('signature', None)
            if expires is None and sig is None:
                raise APIError(401, 'missing cc_pass or signed URL')
            if not signing.valid(cc_passes(self.config), stream_id, filename,
                                 expires, sig):
                raise APIError(401, 'bad or expired download signature')
        await target_of(self.application, stream_id)
        parts = await run(self.application.storage.download_parts,
                          stream_id, filename)
        if parts is None:
            raise APIError(404, 'stream %s has no file %s'
                           % (stream_id, filename))
        total = sum(size for _, size in parts)
        wanted = parse_range(self.request.headers.get('Range'), total)
        self.set_header('Accept-Ranges', 'bytes')
        if wanted == 'unsatisfiable':
            self.set_header('Content-Range', 'bytes */%d' % total)
            self.write_json({'error': 'range not satisfiable: the file has '
                             '%d bytes' % total}, 416)
            return
        if wanted is None:
            start, end = 0, total - 1
        else:
            start, end = wanted
            self.set_status(206)
            self.set_header('Content-Range', 'bytes %d-%d/%d'
                            % (start, end, total))
        self.set_header('Content-Type', 'application/octet-stream')
        self.set_header('Content-Length', str(end - start + 1))
        for path, offset, length in plan_range(parts, start, end):
            while length > 0:
                data = await run(read_at, path, offset,
                                 min(length, 1 << 20))
                if not data:
                    break
                offset += len(data)
                length -= len(data)
                self.write(data)
                await self.flush()
        self.finish()


S = r'([^/]+)'
default_handlers = [
    (r'/streams', CreateStreamHandler),
    (r'/streams/activate', ActivateHandler),
    (r'/streams/start/' + S, StartHandler),
    (r'/streams/stop/' + S, StopHandler),
    (r'/streams/delete/' + S, DeleteHandler),
    (r'/streams/info/' + S, InfoHandler),
    (r'/streams/%s/%s' % (S, S), DownloadHandler),
    (r'/targets/streams/' + S, TargetStreamsHandler),
    (r'/targets/delete/' + S, DeleteTargetHandler),
    (r'/active_streams', ActiveStreamsHandler),
]
