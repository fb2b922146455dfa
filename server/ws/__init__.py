"""The workserver: stores targets and streams, hands a core its stream,
takes its frames and checkpoints, notices when a core dies.

Modules: keys (every Redis key), storage (the disk, the truth), locks
(stream and target locks in Redis), streams (the model), cc_api (the
endpoints the CC calls), download (Range downloads), core (core endpoints
+ heartbeat sweep), recovery (rebuild of the Redis index from disk on
start), registration (with the CCs), fastredis (the hot-path Redis
connection), app (routes, jobs).

Where API.md is silent, the WS does this:
- POST /streams stores every file exactly as the JSON string sent; a
  `.b64`/`.gz.b64` file that does not decode is a 400. target_files sent
  again for a known target are ignored (the first ones stay).
- Activation pops the stream with the most committed frames (ties: the
  greatest stream id); an unknown target is a 503 like an empty queue.
- Frames: decoded files go to the stream's buffer; two files that decode to
  the same name are a 400. A body identical (its Content-MD5, else its
  SHA-1) to the last accepted one is a retry and a no-op 200, so a core
  must not send the very same frame body twice in a row on purpose.
- Checkpoints: `frames` (later cores) is recorded in the chunk's meta.json
  as reported_frames; the committed count is the sum of the `frames` of the
  PUT /core/frame calls since the last checkpoint, whatever the core says.
  A successful checkpoint resets error_count (errors are consecutive).
- Downloads: before the first commit any valid name gives 200 and an empty
  body; after it, a name no chunk holds is a 404. One range per request;
  a malformed Range is ignored (200), an unsatisfiable one is 416. A bad or
  expired signature is a 401 like a wrong cc_pass.
- GET /targets/streams of an unknown target is a 404; PUT /targets/delete
  of one is a 200. GET /active_streams: total_frames = committed frames,
  buffer_frames = uncommitted, donor = donor_id given at activation or null.
- GET /core/start returns `options: {}` (the CC holds target options and
  gives them to the core in /core/assign).
- The disk guard (min_free_disk_in_mb) makes POST /streams and activation
  503; a frame or checkpoint that hits a full disk is a 503 that stores
  nothing (the buffer is cut back / given back for the retry).
- A stream busy for over 30 s (its lock held, e.g. a huge checkpoint) makes
  other requests on it 503; a worker process killed while holding a
  stream's lock blocks that stream for at most 5 minutes (lock TTL); a
  restart of the WS clears all locks.
"""
