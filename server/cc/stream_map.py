"""The CC's map of streams: per stream, its target and WS (`stream:<id>`),
and per target, how many of its streams each WS holds (`target:<id>:ws`),
which WS hold its files and which streams it has. Only this module writes
those keys; placement (streams.py) and reconciliation (reconcile.py) call
it.
"""
import json
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

from server import store
from server.cc import keys, workservers
from server.lua import Script
from server.web import STREAM_ID


@dataclass(frozen=True)
class StreamRecord:
    """The record `stream:<id>`."""

    stream_id: str
    target_id: str
    ws: str

    @classmethod
    def from_hash(cls, stream_id: str, h: dict[str, str]) -> 'StreamRecord':
        return cls(stream_id, h['target_id'], h['ws'])


@dataclass(frozen=True)
class Reservation:
    """A stream slot reserved on `ws` (at `base`); `has_files`: the WS
    already holds the target's files."""

    ws: str
    base: str
    has_files: bool


class TargetGone(Exception):
    """The target was deleted (or never was)."""


class TargetFull(Exception):
    """The target has the most streams a target may have."""


class Reserved(NamedTuple):
    """_RESERVE's pick: the WS, its address, 1 if it has the files."""
    ws: str
    url: str
    http_port: str
    has_files: int


_RESERVE = Script("""
-- Reserve one stream slot on the online WS holding fewest streams of the
-- target, in one step. counts: target_ws (per-WS counts); with_files:
-- target_ws_files; ties go to the first name from `offset`; skip: JSON
-- list of names to leave out; allowed: JSON list (empty: any).
-- Returns nil if the target is gone, -1 if it has max_streams, 0 if no
-- WS can take it, else {ws, url, http_port, 1 if it has the files}.
""" + workservers.ADDRESS_LUA + """
local start, most = tonumber(offset), tonumber(max_streams)
local leave, only, any = {}, {}, true
for _, name in ipairs(cjson.decode(skip)) do leave[name] = true end
for _, name in ipairs(cjson.decode(allowed)) do
  only[name] = true
  any = false
end
if redis.call('EXISTS', target) == 0 then return false end
local total = 0
for _, c in ipairs(redis.call('HVALS', counts)) do
  total = total + tonumber(c)
end
if total >= most then return -1 end
local names = redis.call('SMEMBERS', workservers)
table.sort(names)
local n = #names
local best, low, best_url, best_port
for i = 0, n - 1 do
  local name = names[(i + start) % n + 1]
  if not leave[name] and (any or only[name]) then
    local url, port = ws_address(string.format(ws, name))
    if url then
      local c = tonumber(redis.call('HGET', counts, name) or '0')
      if low == nil or c < low then
        best, low, best_url, best_port = name, c, url, port
      end
    end
  end
end
if best == nil then return 0 end
redis.call('HINCRBY', counts, best, 1)
return {best, best_url, best_port, redis.call('SISMEMBER', with_files, best)}
""", keys=('target', 'counts', 'with_files', 'workservers'), walks=('ws',),
    args=('offset', 'max_streams', 'skip', 'allowed'), returns=Reserved)

_UNRESERVE = Script("""
-- Give a reservation back (placement failed); counts: target_ws.
-- Returns 1, 0 if the target is gone.
if redis.call('EXISTS', target) == 0 then return 0 end
if redis.call('HINCRBY', counts, ws, -1) <= 0 then
  redis.call('HDEL', counts, ws)
end
return 1
""", keys=('target', 'counts'), args=('ws',))

_RECORD = Script("""
-- A placed stream becomes known, and its WS known to hold the target's
-- files, unless the target was deleted meanwhile. streams:
-- target_streams; with_files: target_ws_files.
-- Returns 1, 0 if the target is gone.
if redis.call('EXISTS', target) == 0 then return 0 end
redis.call('HSET', stream, 'target_id', target_id, 'ws', ws)
redis.call('SADD', streams, stream_id)
redis.call('SADD', with_files, ws)
return 1
""", keys=('target', 'stream', 'streams', 'with_files'),
    args=('stream_id', 'target_id', 'ws'))

_ADOPT = Script("""
-- Adopt a WS's stream the CC does not know: record it and count it on its
-- WS. streams: target_streams; with_files: target_ws_files; counts:
-- target_ws. Returns 0: no such target; 1: known already; 2: adopted.
if redis.call('EXISTS', target) == 0 then return 0 end
if redis.call('EXISTS', stream) == 1 then return 1 end
redis.call('HSET', stream, 'target_id', target_id, 'ws', ws)
redis.call('SADD', streams, stream_id)
redis.call('SADD', with_files, ws)
redis.call('HINCRBY', counts, ws, 1)
return 2
""", keys=('target', 'stream', 'streams', 'with_files', 'counts'),
    args=('stream_id', 'target_id', 'ws'))
ADOPTED, KNOWN, NO_TARGET = 2, 1, 0  # what adopt did

_FORGET = Script("""
-- Forget a deleted stream; the WS drops a target with its last stream,
-- so then it no longer holds the target's files either. streams:
-- target_streams; counts: target_ws; with_files: target_ws_files.
-- Returns 1, 0 if the stream was not known.
if redis.call('DEL', stream) == 0 then return 0 end
redis.call('SREM', streams, stream_id)
if redis.call('EXISTS', target) == 1 then
  if redis.call('HINCRBY', counts, ws, -1) <= 0 then
    redis.call('HDEL', counts, ws)
    redis.call('SREM', with_files, ws)
  end
end
return 1
""", keys=('stream', 'streams', 'counts', 'with_files', 'target'),
    args=('stream_id', 'ws'))


async def reserve(app: Any, target_id: str, skip: list[str],
                  allowed: list[str]) -> Reservation | None:
    """A slot on the least-loaded online WS of `allowed` (empty: any) but
    `skip`, with ties broken at random; None if no WS can take one.
    Raises TargetGone, TargetFull."""
    tid = target_id
    reserved: Reserved | int | None = await _RESERVE(
        app.redis, target=keys.target(tid), counts=keys.target_ws(tid),
        with_files=keys.target_ws_files(tid), workservers=keys.WORKSERVERS,
        ws=keys.ws.template, offset=random.randrange(1 << 30),
        max_streams=app.config.max_streams_per_target,
        skip=json.dumps(skip), allowed=json.dumps(allowed))
    if reserved is None:
        raise TargetGone(tid)
    if reserved == -1:
        raise TargetFull(tid)
    if not isinstance(reserved, Reserved):
        return None
    return Reservation(reserved.ws, 'https://%s:%s' % (reserved.url,
                                                       reserved.http_port),
                       reserved.has_files == 1)


async def unreserve(app: Any, target_id: str, ws: str) -> None:
    await _UNRESERVE(app.redis, target=keys.target(target_id),
                     counts=keys.target_ws(target_id), ws=ws)


async def record(app: Any, stream_id: str, target_id: str, ws: str) -> bool:
    """Record a placed stream, acknowledged by `redis_wait_replicas`
    replicas; False if the target was deleted meanwhile."""
    tid = target_id
    return bool(await store.acknowledged(
        app.redis, _RECORD, app.config.redis_wait_replicas,
        app.config.redis_wait_timeout_in_ms, target=keys.target(tid),
        stream=keys.stream(stream_id), streams=keys.target_streams(tid),
        with_files=keys.target_ws_files(tid), stream_id=stream_id,
        target_id=tid, ws=ws))


async def adopt(app: Any, stream_id: str, target_id: str, ws: str) -> int:
    """ADOPTED, KNOWN or NO_TARGET."""
    tid = target_id
    return await _ADOPT(
        app.redis, target=keys.target(tid), stream=keys.stream(stream_id),
        streams=keys.target_streams(tid),
        with_files=keys.target_ws_files(tid), counts=keys.target_ws(tid),
        stream_id=stream_id, target_id=tid, ws=ws)


async def forget(app: Any, record: StreamRecord) -> None:
    tid = record.target_id
    await _FORGET(
        app.redis, stream=keys.stream(record.stream_id),
        streams=keys.target_streams(tid), counts=keys.target_ws(tid),
        with_files=keys.target_ws_files(tid), target=keys.target(tid),
        stream_id=record.stream_id, ws=record.ws)


async def load(app: Any, stream_id: str) -> StreamRecord | None:
    h = await app.redis.hgetall(keys.stream(stream_id))
    return StreamRecord.from_hash(stream_id, h) if h else None


async def on_ws(redis: Any, ws: str) -> dict[str, StreamRecord]:
    """{stream id: record} of the streams the CC places on `ws`."""
    prefix = keys.stream('')
    found = {}
    async for key in redis.scan_iter(match=keys.stream('*:' + ws),
                                     count=1000):
        h = await redis.hgetall(key)
        if h.get('ws') == ws:
            sid = key[len(prefix):]
            found[sid] = StreamRecord.from_hash(sid, h)
    return found


async def placed_on(app: Any, target_id: str, ws: str,
                    stream_ids: list[str]) -> set[str]:
    """Those of `stream_ids` that are well formed and that the CC placed
    (or adopted) on `ws` for the target: what a WS may list of it."""
    suffix = ':' + ws
    ids = [s for s in stream_ids if isinstance(s, str)
           and STREAM_ID.fullmatch(s) and s.endswith(suffix)]
    if not ids:
        return set()
    known = await app.redis.smismember(keys.target_streams(target_id), ids)
    return {s for s, k in zip(ids, known, strict=True) if k}


async def counts_on(redis: Any, ws: str,
                    target_ids: list[str]) -> dict[str, int]:
    """{target id: streams the CC placed on `ws`} of those targets that
    have any there (a WS's report counts no other)."""
    if not target_ids:
        return {}
    pipe = redis.pipeline(transaction=False)
    for tid in target_ids:
        pipe.hget(keys.target_ws(tid), ws)
    counts = await pipe.execute()
    return {tid: int(n) for tid, n in zip(target_ids, counts, strict=True)
            if n and int(n) > 0}


async def targets_of(redis: Any, ws: str,
                     stream_ids: list[str]) -> dict[str, str]:
    """{stream id: target id} of those streams the CC placed on `ws`."""
    if not stream_ids:
        return {}
    pipe = redis.pipeline(transaction=False)
    for sid in stream_ids:
        pipe.hmget(keys.stream(sid), 'target_id', 'ws')
    found = await pipe.execute()
    return {sid: tid for sid, (tid, on) in zip(stream_ids, found, strict=True)
            if tid is not None and on == ws}
