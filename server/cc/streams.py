"""Streams as the CC sees them: placement on a workserver, and the
manager's commands routed to the WS named after the `:` of the stream id.

The CC keeps, per stream, only its target and WS, and per target how many
streams each WS holds. Placement reserves a slot on the least-loaded online
allowed WS in one Lua step, so concurrent posts still spread evenly, and
sends the target's files along the first time that WS gets the target.
Stream bytes never pass through the CC: downloads are redirected to the WS
with a signed, expiring URL.
"""
import logging
import random
import uuid

from server import peer, signing, store
from server.cc import keys, reconcile, targets, workservers
from server.cc.targets import TargetHandler
from server.lua import Script
from server.web import (
    APIError,
    check_file_name,
    check_stream_id,
    check_tags,
    check_target_id,
)

log = logging.getLogger('siegetank.cc.streams')


# Reserve one stream slot on the online WS holding fewest streams of the
# target, in one step. KEYS: the target, its per-WS counts, the WS holding
# its files, every WS. ARGV: the WS key template, a random offset (ties
# go to the first name from there), the most streams a target may have,
# k, k names to leave out, then the allowed names (none: any). Returns nil
# if the target is gone, -1 if it has the most streams it may have, {} if
# no WS can take it, else {ws, url, http_port, 1 if it has the files}.
_RESERVE = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local total = 0
for _, c in ipairs(redis.call('HVALS', KEYS[2])) do
  total = total + tonumber(c)
end
if total >= tonumber(ARGV[3]) then return -1 end
local k = tonumber(ARGV[4])
local skip, allowed, any = {}, {}, true
for i = 5, 4 + k do skip[ARGV[i]] = true end
for i = 5 + k, #ARGV do allowed[ARGV[i]] = true any = false end
local names = redis.call('SMEMBERS', KEYS[4])
table.sort(names)
local n = #names
local best, low, url, port
for i = 0, n - 1 do
  local name = names[(i + tonumber(ARGV[2])) % n + 1]
  if not skip[name] and (any or allowed[name]) then
    local w = redis.call('HMGET', string.format(ARGV[1], name), 'online',
                         'url', 'http_port')
    if w[1] == '1' then
      local c = tonumber(redis.call('HGET', KEYS[2], name) or '0')
      if low == nil or c < low then
        best, low, url, port = name, c, w[2], w[3]
      end
    end
  end
end
if best == nil then return {} end
redis.call('HINCRBY', KEYS[2], best, 1)
return {best, url, port, redis.call('SISMEMBER', KEYS[3], best)}
""")

# Give a reservation back (placement failed).
_UNRESERVE = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
""")

# A placed stream becomes known, and its WS known to hold the target's
# files, unless the target was deleted meanwhile (then 0).
_RECORD = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'target_id', ARGV[2], 'ws', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[3])
return 1
""")

# Forget a deleted stream; the WS drops a target with its last stream, so
# then it no longer holds the target's files either.
_FORGET = Script("""
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[5]) == 1 then
  if redis.call('HINCRBY', KEYS[3], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[2])
    redis.call('SREM', KEYS[4], ARGV[2])
  end
end
return 1
""")


def ws_of(stream_id):
    """The WS a stream id routes to; 400 if the id is malformed."""
    return check_stream_id(stream_id).split(':', 1)[1]


class PlacementFailed(Exception):
    """This WS could not take the stream; another may."""


async def _create_on(app, ws, base, body):
    """POST /streams to `ws`; sent once more if no reply came (the same
    creation id: the WS answers with the stream it made the first time).
    Without an answer then, or with a failure, the stream the WS may have
    made is abandoned (deleted there later, see reconcile.py)."""
    for attempt in range(2):
        try:
            reply = await workservers.request(app, ws, 'POST', '/streams',
                                              body, base=base)
        except peer.PeerError as e:
            if attempt == 0:
                continue
            await reconcile.abandon(app.redis, ws, body['creation_id'])
            raise PlacementFailed(str(e)) from e
        if reply.code >= 500:
            await reconcile.abandon(app.redis, ws, body['creation_id'])
        return reply


async def _post_to(app, ws, base, has_files, target, files, tags):
    """POST the stream to `ws`, with the target files if it may lack
    them; returns the stream id. 4xx verdicts on the input are final."""
    tid = target['target_id']
    body = {'target_id': tid, 'stream_files': files,
            'creation_id': str(uuid.uuid4())}
    if tags:
        body['tags'] = tags
    for attempt in range(2):
        if not has_files or attempt:
            body['target_files'] = await targets.read_files(
                app, tid, target['files'])
        reply = await _create_on(app, ws, base, body)
        if reply.code == 400 and 'target_files' not in body:
            continue  # the WS lost the target since: send the files again
        break
    if reply.code == 200:
        sid = reply.body.get('stream_id') if isinstance(reply.body, dict) \
            else None
        if sid != '%s:%s' % (body['creation_id'], ws):
            raise PlacementFailed('%s returned a bad stream id %r' % (ws, sid))
        return sid
    if reply.code in (400, 409, 413):
        raise APIError(reply.code, 'workserver %s: %s' % (ws, reply.error))
    raise PlacementFailed('%s answered %d %s' % (ws, reply.code, reply.error))


async def place(app, target, files, tags=None):
    """Put a new stream of `target` on the least-loaded online allowed WS,
    trying the next one when a WS fails. Returns the stream id."""
    redis, tid = app.redis, target['target_id']
    failed: list[str] = []
    while True:
        reserved = await _RESERVE(
            redis, [keys.target(tid), keys.target_ws(tid),
                    keys.target_ws_files(tid), keys.WORKSERVERS],
            [keys.ws.template, random.randrange(1 << 30),
             app.config.max_streams_per_target, len(failed),
             *failed, *(target['allowed_ws'] or ())])
        if reserved is None:
            raise APIError(404, 'no such target %s' % tid)
        if reserved == -1:
            raise APIError(409, 'target %s has %d streams: the most a target '
                           'may have'
                           % (tid, app.config.max_streams_per_target))
        if not reserved:
            raise APIError(503, 'no online workserver can take a stream of '
                           'target %s' % tid)
        ws, url, port, has_files = reserved
        try:
            sid = await _post_to(app, ws, 'https://%s:%s' % (url, port),
                                 has_files == 1, target, files, tags)
        except BaseException as e:  # a failure of any kind (a bug, a
            # cancellation, a reply we cannot read): the slot goes back
            await _UNRESERVE(redis, [keys.target(tid), keys.target_ws(tid)],
                             [ws])
            if not isinstance(e, PlacementFailed):
                raise
            log.warning('placing a stream of %s on %s failed: %s', tid, ws, e)
            failed.append(ws)
            continue
        recorded = await store.acknowledged(
            redis, _RECORD,
            [keys.target(tid), keys.stream(sid), keys.target_streams(tid),
             keys.target_ws_files(tid)], [sid, tid, ws],
            app.config.redis_wait_replicas,
            app.config.redis_wait_timeout_in_ms)
        if not recorded:
            # Deleted while we placed: undo on that WS (pending if down).
            await redis.sadd(keys.ws_pending_deletes(ws), tid)
            await targets.delete_on_ws(app, ws, tid)
            raise APIError(404, 'target %s was deleted' % tid)
        return sid


async def forget(app, stream_id, record):
    tid, ws = record['target_id'], record['ws']
    await _FORGET(app.redis, [keys.stream(stream_id), keys.target_streams(tid),
                          keys.target_ws(tid), keys.target_ws_files(tid),
                          keys.target(tid)], [stream_id, ws])


class StreamHandler(TargetHandler):
    async def stream(self, stream_id):
        """The CC's record of a stream the caller may act on (401, 400,
        404, 403 in that order)."""
        manager = await self.require_manager()
        ws_of(stream_id)
        record = await self.redis.hgetall(keys.stream(stream_id))
        if not record:
            raise APIError(404, 'no such stream %s' % stream_id)
        await self.target(record['target_id'], manager)
        return record

    async def relay(self, method, stream_id, path):
        """Send the command to the stream's WS; its verdict on the stream
        (400, 404, 409) is passed on, anything else is a 503."""
        ws = ws_of(stream_id)
        try:
            reply = await workservers.request(self.application, ws, method,
                                              path)
        except peer.PeerError:
            raise APIError(503, 'workserver %s unreachable' % ws) from None
        if reply.code == 200 and isinstance(reply.body, dict):
            return reply
        if reply.code in (400, 404, 409):
            raise APIError(reply.code, 'workserver %s: %s'
                           % (ws, reply.error))
        raise APIError(503, 'workserver %s answered %d %s'
                       % (ws, reply.code, reply.error))


class PostStreamHandler(StreamHandler):
    body_limit = 'max_body_size_in_bytes'

    async def post(self):
        manager = await self.require_manager()
        target_id = check_target_id(self.field('target_id', str))
        files = self.field('files', dict)
        tags = check_tags(self.field('tags', dict, {}))
        target = await self.target(target_id, manager)
        await targets.validate_files(self.config, files,
                                     self.config.max_files_per_request)
        stream_id = await place(self.application, target, files, tags)
        log.info('stream %s of target %s placed', stream_id, target_id)
        self.write_json({'stream_id': stream_id})


class StreamCommandHandler(StreamHandler):
    async def put(self, action, stream_id):
        record = await self.stream(stream_id)
        try:
            await self.relay('PUT', stream_id, '/streams/%s/%s'
                             % (action, stream_id))
        except APIError as e:
            if action == 'delete' and e.status_code == 404:
                await forget(self.application, stream_id, record)
            raise
        if action == 'delete':
            await forget(self.application, stream_id, record)
        self.write_json({})


class StreamInfoHandler(StreamHandler):
    async def get(self, stream_id):
        await self.stream(stream_id)
        reply = await self.relay('GET', stream_id,
                                 '/streams/info/%s' % stream_id)
        self.write_json(reply.body)


class StreamDownloadHandler(StreamHandler):
    """307 to the WS with a signed URL valid `signed_url_lifetime_in_s`:
    the bytes go straight from the WS, and `Range` survives the redirect."""

    async def get(self, stream_id, filename):
        await self.stream(stream_id)
        check_file_name(filename)
        ws = ws_of(stream_id)
        base = await workservers.base_url(self.application, ws)
        if base is None:
            raise APIError(503, 'workserver %s is unknown' % ws)
        query = signing.query(self.config.cc_pass, stream_id, filename,
                              self.config.signed_url_lifetime_in_s)
        self.set_header('Location', '%s/streams/%s/%s?%s'
                        % (base, stream_id, filename, query))
        self.write_json({}, status=307)


default_handlers = [
    (r'/streams', PostStreamHandler),
    (r'/streams/(start|stop|delete)/([^/]+)', StreamCommandHandler),
    (r'/streams/info/([^/]+)', StreamInfoHandler),
    (r'/streams/([^/]+)/([^/]+)', StreamDownloadHandler),
]
