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
import uuid
from typing import Any

from server import peer, signing
from server.cc import keys, reconcile, stream_map, targets, workservers
from server.cc.accounts import Manager
from server.cc.stream_map import StreamRecord
from server.cc.targets import Target
from server.web import (
    APIError,
    APIHandler,
    OwnerCheck,
    allow,
    check_file_name,
    check_stream_id,
    check_tags,
    check_target_id,
)

log = logging.getLogger('siegetank.cc.streams')


def ws_of(stream_id: str) -> str:
    """The WS a stream id routes to; 400 if the id is malformed."""
    return check_stream_id(stream_id).split(':', 1)[1]


class PlacementFailed(Exception):
    """This WS could not take the stream; another may."""


async def _create_on(app: Any, ws: str, base: str,
                     body: dict[str, Any]) -> Any:
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


async def _post_to(app: Any, ws: str, base: str, has_files: bool,
                   target: Target, files: dict[str, str],
                   tags: dict[str, str] | None) -> str:
    """POST the stream to `ws`, with the target files if it may lack
    them; returns the stream id. 4xx verdicts on the input are final."""
    tid = target.target_id
    body: dict[str, Any] = {'target_id': tid, 'stream_files': files,
            'creation_id': str(uuid.uuid4())}
    if tags:
        body['tags'] = tags
    for attempt in range(2):
        if not has_files or attempt:
            body['target_files'] = await targets.read_files(
                app, tid, target.files)
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


async def place(app: Any, target: Target, files: dict[str, str],
                tags: dict[str, str] | None = None) -> str:
    """Put a new stream of `target` on the least-loaded online allowed WS,
    trying the next one when a WS fails. Returns the stream id."""
    tid = target.target_id
    failed: list[str] = []
    while True:
        try:
            slot = await stream_map.reserve(app, tid, failed,
                                            target.allowed_ws or [])
        except stream_map.TargetGone:
            raise APIError(404, 'no such target %s' % tid) from None
        except stream_map.TargetFull:
            raise APIError(409, 'target %s has %d streams: the most a '
                           'target may have'
                           % (tid, app.config.max_streams_per_target)) \
                from None
        if slot is None:
            raise APIError(503, 'no online workserver (not draining) can '
                           'take a stream of target %s' % tid)
        try:
            sid = await _post_to(app, slot.ws, slot.base, slot.has_files,
                                 target, files, tags)
        except BaseException as e:  # a failure of any kind (a bug, a
            # cancellation, a reply we cannot read): the slot goes back
            await stream_map.unreserve(app, tid, slot.ws)
            if not isinstance(e, PlacementFailed):
                raise
            log.warning('placing a stream of %s on %s failed: %s', tid,
                        slot.ws, e)
            failed.append(slot.ws)
            continue
        if not await stream_map.record(app, sid, tid, slot.ws):
            # Deleted while we placed: undo on that WS (pending if down).
            await app.redis.sadd(keys.ws_pending_deletes(slot.ws), tid)
            await targets.delete_on_ws(app, slot.ws, tid)
            raise APIError(404, 'target %s was deleted' % tid)
        return sid


def owns_stream(arg: int) -> OwnerCheck:
    """`@allow(..., owner=owns_stream(i))`: the CC's record of the stream
    whose id is the path's argument `i`, if the caller may act on it
    (400, 404, 403 in that order)."""
    async def check(handler: APIHandler, manager: Manager) -> StreamRecord:
        stream_id = handler.path_args[arg]
        ws_of(stream_id)
        record = await stream_map.load(handler.application, stream_id)
        if record is None:
            raise APIError(404, 'no such stream %s' % stream_id)
        await targets.owned(handler.application, record.target_id, manager)
        return record
    return check


async def relay(app: Any, method: str, stream_id: str, path: str) -> Any:
    """Send the command to the stream's WS; its verdict on the stream
    (400, 404, 409) is passed on, anything else is a 503."""
    ws = ws_of(stream_id)
    try:
        reply = await workservers.request(app, ws, method, path)
    except peer.PeerError:
        raise APIError(503, 'workserver %s unreachable' % ws) from None
    if reply.code == 200 and isinstance(reply.body, dict):
        return reply
    if reply.code in (400, 404, 409):
        raise APIError(reply.code, 'workserver %s: %s' % (ws, reply.error))
    raise APIError(503, 'workserver %s answered %d %s'
                   % (ws, reply.code, reply.error))


class PostStreamHandler(APIHandler):
    body_limit = 'max_body_size_in_bytes'

    @allow('manager')
    async def post(self) -> None:
        target_id = check_target_id(self.field('target_id', str))
        files = self.field('files', dict)
        tags = check_tags(self.field('tags', dict, {}))
        target = await targets.owned(self.application, target_id,
                                     self.caller)
        await targets.validate_files(self.config, files,
                                     self.config.max_files_per_request)
        stream_id = await place(self.application, target, files, tags)
        log.info('stream %s of target %s placed', stream_id, target_id)
        self.write_json({'stream_id': stream_id})


class StreamCommandHandler(APIHandler):
    @allow('manager', owner=owns_stream(1))
    async def put(self, action: str, stream_id: str) -> None:
        record = self.resource
        try:
            await relay(self.application, 'PUT', stream_id,
                        '/streams/%s/%s' % (action, stream_id))
        except APIError as e:
            if action == 'delete' and e.status_code == 404:
                await stream_map.forget(self.application, record)
            raise
        if action == 'delete':
            await stream_map.forget(self.application, record)
        self.write_json({})


class StreamInfoHandler(APIHandler):
    @allow('manager', owner=owns_stream(0))
    async def get(self, stream_id: str) -> None:
        reply = await relay(self.application, 'GET', stream_id,
                            '/streams/info/%s' % stream_id)
        self.write_json(reply.body)


class StreamDownloadHandler(APIHandler):
    """307 to the WS with a signed URL valid `signed_url_lifetime_in_s`:
    the bytes go straight from the WS, and `Range` survives the redirect."""

    @allow('manager', owner=owns_stream(0))
    async def get(self, stream_id: str, filename: str) -> None:
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
