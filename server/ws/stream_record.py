"""The WS stream record: its Redis hash (`keys.stream`), its typed fields
and every Lua step that changes it. Nothing else reads or writes a stream
hash's fields by name.

The hash holds: target_id, status (OK/STOPPED), frames (committed),
error_count (consecutive error stops), creation_date, active (0/1), cc (the
command center that made it; '' before owners were kept), tags (JSON, only
if any), bytes (committed decoded bytes, budgets.py; absent after a
rebuild of a stream with chunks until the next checkpoint counts them),
backoffs (anonymous error stops since the last checkpoint,
error_stops.py; only if any); while active only (an idle stream keeps its
hash small): token (hash of the live token), donor, client (who the CC
assigned it to, by network: error_stops.py), vouched (1 if its error
stops count), start_time, buffer_frames, digest (of the last accepted
frame body, see core.body_digest), sizes (the buffer's bytes per file
counted so far, see storage.encode_sizes) and the session (see
sessions.py): session, session_cc, engine, core_version, frames0
(committed frames at its start).

A step that moves a stream in or out of its target's queue names the
target's keys (target_record.py) in its KEYS. The steps that start from a
token or from a target's queue walk to the stream's hash (and lock) by a
key template: each says so at its top (`walks`, see server/lua.py). An
activation's session ends inside the step that ends the activation
(END_SESSION below), so it is recorded exactly once.
"""
import json
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from server.lua import Script
from server.sessions_common import REASON_OF_MODE, minute
from server.ws import target_record
from server.ws.keys import Keys
from server.ws.storage import decode_sizes, encode_sizes

# The hash fields an activation adds; they go when it ends.
ACTIVE_ONLY = ('token', 'donor', 'start_time', 'buffer_frames', 'digest',
               'sizes', 'client', 'vouched', 'session', 'session_cc', 'engine',
               'core_version', 'frames0')
_ACTIVE_ONLY_LUA = ', '.join("'%s'" % f for f in ACTIVE_ONLY)


@dataclass
class StreamFields:
    """A stream's hash, typed."""
    target_id: str
    status: str
    frames: int
    error_count: int
    creation_date: float
    active: bool
    cc: str = ''
    tags: dict[str, Any] = field(default_factory=dict)
    donor: str | None = None
    start_time: float | None = None
    buffer_frames: int = 0

    @classmethod
    def of(cls, h: dict[str, str]) -> 'StreamFields':
        return cls(target_id=h['target_id'], status=h['status'],
                   frames=int(h['frames']),
                   error_count=int(h['error_count']),
                   creation_date=float(h['creation_date']),
                   active=h['active'] == '1', cc=h.get('cc') or '',
                   tags=json.loads(h['tags']) if h.get('tags') else {},
                   donor=h.get('donor') or None,
                   start_time=float(h['start_time'])
                   if h.get('start_time') else None,
                   buffer_frames=int(h.get('buffer_frames') or 0))

    def foreign(self, cc: str) -> bool:
        return foreign(self.cc, cc)

    def public(self) -> dict[str, Any]:
        """What the CC's listings show of it."""
        return {'status': self.status, 'frames': self.frames,
                'error_count': self.error_count, 'active': self.active,
                'tags': self.tags}


def foreign(owner: str | None, cc: str) -> bool:
    """True if a record's owner `owner` is another command center than
    `cc` (records from before owners were kept belong to any)."""
    return bool(owner) and owner != cc


def index(pipe: Any, keys: Keys, sid: str, meta: dict[str, Any],
          frames: int) -> None:
    """Queue the commands that put one stream (of its stream.json `meta`,
    `frames` committed) into the index: its hash, its target's sets
    (creation, and the rebuild from disk)."""
    tid = meta['target_id']
    fields: dict[str, Any] = {
        'target_id': tid, 'status': meta['status'], 'frames': frames,
        'error_count': meta.get('error_count', 0),
        'creation_date': repr(float(meta['creation_date'])), 'active': 0,
        'cc': meta.get('cc') or ''}
    if meta.get('tags'):  # none: no field (idle streams cost no more)
        fields['tags'] = json.dumps(meta['tags'])
    if not frames:  # no chunk: no byte committed, no disk scan to count
        fields['bytes'] = 0
    pipe.hset(keys.stream(sid), mapping=fields)
    target_record.add_stream(pipe, keys, tid, sid,
                             frames if meta['status'] == 'OK' else None)


async def read(app: Any, sid: str) -> StreamFields | None:
    h = await app.redis.hgetall(app.keys.stream(sid))
    return StreamFields.of(h) if h else None


async def read_many(app: Any, sids: list[str]) -> list[tuple[str,
                                                              StreamFields]]:
    """(sid, fields) of those of `sids` that exist, one round trip."""
    pipe = app.redis.pipeline(transaction=False)
    for sid in sids:
        pipe.hgetall(app.keys.stream(sid))
    return [(sid, StreamFields.of(h))
            for sid, h in zip(sids, await pipe.execute(), strict=True) if h]


async def target_and_owner(app: Any, sid: str) -> tuple[str | None,
                                                        str | None]:
    tid, owner = await app.redis.hmget(app.keys.stream(sid), 'target_id',
                                       'cc')
    return tid, owner


def target_of_sync(redis: Any, keys: Keys, sid: str) -> str | None:
    """The stream's target (sync client, for the master's repairs)."""
    tid: str | None = redis.hget(keys.stream(sid), 'target_id')
    return tid


async def creation_dates(app: Any, sids: list[str]) -> list[tuple[
        str, float, str]]:
    """(sid, creation_date, owner) of those of `sids` that exist."""
    pipe = app.redis.pipeline(transaction=False)
    for sid in sids:
        pipe.hmget(app.keys.stream(sid), 'creation_date', 'cc')
    return [(sid, float(date), owner or '') for sid, (date, owner)
            in zip(sids, await pipe.execute(), strict=True)
            if date is not None]


async def owners(app: Any, sids: list[str]) -> list[str]:
    """The owner ('' if none was kept) of each of `sids`."""
    pipe = app.redis.pipeline(transaction=False)
    for sid in sids:
        pipe.hget(app.keys.stream(sid), 'cc')
    return [owner or '' for owner in await pipe.execute()]


async def exists(app: Any, sid: str) -> bool:
    return bool(await app.redis.exists(app.keys.stream(sid)))


# End the session of an active stream (sessions.py): its target's active
# count goes down, an error stop is counted in its minute (per CC), the
# reason is kept by its token (keys.ended) so the core's next request is
# told why (a manager's stop is no error), and its record goes to the
# outbox of the CC that asked for the activation. `committed`: the
# committed frames now, '' for the hash's. Run before the stream leaves
# `heartbeats`. The reason is kept until the token would have expired and
# ENDED_GRACE_S more (the core's next request comes before then); a core's
# own stop only STOP_KEPT_S (for a retry of it), so a fleet of short
# sessions does not fill Redis.
ENDED_GRACE_S = 600
STOP_KEPT_S = 60
END_KEYS = ('heartbeats', 'target_active')
END_WALKS = ('outbox', 'errors_per_minute', 'ended')
END_ARGS = ('now', 'minute', 'reason', 'committed', 'ended_grace_s',
            'stop_kept_s')
END_SESSION = """
local function end_session(key, sid)
  local s = redis.call('HMGET', key, 'session', 'session_cc', 'donor',
                       'engine', 'core_version', 'start_time', 'frames0',
                       'frames', 'target_id', 'token')
  if s[9] and redis.call('HINCRBY', target_active, s[9], -1) <= 0 then
    redis.call('HDEL', target_active, s[9])
  end
  if s[10] and s[10] ~= '' then
    local kept = tonumber(stop_kept_s)
    if reason ~= 'stop' and reason ~= 'error' then
      local expiry = tonumber(redis.call('ZSCORE', heartbeats, sid) or now)
      kept = math.max(0, math.ceil(expiry - tonumber(now)))
             + tonumber(ended_grace_s)
    end
    redis.call('SET', string.format(ended, s[10]), reason, 'EX', kept)
  end
  if reason == 'error' then
    redis.call('HINCRBY', string.format(errors_per_minute, s[2] or ''),
               minute, 1)
  end
  if not s[1] or s[1] == '' then return end
  local frames = (tonumber(committed) or tonumber(s[8]) or 0)
                 - (tonumber(s[7]) or 0)
  if frames < 0 then frames = 0 end
  redis.call('XADD', string.format(outbox, s[2]), '*', 'id', s[1],
             'donor', s[3] or '', 'engine', s[4] or '',
             'core_version', s[5] or '', 'target_id', s[9] or '',
             'stream_id', sid, 'start', s[6] or '', 'end', now,
             'reason', reason, 'frames', frames)
end
"""


def end_values(keys: Keys, mode: str, committed: int | str = '',
               now: float | None = None) -> dict[str, Any]:
    """What END_SESSION takes, for an end by `mode`."""
    now = time.time() if now is None else now
    return {'heartbeats': keys.heartbeats,
            'target_active': keys.target_active,
            'errors_per_minute': keys.errors_per_minute.template,
            'outbox': keys.outbox.template, 'ended': keys.ended.template,
            'now': repr(now), 'minute': minute(now),
            'reason': REASON_OF_MODE[mode], 'committed': committed,
            'ended_grace_s': ENDED_GRACE_S, 'stop_kept_s': STOP_KEPT_S}


_END_ON_RESTART = Script(END_SESSION + """
if redis.call('HGET', stream, 'active') ~= '1' then return 0 end
end_session(stream, sid)
return 1
""", keys=('stream',) + END_KEYS, walks=END_WALKS,
    args=('sid',) + END_ARGS)


def end_on_restart(redis: Any, keys: Keys, sid: str, frames: int) -> bool:
    """The rebuild's end of a session that was live when the WS went down
    (sync client; `frames`: committed frames on disk). False if the
    stream was not active."""
    return bool(_END_ON_RESTART(redis, stream=keys.stream(sid), sid=sid,
                                **end_values(keys, 'restart', frames)))


# Pop the best OK inactive stream of a target and give it a fresh token;
# none for a CC other than the one that made the target, none while the
# best is backed off (a negative score, see _DEACTIVATE). Its session
# starts. Walks from the queue's stream id to its hash and to the key of
# its token.
_ACTIVATE = Script("""
while true do
  local popped = redis.call('ZPOPMAX', queue)
  if #popped == 0 then return false end
  local sid = popped[1]
  if tonumber(popped[2]) < 0 then  -- the best is backed off: all are
    redis.call('ZADD', queue, popped[2], sid)
    return false
  end
  local key = string.format(stream, sid)
  local s = redis.call('HMGET', key, 'status', 'active', 'cc', 'frames')
  if s[3] and s[3] ~= '' and s[3] ~= cc then
    redis.call('ZADD', queue, popped[2], sid)
    return false
  end
  if s[1] == 'OK' and s[2] == '0' then
    redis.call('HSET', key, 'active', '1', 'token', token, 'donor', donor,
               'start_time', now, 'buffer_frames', '0', 'digest', '',
               'sizes', '', 'client', client, 'vouched', vouched,
               'session', session,
               'session_cc', cc, 'engine', engine,
               'core_version', core_version, 'frames0', s[4] or '0')
    redis.call('SET', string.format(token_key, token), sid)
    redis.call('ZADD', heartbeats, expiry, sid)
    redis.call('SADD', active, sid)
    redis.call('HINCRBY', target_active, target_id, 1)
    return sid
  end
end
""", keys=('queue', 'heartbeats', 'active', 'target_active'),
    walks=('stream', 'token_key'),
    args=('token', 'expiry', 'donor', 'now', 'client', 'vouched', 'cc',
          'session', 'engine', 'core_version', 'target_id'))


async def activate(app: Any, target_id: str, token_hash: str, expiry: float,
                   now: float, donor: str, client: str, vouched: bool,
                   cc: str, session: str, engine: str, core_version: str
                   ) -> str | None:
    """The stream id activated, or None (no stream free for `cc`).
    `client` and `vouched`: who counts its error stops (error_stops.py)."""
    keys = app.keys
    sid: str | None = await _ACTIVATE(
        app.fastredis, queue=keys.queue(target_id),
        heartbeats=keys.heartbeats, active=keys.active,
        target_active=keys.target_active, stream=keys.stream.template,
        token_key=keys.token.template, token=token_hash,
        expiry=repr(expiry), donor=donor, now=repr(now), client=client,
        vouched='1' if vouched else '0', cc=cc, session=session,
        engine=engine, core_version=core_version, target_id=target_id)
    return sid or None


class Deactivated(NamedTuple):
    was_active: int
    status: str
    error_count: int


# Deactivate a stream (any mode) and/or change its status, atomically.
# Modes: expire (only if still active and expired), stop (core stop),
# error (core stop with an error: from a client that counts, see
# error_stops.py, counted once per client, STOPPED at max_fails; from
# another, the stream is backed off: queued with the score -(when it ends),
# below every stream ready to go (activation never takes one), and in
# `backoff` until then: base seconds, doubled for each such stop since the
# last checkpoint, at most max_backoff), halt (CC stop: STOPPED). An
# active stream's session ends here. Walks to the key of the stream's
# token.
_DEACTIVATE = Script(END_SESSION + """
local s = redis.call('HMGET', stream, 'active', 'token', 'status', 'frames',
                     'error_count', 'client', 'vouched')
if not s[3] then return false end
if mode == 'expire' then
  local exp = redis.call('ZSCORE', heartbeats, sid)
  if s[1] ~= '1' or not exp or tonumber(exp) >= tonumber(now) then
    return false
  end
end
local was_active = 0
if s[1] == '1' then
  was_active = 1
  end_session(stream, sid)
  if s[2] and s[2] ~= '' then
    redis.call('DEL', string.format(token_key, s[2]))
  end
  redis.call('HSET', stream, 'active', '0')
  redis.call('HDEL', stream, """ + _ACTIVE_ONLY_LUA + """)
end
redis.call('ZREM', heartbeats, sid)
redis.call('SREM', active, sid)
local status = s[3]
local errors = tonumber(s[5])
local delay = 0
local counts = not s[6] or s[6] == '' or s[7] == '1'
if mode == 'error' and counts then
  if not s[6] or s[6] == '' or redis.call('SADD', errors_by, s[6]) == 1 then
    errors = errors + 1
    if errors >= tonumber(max_fails) then status = 'STOPPED' end
  end
elseif mode == 'error' then
  local n = redis.call('HINCRBY', stream, 'backoffs', 1)
  delay = math.min(tonumber(base) * 2 ^ math.min(n - 1, 40),
                   tonumber(max_backoff))
elseif mode == 'halt' then
  status = 'STOPPED'
end
redis.call('HSET', stream, 'status', status, 'error_count', errors)
if status ~= 'OK' then
  redis.call('ZREM', queue, sid)
  redis.call('ZREM', backoff, sid)
elseif delay > 0 then
  redis.call('ZADD', queue, -(tonumber(now) + delay), sid)
  redis.call('ZADD', backoff, tonumber(now) + delay, sid)
elseif not redis.call('ZSCORE', backoff, sid) then
  redis.call('ZADD', queue, s[4], sid)
end
return {was_active, status, errors}
""", keys=('stream', 'active', 'queue', 'errors_by', 'backoff') + END_KEYS,
    walks=('token_key',) + END_WALKS,
    args=('sid', 'mode', 'max_fails', 'base', 'max_backoff') + END_ARGS,
    returns=Deactivated)


async def deactivate(app: Any, sid: str, target_id: str, mode: str
                     ) -> Deactivated | None:
    """See _DEACTIVATE; None if nothing was done (unknown stream, or mode
    expire and not expired)."""
    keys = app.keys
    done: Deactivated | None = await _DEACTIVATE(
        app.fastredis, stream=keys.stream(sid), active=keys.active,
        queue=keys.queue(target_id), errors_by=keys.errors_by(sid),
        backoff=keys.backoff, token_key=keys.token.template, sid=sid,
        mode=mode, max_fails=app.config.max_stream_fails,
        base=app.config.error_backoff_in_s,
        max_backoff=app.config.max_error_backoff_in_s,
        **end_values(keys, mode))
    return done


# Streams whose back-off is over are ready again: queued by their
# committed frames (if still OK, inactive and queued), at most `most` a
# call. Walks from the stream id to its hash and its target's queue.
# Returns how many were due.
_REQUEUE_DUE = Script("""
local due = redis.call('ZRANGEBYSCORE', backoff, '-inf', now, 'LIMIT', 0,
                       tonumber(most))
for _, sid in ipairs(due) do
  redis.call('ZREM', backoff, sid)
  local s = redis.call('HMGET', string.format(stream, sid), 'status',
                       'active', 'frames', 'target_id')
  if s[1] == 'OK' and s[2] == '0' and s[4] then
    redis.call('ZADD', string.format(queue, s[4]), 'XX', s[3], sid)
  end
end
return #due
""", keys=('backoff',), walks=('stream', 'queue'), args=('now', 'most'))


async def requeue_due(app: Any, most: int = 1000) -> int:
    """Requeue the streams whose back-off is over (worker 0's pulse)."""
    keys = app.keys
    n: int = await _REQUEUE_DUE(app.fastredis, backoff=keys.backoff,
                                stream=keys.stream.template,
                                queue=keys.queue.template,
                                now=repr(time.time()), most=most)
    return n


# A stopped stream is OK again, its error count and back-off reset;
# queued unless active.
_START = Script("""
local s = redis.call('HMGET', stream, 'active', 'frames', 'status')
if not s[3] then return false end
redis.call('HSET', stream, 'status', 'OK', 'error_count', '0')
redis.call('HDEL', stream, 'backoffs')
redis.call('DEL', errors_by)
redis.call('ZREM', backoff, sid)
if s[1] ~= '1' then redis.call('ZADD', queue, s[2], sid) end
return 1
""", keys=('stream', 'queue', 'errors_by', 'backoff'), args=('sid',))


async def start(app: Any, sid: str, target_id: str) -> bool:
    """False for an unknown stream."""
    keys = app.keys
    return bool(await _START(app.fastredis, stream=keys.stream(sid),
                             queue=keys.queue(target_id),
                             errors_by=keys.errors_by(sid),
                             backoff=keys.backoff, sid=sid))


# Drop one stream from the index; its target's sets too when it was the
# last. An active stream's session ends. Returns how many streams the
# target has left. Walks to the key of the stream's token.
_DROP = Script(END_SESSION + """
local tok = redis.call('HGET', stream, 'token')
if tok and tok ~= '' then
  end_session(stream, sid)
  redis.call('DEL', string.format(token_key, tok))
end
redis.call('DEL', stream, errors_by)
redis.call('SREM', target_streams, sid)
redis.call('ZREM', queue, sid)
redis.call('ZREM', heartbeats, sid)
redis.call('ZREM', backoff, sid)
redis.call('SREM', active, sid)
local left = redis.call('SCARD', target_streams)
if left == 0 then
  redis.call('DEL', target_streams, queue)
  redis.call('SREM', targets, target_id)
end
return left
""", keys=('stream', 'target_streams', 'queue', 'active', 'targets',
           'errors_by', 'backoff') + END_KEYS,
    walks=('token_key',) + END_WALKS, args=('sid', 'target_id') + END_ARGS)


def drop(conn: Any, keys: Keys, sid: str, target_id: str) -> Any:
    """Run _DROP over `conn` (sync: the count; async: an awaitable)."""
    return _DROP(conn, stream=keys.stream(sid),
                 target_streams=keys.target_streams(target_id),
                 queue=keys.queue(target_id), active=keys.active,
                 targets=keys.targets, errors_by=keys.errors_by(sid),
                 backoff=keys.backoff,
                 token_key=keys.token.template, sid=sid,
                 target_id=target_id, **end_values(keys, 'delete'))


async def ended(app: Any, token_hash: str) -> str | None:
    """Why the activation of a core token (by its hash) ended, if it ended
    lately (END_SESSION keeps it): a sessions_common reason, or None."""
    reason: str | None = await app.redis.get(app.keys.ended(token_hash))
    return reason


# The stream of a live token; with `extend` ('' for none) also pushes its
# expiry to that time (never back: GT). Walks from the token to the hash.
_LIVE = Script("""
local sid = redis.call('GET', token_key)
if not sid then return false end
local s = redis.call('HMGET', string.format(stream, sid), 'active', 'token')
if s[1] ~= '1' or s[2] ~= token then return false end
local exp = redis.call('ZSCORE', heartbeats, sid)
if not exp or tonumber(exp) < tonumber(now) then return false end
if extend ~= '' then redis.call('ZADD', heartbeats, 'GT', extend, sid) end
return sid
""", keys=('token_key', 'heartbeats'), walks=('stream',),
    args=('token', 'now', 'extend'))


async def live(app: Any, token_hash: str, now: float,
               extend_to: float | None = None) -> str | None:
    """The stream of a live token (by its hash), or None."""
    keys = app.keys
    sid: str | None = await _LIVE(
        app.fastredis, token_key=keys.token(token_hash),
        heartbeats=keys.heartbeats, stream=keys.stream.template,
        token=token_hash, now=repr(now),
        extend='' if extend_to is None else repr(extend_to))
    return sid or None


class Hold(NamedTuple):
    """What HOLD found: the stream, whether its lock is now the caller's
    and (if so) what a frame or checkpoint needs from its hash."""
    sid: str
    taken: int
    buffer_frames: str = '0'
    error_count: str = '0'
    frames: str = '0'
    sizes: str = ''
    committed_bytes: str = ''


# One round trip for the start of a checkpoint or a stop: the stream of a
# live token, its lock taken, and what the request needs from its hash.
# Nothing else changes: a request refused for its body leaves no trace.
# Returns false (token not live), {sid, 0} (lock busy) or {sid, 1,
# buffer_frames, error_count, frames, sizes, bytes}. Walks from the token
# to the stream's hash and lock.
_HOLD = Script("""
local sid = redis.call('GET', token_key)
if not sid then return false end
local s = redis.call('HMGET', string.format(stream, sid), 'active', 'token',
                     'buffer_frames', 'error_count', 'frames', 'sizes',
                     'bytes')
if s[1] ~= '1' or s[2] ~= token then return false end
local exp = redis.call('ZSCORE', heartbeats, sid)
if not exp or tonumber(exp) < tonumber(now) then return false end
if not redis.call('SET', string.format(lock, sid), holder, 'NX', 'PX',
                  ttl_ms) then
  return {sid, 0}
end
return {sid, 1, s[3] or '0', s[4] or '0', s[5] or '0', s[6] or '',
        s[7] or ''}
""", keys=('token_key', 'heartbeats'), walks=('stream', 'lock'),
    args=('token', 'now', 'holder', 'ttl_ms'), returns=Hold)


async def hold(app: Any, token_hash: str, holder: str, now: float,
               ttl_ms: int) -> Hold | None:
    """Take the lock of a live token's stream; None if the token is not
    live, a Hold (taken 0 if the lock is busy) else."""
    keys = app.keys
    got: Hold | None = await _HOLD(
        app.fastredis, token_key=keys.token(token_hash),
        heartbeats=keys.heartbeats, stream=keys.stream.template,
        lock=keys.stream_lock.template, token=token_hash, now=repr(now),
        holder=holder, ttl_ms=ttl_ms)
    return got or None


class Recorded(NamedTuple):
    """What RECORD_FRAME did: `outcome` ok, gone (the token is not live),
    busy (the stream's lock is held: a checkpoint, a stop, a deletion or
    a dead worker's repair is under way), retry (this body is the frame
    last accepted), cut (the buffer on disk is not what Redis counted) or
    full (the stream's committed and buffered bytes would pass
    `max_bytes`); `sizes`: Redis' count of the buffer for retry and cut;
    `committed_bytes`: the stream's, for full."""
    outcome: str
    sizes: str = ''
    committed_bytes: str = ''


# The one round trip of a frame, run once it is appended to the buffer
# (under the buffer's lock, storage.lock_buffer): if the token is live, the
# stream's lock free (the fence: every other writer of the buffer holds
# it), the body not the frame last accepted, the buffer before the append
# what Redis counted (`before`) and the stream's committed bytes (none
# known: 0, see budgets.py) plus the buffer's with it (`buffered`) within
# `max_bytes`, the frame is counted, its digest and the buffer's sizes with
# it (`after`) kept, and the expiry moves on (never back). Otherwise
# nothing changes and the caller cuts its append back (see Recorded).
_RECORD_FRAME = Script("""
local s = redis.call('HMGET', stream, 'active', 'token', 'digest', 'sizes',
                     'bytes')
if s[1] ~= '1' or s[2] ~= token then return {'gone'} end
local exp = redis.call('ZSCORE', heartbeats, sid)
if not exp or tonumber(exp) < tonumber(now) then return {'gone'} end
if redis.call('EXISTS', lock) == 1 then return {'busy'} end
local sizes = s[4] or ''
if s[3] == digest then return {'retry', sizes} end
if sizes ~= before then return {'cut', sizes} end
if (tonumber(s[5]) or 0) + tonumber(buffered) > tonumber(max_bytes) then
  return {'full', sizes, s[5] or '0'}
end
redis.call('ZADD', heartbeats, 'XX', 'GT', expiry, sid)
redis.call('HINCRBY', stream, 'buffer_frames', frames)
redis.call('HSET', stream, 'digest', digest, 'sizes', after)
return {'ok'}
""", keys=('stream', 'lock', 'heartbeats'),
    args=('token', 'sid', 'now', 'expiry', 'frames', 'digest', 'before',
          'after', 'buffered', 'max_bytes'), returns=Recorded)


async def record_frame(app: Any, token_hash: str, sid: str, frames: int,
                       digest: str, before: dict[str, int],
                       after: dict[str, int], max_bytes: int) -> Recorded:
    """Record a frame appended to the buffer, `before` and `after` its
    sizes on disk (see _RECORD_FRAME)."""
    keys = app.keys
    now = time.time()
    got: Recorded = await _RECORD_FRAME(
        app.fastredis, stream=keys.stream(sid),
        lock=keys.stream_lock(sid), heartbeats=keys.heartbeats,
        token=token_hash, sid=sid, now=repr(now),
        expiry=repr(now + app.config.heartbeat_increment_in_s),
        frames=frames, digest=digest, before=encode_sizes(before),
        after=encode_sizes(after), buffered=sum(after.values()),
        max_bytes=max_bytes)
    return got


# The buffer is a chunk now: if the lock is still this request's, record
# the committed count and bytes and free the stream (1); else change
# nothing (0).
# The error count and the back-off start again (errors_by: who counted in
# it); the new frames count in their minute, for the CC that asked for the
# activation (walks to its per-minute hash).
_COMMIT_DONE = Script("""
if redis.call('GET', lock) ~= holder then return 0 end
local cc = redis.call('HGET', stream, 'session_cc') or ''
redis.call('ZADD', heartbeats, 'XX', 'GT', expiry, sid)
redis.call('HSET', stream, 'frames', committed, 'buffer_frames', '0',
           'digest', '', 'sizes', '', 'error_count', '0', 'bytes', bytes)
redis.call('HDEL', stream, 'backoffs')
if tonumber(new_frames) > 0 then
  redis.call('HINCRBY', string.format(frames_per_minute, cc), minute,
             new_frames)
end
redis.call('DEL', errors_by)
redis.call('DEL', lock)
return 1
""", keys=('stream', 'lock', 'errors_by', 'heartbeats'),
    walks=('frames_per_minute',),
    args=('holder', 'sid', 'expiry', 'committed', 'minute', 'new_frames',
          'bytes'))


class Held:
    """A stream whose lock this request holds (see core.py), with the hash
    fields read when it was taken. `record_commit` records a checkpoint
    and frees the lock in one round trip, if the lock is still ours
    (True)."""

    def __init__(self, app: Any, holder: str, got: Hold) -> None:
        self.app, self.sid, self.holder = app, got.sid, holder
        self.lock = app.keys.stream_lock(got.sid)
        self.buffer_frames = int(got.buffer_frames)
        self.error_count = int(got.error_count)
        self.frames = int(got.frames)
        self.sizes = decode_sizes(got.sizes)
        self.committed_bytes = (int(got.committed_bytes)
                                if got.committed_bytes else None)

    def _common(self) -> dict[str, Any]:
        keys = self.app.keys
        expiry = time.time() + self.app.config.heartbeat_increment_in_s
        return {'stream': keys.stream(self.sid), 'lock': self.lock,
                'heartbeats': keys.heartbeats, 'holder': self.holder,
                'sid': self.sid, 'expiry': repr(expiry)}

    async def record_commit(self, committed: int, new_frames: int,
                            committed_bytes: int) -> bool:
        keys = self.app.keys
        return bool(await _COMMIT_DONE(
            self.app.fastredis, errors_by=keys.errors_by(self.sid),
            frames_per_minute=keys.frames_per_minute.template,
            minute=minute(),
            committed=committed, new_frames=new_frames,
            bytes=committed_bytes, **self._common()))
