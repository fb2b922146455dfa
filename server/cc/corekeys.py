"""Core keys (the 2015 form): which cores may ask for work.

An admin creates a key per engine (`POST /engines/keys`), ships it inside a
core build, and revokes it (`PUT /engines/keys/delete/:key_id`) when that
build is outdated. The key is shown once; Redis keeps only sha256(key) ->
key id, as for tokens. A core sends it as `Authorization: <key>` on
`POST /core/assign` and the key decides the engine.

With `require_core_keys` off, a core without a key is served the 2014 way
(engine from the body); a key that is sent is checked all the same.

A key may be made with its own assignment limits (`limits: {held,
per_minute}`, e.g. for a cluster behind one address): its cores then count
as one client with those limits (assign.py) instead of per donor or
address with the anonymous ones.
"""
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from server import tokens
from server.cc import keys
from server.cc.targets import ENGINE
from server.lua import Script
from server.web import APIError, APIHandler, Permission, allow, role

log = logging.getLogger('siegetank.cc.corekeys')

KEY_ID = re.compile(r'[0-9a-f]{16}')

UPDATE = 'this core is outdated or not an official build: update it'
LIMITS = ('held', 'per_minute')
LIMIT_MAX = 10 ** 6


def valid_limits(limits: dict[str, Any]) -> bool:
    """{held?, per_minute?}: integers from 1 to LIMIT_MAX, nothing else."""
    return set(limits) <= set(LIMITS) and all(
        isinstance(v, int) and not isinstance(v, bool)
        and 1 <= v <= LIMIT_MAX for v in limits.values())


class CoreKeyUse(NamedTuple):
    """What the `core_key` role gives a handler: the key's engine, id and
    own limits ({held?, per_minute?}, None: the anonymous ones)."""

    engine: str
    key_id: str
    limits: dict[str, int] | None


@dataclass(frozen=True)
class CoreKey:
    """The record `core_key:<id>` (keys.py); a revoked key is kept so its
    cores hear why they are refused."""

    key_id: str
    engine: str
    description: str
    creation_date: float
    last_used: float | None
    revoked: bool = False
    limits: dict[str, int] | None = None  # its own assignment limits

    @classmethod
    def from_hash(cls, key_id: str, h: dict[str, str]) -> 'CoreKey':
        return cls(key_id, h['engine'], h['description'],
                   float(h['creation_date']),
                   float(h['last_used']) if h['last_used'] else None,
                   h.get('revoked') == '1',
                   json.loads(h['limits']) if h.get('limits') else None)

    def to_hash(self) -> dict[str, str]:
        return {'engine': self.engine, 'description': self.description,
                'creation_date': repr(self.creation_date),
                'last_used': '' if self.last_used is None
                else repr(self.last_used),
                'revoked': '1' if self.revoked else '0',
                'limits': '' if self.limits is None
                else json.dumps(self.limits)}

    def listed(self) -> dict[str, Any]:
        """As GET /engines/keys lists it."""
        found = {'engine': self.engine, 'description': self.description,
                 'creation_date': self.creation_date,
                 'last_used': self.last_used}
        if self.limits is not None:
            found['limits'] = self.limits
        return found


class Use(NamedTuple):
    """_USE's verdict, and the engine, id and limits (JSON or '') of a LIVE
    key."""
    verdict: int
    engine: str | None = None
    key_id: str | None = None
    limits: str = ''


_USE = Script("""
-- The key's engine, and its last use recorded, in one step.
-- Returns {0} unknown, {1} revoked, {2, engine, key id, limits} (a Use).
local id = redis.call('GET', core_key_hash)
if not id then return {0} end
local key = string.format(core_key, id)
local k = redis.call('HMGET', key, 'engine', 'revoked', 'limits')
if not k[1] then return {0} end
if k[2] == '1' then return {1} end
redis.call('HSET', key, 'last_used', now)
return {2, k[1], id, k[3] or ''}
""", keys=('core_key_hash',), walks=('core_key',), args=('now',),
    returns=Use)
UNKNOWN, REVOKED, LIVE = 0, 1, 2  # _USE's verdicts


async def create(redis: Any, engine: str, description: str,
                 limits: dict[str, int] | None = None) -> tuple[str, str]:
    """(key_id, key)."""
    key, key_hash = tokens.new_token()
    record = CoreKey(secrets.token_hex(8), engine, description, time.time(),
                     None, limits=limits)
    key_id = record.key_id
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.core_key(key_id), mapping=record.to_hash())
    pipe.set(keys.core_key_hash(key_hash), key_id)
    pipe.sadd(keys.CORE_KEYS, key_id)
    await pipe.execute()
    return key_id, key


async def listing(redis: Any) -> dict[str, dict[str, Any]]:
    """{key_id: {engine, description, creation_date, last_used}} of the
    live keys."""
    ids = sorted(await redis.smembers(keys.CORE_KEYS))
    pipe = redis.pipeline(transaction=False)
    for key_id in ids:
        pipe.hgetall(keys.core_key(key_id))
    out = {}
    for key_id, h in zip(ids, await pipe.execute(), strict=True):
        if h:
            out[key_id] = CoreKey.from_hash(key_id, h).listed()
    return out


async def revoke(redis: Any, key_id: str) -> bool:
    """False for an unknown or already revoked key."""
    if not await redis.srem(keys.CORE_KEYS, key_id):
        return False
    await redis.hset(keys.core_key(key_id), 'revoked', '1')
    return True


@role('core_key', 'a core key is required')
async def _core_key(handler: APIHandler,
                    rule: Permission) -> CoreKeyUse | None:
    """The core key in `Authorization` (its engine, id and limits), None
    when there is none and none is required; 401 (saying the core must be
    updated) for a missing, unknown or revoked key."""
    key = handler.token()
    if key is None:
        if handler.config.require_core_keys:
            raise APIError(401, 'this command center requires a core key '
                           '(Authorization): %s' % UPDATE)
        return None
    found: Use = await _USE(
        handler.redis, core_key_hash=keys.core_key_hash(
            tokens.token_hash(key)),
        core_key=keys.core_key.template, now=repr(time.time()))
    if found.verdict == UNKNOWN:
        raise APIError(401, 'unknown core key: %s' % UPDATE)
    if found.verdict == REVOKED:
        raise APIError(401, 'this core key has been revoked: %s' % UPDATE)
    assert found.engine is not None and found.key_id is not None  # LIVE
    return CoreKeyUse(found.engine, found.key_id,
                      json.loads(found.limits) if found.limits else None)


class KeysHandler(APIHandler):
    @allow('admin', purpose='manage core keys')
    async def get(self) -> None:
        self.write_json(await listing(self.redis))

    @allow('admin', purpose='manage core keys')
    async def post(self) -> None:
        engine = self.field('engine', str, check=ENGINE.fullmatch)
        description = self.field('description', str, '',
                                 check=lambda d: len(d) <= 1024)
        limits = self.field('limits', (dict, type(None)), None,
                            check=lambda v: v is None or valid_limits(v))
        key_id, key = await create(self.redis, engine, description, limits)
        log.info('core key %s created for engine %s', key_id, engine)
        self.write_json({'key': key, 'key_id': key_id})


class RevokeHandler(APIHandler):
    @allow('admin', purpose='manage core keys')
    async def put(self, key_id: str) -> None:
        if not (KEY_ID.fullmatch(key_id)
                and await revoke(self.redis, key_id)):
            raise APIError(404, 'no live core key %s' % key_id)
        log.info('core key %s revoked', key_id)
        self.write_json({})


default_handlers = [
    (r'/engines/keys', KeysHandler),
    (r'/engines/keys/delete/([^/]+)', RevokeHandler),
]
