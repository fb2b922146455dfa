"""Every Redis key of the workserver, built in one place.

Redis is only an index of what the disk holds (see storage.py): queues,
tokens, heartbeats, counters. Every key starts with the WS name so that a
Redis shared by several servers (`redis_url`) keeps them apart, and so that
recovery can drop the whole index with one pattern and rebuild it.
"""


class Keys:
    def __init__(self, ws_name):
        self.prefix = 'wsd:%s:' % ws_name

    @property
    def pattern(self):
        """Matches every key of this WS (for the rebuild on start)."""
        return self.prefix + '*'

    @property
    def targets(self):
        """set: target ids with at least one stream here."""
        return self.prefix + 'targets'

    def target_streams(self, target_id):
        """set: stream ids of the target."""
        return self.prefix + 'target:%s:streams' % target_id

    def queue(self, target_id):
        """zset: inactive OK streams of the target, scored by committed
        frames; activation pops the highest."""
        return self.prefix + 'target:%s:queue' % target_id

    @property
    def stream_prefix(self):
        return self.prefix + 'stream:'

    def stream(self, stream_id):
        """hash: target_id, status (OK/STOPPED), frames (committed),
        error_count (consecutive error stops), creation_date, active (0/1);
        while active only (an idle stream keeps its hash small): token
        (hash of the live token), donor, start_time, buffer_frames, digest
        (of the last accepted frame body, see core.body_digest)."""
        return self.stream_prefix + stream_id

    @property
    def token_prefix(self):
        return self.prefix + 'token:'

    def token(self, token_hash):
        """string: stream id of a live core token (stored hashed)."""
        return self.token_prefix + token_hash

    @property
    def heartbeats(self):
        """zset: active stream id -> expiry (unix time)."""
        return self.prefix + 'heartbeats'

    @property
    def active(self):
        """set: ids of active streams (for /active_streams)."""
        return self.prefix + 'active'

    @property
    def stream_lock_prefix(self):
        return self.prefix + 'lock:stream:'

    def stream_lock(self, stream_id):
        """string: holder of the stream's lock (frames, checkpoints and
        deactivations of one stream run one at a time)."""
        return self.stream_lock_prefix + stream_id

    def target_lock(self, target_id):
        """string: holder of the target's exclusive lock (creation of the
        target, deletion of it or of its last stream)."""
        return self.prefix + 'lock:target:%s' % target_id

    def target_users(self, target_id):
        """zset: holders of a shared hold on the target (creations of
        streams of a target that exists) -> expiry (ms)."""
        return self.prefix + 'lock:target-users:%s' % target_id
