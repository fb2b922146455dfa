"""Session stats: records stored once, aggregates kept as they arrive.

Session records come from the workservers (collect.py pulls them; the
protocol is in server/ws/sessions.py). `store` applies a batch in one Lua
step: a record whose session id was seen before is skipped (a WS repeats a
record whose acknowledgement it never got), else it is appended to the
session log and added to its donor's, target's and WS's aggregates. No
read ever scans sessions or streams.

Anonymous sessions count for their target and WS, not for any donor.
`frames_last_24h` of a target counts the frames of its sessions that ended
in the current hour and the 23 before it.
"""
import json
import logging
import time

from server.cc import accounts, keys, reports, stream_map
from server.cc.targets import owns_target
from server.lua import Script
from server.sessions_common import REASONS, SESSION_FIELDS
from server.web import APIError, APIHandler, allow

log = logging.getLogger('siegetank.cc.stats')

SEEN_TTL_S = 7 * 86400       # a repeated record arrives within minutes
SESSION_LOG_MAX = 100000     # records kept in the log (oldest dropped)
TOP_MAX = 1000
_STORE = Script("""
-- Store a batch of session records (JSON list) from the WS `ws`: each
-- new one (seen for seen_ttl_s by its id) goes into the session log (at
-- most log_max long) and its aggregates. Returns how many were new.
local new = 0
for _, r in ipairs(cjson.decode(records)) do
  if redis.call('SET', string.format(session_seen, r.id), '1', 'NX', 'EX',
                seen_ttl_s) then
    new = new + 1
    local frames = r.frames
    local t = string.format(target_stats, r.target_id)
    redis.call('HINCRBY', t, 'frames', frames)
    redis.call('HINCRBY', t, 'sessions', 1)
    redis.call('HINCRBY', t, 'end:' .. r.reason, 1)
    redis.call('HINCRBY', string.format(target_hours, r.target_id),
               tostring(math.floor(r['end'] / 3600)), frames)
    local w = string.format(ws_stats, ws)
    redis.call('HINCRBY', w, 'frames', frames)
    redis.call('HINCRBY', w, 'sessions', 1)
    if r.donor ~= '' then
      local d = string.format(donor_stats, r.donor)
      redis.call('HINCRBY', d, 'frames', frames)
      redis.call('HINCRBY', d, 'sessions', 1)
      local last = tonumber(redis.call('HGET', d, 'last_seen') or '0')
      if r['end'] > last then
        redis.call('HSET', d, 'last_seen', string.format('%.3f', r['end']))
      end
      redis.call('SADD', string.format(donor_targets, r.donor), r.target_id)
      redis.call('SADD', string.format(target_donors, r.target_id), r.donor)
      redis.call('ZINCRBY', donors_by_frames, frames, r.donor)
    end
    redis.call('XADD', sessions, 'MAXLEN', '~', log_max, '*',
               'id', r.id, 'donor', r.donor, 'engine', r.engine,
               'core_version', r.core_version, 'target_id', r.target_id,
               'stream_id', r.stream_id, 'ws', ws,
               'start', string.format('%.3f', r.start),
               'end', string.format('%.3f', r['end']), 'reason', r.reason,
               'frames', frames)
  end
end
return new
""", keys=('donors_by_frames', 'sessions'),
    walks=('session_seen', 'target_stats', 'target_hours', 'ws_stats',
           'donor_stats', 'donor_targets', 'target_donors'),
    args=('ws', 'records', 'seen_ttl_s', 'log_max'))


SESSION_SPAN_S = 30 * 86400  # how far back a reported session may end
CLOCK_SLACK_S = 600          # how far ahead (a WS clock a bit fast)


def clean(record, max_frames, now=None):
    """A session record from a WS with the types the Lua step relies on
    and sane values (frames at most `max_frames`, an end within the last
    SESSION_SPAN_S), or None if it is not one."""
    now = time.time() if now is None else now
    try:
        r = {f: record[f] for f in SESSION_FIELDS}
        for f in ('id', 'engine', 'core_version', 'target_id', 'stream_id'):
            if not isinstance(r[f], str) or len(r[f]) > 200:
                return None
        r['donor'] = r['donor'] or ''
        if not isinstance(r['donor'], str) or r['reason'] not in REASONS:
            return None
        if isinstance(r['frames'], bool) or not isinstance(
                r['frames'], int):
            return None
        r['end'] = float(r['end'])
        r['start'] = float(r['start'] or r['end'])
        if not 0 <= r['frames'] <= max_frames or not r['id'] or not (
                now - SESSION_SPAN_S <= r['start'] <= r['end']
                <= now + CLOCK_SLACK_S):
            return None
        return r
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


async def placed(redis, ws_name, records, max_frames):
    """The records of `ws_name` that are clean and of a stream the CC
    placed there, of its target: a WS credits nobody for anything else."""
    good = [r for r in (clean(x, max_frames) if isinstance(x, dict) else None
                        for x in records) if r is not None]
    where = await stream_map.targets_of(redis, ws_name,
                                        [r['stream_id'] for r in good])
    kept = [r for r in good if where.get(r['stream_id']) == r['target_id']]
    if len(kept) != len(records):
        log.warning('report of %s: %d of %d session records malformed or '
                    'not of a stream placed there, not counted', ws_name,
                    len(records) - len(kept), len(records))
    return kept


async def store(redis, ws_name, records, max_frames):
    """Store a batch of session records from `ws_name` (only those of
    `placed`); returns how many were new (the rest had been stored
    before)."""
    good = await placed(redis, ws_name, records, max_frames)
    if not good:
        return 0
    return await _STORE(
        redis, donors_by_frames=keys.DONORS_BY_FRAMES, sessions=keys.SESSIONS,
        session_seen=keys.session_seen.template,
        target_stats=keys.target_stats.template,
        target_hours=keys.target_hours.template,
        ws_stats=keys.ws_stats.template,
        donor_stats=keys.donor_stats.template,
        donor_targets=keys.donor_targets.template,
        target_donors=keys.target_donors.template, ws=ws_name,
        records=json.dumps(good), seen_ttl_s=SEEN_TTL_S,
        log_max=SESSION_LOG_MAX)


async def donor(redis, username):
    """{frames, sessions, last_seen, targets} (targets: how many targets
    the donor worked on), None for an unknown donor."""
    pipe = redis.pipeline(transaction=False)
    pipe.exists(keys.donor(username))
    pipe.hgetall(keys.donor_stats(username))
    pipe.scard(keys.donor_targets(username))
    exists, h, ntargets = await pipe.execute()
    if not exists:
        return None
    return {'frames': int(h.get('frames', 0)),
            'sessions': int(h.get('sessions', 0)),
            'last_seen': float(h['last_seen']) if h.get('last_seen')
            else None, 'targets': ntargets}


async def top_donors(redis, n):
    rows = await redis.zrevrange(keys.DONORS_BY_FRAMES, 0, n - 1,
                                 withscores=True)
    pipe = redis.pipeline(transaction=False)
    for name, _ in rows:
        pipe.hget(keys.donor_stats(name), 'sessions')
    sessions = await pipe.execute() if rows else []
    return [{'username': name, 'frames': int(frames),
             'sessions': int(s or 0)}
            for (name, frames), s in zip(rows, sessions, strict=True)]


async def target(redis, target_id, active_cores):
    """{frames, sessions, active_cores, donors, frames_last_24h,
    by_end_reason} (donors: how many donors worked on it)."""
    hour = int(time.time() // 3600)
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.target_stats(target_id))
    pipe.scard(keys.target_donors(target_id))
    pipe.hmget(keys.target_hours(target_id),
               [str(h) for h in range(hour - 23, hour + 1)])
    h, ndonors, hours = await pipe.execute()
    return {'frames': int(h.get('frames', 0)),
            'sessions': int(h.get('sessions', 0)),
            'active_cores': active_cores, 'donors': ndonors,
            'frames_last_24h': sum(int(x) for x in hours if x),
            'by_end_reason': {k[4:]: int(v) for k, v in h.items()
                              if k.startswith('end:')}}


async def active_cores(redis, target_id):
    """Cores on the target now, from the last report of every WS."""
    names = sorted(await redis.smembers(keys.WORKSERVERS))
    pipe = redis.pipeline(transaction=False)
    for name in names:
        reports.read(pipe, name)
    return sum(reports.Report.from_hash(h).targets.get(
        target_id, {}).get('active', 0)
        for h in (await pipe.execute() if names else []))


class DonorStatsHandler(APIHandler):
    @allow('anyone')
    async def get(self, username: str) -> None:
        if not accounts.USERNAME.fullmatch(username):
            raise APIError(400, 'bad username %r' % username)
        found = await donor(self.redis, username)
        if found is None:
            raise APIError(404, 'no such donor %s' % username)
        self.write_json(found)


class TopDonorsHandler(APIHandler):
    @allow('anyone')
    async def get(self) -> None:
        raw = self.get_query_argument('top', '10')
        if not raw.isdigit() or not 1 <= int(raw) <= TOP_MAX:
            raise APIError(400, 'top must be an integer from 1 to %d'
                           % TOP_MAX)
        self.write_json({'donors': await top_donors(self.redis, int(raw))})


class TargetStatsHandler(APIHandler):
    @allow('manager', owner=owns_target)
    async def get(self, target_id: str) -> None:
        self.write_json(await target(
            self.redis, target_id, await active_cores(self.redis, target_id)))


default_handlers = [
    (r'/donors/stats/([^/]+)', DonorStatsHandler),
    (r'/stats/donors', TopDonorsHandler),
    (r'/targets/stats/([^/]+)', TargetStatsHandler),
]
