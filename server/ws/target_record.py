"""The WS target record in Redis: the set of a target's streams
(`keys.target_streams`), its queue of inactive OK streams scored by
committed frames (`keys.queue`), its membership of `keys.targets` and its
count of active streams (a field of `keys.target_active`). The target's
files and owner are on disk (storage.py).

A stream's steps that move it in or out of these (activation, deactivation,
start, deletion: stream_record.py) name them in their KEYS; everything
else that reads or writes them is here."""
from typing import Any, NamedTuple

from server.ws.keys import Keys


class TargetCounts(NamedTuple):
    """A target's streams by state, from its sets."""
    queued: int
    active: int
    stopped: int


def add_stream(pipe: Any, keys: Keys, target_id: str, sid: str,
               queued_at: int | None) -> None:
    """Queue the commands that make `sid` one of the target's streams,
    queued with score `queued_at` (its committed frames) unless None."""
    pipe.sadd(keys.target_streams(target_id), sid)
    pipe.sadd(keys.targets, target_id)
    if queued_at is not None:
        pipe.zadd(keys.queue(target_id), {sid: queued_at})


async def stream_ids(app: Any, target_id: str) -> list[str]:
    return sorted(await app.redis.smembers(
        app.keys.target_streams(target_id)))


async def all_stream_ids(app: Any) -> list[str]:
    """Every stream of every target, two round trips."""
    keys = app.keys
    tids = sorted(await app.redis.smembers(keys.targets))
    if not tids:
        return []
    pipe = app.redis.pipeline(transaction=False)
    for tid in tids:
        pipe.smembers(keys.target_streams(tid))
    return sorted(set().union(*await pipe.execute()))


async def one_stream_each(app: Any, tids: list[str]) -> list[str | None]:
    """A stream of each target (None if it has none), one round trip."""
    pipe = app.redis.pipeline(transaction=False)
    for tid in tids:
        pipe.srandmember(app.keys.target_streams(tid))
    found: list[str | None] = await pipe.execute()
    return found


async def forget(app: Any, target_id: str) -> None:
    """The target leaves the index (its streams are gone already)."""
    keys = app.keys
    pipe = app.redis.pipeline(transaction=True)
    pipe.delete(keys.target_streams(target_id), keys.queue(target_id))
    pipe.srem(keys.targets, target_id)
    await pipe.execute()


async def counts(app: Any) -> dict[str, TargetCounts]:
    """Every target's counts from its sets (one round trip per target
    set, never a scan of the streams)."""
    keys, redis = app.keys, app.redis
    tids = sorted(await redis.smembers(keys.targets))
    pipe = redis.pipeline(transaction=False)
    for tid in tids:
        pipe.scard(keys.target_streams(tid))
        pipe.zcard(keys.queue(tid))
    pipe.hgetall(keys.target_active)
    replies = await pipe.execute()
    active = replies.pop()
    found = {}
    for i, tid in enumerate(tids):
        total, queued = replies[2 * i], replies[2 * i + 1]
        act = min(max(int(active.get(tid, 0)), 0), total - queued)
        found[tid] = TargetCounts(queued, act, total - queued - act)
    return found
