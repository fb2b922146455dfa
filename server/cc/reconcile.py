"""Keeping the CC's map of streams and the workservers' streams the same.

- Creation is idempotent: the CC names each creation (`creation_id`, the
  uuid of the stream id) and sends it again when no reply came; a creation
  it gives up on (still no reply, or a failure) is *abandoned*: recorded
  per WS and deleted there when the WS answers again, so no stream the CC
  does not know survives a lost reply.
- The reconciliation (a periodic job run once across CC processes)
  compares each online WS's streams with the CC's map and repairs the
  difference: an abandoned stream found on a WS is deleted; a stream on a
  WS that the CC lost (older than the placement grace, of a target the CC
  knows) is adopted; a stream the CC knows that its WS confirms unknown
  (404) is forgotten; a WS stream of a target the CC does not know is only
  reported (the WS disk is the truth for its data; an operator decides).
  Each repair is logged and counted in `reconcile:stats`.
"""
import logging
import time
from typing import Any

from server import peer
from server.cc import keys, stream_map, workservers
from server.cc.stream_map import StreamRecord
from server.web import STREAM_ID

log = logging.getLogger('siegetank.cc.reconcile')


# An abandoned creation the WS still does not have after this long was
# never made (a creation on a WS takes seconds at most).
ABANDONED_KEPT_S = 600


async def abandon(redis: Any, ws: str, creation_id: str) -> None:
    sid = '%s:%s' % (creation_id, ws)
    await redis.zadd(keys.ws_abandoned(ws), {sid: time.time()})
    log.warning('creation of stream %s abandoned (no answer); it is '
                'deleted on %s if it was made', sid, ws)


async def _count(app: Any, what: str, n: int = 1) -> None:
    await app.redis.hincrby(keys.RECONCILE_STATS, what, n)


async def _delete_abandoned(app: Any, ws: str, sid: str,
                            since: float) -> None:
    """Delete it on the WS if it is there. A 404 keeps the entry a while:
    the creation may still be under way there."""
    try:
        reply = await workservers.request(app, ws, 'PUT',
                                          '/streams/delete/%s' % sid)
    except peer.PeerError:
        return
    if reply.code == 404 and since < time.time() - ABANDONED_KEPT_S:
        await app.redis.zrem(keys.ws_abandoned(ws), sid)
    elif reply.code == 200:
        await app.redis.zrem(keys.ws_abandoned(ws), sid)
        log.warning('abandoned stream %s deleted on %s', sid, ws)
        await _count(app, 'abandoned_deleted')


async def flush_abandoned(app: Any, ws: str) -> None:
    """Delete on `ws` the streams whose creation was abandoned."""
    for sid, since in await app.redis.zrange(keys.ws_abandoned(ws), 0, -1,
                                             withscores=True):
        await _delete_abandoned(app, ws, sid, since)


async def _adopt(app: Any, ws: str, sid: str) -> None:
    try:
        reply = await workservers.request(app, ws, 'GET',
                                          '/streams/info/%s' % sid)
    except peer.PeerError:
        return
    if reply.code != 200 or not isinstance(reply.body, dict):
        return
    tid = reply.body.get('target_id')
    if not isinstance(tid, str):
        return
    done = await stream_map.adopt(app, sid, tid, ws)
    if done == stream_map.ADOPTED:
        log.warning('stream %s of target %s on %s was unknown to the CC: '
                    'adopted', sid, tid, ws)
        await _count(app, 'adopted')
    elif done == stream_map.NO_TARGET:
        log.error('stream %s on %s belongs to target %s, unknown to the CC:'
                  ' left alone (delete it on the WS if it is garbage)',
                  sid, ws, tid)
        await _count(app, 'unknown_target')


async def _forget_lost(app: Any, ws: str, sid: str,
                       record: StreamRecord) -> None:
    try:
        reply = await workservers.request(app, ws, 'GET',
                                          '/streams/info/%s' % sid)
    except peer.PeerError:
        return
    if reply.code == 404:
        await stream_map.forget(app, record)
        log.error('stream %s is gone from %s: forgotten by the CC', sid, ws)
        await _count(app, 'forgotten')


def listed(ws: str, streams: Any) -> dict[str, float]:
    """{stream id: creation time} of a WS's `GET /streams`, without what
    no stream of that WS can be (a malformed id, another WS's, a time that
    is not a number): a rogue WS cannot get those adopted."""
    if not isinstance(streams, dict):
        return {}
    kept = {sid: t for sid, t in streams.items()
            if STREAM_ID.fullmatch(sid) and sid.endswith(':' + ws)
            and isinstance(t, (int, float)) and not isinstance(t, bool)}
    if len(kept) != len(streams):
        log.warning('%s listed %d malformed or foreign stream(s): ignored',
                    ws, len(streams) - len(kept))
    return kept


async def reconcile_ws(app: Any, ws: str) -> None:
    """Compare one WS's streams with the CC's map and repair."""
    try:
        reply = await workservers.request(app, ws, 'GET', '/streams')
    except peer.PeerError as e:
        log.info('reconciliation of %s skipped: %s', ws, e)
        return
    if reply.code != 200 or not isinstance(reply.body, dict):
        log.info('reconciliation of %s skipped: %d', ws, reply.code)
        return
    on_ws = listed(ws, reply.body.get('streams'))
    # Read after the WS's list: a stream placed meanwhile is in both or
    # in ours only (then confirmed with the WS before it is forgotten).
    known = await stream_map.on_ws(app.redis, ws)
    abandoned = dict(await app.redis.zrange(keys.ws_abandoned(ws), 0, -1,
                                            withscores=True))
    grace = time.time() - 3 * app.config.ws_timeout_in_s
    for sid in sorted(set(on_ws) - set(known)):
        if sid in abandoned:
            await _delete_abandoned(app, ws, sid, abandoned[sid])
        elif on_ws[sid] < grace:  # not a placement still in flight
            await _adopt(app, ws, sid)
    for sid in sorted(set(known) - set(on_ws)):
        await _forget_lost(app, ws, sid, known[sid])


async def reconcile(app: Any) -> None:
    """Every online WS, one after the other."""
    for ws in await workservers.online(app):
        await reconcile_ws(app, ws)
