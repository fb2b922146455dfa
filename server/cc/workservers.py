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
"""
import asyncio
import logging
import re

from server import peer
from server.cc import keys
from server.cc.accounts import AccountHandler
from server.config import is_host, port_number
from server.lua import Script
from server.web import APIError, APIHandler, PeerHandler

log = logging.getLogger('siegetank.cc.ws')

WS_NAME = re.compile(r'[A-Za-z0-9._-]{1,64}')

# Count a failure and take the WS offline at the threshold, atomically
# (nothing for a WS removed meanwhile).
_FAIL = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
if fails >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'online', '0')
end
return fails
""")

# A WS that answers is online again (fails reset), unless it said goodbye.
_SUCCESS = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'fails', 0)
if redis.call('HGET', KEYS[1], 'disconnected') ~= '1' then
  redis.call('HSET', KEYS[1], 'online', 1)
end
return 1
""")


# Register (ARGV[4] == '1') or disconnect a WS from the address ARGV[3],
# unless it is online and registered from another address: then 0.
# KEYS: the WS, the set of every WS. ARGV: url, http_port, source, register,
# name. Disconnecting an unknown WS is -1.
_REGISTER = Script("""
local h = redis.call('HMGET', KEYS[1], 'online', 'source')
if ARGV[4] ~= '1' and not h[1] then return -1 end
if h[1] == '1' and h[2] and h[2] ~= '' and h[2] ~= ARGV[3] then return 0 end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'url', ARGV[1], 'http_port', ARGV[2],
             'online', 1, 'fails', 0, 'disconnected', 0, 'source', ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[5])
else
  redis.call('HSET', KEYS[1], 'online', 0, 'disconnected', 1)
end
return 1
""")

# Forget an offline WS: 1 done, 0 online, -1 unknown. KEYS: the WS, its
# pending deletions, the set of every WS. ARGV: name.
_REMOVE = Script("""
local online = redis.call('HGET', KEYS[1], 'online')
if not online then return -1 end
if online == '1' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
""")


async def register(app, name, url, http_port, source):
    """False if `name` is online from another address than `source`."""
    return await _REGISTER(app.redis, [keys.ws(name), keys.WORKSERVERS],
                           [url, http_port, source, '1', name]) == 1


async def disconnect(app, name, source):
    """1 done, 0 online from another address, -1 unknown WS."""
    return await _REGISTER(app.redis, [keys.ws(name), keys.WORKSERVERS],
                           ['', '', source, '0', name])


async def remove(app, name):
    """1 done, 0 still online, -1 unknown WS."""
    return await _REMOVE(app.redis, [keys.ws(name),
                                     keys.ws_pending_deletes(name),
                                     keys.WORKSERVERS], [name])


async def status(app):
    """{name: {url, http_port, online}} for every known WS."""
    names = sorted(await app.redis.smembers(keys.WORKSERVERS))
    pipe = app.redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.ws(name))
    result = {}
    for name, h in zip(names, await pipe.execute(), strict=True):
        if h:
            result[name] = {'url': h['url'], 'http_port': int(h['http_port']),
                            'online': h.get('online') == '1'}
    return result


async def record_failure(app, name):
    """Count a failure; `max_ws_fails` in a row take the WS offline."""
    return await _FAIL(app.redis, [keys.ws(name)],
                       [app.config.max_ws_fails])


async def record_success(app, name):
    """A WS that answers is online again, unless it said goodbye."""
    await _SUCCESS(app.redis, [keys.ws(name)])


async def base_url(app, name):
    h = await app.redis.hmget(keys.ws(name), 'url', 'http_port')
    if h[0] is None:
        return None
    return 'https://%s:%s' % (h[0], h[1])


async def request(app, name, method, path, body=None, timeout=None,
                  raw=False, base=None):
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


async def probe_all(app):
    """GET / on every WS at once; each result moves its fail count, and a
    WS that answers gets `app.ws_back(name)` to catch up."""
    names = await app.redis.smembers(keys.WORKSERVERS)

    async def probe(name):
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


class WSHandler(PeerHandler):
    """Endpoints a WS calls with the CC's `cc_pass`."""

    def peer_passes(self):
        return [self.config.cc_pass]

    def ws_name(self):
        return self.field('name', str, check=WS_NAME.fullmatch)


class WSRegisterHandler(WSHandler):
    async def put(self):
        name = self.ws_name()
        url = self.field('url', str)
        if not is_host(url):
            raise APIError(400, 'url must be a host name or IPv4 address '
                           '(no scheme, no port)')
        port = port_number(self.field('http_port', (int, str)))
        if port is None:
            raise APIError(400, 'http_port must be a port number (1-65535)')
        if not await register(self.application, name, url, port,
                              self.request.remote_ip):
            raise APIError(409, 'workserver %s is online from another '
                           'address' % name)
        self.application.ws_back(name)
        log.info('workserver %s registered at %s:%s', name, url, port)
        self.write_json({})


class WSDisconnectHandler(WSHandler):
    async def put(self):
        name = self.ws_name()
        done = await disconnect(self.application, name,
                                self.request.remote_ip)
        if done == -1:
            raise APIError(404, 'unknown workserver %s' % name)
        if done == 0:
            raise APIError(409, 'workserver %s is online from another '
                           'address' % name)
        log.info('workserver %s disconnected', name)
        self.write_json({})


class WSRemoveHandler(AccountHandler):
    async def put(self, name):
        manager = await self.require_manager()
        if not manager.is_admin:
            raise APIError(403, 'only an admin may remove a workserver')
        done = await remove(self.application, name)
        if done == -1:
            raise APIError(404, 'unknown workserver %s' % name)
        if done == 0:
            raise APIError(409, 'workserver %s is online: it can be removed '
                           'once offline' % name)
        log.info('workserver %s removed by %s', name, manager.email)
        self.write_json({})


class WSStatusHandler(APIHandler):
    async def get(self):
        self.write_json(await status(self.application))


default_handlers = [
    (r'/ws/register', WSRegisterHandler),
    (r'/ws/disconnect', WSDisconnectHandler),
    (r'/ws/status', WSStatusHandler),
    (r'/ws/remove/([^/]+)', WSRemoveHandler),
]
