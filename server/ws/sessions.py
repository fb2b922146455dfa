"""Sessions and counts of the workserver, for the command center's stats.

A session is one activation of a stream. It starts in the activation
script (stream_record.py stores its id, the CC that asked, donor, engine,
core version, start time and the committed frames at start in the
stream's hash) and ends in the same Lua step that ends the activation
(stream_record.END_SESSION: a core's stop or error, an expiry, a
manager's stop, a deletion) or, for streams
that were active when the WS went down, in the rebuild on start
(reason `ws_restart`). Ending appends one record to an outbox, a Redis
stream per CC kept outside the index (keys.Keys.outbox), in that same
step: a session is recorded exactly when its activation ends, never twice
for one activation, and a crash cannot lose it (AOF).

The CC pulls its outbox with `GET /stats/report` (report.py; it also
carries the counts below, each CC's own: the targets it made, the frames
and error stops of the activations it asked for) and acknowledges what it
stored with `PUT /stats/ack`; only then are the entries deleted. The CC
stores a record at most once by its session id, so a reply lost before the
ack, or a rebuild that ran twice, repeats a record harmlessly. Frames of a
session = committed frames at its end minus those at its start: exactly
what its checkpoints committed.
"""
from typing import Any

from server.sessions_common import MINUTES_KEPT, minute
from server.ws import stream_record, target_record


async def summary(app: Any, cc: str | None = None
                  ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Counts by state, in total and per target (target_record.counts):
    of the targets `cc` made, if given (records before owners were kept
    count for every CC), else of all."""
    targets: dict[str, dict[str, int]] = {}
    totals = {'ok': 0, 'active': 0, 'stopped': 0}
    counts = await target_record.counts(app)
    if cc is not None:
        counts = await _owned(app, counts, cc)
    for tid, c in counts.items():
        targets[tid] = c._asdict()
        totals['ok'] += c.queued
        totals['active'] += c.active
        totals['stopped'] += c.stopped
    return totals, targets


async def _owned(app: Any, counts: dict[str, Any], cc: str
                 ) -> dict[str, Any]:
    """Those of `counts` (by target) whose target `cc` made: a target's
    owner is its streams' (one asked per target)."""
    tids = list(counts)
    sids = await target_record.one_stream_each(app, tids)
    owners = await stream_record.owners(app, [s for s in sids if s])
    it = iter(owners)
    return {tid: counts[tid] for tid, sid in zip(tids, sids, strict=True)
            if sid and not stream_record.foreign(next(it), cc)}


async def per_minute(app: Any, cc: str) -> dict[str, dict[str, int]]:
    """{minute: {frames, errors}} of the activations `cc` asked for, of
    the last MINUTES_KEPT minutes (older counts are dropped here)."""
    keys, redis = app.keys, app.redis
    frames = await redis.hgetall(keys.frames_per_minute(cc))
    errors = await redis.hgetall(keys.errors_per_minute(cc))
    oldest = minute() - MINUTES_KEPT
    old = [m for m in set(frames) | set(errors) if int(m) < oldest]
    if old:
        await redis.hdel(keys.frames_per_minute(cc), *old)
        await redis.hdel(keys.errors_per_minute(cc), *old)
    return {m: {'frames': int(frames.get(m, 0)),
                'errors': int(errors.get(m, 0))}
            for m in set(frames) | set(errors) if int(m) >= oldest}
