"""Core keys (the 2015 form): which cores may ask for work.

An admin creates a key per engine (`POST /engines/keys`), ships it inside a
core build, and revokes it (`PUT /engines/keys/delete/:key_id`) when that
build is outdated. The key is shown once; Redis keeps only sha256(key) ->
key id, as for tokens. A core sends it as `Authorization: <key>` on
`POST /core/assign` and the key decides the engine.

With `require_core_keys` off, a core without a key is served the 2014 way
(engine from the body); a key that is sent is checked all the same.
"""
import logging
import re
import secrets
import time

from server import tokens
from server.cc import accounts, keys
from server.cc.targets import ENGINE
from server.lua import Script
from server.web import APIError

log = logging.getLogger('siegetank.cc.corekeys')

KEY_ID = re.compile(r'[0-9a-f]{16}')

UPDATE = 'this core is outdated or not an official build: update it'

# The key's engine, and its last use recorded, in one step. Returns
# {0} unknown, {1} revoked, {2, engine}.
_USE = Script("""
local id = redis.call('GET', KEYS[1])
if not id then return {0} end
local key = string.format(ARGV[1], id)
local k = redis.call('HMGET', key, 'engine', 'revoked')
if not k[1] then return {0} end
if k[2] == '1' then return {1} end
redis.call('HSET', key, 'last_used', ARGV[2])
return {2, k[1]}
""")


async def create(redis, engine, description):
    """(key_id, key)."""
    key, key_hash = tokens.new_token()
    key_id = secrets.token_hex(8)
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.core_key(key_id), mapping={
        'engine': engine, 'description': description,
        'creation_date': repr(time.time()), 'last_used': '',
        'revoked': '0'})
    pipe.set(keys.core_key_hash(key_hash), key_id)
    pipe.sadd(keys.CORE_KEYS, key_id)
    await pipe.execute()
    return key_id, key


async def listing(redis):
    """{key_id: {engine, description, creation_date, last_used}} of the
    live keys."""
    ids = sorted(await redis.smembers(keys.CORE_KEYS))
    pipe = redis.pipeline(transaction=False)
    for key_id in ids:
        pipe.hgetall(keys.core_key(key_id))
    out = {}
    for key_id, h in zip(ids, await pipe.execute(), strict=True):
        if h:
            out[key_id] = {
                'engine': h['engine'], 'description': h['description'],
                'creation_date': float(h['creation_date']),
                'last_used': float(h['last_used']) if h['last_used']
                else None}
    return out


async def revoke(redis, key_id):
    """False for an unknown or already revoked key."""
    if not await redis.srem(keys.CORE_KEYS, key_id):
        return False
    await redis.hset(keys.core_key(key_id), 'revoked', '1')
    return True


async def engine_of(handler):
    """The engine of the core key in `Authorization`, None when there is
    none and none is required; 401 (saying the core must be updated) for
    a missing, unknown or revoked key."""
    key = handler.token()
    if key is None:
        if handler.config.require_core_keys:
            raise APIError(401, 'this command center requires a core key '
                           '(Authorization): %s' % UPDATE)
        return None
    found = await _USE(handler.redis, [keys.core_key_hash(
        tokens.token_hash(key))], [keys.core_key.template, repr(time.time())])
    if found[0] == 0:
        raise APIError(401, 'unknown core key: %s' % UPDATE)
    if found[0] == 1:
        raise APIError(401, 'this core key has been revoked: %s' % UPDATE)
    return found[1]


class AdminHandler(accounts.AccountHandler):
    """Core keys are an admin's business only."""

    async def authenticate(self):
        m = await self.require_manager()
        if not m.is_admin:
            raise APIError(403, 'only an admin may manage core keys')


class KeysHandler(AdminHandler):
    async def get(self):
        self.write_json(await listing(self.redis))

    async def post(self):
        engine = self.field('engine', str, check=ENGINE.fullmatch)
        description = self.field('description', str, '',
                                 check=lambda d: len(d) <= 1024)
        key_id, key = await create(self.redis, engine, description)
        log.info('core key %s created for engine %s', key_id, engine)
        self.write_json({'key': key, 'key_id': key_id})


class RevokeHandler(AdminHandler):
    async def put(self, key_id):
        if not (KEY_ID.fullmatch(key_id)
                and await revoke(self.redis, key_id)):
            raise APIError(404, 'no live core key %s' % key_id)
        log.info('core key %s revoked', key_id)
        self.write_json({})


default_handlers = [
    (r'/engines/keys', KeysHandler),
    (r'/engines/keys/delete/([^/]+)', RevokeHandler),
]
