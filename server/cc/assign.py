"""POST /core/assign: hand a core a stream to work on.

1. Candidates: targets of the `public` stage index (plus `beta` when the
   core asks for it), or just `target_id` when given; `private` never.
   Keep those whose engine matches and whose engine_versions contain the
   core's engine_version, and that have streams on an online WS: one Lua
   call reads all of it, the WS addresses included.
2. Order the candidates by weighted random sampling without replacement
   (key u ** (1 / weight), largest first), so each is tried first with
   probability proportional to its weight.
3. For a target, order its online WS the same way, weighted by how many of
   the target's streams each holds, and ask each to activate a stream
   (`POST /streams/activate`, atomic on the WS, so concurrent cores never
   share a stream; batched with the other assignments' activations on
   that WS, see activations.py). A WS that fails or has nothing free is
   skipped.
4. First success wins: `{token, uri, url, options}`. Nothing anywhere: 503.

Abuse controls, in the same Lua call as step 1: each client (a core key
made with its own limits, else the donor of `donor_token`, else the source
address, an IPv6 one by its /64) may hold `client_max_held_streams` streams
at once (a key with limits: its `held`) and ask `client_assigns_per_minute`
times a minute (its `per_minute`); over either it gets 429 with
`Retry-After`. A hold counts while its stream is held, however old: the
WS names the session an activation starts, and the hold is given back when
that session's record comes (collect.py: stop, error, missed heartbeats,
deletion, WS restart), or after `client_hold_max_in_s` if it never does (a
WS gone for good). An activation whose session the WS does not name (an
older WS) counts `client_hold_in_s` seconds (its early windows). An
assignment that found nothing (503) does not count as held.
"""
import ipaddress
import json
import random
import time
import uuid
from typing import Any, NamedTuple

from server import metrics
from server.cc import (
    corekeys,  # noqa: F401 (the 'core_key' role)
    keys,
    status,
    targets,
    workservers,
)
from server.lua import Script
from server.tokens import token_hash
from server.web import APIError, APIHandler, allow, check_target_id, too_many


def weighted_order(weights):
    """Items of {item: weight > 0} in a random order where each position is
    filled with probability proportional to weight (Efraimidis-Spirakis)."""
    keyed = [(random.random() ** (1.0 / w), item)
             for item, w in weights.items() if w > 0]
    keyed.sort(reverse=True)
    return [item for _, item in keyed]


class Admission(NamedTuple):
    """_CANDIDATES' reply (see there)."""
    donor: str | None
    rows: list[list[Any]]
    retry_after: int
    client: str


_CANDIDATES = Script("""
-- Admission and every candidate in one round trip.
-- stages: the stage index sets to draw from; target_id: a named target or
-- ''; donor_hash: the hash of the donor's token or ''; address: the
-- client's; client_held, client_rate: a client's held set and rate
-- counter; member: fresh, for the held set.
-- key_client: 'key:<id>' for a core key with its own limits, or ''.
-- Returns {donor, candidates, retry_after, client}: donor is '' when not
-- asked, nil for an unknown token, else the username; the client is
-- key_client, 'donor:<username>' or the address; retry_after > 0 means
-- refused (429): the client holds max_held streams, or asked
-- max_per_minute this minute. Admitted, the assignment is held (until
-- now + hold_s, or until given back or confirmed by HOLD with its
-- session). Each candidate is a target
-- whose engine and versions match, with streams on an online WS:
-- {target_id, weight, options, ws, count, url, port, ws, count, ...}.
""" + targets.MATCH_LUA + workservers.ADDRESS_LUA + """
now, max_held, hold_s = tonumber(now), tonumber(max_held), tonumber(hold_s)
max_per_minute = tonumber(max_per_minute)
local donor = ''
if donor_hash ~= '' then
  donor = redis.call('GET', string.format(donor_token, donor_hash))
  if not donor then return {false, {}, 0, ''} end
end
local client = address
if donor ~= '' then client = 'donor:' .. donor end
if key_client ~= '' then client = key_client end
local held = string.format(client_held, client)
redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
if redis.call('ZCARD', held) >= max_held then
  -- a hold ends with its session: retry within the early windows, when
  -- at least the abandoned ones are over
  local first = redis.call('ZRANGE', held, 0, 0, 'WITHSCORES')
  return {donor, {}, math.max(1, math.min(hold_s,
    math.ceil(tonumber(first[2]) - now))), client}
end
local rate = string.format(client_rate, client)
local asked = redis.call('INCR', rate)
local ttl = redis.call('TTL', rate)
if ttl < 0 then
  redis.call('EXPIRE', rate, 60)
  ttl = 60
end
if asked > max_per_minute then return {donor, {}, ttl, client} end
redis.call('ZADD', held, now + hold_s, member)
if redis.call('TTL', held) < hold_s + 1 then
  redis.call('EXPIRE', held, hold_s + 1)
end
local ids
if target_id ~= '' then
  ids = {}
  for _, stage in ipairs(stages) do
    if redis.call('SISMEMBER', stage, target_id) == 1 then
      ids = {target_id}
      break
    end
  end
else
  ids = redis.call('SUNION', unpack(stages))
end
local ws_info = {}
local result = {}
for _, tid in ipairs(ids) do
  local weight, options = target_match(string.format(target, tid),
                                       engine, version)
  if weight then
    local entry = {tid, weight, options}
    local counts = redis.call('HGETALL', string.format(target_ws, tid))
    for i = 1, #counts, 2 do
      local name, n = counts[i], tonumber(counts[i + 1])
      if n and n > 0 then
        local w = ws_info[name]
        if w == nil then
          w = {ws_address(string.format(ws, name))}
          ws_info[name] = w
        end
        if w[1] then
          entry[#entry + 1] = name
          entry[#entry + 1] = n
          entry[#entry + 1] = w[1]
          entry[#entry + 1] = w[2]
        end
      end
    end
    if #entry > 3 then result[#result + 1] = entry end
  end
end
return {donor, result, 0, client}
""", keys=('*stages',),
    walks=('target', 'target_ws', 'ws', 'donor_token', 'client_held',
           'client_rate'),
    args=('engine', 'version', 'target_id', 'donor_hash', 'address', 'now',
          'max_held', 'hold_s', 'max_per_minute', 'member', 'key_client'),
    returns=Admission)

_HOLD = Script("""
-- An admitted assignment got its stream: its hold becomes the session's,
-- counted until the session's record comes (RELEASE) or hold_max_s.
redis.call('ZREM', held, member)
redis.call('ZADD', held, tonumber(now) + tonumber(hold_max_s), session)
if redis.call('TTL', held) < tonumber(hold_max_s) + 1 then
  redis.call('EXPIRE', held, tonumber(hold_max_s) + 1)
end
redis.call('SET', hold, client, 'EX', hold_max_s)
return 1
""", keys=('held', 'hold'),
   args=('member', 'session', 'client', 'now', 'hold_max_s'))

_RELEASE = Script("""
-- Sessions that ended (their records came): their holds are given back.
-- Returns how many were held.
local n = 0
for _, session in ipairs(cjson.decode(sessions)) do
  local key = string.format(hold, session)
  local client = redis.call('GET', key)
  if client then
    redis.call('ZREM', string.format(held, client), session)
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
""", walks=('hold', 'held'), args=('sessions',))


def client_of(address):
    """Who an anonymous core is, for the abuse controls: its address, an
    IPv6 one by its /64 (one host often has a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return 'addr:%s' % address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return 'addr:%s' % ip.ipv4_mapped
        return 'addr:%s/64' % ipaddress.ip_network(
            (ip, 64), strict=False).network_address
    return 'addr:%s' % ip


class Admitted:
    """An assignment the abuse controls let through: who asked (`donor`,
    `client`) and its place among the client's held assignments."""

    def __init__(self, donor, client, member):
        self.donor, self.client, self.member = donor, client, member

    async def give_back(self, redis):
        """Nothing was assigned: it does not count as held."""
        await redis.zrem(keys.client_held(self.client), self.member)

    async def hold(self, app, session):
        """The stream is the client's: held until `session` ends."""
        await _HOLD(app.redis, held=keys.client_held(self.client),
                    hold=keys.hold(session), member=self.member,
                    session=session, client=self.client,
                    now=repr(time.time()),
                    hold_max_s=app.config.client_hold_max_in_s)


async def release(redis, sessions):
    """Give back the holds of sessions that ended (their records came
    from a WS; collect.py); returns how many were held."""
    ids = [s for s in sessions if isinstance(s, str) and 0 < len(s) <= 200]
    if not ids:
        return 0
    return await _RELEASE(redis, hold=keys.hold.template,
                          held=keys.client_held.template,
                          sessions=json.dumps(ids))


def limits(app, key):
    """(key_client, max_held, max_per_minute) for a core with `key` (the
    core_key role's CoreKeyUse, or None): a key made with limits counts as
    one client with its own; else the anonymous limits."""
    config = app.config
    held, per_minute = (config.client_max_held_streams,
                        config.client_assigns_per_minute)
    if key is None or key.limits is None:
        return '', held, per_minute
    return ('key:%s' % key.key_id, key.limits.get('held', held),
            key.limits.get('per_minute', per_minute))


async def candidates(app, engine, version, stages, target_id, donor_token,
                     address, key=None):
    """(Admitted, [(target_id, weight, options, {online ws: (stream count,
    base url)})]) of the targets that could serve, read in one Lua call
    with the admission; 401 for an unknown donor token, 429 (Retry-After)
    for a client over its limits."""
    config = app.config
    key_client, max_held, max_per_minute = limits(app, key)
    member = uuid.uuid4().hex
    got: Admission = await _CANDIDATES(
        app.fastredis, stages=[keys.stage_targets(s) for s in stages],
        target=keys.target.template, target_ws=keys.target_ws.template,
        ws=keys.ws.template, donor_token=keys.donor_token.template,
        client_held=keys.client_held.template,
        client_rate=keys.client_rate.template, engine=engine,
        version=version, target_id=target_id or '',
        donor_hash=token_hash(donor_token) if donor_token else '',
        address=client_of(address), now=repr(time.time()),
        max_held=max_held, hold_s=config.client_hold_in_s,
        max_per_minute=max_per_minute, member=member, key_client=key_client)
    donor, retry = got.donor, got.retry_after
    if donor is None:
        raise APIError(401, 'unknown donor token')
    if retry:
        raise too_many('too many assignments for %s: at most %d streams '
                       'held at once and %d asked per minute; retry later'
                       % ('this core key' if key_client else 'this donor'
                          if donor else 'this address', max_held,
                          max_per_minute), retry)
    result = []
    for row in got.rows:
        ws = {row[i]: (int(row[i + 1]), 'https://%s:%s' % (row[i + 2],
                                                           row[i + 3]))
              for i in range(3, len(row), 4)}
        result.append((row[0], float(row[1]), row[2], ws))
    return Admitted(donor or None, got.client, member), result


async def activate(app, ws, base, target_id, admitted, core=None):
    """A token from `ws` (at `base`) for a free stream of the target, or
    None; the client holds it until its session ends. The WS learns who
    the client is (error stops count once per network or donor and
    stream, if `core` says `vouched`); `core`
    ({engine, core_version}) goes into the session record. Batched with
    other assignments' (activations.py)."""
    body = dict(core or {}, target_id=target_id, client=admitted.client)
    if admitted.donor is not None:
        body['donor_id'] = admitted.donor
    got = await app.activations.activate(ws, base, body)
    if got is None:
        return None
    token, session = got
    if session is not None:
        await admitted.hold(app, session)
    return token


async def vouched(app, admitted, keyed):
    """Whether the WS may count this client's error stops toward stopping
    a stream (server/ws/error_stops.py): a core key, or a donor with
    credited frames."""
    if keyed:
        return True
    return admitted.donor is not None and bool(await app.redis.zscore(
        keys.DONORS_BY_FRAMES, admitted.donor))


async def assign(app, engine, version, stages, donor_token, address,
                 target_id=None, core_version=None, key=None):
    """(token, url, options) of an activated stream, or None when nothing
    is free. Options stay the JSON text the target stored (no decoding and
    encoding again). `key`: the core key the core came with (corekeys
    CoreKeyUse), or None."""
    admitted, found = await candidates(app, engine, version, stages,
                                       target_id, donor_token, address, key)
    found = {tid: (weight, options, ws)
             for tid, weight, options, ws in found}
    try:
        core = {'engine': engine, 'core_version': core_version or ''}
        if found and await vouched(app, admitted, key is not None):
            core['vouched'] = True
        for tid in weighted_order({tid: c[0] for tid, c in found.items()}):
            _, options, ws = found[tid]
            for name in weighted_order({n: c for n, (c, _) in ws.items()}):
                base = ws[name][1]
                token = await activate(app, name, base, tid, admitted, core)
                if token is not None:
                    admitted = None
                    return token, base + '/core/start', options
        return None
    finally:
        if admitted is not None:
            await admitted.give_back(app.redis)


class AssignHandler(APIHandler):
    def on_finish(self):
        code = self.get_status()
        outcome = ('assigned' if code == 200 else 'no_work' if code == 503
                   else 'refused')
        metrics.count('assignments', label=outcome)

    @allow('core_key', 'anyone')
    async def post(self) -> None:
        """A core key, if one is sent or required (corekeys.py)."""
        try:
            await self.assign()
        except APIError as e:
            if e.status_code == 503:
                status.count(self.application, 'no_work')
            raise
        status.count(self.application, 'assignments')

    def core_engine(self):
        """The engine: the core key's (a body engine that differs is a
        400), else the body's (2014 cores, keys not required)."""
        key = self.caller  # the core key used (CoreKeyUse), or None
        engine = key.engine if key is not None else None
        said = self.field('engine', str, None, check=targets.ENGINE.fullmatch)
        if engine is None:
            if said is None:
                raise APIError(400, 'missing field engine')
            return said
        if said is not None and said != engine:
            raise APIError(400, 'engine %s differs from the engine of this '
                           'core key (%s)' % (said, engine))
        return engine

    async def assign(self):
        engine = self.core_engine()
        version = self.field('engine_version', str,
                             check=lambda v: 0 < len(v) <= 64)
        core_version = self.field('core_version', str, None,
                                  check=lambda v: len(v) <= 64)
        stage = self.field('stage', str, 'public',
                           check=lambda s: s in ('public', 'beta'))
        donor_token = self.field('donor_token', (str, type(None)), None)
        target_id = self.field('target_id', (str, type(None)), None)
        stages = ('public', 'beta') if stage == 'beta' else ('public',)
        if target_id is not None:
            check_target_id(target_id)
            target = await targets.load(self.application, target_id)
            if target is None:
                raise APIError(404, 'no such target %s' % target_id)
            if target.stage == 'private':
                raise APIError(403, 'target %s is private' % target_id)
            # Naming a beta target is asking for beta.
            stages = ('public', 'beta')
        found = await assign(self.application, engine, version, stages,
                             donor_token, self.request.remote_ip, target_id,
                             core_version, self.caller)
        if found is None:
            raise APIError(503, 'no stream available for %s %s'
                           % (engine, version))
        token, url, options = found
        head = json.dumps({'token': token, 'uri': url, 'url': url})
        self.set_status(200)
        self.finish('%s, "options": %s}' % (head[:-1], options))


default_handlers = [
    (r'/core/assign', AssignHandler),
]
