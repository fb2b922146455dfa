"""Targets and streams of the workserver: the model, a Redis index over the
disk of storage.py.

Concurrency: several worker processes serve the same streams. Every
check-then-set on Redis is one Lua script or a MULTI; everything that also
touches a stream's disk (frames, checkpoints, deactivation, start/stop,
deletion) runs under that stream's Redis lock, and stream creations and
target deletions take the target's locks (locks.py), so a buffer is never
committed and discarded at once, a stale core can never write after its
token died, and no stream is made in a target being deleted.
"""
import json
import secrets
import time
import uuid

from server import metrics, threads
from server.lua import Script
from server.tokens import token_hash
from server.web import APIError
from server.ws import sessions
from server.ws.locks import stream_locked, target_locked, target_shared


def check_disk(app):
    """Refuse new work before the disk is too full to take it."""
    floor = app.config.min_free_disk_in_mb
    free = app.storage.free_mb()
    if free < floor:
        raise APIError(503, 'workserver disk is nearly full (%.0f MB free, '
                       'floor %d MB): no new streams or activations'
                       % (free, floor))


def index_stream(pipe, keys, stream_id, meta, frames):
    """Queue the commands that put one stream into the Redis index (used
    on creation and by the rebuild from disk)."""
    tid = meta['target_id']
    fields = {
        'target_id': tid, 'status': meta['status'], 'frames': frames,
        'error_count': meta.get('error_count', 0),
        'creation_date': repr(float(meta['creation_date'])), 'active': 0,
        'cc': meta.get('cc') or ''}
    if meta.get('tags'):  # none: no field (idle streams cost no more)
        fields['tags'] = json.dumps(meta['tags'])
    pipe.hset(keys.stream(stream_id), mapping=fields)
    pipe.sadd(keys.target_streams(tid), stream_id)
    pipe.sadd(keys.targets, tid)
    if meta['status'] == 'OK':
        pipe.zadd(keys.queue(tid), {stream_id: frames})


def foreign(record, cc):
    """True if a stream's or target's record says another command center
    made it (records from before owners were kept belong to any)."""
    return bool(record.get('cc')) and record['cc'] != cc


def _new_stream(storage, target_id, stream_id, meta, stream_files):
    """Make the stream on disk if its target exists, belongs to the same
    CC and has the same stream file names; returns the target's meta
    (None: no such target)."""
    target = storage.target_meta(target_id)
    if target is not None and not foreign(target, meta['cc']) \
            and target['stream_files'] == sorted(stream_files):
        storage.create_stream(stream_id, meta, stream_files)
    return target


async def create_stream(app, target_id, stream_files, target_files, cc,
                        tags=None, creation_id=None):
    """A stream of a known target needs only a shared hold on it (creations
    run in parallel); the first stream of a target creates the target
    under its exclusive lock. `tags` live in stream.json, so they survive
    a loss of Redis like the rest of the stream. With a `creation_id` (the
    CC's) the stream is `<creation_id>:<ws name>`, so a create sent again
    (its reply was lost) finds the stream made the first time instead of
    making a second one. The stream and a new target record `cc`, the
    command center that asked: only it may use them from then on."""
    stream_id = '%s:%s' % (creation_id or uuid.uuid4(), app.config.name)
    if creation_id is not None:
        made = await _made_before(app, target_id, stream_id, cc)
        if made:
            return made
    check_disk(app)
    try:
        return await _create(app, target_id, stream_files, target_files,
                             tags, stream_id, cc)
    except FileExistsError:  # the same creation at once: it won
        made = await _made_before(app, target_id, stream_id, cc)
        if not made:
            raise
        return made


async def _made_before(app, target_id, stream_id, cc):
    """The stream id if a creation with this id already made the stream
    (indexed again if Redis lacks it); 409 if for another target or
    another command center."""
    meta = await threads.disk(app.storage.stream_meta, stream_id)
    if meta is None:
        return None
    if meta['target_id'] != target_id or foreign(meta, cc):
        raise APIError(409, 'creation id of stream %s was used for another '
                       'target' % stream_id)
    if not await app.redis.exists(app.keys.stream(stream_id)):
        pipe = app.redis.pipeline(transaction=True)
        index_stream(pipe, app.keys, stream_id, meta, await threads.disk(
            app.storage.committed_frames, stream_id))
        await pipe.execute()
    return stream_id


async def _create(app, target_id, stream_files, target_files, tags,
                  stream_id, cc):
    names = sorted(stream_files)
    meta = {'target_id': target_id, 'creation_date': time.time(),
            'status': 'OK', 'error_count': 0, 'cc': cc}
    if tags:
        meta['tags'] = tags
    async with target_shared(app, target_id):
        target = await threads.disk(_new_stream, app.storage, target_id,
                                    stream_id, meta, stream_files)
        if target is not None:
            return await _indexed(app, target, names, stream_id, meta)
    async with target_locked(app, target_id):
        target = await threads.disk(_new_stream, app.storage, target_id,
                                    stream_id, meta, stream_files)
        if target is None:
            if target_files is None:
                raise APIError(400, 'target %s is new on this workserver: '
                               'target_files are required' % target_id)
            await threads.disk(app.storage.create_target, target_id,
                               target_files, names, cc)
            await threads.disk(app.storage.create_stream, stream_id, meta,
                               stream_files)
            target = {'stream_files': names, 'cc': cc}
        return await _indexed(app, target, names, stream_id, meta)


async def _indexed(app, target, names, stream_id, meta):
    """Index the stream just made on disk (403 if it was not made because
    another CC owns the target, 409 if its file names differ from those of
    the target's other streams)."""
    if foreign(target, meta['cc']):
        raise APIError(403, 'target %s belongs to another command center'
                       % meta['target_id'])
    if target['stream_files'] != names:
        raise APIError(409, 'stream_files %s differ from the files of '
                       'the target\'s other streams %s'
                       % (names, target['stream_files']))
    pipe = app.redis.pipeline(transaction=True)
    index_stream(pipe, app.keys, stream_id, meta, 0)
    await pipe.execute()
    return stream_id


# Pop the best OK inactive stream of a target and give it a fresh token;
# none for a CC (ARGV[8]) other than the one that made the target.
# Its session starts (see sessions.py).
_ACTIVATE = Script("""
while true do
  local popped = redis.call('ZPOPMAX', KEYS[1])
  if #popped == 0 then return false end
  local sid = popped[1]
  local key = string.format(ARGV[1], sid)
  local s = redis.call('HMGET', key, 'status', 'active', 'cc', 'frames')
  if s[3] and s[3] ~= '' and s[3] ~= ARGV[8] then
    redis.call('ZADD', KEYS[1], popped[2], sid)
    return false
  end
  if s[1] == 'OK' and s[2] == '0' then
    redis.call('HSET', key, 'active', '1', 'token', ARGV[3], 'donor', ARGV[5],
               'start_time', ARGV[6], 'buffer_frames', '0', 'digest', '',
               'sizes', '', 'client', ARGV[7], 'session', ARGV[9],
               'session_cc', ARGV[8], 'engine', ARGV[10],
               'core_version', ARGV[11], 'frames0', s[4] or '0')
    redis.call('SET', string.format(ARGV[2], ARGV[3]), sid)
    redis.call('ZADD', KEYS[2], ARGV[4], sid)
    redis.call('SADD', KEYS[3], sid)
    redis.call('HINCRBY', KEYS[4], ARGV[12], 1)
    return sid
  end
end
""")


def early_windows(config):
    """(start, first heartbeat) windows in seconds: how long a new token
    may take to reach /core/start, then to send its first heartbeat or
    frame; never longer than heartbeat_increment."""
    hb = config.heartbeat_increment_in_s
    return (min(config.core_start_window_in_s, hb),
            min(config.first_heartbeat_window_in_s, hb))


async def activate(app, target_id, donor_id, client, cc, engine='',
                   core_version=''):
    """(token, stream_id) of a freshly activated stream, or 503. The token
    lives for the start window only until it reaches /core/start (see
    core.py): an activation whose reply was lost (the CC timed out, the
    connection was cut), or a stream taken and never started, gives its
    stream back soon, not after a whole heartbeat. `client` (from the CC)
    is who got it, for counting error stops; `cc` (which CC asked),
    `engine` and `core_version` go into its session."""
    check_disk(app)
    keys = app.keys
    token = secrets.token_urlsafe(32)
    now = time.time()
    sid = await _ACTIVATE(app.fastredis, [
        keys.queue(target_id), keys.heartbeats, keys.active,
        keys.target_active], [
        keys.stream.template, keys.token.template, token_hash(token),
        repr(now + early_windows(app.config)[0]), donor_id or '',
        repr(now), client or '', cc, uuid.uuid4().hex, engine, core_version,
        target_id])
    if not sid:
        raise APIError(503, 'no stream of target %s is free on this '
                       'workserver' % target_id)
    metrics.count('activations')
    return token, sid


# Deactivate a stream (any mode) and/or change its status, atomically.
# KEYS: stream, heartbeats, active, queue, errors_by. ARGV: sid, token key
# template, mode, max_fails, now. Modes: expire (only if still active and
# expired), stop (core stop), error (core stop with an error: counted once
# per client of the activation, STOPPED at max_fails), halt (CC stop:
# STOPPED).

# What end_session reads follows ARGV[5]. An active stream's session ends
# here.
_DEACTIVATE = Script(sessions.END_SESSION_LUA + """
local s = redis.call('HMGET', KEYS[1], 'active', 'token', 'status', 'frames',
                     'error_count', 'client')
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
  end_session(KEYS[1], ARGV[1], 6)
  if s[2] and s[2] ~= '' then
    redis.call('DEL', string.format(ARGV[2], s[2]))
  end
  redis.call('HSET', KEYS[1], 'active', '0')
  redis.call('HDEL', KEYS[1], 'token', 'donor', 'start_time', 'buffer_frames',
             'digest', 'sizes', 'client', 'session', 'session_cc', 'engine',
             'core_version', 'frames0')
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
local status = s[3]
local errors = tonumber(s[5])
if mode == 'error' and (not s[6] or s[6] == ''
                        or redis.call('SADD', KEYS[5], s[6]) == 1) then
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
    result = await _DEACTIVATE(app.fastredis, [
        keys.stream(stream_id), keys.heartbeats, keys.active,
        keys.queue(target_id), keys.errors_by(stream_id)], [
        stream_id, keys.token.template, mode, app.config.max_stream_fails,
        repr(time.time())] + sessions.end_args(keys, mode))
    if not result:
        return None
    was_active, status, errors = int(result[0]), result[1], int(result[2])
    if was_active:
        metrics.count('deactivations', label=sessions.REASONS[mode])
        await threads.disk(app.storage.discard_buffer, stream_id)
    if mode in ('error', 'halt'):
        await threads.disk(app.storage.update_stream_meta, stream_id,
                           status=status, error_count=errors)
    return bool(was_active)


_START = Script("""
local s = redis.call('HMGET', KEYS[1], 'active', 'frames', 'status')
if not s[3] then return false end
redis.call('HSET', KEYS[1], 'status', 'OK', 'error_count', '0')
redis.call('DEL', KEYS[3])
if s[1] ~= '1' then redis.call('ZADD', KEYS[2], s[2], ARGV[1]) end
return 1
""")


async def target_of(app, stream_id, cc=None):
    """The stream's target; 404 for an unknown stream, and for one another
    command center than `cc` (when given) made."""
    tid, owner = await app.redis.hmget(app.keys.stream(stream_id),
                                       'target_id', 'cc')
    if tid is None or cc is not None and foreign({'cc': owner}, cc):
        raise APIError(404, 'unknown stream %s' % stream_id)
    return tid


async def start_stream(app, stream_id, cc):
    tid = await target_of(app, stream_id, cc)
    async with stream_locked(app, stream_id):
        if not await _START(app.fastredis, [app.keys.stream(stream_id),
                                            app.keys.queue(tid),
                                            app.keys.errors_by(stream_id)],
                            [stream_id]):
            raise APIError(404, 'unknown stream %s' % stream_id)
        await threads.disk(app.storage.update_stream_meta, stream_id,
                           status='OK', error_count=0)


async def stop_stream(app, stream_id, cc):
    tid = await target_of(app, stream_id, cc)
    async with stream_locked(app, stream_id):
        if await deactivate(app, stream_id, tid, 'halt') is None:
            raise APIError(404, 'unknown stream %s' % stream_id)


# Drop one stream from the index; the target too when it was the last.
# KEYS: stream, target streams, queue, heartbeats, active, targets,
# errors_by. ARGV: sid, token key template, target id, then what
# end_session reads.
DELETE = Script(sessions.END_SESSION_LUA + """
local tok = redis.call('HGET', KEYS[1], 'token')
if tok and tok ~= '' then
  end_session(KEYS[1], ARGV[1], 4)
  redis.call('DEL', string.format(ARGV[2], tok))
end
redis.call('DEL', KEYS[1], KEYS[7])
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
    async with stream_locked(app, stream_id):
        await threads.disk(app.storage.remove_stream, stream_id)
        return await DELETE(app.fastredis, [
            keys.stream(stream_id), keys.target_streams(target_id),
            keys.queue(target_id), keys.heartbeats, keys.active,
            keys.targets, keys.errors_by(stream_id)],
            [stream_id, keys.token.template, target_id]
            + sessions.end_args(keys, 'delete'))


async def delete_stream(app, stream_id, cc):
    tid = await target_of(app, stream_id, cc)
    async with target_locked(app, tid):
        if not await app.redis.exists(app.keys.stream(stream_id)):
            raise APIError(404, 'unknown stream %s' % stream_id)
        if await _drop_stream(app, stream_id, tid) == 0:
            await threads.disk(app.storage.remove_target, tid)


async def delete_target(app, target_id, cc):
    """Every stream of the target, then the target; fine if unknown, 404
    if another command center made it."""
    keys = app.keys
    target = await threads.disk(app.storage.target_meta, target_id)
    if target is not None and foreign(target, cc):
        raise APIError(404, 'unknown target %s' % target_id)
    async with target_locked(app, target_id):
        for sid in sorted(await app.redis.smembers(
                keys.target_streams(target_id))):
            await _drop_stream(app, sid, target_id)
        await threads.disk(app.storage.remove_target, target_id)
        pipe = app.redis.pipeline(transaction=True)
        pipe.delete(keys.target_streams(target_id), keys.queue(target_id))
        pipe.srem(keys.targets, target_id)
        await pipe.execute()


def _public(h):
    return {'status': h['status'], 'frames': int(h['frames']),
            'error_count': int(h['error_count']),
            'active': h['active'] == '1',
            'tags': json.loads(h['tags']) if h.get('tags') else {}}


async def stream_info(app, stream_id, cc):
    h = await app.redis.hgetall(app.keys.stream(stream_id))
    if not h or foreign(h, cc):
        raise APIError(404, 'unknown stream %s' % stream_id)
    info = _public(h)
    info.update(target_id=h['target_id'],
                creation_date=float(h['creation_date']))
    return info


async def _hashes(app, stream_ids):
    pipe = app.redis.pipeline(transaction=False)
    for sid in stream_ids:
        pipe.hgetall(app.keys.stream(sid))
    replies = await pipe.execute()
    return [(sid, h) for sid, h in zip(stream_ids, replies, strict=True)
            if h]


async def target_streams(app, target_id, cc):
    sids = sorted(await app.redis.smembers(
        app.keys.target_streams(target_id)))
    found = {sid: _public(h) for sid, h in await _hashes(app, sids)
             if not foreign(h, cc)}
    if not found:
        raise APIError(404, 'unknown target %s' % target_id)
    return found


async def all_streams(app, cc):
    """{stream_id: creation_date} of every stream `cc` made here (for its
    reconciliation: another CC's streams are not its to adopt or delete)."""
    keys = app.keys
    tids = sorted(await app.redis.smembers(keys.targets))
    pipe = app.redis.pipeline(transaction=False)
    for tid in tids:
        pipe.smembers(keys.target_streams(tid))
    sids = sorted(set().union(*await pipe.execute())) if tids else []
    pipe = app.redis.pipeline(transaction=False)
    for sid in sids:
        pipe.hmget(keys.stream(sid), 'creation_date', 'cc')
    return {sid: float(date) for sid, (date, owner) in zip(
        sids, await pipe.execute(), strict=True)
        if date is not None and not foreign({'cc': owner}, cc)}


async def active_streams(app, cc):
    """The active streams `cc` made."""
    result: dict = {}
    for sid, h in await _hashes(app, sorted(
            await app.redis.smembers(app.keys.active))):
        if h['active'] != '1' or foreign(h, cc):
            continue
        result.setdefault(h['target_id'], {})[sid] = {
            'donor': h['donor'] or None,
            'start_time': float(h['start_time']),
            'total_frames': int(h['frames']),
            'buffer_frames': int(h['buffer_frames'])}
    return result


