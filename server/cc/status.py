"""GET /status: the fleet at a glance, from counters only.

Per WS, its last report (collect.py): online, draining, last seen, streams
by state (`active` also on its own: a drained WS is empty at 0), disk
free. Totals are the sums of those; cores_active = active streams.
Per minute: assignments and no-work 503s counted by the CC as they happen
(a Redis hash of minute -> count per figure), frames committed
and error stops from the WS reports. `per_minute` holds the last complete
minute; `history` the last 60 minutes (the last one still running) for the
dashboard's chart. `targets`: queue depth, active cores and description
per public target (and its owner, for an admin). An admin also gets
`detail` per WS. Cost: one round trip for everything, independent of how
many streams there are, and one more for the public targets' labels.
"""
import collections
import logging
import time
from typing import Any

from server import store
from server.cc import keys, reports, workservers
from server.cc import targets as target_records
from server.sessions_common import MINUTES_KEPT, minute
from server.web import APIHandler, allow

log = logging.getLogger('siegetank.cc.status')

HISTORY = 60
COUNTED = ('assignments', 'no_work')

FLUSH_MS = 1000  # how often a worker adds its counts to the store


def count(app, what):
    """One more `what` (of COUNTED) in this minute: counted in this
    process, added to the store by `flush` within FLUSH_MS (a round trip
    per assignment was a tenth of the CC's CPU on that path; a worker that
    dies loses at most its last second of counts)."""
    app.counted[(what, minute())] += 1


async def flush(app):
    """Add this process's counts to the per-minute hashes, one round trip;
    kept for the next flush while the store is down."""
    counted, app.counted = app.counted, collections.Counter()
    if not counted:
        return
    pipe = app.redis.pipeline(transaction=False)
    for (what, m), n in counted.items():
        pipe.hincrby(keys.per_minute(what), m, n)
    try:
        await pipe.execute()
    except store.DOWN as e:
        app.counted.update(counted)
        log.warning('redis down, per-minute counts kept for later: %s', e)


async def forget_old_minutes(redis):
    """Drop counts older than MINUTES_KEPT (run by the periodic collect)."""
    oldest = minute() - MINUTES_KEPT
    for what in COUNTED:
        old = [m for m in await redis.hkeys(keys.per_minute(what))
               if int(m) < oldest]
        if old:
            await redis.hdel(keys.per_minute(what), *old)


def _int_or_zero(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


async def status(redis, admin=False):
    now = minute()
    minutes = list(range(now - HISTORY + 1, now + 1))
    names = sorted(await redis.smembers(keys.WORKSERVERS))
    pipe = redis.pipeline(transaction=False)
    for name in names:
        workservers.read(pipe, name)
        reports.read(pipe, name)
        pipe.hgetall(keys.ws_stats(name))
    for what in COUNTED:
        pipe.hmget(keys.per_minute(what), minutes)
    pipe.smembers(keys.stage_targets('public'))
    replies = await pipe.execute()
    public = replies.pop()
    history: dict = {'start': minutes[0] * 60,
               'frames': [0] * HISTORY, 'errors': [0] * HISTORY}
    for what, counts in zip(COUNTED, replies[3 * len(names):], strict=True):
        history[what] = [_int_or_zero(c) for c in counts]
    totals = {'ok': 0, 'active': 0, 'stopped': 0}
    targets = {tid: {'queued': 0, 'active': 0} for tid in public}
    by_name = {}
    for i, name in enumerate(names):
        record, rep, recorded = replies[3 * i:3 * i + 3]
        if not record:
            continue
        ws = workservers.Workserver.from_hash(name, record)
        rep = reports.Report.from_hash(rep)
        streams, per_minute = rep.streams, rep.per_minute
        for state in totals:
            totals[state] += streams.get(state, 0)
        for tid, c in rep.targets.items():
            if tid in targets:
                targets[tid]['queued'] += c.get('queued', 0)
                targets[tid]['active'] += c.get('active', 0)
        frames = errors = 0
        for j, m in enumerate(minutes):
            c = per_minute.get(str(m), {})
            history['frames'][j] += c.get('frames', 0)
            history['errors'][j] += c.get('errors', 0)
            frames += c.get('frames', 0)
            errors += c.get('errors', 0)
        entry: dict[str, Any] = {'online': ws.online,
                 'draining': ws.draining,
                 'active': streams.get('active', 0),
                 'last_seen': rep.time,
                 'streams': {s: streams.get(s, 0) for s in totals},
                 'disk_free_mb': rep.disk_free_mb}
        if admin:
            entry['detail'] = {
                'url': ws.url, 'http_port': ws.http_port or None,
                'fails': ws.fails,
                'frames_last_hour': frames, 'errors_last_hour': errors,
                'sessions_recorded': _int_or_zero(recorded.get('sessions')),
                'frames_recorded': _int_or_zero(recorded.get('frames'))}
        by_name[name] = entry
    await _label(redis, targets, admin)
    return {
        'workservers': by_name,
        'streams': {'total': sum(totals.values()), 'active': totals['active'],
                    'idle': totals['ok'], 'stopped': totals['stopped']},
        'cores_active': totals['active'],
        'per_minute': {k: history[k][-2] for k in
                       ('assignments', 'no_work', 'frames', 'errors')},
        'history': history, 'targets': targets, 'time': time.time()}


async def _label(redis, targets, admin):
    """Add each target's description (and owner, for an admin)."""
    if not targets:
        return
    pipe = redis.pipeline(transaction=False)
    for tid in targets:
        target_records.read_label(pipe, tid)
    for tid, (description, owner) in zip(targets, await pipe.execute(),
                                         strict=True):
        targets[tid]['description'] = description or ''
        if admin:
            targets[tid]['owner'] = owner or ''


class StatusHandler(APIHandler):
    @allow('manager', 'anyone')
    async def get(self) -> None:
        m = self.caller
        self.write_json(await status(self.redis, m is not None
                                     and m.is_admin))


default_handlers = [
    (r'/status', StatusHandler),
]
