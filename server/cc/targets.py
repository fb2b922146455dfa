"""Targets: what a manager simulates (files, options, engine versions) and
who gets it (stage, allowed workservers, weight).

A target is a Redis hash plus index sets (every target, by owner, by stage);
its files are a hash in the same shared store (at most `max_body_size` in
all, as the request that brought them), so every CC host serves and
forwards them and none keeps anything on its disk. Deleting a target
removes it here at once and on every WS that holds it; a WS that does
not answer keeps the deletion pending (per WS set in Redis) until a probe
or a re-registration shows it is back.
"""
import asyncio
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from redis.exceptions import WatchError

from server import peer, store
from server.cc import keys, stream_map, workservers
from server.cc.accounts import Manager, valid_weight
from server.lua import Script
from server.web import (
    REQUIRED,
    APIError,
    APIHandler,
    allow,
    check_file_name,
    check_files,
    check_target_id,
    decode_files,
)

log = logging.getLogger('siegetank.cc.targets')

STAGES = ('private', 'beta', 'public')
ENGINE = re.compile(r'[A-Za-z0-9._-]{1,64}')


def valid_versions(v: list[Any]) -> bool:
    return 0 < len(v) <= 64 and all(isinstance(x, str) and 0 < len(x) <= 64
                                    for x in v)


# What a manager sets, checked the same way on creation and update:
# name -> (type, default on creation (REQUIRED: must be given), check).
Rule = tuple[Any, Any, Callable[[Any], Any] | None]
FIELDS: dict[str, Rule] = {
    'description': (str, '', None),
    'engine': (str, REQUIRED, ENGINE.fullmatch),
    'engine_versions': (list, REQUIRED, valid_versions),
    'options': (dict, {}, None),
    'stage': (str, 'private', lambda s: s in STAGES),
    'weight': ((int, float), 1, valid_weight),
    'allowed_ws': (list, [], None),
}
UPDATABLE = ('stage', 'allowed_ws', 'engine_versions', 'description',
             'options', 'weight')


@dataclass
class Target:
    """The record `target:<id>` (keys.py): only this module reads or writes
    its fields; the assignment's Lua reaches them through MATCH_LUA."""

    target_id: str
    owner: str
    engine: str
    engine_versions: list[str]
    description: str = ''
    stage: str = 'private'
    weight: float = 1.0
    allowed_ws: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # names, sorted
    creation_date: float = 0.0
    file_bytes: int = 0  # counted against the owner's quota (files_size)

    JSON = ('engine_versions', 'allowed_ws', 'options', 'files')

    @classmethod
    def from_hash(cls, target_id: str, h: dict[str, str]) -> 'Target':
        return cls(target_id=target_id, owner=h['owner'],
                   engine=h['engine'], description=h['description'],
                   stage=h['stage'], weight=float(h['weight']),
                   creation_date=float(h['creation_date']),
                   file_bytes=int(h.get('file_bytes') or 0),
                   **{f: json.loads(h[f]) for f in cls.JSON})

    def to_hash(self) -> dict[str, str]:
        return {'owner': self.owner, 'creation_date': repr(self.creation_date),
                'description': self.description, 'stage': self.stage,
                'engine': self.engine, 'weight': repr(float(self.weight)),
                'file_bytes': str(self.file_bytes),
                **{f: json.dumps(getattr(self, f)) for f in self.JSON}}

    def info(self, striated_ws: list[str]) -> dict[str, Any]:
        """GET /targets/info/:id."""
        return {'description': self.description, 'owner': self.owner,
                'creation_date': self.creation_date, 'stage': self.stage,
                'allowed_ws': self.allowed_ws, 'striated_ws': striated_ws,
                'engine': self.engine,
                'engine_versions': self.engine_versions,
                'files': self.files, 'options': self.options,
                'weight': self.weight}


def _stored(name: str, value: Any) -> str:
    """A field's value as the target hash holds it."""
    if name in Target.JSON:
        return json.dumps(value)
    if name == 'weight':
        return repr(float(value))
    return value


# A Lua function for the assignment's script (spliced at its top): the
# weight and options (JSON text) of the target at `key` if its engine is
# `engine` and its engine_versions hold `version`, else nil.
MATCH_LUA = """
local function target_match(key, engine, version)
  local t = redis.call('HMGET', key, 'engine', 'engine_versions', 'weight',
                       'options')
  if t[1] ~= engine or not t[2] then return nil end
  for _, v in ipairs(cjson.decode(t[2])) do
    if v == version then return t[3], t[4] end
  end
  return nil
end
"""

_CREATE = Script("""
-- A target becomes visible with its files made permanent: it joins
-- every target's set (all), its owner's (owned) and its stage's (staged).
-- fields: the record's field/value pairs. Returns 1.
redis.call('PERSIST', files)
redis.call('HSET', target, unpack(fields))
for _, set in ipairs({all, owned, staged}) do
  redis.call('SADD', set, target_id)
end
return 1
""", keys=('target', 'all', 'owned', 'staged', 'files'),
    args=('target_id', '*fields'))
UNCLAIMED_FILES_MS = 24 * 3600 * 1000

_TAKE_BYTES = Script("""
-- Count `size` more bytes of target files for `owner`, unless that passes
-- the manager's quota or the total one. Returns 0 (counted), 1 (over the
-- manager's quota) or 2 (over the total).
local mine = tonumber(redis.call('HGET', per_manager, owner) or '0')
local all = tonumber(redis.call('GET', total) or '0')
size = tonumber(size)
if mine + size > tonumber(max_manager) then return 1 end
if all + size > tonumber(max_total) then return 2 end
redis.call('HINCRBY', per_manager, owner, size)
redis.call('INCRBY', total, size)
return 0
""", keys=('per_manager', 'total'),
   args=('owner', 'size', 'max_manager', 'max_total'))

_GIVE_BYTES = Script("""
-- Count `size` fewer bytes of target files for `owner`. Returns 1.
size = tonumber(size)
if redis.call('HINCRBY', per_manager, owner, -size) <= 0 then
  redis.call('HDEL', per_manager, owner)
end
if redis.call('DECRBY', total, size) <= 0 then redis.call('DEL', total) end
return 1
""", keys=('per_manager', 'total'), args=('owner', 'size'))


def files_size(files: dict[str, str]) -> int:
    """The bytes target files take in the store, as the quotas count
    them (the text as sent, UTF-8, with its name)."""
    return sum(len(name) + len(text.encode('utf-8'))
               for name, text in files.items())


async def take_bytes(app: Any, owner: str, size: int) -> None:
    """Count a new target's file bytes before they reach the store:
    507 past the manager's quota or the total one."""
    if not size:
        return
    config = app.config
    over = await _TAKE_BYTES(
        app.redis, per_manager=keys.TARGET_BYTES, total=keys.TARGET_BYTES_ALL,
        owner=owner, size=size,
        max_manager=config.max_target_files_per_manager_in_bytes,
        max_total=config.max_target_files_total_in_bytes)
    if over == 1:
        raise APIError(507, 'target files of %s would take more than the '
                       '%d bytes a manager may keep (this target: %d bytes);'
                       ' delete targets first'
                       % (owner, config.max_target_files_per_manager_in_bytes,
                          size))
    if over == 2:
        raise APIError(507, 'the store of target files is full (%d bytes '
                       'in all); retry later or ask the operators'
                       % config.max_target_files_total_in_bytes)


async def give_bytes(app: Any, owner: str, size: int) -> None:
    if size:
        await _GIVE_BYTES(app.redis, per_manager=keys.TARGET_BYTES,
                          total=keys.TARGET_BYTES_ALL, owner=owner,
                          size=size)

_UPDATE = Script("""
-- Change only the given fields (field/value pairs), and the stage index
-- with the stage, unless the target was deleted meanwhile. stages: none,
-- or (a stage change) every stage's set and then the new stage's set.
-- Returns 1, or 0 for a target that is gone.
if redis.call('EXISTS', target) == 0 then return 0 end
for i = 1, #fields, 2 do
  redis.call('HSET', target, fields[i], fields[i + 1])
end
if #stages > 0 then
  for i = 1, #stages - 1 do redis.call('SREM', stages[i], target_id) end
  redis.call('SADD', stages[#stages], target_id)
end
return 1
""", keys=('target', '*stages'), args=('target_id', '*fields'))


async def read_files(app, target_id, names):
    """{name: str} as the manager sent them, to forward to a WS; a file
    missing from the store (the target was deleted meanwhile) is a 404."""
    if not names:
        return {}
    values = await app.redis.hmget(keys.target_files(target_id), names)
    if any(v is None for v in values):
        raise APIError(404, 'target %s was deleted' % target_id)
    return dict(zip(names, values, strict=True))


def import_disk_files(settings, redis_url):
    """A CC before the shared store kept target files in
    data_folder/targets/<id>/: put those of targets that still exist into
    Redis (unless there already), then remove the folders. Runs at start."""
    folder = os.path.join(settings.data_folder, 'targets')
    if not os.path.isdir(folder):
        return
    redis = store.connect_sync(redis_url)
    try:
        for tid in sorted(os.listdir(folder)):
            path = os.path.join(folder, tid)
            names = redis.hget(keys.target(tid), 'files')
            if names and not redis.exists(keys.target_files(tid)):
                files = {}
                for name in json.loads(names):
                    with open(os.path.join(path, name), 'rb') as f:
                        files[name] = f.read().decode('utf-8')
                if files:
                    redis.hset(keys.target_files(tid), mapping=files)
                log.info('target %s: %d files moved into the store', tid,
                         len(files))
            shutil.rmtree(path)
    finally:
        redis.close()


async def validate_files(config, files, max_files, what='files',
                         allow_empty=False):
    """Names, count, types and encodings (base64, gzip, within the decoded
    size limits) checked; off the loop unless small."""
    check_files(files, what, allow_empty=allow_empty, max_files=max_files)
    await decode_files(config, files, keep=False)


async def check_allowed_ws(app, names):
    if not all(isinstance(n, str) for n in names):
        raise APIError(400, 'allowed_ws must be a list of workserver names')
    known = await app.redis.smembers(keys.WORKSERVERS)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise APIError(400, 'unknown workserver(s): %s' % ', '.join(unknown))
    return sorted(set(names))


async def load(app: Any, target_id: str) -> Target | None:
    h = await app.redis.hgetall(keys.target(target_id))
    return Target.from_hash(target_id, h) if h else None


def read_label(pipe: Any, target_id: str) -> None:
    """Queue the read of what names a target to people on `pipe`: its
    reply is [description, owner] (None, None for a deleted target)."""
    pipe.hmget(keys.target(target_id), 'description', 'owner')


async def owned(app: Any, target_id: str, manager: Manager | None) -> Target:
    """The target if its id is well formed (400) and it exists (404), and
    `manager` owns it or is an admin (403); None: any caller may see it."""
    check_target_id(target_id)
    target = await load(app, target_id)
    if target is None:
        raise APIError(404, 'no such target %s' % target_id)
    if manager is not None and not manager.is_admin \
            and target.owner != manager.email:
        raise APIError(403, 'target %s belongs to another manager'
                       % target_id)
    return target


async def owns_target(handler: APIHandler, manager: Manager) -> Target:
    """`@allow(..., owner=owns_target)`: the target of the path's first
    argument, the caller's own (or any, for an admin)."""
    return await owned(handler.application, handler.path_args[0], manager)


async def read_fields(handler: APIHandler, names: list[str] | tuple[str, ...],
                      creating: bool) -> dict[str, Any]:
    """The target fields `names` of the body, each checked by its rule in
    FIELDS (400); on creation the absent take their defaults."""
    values = {}
    for name in names:
        kind, default, check = FIELDS[name]
        values[name] = handler.field(name, kind,
                                     default if creating else REQUIRED,
                                     check=check)
    if 'weight' in values:
        values['weight'] = float(values['weight'])
    if 'allowed_ws' in values:
        values['allowed_ws'] = await check_allowed_ws(handler.application,
                                                      values['allowed_ws'])
    return values


async def stream_counts(app, target_id):
    """{ws: number of the target's streams there} (only positive)."""
    counts = await app.redis.hgetall(keys.target_ws(target_id))
    return {ws: int(c) for ws, c in counts.items() if int(c) > 0}


async def create(app: Any, owner: str, fields: dict[str, Any],
                 files: dict[str, str]) -> str:
    """Files first, with an expiry (a CC dying before the next step leaves
    nothing behind for long), then the target in one step that makes them
    permanent, acknowledged by `redis_wait_replicas` replicas."""
    size = files_size(files)
    target = Target(target_id=str(uuid.uuid4()), owner=owner,
                    creation_date=time.time(), files=sorted(files),
                    file_bytes=size, **fields)
    tid = target.target_id
    await take_bytes(app, owner, size)
    try:
        if files:
            pipe = app.redis.pipeline(transaction=True)
            pipe.hset(keys.target_files(tid), mapping=files)
            pipe.pexpire(keys.target_files(tid), UNCLAIMED_FILES_MS)
            await pipe.execute()
        await store.acknowledged(
            app.redis, _CREATE, app.config.redis_wait_replicas,
            app.config.redis_wait_timeout_in_ms, target=keys.target(tid),
            all=keys.TARGETS, owned=keys.owner_targets(owner),
            staged=keys.stage_targets(target.stage),
            files=keys.target_files(tid), target_id=tid,
            fields=list(chain.from_iterable(target.to_hash().items())))
    except BaseException:
        # Refused (e.g. the store at its maxmemory) or cancelled: nothing
        # of it stays, and its bytes are not counted.
        await app.redis.delete(keys.target_files(tid))
        await give_bytes(app, owner, size)
        raise
    return tid


async def update(app: Any, target_id: str, changes: dict[str, Any]) -> bool:
    """Apply `changes` (read by read_fields); False if the target is gone."""
    pairs = [(name, _stored(name, value)) for name, value in changes.items()]
    stages = []
    if 'stage' in changes:
        stages = [keys.stage_targets(s) for s in STAGES]
        stages.append(keys.stage_targets(changes['stage']))
    return bool(await _UPDATE(
        app.redis, target=keys.target(target_id), stages=stages,
        target_id=target_id, fields=list(chain.from_iterable(pairs))))


async def _forget(redis, target_id):
    """Remove the target's records atomically, its file bytes from the
    quotas; returns (owner, ws names that hold anything of it) or None if
    it was already gone. Each of those WS gets a pending deletion, cleared
    once it confirms."""
    watched = (keys.target(target_id), keys.target_ws(target_id),
               keys.target_ws_files(target_id), keys.target_streams(target_id))
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(*watched)
                owner, size = await pipe.hmget(keys.target(target_id),
                                               'owner', 'file_bytes')
                if owner is None:
                    return None
                ws = set(await pipe.hkeys(keys.target_ws(target_id)))
                ws |= set(await pipe.smembers(
                    keys.target_ws_files(target_id)))
                sids = await pipe.smembers(keys.target_streams(target_id))
                pipe.multi()
                pipe.delete(*watched, keys.target_files(target_id))
                for sid in sids:
                    pipe.delete(keys.stream(sid))
                pipe.srem(keys.TARGETS, target_id)
                pipe.srem(keys.owner_targets(owner), target_id)
                for s in STAGES:
                    pipe.srem(keys.stage_targets(s), target_id)
                for name in ws:
                    pipe.sadd(keys.ws_pending_deletes(name), target_id)
                if size and int(size):  # its bytes leave the quotas
                    pipe.hincrby(keys.TARGET_BYTES, owner, -int(size))
                    pipe.decrby(keys.TARGET_BYTES_ALL, int(size))
                await pipe.execute()
                return owner, sorted(ws)
            except WatchError:
                continue


async def delete_on_ws(app, ws_name, target_id):
    """PUT /targets/delete on one WS; clears the pending deletion when the
    WS confirms. Returns True on success."""
    try:
        reply = await workservers.request(app, ws_name, 'PUT',
                                          '/targets/delete/%s' % target_id)
    except peer.PeerError as e:
        log.info('deleting target %s on %s postponed: %s', target_id,
                 ws_name, e)
        return False
    if reply.code != 200:
        log.warning('deleting target %s on %s postponed: %d %s', target_id,
                    ws_name, reply.code, reply.error)
        return False
    await app.redis.srem(keys.ws_pending_deletes(ws_name), target_id)
    return True


async def delete(app, target_id):
    """Forget the target, remove its files, and delete it on every WS at
    once; a WS that fails keeps its deletion pending. False if unknown."""
    forgotten = await _forget(app.redis, target_id)
    if forgotten is None:
        return False
    _, ws_names = forgotten
    await asyncio.gather(*(delete_on_ws(app, ws, target_id)
                           for ws in ws_names))
    return True


async def flush_pending(app, ws_name):
    """Retry the deletions a WS missed while it was down."""
    pending = await app.redis.smembers(keys.ws_pending_deletes(ws_name))
    if pending:
        results = await asyncio.gather(*(delete_on_ws(app, ws_name, t)
                                         for t in sorted(pending)))
        log.info('%s: %d of %d pending target deletions done', ws_name,
                 sum(results), len(results))


class TargetsHandler(APIHandler):
    body_limit = 'max_body_size_in_bytes'

    @allow('manager', 'anyone')
    async def get(self) -> None:
        manager = self.caller
        if manager is not None:
            ids = await self.redis.smembers(keys.owner_targets(manager.email))
        else:
            ids = await self.redis.sunion(keys.stage_targets('public'),
                                          keys.stage_targets('beta'))
        self.write_json({'targets': sorted(ids)})

    @allow('manager')
    async def post(self) -> None:
        fields = await read_fields(self, tuple(FIELDS), creating=True)
        files = self.field('files', dict, {})
        await validate_files(self.config, files,
                             self.config.max_files_per_target,
                             allow_empty=True)
        target_id = await create(self.application, self.caller.email,
                                 fields, files)
        log.info('%s created target %s', self.caller.email, target_id)
        self.write_json({'target_id': target_id})


class TargetInfoHandler(APIHandler):
    @allow('manager', 'anyone')
    async def get(self, target_id: str) -> None:
        """A private target to its owner (and admins) only; `owner` only
        to them too."""
        target = await owned(self.application, target_id, None)
        if target.stage == 'private':
            if self.caller is None:
                raise APIError(401, 'target %s is private' % target_id)
            await owned(self.application, target_id, self.caller)
        counts = await stream_counts(self.application, target_id)
        info = target.info(sorted(counts))
        caller = self.caller
        if caller is None or not (caller.is_admin
                                  or caller.email == target.owner):
            del info['owner']  # a manager's email is not public
        self.write_json(info)


class TargetUpdateHandler(APIHandler):
    @allow('manager', owner=owns_target)
    async def put(self, target_id: str) -> None:
        unknown = sorted(set(self.body) - set(UPDATABLE))
        if unknown:
            raise APIError(400, 'field(s) %s cannot be updated'
                           % ', '.join(unknown))
        if not self.body:
            raise APIError(400, 'nothing to update: give any of %s'
                           % ', '.join(UPDATABLE))
        changes = await read_fields(self, list(self.body), creating=False)
        if not await update(self.application, target_id, changes):
            raise APIError(404, 'no such target %s' % target_id)
        self.write_json({})


class TargetDeleteHandler(APIHandler):
    @allow('manager', owner=owns_target)
    async def put(self, target_id: str) -> None:
        if not await delete(self.application, target_id):
            raise APIError(404, 'no such target %s' % target_id)
        log.info('deleted target %s', target_id)
        self.write_json({})


class TargetFileHandler(APIHandler):
    @allow('manager', owner=owns_target)
    async def get(self, target_id: str, filename: str) -> None:
        check_file_name(filename)
        if filename not in self.resource.files:
            raise APIError(404, 'target %s has no file %s'
                           % (target_id, filename))
        data = await self.redis.hget(keys.target_files(target_id), filename)
        if data is None:
            raise APIError(404, 'target %s has no file %s'
                           % (target_id, filename))
        self.set_header('Content-Type', 'application/octet-stream')
        self.finish(data.encode('utf-8'))


class TargetStreamsHandler(APIHandler):
    """Every stream of a target, asked of each WS holding some at once.
    The reply keeps the 2014 shape `{ws: {stream_id: info}}` that clients
    iterate; a WS that does not answer is `{}` there and is named in the
    `X-Unreachable-Workservers` header (comma separated), not an error."""

    @allow('manager', owner=owns_target)
    async def get(self, target_id: str) -> None:
        names = sorted(await stream_counts(self.application, target_id))
        replies = await asyncio.gather(*(
            self._ask(name, target_id) for name in names))
        down = [n for n, r in zip(names, replies, strict=True) if r is None]
        if down:
            self.set_header('X-Unreachable-Workservers', ','.join(down))
        self.write_json({n: r or {}
                         for n, r in zip(names, replies, strict=True)})

    async def _ask(self, ws_name: str, target_id: str) -> Any:
        """The WS's listing, {} if it holds none, None if it failed."""
        try:
            reply = await workservers.request(
                self.application, ws_name, 'GET',
                '/targets/streams/%s' % target_id)
        except peer.PeerError as e:
            log.warning('streams of %s on %s: %s', target_id, ws_name, e)
            return None
        if reply.code == 404:
            return {}
        if reply.code != 200 or not isinstance(reply.body, dict):
            log.warning('streams of %s on %s: %d %s', target_id, ws_name,
                        reply.code, reply.error)
            return None
        return await self._placed(ws_name, target_id, reply.body)

    async def _placed(self, ws_name: str, target_id: str,
                      listing: dict[str, Any]) -> dict[str, Any]:
        """Only the streams the CC placed on that WS: a rogue or broken WS
        cannot slip other ids (a path, another WS's stream) to clients."""
        placed = await stream_map.placed_on(self.application, target_id,
                                            ws_name, list(listing))
        kept = {sid: info for sid, info in listing.items()
                if sid in placed and isinstance(info, dict)}
        if len(kept) != len(listing):
            dropped = sorted(set(listing) - set(kept))
            log.warning('streams of %s on %s: %d unknown or malformed '
                        'dropped, first %r', target_id, ws_name,
                        len(dropped), dropped[0][:100])
        return kept


default_handlers = [
    (r'/targets', TargetsHandler),
    (r'/targets/info/([^/]+)', TargetInfoHandler),
    (r'/targets/update/([^/]+)', TargetUpdateHandler),
    (r'/targets/delete/([^/]+)', TargetDeleteHandler),
    (r'/targets/streams/([^/]+)', TargetStreamsHandler),
    (r'/targets/([^/]+)/([^/]+)', TargetFileHandler),
]
