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
from itertools import chain

from redis.exceptions import WatchError

from server import peer, store
from server.cc import keys, workservers
from server.cc.accounts import AccountHandler, valid_weight
from server.lua import Script
from server.web import (
    APIError,
    check_file_name,
    check_files,
    check_target_id,
    decode_files,
)

log = logging.getLogger('siegetank.cc.targets')

STAGES = ('private', 'beta', 'public')
ENGINE = re.compile(r'[A-Za-z0-9._-]{1,64}')
JSON_FIELDS = ('engine_versions', 'allowed_ws', 'options', 'files')
UPDATABLE = ('stage', 'allowed_ws', 'engine_versions', 'description',
             'options', 'weight')

# A target becomes visible with its files made permanent. KEYS: the
# target, every target, the owner's, the stage's, its files. ARGV: the
# target id, then the record's field/value pairs.
_CREATE = Script("""
redis.call('PERSIST', KEYS[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
for i = 2, 4 do redis.call('SADD', KEYS[i], ARGV[1]) end
return 1
""")
UNCLAIMED_FILES_MS = 24 * 3600 * 1000

# Change only the given fields, and the stage index with the stage, unless
# the target was deleted meanwhile.
_UPDATE = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if #KEYS > 1 then
  for i = 2, #KEYS - 1 do redis.call('SREM', KEYS[i], ARGV[1]) end
  redis.call('SADD', KEYS[#KEYS], ARGV[1])
end
return 1
""")


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


def valid_versions(v):
    return 0 < len(v) <= 64 and all(isinstance(x, str) and 0 < len(x) <= 64
                                    for x in v)


async def check_allowed_ws(app, names):
    if not all(isinstance(n, str) for n in names):
        raise APIError(400, 'allowed_ws must be a list of workserver names')
    known = await app.redis.smembers(keys.WORKSERVERS)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise APIError(400, 'unknown workserver(s): %s' % ', '.join(unknown))
    return sorted(set(names))


async def load(app, target_id):
    """The target as a dict (JSON fields decoded), or None."""
    h = await app.redis.hgetall(keys.target(target_id))
    if not h:
        return None
    for f in JSON_FIELDS:
        h[f] = json.loads(h[f])
    h['weight'] = float(h['weight'])
    h['creation_date'] = float(h['creation_date'])
    h['target_id'] = target_id
    return h


async def stream_counts(app, target_id):
    """{ws: number of the target's streams there} (only positive)."""
    counts = await app.redis.hgetall(keys.target_ws(target_id))
    return {ws: int(c) for ws, c in counts.items() if int(c) > 0}


async def create(app, owner, fields, files):
    """Files first, with an expiry (a CC dying before the next step leaves
    nothing behind for long), then the target in one step that makes them
    permanent, acknowledged by `redis_wait_replicas` replicas."""
    target_id = str(uuid.uuid4())
    record = {'owner': owner, 'creation_date': repr(time.time()),
              'description': fields['description'], 'stage': fields['stage'],
              'engine': fields['engine'], 'weight': repr(fields['weight']),
              'engine_versions': json.dumps(fields['engine_versions']),
              'allowed_ws': json.dumps(fields['allowed_ws']),
              'options': json.dumps(fields['options']),
              'files': json.dumps(sorted(files))}
    if files:
        pipe = app.redis.pipeline(transaction=True)
        pipe.hset(keys.target_files(target_id), mapping=files)
        pipe.pexpire(keys.target_files(target_id), UNCLAIMED_FILES_MS)
        await pipe.execute()
    await store.acknowledged(
        app.redis, _CREATE,
        [keys.target(target_id), keys.TARGETS, keys.owner_targets(owner),
         keys.stage_targets(fields['stage']), keys.target_files(target_id)],
        [target_id, *chain.from_iterable(record.items())],
        app.config.redis_wait_replicas,
        app.config.redis_wait_timeout_in_ms)
    return target_id


async def update(app, target_id, changes):
    """Apply `changes` (already validated); False if the target is gone."""
    argv = [target_id]
    for name, value in changes.items():
        if name in JSON_FIELDS:
            value = json.dumps(value)
        elif name == 'weight':
            value = repr(float(value))
        argv += [name, value]
    ks = [keys.target(target_id)]
    if 'stage' in changes:
        ks += [keys.stage_targets(s) for s in STAGES]
        ks.append(keys.stage_targets(changes['stage']))
    return bool(await _UPDATE(app.redis, ks, argv))


async def _forget(redis, target_id):
    """Remove the target's records atomically; returns (owner, ws names
    that hold anything of it) or None if it was already gone. Each of those
    WS gets a pending deletion, cleared once it confirms."""
    watched = (keys.target(target_id), keys.target_ws(target_id),
               keys.target_ws_files(target_id), keys.target_streams(target_id))
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(*watched)
                owner = await pipe.hget(keys.target(target_id), 'owner')
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


class TargetHandler(AccountHandler):
    """Target lookup with the ownership rule of every manager action."""

    manager_methods: tuple[str, ...] = ('GET', 'PUT', 'POST')

    async def target(self, target_id, manager=None):
        """The target if it exists (404) and `manager` owns it or is admin
        (403); `manager` None means any caller may see it."""
        check_target_id(target_id)
        target = await load(self.application, target_id)
        if target is None:
            raise APIError(404, 'no such target %s' % target_id)
        if manager is not None and not manager.is_admin \
                and target['owner'] != manager.email:
            raise APIError(403, 'target %s belongs to another manager'
                           % target_id)
        return target

    async def owned_target(self, target_id):
        manager = await self.require_manager()
        return await self.target(target_id, manager)


class TargetsHandler(TargetHandler):
    manager_methods = ('POST',)
    body_limit = 'max_body_size_in_bytes'

    async def get(self):
        manager = await self.manager()
        if manager is not None:
            ids = await self.redis.smembers(keys.owner_targets(manager.email))
        else:
            ids = await self.redis.sunion(keys.stage_targets('public'),
                                          keys.stage_targets('beta'))
        self.write_json({'targets': sorted(ids)})

    async def post(self):
        manager = await self.require_manager()
        fields = {
            'description': self.field('description', str, ''),
            'engine': self.field('engine', str, check=ENGINE.fullmatch),
            'engine_versions': self.field('engine_versions', list,
                                          check=valid_versions),
            'options': self.field('options', dict, {}),
            'stage': self.field('stage', str, 'private',
                                check=lambda s: s in STAGES),
            'weight': float(self.field('weight', (int, float), 1,
                                       check=valid_weight)),
            'allowed_ws': await check_allowed_ws(
                self.application, self.field('allowed_ws', list, [])),
        }
        files = self.field('files', dict, {})
        await validate_files(self.config, files,
                             self.config.max_files_per_target,
                             allow_empty=True)
        target_id = await create(self.application, manager.email, fields,
                                 files)
        log.info('%s created target %s', manager.email, target_id)
        self.write_json({'target_id': target_id})


class TargetInfoHandler(TargetHandler):
    manager_methods = ()

    async def get(self, target_id):
        target = await self.target(target_id)
        if target['stage'] == 'private':
            manager = await self.manager()
            if manager is None:
                raise APIError(401, 'target %s is private' % target_id)
            await self.target(target_id, manager)
        counts = await stream_counts(self.application, target_id)
        self.write_json({
            'description': target['description'], 'owner': target['owner'],
            'creation_date': target['creation_date'],
            'stage': target['stage'], 'allowed_ws': target['allowed_ws'],
            'striated_ws': sorted(counts), 'engine': target['engine'],
            'engine_versions': target['engine_versions'],
            'files': target['files'], 'options': target['options'],
            'weight': target['weight']})


class TargetUpdateHandler(TargetHandler):
    async def put(self, target_id):
        await self.owned_target(target_id)
        unknown = sorted(set(self.body) - set(UPDATABLE))
        if unknown:
            raise APIError(400, 'field(s) %s cannot be updated'
                           % ', '.join(unknown))
        if not self.body:
            raise APIError(400, 'nothing to update: give any of %s'
                           % ', '.join(UPDATABLE))
        checks = {
            'stage': (str, lambda s: s in STAGES),
            'engine_versions': (list, valid_versions),
            'description': (str, None),
            'options': (dict, None),
            'weight': ((int, float), valid_weight),
            'allowed_ws': (list, None),
        }
        changes = {}
        for name in self.body:
            kind, check = checks[name]
            changes[name] = self.field(name, kind, check=check)
        if 'allowed_ws' in changes:
            changes['allowed_ws'] = await check_allowed_ws(
                self.application, changes['allowed_ws'])
        if not await update(self.application, target_id, changes):
            raise APIError(404, 'no such target %s' % target_id)
        self.write_json({})


class TargetDeleteHandler(TargetHandler):
    async def put(self, target_id):
        await self.owned_target(target_id)
        if not await delete(self.application, target_id):
            raise APIError(404, 'no such target %s' % target_id)
        log.info('deleted target %s', target_id)
        self.write_json({})


class TargetFileHandler(TargetHandler):
    async def get(self, target_id, filename):
        target = await self.owned_target(target_id)
        check_file_name(filename)
        if filename not in target['files']:
            raise APIError(404, 'target %s has no file %s'
                           % (target_id, filename))
        data = await self.redis.hget(keys.target_files(target_id), filename)
        if data is None:
            raise APIError(404, 'target %s has no file %s'
                           % (target_id, filename))
        self.set_header('Content-Type', 'application/octet-stream')
        self.finish(data.encode('utf-8'))


class TargetStreamsHandler(TargetHandler):
    """Every stream of a target, asked of each WS holding some at once.
    The reply keeps the 2014 shape `{ws: {stream_id: info}}` that clients
    iterate; a WS that does not answer is `{}` there and is named in the
    `X-Unreachable-Workservers` header (comma separated), not an error."""

    async def get(self, target_id):
        await self.owned_target(target_id)
        names = sorted(await stream_counts(self.application, target_id))
        replies = await asyncio.gather(*(
            self._ask(name, target_id) for name in names))
        down = [n for n, r in zip(names, replies, strict=True) if r is None]
        if down:
            self.set_header('X-Unreachable-Workservers', ','.join(down))
        self.write_json({n: r or {}
                         for n, r in zip(names, replies, strict=True)})

    async def _ask(self, ws_name, target_id):
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
        return reply.body


default_handlers = [
    (r'/targets', TargetsHandler),
    (r'/targets/info/([^/]+)', TargetInfoHandler),
    (r'/targets/update/([^/]+)', TargetUpdateHandler),
    (r'/targets/delete/([^/]+)', TargetDeleteHandler),
    (r'/targets/streams/([^/]+)', TargetStreamsHandler),
    (r'/targets/([^/]+)/([^/]+)', TargetFileHandler),
]
