"""Targets and streams of the workserver: the model, a Redis index over the
disk of storage.py.

Concurrency: several worker processes serve the same streams. Every
check-then-set on Redis is one Lua script or a MULTI; everything that also
touches a stream's disk (frames, checkpoints, deactivation, start/stop,
deletion) runs under that stream's Redis lock, and stream creations and
target deletions take the target's locks (locks.py), so a buffer is never
committed and discarded at once, a stale core can never write after its
token died, and no stream is made in a target being deleted.
"""
import secrets
import time
import uuid
from typing import Any

from server import metrics, threads
from server.sessions_common import REASON_OF_MODE
from server.tokens import token_hash
from server.web import APIError
from server.ws import error_stops, stream_record, target_record
from server.ws.locks import stream_locked, target_locked, target_shared
from server.ws.stream_record import foreign


def check_disk(app: Any) -> None:
    """Refuse new work before the disk is too full to take it."""
    floor = app.config.min_free_disk_in_mb
    free = app.storage.free_mb()
    if free < floor:
        raise APIError(503, 'workserver disk is nearly full (%.0f MB free, '
                       'floor %d MB): no new streams or activations'
                       % (free, floor))


def _new_stream(storage: Any, target_id: str, stream_id: str,
                meta: dict[str, Any], stream_files: dict[str, str]
                ) -> dict[str, Any] | None:
    """Make the stream on disk if its target exists, belongs to the same
    CC and has the same stream file names; returns the target's meta
    (None: no such target)."""
    target = storage.target_meta(target_id)
    if target is not None and not foreign(target.get('cc'), meta['cc']) \
            and target['stream_files'] == sorted(stream_files):
        storage.create_stream(stream_id, meta, stream_files)
    return target


async def create_stream(app: Any, target_id: str,
                        stream_files: dict[str, str],
                        target_files: dict[str, str] | None, cc: str,
                        tags: dict[str, Any] | None = None,
                        creation_id: str | None = None) -> str:
    """A stream of a known target needs only a shared hold on it (creations
    run in parallel); the first stream of a target creates the target
    under its exclusive lock. `tags` live in stream.json, so they survive
    a loss of Redis like the rest of the stream. With a `creation_id` (the
    CC's) the stream is `<creation_id>:<ws name>`, so a create sent again
    (its reply was lost) finds the stream made the first time instead of
    making a second one. The stream and a new target record `cc`, the
    command center that asked: only it may use them from then on."""
    stream_id = '%s:%s' % (creation_id or uuid.uuid4(), app.config.name)
    if creation_id is not None:
        made = await _made_before(app, target_id, stream_id, cc)
        if made:
            return made
    check_disk(app)
    try:
        return await _create(app, target_id, stream_files, target_files,
                             tags, stream_id, cc)
    except FileExistsError:  # the same creation at once: it won
        made = await _made_before(app, target_id, stream_id, cc)
        if not made:
            raise
        return made


async def _made_before(app: Any, target_id: str, stream_id: str,
                       cc: str) -> str | None:
    """The stream id if a creation with this id already made the stream
    (indexed again if Redis lacks it); 409 if for another target or
    another command center."""
    meta = await threads.disk(app.storage.stream_meta, stream_id)
    if meta is None:
        return None
    if meta['target_id'] != target_id or foreign(meta.get('cc'), cc):
        raise APIError(409, 'creation id of stream %s was used for another '
                       'target' % stream_id)
    if not await stream_record.exists(app, stream_id):
        pipe = app.redis.pipeline(transaction=True)
        stream_record.index(pipe, app.keys, stream_id, meta,
                            await threads.disk(app.storage.committed_frames,
                                               stream_id))
        await pipe.execute()
    return stream_id


async def _create(app: Any, target_id: str, stream_files: dict[str, str],
                  target_files: dict[str, str] | None,
                  tags: dict[str, Any] | None, stream_id: str,
                  cc: str) -> str:
    names = sorted(stream_files)
    meta: dict[str, Any] = {
        'target_id': target_id, 'creation_date': time.time(),
        'status': 'OK', 'error_count': 0, 'cc': cc}
    if tags:
        meta['tags'] = tags
    async with target_shared(app, target_id):
        target = await threads.disk(_new_stream, app.storage, target_id,
                                    stream_id, meta, stream_files)
        if target is not None:
            return await _indexed(app, target, names, stream_id, meta)
    async with target_locked(app, target_id):
        target = await threads.disk(_new_stream, app.storage, target_id,
                                    stream_id, meta, stream_files)
        if target is None:
            if target_files is None:
                raise APIError(400, 'target %s is new on this workserver: '
                               'target_files are required' % target_id)
            await threads.disk(app.storage.create_target, target_id,
                               target_files, names, cc)
            await threads.disk(app.storage.create_stream, stream_id, meta,
                               stream_files)
            target = {'stream_files': names, 'cc': cc}
        return await _indexed(app, target, names, stream_id, meta)


async def _indexed(app: Any, target: dict[str, Any], names: list[str],
                   stream_id: str, meta: dict[str, Any]) -> str:
    """Index the stream just made on disk (403 if it was not made because
    another CC owns the target, 409 if its file names differ from those of
    the target's other streams)."""
    if foreign(target.get('cc'), meta['cc']):
        raise APIError(403, 'target %s belongs to another command center'
                       % meta['target_id'])
    if target['stream_files'] != names:
        raise APIError(409, 'stream_files %s differ from the files of '
                       'the target\'s other streams %s'
                       % (names, target['stream_files']))
    pipe = app.redis.pipeline(transaction=True)
    stream_record.index(pipe, app.keys, stream_id, meta, 0)
    await pipe.execute()
    return stream_id


def early_windows(config: Any) -> tuple[float, float]:
    """(start, first heartbeat) windows in seconds: how long a new token
    may take to reach /core/start, then to send its first heartbeat or
    frame; never longer than heartbeat_increment."""
    hb = config.heartbeat_increment_in_s
    return (min(config.core_start_window_in_s, hb),
            min(config.first_heartbeat_window_in_s, hb))


async def activate(app: Any, target_id: str, donor_id: str | None,
                   client: str | None, cc: str, engine: str = '',
                   core_version: str = '', vouched: bool = False
                   ) -> tuple[str, str, str]:
    """(token, stream_id, session id) of a freshly activated stream, or
    503 (the CC counts the client's hold until that session's record
    comes). The token
    lives for the start window only until it reaches /core/start (see
    core.py): an activation whose reply was lost (the CC timed out, the
    connection was cut), or a stream taken and never started, gives its
    stream back soon, not after a whole heartbeat. `client` (from the CC)
    is who got it and `vouched` whether the CC vouches for it, for
    counting error stops (error_stops.py); `cc` (which CC asked),
    `engine` and `core_version` go into its session."""
    check_disk(app)
    token = secrets.token_urlsafe(32)
    now = time.time()
    client, vouched = error_stops.voice(client, vouched)
    session = uuid.uuid4().hex
    sid = await stream_record.activate(
        app, target_id, token_hash(token),
        expiry=now + early_windows(app.config)[0], now=now,
        donor=donor_id or '', client=client, vouched=vouched, cc=cc,
        session=session, engine=engine, core_version=core_version)
    if not sid:
        raise APIError(503, 'no stream of target %s is free on this '
                       'workserver' % target_id)
    metrics.count('activations')
    return token, sid, session


async def deactivate(app: Any, stream_id: str, target_id: str,
                     mode: str) -> bool | None:
    """Run with the stream's lock held. Ends the live activation if any
    (token dead, buffer discarded), requeues the stream unless STOPPED and
    records status/error changes on disk. Returns was_active, or None if
    nothing was done (unknown stream, or mode expire and not expired)."""
    done = await stream_record.deactivate(app, stream_id, target_id, mode)
    if done is None:
        return None
    if done.was_active:
        metrics.count('deactivations', label=REASON_OF_MODE[mode])
        await threads.disk(app.storage.discard_buffer, stream_id)
    if mode in ('error', 'halt'):
        await threads.disk(app.storage.update_stream_meta, stream_id,
                           status=done.status, error_count=done.error_count)
    return bool(done.was_active)


async def target_of(app: Any, stream_id: str, cc: str | None = None) -> str:
    """The stream's target; 404 for an unknown stream, and for one another
    command center than `cc` (when given) made."""
    tid, owner = await stream_record.target_and_owner(app, stream_id)
    if tid is None or cc is not None and foreign(owner, cc):
        raise APIError(404, 'unknown stream %s' % stream_id)
    return tid


async def start_stream(app: Any, stream_id: str, cc: str) -> None:
    tid = await target_of(app, stream_id, cc)
    async with stream_locked(app, stream_id):
        if not await stream_record.start(app, stream_id, tid):
            raise APIError(404, 'unknown stream %s' % stream_id)
        await threads.disk(app.storage.update_stream_meta, stream_id,
                           status='OK', error_count=0)


async def stop_stream(app: Any, stream_id: str, cc: str) -> None:
    tid = await target_of(app, stream_id, cc)
    async with stream_locked(app, stream_id):
        if await deactivate(app, stream_id, tid, 'halt') is None:
            raise APIError(404, 'unknown stream %s' % stream_id)


async def _drop_stream(app: Any, stream_id: str, target_id: str) -> int:
    """With the target's lock held: every byte of the stream, disk first
    (one rename: gone even if we crash right after; the master finishes
    the Redis step then, recovery.free_dead_holder), then its keys.
    Returns how many streams the target has left."""
    async with stream_locked(app, stream_id):
        await threads.disk(app.storage.remove_stream, stream_id)
        left: int = await stream_record.drop(app.fastredis, app.keys,
                                             stream_id, target_id)
        return left


async def delete_stream(app: Any, stream_id: str, cc: str) -> None:
    tid = await target_of(app, stream_id, cc)
    async with target_locked(app, tid):
        if not await stream_record.exists(app, stream_id):
            raise APIError(404, 'unknown stream %s' % stream_id)
        if await _drop_stream(app, stream_id, tid) == 0:
            await threads.disk(app.storage.remove_target, tid)


async def delete_target(app: Any, target_id: str, cc: str) -> None:
    """Every stream of the target, then the target; fine if unknown, 404
    if another command center made it."""
    target = await threads.disk(app.storage.target_meta, target_id)
    if target is not None and foreign(target.get('cc'), cc):
        raise APIError(404, 'unknown target %s' % target_id)
    async with target_locked(app, target_id):
        for sid in await target_record.stream_ids(app, target_id):
            await _drop_stream(app, sid, target_id)
        await threads.disk(app.storage.remove_target, target_id)
        await target_record.forget(app, target_id)


async def stream_info(app: Any, stream_id: str, cc: str) -> dict[str, Any]:
    fields = await stream_record.read(app, stream_id)
    if fields is None or fields.foreign(cc):
        raise APIError(404, 'unknown stream %s' % stream_id)
    info = fields.public()
    info.update(target_id=fields.target_id,
                creation_date=fields.creation_date)
    return info


async def target_streams(app: Any, target_id: str,
                         cc: str) -> dict[str, dict[str, Any]]:
    sids = await target_record.stream_ids(app, target_id)
    found = {sid: f.public()
             for sid, f in await stream_record.read_many(app, sids)
             if not f.foreign(cc)}
    if not found:
        raise APIError(404, 'unknown target %s' % target_id)
    return found


async def all_streams(app: Any, cc: str) -> dict[str, float]:
    """{stream_id: creation_date} of every stream `cc` made here (for its
    reconciliation: another CC's streams are not its to adopt or delete)."""
    sids = await target_record.all_stream_ids(app)
    return {sid: date for sid, date, owner
            in await stream_record.creation_dates(app, sids)
            if not foreign(owner, cc)}


async def active_streams(app: Any, cc: str) -> dict[str, dict[str, Any]]:
    """The active streams `cc` made."""
    result: dict[str, dict[str, Any]] = {}
    for sid, f in await stream_record.read_many(app, sorted(
            await app.redis.smembers(app.keys.active))):
        if not f.active or f.foreign(cc):
            continue
        result.setdefault(f.target_id, {})[sid] = {
            'donor': f.donor, 'start_time': f.start_time,
            'total_frames': f.frames, 'buffer_frames': f.buffer_frames}
    return result
