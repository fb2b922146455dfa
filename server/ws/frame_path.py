"""The lean path of PUT /core/frame: no RequestHandler (its routing,
construction, headers, prepare and finish, its close callback's epoll
change were most of a frame's CPU past the work itself), for the frames
that cannot be refused before their body: a Content-Length within the
frame limit, no other transfer coding, no query, and a token this worker
saw live lately (core.LiveTokens). Everything else -- the first frame of
an activation, a missing or unknown token, a body declared too large or
chunked, every other endpoint -- goes to the Application as before, so
its refusals (401/413 before the body, JSON errors) are the ones of
web.APIHandler. Once the body is in, both paths run core.store_frame and
answer alike: JSON errors (web.error_reply), the Content-MD5 check, the
access log line and metrics of the route (web.log_line)."""
import asyncio
import json
import logging
import time
from typing import Any

from tornado import httputil
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError

from server import store
from server.web import (
    checked_md5,
    credential,
    error_reply,
    http_date,
    log_line,
    parse_body,
)
from server.ws import core

log = logging.getLogger('siegetank.ws.frame_path')

PATH = '/core/frame'
_serving: set[asyncio.Future[None]] = set()  # frames being stored


class Dispatch(httputil.HTTPMessageDelegate):
    """One request of a connection: a frame the lean path may take, else
    the Application's own delegate, decided from the headers."""

    __slots__ = ('app', 'server_conn', 'conn', 'inner', 'chunks', 'start',
                 'headers', 'hashed', 'sid')

    def __init__(self, app: Any, server_conn: Any, conn: Any) -> None:
        self.app, self.server_conn, self.conn = app, server_conn, conn
        self.inner: Any = None
        self.chunks: list[bytes] = []

    def headers_received(self, start_line: Any, headers: Any) -> Any:
        sid = None
        if start_line.method == 'PUT' and start_line.path == PATH:
            sid = self._known_frame(headers)
        if sid is None:
            self.inner = self.app.default_start_request(self.server_conn,
                                                        self.conn)
            return self.inner.headers_received(start_line, headers)
        self.start = time.monotonic()
        self.headers, self.sid = headers, sid
        return None

    def _known_frame(self, headers: Any) -> str | None:
        """The stream of a frame the lean path takes, else None."""
        length = headers.get('Content-Length', '')
        if not (length.isascii() and length.isdigit()) or len(length) > 18 \
                or int(length) > self.app.config.max_frame_body_size_in_bytes \
                or 'Transfer-Encoding' in headers:
            return None
        token = credential(headers)
        if not token:
            return None
        self.hashed = core.token_hash(token)
        return core.live_tokens(self.app).get(self.hashed)

    def data_received(self, chunk: bytes) -> Any:
        if self.inner is not None:
            return self.inner.data_received(chunk)
        self.chunks.append(chunk)
        return None

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()
            return
        task = asyncio.ensure_future(self._serve())
        _serving.add(task)
        task.add_done_callback(_serving.discard)

    def on_connection_close(self) -> None:
        if self.inner is not None:
            self.inner.on_connection_close()
        self.chunks = []

    async def _serve(self) -> None:
        status, reply, extra = 200, b'{}', {}
        try:
            raw = b''.join(self.chunks)
            self.chunks = []
            md5 = checked_md5(self.headers, raw)
            await core.store_frame(self.app, self.sid, self.hashed,
                                   parse_body(raw),
                                   core.frame_digest(md5, raw))
            message = ''
        except Exception as e:
            status, message, extra, fields = error_reply(e)
            reply = json.dumps(dict(fields, error=message)).encode()
            if not isinstance(e, (HTTPError, store.DOWN)) \
                    and not store.full(e):
                log.error('uncaught exception in PUT %s', PATH,
                          exc_info=True)
        headers = httputil.HTTPHeaders({
            'Content-Type': 'application/json; charset=UTF-8',
            'Date': http_date(), 'Content-Length': str(len(reply))})
        for name, value in extra.items():
            headers[name] = value
        try:
            self.conn.write_headers(httputil.ResponseStartLine(
                '', status, httputil.responses.get(status, 'Unknown')),
                headers, reply)
            self.conn.finish()
        except StreamClosedError:
            pass  # the client is gone; what was stored stays
        log_line(self.app.route_names.get(core.FrameHandler, PATH), 'PUT',
                 PATH, status, time.monotonic() - self.start, message)
