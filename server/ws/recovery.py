"""Start-up reconciliation: the disk is the truth, Redis an index of it.

Before the workers fork (runner calls `WorkServer.prepare`), garbage left
by a crash is removed (temporary directories, buffers of streams that were
active, the trash) and this WS's Redis keys are dropped and rebuilt from
the disk: every stream with its committed frames (sum of its chunks),
status and error count (stream.json), inactive and back in its target's
queue if OK. Tokens, heartbeats and locks of the previous run are gone, so
cores of the previous run get 401 and ask the CC again. The same path
serves a WS whose Redis data was lost at start.

A Redis that loses our index while we serve (restarted empty, flushed) is
noticed by the missing `indexed` marker (checked every pulse) and the
missing streams are indexed again live (`reindex`), each under its lock.
"""
import logging
from typing import Any

from server import store, threads
from server.ws import locks, stream_record
from server.ws.keys import Keys
from server.ws.storage import Storage

log = logging.getLogger('siegetank.ws.recovery')


def drop_index(redis: Any, keys: Keys) -> None:
    batch = []
    for key in redis.scan_iter(match=keys.pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            redis.delete(*batch)
            batch = []
    if batch:
        redis.delete(*batch)


def end_sessions(storage: Storage, keys: Keys, redis: Any) -> int:
    """The sessions live when the WS went down end now (reason
    ws_restart), before their hashes go; their frames are what the disk
    committed. Returns how many."""
    ended = 0
    for sid in redis.smembers(keys.active):
        ended += stream_record.end_on_restart(redis, keys, sid,
                                              storage.committed_frames(sid))
    return ended


def rebuild(storage: Storage, keys: Keys,
            redis: Any) -> tuple[int, int, int]:
    """Returns (targets, streams, committed frames) now indexed."""
    storage.clean_garbage()
    ended = end_sessions(storage, keys, redis)
    if ended:
        log.info('%d sessions ended by the restart', ended)
    drop_index(redis, keys)
    targets, nstreams, nframes = set(), 0, 0
    pipe = redis.pipeline(transaction=False)
    for sid in storage.stream_ids():
        meta = storage.stream_meta(sid)
        if meta is None or storage.target_meta(meta['target_id']) is None:
            log.error('stream folder %s is incomplete (no stream.json or no '
                      'target); left on disk, not served', sid)
            continue
        frames = storage.committed_frames(sid)
        stream_record.index(pipe, keys, sid, meta, frames)
        targets.add(meta['target_id'])
        nstreams += 1
        nframes += frames
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()
    for tid in storage.target_ids():
        if tid not in targets:  # made just before a crash, no stream yet
            storage.remove_target(tid)
    redis.set(keys.indexed, '1')
    return len(targets), nstreams, nframes


def prepare(settings: Any, redis_url: str) -> None:
    storage = Storage(settings.data_folder)
    connect_timeout, timeout = store.timeouts(settings)
    redis = store.connect_sync(redis_url, connect_timeout, max(timeout, 60))
    try:
        counts = rebuild(storage, Keys(settings.name), redis)
    finally:
        redis.close()
    log.info('recovered %d targets, %d streams, %d committed frames from %s',
             counts[0], counts[1], counts[2], storage.root)


async def _reindex_stream(app: Any, sid: str) -> int:
    """Index one stream of the disk that Redis lacks; its buffer (of an
    activation whose token Redis forgot) is thrown away first."""
    async with locks.stream_locked(app, sid):
        if await stream_record.exists(app, sid):
            return 0
        meta = await threads.disk(app.storage.stream_meta, sid)
        if meta is None or await threads.disk(app.storage.target_meta,
                                     meta['target_id']) is None:
            return 0
        await threads.disk(app.storage.discard_buffer, sid)
        frames = await threads.disk(app.storage.committed_frames, sid)
        pipe = app.redis.pipeline(transaction=True)
        stream_record.index(pipe, app.keys, sid, meta, frames)
        await pipe.execute()
        return 1


async def check_index(app: Any) -> int:
    """Rebuild the index live if Redis lost it (worker 0, every pulse)."""
    if await app.redis.exists(app.keys.indexed):
        return 0
    log.warning('redis lost the index of this workserver (restarted '
                'empty?): indexing the disk again')
    n = 0
    for sid in await threads.disk(app.storage.stream_ids):
        n += await _reindex_stream(app, sid)
    await app.redis.set(app.keys.indexed, '1')
    log.warning('index rebuilt: %d streams indexed again from disk', n)
    return n


def free_dead_holder(settings: Any, redis_url: str, prefix: str) -> int:
    """In the master, when a worker died: every lock it held (values start
    with its `prefix`) is freed now rather than after its TTL. A stream
    it held is repaired first: frames an interrupted commit had moved
    come back to the buffer (Redis' sizes cut off any uncounted bytes on
    the next request), and a stream it had taken off the disk (an
    interrupted deletion) leaves the index too."""
    keys = Keys(settings.name)
    storage = Storage(settings.data_folder)
    connect_timeout, timeout = store.timeouts(settings)
    redis = store.connect_sync(redis_url, connect_timeout, timeout)
    freed = 0
    try:
        stream_lock = keys.stream_lock('')
        for key in redis.scan_iter(match=keys.prefix + 'lock:*', count=1000):
            if key.startswith(keys.target_users('')):
                members = [m for m in redis.zrange(key, 0, -1)
                           if m.startswith(prefix)]
                if members:
                    freed += redis.zrem(key, *members)
                continue
            holder = redis.get(key)
            if holder is None or not holder.startswith(prefix):
                continue
            if key.startswith(stream_lock):
                _repair_stream(redis, keys, storage, key[len(stream_lock):])
            freed += locks.RELEASE(redis, lock=key, holder=holder)
    finally:
        redis.close()
    if freed:
        log.warning('freed %d locks of dead worker %s', freed, prefix)
    return freed


def _repair_stream(redis: Any, keys: Keys, storage: Storage,
                   sid: str) -> None:
    """A stream whose lock a dead worker held: an interrupted commit is
    undone on disk; an interrupted deletion (the disk removal done, not
    the Redis step) is finished: the same step the worker would have run
    (its session ends, the last stream takes its target along)."""
    if storage.stream_meta(sid) is not None:
        storage.restore_interrupted(sid)
        return
    tid = stream_record.target_of_sync(redis, keys, sid)
    if tid is None:
        return
    if stream_record.drop(redis, keys, sid, tid) == 0:
        storage.remove_target(tid)
