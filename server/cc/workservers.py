"""The command center's registry of workservers: registration with
`cc_pass`, periodic health probes, and every CC -> WS request.

A WS is online while its probes and requests succeed; `max_ws_fails`
consecutive failures take it offline (no assignments, no new streams) until
a probe or a re-registration succeeds. An explicit `/ws/disconnect` keeps it
offline until it registers again.

A registration records the address it came from. While the WS is online,
a registration or disconnection of its name from another address is a 409:
holding `cc_pass` is not enough to take over another WS's traffic. Once it
is offline (its probes failed, or it said goodbye), the name may move. An
admin may forget an offline WS (`PUT /ws/remove/:name`): it is no longer
probed nor listed; its streams stay on its disk and come back with it if it
registers again.

An admin may drain a WS (`PUT /ws/drain/:name`): it gets no new streams and
no activations (ADDRESS_LUA hides it from placement and assignment), while
its running cores go on until they stop or expire. Draining survives the
WS's restarts and re-registrations; undraining or removing ends it.
"""
import asyncio
import enum
import logging
import re
from dataclasses import dataclass
from typing import Any

from server import peer, tokens
from server.cc import keys
from server.config import is_host, port_number
from server.lua import Script
from server.web import APIError, APIHandler, Permission, allow, role

log = logging.getLogger('siegetank.cc.ws')

WS_NAME = re.compile(r'[A-Za-z0-9._-]{1,64}')


@dataclass(frozen=True)
class Workserver:
    """The record `ws:<name>` (keys.py). Only this module reads or writes
    its fields; the Lua of other records reaches it through ADDRESS_LUA."""

    name: str
    url: str
    http_port: int
    online: bool
    fails: int  # consecutive failed probes and requests
    disconnected: bool  # said goodbye: offline until it registers again
    source: str  # the address it registered from
    draining: bool  # no new streams nor activations (an admin's drain)

    @classmethod
    def from_hash(cls, name: str, h: dict[str, str]) -> 'Workserver':
        return cls(name=name, url=h.get('url', ''),
                   http_port=_int(h.get('http_port')),
                   online=h.get('online') == '1', fails=_int(h.get('fails')),
                   disconnected=h.get('disconnected') == '1',
                   source=h.get('source', ''),
                   draining=h.get('draining') == '1')

    @property
    def base(self) -> str:
        return 'https://%s:%s' % (self.url, self.http_port)


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


class Outcome(enum.IntEnum):
    """What a registration, goodbye or removal did (its script's result)."""
    DONE = 1
    REFUSED = 0  # online from another address, or (removal) still online
    UNKNOWN = -1


# A Lua function for the scripts of other records (spliced at their top)
# that give a WS new work (placement, assignment): url and http_port of the
# WS at `key` while it is online and not draining, else nil.
ADDRESS_LUA = """
local function ws_address(key)
  local w = redis.call('HMGET', key, 'online', 'url', 'http_port',
                       'draining')
  if w[1] ~= '1' or w[4] == '1' then return nil end
  return w[2], w[3]
end
"""

_FAIL = Script("""
-- Count a failure; at the threshold the WS goes offline (nothing for a
-- WS removed meanwhile). Returns the count.
if redis.call('EXISTS', ws) == 0 then return 0 end
local fails = redis.call('HINCRBY', ws, 'fails', 1)
if fails >= tonumber(max_fails) then redis.call('HSET', ws, 'online', '0') end
return fails
""", keys=('ws',), args=('max_fails',))

_SUCCESS = Script("""
-- A WS that answers is online again (fails reset), unless it said
-- goodbye. Returns 1, or 0 for an unknown WS.
if redis.call('EXISTS', ws) == 0 then return 0 end
redis.call('HSET', ws, 'fails', 0)
if redis.call('HGET', ws, 'disconnected') ~= '1' then
  redis.call('HSET', ws, 'online', 1)
end
return 1
""", keys=('ws',))

_REGISTER = Script("""
-- Register (register == '1') or disconnect the WS from address `source`,
-- unless it is online and registered from another address.
-- Returns an Outcome: 1 done, 0 online elsewhere, -1 (disconnecting) an
-- unknown WS.
local h = redis.call('HMGET', ws, 'online', 'source')
if register ~= '1' and not h[1] then return -1 end
if h[1] == '1' and h[2] and h[2] ~= '' and h[2] ~= source then return 0 end
if register == '1' then
  redis.call('HSET', ws, 'url', url, 'http_port', http_port, 'online', 1,
             'fails', 0, 'disconnected', 0, 'source', source)
  redis.call('SADD', workservers, name)
else
  redis.call('HSET', ws, 'online', 0, 'disconnected', 1)
end
return 1
""", keys=('ws', 'workservers'),
    args=('url', 'http_port', 'source', 'register', 'name'))

_REMOVE = Script("""
-- Forget an offline WS; its pending deletions stay (keys.py), replayed
-- when a WS of that name registers again, so a target deleted while it
-- was down never comes back with it.
-- Returns an Outcome: 1 done, 0 online, -1 unknown.
local online = redis.call('HGET', ws, 'online')
if not online then return -1 end
if online == '1' then return 0 end
redis.call('DEL', ws)
redis.call('SREM', workservers, name)
return 1
""", keys=('ws', 'workservers'), args=('name',))

_DRAIN = Script("""
-- Set or clear the drain of a known WS. Returns 1, or 0 for an unknown WS.
if redis.call('EXISTS', ws) == 0 then return 0 end
redis.call('HSET', ws, 'draining', drain)
return 1
""", keys=('ws',), args=('drain',))


async def register(app: Any, name: str, url: str, http_port: int | str,
                   source: str) -> bool:
    """False if `name` is online from another address than `source`."""
    return await _REGISTER(
        app.redis, ws=keys.ws(name), workservers=keys.WORKSERVERS, url=url,
        http_port=http_port, source=source, register='1',
        name=name) == Outcome.DONE


async def disconnect(app: Any, name: str, source: str) -> Outcome:
    return Outcome(await _REGISTER(
        app.redis, ws=keys.ws(name), workservers=keys.WORKSERVERS, url='',
        http_port='', source=source, register='0', name=name))


async def remove(app: Any, name: str) -> Outcome:
    return Outcome(await _REMOVE(
        app.redis, ws=keys.ws(name), workservers=keys.WORKSERVERS,
        name=name))


async def drain(app: Any, name: str, on: bool) -> bool:
    """Put the WS in drain (or take it out); False for an unknown WS."""
    return await _DRAIN(app.redis, ws=keys.ws(name),
                        drain='1' if on else '0') == 1


def read(pipe: Any, name: str) -> None:
    """Queue the read of a WS's record on `pipe`; its reply goes to
    `Workserver.from_hash` (empty: unknown WS)."""
    pipe.hgetall(keys.ws(name))


async def load_all(redis: Any) -> dict[str, Workserver]:
    """{name: Workserver} of every known WS."""
    names = sorted(await redis.smembers(keys.WORKSERVERS))
    pipe = redis.pipeline(transaction=False)
    for name in names:
        read(pipe, name)
    return {name: Workserver.from_hash(name, h)
            for name, h in zip(names, await pipe.execute(), strict=True)
            if h}


async def status(app: Any) -> dict[str, dict[str, Any]]:
    """{name: {url, http_port, online, draining}} for every known WS."""
    return {name: {'url': w.url, 'http_port': w.http_port,
                   'online': w.online, 'draining': w.draining}
            for name, w in (await load_all(app.redis)).items()}


async def online(app: Any) -> list[str]:
    """The names of the online WS, sorted."""
    return [n for n, w in (await load_all(app.redis)).items() if w.online]


async def record_failure(app: Any, name: str) -> int:
    """Count a failure; `max_ws_fails` in a row take the WS offline."""
    return await _FAIL(app.redis, ws=keys.ws(name),
                       max_fails=app.config.max_ws_fails)


async def record_success(app: Any, name: str) -> None:
    """A WS that answers is online again, unless it said goodbye."""
    await _SUCCESS(app.redis, ws=keys.ws(name))


async def load(redis: Any, name: str) -> Workserver | None:
    h = await redis.hgetall(keys.ws(name))
    return Workserver.from_hash(name, h) if h else None


async def base_url(app: Any, name: str) -> str | None:
    found = await load(app.redis, name)
    return found.base if found is not None else None


async def request(app: Any, name: str, method: str, path: str,
                  body: Any = None, timeout: float | None = None,
                  raw: bool = False, base: str | None = None) -> Any:
    """A CC -> WS call carrying `cc_pass`; unreachable or 5xx (other than
    503 'nothing free') counts toward `max_ws_fails`. Raises PeerError.
    `base` is the WS's base URL when the caller has just read it."""
    url = base or await base_url(app, name)
    if url is None:
        raise peer.PeerError('unknown workserver %s' % name)
    timeout = timeout or app.config.ws_timeout_in_s
    try:
        reply = await peer.call(app.client_ssl, method, url + path, body,
                                auth=app.config.cc_pass, timeout=timeout,
                                raw=raw)
    except peer.PeerError:
        await record_failure(app, name)
        raise
    if reply.code >= 500 and reply.code != 503:
        await record_failure(app, name)
    return reply


async def probe_all(app: Any) -> None:
    """GET / on every WS at once; each result moves its fail count, and a
    WS that answers gets `app.ws_back(name)` to catch up."""
    names = await app.redis.smembers(keys.WORKSERVERS)

    async def probe(name: str) -> None:
        try:
            reply = await request(app, name, 'GET', '/',
                                  timeout=min(app.config.ws_timeout_in_s,
                                              5.0))
            if reply.code == 200:
                await record_success(app, name)
                app.ws_back(name)
        except peer.PeerError as e:
            log.info('probe of %s failed: %s', name, e)

    await asyncio.gather(*(probe(n) for n in names))


@role('ws', 'missing or wrong cc_pass')
async def _workserver(handler: APIHandler, rule: Permission) -> str | None:
    """A WS: the caller presents this CC's `cc_pass` (constant time)."""
    if tokens.matches_any(handler.token(), [handler.config.cc_pass]):
        return 'ws'
    return None


def ws_name(handler: APIHandler) -> str:
    return handler.field('name', str, check=WS_NAME.fullmatch)


class WSRegisterHandler(APIHandler):
    @allow('ws')
    async def put(self) -> None:
        name = ws_name(self)
        url = self.field('url', str)
        if not is_host(url):
            raise APIError(400, 'url must be a host name or IPv4 address '
                           '(no scheme, no port)')
        port = port_number(self.field('http_port', (int, str)))
        if port is None:
            raise APIError(400, 'http_port must be a port number (1-65535)')
        if not await register(self.application, name, url, port,
                              self.request.remote_ip or ''):
            raise APIError(409, 'workserver %s is online from another '
                           'address' % name)
        self.application.ws_back(name)
        log.info('workserver %s registered at %s:%s', name, url, port)
        self.write_json({})


class WSDisconnectHandler(APIHandler):
    @allow('ws')
    async def put(self) -> None:
        name = ws_name(self)
        done = await disconnect(self.application, name,
                                self.request.remote_ip or '')
        if done is Outcome.UNKNOWN:
            raise APIError(404, 'unknown workserver %s' % name)
        if done is Outcome.REFUSED:
            raise APIError(409, 'workserver %s is online from another '
                           'address' % name)
        log.info('workserver %s disconnected', name)
        self.write_json({})


class WSRemoveHandler(APIHandler):
    @allow('admin', purpose='remove a workserver')
    async def put(self, name: str) -> None:
        done = await remove(self.application, name)
        if done is Outcome.UNKNOWN:
            raise APIError(404, 'unknown workserver %s' % name)
        if done is Outcome.REFUSED:
            raise APIError(409, 'workserver %s is online: it can be removed '
                           'once offline' % name)
        log.info('workserver %s removed by %s', name, self.caller.email)
        self.write_json({})


class WSDrainHandler(APIHandler):
    @allow('admin', purpose='drain a workserver')
    async def put(self, name: str) -> None:
        on = self.field('drain', bool)
        if not await drain(self.application, name, on):
            raise APIError(404, 'unknown workserver %s' % name)
        log.info('workserver %s %s by %s', name,
                 'draining' if on else 'no longer draining',
                 self.caller.email)
        self.write_json({})


class WSStatusHandler(APIHandler):
    @allow('anyone')
    async def get(self) -> None:
        self.write_json(await status(self.application))


default_handlers = [
    (r'/ws/register', WSRegisterHandler),
    (r'/ws/disconnect', WSDisconnectHandler),
    (r'/ws/status', WSStatusHandler),
    (r'/ws/remove/([^/]+)', WSRemoveHandler),
    (r'/ws/drain/([^/]+)', WSDrainHandler),
]
