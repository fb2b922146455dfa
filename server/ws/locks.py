"""Locks shared by every worker process of a WS, held in Redis.

A stream's lock serialises what touches its disk (frames, checkpoints,
deactivations, start/stop, deletion). A target has an exclusive lock (its
creation, its deletion or that of its last stream) and shared holds
(creations of streams of a target that exists); lock the target before a
stream, never the other way. A holder that dies frees its lock after
LOCK_TTL_MS; a request waits at most LOCK_WAIT_S for a busy one (503).
"""
import asyncio
import contextlib
import secrets
import time

from server.lua import Script
from server.web import APIError

LOCK_TTL_MS = 300000   # a holder that died frees the lock after this
LOCK_WAIT_S = 30.0     # a request waits this long for a busy stream


class Busy(APIError):
    def __init__(self, what):
        super().__init__(503, '%s is busy with another request, retry' % what)


# Free a lock if this holder still has it.
RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")

# A shared hold on a target: refused (0) while its exclusive lock is held.
_SHARE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
""")


def new_holder():
    """A name for one holding of a lock."""
    return secrets.token_hex(12)


async def wait_turn(deadline, delay, what):
    """Sleep before another try at a busy lock; Busy past the deadline.
    Returns the next delay."""
    if time.monotonic() >= deadline:
        raise Busy(what)
    await asyncio.sleep(delay)
    return min(delay * 2, 0.05)


@contextlib.asynccontextmanager
async def locked(redis, key, what, wait=LOCK_WAIT_S):
    """Hold the Redis lock `key` (shared by all processes); Busy if it is
    not free within `wait` seconds."""
    holder = new_holder()
    deadline = time.monotonic() + wait
    delay = 0.002
    while not await redis.set(key, holder, nx=True, px=LOCK_TTL_MS):
        delay = await wait_turn(deadline, delay, what)
    try:
        yield
    finally:
        await RELEASE(redis, [key], [holder])


def stream_locked(app, stream_id, wait=LOCK_WAIT_S):
    return locked(app.redis, app.keys.stream_lock(stream_id),
                  'stream %s' % stream_id, wait)


@contextlib.asynccontextmanager
async def target_shared(app, target_id):
    """Many requests at once may hold a target this way (stream creations),
    none while it is locked (deletions, see target_locked)."""
    keys = app.keys
    users = keys.target_users(target_id)
    holder = new_holder()
    deadline = time.monotonic() + LOCK_WAIT_S
    delay = 0.002
    while True:
        now = int(time.time() * 1000)
        if await _SHARE(app.fastredis, [keys.target_lock(target_id), users], [
                holder, now + LOCK_TTL_MS, now, LOCK_TTL_MS]):
            break
        delay = await wait_turn(deadline, delay, 'target %s' % target_id)
    try:
        yield
    finally:
        await app.redis.zrem(users, holder)


@contextlib.asynccontextmanager
async def target_locked(app, target_id):
    """The target's exclusive lock, once the shared holds taken before it
    are given back (no new one is granted meanwhile)."""
    keys = app.keys
    what = 'target %s' % target_id
    async with locked(app.redis, keys.target_lock(target_id), what):
        deadline = time.monotonic() + LOCK_WAIT_S
        delay = 0.002
        while await app.redis.zcount(keys.target_users(target_id),
                                     int(time.time() * 1000), '+inf'):
            delay = await wait_turn(deadline, delay, what)
        yield
