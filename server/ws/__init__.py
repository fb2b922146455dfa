"""The workserver: stores targets and streams, hands a core its stream,
takes its frames and checkpoints, notices when a core dies.

Modules: keys (every Redis key), storage (the disk, the truth), locks
(stream and target locks in Redis), streams (the model), cc_api (the
endpoints the CC calls), download (Range downloads), core (core endpoints
+ heartbeat sweep), recovery (rebuild of the Redis index from disk on
start), registration (with the CCs), app (routes, jobs).

How the WS behaves where the API (docs/api.md) is silent: docs/workserver.md.
"""
