"""Tornado's HTTPServer with slow clients cut by one sweep a second.

Tornado bounds each header and body read with its own timer and futures
(`gen.with_timeout`): about 8% of a worker's CPU on the frame path. Here
every connection has one deadline instead, moved by plain assignments as a
request goes through its phases, and a periodic sweep closes the
connections past theirs:
- from the start of a connection, or the end of a request, until the
  headers of the next one are in: `header_timeout` (TLS handshake and
  keep-alive idling included, as in Tornado);
- from the headers until the whole body is in: `body_timeout` while the
  handler prepares (checks credentials, takes a lock), then `body_grace`,
  pushed `1 / min_body_rate` s later by each byte that arrives (as
  Apache's mod_reqtimeout MinRate does), never past `body_timeout`: a body
  dripped slower than the minimum rate is cut soon after the grace, and the
  handler's `on_connection_close` frees what it held (a stream's lock);
- while the handler works and answers: none.
A deadline is checked within SWEEP_S of passing.

An application with a `connection_class` has its connections served by
it (the WS's lean layer for core requests, ws/frame_path.py), under the
same deadlines.

A connection from a `trusted_proxies` address has its PROXY header (if
any) read before Tornado wraps it in TLS, and its requests' X-Forwarded-For
read when it has none (server/proxy.py).
"""
import asyncio
import logging
import time
from typing import Any

from tornado import httputil
from tornado.http1connection import HTTP1ServerConnection
from tornado.httpserver import HTTPServer, _HTTPRequestContext
from tornado.ioloop import PeriodicCallback

from server import proxy

log = logging.getLogger('siegetank')

SWEEP_S = 1.0


class Server(HTTPServer):
    def initialize(self, *args, header_timeout=None, body_timeout=None,
                   body_grace=None, min_body_rate=None, trusted_proxies=(),
                   **kwargs):
        super().initialize(*args, **kwargs)
        self.trusted = proxy.networks(tuple(trusted_proxies))
        self.reading = set()  # tasks reading a PROXY header
        self.conn_params.header_timeout = None  # ours, not a timer per read
        self.conn_params.body_timeout = None
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.body_grace = body_timeout if body_grace is None \
            else min(body_grace, body_timeout or body_grace)
        # Seconds of credit a received byte gives (0: no minimum rate).
        self.per_byte = 1.0 / min_body_rate if min_body_rate else 0.0
        # connection -> time; a connection's entry goes when it closes
        # (on_close), so a plain dict (a weak one cost a weakref per set)
        self.deadlines: dict[Any, float | None] = {}
        self.sweeper = PeriodicCallback(self.sweep, 1000 * SWEEP_S)
        self.sweeper.start()

    def _handle_connection(self, connection, address):
        """Tornado's accept callback, before any TLS: a trusted proxy's
        connection has its PROXY header read first."""
        if self.trusted and proxy.trusted(address[0], self.trusted):
            task = asyncio.ensure_future(self._through_proxy(connection,
                                                             address))
            self.reading.add(task)  # a task nobody holds may be collected
            task.add_done_callback(self.reading.discard)
        else:
            super()._handle_connection(connection, address)

    async def _through_proxy(self, connection, address):
        try:
            client = await asyncio.wait_for(proxy.read_header(connection),
                                            self.header_timeout)
        except (TimeoutError, OSError, proxy.BadHeader) as e:
            log.info('connection of proxy %s closed: %s', address[0],
                     str(e) or type(e).__name__)
            connection.close()
            return
        peer = proxy.Peer.through(client or address, address[0],
                                  client is not False)
        super()._handle_connection(connection, peer)

    def handle_stream(self, stream, address):
        """Tornado's, with the application's `connection_class` if it has
        one (the WS's lean frame path, ws/frame_path.py)."""
        connection_class = getattr(self.request_callback,
                                   'connection_class', HTTP1ServerConnection)
        conn = connection_class(stream, self.conn_params, _HTTPRequestContext(
            stream, address, self.protocol, self.trusted_downstream))
        self._connections.add(conn)
        conn.start_serving(self)

    def start_request(self, server_conn, request_conn):
        self.deadlines[server_conn] = _after(self.header_timeout)
        return _Phases(self, server_conn,
                       super().start_request(server_conn, request_conn),
                       request_conn)

    def on_close(self, server_conn):
        self.deadlines.pop(server_conn, None)
        super().on_close(server_conn)

    def sweep(self):
        now = time.monotonic()
        for conn, deadline in list(self.deadlines.items()):
            if deadline is not None and now > deadline:
                del self.deadlines[conn]
                conn.stream.close()  # its pending read ends the request

    def stop(self):
        self.sweeper.stop()
        super().stop()


def _after(seconds):
    return None if seconds is None else time.monotonic() + seconds


class _Phases(httputil.HTTPMessageDelegate):
    """Moves its connection's deadline at each phase of a request."""

    __slots__ = ('server', 'conn', 'delegate', 'last', 'context')

    def __init__(self, server, conn, delegate, request_conn):
        self.server, self.conn, self.delegate = server, conn, delegate
        self.last = None  # the body's hard deadline, while it comes
        self.context: Any = getattr(request_conn, 'context', None)

    def headers_received(self, start_line, headers):
        server = self.server
        peer: Any = getattr(self.context, 'address', None)
        if getattr(peer, 'proxy', None) and not peer.declared:
            # A balancer that terminated TLS: its X-Forwarded-For, per
            # request (the connection's context is shared by them).
            self.context.remote_ip = proxy.forwarded_for(
                headers.get('X-Forwarded-For', ''), server.trusted) \
                or peer[0]
        self.last = server.deadlines[self.conn] = _after(server.body_timeout)
        prepared = self.delegate.headers_received(start_line, headers)
        if not server.per_byte:
            return prepared
        if prepared is None:
            return self._grace()
        return self._after_prepare(prepared)

    async def _after_prepare(self, prepared):
        """The grace starts once the handler reads the body: a request
        that waits in `prepare` (e.g. for a busy stream's lock) has only
        `body_timeout` meanwhile."""
        await prepared
        self._grace()

    def _grace(self):
        deadlines = self.server.deadlines
        if deadlines.get(self.conn) is not None:  # still reading the body
            grace = _after(self.server.body_grace)
            deadlines[self.conn] = grace if self.last is None \
                or grace < self.last else self.last

    def data_received(self, chunk):
        server = self.server
        if server.per_byte:
            deadline = server.deadlines.get(self.conn)
            if deadline is not None:
                deadline += len(chunk) * server.per_byte
                server.deadlines[self.conn] = deadline \
                    if self.last is None or deadline < self.last \
                    else self.last
        return self.delegate.data_received(chunk)

    def finish(self):
        self.server.deadlines[self.conn] = None
        self.delegate.finish()

    def on_connection_close(self):
        self.server.deadlines.pop(self.conn, None)
        self.delegate.on_connection_close()
