"""The real workserver (server.ws.app.WorkServer) in-process, for the CC's
in-process tests: real HTTPS on its own port in the test's loop, its own
data folder, and the test's Redis (every WS key starts with `wsd:<name>:`,
so it sits next to the CC's keys and is flushed with them per test).

`stop()` is a crash as the CC sees it (the port stops answering, no
goodbye) and `start()` a restart on the same port: the start-up recovery
(`WorkServer.prepare`) rebuilds the index from disk, as the runner does.
`on_start` is not called: the test registers the WS with the CC itself
(the body `registration.register_forever` sends), so no background task
(registration loop, heartbeat sweep) outlives a test.

The helpers read the WS's real state (disk and Redis index) so tests check
what the CC's calls did, not what it sent; `calls` records the requests
for the one thing that leaves no trace (which posts carried target_files).
"""
import json

from tornado.netutil import bind_sockets

from server import httpserver, store, tls, web
from server.tokens import token_hash
from server.ws.app import WorkServer
from server.ws.keys import Keys
from server.ws.storage import Storage
from tools.testing import CC_PASS, settings


class RecordingWorkServer(WorkServer):
    """The real WS, noting (method, path, JSON body or None) of every
    request it answered in `calls`."""

    def __init__(self, settings, redis, calls):
        super().__init__(settings, redis, 0)
        self.calls = calls

    def log_request(self, handler):
        req = handler.request
        try:
            body = json.loads(req.body) if req.body else None
        except ValueError:
            body = req.body
        self.calls.append((req.method, req.path, body))
        super().log_request(handler)


class InProcessWS:
    def __init__(self, name, redis_url, io_loop, cc_name, cc_port,
                 cc_pass=CC_PASS):
        self.name = name
        self.redis_url = redis_url
        self.io_loop = io_loop
        self.settings = settings(
            'ws', name=name, redis_url=redis_url, redis_options=None,
            command_centers={cc_name: {'url': '127.0.0.1:%d' % cc_port,
                                       'pass': cc_pass}})
        self.port = self.settings.internal_http_port
        self.keys = Keys(name)
        self.storage = Storage(self.settings.data_folder)
        self.calls = []
        self.app = None
        self.server = None
        self.redis = None

    def start(self):
        WorkServer.prepare(self.settings, self.redis_url)
        self.redis = store.connect(self.redis_url)
        self.app = RecordingWorkServer(self.settings, self.redis, self.calls)
        self.server = httpserver.Server(self.app,
                                        ssl_options=tls.server_context(
                                            self.settings),
                                        **web.http_server_options(
                                            self.settings))
        self.server.add_sockets(bind_sockets(self.port, '127.0.0.1'))
        return self

    def stop(self):
        if self.server is None:
            return
        server, redis = self.server, self.redis
        self.server = self.redis = None

        async def down():
            await server.close_all_connections()
            # The pool was passed in, so aclose() alone would leave it open.
            await redis.aclose(close_connection_pool=True)
        server.stop()
        self.io_loop.run_sync(down)

    def register_body(self):
        """What the WS's own registration sends to PUT /ws/register."""
        ext = self.settings.external_options
        return {'name': self.name, 'url': ext['external_url'],
                'http_port': ext['external_http_port']}

    # the WS's state, read directly (also while it is stopped)

    def _sync(self):
        return store.connect_sync(self.redis_url)

    def streams(self):
        """{stream id: its Redis hash} of every stream this WS holds; fails
        if the Redis index and the disk disagree."""
        r = self._sync()
        try:
            found = {}
            prefix = self.keys.stream('')
            for key in r.scan_iter(match=self.keys.stream('*')):
                found[key[len(prefix):]] = r.hgetall(key)
        finally:
            r.close()
        on_disk = set(self.storage.stream_ids())
        if set(found) != on_disk:
            raise AssertionError('WS %s: Redis index %s != disk %s'
                                 % (self.name, sorted(found), sorted(on_disk)))
        return found

    def targets(self):
        """{target id: its files as stored} of every target on disk."""
        return {tid: self.storage.target_files(tid)
                for tid in self.storage.target_ids()}

    def stream_of(self, token):
        """The stream id a core token activated here, or None."""
        r = self._sync()
        try:
            return r.get(self.keys.token(token_hash(token)))
        finally:
            r.close()
