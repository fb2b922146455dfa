"""The CC's pull of every online workserver's report (worker 0, every
`stats_interval_in_ms`): its ended sessions, stored by stats.store and then
acknowledged (the WS deletes only acknowledged records, so a CC that dies
between the two gets them again and stores them once, by session id),
their clients' holds given back (assign.py), and
its counts (streams by state and per target, disk free, frames and error
stops per minute), kept as the WS's last report for /status.
"""
import logging
from typing import Any

from server import peer
from server.cc import assign, reports, stats, status, workservers

log = logging.getLogger('siegetank.cc.collect')

ROUNDS_MAX = 20   # reports per WS and pull while its outbox stays full


async def pull(app: Any, name: str) -> int:
    """Sessions and counts of one WS; returns how many new sessions."""
    new = 0
    for _ in range(ROUNDS_MAX):
        reply = await workservers.request(app, name, 'GET', '/stats/report')
        if reply.code != 200 or not isinstance(reply.body, dict):
            log.warning('report of %s: %d %s', name, reply.code, reply.error)
            return new
        await reports.keep(app.redis, name, reply.body)
        sessions = reply.body.get('sessions')
        if not sessions or not isinstance(sessions, list):
            return new
        new += await stats.store(app.redis, name, sessions,
                                 app.config.max_frames_per_session)
        await assign.release(app.redis, [s.get('id') for s in sessions
                                         if isinstance(s, dict)])
        entries = [s.get('entry') for s in sessions if isinstance(s, dict)]
        ack = await workservers.request(app, name, 'PUT', '/stats/ack', {
            'entries': entries})
        if ack.code != 200:
            log.warning('ack to %s: %d %s', name, ack.code, ack.error)
            return new
    return new


async def collect_all(app: Any) -> None:
    await status.forget_old_minutes(app.redis)
    for name in await workservers.online(app):
        try:
            await pull(app, name)
        except peer.PeerError as e:
            log.info('report of %s failed: %s', name, e)
        except Exception:
            log.exception('report of %s failed', name)
