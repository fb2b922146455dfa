"""The CC's map of streams: per stream, its target and WS (`stream:<id>`),
and per target, how many of its streams each WS holds (`target:<id>:ws`),
which WS hold its files and which streams it has. Only this module writes
those keys; placement (streams.py) and reconciliation (reconcile.py) call
it.
"""
import json
import random
from dataclasses import dataclass
from typing import Any

from server import store
from server.cc import keys, workservers
from server.lua import Script
from server.store import argv


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


_RESERVE = Script("""
-- Reserve one stream slot on the online WS holding fewest streams of the
-- target, in one step.
-- KEYS: target, target_ws (per-WS counts), target_ws_files, workservers.
-- ARGV: ws_template, offset (ties go to the first name from there),
-- max_streams, skip (JSON list of names to leave out), allowed (JSON
-- list; empty: any).
-- Returns nil if the target is gone, -1 if it has max_streams, {} if no
-- WS can take it, else {ws, url, http_port, 1 if it has the files}.
""" + workservers.ADDRESS_LUA + """
local target, counts, with_files, workservers = unpack(KEYS)
local ws_template, offset, max_streams = ARGV[1], tonumber(ARGV[2]),
  tonumber(ARGV[3])
local skip, allowed, any = {}, {}, true
for _, name in ipairs(cjson.decode(ARGV[4])) do skip[name] = true end
for _, name in ipairs(cjson.decode(ARGV[5])) do
  allowed[name] = true
  any = false
end
if redis.call('EXISTS', target) == 0 then return false end
local total = 0
for _, c in ipairs(redis.call('HVALS', counts)) do
  total = total + tonumber(c)
end
if total >= max_streams then return -1 end
local names = redis.call('SMEMBERS', workservers)
table.sort(names)
local n = #names
local best, low, best_url, best_port
for i = 0, n - 1 do
  local name = names[(i + offset) % n + 1]
  if not skip[name] and (any or allowed[name]) then
    local url, port = ws_address(string.format(ws_template, name))
    if url then
      local c = tonumber(redis.call('HGET', counts, name) or '0')
      if low == nil or c < low then
        best, low, best_url, best_port = name, c, url, port
      end
    end
  end
end
if best == nil then return {} end
redis.call('HINCRBY', counts, best, 1)
return {best, best_url, best_port, redis.call('SISMEMBER', with_files, best)}
""")
_RESERVE_ARGS = ('ws_template', 'offset', 'max_streams', 'skip', 'allowed')

_UNRESERVE = Script("""
-- Give a reservation back (placement failed).
-- KEYS: target, target_ws. ARGV: ws. Returns 1, 0 if the target is gone.
local target, counts = unpack(KEYS)
local ws = ARGV[1]
if redis.call('EXISTS', target) == 0 then return 0 end
if redis.call('HINCRBY', counts, ws, -1) <= 0 then
  redis.call('HDEL', counts, ws)
end
return 1
""")
_UNRESERVE_ARGS = ('ws',)

_RECORD = Script("""
-- A placed stream becomes known, and its WS known to hold the target's
-- files, unless the target was deleted meanwhile.
-- KEYS: target, stream, target_streams, target_ws_files.
-- ARGV: stream_id, target_id, ws. Returns 1, 0 if the target is gone.
local target, stream, streams, with_files = unpack(KEYS)
local stream_id, target_id, ws = unpack(ARGV)
if redis.call('EXISTS', target) == 0 then return 0 end
redis.call('HSET', stream, 'target_id', target_id, 'ws', ws)
redis.call('SADD', streams, stream_id)
redis.call('SADD', with_files, ws)
return 1
""")
_RECORD_ARGS = ('stream_id', 'target_id', 'ws')

_ADOPT = Script("""
-- Adopt a WS's stream the CC does not know: record it and count it on its
-- WS. KEYS: target, stream, target_streams, target_ws_files, target_ws.
-- ARGV: stream_id, target_id, ws.
-- Returns 0: no such target; 1: known already; 2: adopted.
local target, stream, streams, with_files, counts = unpack(KEYS)
local stream_id, target_id, ws = unpack(ARGV)
if redis.call('EXISTS', target) == 0 then return 0 end
if redis.call('EXISTS', stream) == 1 then return 1 end
redis.call('HSET', stream, 'target_id', target_id, 'ws', ws)
redis.call('SADD', streams, stream_id)
redis.call('SADD', with_files, ws)
redis.call('HINCRBY', counts, ws, 1)
return 2
""")
_ADOPT_ARGS = _RECORD_ARGS
ADOPTED, KNOWN, NO_TARGET = 2, 1, 0  # what adopt did

_FORGET = Script("""
-- Forget a deleted stream; the WS drops a target with its last stream,
-- so then it no longer holds the target's files either.
-- KEYS: stream, target_streams, target_ws, target_ws_files, target.
-- ARGV: stream_id, ws. Returns 1, 0 if the stream was not known.
local stream, streams, counts, with_files, target = unpack(KEYS)
local stream_id, ws = unpack(ARGV)
if redis.call('DEL', stream) == 0 then return 0 end
redis.call('SREM', streams, stream_id)
if redis.call('EXISTS', target) == 1 then
  if redis.call('HINCRBY', counts, ws, -1) <= 0 then
    redis.call('HDEL', counts, ws)
    redis.call('SREM', with_files, ws)
  end
end
return 1
""")
_FORGET_ARGS = ('stream_id', 'ws')


async def reserve(app: Any, target_id: str, skip: list[str],
                  allowed: list[str]) -> Reservation | None:
    """A slot on the least-loaded online WS of `allowed` (empty: any) but
    `skip`, with ties broken at random; None if no WS can take one.
    Raises TargetGone, TargetFull."""
    tid = target_id
    reserved = await _RESERVE(
        app.redis, [keys.target(tid), keys.target_ws(tid),
                    keys.target_ws_files(tid), keys.WORKSERVERS],
        argv(_RESERVE_ARGS, ws_template=keys.ws.template,
             offset=random.randrange(1 << 30),
             max_streams=app.config.max_streams_per_target,
             skip=json.dumps(skip), allowed=json.dumps(allowed)))
    if reserved is None:
        raise TargetGone(tid)
    if reserved == -1:
        raise TargetFull(tid)
    if not reserved:
        return None
    ws, url, port, has_files = reserved
    return Reservation(ws, 'https://%s:%s' % (url, port), has_files == 1)


async def unreserve(app: Any, target_id: str, ws: str) -> None:
    await _UNRESERVE(app.redis, [keys.target(target_id),
                                 keys.target_ws(target_id)],
                     argv(_UNRESERVE_ARGS, ws=ws))


async def record(app: Any, stream_id: str, target_id: str, ws: str) -> bool:
    """Record a placed stream, acknowledged by `redis_wait_replicas`
    replicas; False if the target was deleted meanwhile."""
    tid = target_id
    return bool(await store.acknowledged(
        app.redis, _RECORD,
        [keys.target(tid), keys.stream(stream_id), keys.target_streams(tid),
         keys.target_ws_files(tid)],
        argv(_RECORD_ARGS, stream_id=stream_id, target_id=tid, ws=ws),
        app.config.redis_wait_replicas,
        app.config.redis_wait_timeout_in_ms))


async def adopt(app: Any, stream_id: str, target_id: str, ws: str) -> int:
    """ADOPTED, KNOWN or NO_TARGET."""
    tid = target_id
    return await _ADOPT(app.redis, [
        keys.target(tid), keys.stream(stream_id), keys.target_streams(tid),
        keys.target_ws_files(tid), keys.target_ws(tid)],
        argv(_ADOPT_ARGS, stream_id=stream_id, target_id=tid, ws=ws))


async def forget(app: Any, record: StreamRecord) -> None:
    tid = record.target_id
    await _FORGET(app.redis, [
        keys.stream(record.stream_id), keys.target_streams(tid),
        keys.target_ws(tid), keys.target_ws_files(tid), keys.target(tid)],
        argv(_FORGET_ARGS, stream_id=record.stream_id, ws=record.ws))


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
