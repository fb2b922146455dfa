"""Locks shared by every worker process of a WS, held in Redis.

A stream's lock serialises what touches its disk (frames, checkpoints,
deactivations, start/stop, deletion). A target has an exclusive lock (its
creation, its deletion or that of its last stream) and shared holds
(creations of streams of a target that exists); lock the target before a
stream, never the other way. A request waits at most LOCK_WAIT_S for a
busy one (503).

A holder's value starts with its worker's mark (pid and generation, see
runner.holder_prefix): when a worker dies the master frees its locks at
once (recovery.free_dead_holder); LOCK_TTL_MS is the last resort. A lock
command sent to a Redis that did not answer in time may still run when it
wakes up (and take the lock for nobody): such locks are freed once Redis
answers again (`release_later`).
"""
import asyncio
import contextlib
import secrets
import time

from server import store
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


def new_holder(app):
    """A name for one holding of a lock: the worker's mark, then random."""
    return app.holder + secrets.token_hex(8)


async def release(app, key, holder):
    """Free our lock; if Redis does not answer, again later."""
    try:
        await RELEASE(app.fastredis, [key], [holder])
    except store.DOWN:
        release_later(app, key, holder)


def release_later(app, key, holder, token_key=None, shared=False):
    """Free `key` (or the lock of the stream of `token_key`) if `holder`
    has it, once Redis answers, retrying for at most the lock's TTL.
    `shared`: `key` is a target's shared holds, `holder` one of them."""
    app.unreleased.append((shared, key, holder, token_key))
    if app.releasing is None or app.releasing.done():
        app.releasing = asyncio.ensure_future(_release_pending(app))


async def _release_pending(app):
    deadline = time.monotonic() + LOCK_TTL_MS / 1000.0
    while app.unreleased and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        pending, app.unreleased = app.unreleased, []
        for shared, key, holder, token_key in pending:
            try:
                if shared:
                    await app.redis.zrem(key, holder)
                    continue
                if key is None:
                    sid = await app.redis.get(token_key)
                    if sid is None:
                        continue
                    key = app.keys.stream_lock(sid)
                await RELEASE(app.redis, [key], [holder])
            except store.DOWN:
                app.unreleased.append((shared, key, holder, token_key))


async def wait_turn(deadline, delay, what):
    """Sleep before another try at a busy lock; Busy past the deadline.
    Returns the next delay."""
    if time.monotonic() >= deadline:
        raise Busy(what)
    await asyncio.sleep(delay)
    return min(delay * 2, 0.05)


@contextlib.asynccontextmanager
async def locked(app, key, what, wait=LOCK_WAIT_S):
    """Hold the Redis lock `key` (shared by all processes); Busy if it is
    not free within `wait` seconds."""
    holder = new_holder(app)
    deadline = time.monotonic() + wait
    delay = 0.002
    while True:
        try:
            if await app.redis.set(key, holder, nx=True, px=LOCK_TTL_MS):
                break
        except store.DOWN:
            release_later(app, key, holder)
            raise
        delay = await wait_turn(deadline, delay, what)
    try:
        yield
    finally:
        await release(app, key, holder)


def stream_locked(app, stream_id, wait=LOCK_WAIT_S):
    return locked(app, app.keys.stream_lock(stream_id),
                  'stream %s' % stream_id, wait)


@contextlib.asynccontextmanager
async def target_shared(app, target_id):
    """Many requests at once may hold a target this way (stream creations),
    none while it is locked (deletions, see target_locked)."""
    keys = app.keys
    users = keys.target_users(target_id)
    holder = new_holder(app)
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
        try:
            await app.redis.zrem(users, holder)
        except store.DOWN:  # else it would stay until its score passes
            release_later(app, users, holder, shared=True)


@contextlib.asynccontextmanager
async def target_locked(app, target_id):
    """The target's exclusive lock, once the shared holds taken before it
    are given back (no new one is granted meanwhile)."""
    keys = app.keys
    what = 'target %s' % target_id
    async with locked(app, keys.target_lock(target_id), what):
        deadline = time.monotonic() + LOCK_WAIT_S
        delay = 0.002
        while await app.redis.zcount(keys.target_users(target_id),
                                     int(time.time() * 1000), '+inf'):
            delay = await wait_turn(deadline, delay, what)
        yield
