"""What the command center pulls from the workserver: its ended sessions
and counts (`GET /stats/report`), and the acknowledgement of the sessions
it stored (`PUT /stats/ack`). See sessions.py for the protocol."""
import re
import time

from server.sessions_common import SESSION_FIELDS
from server.web import APIError, allow
from server.ws import sessions
from server.ws.cc_api import CCHandler

REPORT_MAX = 500   # records per report; the CC asks again when full
ENTRY = re.compile(r'(\d{1,20})-(\d{1,20})')


def is_entry(e):
    """A Redis stream entry id: two unsigned 64-bit numbers (Redis refuses
    any other in XDEL, which would be a 500)."""
    m = ENTRY.fullmatch(e) if isinstance(e, str) else None
    return m is not None and all(int(n) < 2 ** 64 for n in m.groups())


def _record(entry_id, fields):
    """A session record as the CC reads it (cc/stats.py): SESSION_FIELDS
    and the outbox entry to acknowledge, nothing else of the entry."""
    rec = {f: fields.get(f) for f in SESSION_FIELDS}
    rec['entry'] = entry_id
    rec['frames'] = int(rec.get('frames', 0))
    for t in ('start', 'end'):
        rec[t] = float(rec[t]) if rec.get(t) else None
    rec['donor'] = rec.get('donor') or None
    return rec


class ReportHandler(CCHandler):
    """GET /stats/report: the calling CC's ended sessions (oldest first,
    at most REPORT_MAX) and its counts on this WS (its targets' streams,
    its activations' frames and errors per minute): never another CC's."""

    @allow('cc')
    async def get(self):
        app = self.application
        name = self.cc
        entries = await app.redis.xrange(app.keys.outbox(name),
                                         count=REPORT_MAX)
        totals, targets = await sessions.summary(app, name)
        self.write_json({
            'sessions': [_record(e, f) for e, f in entries],
            'streams': totals, 'targets': targets,
            'disk_free_mb': round(app.storage.free_mb(), 1),
            'per_minute': await sessions.per_minute(app, name),
            'time': time.time()})


class AckHandler(CCHandler):
    """PUT /stats/ack {entries: [...]}: the CC stored these records."""

    @allow('cc')
    async def put(self):
        entries = self.field('entries', list, check=lambda e: len(e) <= 10000)
        if not all(is_entry(e) for e in entries):
            raise APIError(400, 'entries must be stream entry ids')
        name = self.cc
        if entries:
            await self.redis.xdel(self.application.keys.outbox(name),
                                  *entries)
        self.write_json({})


default_handlers = [
    (r'/stats/report', ReportHandler),
    (r'/stats/ack', AckHandler),
]
