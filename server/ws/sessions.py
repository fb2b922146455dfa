"""Sessions and counts of the workserver, for the command center's stats.

A session is one activation of a stream. It starts in the activation
script (streams._ACTIVATE stores its id, the CC that asked, donor, engine,
core version, start time and the committed frames at start in the stream's
hash) and ends in the same Lua step that ends the activation (a core's
stop or error, an expiry, a manager's stop, a deletion) or, for streams
that were active when the WS went down, in the rebuild on start
(reason `ws_restart`). Ending appends one record to an outbox, a Redis
stream per CC kept outside the index (keys.Keys.outbox), in that same
step: a session is recorded exactly when its activation ends, never twice
for one activation, and a crash cannot lose it (AOF).

The CC pulls its outbox with `GET /stats/report` (report.py; it also
carries the counts below) and acknowledges what it stored with
`PUT /stats/ack`; only then are the entries deleted. The CC stores a
record at most once by its session id, so a reply lost before the ack, or
a rebuild that ran twice, repeats a record harmlessly. Frames of a
session = committed frames at its end minus those at its start: exactly
what its checkpoints committed.
"""
import time

MINUTES_KEPT = 120

# Lua: end the session of an active stream. ARGV from index b on: now,
# outbox key template (%s: the CC), target-active key, errors-per-minute
# key, minute, reason[, committed frames now (else the hash's)].
END_SESSION_LUA = """
local function end_session(key, sid, b)
  local s = redis.call('HMGET', key, 'session', 'session_cc', 'donor',
                       'engine', 'core_version', 'start_time', 'frames0',
                       'frames', 'target_id')
  if s[9] and redis.call('HINCRBY', ARGV[b + 2], s[9], -1) <= 0 then
    redis.call('HDEL', ARGV[b + 2], s[9])
  end
  if ARGV[b + 5] == 'error' then
    redis.call('HINCRBY', ARGV[b + 3], ARGV[b + 4], 1)
  end
  if not s[1] or s[1] == '' then return end
  local committed = tonumber(ARGV[b + 6] or '') or tonumber(s[8]) or 0
  local frames = committed - (tonumber(s[7]) or 0)
  if frames < 0 then frames = 0 end
  redis.call('XADD', string.format(ARGV[b + 1], s[2]), '*', 'id', s[1],
             'donor', s[3] or '', 'engine', s[4] or '',
             'core_version', s[5] or '', 'target_id', s[9] or '',
             'stream_id', sid, 'start', s[6] or '', 'end', ARGV[b],
             'reason', ARGV[b + 5], 'frames', frames)
end
"""

# Hash fields of an active stream that belong to its session.
SESSION_FIELDS = ('session', 'cc', 'engine', 'core_version', 'frames0')

REASONS = {'stop': 'stop', 'error': 'error', 'expire': 'expiry',
           'halt': 'manager_stop', 'delete': 'deletion',
           'restart': 'ws_restart'}


def minute(t=None):
    return int((time.time() if t is None else t) // 60)


def end_args(keys, mode, now=None):
    """The ARGV tail END_SESSION_LUA reads, for an end by `mode`."""
    now = time.time() if now is None else now
    return [repr(now), keys.outbox.template, keys.target_active,
            keys.errors_per_minute, minute(now), REASONS[mode]]


def end_on_restart(redis, keys, sid, frames):
    """The rebuild's end of a session that was live when the WS went down
    (sync client; `frames`: committed frames on disk)."""
    redis.eval(END_SESSION_LUA + 'end_session(KEYS[1], ARGV[1], 2)', 1,
               keys.stream(sid), sid,
               *end_args(keys, 'restart'), frames)


async def summary(app):
    """Counts by state and per target from the index's sets (one round
    trip per target set, never a scan of the streams)."""
    keys, redis = app.keys, app.redis
    tids = sorted(await redis.smembers(keys.targets))
    pipe = redis.pipeline(transaction=False)
    for tid in tids:
        pipe.scard(keys.target_streams(tid))
        pipe.zcard(keys.queue(tid))
    pipe.hgetall(keys.target_active)
    replies = await pipe.execute()
    active = replies.pop()
    targets, totals = {}, {'ok': 0, 'active': 0, 'stopped': 0}
    for i, tid in enumerate(tids):
        total, queued = replies[2 * i], replies[2 * i + 1]
        act = min(max(int(active.get(tid, 0)), 0), total - queued)
        targets[tid] = {'queued': queued, 'active': act,
                        'stopped': total - queued - act}
        totals['ok'] += queued
        totals['active'] += act
        totals['stopped'] += total - queued - act
    return totals, targets


async def per_minute(app):
    """{minute: {frames, errors}} of the last MINUTES_KEPT minutes (older
    counts are dropped here)."""
    keys, redis = app.keys, app.redis
    frames = await redis.hgetall(keys.frames_per_minute)
    errors = await redis.hgetall(keys.errors_per_minute)
    oldest = minute() - MINUTES_KEPT
    old = [m for m in set(frames) | set(errors) if int(m) < oldest]
    if old:
        await redis.hdel(keys.frames_per_minute, *old)
        await redis.hdel(keys.errors_per_minute, *old)
    return {m: {'frames': int(frames.get(m, 0)),
                'errors': int(errors.get(m, 0))}
            for m in set(frames) | set(errors) if int(m) >= oldest}
