"""The record `ws:<name>:report`: each WS's last report as the periodic
pull (collect.py) keeps it, for /status and the metrics.

A WS is not trusted with the CC's books: `keep` stores only what a report
can honestly say, whatever it holds (a WS with the `cc_pass` may be rogue
or broken): counts are non-negative integers; targets are those the CC
placed streams of on that WS, each counting at most the streams the CC
placed there; the totals are the sums of those (never another CC's
streams); minutes are the kept ones, each with at most FRAMES_PER_SECOND
frames and error stops a second for each of those streams. What is
dropped is logged.
"""
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from server.cc import keys, stream_map
from server.sessions_common import MINUTES_KEPT, minute
from server.web import TARGET_ID

log = logging.getLogger('siegetank.cc.reports')

TARGETS_MAX = 10000     # targets read of one report
STATES = ('active', 'queued', 'stopped')  # per target, as the WS counts
FRAMES_PER_SECOND = 1   # per stream, the most a minute's counts may say


@dataclass(frozen=True)
class Report:
    """The record `ws:<name>:report`: a WS's last report, as /status and
    the metrics read it."""

    time: float | None = None  # when it came (unix)
    disk_free_mb: float | None = None
    streams: dict[str, int] = field(default_factory=dict)  # by state
    targets: dict[str, dict[str, int]] = field(default_factory=dict)
    per_minute: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> 'Report':
        def number(name):
            try:
                return float(h[name]) if h.get(name) else None
            except ValueError:
                return None

        def mapping(name):
            try:
                value = json.loads(h.get(name) or '{}')
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}

        return cls(time=number('time'), disk_free_mb=number('disk_free_mb'),
                   **{f: mapping(f)
                      for f in ('streams', 'targets', 'per_minute')})


def read(pipe: Any, name: str) -> None:
    """Queue the read of a WS's last report on `pipe`; its reply goes to
    `Report.from_hash`."""
    pipe.hgetall(keys.ws_report(name))


def _count(value: Any) -> int:
    """A non-negative integer count, else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def _disk(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _targets(said: Any, placed: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per target the CC placed there, its counts, at most its streams."""
    found = {}
    for tid, most in placed.items():
        counts = said[tid] if isinstance(said[tid], dict) else {}
        kept = {}
        for state in STATES:
            kept[state] = min(_count(counts.get(state)), most)
            most -= kept[state]
        found[tid] = kept
    return found


def _per_minute(said: Any, streams: int) -> dict[str, dict[str, int]]:
    """The kept minutes, each count at most FRAMES_PER_SECOND a second for
    each of the WS's streams of this CC."""
    if not isinstance(said, dict):
        return {}
    most = streams * 60 * FRAMES_PER_SECOND
    now = minute()
    found = {}
    for m, counts in said.items():
        if not (isinstance(m, str) and m.isdigit() and len(m) < 12
                and now - MINUTES_KEPT <= int(m) <= now
                and isinstance(counts, dict)):
            continue
        found[str(int(m))] = {k: min(_count(counts.get(k)), most)
                              for k in ('frames', 'errors')}
    return found


async def checked(redis: Any, name: str, body: dict[str, Any]) -> Report:
    """What the report of WS `name` may honestly say (module docstring)."""
    said = body.get('targets')
    said = said if isinstance(said, dict) else {}
    tids = [t for t in said if isinstance(t, str)
            and TARGET_ID.fullmatch(t)][:TARGETS_MAX]
    placed = await stream_map.counts_on(redis, name, tids)
    if len(placed) != len(said):
        log.warning('report of %s: %d of %d targets not placed there by this '
                    'CC, not counted', name, len(said) - len(placed),
                    len(said))
    targets = _targets(said, placed)
    streams = {'ok': sum(c['queued'] for c in targets.values()),
               'active': sum(c['active'] for c in targets.values()),
               'stopped': sum(c['stopped'] for c in targets.values())}
    return Report(time=time.time(), disk_free_mb=_disk(
        body.get('disk_free_mb')), streams=streams, targets=targets,
        per_minute=_per_minute(body.get('per_minute'), sum(placed.values())))


async def keep(redis: Any, name: str, body: dict[str, Any]) -> Report:
    """Keep what a report may honestly say as the WS's last one."""
    rep = await checked(redis, name, body)
    await redis.hset(keys.ws_report(name), mapping={
        'time': repr(rep.time),
        'disk_free_mb': '' if rep.disk_free_mb is None
        else repr(rep.disk_free_mb),
        'streams': json.dumps(rep.streams),
        'targets': json.dumps(rep.targets),
        'per_minute': json.dumps(rep.per_minute)})
    return rep
