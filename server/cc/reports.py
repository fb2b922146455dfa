"""The record `ws:<name>:report`: each WS's last report as the periodic
pull (collect.py) keeps it, for /status and the metrics."""
import json
import time
from dataclasses import dataclass, field
from typing import Any

from server.cc import keys


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
        return cls(time=float(h['time']) if h.get('time') else None,
                   disk_free_mb=float(h['disk_free_mb'])
                   if h.get('disk_free_mb') else None,
                   **{f: json.loads(h.get(f) or '{}')
                      for f in ('streams', 'targets', 'per_minute')})


def read(pipe: Any, name: str) -> None:
    """Queue the read of a WS's last report on `pipe`; its reply goes to
    `Report.from_hash`."""
    pipe.hgetall(keys.ws_report(name))


async def keep(redis: Any, name: str, body: dict[str, Any]) -> None:
    """Keep the counts of a report as the WS's last one."""
    await redis.hset(keys.ws_report(name), mapping={
        'time': repr(time.time()),
        'disk_free_mb': float(body.get('disk_free_mb', 0)),
        'streams': json.dumps(body.get('streams', {})),
        'targets': json.dumps(body.get('targets', {})),
        'per_minute': json.dumps(body.get('per_minute', {}))})
