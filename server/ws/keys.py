"""Every Redis key of the workserver, built in one place.

Redis is only an index of what the disk holds (see storage.py): queues,
tokens, heartbeats, counters. Every key starts with the WS name so that a
Redis shared by several servers (`redis_url`) keeps them apart, and so that
recovery can drop the whole index with one pattern and rebuild it.

A Lua script that walks from one key to another gets a template (`'%s'` in
place of the id, filled with `string.format`), as on the CC
(server/cc/keys.py), so that the names stay defined here.
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

    def stream(self, stream_id):
        """hash: target_id, status (OK/STOPPED), frames (committed),
        error_count (consecutive error stops), creation_date, active (0/1);
        while active only (an idle stream keeps its hash small): token
        (hash of the live token), donor, start_time, buffer_frames, digest
        (of the last accepted frame body, see core.body_digest)."""
        return self.prefix + 'stream:%s' % stream_id

    def token(self, token_hash):
        """string: stream id of a live core token (stored hashed)."""
        return self.prefix + 'token:%s' % token_hash

    @property
    def heartbeats(self):
        """zset: active stream id -> expiry (unix time)."""
        return self.prefix + 'heartbeats'

    @property
    def active(self):
        """set: ids of active streams (for /active_streams)."""
        return self.prefix + 'active'

    def stream_lock(self, stream_id):
        """string: holder of the stream's lock (frames, checkpoints and
        deactivations of one stream run one at a time)."""
        return self.prefix + 'lock:stream:%s' % stream_id

    def target_lock(self, target_id):
        """string: holder of the target's exclusive lock (creation of the
        target, deletion of it or of its last stream)."""
        return self.prefix + 'lock:target:%s' % target_id

    def target_users(self, target_id):
        """zset: holders of a shared hold on the target (creations of
        streams of a target that exists) -> expiry (ms)."""
        return self.prefix + 'lock:target-users:%s' % target_id

    # Templates for Lua scripts (see the module docstring).

    @property
    def stream_template(self):
        return self.stream('%s')

    @property
    def token_template(self):
        return self.token('%s')

    @property
    def stream_lock_template(self):
        return self.stream_lock('%s')
