"""Start-up reconciliation: the disk is the truth, Redis an index of it.

Before the workers fork (runner calls `WorkServer.prepare`), garbage left
by a crash is removed (temporary directories, buffers of streams that were
active, the trash) and this WS's Redis keys are dropped and rebuilt from
the disk: every stream with its committed frames (sum of its chunks),
status and error count (stream.json), inactive and back in its target's
queue if OK. Tokens, heartbeats and locks of the previous run are gone, so
cores of the previous run get 401 and ask the CC again. The same path
serves a WS whose Redis data was lost.
"""
import logging

from server import store
from server.ws.keys import Keys
from server.ws.storage import Storage
from server.ws.streams import index_stream

log = logging.getLogger('siegetank.ws.recovery')


def drop_index(redis, keys):
    batch = []
    for key in redis.scan_iter(match=keys.pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            redis.delete(*batch)
            batch = []
    if batch:
        redis.delete(*batch)


def rebuild(storage, keys, redis):
    """Returns (targets, streams, committed frames) now indexed."""
    storage.clean_garbage()
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
        index_stream(pipe, keys, sid, meta, frames)
        targets.add(meta['target_id'])
        nstreams += 1
        nframes += frames
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()
    for tid in storage.target_ids():
        if tid not in targets:  # made just before a crash, no stream yet
            storage.remove_target(tid)
    return len(targets), nstreams, nframes


def prepare(settings, redis_url):
    storage = Storage(settings['data_folder'])
    redis = store.connect_sync(redis_url)
    try:
        counts = rebuild(storage, Keys(settings['name']), redis)
    finally:
        redis.close()
    log.info('recovered %d targets, %d streams, %d committed frames from %s',
             counts[0], counts[1], counts[2], storage.root)
