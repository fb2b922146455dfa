"""A lease in Redis: at most one process across every host holds it, so
periodic jobs that several CC hosts could run (WS probes, deletion
replays) run once.

The holder writes its id with `SET NX PX` and renews it every third of the
lease; it counts itself holder only until one lease after the start of its
last successful renewal, which is before Redis lets the key expire, so two
holders never overlap (short of a process frozen for longer than a lease).
A holder that dies stops renewing: another takes the lease once the key
expires, within one lease and one renewal period. A clean stop releases it
at once. While nobody holds it, the jobs do not run (see docs/deployment.md).
"""
import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Any

import redis.exceptions

from server import processes
from server.lua import Script

log = logging.getLogger('siegetank.lease')

_TAKE = Script("""
-- Take the lease if free, or renew it if ours (id: ours). Returns 1 if we
-- hold it now.
if redis.call('SET', lease, id, 'NX', 'PX', ttl_ms) then return 1 end
if redis.call('GET', lease) == id then
  redis.call('PEXPIRE', lease, ttl_ms)
  return 1
end
return 0
""", keys=('lease',), args=('id', 'ttl_ms'))

_RELEASE = Script("""
-- Give the lease up if it is still ours.
if redis.call('GET', lease) == id then
  return redis.call('DEL', lease)
end
return 0
""", keys=('lease',), args=('id',))


class Lease:
    def __init__(self, redis: Any, key: str, ttl_ms: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.id = '%s:%d:%s' % (socket.gethostname(), os.getpid(),
                                secrets.token_hex(4))
        self.until = 0.0      # monotonic time our hold ends
        self.task: asyncio.Future[None] | None = None

    @property
    def held(self) -> bool:
        return time.monotonic() < self.until

    async def refresh(self) -> bool:
        """Take or renew the lease once; returns whether we hold it. A
        store error leaves the hold to run out by itself."""
        started = time.monotonic()
        was = self.held
        try:
            ok = await _TAKE(self.redis, lease=self.key, id=self.id,
                             ttl_ms=self.ttl_ms)
        except redis.exceptions.RedisError as e:
            log.warning('lease %s not renewed: %s', self.key, e)
            return self.held
        self.until = started + self.ttl_ms / 1000.0 if ok else 0.0
        if ok != was:
            log.info('%s lease %s (%s)', 'took' if ok else 'lost', self.key,
                     self.id)
        return bool(ok)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.ttl_ms / 3000.0)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop renewing and release the lease so another takes it now."""
        if self.task is not None:
            self.task.cancel()
        if self.held:
            self.until = 0.0
            try:
                await _RELEASE(self.redis, lease=self.key, id=self.id)
            except redis.exceptions.RedisError as e:
                log.warning('lease %s not released: %s', self.key, e)


def holder(redis: Any, key: str, servers: dict[str, int]) -> str | None:
    """Which of `servers` ({name: server pid}) holds the lease `key`, by
    the pid in its value (a worker of that server, or the server itself);
    None if none does. For the demo and the tests (sync client)."""
    value = redis.get(key) or ''
    try:
        pid = int(value.split(':')[-2])
        parent = int(processes.stat(pid)[processes.PARENT])  # type: ignore[index]
    except (IndexError, ValueError, TypeError):  # gone: stat() is None
        return None
    return next((name for name, p in servers.items() if p in (pid, parent)),
                None)
