"""Every Redis key of the workserver, built in one place.

Redis is only an index of what the disk holds (see storage.py): queues,
tokens, heartbeats, counters. Every key starts with the WS name so that a
Redis shared by several servers (`redis_url`) keeps them apart, and so that
recovery can drop the whole index with one pattern and rebuild it.

`keys.stream(sid)` is a key; `keys.stream.template` is the same key with
'%s' in place of the id, for a Lua script that walks from one key to
another (`string.format`), as on the CC (server/cc/keys.py).

The few keys that are records rather than index (ended sessions waiting
for their CC, per-minute counts) start with `kept` instead, so the rebuild
leaves them alone.
"""
from server.store import Key


class Keys:
    def __init__(self, ws_name: str) -> None:
        p = self.prefix = 'wsd:%s:' % ws_name
        kept = self.kept = 'wskept:%s:' % ws_name
        # every key of this WS (for the rebuild on start)
        self.pattern = p + '*'
        # string: set once the index of the disk is complete; a Redis
        # without it lost our index (restarted empty): it is rebuilt
        self.indexed = p + 'indexed'
        # set: target ids with at least one stream here
        self.targets = p + 'targets'
        # The target's record (target_record.py): set: stream ids of the
        # target
        self.target_streams = Key(p + 'target:%s:streams')
        # zset: inactive OK streams of the target, scored by committed
        # frames (one backed off: by minus the end of its back-off);
        # activation pops the highest
        self.queue = Key(p + 'target:%s:queue')
        # hash: a stream's record; its fields, and every step that changes
        # them, are in stream_record.py
        self.stream = Key(p + 'stream:%s')
        # set: clients whose error stops count in the stream's error_count
        # (once each), emptied with it
        self.errors_by = Key(p + 'errors_by:%s')
        # zset: stream id -> when its back-off after anonymous error stops
        # ends and it is scored by its frames again (error_stops.py)
        self.backoff = p + 'backoff'
        # string: stream id of a live core token (by its sha256)
        self.token = Key(p + 'token:%s')
        # zset: active stream id -> expiry (unix time)
        self.heartbeats = p + 'heartbeats'
        # set: ids of active streams (for /active_streams)
        self.active = p + 'active'
        # string: holder of the stream's lock (frames, checkpoints and
        # deactivations of one stream run one at a time)
        self.stream_lock = Key(p + 'lock:stream:%s')
        # string: holder of the target's exclusive lock (creation of the
        # target, deletion of it or of its last stream)
        self.target_lock = Key(p + 'lock:target:%s')
        # zset: holders of a shared hold on the target (creations of
        # streams of a target that exists) -> expiry (ms)
        self.target_users = Key(p + 'lock:target-users:%s')
        # hash: target id -> number of its streams active now
        self.target_active = p + 'target-active'
        # Records (see the top). stream: ended sessions of activations asked
        # by that CC, one entry each (see sessions.py), deleted once the CC
        # acknowledges them
        self.outbox = Key(kept + 'sessions:%s')
        # hash: unix minute -> frames committed in it by activations that
        # CC asked for (each CC's report shows only its own)
        self.frames_per_minute = Key(kept + 'frames-per-minute:%s')
        # hash: unix minute -> error stops in it, likewise per CC
        self.errors_per_minute = Key(kept + 'errors-per-minute:%s')
        # string: why the activation of a core token (by its sha256) ended,
        # a sessions_common reason, kept a while after the end so that
        # the core's next request is told (a manager's stop is no error)
        self.ended = Key(kept + 'ended:%s')
