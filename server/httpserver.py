"""Tornado's HTTPServer with slow clients cut by one sweep a second.

Tornado bounds each header and body read with its own timer and futures
(`gen.with_timeout`): about 8% of a worker's CPU on the frame path. Here
every connection has one deadline instead, moved by plain assignments as a
request goes through its phases, and a periodic sweep closes the
connections past theirs:
- from the start of a connection, or the end of a request, until the
  headers of the next one are in: `header_timeout` (TLS handshake and
  keep-alive idling included, as in Tornado);
- from the headers until the whole body is in: `body_timeout`;
- while the handler works and answers: none.
A deadline is checked within SWEEP_S of passing.
"""
import time
import weakref
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback

SWEEP_S = 1.0


class Server(HTTPServer):
    def initialize(self, *args, header_timeout=None, body_timeout=None,
                   **kwargs):
        super().initialize(*args, **kwargs)
        self.conn_params.header_timeout = None  # ours, not a timer per read
        self.conn_params.body_timeout = None
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        # connection -> time
        self.deadlines: weakref.WeakKeyDictionary[Any, float | None] = \
            weakref.WeakKeyDictionary()
        self.sweeper = PeriodicCallback(self.sweep, 1000 * SWEEP_S)
        self.sweeper.start()

    def start_request(self, server_conn, request_conn):
        self.deadlines[server_conn] = _after(self.header_timeout)
        return _Phases(self, server_conn,
                       super().start_request(server_conn, request_conn))

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

    __slots__ = ('server', 'conn', 'delegate')

    def __init__(self, server, conn, delegate):
        self.server, self.conn, self.delegate = server, conn, delegate

    def headers_received(self, start_line, headers):
        self.server.deadlines[self.conn] = _after(self.server.body_timeout)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk):
        return self.delegate.data_received(chunk)

    def finish(self):
        self.server.deadlines[self.conn] = None
        self.delegate.finish()

    def on_connection_close(self):
        self.server.deadlines.pop(self.conn, None)
        self.delegate.on_connection_close()
