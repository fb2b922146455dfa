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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from server import store
from server.lua import Script
from server.web import APIError

T = TypeVar('T')

LOCK_TTL_MS = 300000   # a holder that died frees the lock after this
LOCK_WAIT_S = 30.0     # a request waits this long for a busy stream


class Busy(APIError):
    def __init__(self, what: str) -> None:
        super().__init__(503, '%s is busy with another request, retry' % what)


# Free a lock if this holder still has it.
RELEASE = Script("""
if redis.call('GET', lock) == holder then
  return redis.call('DEL', lock)
end
return 0
""", keys=('lock',), args=('holder',))

# A shared hold on a target (in `users`, until `expiry_ms`): refused (0)
# while its exclusive lock is held. Holds past their time are dropped.
_SHARE = Script("""
if redis.call('EXISTS', lock) == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', users, '-inf', now_ms)
redis.call('ZADD', users, expiry_ms, holder)
redis.call('PEXPIRE', users, ttl_ms)
return 1
""", keys=('lock', 'users'), args=('holder', 'expiry_ms', 'now_ms', 'ttl_ms'))


def new_holder(app: Any) -> str:
    """A name for one holding of a lock: the worker's mark, then random."""
    return app.holder + secrets.token_hex(8)


async def release(app: Any, key: str, holder: str) -> None:
    """Free our lock; if Redis does not answer, again later."""
    try:
        await RELEASE(app.fastredis, lock=key, holder=holder)
    except store.DOWN:
        release_later(app, key, holder)


def release_later(app: Any, key: str | None, holder: str,
                  token_key: str | None = None, shared: bool = False) -> None:
    """Free `key` (or the lock of the stream of `token_key`) if `holder`
    has it, once Redis answers, retrying for at most the lock's TTL.
    `shared`: `key` is a target's shared holds, `holder` one of them."""
    app.unreleased.append((shared, key, holder, token_key))
    if app.releasing is None or app.releasing.done():
        app.releasing = asyncio.ensure_future(_release_pending(app))


async def _release_pending(app: Any) -> None:
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
                await RELEASE(app.redis, lock=key, holder=holder)
            except store.DOWN:
                app.unreleased.append((shared, key, holder, token_key))


async def wait_turn(attempt: Callable[[], Awaitable[T | None]],
                    what: Callable[[], str], wait: float = LOCK_WAIT_S) -> T:
    """The first truthy result of `attempt()`, tried again after a short
    sleep (growing to 50 ms) while it is not; Busy(`what()`) once `wait`
    seconds have passed. Every wait for a lock is this loop."""
    deadline = time.monotonic() + wait
    delay = 0.002
    while True:
        got = await attempt()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise Busy(what())
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


@contextlib.asynccontextmanager
async def locked(app: Any, key: str, what: str,
                 wait: float = LOCK_WAIT_S) -> AsyncIterator[None]:
    """Hold the Redis lock `key` (shared by all processes); Busy if it is
    not free within `wait` seconds."""
    holder = new_holder(app)

    async def take() -> bool:
        try:
            return bool(await app.redis.set(key, holder, nx=True,
                                             px=LOCK_TTL_MS))
        except store.DOWN:
            release_later(app, key, holder)
            raise
    await wait_turn(take, lambda: what, wait)
    try:
        yield
    finally:
        await release(app, key, holder)


def stream_locked(app: Any, stream_id: str,
                  wait: float = LOCK_WAIT_S) -> Any:
    return locked(app, app.keys.stream_lock(stream_id),
                  'stream %s' % stream_id, wait)


@contextlib.asynccontextmanager
async def target_shared(app: Any, target_id: str) -> AsyncIterator[None]:
    """Many requests at once may hold a target this way (stream creations),
    none while it is locked (deletions, see target_locked)."""
    keys = app.keys
    users = keys.target_users(target_id)
    holder = new_holder(app)

    async def share() -> bool:
        now = int(time.time() * 1000)
        return bool(await _SHARE(
            app.fastredis, lock=keys.target_lock(target_id), users=users,
            holder=holder, expiry_ms=now + LOCK_TTL_MS, now_ms=now,
            ttl_ms=LOCK_TTL_MS))
    await wait_turn(share, lambda: 'target %s' % target_id)
    try:
        yield
    finally:
        try:
            await app.redis.zrem(users, holder)
        except store.DOWN:  # else it would stay until its score passes
            release_later(app, users, holder, shared=True)


@contextlib.asynccontextmanager
async def target_locked(app: Any, target_id: str) -> AsyncIterator[None]:
    """The target's exclusive lock, once the shared holds taken before it
    are given back (no new one is granted meanwhile)."""
    keys = app.keys
    what = 'target %s' % target_id

    async def no_users() -> bool:
        return not await app.redis.zcount(keys.target_users(target_id),
                                          int(time.time() * 1000), '+inf')
    async with locked(app, keys.target_lock(target_id), what):
        await wait_turn(no_users, lambda: what)
        yield
